"""load_model: the tiny preset, HF folders, and the errors a user sees for a bad folder."""

import shutil

import pytest
import torch

from voxtral_train import load_model, protocol
from voxtral_train.model import ModelLoadError, tiny_config, voxtral_mini_4b_config


def _forward(model, seed=0, positions=12, delay=6):
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(1, protocol.NUM_MEL_BINS, positions * protocol.MEL_FRAMES_PER_POSITION, generator=gen)
    ids = torch.randint(0, model.config.text_config.vocab_size, (1, positions), generator=gen)
    with torch.no_grad():
        return model(input_ids=ids, input_features=features, num_delay_tokens=delay, use_cache=False).logits


def test_tiny_is_deterministic_per_seed(tiny):
    (a, tok), (b, _), (c, _) = tiny(0), tiny(0), tiny(1)
    assert torch.equal(_forward(a), _forward(b))
    assert not torch.equal(_forward(a), _forward(c))
    assert (tok.ids.bos, tok.ids.eos, tok.ids.streaming_pad, tok.ids.streaming_word) == (1, 2, 32, 33)
    assert a.config.text_config.vocab_size == tok.vocab_size
    assert a.lm_head.weight is a.model.language_model.embed_tokens.weight  # tied


def test_real_config_has_published_shape():
    config = voxtral_mini_4b_config()
    with torch.device("meta"):
        from transformers import VoxtralRealtimeForConditionalGeneration

        model = VoxtralRealtimeForConditionalGeneration(config)
    n_params = sum(p.numel() for p in model.parameters())  # tied embeddings counted once
    assert abs(n_params / 1e9 - 4.43) < 0.02, n_params
    assert config.audio_config.rope_parameters["rope_theta"] == 1e6


def test_hf_folder_round_trip(tiny, tmp_path):
    model, tokenizer = tiny(3)
    model.save_pretrained(tmp_path, safe_serialization=True)
    shutil.copy(tokenizer.tekken_path, tmp_path / "tekken.json")
    loaded, loaded_tok = load_model(tmp_path)
    assert torch.allclose(_forward(model), _forward(loaded), atol=1e-6)
    assert loaded_tok.ids == tokenizer.ids


def test_bf16_dtype(tiny):
    model, _ = load_model("tiny", dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_bad_sources_name_what_is_missing(tmp_path):
    with pytest.raises(ModelLoadError, match="neither 'tiny', 'mini', 'mini-scratch' nor an existing folder"):
        load_model(tmp_path / "nope")
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="tekken.json"):
        load_model(tmp_path)
    model, tokenizer = load_model("tiny")
    shutil.copy(tokenizer.tekken_path, tmp_path / "tekken.json")
    with pytest.raises(ModelLoadError, match="neither config.json"):
        load_model(tmp_path)


def test_tiny_config_is_small():
    config = tiny_config()
    assert config.text_config.hidden_size == 128 and config.audio_config.hidden_size == 64
