"""Audio reading: any file libsndfile can read -> float32 mono at the model's 16 kHz.

Every failure is an `AudioError` with a stable `reason` code, so data prep can write it into a reject
report and tests can assert it. Reason codes: `missing_file`, `empty_file` (0 bytes), `not_audio` (no audio
format's signature: a text or other file with an audio suffix), `unreadable_audio` (looks like audio, does not
decode), `empty_audio` (no samples), `non_finite_samples`.

What the model sees is 16-bit PCM: mistral-common (the HF processor's and vLLM's request path) writes every clip as
a PCM_16 WAV and reads it back before the log-mel, so `load_audio` does the same by default (`quantise_pcm16`).
"""

from __future__ import annotations

import io
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


# Leading bytes of the containers libsndfile reads (WAV/RF64/W64, AIFF, FLAC, Ogg, AU, CAF, SPHERE, VOC, MP3 with
# or without ID3): a file that fails to open and starts with none of them is not audio at all, not a damaged recording.
_AUDIO_SIGNATURES = (b"RIFF", b"RIFX", b"RF64", b"riff", b"FORM", b"fLaC", b"OggS", b".snd", b"caff", b"ID3", b"NIST",
                     b"Creative Voice File")


def _looks_like_audio(head: bytes) -> bool:
    mpeg_frame_sync = len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0
    return head.startswith(_AUDIO_SIGNATURES) or mpeg_frame_sync


def _open(path: str | os.PathLike) -> sf.SoundFile:
    if not Path(path).is_file():
        raise AudioError("missing_file", f"no such file: {path}")
    try:
        return sf.SoundFile(path)
    except (sf.LibsndfileError, RuntimeError, TypeError) as err:
        # libsndfile says "Format not recognised" for all of these; the user needs to know which one it is.
        with open(path, "rb") as f:
            head = f.read(32)
        if not head:
            raise AudioError("empty_file", f"{path} is empty (0 bytes)") from None
        if not _looks_like_audio(head):
            raise AudioError("not_audio", f"{path} is not an audio file (it starts with {head[:16]!r})") from None
        raise AudioError("unreadable_audio", f"{path}: {err}") from None


def audio_info(path: str | os.PathLike) -> tuple[int, int]:
    """(frames, sample rate) from the file header, without decoding: how long a file is costs milliseconds."""
    with _open(path) as f:
        return f.frames, f.samplerate


def audio_duration(path: str | os.PathLike) -> float:
    """Duration in seconds from the file header (no decoding)."""
    frames, sr = audio_info(path)
    return frames / sr


def quantise_pcm16(samples: np.ndarray) -> np.ndarray:
    """float32 mono -> the same audio after a 16-bit PCM WAV round trip, exactly as mistral-common serves it.

    Done through soundfile itself rather than numpy arithmetic: libsndfile's float -> int16 rounding is its own
    (1.2 floors x * 32768 and clips), and bit-equality with the served features needs the same call."""
    buffer = io.BytesIO()
    sf.write(buffer, samples, SAMPLE_RATE, format="WAV", subtype="PCM_16")
    buffer.seek(0)
    return sf.read(buffer, dtype="float32")[0]


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


def load_audio(
    path: str | os.PathLike, offset: float | None = None, end: float | None = None, pcm16: bool = True
) -> np.ndarray:
    """float32 mono at 16 kHz of [offset, end) seconds of `path` (the whole file by default), quantised to 16-bit PCM
    unless `pcm16` is false (what serving feeds the model, see the module doc). Channels are averaged; any sample
    rate, bit depth or float format libsndfile reads is accepted."""
    samples, sr = read_native(path, offset, end)
    samples = resample(samples, sr)
    return quantise_pcm16(samples) if pcm16 else samples
