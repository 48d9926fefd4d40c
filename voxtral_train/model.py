"""Build or load the backbone: transformers' `VoxtralRealtimeForConditionalGeneration` and its tokenizer.

`load_model(source)` accepts
- `"tiny"`: a random-initialised model of the real architecture at demo size (see `tiny_config`);
- `"mini"`: the embedded pretrained mini base (voxtral_train/assets/mini: 3 M parameters trained on synthetic
  English speech, recipes/mini_base), an HF-format folder like any other;
- `"mini-scratch"`: the mini base's architecture and tokenizer, random-initialised (what recipes/mini_base trains);
- a local HF-format folder (`config.json` + safetensors + `tekken.json`, as published on the Hub);
- a local Mistral-format folder (`params.json` + `consolidated*.safetensors` + `tekken.json`, what vLLM serves),
  converted in memory by `voxtral_train.mistral_format`.
Nothing is fetched from a hub. The returned model has the two training fixes of `voxtral_train.patches` applied.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import VoxtralRealtimeConfig, VoxtralRealtimeForConditionalGeneration

from voxtral_train import protocol
from voxtral_train.patches import apply_training_fixes
from voxtral_train.tokenizer import TINY_NUM_BPE_RANKS, StreamingTokenizer

MINI_DIR = Path(__file__).resolve().parent / "assets" / "mini"
MINI_NUM_BPE_RANKS = 4000  # 2.3 pieces per word of the synthetic corpus (1000 ranks: 2.8; every piece is a step)

# Weight dtypes by torch's names: the one vocabulary of model.dtype, load_model, voxtral-eval and voxtral-export.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(ValueError):
    pass


def architecture_config(*, enc_dim: int, enc_layers: int, enc_heads: int, enc_head_dim: int, enc_ffn: int,
                        dec_dim: int, dec_layers: int, dec_heads: int, dec_kv_heads: int, dec_head_dim: int,
                        dec_ffn: int, vocab_size: int) -> VoxtralRealtimeConfig:
    """The architecture with its fixed facts (docs/MODEL.md, "Shapes") filled in; only the sizes vary."""
    return VoxtralRealtimeConfig(
        audio_config={
            "hidden_size": enc_dim,
            "num_hidden_layers": enc_layers,
            "num_attention_heads": enc_heads,
            "head_dim": enc_head_dim,  # 32 x 64 = 2048 != 1280 in the real encoder
            "intermediate_size": enc_ffn,
            "num_mel_bins": protocol.NUM_MEL_BINS,
            "rms_norm_eps": 1e-5,
            "sliding_window": 750,  # 15 s of 20 ms encoder frames
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},  # the class default (1e4) is wrong
            "vocab_size": vocab_size,
        },
        text_config={
            "hidden_size": dec_dim,
            "num_hidden_layers": dec_layers,
            "num_attention_heads": dec_heads,
            "num_key_value_heads": dec_kv_heads,
            "head_dim": dec_head_dim,
            "intermediate_size": dec_ffn,
            "vocab_size": vocab_size,
            "rms_norm_eps": 1e-5,
            "sliding_window": 8192,
            "max_position_embeddings": 131072,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
            "tie_word_embeddings": True,
        },
        downsample_factor=4,
        audio_length_per_tok=protocol.MEL_FRAMES_PER_POSITION,
        default_num_delay_tokens=protocol.delay_ms_to_tokens(protocol.DEFAULT_DELAY_MS),
        tie_word_embeddings=True,
    )


def voxtral_mini_4b_config() -> VoxtralRealtimeConfig:
    """The released Voxtral Mini 4B Realtime 2602 (4.43 B parameters)."""
    return architecture_config(enc_dim=1280, enc_layers=32, enc_heads=32, enc_head_dim=64, enc_ffn=5120,
                               dec_dim=3072, dec_layers=26, dec_heads=32, dec_kv_heads=8, dec_head_dim=128,
                               dec_ffn=9216, vocab_size=131072)


def scaled_config() -> VoxtralRealtimeConfig:
    """The real proportions at 1/4 width (1280/3072 -> 320/768), 66 M parameters: CPU benchmarks whose encoder:decoder
    cost ratio matches the released model's."""
    return architecture_config(enc_dim=320, enc_layers=8, enc_heads=8, enc_head_dim=64, enc_ffn=1280, dec_dim=768,
                               dec_layers=6, dec_heads=8, dec_kv_heads=2, dec_head_dim=128, dec_ffn=2304,
                               vocab_size=8192)


