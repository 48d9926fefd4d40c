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
the dtype and the format version: a changed base model or feature setting starts a new folder.

Storage (`EmbeddingStore`) holds millions of clips in a handful of files: each writing process appends raw tensor
bytes to its own `data-<writer>-<n>.bin` (a new one past `max_file_bytes`) and, once those bytes are flushed, one
JSON line per entry to its own `index-<writer>.jsonl` (key, file, offset, shape, dtype, CRC-32 of the bytes). Nothing
is renamed, locked or unpickled, and no two processes write one file. The indexes are read when the store opens;
a miss is computed, not looked for, and other writers' new index lines are read at most every `refresh_seconds`.
Reads go through a bounded pool of open files (`os.pread`), and every entry's length and checksum are verified when
it is read back: an entry that fails (a truncated or damaged file) is dropped and recomputed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
import uuid
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Sequence

import torch

from voxtral_train import features, protocol
from voxtral_train.features import silence_value
from voxtral_train.streaming_lm import unwrap_peft

FORMAT_VERSION = 2  # 2: append-only data files + JSONL indexes (1: one safetensors file per batch)
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
    failed_checks: int = 0  # entries whose bytes no longer matched their index line: recomputed

    @property
    def hit_rate(self) -> float:
        return self.hits / max(self.hits + self.misses, 1)


@dataclass(frozen=True)
class _Entry:
    file: str
    offset: int
    shape: tuple[int, ...]
    dtype: str
    crc32: int

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * _itemsize(self.dtype)


@functools.lru_cache(maxsize=None)
def _itemsize(dtype: str) -> int:
    return torch.empty((), dtype=getattr(torch, dtype)).element_size()


