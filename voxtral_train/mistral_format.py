"""Mistral's native checkpoint format (what vLLM serves) <-> transformers' `VoxtralRealtimeForConditionalGeneration`.

A Mistral folder is `params.json` + `consolidated.safetensors` (or shards `consolidated-XXXXX-of-YYYYY.safetensors`
with `consolidated.safetensors.index.json`) + `tekken.json`. See docs/MODEL.md, "Checkpoint formats".

Two things differ from the HF layout besides names:
- RoPE: Mistral keeps q/k rows in interleaved (GPT-J) order, transformers in rotate-half order. `permute_for_rope` is
  the one place that converts (decoder q/k, encoder q/k and the encoder q bias).
- Tied embeddings: Mistral stores `tok_embeddings` once and no `output.weight`; HF has `lm_head.weight` as an alias.

Everything here is pure tensor/dict work except `read_mistral_folder` / `write_mistral_folder`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import VoxtralRealtimeConfig

from voxtral_train import protocol

PARAMS_FILE = "params.json"
TEKKEN_FILE = "tekken.json"
SINGLE_WEIGHTS_FILE = "consolidated.safetensors"
INDEX_FILE = "consolidated.safetensors.index.json"
DEFAULT_SHARD_BYTES = 10 * 1024**3  # the released model (8.9 GB bf16) ships as one file; keep that by default

HF_TIED_HEAD = "lm_head.weight"
HF_EMBED = "model.language_model.embed_tokens.weight"
ADA_COND_DIM = 32  # transformers hard-codes the ada_rms_norm bottleneck (VoxtralRealtimeTextAdaRmsNorm)

_MM = "mm_streams_embeddings.embedding_module"
_ENC = f"{_MM}.whisper_encoder"

# Per-layer leaf names, Mistral -> HF. Decoder: no biases. Encoder: biases on q, v, o and down (w2) only.
_DECODER_LAYER = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ada_rms_norm_t_cond.0.weight": "ada_rms_norm.linear1.weight",
    "ada_rms_norm_t_cond.2.weight": "ada_rms_norm.linear2.weight",
}
_ENCODER_LAYER = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wq.bias": "self_attn.q_proj.bias",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wv.bias": "self_attn.v_proj.bias",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention.wo.bias": "self_attn.o_proj.bias",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w2.bias": "mlp.down_proj.bias",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "self_attn_layer_norm.weight",
    "ffn_norm.weight": "final_layer_norm.weight",
}
_GLOBAL = {
    "norm.weight": "model.language_model.norm.weight",
    f"{_MM}.tok_embeddings.weight": HF_EMBED,
    f"{_ENC}.conv_layers.0.conv.weight": "model.audio_tower.embedder.conv1.weight",
    f"{_ENC}.conv_layers.0.conv.bias": "model.audio_tower.embedder.conv1.bias",
    f"{_ENC}.conv_layers.1.conv.weight": "model.audio_tower.embedder.conv2.weight",
    f"{_ENC}.conv_layers.1.conv.bias": "model.audio_tower.embedder.conv2.bias",
    f"{_ENC}.transformer.norm.weight": "model.audio_tower.norm.weight",
    f"{_MM}.audio_language_projection.0.weight": "model.multi_modal_projector.linear_1.weight",
    f"{_MM}.audio_language_projection.2.weight": "model.multi_modal_projector.linear_2.weight",
}

# Stale weight files that vLLM (or transformers) could pick up instead of the ones we write.
_STALE_PATTERNS = ("model*.safetensors", "model.safetensors.index.json", "consolidated*.safetensors", INDEX_FILE,
                   "*.bin", "*.pt", "*.pth")


class MistralFormatError(ValueError):
    pass


# ---------------------------------------------------------------------------------------------------------------
# RoPE permutation


def permute_for_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Mistral interleaved rows (x0,y0,x1,y1,...) per head -> HF rotate-half rows (x0,x1,...,y0,y1,...).

    w: (rows, cols) weight or (rows,) bias, rows = n_heads * head_dim.
    """
    rows = w.shape[0]
    # (H, head_dim/2, 2, ...) -> (H, 2, head_dim/2, ...): pair members go to the two halves
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute_for_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Exact inverse of `permute_for_rope`: HF rotate-half rows -> Mistral interleaved rows."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def rope_heads(config: VoxtralRealtimeConfig) -> dict[str, int]:
    """HF tensor-name suffix pattern -> number of heads its rows are grouped by, for every RoPE-permuted tensor."""
    text, audio = config.text_config, config.audio_config
    return {
        r"model\.language_model\.layers\.\d+\.self_attn\.q_proj\.weight": text.num_attention_heads,
        r"model\.language_model\.layers\.\d+\.self_attn\.k_proj\.weight": text.num_key_value_heads,
        r"model\.audio_tower\.layers\.\d+\.self_attn\.q_proj\.(weight|bias)": audio.num_attention_heads,
        r"model\.audio_tower\.layers\.\d+\.self_attn\.k_proj\.weight": audio.num_attention_heads,
    }


