"""Mistral checkpoint format: RoPE permutation, names, params.json, folder round trips (tiny model, CPU)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from voxtral_train import mistral_format as mf
from voxtral_train.model import load_model, voxtral_mini_4b_config
from tiny_inputs import tiny_logits

# The released params.json (public copies agree key for key); vLLM and mistral-common read it.
REAL_PARAMS = {
    "dim": 3072, "n_layers": 26, "head_dim": 128, "hidden_dim": 9216, "n_heads": 32, "n_kv_heads": 8,
    "use_biases": False, "causal": True, "rope_theta": 1000000.0, "norm_eps": 1e-05, "vocab_size": 131072,
    "model_parallel": 1, "tied_embeddings": True, "sliding_window": 8192, "model_max_length": 131072,
    "multimodal": {"whisper_model_args": {
        "encoder_args": {
            "audio_encoding_args": {"sampling_rate": 16000, "frame_rate": 12.5, "num_mel_bins": 128, "hop_length": 160,
                                    "window_size": 400, "chunk_length_s": None, "global_log_mel_max": 1.5,
                                    "transcription_format": "streaming"},
            "dim": 1280, "n_layers": 32, "head_dim": 64, "hidden_dim": 5120, "n_heads": 32, "vocab_size": 131072,
            "n_kv_heads": 32, "use_biases": True, "use_cache": False, "rope_theta": 1000000.0, "causal": True,
            "norm_eps": 1e-05, "pos_embed": "rope", "max_source_positions": None, "ffn_type": "swiglu",
            "norm_type": "rms_norm", "sliding_window": 750},
        "downsample_args": {"downsample_factor": 4}}},
    "ada_rms_norm_t_cond": True, "ada_rms_norm_t_cond_dim": 32,
}


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = load_model("tiny")
    return model.eval(), tokenizer


# ---------------------------------------------------------------------------------------------------------------
# permutation


@pytest.mark.parametrize("shape,heads", [((64, 24), 4), ((32, 7), 8), ((16,), 2), ((128,), 4)])
def test_permutation_moves_pair_members_to_the_two_halves_and_inverts(shape, heads):
    w = torch.randn(shape)
    head_dim = shape[0] // heads
    # independent expectation: within each head, interleaved row 2i -> i, row 2i+1 -> head_dim/2 + i
    order = [0] * shape[0]
    for h in range(heads):
        for i in range(head_dim // 2):
            order[h * head_dim + i] = h * head_dim + 2 * i
            order[h * head_dim + head_dim // 2 + i] = h * head_dim + 2 * i + 1
    assert torch.equal(mf.permute_for_rope(w, heads), w[order])
    assert torch.equal(mf.unpermute_for_rope(mf.permute_for_rope(w, heads), heads), w)
    assert torch.equal(mf.permute_for_rope(mf.unpermute_for_rope(w, heads), heads), w)


# ---------------------------------------------------------------------------------------------------------------
# names and params.json


def test_real_config_has_711_tensors_and_4_43b_parameters():
    shapes = mf.expected_shapes(voxtral_mini_4b_config())
    assert len(shapes) == 711
    assert "output.weight" not in shapes
    assert round(sum(torch.Size(s).numel() for s in shapes.values()) / 1e9, 2) == 4.43
    assert shapes["layers.0.attention.wk.weight"] == (8 * 128, 3072)
    assert shapes["mm_streams_embeddings.embedding_module.audio_language_projection.0.weight"] == (3072, 4 * 1280)


def test_real_params_round_trip_exactly_and_keep_encoder_rope_theta():
    config = mf.config_from_params(json.loads(json.dumps(REAL_PARAMS)))
    assert config.audio_config.rope_parameters["rope_theta"] == 1e6  # the class default would be 1e4
    assert (config.audio_config.sliding_window, config.text_config.sliding_window) == (750, 8192)
    assert (config.audio_config.head_dim, config.text_config.head_dim) == (64, 128)
    assert config.text_config.num_key_value_heads == 8 and config.downsample_factor == 4
    params = mf.params_from_config(config)
    assert params == REAL_PARAMS
    assert list(params) == list(REAL_PARAMS)


def test_params_errors_name_the_key():
    broken = json.loads(json.dumps(REAL_PARAMS))
    del broken["multimodal"]["whisper_model_args"]["encoder_args"]["head_dim"]
    with pytest.raises(mf.MistralFormatError, match="head_dim"):
        mf.config_from_params(broken)
    untied = {**REAL_PARAMS, "tied_embeddings": False}
    with pytest.raises(mf.MistralFormatError, match="tied_embeddings"):
        mf.config_from_params(untied)


def test_conversion_names_missing_and_unexpected_tensors(tiny):
    model, _ = tiny
    sd = mf.hf_to_mistral_state_dict(model.state_dict(), model.config)
    params = mf.params_from_config(model.config)
    sd["layers.0.attention.wq.bias"] = sd.pop("layers.0.attention.wq.weight")
    with pytest.raises(mf.MistralFormatError, match=r"missing.*layers\.0\.attention\.wq\.weight.*unexpected.*wq\.bias"):
        mf.mistral_to_hf_state_dict(sd, params)


# ---------------------------------------------------------------------------------------------------------------
# folders


def _tensors(folder):
    return {k: v for f in mf.weight_files(folder) for k, v in load_file(str(f)).items()}


def test_fp32_folder_round_trip_is_exact(tiny, tmp_path):
    model, tokenizer = tiny
    first = mf.write_mistral_folder(tmp_path / "a", model.config, model.state_dict(), tokenizer.tekken_path, 960,
                                    dtype=torch.float32)
    assert sorted(p.name for p in first.iterdir()) == ["consolidated.safetensors", "params.json", "tekken.json"]
    assert json.loads((first / "tekken.json").read_text())["audio"]["transcription_delay_ms"] == 960

    reloaded, _ = load_model(first)
    assert torch.allclose(tiny_logits(reloaded.eval()), tiny_logits(model), atol=1e-5, rtol=0)

    config, sd = mf.read_mistral_folder(first)
    second = mf.write_mistral_folder(tmp_path / "b", config, sd, first / "tekken.json", 960, dtype=torch.float32)
    a, b = _tensors(first), _tensors(second)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((first / "params.json").read_text()) == json.loads((second / "params.json").read_text())


def test_bf16_round_trip_is_bit_identical(tiny, tmp_path):
    model, tokenizer = tiny
    first = mf.write_mistral_folder(tmp_path / "a", model.config, model.state_dict(), tokenizer.tekken_path)
    config, sd = mf.read_mistral_folder(first)
    assert {t.dtype for t in sd.values()} == {torch.bfloat16}
    second = mf.write_mistral_folder(tmp_path / "b", config, sd, first / "tekken.json")
    a, b = _tensors(first), _tensors(second)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sharded_folder_reads_back_the_same(tiny, tmp_path):
    model, tokenizer = tiny
    folder = mf.write_mistral_folder(tmp_path / "s", model.config, model.state_dict(), tokenizer.tekken_path,
                                     shard_bytes=400_000)
    shards = sorted(p.name for p in folder.glob("consolidated-*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"consolidated-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((folder / mf.INDEX_FILE).read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert not (folder / mf.SINGLE_WEIGHTS_FILE).exists()
    _, sd = mf.read_mistral_folder(folder)
    for name, tensor in model.state_dict().items():
        assert torch.equal(sd[name], tensor.to(torch.bfloat16)), name


def test_skipping_the_inverse_permutation_changes_the_logits(tiny, tmp_path, monkeypatch):
    model, tokenizer = tiny
    monkeypatch.setattr(mf, "unpermute_for_rope", lambda w, heads: w)
    folder = mf.write_mistral_folder(tmp_path / "bad", model.config, model.state_dict(), tokenizer.tekken_path,
                                     dtype=torch.float32)
    monkeypatch.undo()
    wrong, _ = load_model(folder)
    assert (tiny_logits(wrong.eval()) - tiny_logits(model)).abs().max() > 1e-3


def test_refuses_a_folder_with_other_weights(tiny, tmp_path):
    model, tokenizer = tiny
    (tmp_path / "model.safetensors").write_bytes(b"old")
    with pytest.raises(mf.MistralFormatError, match="vLLM would silently load the stale"):
        mf.write_mistral_folder(tmp_path, model.config, model.state_dict(), tokenizer.tekken_path)


def test_reader_names_the_missing_file(tmp_path):
    with pytest.raises(mf.MistralFormatError, match="params.json"):
        mf.read_mistral_folder(tmp_path)
    (tmp_path / "params.json").write_text(json.dumps(REAL_PARAMS))
    with pytest.raises(mf.MistralFormatError, match="consolidated.safetensors"):
        mf.read_mistral_folder(tmp_path)
