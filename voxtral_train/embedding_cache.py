"""Frozen-encoder audio-embedding cache: run the audio encoder + adapter once per clip, reuse the output every epoch.

With plain LoRA (encoder and adapter frozen) a clip's audio embeddings `[P, D]` never change, so a LoRA step needs
only the decoder (docs/PERFORMANCE.md: ≈ 1.6x fewer FLOPs on the real model).

Why one stored tensor serves every delay: the conv stem and the encoder are causal and the right pad is zeros, so
the embeddings of a longer-padded stream hold, as a prefix, the embeddings of any shorter padding of the same clip.
The log-mel agrees too: the right pad is >= 11 positions of zeros, so the centred STFT's reflection at the end reads
zeros, and every extra frame is the log-mel of silence (what `collate` pads with). A clip with delay d and P
positions has P - d positions that do not depend on d (targets shift with the delay, so `extra_right_pad` does not);
we store `P - d + max_delay_tokens` positions, enough for any delay of the run.

Keys are content hashes of that delay-independent feature prefix, so a changed audio file is a miss, never a stale
hit. The folder is keyed by a fingerprint of the encoder + adapter weights, the audio config, the feature settings,
the dtype and the format version: a changed base model or feature setting starts a new folder. Entries live in
safetensors shards written atomically (temporary name + rename) with unique names, so processes sharing a folder
never write the same file; each shard's header is its own index (read on open and rescanned before computing).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from voxtral_train import features, protocol
from voxtral_train.features import silence_value
from voxtral_train.streaming_lm import unwrap_peft

FORMAT_VERSION = 1
_FRAMES = protocol.MEL_FRAMES_PER_POSITION


class EmbeddingCacheError(RuntimeError):
    pass


def inner_model(model: torch.nn.Module) -> torch.nn.Module:
    """The `VoxtralRealtimeModel` (audio tower, projector, decoder) inside a plain or PEFT-wrapped model."""
    return unwrap_peft(model).model


def _audio_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    inner = inner_model(model)
    return {"audio_tower": inner.audio_tower, "multi_modal_projector": inner.multi_modal_projector}


def check_frozen(model: torch.nn.Module) -> None:
    """Refuse a model whose encoder or adapter trains (its embeddings would change every step) or is sharded."""
    for prefix, module in _audio_modules(model).items():
        for name, param in module.named_parameters():
            if param.requires_grad:
                raise EmbeddingCacheError(
                    f"data.audio_embedding_cache needs a frozen encoder and adapter, but {prefix}.{name} requires "
                    f"grad (peft.unfreeze_encoder / unfreeze_adapter / encoder_lora / full): turn the cache off")
            if hasattr(param, "ds_id"):
                raise EmbeddingCacheError(
                    f"{prefix}.{name} is partitioned by DeepSpeed ZeRO-3; the cache runs the encoder outside the "
                    "engine's forward: use DDP or ZeRO-2 with data.audio_embedding_cache")
    dropout = inner_model(model).config.audio_config.attention_dropout
    if dropout:
        raise EmbeddingCacheError(f"audio_config.attention_dropout={dropout}: cached embeddings would drop nothing")


def feature_settings() -> dict[str, Any]:
    """Everything that shapes the log-mel the encoder sees."""
    return {
        "sample_rate": protocol.SAMPLE_RATE, "hop_length": protocol.HOP_LENGTH, "window_size": protocol.WINDOW_SIZE,
        "num_mel_bins": protocol.NUM_MEL_BINS, "global_log_mel_max": protocol.GLOBAL_LOG_MEL_MAX,
        "mel_frames_per_position": _FRAMES, "n_left_pad_tokens": protocol.N_LEFT_PAD_TOKENS,
        "n_fft": features.N_FFT, "mel_floor": features.MEL_FLOOR, "log_mel_range": features.LOG_MEL_RANGE,
    }


def model_fingerprint(model: torch.nn.Module) -> str:
    """Hash of the encoder + adapter weights (names, shapes, dtypes, bytes), the audio config, the feature
    settings and the cache format: equal fingerprints give bit-equal embeddings on the same software."""
    inner = inner_model(model)
    digest = hashlib.sha256()
    settings = {"format": FORMAT_VERSION, "features": feature_settings(),
                "audio_config": inner.config.audio_config.to_dict(),
                "downsample_factor": inner.config.downsample_factor}
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for prefix, module in _audio_modules(model).items():
        for name, tensor in sorted(module.state_dict().items()):
            tensor = tensor.detach().to("cpu").contiguous()
            digest.update(f"{prefix}.{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:20]


def stored_positions(n_positions: int, delay_tokens: int, max_delay_tokens: int) -> int:
    """Positions to store for a clip so that every delay up to `max_delay_tokens` is a prefix of it."""
    return n_positions - delay_tokens + max_delay_tokens


def content_key(features_row: torch.Tensor, n_positions: int, delay_tokens: int) -> str:
    """Hash of a clip's delay-independent log-mel prefix ([128, 8 (P - d)], the same for every delay)."""
    prefix = features_row[:, : _FRAMES * (n_positions - delay_tokens)].detach().to("cpu", torch.float32).contiguous()
    digest = hashlib.sha256(f"{tuple(prefix.shape)};".encode())
    digest.update(prefix.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / max(self.hits + self.misses, 1)


class AudioEmbeddingCache:
    """On-disk store of audio embeddings under `root/<fingerprint>/shard-*.safetensors`.

    `max_delay_tokens`: the largest delay the run trains with (`DelaySampler.max_tokens`); entries are stored long
    enough for it. An entry stored shorter than a later request (a larger delay) is recomputed.
    """

    def __init__(self, root: str | os.PathLike, model: torch.nn.Module, max_delay_tokens: int) -> None:
        check_frozen(model)
        self.model = model
        self.max_delay_tokens = max_delay_tokens
        self.folder = Path(root) / model_fingerprint(model)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.stats = CacheStats()
        self._index: dict[str, tuple[str, int]] = {}  # key -> (shard file name, stored positions)
        self._scanned: set[str] = set()
        self._handles: dict[str, Any] = {}
        self._scan()

    def _scan(self) -> None:
        """Add shards written since the last scan (by this or another process); the longest entry per key wins."""
        for path in sorted(self.folder.glob("shard-*.safetensors")):
            if path.name in self._scanned:
                continue
            self._scanned.add(path.name)
            with safe_open(path, framework="pt") as shard:
                for key in shard.keys():
                    length = shard.get_slice(key).get_shape()[0]
                    if key not in self._index or self._index[key][1] < length:
                        self._index[key] = (path.name, length)

    def _load(self, key: str) -> torch.Tensor:
        name, _ = self._index[key]
        if name not in self._handles:
            self._handles[name] = safe_open(self.folder / name, framework="pt")
        return self._handles[name].get_tensor(key)

    def _lookup(self, key: str, needed: int) -> bool:
        entry = self._index.get(key)
        return entry is not None and entry[1] >= needed

    @torch.no_grad()
    def _compute(self, features_batch: torch.Tensor, lengths: Sequence[int]) -> list[torch.Tensor]:
        """Embeddings [length_i, D] of each row, extended with silence to its length: one encoder batch."""
        inner = inner_model(self.model)
        device, dtype = inner.get_input_embeddings().weight.device, inner.get_input_embeddings().weight.dtype
        width = max(lengths)
        padded = torch.full((len(lengths), protocol.NUM_MEL_BINS, _FRAMES * width), silence_value())
        have = min(features_batch.shape[-1], _FRAMES * width)
        # Past its own stream a collated row is silence already; silence beyond that too is exactly the features
        # of the same clip padded further to the right (module doc).
        padded[:, :, :have] = features_batch[:, :, :have].to("cpu", torch.float32)
        embeds = inner.get_audio_features(input_features=padded.to(device, dtype)).pooler_output  # [M, width, D]
        return [embeds[row, :length].to("cpu").contiguous() for row, length in enumerate(lengths)]

    def _store(self, entries: dict[str, torch.Tensor]) -> None:
        name = f"shard-{uuid.uuid4().hex}.safetensors"
        tmp = self.folder / f".{name}.tmp"
        save_file(entries, tmp, metadata={"format": str(FORMAT_VERSION)})
        tmp.replace(self.folder / name)
        self._scanned.add(name)
        for key, tensor in entries.items():
            self._index[key] = (name, tensor.shape[0])

    def embeddings_for(self, input_features: torch.Tensor, n_positions: torch.Tensor,
                       num_delay_tokens: torch.Tensor) -> torch.Tensor:
        """Audio embeddings [B, P_batch, D] for a collated batch, on the model's device, computing misses together.

        Positions past an item's own `n_positions` are zeros: they are padding, which no scored position sees
        (decoder and encoder are causal, their labels are -100).
        """
        inner = inner_model(self.model)
        weight = inner.get_input_embeddings().weight
        width = input_features.shape[-1] // _FRAMES
        n_list, d_list = [int(n) for n in n_positions], [int(d) for d in num_delay_tokens]
        if max(d_list) > self.max_delay_tokens:
            raise EmbeddingCacheError(f"batch delay {max(d_list)} tokens > the cache's max_delay_tokens="
                                      f"{self.max_delay_tokens}: build the cache with the run's largest delay")
        keys = [content_key(input_features[row], n, d) for row, (n, d) in enumerate(zip(n_list, d_list))]
        needed = [stored_positions(n, d, self.max_delay_tokens) for n, d in zip(n_list, d_list)]
        missing = [row for row in range(len(keys)) if not self._lookup(keys[row], needed[row])]
        if missing:
            self._scan()  # another process may have computed them meanwhile
            missing = [row for row in missing if not self._lookup(keys[row], needed[row])]
        self.stats.hits += len(keys) - len(missing)
        self.stats.misses += len(missing)
        computed: dict[str, torch.Tensor] = {}
        if missing:
            rows = self._compute(input_features[missing], [needed[row] for row in missing])
            computed = {keys[row]: embeds for row, embeds in zip(missing, rows)}
            self._store(computed)
        out = torch.zeros(len(keys), width, weight.shape[1], dtype=weight.dtype)
        for row, key in enumerate(keys):
            stored = computed[key] if key in computed else self._load(key)
            n = min(n_list[row], width)
            out[row, :n] = stored[:n]
        return out.to(weight.device)