def rope_heads_for(hf_name: str, config: VoxtralRealtimeConfig) -> int | None:
    """Heads the rows of `hf_name` are grouped by, if it is RoPE-permuted (q/k weights, encoder q bias)."""
    for pattern, heads in rope_heads(config).items():
        if re.fullmatch(pattern, hf_name):
            return heads
    return None


# ---------------------------------------------------------------------------------------------------------------
# Names


def name_map(config: VoxtralRealtimeConfig) -> dict[str, str]:
    """Every tensor of a Mistral checkpoint for this config, Mistral name -> HF name (711 for the real model)."""
    names = dict(_GLOBAL)
    for i in range(config.text_config.num_hidden_layers):
        names.update({f"layers.{i}.{m}": f"model.language_model.layers.{i}.{h}" for m, h in _DECODER_LAYER.items()})
    for i in range(config.audio_config.num_hidden_layers):
        names.update(
            {f"{_ENC}.transformer.layers.{i}.{m}": f"model.audio_tower.layers.{i}.{h}" for m, h in _ENCODER_LAYER.items()}
        )
    return names


def expected_shapes(config: VoxtralRealtimeConfig) -> dict[str, tuple[int, ...]]:
    """Mistral name -> shape, read off a meta-device model so it can never drift from transformers' modules."""
    from transformers import VoxtralRealtimeForConditionalGeneration

    with torch.device("meta"):
        model = VoxtralRealtimeForConditionalGeneration(config)
    hf_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return {m: hf_shapes[h] for m, h in name_map(config).items()}


def hf_canonical_name(name: str) -> str:
    """`save_pretrained`'s legacy layout (language_model.model.*, audio_tower.*) -> `state_dict()` names."""
    for old, new in (
        ("language_model.model.", "model.language_model."),
        ("language_model.lm_head.", "lm_head."),
        ("audio_tower.", "model.audio_tower."),
        ("multi_modal_projector.", "model.multi_modal_projector."),
    ):
        if name.startswith(old):
            return new + name[len(old) :]
    return name


def _check_names(have: set[str], want: set[str], what: str) -> None:
    missing, unexpected = sorted(want - have), sorted(have - want)
    if missing or unexpected:
        raise MistralFormatError(
            f"{what}: {len(missing)} missing tensor(s) {missing[:10]}, {len(unexpected)} unexpected {unexpected[:10]}"
        )


def mistral_to_hf_state_dict(sd: dict[str, torch.Tensor], params: dict) -> dict[str, torch.Tensor]:
    """Mistral tensors -> HF `state_dict()` names (incl. the tied `lm_head.weight` alias), q/k permuted."""
    config = config_from_params(params)
    names = name_map(config)
    _check_names(set(sd), set(names), "Mistral checkpoint")
    out = {}
    for m_name, hf_name in names.items():
        heads = rope_heads_for(hf_name, config)
        out[hf_name] = sd[m_name] if heads is None else permute_for_rope(sd[m_name], heads)
    out[HF_TIED_HEAD] = out[HF_EMBED]
    return out


