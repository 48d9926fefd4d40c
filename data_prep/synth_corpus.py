"""`voxtral-prep synth`: a synthetic English speech corpus with exact word times, from espeak-ng.

    voxtral-prep synth --out data/synth/general --sentences 25000 --eval-sentences 300
    voxtral-prep synth --out data/synth/medical --domain medical --sentences 300 --eval-sentences 100

Sentences come from templates over the word lists of data_prep.synth_lexicon (names, places, numbers, dates, prices
and times in written form, sentence case and punctuation as a transcript writes them); each one is spoken by a
voice and at a rate drawn per clip, with the word END times of libespeak-ng's own events (data_prep.espeak).

Two domains:
- `general` (default): the pretraining corpus of the mini base, 6 accents x 20 voice variants, 120-200 words per
  minute, 0-0.3 s of leading silence.
- `medical`: an adaptation target the base never heard: two held-out accents with held-out voice variants, faster
  speech (215-235 wpm), white noise at 20 dB SNR, and drug names, conditions and procedures absent from the
  general text.

Writes OUT/manifest.jsonl (training sentences), OUT/manifest_eval.jsonl (held-out sentences: no text of it occurs
in the training manifest), OUT/rejects.jsonl (sentences espeak-ng cannot time word by word, e.g. when it merges two
written words into one spoken word), OUT/clips/*.flac (16 kHz, 14 bits). Deterministic by --seed: the same seed
gives the same manifests and byte-identical audio, with any number of worker processes.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from data_prep import synth_lexicon as lex
from data_prep.espeak import Espeak, clip_words, write_clip
from data_prep.validate import Reject
from voxtral_train.manifest import Utterance, write_manifest
from voxtral_train.protocol import SAMPLE_RATE


@dataclass(frozen=True)
class Style:
    """How a domain sounds: the voices and rates clips draw from, and the noise added."""

    voices: tuple[str, ...]
    rates: tuple[int, ...]  # words per minute
    snr_db: float | None  # white noise at this signal-to-noise ratio; None = clean
    max_lead_s: float  # leading silence drawn from [0, max_lead_s]


_ACCENTS = ("en-us", "en", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-us-nyc")
_VARIANTS = ("", "m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "adam", "david", "linda",
             "paul", "robert", "steph", "john", "max")
STYLES = {
    "general": Style(tuple(a + (f"+{v}" if v else "") for a in _ACCENTS for v in _VARIANTS),
                     tuple(range(120, 201, 10)), None, 0.3),
    # Accents and variants no general voice uses, faster and noisy.
    "medical": Style(tuple(f"{a}+{v}" for a in ("en-gb-scotland", "en-029") for v in ("f5", "m8", "belinda", "grandpa")),
                     (215, 225, 235), 20.0, 0.3),
}


# ---------------------------------------------------------------------------------------------------------------
# Sentences
# ---------------------------------------------------------------------------------------------------------------
def _plural(noun: str) -> str:
    if noun.endswith(("s", "x", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


class Words:
    """Random picks of the lexicon's parts of speech and written-form numbers, dates, prices and times."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def pick(self, options: list[str] | tuple[str, ...]) -> str:
        return self.rng.choice(options)

    def name(self) -> str:
        r = self.rng.random()
        if r < 0.55:
            return self.pick(lex.FIRST_NAMES)
        if r < 0.85:
            return f"{self.pick(lex.FIRST_NAMES)} {self.pick(lex.SURNAMES)}"
        return f"{self.pick(('Mr.', 'Mrs.', 'Ms.'))} {self.pick(lex.SURNAMES)}"

    def number(self) -> str:
        r = self.rng.random()
        if r < 0.6:
            return str(self.rng.randint(2, 20))
        if r < 0.9:
            return str(self.rng.randint(21, 99))
        return f"{self.rng.randint(100, 9999):,}"

    def year(self) -> str:
        return str(self.rng.randint(1950, 2029))

    def date(self) -> str:
        day = self.rng.randint(1, 28)
        r = self.rng.random()
        if r < 0.5:
            return f"{self.pick(lex.MONTHS)} {day}"
        if r < 0.75:
            return f"{self.pick(lex.MONTHS)} {day}, {self.year()}"
        return f"the {_ordinal(day)} of {self.pick(lex.MONTHS)}"

    def clock(self) -> str:
        hour = self.rng.randint(1, 12)
        r = self.rng.random()
        if r < 0.4:
            return f"{hour} o'clock"
        return f"{hour}:{self.pick(('15', '30', '45', '05', '20', '10', '50'))}"

    def price(self) -> str:
        r = self.rng.random()
        if r < 0.5:
            return f"${self.rng.randint(2, 99)}"
        if r < 0.8:
            return f"${self.rng.randint(1, 49)}.{self.pick(('50', '25', '99', '75', '10'))}"
        return f"{self.rng.randint(2, 500)} dollars"

    def when(self) -> str:
        r = self.rng.random()
        if r < 0.6:
            return self.pick(lex.TIME_PHRASES)
        if r < 0.8:
            return f"on {self.pick(lex.WEEKDAYS)}"
        return f"in {self.pick(lex.MONTHS)}"

    def noun(self) -> str:
        return self.pick(lex.NOUNS)

    def adj(self) -> str:
        return self.pick(lex.ADJECTIVES)

    def verb(self) -> tuple[str, str]:
        return self.rng.choice(lex.VERBS)