def tiny_config(vocab_size: int = 2000) -> VoxtralRealtimeConfig:
    """Demo size "S" of docs/TINY_MODELS.md (0.63 M parameters + embeddings): learns the bundled set in a minute."""
    return architecture_config(enc_dim=64, enc_layers=2, enc_heads=4, enc_head_dim=16, enc_ffn=256, dec_dim=128,
                               dec_layers=2, dec_heads=4, dec_kv_heads=2, dec_head_dim=32, dec_ffn=384,
                               vocab_size=vocab_size)


def mini_config(vocab_size: int = 1000 + MINI_NUM_BPE_RANKS) -> VoxtralRealtimeConfig:
    """The embedded mini base (3.3 M parameters with its 5000-token vocabulary): big enough to transcribe unseen
    sentences of its synthetic voices, small enough to pretrain on two CPU cores in about an hour."""
    return architecture_config(enc_dim=128, enc_layers=3, enc_heads=4, enc_head_dim=32, enc_ffn=512, dec_dim=192,
                               dec_layers=3, dec_heads=6, dec_kv_heads=2, dec_head_dim=32, dec_ffn=576,
                               vocab_size=vocab_size)


# Sources built in memory with random weights: (architecture, BPE ranks of the small Tekken file).
_RANDOM_INIT = {"tiny": (tiny_config, TINY_NUM_BPE_RANKS), "mini-scratch": (mini_config, MINI_NUM_BPE_RANKS)}


def load_model(
    source: str | Path,
    *,
    dtype: str | torch.dtype = "float32",
    attn_implementation: str = "sdpa",
    seed: int = 0,
) -> tuple[VoxtralRealtimeForConditionalGeneration, StreamingTokenizer]:
    """Return `(model, tokenizer)` for `"tiny"`, `"mini"`, `"mini-scratch"`, an HF-format or a Mistral-format folder."""
    if isinstance(dtype, str) and dtype not in DTYPES:
        raise ModelLoadError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    if str(source) in _RANDOM_INIT:
        build_config, num_bpe_ranks = _RANDOM_INIT[str(source)]
        tokenizer = StreamingTokenizer.tiny(num_bpe_ranks)
        config = build_config(vocab_size=tokenizer.vocab_size)
        config._attn_implementation = attn_implementation
        torch.manual_seed(seed)  # random init is deterministic for a given seed
        model = VoxtralRealtimeForConditionalGeneration(config).to(torch_dtype)
        return apply_training_fixes(model), tokenizer

    folder = MINI_DIR if str(source) == "mini" else Path(source)
    if not folder.is_dir():
        raise ModelLoadError(f"model source {source!r} is neither 'tiny', 'mini', 'mini-scratch' nor an existing folder")
    tokenizer = _folder_tokenizer(folder)
    if (folder / "params.json").is_file():
        model = _load_mistral_folder(folder, torch_dtype, attn_implementation)
    elif (folder / "config.json").is_file():
        model = VoxtralRealtimeForConditionalGeneration.from_pretrained(
            folder, dtype=torch_dtype, attn_implementation=attn_implementation, local_files_only=True
        )
    else:
        raise ModelLoadError(
            f"{folder} has neither config.json (HF format) nor params.json (Mistral format); "
            f"found: {sorted(p.name for p in folder.iterdir())}"
        )
    if model.config.text_config.vocab_size < tokenizer.vocab_size:
        raise ModelLoadError(
            f"{folder}: tokenizer has {tokenizer.vocab_size} tokens but the model embeds only "
            f"{model.config.text_config.vocab_size}"
        )
    return apply_training_fixes(model), tokenizer


def _folder_tokenizer(folder: Path) -> StreamingTokenizer:
    path = folder / "tekken.json"
    if not path.is_file():
        raise ModelLoadError(f"{folder} has no tekken.json: the Voxtral tokenizer file is required beside the weights")
    return StreamingTokenizer(path)


def _load_mistral_folder(folder: Path, dtype: torch.dtype, attn_implementation: str):
    from voxtral_train.mistral_format import read_mistral_folder

    config, state_dict = read_mistral_folder(folder)
    config._attn_implementation = attn_implementation
    model = VoxtralRealtimeForConditionalGeneration(config).to(dtype)
    state_dict = {name: tensor.to(dtype) for name, tensor in state_dict.items()}
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = [name for name in missing if name != "lm_head.weight"]  # tied to the embeddings
    if missing or unexpected:
        raise ModelLoadError(f"{folder}: converted weights do not fit the model: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model