def hf_to_mistral_state_dict(sd: dict[str, torch.Tensor], config: VoxtralRealtimeConfig) -> dict[str, torch.Tensor]:
    """HF `state_dict()` -> Mistral names, q/k back in interleaved order, no output head (it must be tied)."""
    names = name_map(config)
    hf_names = set(names.values())
    have = set(sd) - {HF_TIED_HEAD}
    _check_names(have, hf_names, "HF state dict")
    if HF_TIED_HEAD in sd and not torch.equal(sd[HF_TIED_HEAD], sd[HF_EMBED]):
        raise MistralFormatError(
            f"{HF_TIED_HEAD} differs from {HF_EMBED}: the Mistral format stores tied embeddings only "
            "(was the model untied during training?)"
        )
    out = {}
    for m_name, hf_name in names.items():
        heads = rope_heads_for(hf_name, config)
        out[m_name] = sd[hf_name] if heads is None else unpermute_for_rope(sd[hf_name], heads)
    return out


# ---------------------------------------------------------------------------------------------------------------
# params.json <-> config


def _get(d: dict, key: str, where: str):
    if key not in d:
        raise MistralFormatError(f"{where}: missing key '{key}'")
    return d[key]


def _encoder_args(params: dict) -> dict:
    mm = _get(params, "multimodal", "params.json")
    wm = _get(mm, "whisper_model_args", "params.json multimodal")
    return _get(wm, "encoder_args", "params.json multimodal.whisper_model_args")


def config_from_params(params: dict) -> VoxtralRealtimeConfig:
    """params.json -> `VoxtralRealtimeConfig`. Refuses the variants transformers' modules cannot represent."""
    where, enc_where = "params.json", "params.json encoder_args"
    enc = _encoder_args(params)
    audio_args = _get(enc, "audio_encoding_args", enc_where)
    downsample = _get(params["multimodal"]["whisper_model_args"], "downsample_args", "params.json whisper_model_args")
    requirements = [
        (params.get("tied_embeddings"), True, "tied_embeddings"),
        (params.get("ada_rms_norm_t_cond"), True, "ada_rms_norm_t_cond"),
        (params.get("ada_rms_norm_t_cond_dim"), ADA_COND_DIM, "ada_rms_norm_t_cond_dim"),
        (params.get("use_biases"), False, "use_biases"),
        (enc.get("use_biases"), True, "encoder_args.use_biases"),
        (enc.get("causal"), True, "encoder_args.causal"),
        (enc.get("n_kv_heads"), enc.get("n_heads"), "encoder_args.n_kv_heads (must equal n_heads)"),
    ]
    for got, want, key in requirements:
        if got != want:
            raise MistralFormatError(f"{where}: {key} is {got!r}, only {want!r} is supported by this model class")
    text_config = {
        "vocab_size": _get(params, "vocab_size", where),
        "hidden_size": _get(params, "dim", where),
        "intermediate_size": _get(params, "hidden_dim", where),
        "num_hidden_layers": _get(params, "n_layers", where),
        "num_attention_heads": _get(params, "n_heads", where),
        "num_key_value_heads": _get(params, "n_kv_heads", where),
        "head_dim": _get(params, "head_dim", where),
        "rms_norm_eps": _get(params, "norm_eps", where),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(_get(params, "rope_theta", where))},
        "sliding_window": params.get("sliding_window"),
        "max_position_embeddings": _get(params, "model_max_length", where),
        "tie_word_embeddings": True,
    }
    audio_config = {
        "vocab_size": enc.get("vocab_size", params["vocab_size"]),
        "hidden_size": _get(enc, "dim", enc_where),
        "intermediate_size": _get(enc, "hidden_dim", enc_where),
        "num_hidden_layers": _get(enc, "n_layers", enc_where),
        "num_attention_heads": _get(enc, "n_heads", enc_where),
        "head_dim": _get(enc, "head_dim", enc_where),
        "rms_norm_eps": _get(enc, "norm_eps", enc_where),
        # transformers' default encoder theta is 1e4; the released model uses 1e6: always take it from params
        "rope_parameters": {"rope_type": "default", "rope_theta": float(_get(enc, "rope_theta", enc_where))},
        "sliding_window": _get(enc, "sliding_window", enc_where),
        "num_mel_bins": _get(audio_args, "num_mel_bins", f"{enc_where}.audio_encoding_args"),
    }
    return VoxtralRealtimeConfig(
        text_config=text_config,
        audio_config=audio_config,
        downsample_factor=_get(downsample, "downsample_factor", "params.json downsample_args"),
        tie_word_embeddings=True,
    )


