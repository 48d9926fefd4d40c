"""Audio reading: any file libsndfile can read -> float32 mono at the model's 16 kHz.

Every failure is an `AudioError` with a stable `reason` code, so data prep can write it into a reject
report and tests can assert it. Reason codes: `missing_file`, `unreadable_audio`, `empty_audio`,
`non_finite_samples`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from voxtral_train.protocol import SAMPLE_RATE


class AudioError(Exception):
    """A file that cannot become training audio; `reason` is a stable code, the message names the file."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


def _open(path: str | os.PathLike) -> sf.SoundFile:
    if not Path(path).is_file():
        raise AudioError("missing_file", f"no such file: {path}")
    try:
        return sf.SoundFile(path)
    except (sf.LibsndfileError, RuntimeError, TypeError) as err:
        raise AudioError("unreadable_audio", f"{path}: {err}") from None


def audio_duration(path: str | os.PathLike) -> float:
    """Duration in seconds from the file header (no decoding)."""
    with _open(path) as f:
        return f.frames / f.samplerate


def read_native(
    path: str | os.PathLike, offset: float | None = None, end: float | None = None
) -> tuple[np.ndarray, int]:
    """Decode [offset, end) seconds of `path` as float32 mono at the file's own rate, checked for
    emptiness and NaN/inf. Only the requested segment is read (a seek, not a full decode)."""
    with _open(path) as f:
        sr = f.samplerate
        start = 0 if offset is None else int(round(offset * sr))
        stop = f.frames if end is None else min(int(round(end * sr)), f.frames)
        try:
            if start:
                f.seek(start)
            data = f.read(max(stop - start, 0), dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError) as err:
            raise AudioError("unreadable_audio", f"{path}: {err}") from None
    if data.shape[0] == 0:
        raise AudioError("empty_audio", f"{path}: no samples in [{offset}, {end})")
    mono = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    if not np.isfinite(mono).all():
        raise AudioError("non_finite_samples", f"{path}: NaN or infinite samples")
    return mono, sr


def resample(samples: np.ndarray, sr: int) -> np.ndarray:
    """float32 mono at `sr` -> float32 mono at SAMPLE_RATE (soxr, high quality)."""
    if sr == SAMPLE_RATE:
        return samples
    return soxr.resample(samples, sr, SAMPLE_RATE, quality="HQ").astype(np.float32, copy=False)


def load_audio(path: str | os.PathLike, offset: float | None = None, end: float | None = None) -> np.ndarray:
    """float32 mono at 16 kHz of [offset, end) seconds of `path` (the whole file by default).
    Channels are averaged; any sample rate, bit depth or float format libsndfile reads is accepted."""
    samples, sr = read_native(path, offset, end)
    return resample(samples, sr)