Template = Callable[[Words], str]

GENERAL_TEMPLATES: list[Template] = [
    lambda w: f"{w.name()} {w.verb()[0]} the {w.adj()} {w.noun()} {w.when()}.",
    lambda w: f"{w.name()} and {w.name()} {w.pick(lex.MOVES)} {w.pick(lex.PREPOSITIONS)} the {w.noun()}.",
    lambda w: f"Did {w.name()} {w.verb()[1]} the {w.noun()} {w.when()}?",
    lambda w: f"On {w.pick(lex.WEEKDAYS)}, {w.name()} drove from {w.pick(lex.CITIES)} to {w.pick(lex.CITIES)}.",
    lambda w: f"{w.name()} was born in {w.pick(lex.CITIES)} on {w.date()}.",
    lambda w: f"The {w.noun()} costs {w.price()} at the {w.pick(lex.PLACES)}.",
    lambda w: f"We bought {w.number()} {_plural(w.noun())} and {w.number()} {_plural(w.noun())} for {w.price()}.",
    lambda w: f"The {w.pick(lex.ROLES)} {w.pick(lex.ADVERBS)} {w.verb()[0]} the {w.noun()} {w.pick(lex.PREPOSITIONS)} the {w.noun()}.",
    lambda w: f"Please {w.verb()[1]} the {w.adj()} {w.noun()} before {w.clock()}.",
    lambda w: f"My {w.pick(lex.ROLES)} {w.name()} lives in {w.pick(lex.CITIES)}, {w.pick(lex.COUNTRIES)}.",
    lambda w: f"It was {w.pick(lex.WEATHER)} in {w.pick(lex.CITIES)} on {w.pick(lex.WEEKDAYS)}, {w.date()}.",
    lambda w: f"Where did the {w.pick(lex.ROLES)} put the {w.adj()} {w.noun()}?",
    lambda w: f"There are {w.number()} {_plural(w.noun())} in the {w.pick(lex.PLACES)}, said {w.name()}.",
    lambda w: f"{w.name()} called at {w.clock()} and asked for {_a(w.adj())} {w.noun()}.",
    lambda w: f"The {w.adj()} {w.noun()} is {w.pick(lex.PREPOSITIONS)} the {w.noun()}, not {w.pick(lex.PREPOSITIONS)} the {w.noun()}.",
    lambda w: f"Why is the {w.noun()} so {w.adj()} {w.when()}?",
    lambda w: f"In {w.year()}, the {w.pick(lex.ROLES)} moved from {w.pick(lex.COUNTRIES)} to {w.pick(lex.CITIES)}.",
    lambda w: f"{w.name()} ordered {w.pick(lex.FOODS)} and {w.pick(lex.FOODS)} at the {w.pick(lex.PLACES)}.",
    lambda w: f"The train to {w.pick(lex.CITIES)} leaves at {w.clock()} on {w.date()}.",
    lambda w: f"I think the {w.noun()} was {w.adj()}, but {w.name()} {w.verb()[0]} it anyway.",
    lambda w: f"{w.name()} has {w.number()} {_plural(w.noun())}, {w.number()} {_plural(w.noun())} and {_a(w.adj())} {w.noun()}.",
    lambda w: f"Meet me at the {w.pick(lex.PLACES)} {w.when()}, {w.name()}.",
    lambda w: f"The {w.adj()} {w.pick(lex.ROLES)} {w.pick(lex.MOVES)} {w.pick(lex.ADVERBS)} {w.when()}.",
    lambda w: f"How many {_plural(w.noun())} did {w.name()} {w.verb()[1]} {w.when()}?",
    lambda w: f"Room {w.number()} is on the {_ordinal(w.rng.randint(1, 12))} floor of the {w.pick(lex.PLACES)}.",
    lambda w: f"{w.name()} {w.pick(lex.ADVERBS)} {w.verb()[0]} {_a(w.adj())} {w.noun()} for {w.name()}.",
    lambda w: f"Can you {w.verb()[1]} {w.number()} {_plural(w.noun())} by {w.pick(lex.WEEKDAYS)}?",
]

