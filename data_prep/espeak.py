"""libespeak-ng through ctypes: text -> samples and exact word times, and the 14-bit FLAC clips the sets store.

Word times come from libespeak-ng's callback (not the CLI, which reports none): a WORD event marks where a
spoken word's audio starts, a pause phoneme (`_`, `_:`) or the end of the message where speech stops. A spoken
word ends where the next one starts or where a pause begins, whichever comes first. One written word may be
spoken as several (`25` -> "twenty five", `$12.50`): each event carries the character offset of the text it
speaks, so events are grouped by the whitespace-separated word they fall in, and the written word spans from
its first spoken word's start to its last one's end. Deterministic: espeak-ng has no randomness.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from voxtral_train.audio import resample
from voxtral_train.manifest import Word
from voxtral_train.protocol import SAMPLE_RATE

STORED_BITS = 14  # samples rounded to 14 bits (SNR ~86 dB, far below the log-mel floor): FLAC drops the zero bits

# espeak-ng C API (speak_lib.h)
_OUTPUT_SYNCHRONOUS, _INIT_PHONEME_EVENTS, _CHARS_UTF8, _RATE = 2, 1, 1, 1
_EV_END, _EV_WORD, _EV_MSG_END, _EV_PHONEME, _EV_LIST_END = 5, 1, 6, 7, 0


class _EventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _Event(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint), ("text_position", ctypes.c_int),
                ("length", ctypes.c_int), ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
                ("user_data", ctypes.c_void_p), ("id", _EventId)]


_Callback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))


@dataclass
class Synthesis:
    samples: np.ndarray  # float32 mono at `sr`
    sr: int
    word_samples: list[tuple[int, int]]  # (start, end) sample of each whitespace-separated word of the text


class Espeak:
    """Synchronous libespeak-ng: text -> samples and word boundaries. One instance per process."""

    def __init__(self) -> None:
        self.lib = ctypes.CDLL("libespeak-ng.so.1")
        self.sr = self.lib.espeak_Initialize(_OUTPUT_SYNCHRONOUS, 0, None, _INIT_PHONEME_EVENTS)
        if self.sr <= 0:
            raise RuntimeError("espeak_Initialize failed (is espeak-ng installed?)")
        self._chunks: list[np.ndarray] = []
        self._events: list[tuple[int, int, bytes, int]] = []  # (type, sample, phoneme, 1-based text position)
        self._callback = _Callback(self._collect)  # kept on self: the C side holds only a pointer
        self.lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wav, n: int, events) -> int:
        if n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).astype(np.float32) / 32768)
        i = 0
        while events[i].type != _EV_LIST_END:
            e = events[i]
            self._events.append((e.type, e.sample, e.id.string if e.type == _EV_PHONEME else b"", e.text_position))
            i += 1
        return 0

    def synth(self, text: str, voice: str, rate: int) -> Synthesis | None:
        """None when some written word gets no WORD event of its own (espeak-ng voices "in the" as one word):
        there is no exact boundary then."""
        self._chunks, self._events = [], []
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise RuntimeError(f"espeak-ng has no voice {voice!r}")
        self.lib.espeak_SetParameter(_RATE, rate, 0)
        data = text.encode()
        self.lib.espeak_Synth(data, len(data) + 1, 0, 0, 0, _CHARS_UTF8, None, None)
        self.lib.espeak_Synchronize()
        samples = np.concatenate(self._chunks)
        spoken = word_bounds([e[:3] for e in self._events], len(samples))
        positions = [e[3] for e in self._events if e[0] == _EV_WORD]
        bounds = group_by_written_word(spoken, positions, text)
        return None if bounds is None else Synthesis(samples, self.sr, bounds)


def word_bounds(events: list[tuple[int, int, bytes]], n_samples: int) -> list[tuple[int, int]]:
    """(start, end) samples per WORD event: a word ends at the next WORD event, a pause phoneme or the end."""
    bounds: list[list[int]] = []
    open_word = False
    for kind, sample, phoneme in events:
        stops = kind == _EV_WORD or kind in (_EV_END, _EV_MSG_END) or (kind == _EV_PHONEME and phoneme.startswith(b"_"))
        if open_word and stops:
            bounds[-1][1] = sample
            open_word = False
        if kind == _EV_WORD:
            bounds.append([sample, n_samples])
            open_word = True
    return [(min(s, n_samples), min(e, n_samples)) for s, e in bounds]


def group_by_written_word(spoken: list[tuple[int, int]], positions: list[int], text: str) -> list[tuple[int, int]] | None:
    """Merge spoken-word bounds into one (start, end) per whitespace-separated word of `text`.

    `positions[i]` is the 1-based UTF-8 byte offset of the text spoken by event i (0: none). An event is given to the
    written word its offset falls in; one whose offset falls before the current word (espeak-ng reports clitics
    such as "n't" late) or outside every word stays with the current word. None when a written word gets no event."""
    data = text.encode()
    spans, start = [], None  # byte spans of the written words
    for i, byte in enumerate(data + b" "):
        if byte in b" \t\n" and start is not None:
            spans.append((start, i))
            start = None
        elif byte not in b" \t\n" and start is None:
            start = i
    merged: list[list[int]] = [[] for _ in spans]
    current = -1
    for (s, e), pos in zip(spoken, positions):
        index = next((k for k, (a, b) in enumerate(spans) if a <= pos - 1 < b), -1)
        if index > current:
            current = index
        if current >= 0:
            merged[current] += [s, e]
    if any(not m for m in merged):
        return None
    return [(m[0], m[-1]) for m in merged]


def write_clip(path: Path, samples: np.ndarray, sr: int) -> np.ndarray:
    """Resample to 16 kHz, round to STORED_BITS, write FLAC; returns the stored float32 samples."""
    audio = resample(samples, sr)
    step = 2 ** (16 - STORED_BITS)
    pcm = (np.round(np.clip(audio, -1, 1) * 32767 / step) * step).clip(-32768, 32767).astype(np.int16)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, pcm, SAMPLE_RATE, subtype="PCM_16", format="FLAC")
    return pcm.astype(np.float32) / 32768


def clip_words(text: str, syn: Synthesis, duration: float) -> list[Word]:
    """The manifest's words of a synthesised clip: seconds, clamped to the stored clip's length."""
    return [Word(w, min(s / syn.sr, duration), min(e / syn.sr, duration))
            for w, (s, e) in zip(text.split(), syn.word_samples)]
