"""Synthesise the bundled speech set with espeak-ng: short English sentences over a small fixed vocabulary,
several voices and speeds, with exact word END times from the synthesiser's own events.

    python -m data_prep.make_bundled_set        # rewrites voxtral_train/assets/speech/

Word times come from libespeak-ng's callback (not the CLI, which reports none): a WORD event marks where a
word's audio starts, a pause phoneme (`_`, `_:`) or the end of the message where speech stops. A word ends
where the next word starts or where a pause begins, whichever comes first. Deterministic: fixed seed,
fixed voice/rate cycle, no randomness in espeak-ng itself.
"""

from __future__ import annotations

import ctypes
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from voxtral_train.audio import resample
from voxtral_train.manifest import Utterance, Word, bundled_manifest_path, write_manifest
from voxtral_train.protocol import SAMPLE_RATE

SEED = 1234
N_TRAIN, N_EVAL = 56, 8
VOICES = ("en-us", "en", "en-us+f3", "en-gb-x-rp", "en+f2", "en-us+m5")  # en = British English
RATES = (135, 155, 175)  # words per minute
STORED_BITS = 14  # samples rounded to 14 bits (SNR ~86 dB, far below the log-mel floor): FLAC drops the zero bits

SUBJECTS = ("the dog", "the cat", "my friend", "the old man", "the little girl", "a small bird", "we", "they", "she", "he")
NOUNS = ("house", "tree", "car", "river", "garden", "book", "door", "window", "road", "table", "ball")
ADJECTIVES = ("big", "small", "red", "green", "old", "new")
MOVE_VERBS = ("ran", "walked", "sat", "jumped", "played", "waited")
SEE_VERBS = ("saw", "found", "opened", "painted", "liked", "wanted")
PLACES = ("to", "near", "under", "behind", "by")
TIMES = ("today", "yesterday", "at night", "in the morning")

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
    word_samples: list[tuple[int, int]]  # (start, end) sample of each word


class Espeak:
    """Synchronous libespeak-ng: text -> samples and word boundaries."""

    def __init__(self) -> None:
        self.lib = ctypes.CDLL("libespeak-ng.so.1")
        self.sr = self.lib.espeak_Initialize(_OUTPUT_SYNCHRONOUS, 0, None, _INIT_PHONEME_EVENTS)
        if self.sr <= 0:
            raise RuntimeError("espeak_Initialize failed (is espeak-ng installed?)")
        self._chunks: list[np.ndarray] = []
        self._events: list[tuple[int, int, bytes]] = []  # (type, sample, phoneme)
        self._callback = _Callback(self._collect)  # kept on self: the C side holds only a pointer
        self.lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wav, n: int, events) -> int:
        if n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).astype(np.float32) / 32768)
        i = 0
        while events[i].type != _EV_LIST_END:
            e = events[i]
            self._events.append((e.type, e.sample, e.id.string if e.type == _EV_PHONEME else b""))
            i += 1
        return 0

    def synth(self, text: str, voice: str, rate: int) -> Synthesis | None:
        """None when espeak-ng voices two words as one (it does for "in the"): no exact boundary then."""
        self._chunks, self._events = [], []
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise RuntimeError(f"espeak-ng has no voice {voice!r}")
        self.lib.espeak_SetParameter(_RATE, rate, 0)
        data = text.encode()
        self.lib.espeak_Synth(data, len(data) + 1, 0, 0, 0, _CHARS_UTF8, None, None)
        self.lib.espeak_Synchronize()
        samples = np.concatenate(self._chunks)
        bounds = word_bounds(self._events, len(samples))
        if len(bounds) != len(text.split()):
            return None
        return Synthesis(samples, self.sr, bounds)


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


def sentences(rng: random.Random) -> list[str]:
    """All sentences of a small grammar (3-8 words), shuffled by `rng`."""
    out = set()
    for s in SUBJECTS:
        for t in TIMES:
            out.add(f"{s} {rng.choice(MOVE_VERBS)} {t}")
        for n in NOUNS:
            out.add(f"{s} {rng.choice(MOVE_VERBS)} {rng.choice(PLACES)} the {n}")
            out.add(f"{s} {rng.choice(SEE_VERBS)} the {rng.choice(ADJECTIVES)} {n}")
            out.add(f"{s} {rng.choice(SEE_VERBS)} the {n} {rng.choice(TIMES)}")
    texts = sorted(t for t in out if 3 <= len(t.split()) <= 8)
    rng.shuffle(texts)
    return [t[0].upper() + t[1:] + "." for t in texts]


def build(out_dir: Path) -> None:
    rng = random.Random(SEED)
    texts = sentences(rng)
    clips = out_dir / "clips"
    clips.mkdir(parents=True, exist_ok=True)
    for old in clips.glob("*.flac"):
        old.unlink()
    espeak = Espeak()
    rows: list[Utterance] = []
    train_words: set[str] = set()
    for text in texts:
        if len(rows) == N_TRAIN + N_EVAL:
            break
        words_of = {w.strip(".").lower() for w in text.split()}
        if len(rows) >= N_TRAIN and not words_of <= train_words:
            continue  # eval sentences only recombine words the training clips contain
        i = len(rows)
        voice, rate = VOICES[i % len(VOICES)], RATES[(i // len(VOICES)) % len(RATES)]
        syn = espeak.synth(text, voice, rate)
        if syn is None:
            continue
        audio = resample(syn.samples, syn.sr)
        path = clips / f"espeak_{i:03d}.flac"
        step = 2 ** (16 - STORED_BITS)
        pcm = (np.round(np.clip(audio, -1, 1) * 32767 / step) * step).clip(-32768, 32767).astype(np.int16)
        sf.write(path, pcm, SAMPLE_RATE, subtype="PCM_16", format="FLAC")
        duration = len(audio) / SAMPLE_RATE
        words = [Word(w, min(s / syn.sr, duration), min(e / syn.sr, duration)) for w, (s, e) in zip(text.split(), syn.word_samples)]
        rows.append(Utterance(f"espeak_{i:03d}", str(path), text, duration, "en", words=words, timing_source="espeak",
                              extra={"voice": voice, "rate": rate}))
        if i < N_TRAIN:
            train_words |= words_of
    write_manifest(out_dir / bundled_manifest_path("train").name, rows[:N_TRAIN])
    write_manifest(out_dir / bundled_manifest_path("eval").name, rows[N_TRAIN:])
    total = sum(p.stat().st_size for p in clips.glob("*.flac"))
    print(f"{len(rows)} clips ({N_TRAIN} train, {N_EVAL} eval), {sum(r.duration for r in rows):.1f} s, {total / 1e6:.2f} MB -> {out_dir}")


if __name__ == "__main__":
    build(bundled_manifest_path().parent)