MEDICAL_TEMPLATES: list[Template] = [
    lambda w: f"The patient was given {w.number()} {w.pick(lex.UNITS)} of {w.pick(lex.DRUGS)} {w.pick(lex.ROUTES)}.",
    lambda w: f"Dr. {w.pick(lex.SURNAMES)} prescribed {w.pick(lex.DRUGS)} for {w.pick(lex.CONDITIONS)}.",
    lambda w: f"{w.name()} was diagnosed with {w.pick(lex.CONDITIONS)} on {w.pick(lex.WEEKDAYS)}.",
    lambda w: f"Schedule {_a(w.pick(lex.PROCEDURES))} in {w.pick(lex.WARDS)} for {w.date()}.",
    lambda w: f"The patient reported {w.pick(lex.FINDINGS)} and {w.pick(lex.FINDINGS)} after the {w.pick(lex.DRUGS)}.",
    lambda w: f"Give {w.number()} {w.pick(lex.UNITS)} of {w.pick(lex.DRUGS)} every {w.rng.randint(2, 12)} hours.",
    lambda w: f"{w.name()} needs {_a(w.pick(lex.PROCEDURES))} {w.when()}.",
    lambda w: f"Is the patient allergic to {w.pick(lex.DRUGS)}?",
    lambda w: f"Stop the {w.pick(lex.DRUGS)} if the {w.pick(lex.FINDINGS)} gets worse.",
    lambda w: f"The {w.pick(lex.WARDS)} team suspects {w.pick(lex.CONDITIONS)}, not {w.pick(lex.CONDITIONS)}.",
    lambda w: f"The dose of {w.pick(lex.DRUGS)} went from {w.number()} to {w.number()} {w.pick(lex.UNITS)}.",
    lambda w: f"After the {w.pick(lex.PROCEDURES)}, the patient had {w.pick(lex.FINDINGS)} {w.when()}.",
    lambda w: f"{w.name()} was prescribed {w.pick(lex.DRUGS)} and {w.pick(lex.DRUGS)} for {w.pick(lex.CONDITIONS)}.",
]

TEMPLATES = {"general": GENERAL_TEMPLATES, "medical": MEDICAL_TEMPLATES}


def _capitalise(text: str) -> str:
    return text[0].upper() + text[1:]


def sentences(domain: str, n: int, seed: int) -> list[str]:
    """`n` distinct sentences of `domain`, in a fixed order for `seed`."""
    rng = random.Random(seed)
    words, templates = Words(rng), TEMPLATES[domain]
    out: dict[str, None] = {}  # insertion-ordered set
    for _ in range(200 * n):  # far more draws than needed; the grammar has millions of sentences
        if len(out) == n:
            break
        out.setdefault(_capitalise(rng.choice(templates)(words)))
    if len(out) < n:
        raise ValueError(f"the {domain} grammar gave only {len(out)} distinct sentences, {n} requested")
    return list(out)


# ---------------------------------------------------------------------------------------------------------------
# Synthesis (a process pool; each worker holds one libespeak-ng)
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    id: str
    text: str
    voice: str
    rate: int
    snr_db: float | None
    lead_s: float
    noise_seed: int


GROUP_SIZE = 16  # clips per fresh synthesis process (see `synthesise`)
_ESPEAK: Espeak | None = None  # this process's libespeak-ng, started by its first job


def _synthesise(job: Job, clips: Path) -> Utterance | Reject:
    global _ESPEAK
    if _ESPEAK is None:
        _ESPEAK = Espeak()
    source = {"text": job.text, "voice": job.voice, "rate": job.rate}
    syn = _ESPEAK.synth(job.text, job.voice, job.rate)
    if syn is None:
        return Reject("word_events", "espeak-ng gave some written word no word event of its own (merged words)",
                      source, job.id)
    lead = int(round(job.lead_s * syn.sr))
    samples = np.concatenate([np.zeros(lead, np.float32), syn.samples])
    syn.word_samples = [(s + lead, e + lead) for s, e in syn.word_samples]
    if job.snr_db is not None:
        # Noise power relative to the speech's (silence excluded, so the lead does not lower it).
        power = float(np.mean(syn.samples.astype(np.float64) ** 2))
        noise = np.random.default_rng(job.noise_seed).standard_normal(len(samples)).astype(np.float32)
        samples = samples + noise * np.float32(np.sqrt(power / 10 ** (job.snr_db / 10)))
    path = clips / f"{job.id}.flac"
    duration = len(write_clip(path, samples, syn.sr)) / SAMPLE_RATE
    return Utterance(job.id, str(path), job.text, duration, "en", words=clip_words(job.text, syn, duration),
                     timing_source="espeak", extra={"voice": job.voice, "rate": job.rate, "snr_db": job.snr_db})