class EmbeddingStore:
    """Tensors by key in append-only files shared by any number of processes (module doc: storage).

    `get(key, min_rows)` returns the stored tensor if it has at least `min_rows` rows and its bytes verify, else
    None; `put(entries)` appends them (the longest entry per key wins). `open_files` is never above `pool_size`.
    """

    def __init__(self, folder: str | os.PathLike, max_file_bytes: int = 4 << 30, pool_size: int = 16,
                 refresh_seconds: float = 60.0, stats: CacheStats | None = None) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_file_bytes, self.pool_size, self.refresh_seconds = max_file_bytes, pool_size, refresh_seconds
        self.stats = stats if stats is not None else CacheStats()
        self.writer = uuid.uuid4().hex[:16]
        self._index: dict[str, _Entry] = {}
        self._read_upto: dict[str, int] = {}  # index file -> bytes of it already read
        self._pool: OrderedDict[str, int] = OrderedDict()  # data file -> open descriptor, least recent first
        self._data: IO[bytes] | None = None  # this writer's current data file
        self._data_number = 0
        self._index_file: IO[bytes] | None = None
        self._refreshed = 0.0
        self.refresh()

    # -- reading ------------------------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Read the index lines written since the last refresh, by every writer (one listing of index files)."""
        self._refreshed = time.monotonic()
        for path in sorted(self.folder.glob("index-*.jsonl")):
            with path.open("rb") as f:
                f.seek(self._read_upto.get(path.name, 0))
                chunk = f.read()
            complete = chunk[: chunk.rfind(b"\n") + 1]  # a line being written is read next time
            self._read_upto[path.name] = self._read_upto.get(path.name, 0) + len(complete)
            for line in complete.splitlines():
                self._add(line)

    def _add(self, line: bytes) -> None:
        try:
            row = json.loads(line)
            key, entry = row["key"], _Entry(row["file"], int(row["offset"]), tuple(int(n) for n in row["shape"]),
                                            str(row["dtype"]), int(row["crc32"]))
            getattr(torch, entry.dtype)
        except (ValueError, KeyError, TypeError, AttributeError):
            return  # a damaged index line: its entry is simply not there (recomputed when needed)
        known = self._index.get(key)
        if known is None or known.shape[0] < entry.shape[0]:
            self._index[key] = entry

    def _descriptor(self, name: str) -> int:
        if name in self._pool:
            self._pool.move_to_end(name)
            return self._pool[name]
        descriptor = os.open(self.folder / name, os.O_RDONLY)
        self._pool[name] = descriptor
        if len(self._pool) > self.pool_size:
            os.close(self._pool.popitem(last=False)[1])
        return descriptor

    @property
    def open_files(self) -> int:
        return len(self._pool) + (self._data is not None) + (self._index_file is not None)

    def get(self, key: str, min_rows: int) -> torch.Tensor | None:
        entry = self._index.get(key)
        if (entry is None or entry.shape[0] < min_rows) and time.monotonic() - self._refreshed > self.refresh_seconds:
            self.refresh()
            entry = self._index.get(key)
        if entry is None or entry.shape[0] < min_rows:
            return None
        try:
            data = os.pread(self._descriptor(entry.file), entry.nbytes, entry.offset)
        except OSError:  # the data file is gone
            data = b""
        if len(data) != entry.nbytes or zlib.crc32(data) != entry.crc32:
            self.stats.failed_checks += 1
            del self._index[key]
            return None
        return torch.frombuffer(bytearray(data), dtype=getattr(torch, entry.dtype)).reshape(entry.shape)

    # -- writing ------------------------------------------------------------------------------------------------
    def _data_file(self, nbytes: int) -> IO[bytes]:
        """This writer's data file with room for `nbytes` more (a new file past max_file_bytes)."""
        if self._data is not None and self._data.tell() and self._data.tell() + nbytes > self.max_file_bytes:
            self._data.close()
            self._data, self._data_number = None, self._data_number + 1
        if self._data is None:
            self._data = (self.folder / f"data-{self.writer}-{self._data_number:04d}.bin").open("ab")
        return self._data

    def put(self, entries: dict[str, torch.Tensor]) -> None:
        """Append the tensors, flush them, then append their index lines."""
        lines = []
        for key, tensor in entries.items():
            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            f = self._data_file(len(data))
            offset = f.tell()
            f.write(data)
            line = {"key": key, "file": Path(f.name).name, "offset": offset, "shape": list(tensor.shape),
                    "dtype": str(tensor.dtype).removeprefix("torch."), "crc32": zlib.crc32(data)}
            lines.append(json.dumps(line).encode() + b"\n")
        if self._data is not None:
            self._data.flush()
        if self._index_file is None:
            self._index_file = (self.folder / f"index-{self.writer}.jsonl").open("ab")
        self._index_file.write(b"".join(lines))
        self._index_file.flush()
        for line in lines:
            self._add(line)
        self._read_upto[Path(self._index_file.name).name] = self._index_file.tell()

    def close(self) -> None:
        """Close every file (the store opens them again when used)."""
        for descriptor in self._pool.values():
            os.close(descriptor)
        self._pool.clear()
        for f in (self._data, self._index_file):
            if f is not None:
                f.close()
        self._data = self._index_file = None

    def __del__(self) -> None:
        if hasattr(self, "_index_file"):  # not if __init__ failed
            self.close()


class AudioEmbeddingCache:
    """Audio embeddings of a frozen encoder, stored under `root/<fingerprint>/` (`EmbeddingStore`).

    `max_delay_tokens`: the largest delay the run trains with (`DelaySampler.max_tokens`); entries are stored long
    enough for it. An entry stored shorter than a later request (a larger delay) is recomputed.
    """

    def __init__(self, root: str | os.PathLike, model: torch.nn.Module, max_delay_tokens: int,
                 **store_options: Any) -> None:
        check_frozen(model)
        self.model = model
        self.max_delay_tokens = max_delay_tokens
        self.folder = Path(root) / model_fingerprint(model)
        self.stats = CacheStats()
        self.store = EmbeddingStore(self.folder, stats=self.stats, **store_options)

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
        stored = [self.store.get(key, need) for key, need in zip(keys, needed)]
        missing = [row for row, tensor in enumerate(stored) if tensor is None]
        self.stats.hits += len(keys) - len(missing)
        self.stats.misses += len(missing)
        if missing:
            rows = self._compute(input_features[missing], [needed[row] for row in missing])
            for row, embeds in zip(missing, rows):
                stored[row] = embeds
            self.store.put({keys[row]: embeds for row, embeds in zip(missing, rows)})
        out = torch.zeros(len(keys), width, weight.shape[1], dtype=weight.dtype)
        for row, tensor in enumerate(stored):
            n = min(n_list[row], width)
            out[row, :n] = tensor[:n]
        return out.to(weight.device)