def params_from_config(config: VoxtralRealtimeConfig) -> dict:
    """`VoxtralRealtimeConfig` -> params.json with the released model's key set and key order.

    Beyond the architecture keys, the released file also has `model_parallel`, and encoder `vocab_size`, `use_cache`,
    `max_source_positions`; vLLM's config adapter reads `encoder_args["vocab_size"]` (KeyError without it).
    """
    text, audio = config.text_config, config.audio_config
    return {
        "dim": text.hidden_size,
        "n_layers": text.num_hidden_layers,
        "head_dim": text.head_dim,
        "hidden_dim": text.intermediate_size,
        "n_heads": text.num_attention_heads,
        "n_kv_heads": text.num_key_value_heads,
        "use_biases": False,
        "causal": True,
        "rope_theta": float(text.rope_parameters["rope_theta"]),
        "norm_eps": text.rms_norm_eps,
        "vocab_size": text.vocab_size,
        "model_parallel": 1,
        "tied_embeddings": True,
        "sliding_window": text.sliding_window,
        "model_max_length": text.max_position_embeddings,
        "multimodal": {
            "whisper_model_args": {
                "encoder_args": {
                    "audio_encoding_args": {
                        "sampling_rate": protocol.SAMPLE_RATE,
                        "frame_rate": protocol.FRAME_RATE,
                        "num_mel_bins": audio.num_mel_bins,
                        "hop_length": protocol.HOP_LENGTH,
                        "window_size": protocol.WINDOW_SIZE,
                        "chunk_length_s": None,
                        "global_log_mel_max": protocol.GLOBAL_LOG_MEL_MAX,
                        "transcription_format": "streaming",
                    },
                    "dim": audio.hidden_size,
                    "n_layers": audio.num_hidden_layers,
                    "head_dim": audio.head_dim,
                    "hidden_dim": audio.intermediate_size,
                    "n_heads": audio.num_attention_heads,
                    "vocab_size": audio.vocab_size,
                    "n_kv_heads": audio.num_attention_heads,
                    "use_biases": True,
                    "use_cache": False,
                    "rope_theta": float(audio.rope_parameters["rope_theta"]),
                    "causal": True,
                    "norm_eps": audio.rms_norm_eps,
                    "pos_embed": "rope",
                    "max_source_positions": None,
                    "ffn_type": "swiglu",
                    "norm_type": "rms_norm",
                    "sliding_window": audio.sliding_window,
                },
                "downsample_args": {"downsample_factor": config.downsample_factor},
            }
        },
        "ada_rms_norm_t_cond": True,
        "ada_rms_norm_t_cond_dim": ADA_COND_DIM,
    }


# ---------------------------------------------------------------------------------------------------------------
# Folders