def _synthesise_many(jobs: list[Job], clips: Path) -> list[Utterance | Reject]:
    return [_synthesise(job, clips) for job in jobs]


def jobs_for(texts: list[str], style: Style, seed: int, prefix: str) -> list[Job]:
    """One job per text; voice, rate, lead and noise drawn from a per-clip generator, so they do not depend on
    how the work is split across processes."""
    jobs = []
    for i, text in enumerate(texts):
        rng = random.Random(f"{seed}:{prefix}:{i}")
        jobs.append(Job(f"{prefix}_{i:06d}", text, rng.choice(style.voices), rng.choice(style.rates), style.snr_db,
                        round(rng.uniform(0, style.max_lead_s), 3), rng.getrandbits(32)))
    return jobs


def synthesise(jobs: list[Job], clips: Path, workers: int) -> list[Utterance | Reject]:
    """Results in job order, from `workers` processes.

    libespeak-ng keeps state from one utterance to the next (its pitch flutter and echo run on across calls, so
    the same sentence comes out a few samples different after another one) and cannot be re-initialised in a
    process. So jobs go in fixed groups of GROUP_SIZE, each synthesised by a freshly forked process that starts
    libespeak-ng from scratch: a clip depends only on its group, whatever the number of workers."""
    clips.mkdir(parents=True, exist_ok=True)
    groups = [jobs[i: i + GROUP_SIZE] for i in range(0, len(jobs), GROUP_SIZE)]
    with multiprocessing.get_context("fork").Pool(max(1, workers), maxtasksperchild=1) as pool:
        parts = pool.starmap(_synthesise_many, [(group, clips) for group in groups], chunksize=1)
    return [r for part in parts for r in part]


@dataclass
class CorpusResult:
    train: list[Utterance]
    eval: list[Utterance]
    rejects: list[Reject]

    def summary(self) -> str:
        reasons = Counter(r.reason for r in self.rejects)
        seconds = sum(u.duration or 0 for u in self.train + self.eval)
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items()))
        return (f"kept {len(self.train) + len(self.eval)} ({len(self.train)} train, {len(self.eval)} eval), "
                f"rejected {len(self.rejects)}{f' ({detail})' if detail else ''}; {seconds / 3600:.2f} h of audio")


def build_corpus(out: Path, domain: str, n_train: int, n_eval: int, seed: int, workers: int) -> CorpusResult:
    """Synthesise `n_train` + `n_eval` distinct sentences of `domain` into `out` and write the manifests."""
    texts = sentences(domain, n_train + n_eval, seed)
    style = STYLES[domain]
    results = synthesise(jobs_for(texts[:n_train], style, seed, f"{domain}_train")
                         + jobs_for(texts[n_train:], style, seed, f"{domain}_eval"), out / "clips", workers)
    kept = [r for r in results if isinstance(r, Utterance)]
    result = CorpusResult([u for u in kept if "_train_" in u.id], [u for u in kept if "_eval_" in u.id],
                          [r for r in results if isinstance(r, Reject)])
    write_manifest(out / "manifest.jsonl", result.train)
    write_manifest(out / "manifest_eval.jsonl", result.eval)
    with (out / "rejects.jsonl").open("w", encoding="utf-8") as f:
        for r in result.rejects:
            f.write(json.dumps(r.to_json(), ensure_ascii=False) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="voxtral-prep synth", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output folder (manifests, rejects, clips/)")
    p.add_argument("--domain", choices=sorted(STYLES), default="general", help="text and voices (see above)")
    p.add_argument("--sentences", type=int, default=1000, help="distinct training sentences (default 1000)")
    p.add_argument("--eval-sentences", type=int, default=100, help="held-out sentences (default 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="synthesis processes (default: all cores)")
    args = p.parse_args(argv)
    started = time.perf_counter()
    result = build_corpus(args.out, args.domain, args.sentences, args.eval_sentences, args.seed, args.workers)
    seconds = time.perf_counter() - started
    audio = sum(u.duration or 0 for u in result.train + result.eval)
    print(result.summary())
    print(f"synthesised in {seconds:.1f} s ({audio / max(seconds, 1e-9):.0f}x real time) -> {args.out / 'manifest.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
