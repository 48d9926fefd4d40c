"""Synthesise the two bundled speech sets with espeak-ng, with exact word END times from the synthesiser's own events.

    python -m data_prep.make_bundled_set        # rewrites voxtral_train/assets/speech/ and assets/medical/

- `speech/` (`bundled:train`, `bundled:eval`): short English sentences over a small fixed vocabulary, several voices
  and speeds; what the tiny from-scratch demo memorises (`+experiment=tiny_demo`).
- `medical/` (`bundled:medical_train`, `bundled:medical_eval`): a small set of the `medical` domain of
  `voxtral-prep synth` (held-out accents and voices, fast noisy speech, drug names the mini base never heard);
  what plain `voxtral-train` adapts the mini base to. Its seed differs from the adaptation benchmark's, so the
  bundled sentences are not that benchmark's.

Word times: data_prep.espeak (libespeak-ng's own word events). Deterministic: fixed seed, fixed voice/rate cycle,
no randomness in espeak-ng itself.
"""

from __future__ import annotations

import random
from pathlib import Path

from data_prep.espeak import Espeak, clip_words, write_clip
from data_prep.synth_corpus import build_corpus
from voxtral_train.manifest import Utterance, bundled_manifest_path, write_manifest
from voxtral_train.protocol import SAMPLE_RATE

SEED = 1234
N_TRAIN, N_EVAL = 56, 8
# The medical set: small enough to ship (8.5 MB of FLAC: the 20 dB noise does not compress), large enough that LoRA
# learns the domain terms rather than the sentences; a few sentences are lost to espeak-ng's rejects.
MEDICAL_SEED, MEDICAL_TRAIN, MEDICAL_EVAL = 1, 128, 48
VOICES = ("en-us", "en", "en-us+f3", "en-gb-x-rp", "en+f2", "en-us+m5")  # en = British English
RATES = (135, 155, 175)  # words per minute

SUBJECTS = ("the dog", "the cat", "my friend", "the old man", "the little girl", "a small bird", "we", "they", "she", "he")
NOUNS = ("house", "tree", "car", "river", "garden", "book", "door", "window", "road", "table", "ball")
ADJECTIVES = ("big", "small", "red", "green", "old", "new")
MOVE_VERBS = ("ran", "walked", "sat", "jumped", "played", "waited")
SEE_VERBS = ("saw", "found", "opened", "painted", "liked", "wanted")
PLACES = ("to", "near", "under", "behind", "by")
TIMES = ("today", "yesterday", "at night", "in the morning")


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
        path = clips / f"espeak_{i:03d}.flac"
        duration = len(write_clip(path, syn.samples, syn.sr)) / SAMPLE_RATE
        words = clip_words(text, syn, duration)
        rows.append(Utterance(f"espeak_{i:03d}", str(path), text, duration, "en", words=words, timing_source="espeak",
                              extra={"voice": voice, "rate": rate}))
        if i < N_TRAIN:
            train_words |= words_of
    write_manifest(out_dir / bundled_manifest_path("train").name, rows[:N_TRAIN])
    write_manifest(out_dir / bundled_manifest_path("eval").name, rows[N_TRAIN:])
    total = sum(p.stat().st_size for p in clips.glob("*.flac"))
    print(f"{len(rows)} clips ({N_TRAIN} train, {N_EVAL} eval), {sum(r.duration for r in rows):.1f} s, {total / 1e6:.2f} MB -> {out_dir}")


def build_medical(out_dir: Path) -> None:
    for old in (out_dir / "clips").glob("*.flac"):
        old.unlink()
    result = build_corpus(out_dir, "medical", MEDICAL_TRAIN, MEDICAL_EVAL, MEDICAL_SEED, workers=1)
    print(f"{result.summary()} -> {out_dir}")


if __name__ == "__main__":
    build(bundled_manifest_path("train").parent)
    build_medical(bundled_manifest_path("medical_train").parent)