def weight_files(path: Path) -> list[Path]:
    """The consolidated weight file(s) of a Mistral folder, via the index when sharded."""
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not weight_map:
            raise MistralFormatError(f"{index}: no 'weight_map'")
        files = [path / f for f in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise MistralFormatError(f"{index} names {f.name}, which is missing from {path}")
        return files
    single = path / SINGLE_WEIGHTS_FILE
    if not single.is_file():
        raise MistralFormatError(f"{path}: neither {SINGLE_WEIGHTS_FILE} nor {INDEX_FILE} found")
    return [single]


def read_params(path: Path) -> dict:
    params_path = Path(path) / PARAMS_FILE
    if not params_path.is_file():
        raise MistralFormatError(f"{path}: {PARAMS_FILE} not found (not a Mistral-format folder)")
    return json.loads(params_path.read_text())


def read_mistral_folder(path: str | Path) -> tuple[VoxtralRealtimeConfig, dict[str, torch.Tensor]]:
    """Mistral folder -> (config, HF state dict in the file's dtype, `lm_head.weight` aliasing the embeddings)."""
    path = Path(path)
    params = read_params(path)
    sd: dict[str, torch.Tensor] = {}
    for f in weight_files(path):
        with safe_open(str(f), framework="pt") as handle:
            for key in handle.keys():
                if key in sd:
                    raise MistralFormatError(f"{path}: tensor {key} appears in more than one shard")
                sd[key] = handle.get_tensor(key)
    return config_from_params(params), mistral_to_hf_state_dict(sd, params)


def stale_weight_files(path: Path) -> list[Path]:
    return sorted({f for pattern in _STALE_PATTERNS for f in Path(path).glob(pattern)})


def _shards(sd: dict[str, torch.Tensor], shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Greedy split in name order; one shard when everything fits (the layout Mistral ships)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in sd.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def write_tekken(src: str | Path, dst: Path, delay_ms: int) -> None:
    """Copy tekken.json with `audio.transcription_delay_ms` set: vLLM reads the serving delay from there.
    Read and written as UTF-8 whatever the locale: the vocabulary holds every script."""
    protocol.delay_ms_to_tokens(delay_ms)  # validates: a positive multiple of 80 ms
    data = json.loads(Path(src).read_text(encoding="utf-8"))
    if not data.get("audio"):
        raise MistralFormatError(f"{src}: no 'audio' section, not the Voxtral Realtime tokenizer (use the base's)")
    data["audio"]["transcription_delay_ms"] = float(delay_ms)
    dst.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def make_world_readable(folder: Path) -> None:
    """safetensors creates its files 0600; a server running as another user could not read them. Files become
    0644 (owner writes, everyone reads), as `cp` or a download would leave them."""
    for path in folder.rglob("*"):
        if path.is_file():
            path.chmod(0o644)


def write_mistral_folder(
    path: str | Path,
    config: VoxtralRealtimeConfig,
    hf_state_dict: dict[str, torch.Tensor],
    tekken_src: str | Path,
    delay_ms: int = protocol.DEFAULT_DELAY_MS,
    dtype: torch.dtype = torch.bfloat16,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Write params.json, consolidated*.safetensors (+ index when sharded) and tekken.json into `path`."""
    path = Path(path)
    stale = stale_weight_files(path) if path.exists() else []
    if stale:
        raise MistralFormatError(
            f"{path} already holds weight files {[f.name for f in stale]}: vLLM would silently load the stale "
            "file instead of (or mixed with) the new one. Export into an empty folder."
        )
    sd = {k: v.detach().to("cpu", dtype).contiguous() for k, v in hf_to_mistral_state_dict(hf_state_dict, config).items()}
    path.mkdir(parents=True, exist_ok=True)
    (path / PARAMS_FILE).write_text(json.dumps(params_from_config(config), indent=2))
    shards = _shards(sd, shard_bytes)
    if len(shards) == 1:
        save_file(sd, str(path / SINGLE_WEIGHTS_FILE), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            fname = f"consolidated-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(path / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
        total = sum(t.numel() * t.element_size() for t in sd.values())
        (path / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    write_tekken(tekken_src, path / TEKKEN_FILE, delay_ms)
    make_world_readable(path)
    return path
