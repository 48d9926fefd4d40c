"""Transcription metrics: WER and CER (jiwer), raw and normalised, per utterance, per language and corpus-wide;
the blank-rut rate; emission latency of words against reference word times.

Normalisation. WER moves by several points with text normalisation (docs/MODEL.md, "Published numbers"), so every
number is given raw
(only whitespace collapsed) and normalised. No light normaliser package is installed with the project
(`whisper-normalizer` pulls extra number-parsing packages), so two small documented ones live here:
- `normalize_basic` (any language): Unicode NFKC, casefold, drop text in [brackets] / (parentheses), every
  punctuation or symbol character becomes a space, whitespace collapsed. Letters with diacritics and digits are kept.
- `normalize_english`: `normalize_basic` after English-specific steps: curly apostrophes made straight,
  apostrophes dropped inside words ("don't" -> "dont", so contractions match however they are typed), hyphens
  split words, and hesitation words (uh, um, hmm, mhm, er, ah) removed. Numbers are left alone: "20" and
  "twenty" stay different.
English text (language None or starting with "en") gets `normalize_english`, any other `normalize_basic`.

Corpus WER = all word errors / all reference words (not a mean of per-utterance WERs); CER likewise on characters
(spaces included, as jiwer counts them).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

import jiwer
import numpy as np

_BRACKETED = re.compile(r"\[[^\]]*\]|\([^)]*\)")
_SPACES = re.compile(r"\s+")
_INNER_APOSTROPHE = re.compile(r"(?<=\w)'(?=\w)")
HESITATIONS = frozenset({"uh", "um", "umm", "hmm", "mm", "mhm", "er", "erm", "ah"})


def collapse_spaces(text: str) -> str:
    return _SPACES.sub(" ", text).strip()


def normalize_basic(text: str) -> str:
    """Language-independent normalisation (module docstring)."""
    text = _BRACKETED.sub(" ", unicodedata.normalize("NFKC", text).casefold())
    text = "".join(" " if unicodedata.category(ch)[0] in "PS" else ch for ch in text)
    return collapse_spaces(text)


def normalize_english(text: str) -> str:
    """English normalisation (module docstring)."""
    text = unicodedata.normalize("NFKC", text).casefold().replace("\u2019", "'").replace("\u2018", "'")
    text = _INNER_APOSTROPHE.sub("", text)
    words = normalize_basic(text).split()
    return " ".join(w for w in words if w not in HESITATIONS)


def is_english(language: str | None) -> bool:
    return language is None or language.lower().startswith("en")


def normalize(text: str, language: str | None) -> str:
    return normalize_english(text) if is_english(language) else normalize_basic(text)


@dataclass(frozen=True)
class Counts:
    """Edit operations of one hypothesis against one reference (words or characters)."""

    errors: int  # substitutions + deletions + insertions
    ref: int  # reference length

    @property
    def rate(self) -> float:
        return self.errors / self.ref if self.ref else float(self.errors > 0)


def word_counts(reference: str, hypothesis: str) -> Counts:
    ref, hyp = reference.split(), hypothesis.split()
    if not ref:  # jiwer refuses empty references: every hypothesis word is an insertion
        return Counts(len(hyp), 0)
    out = jiwer.process_words(" ".join(ref), " ".join(hyp))
    return Counts(out.substitutions + out.deletions + out.insertions, len(ref))


def char_counts(reference: str, hypothesis: str) -> Counts:
    ref, hyp = collapse_spaces(reference), collapse_spaces(hypothesis)
    if not ref:
        return Counts(len(hyp), 0)
    out = jiwer.process_characters(ref, hyp)
    return Counts(out.substitutions + out.deletions + out.insertions, len(ref))


def word_offsets(ref_words: Sequence[tuple[str, float]], hyp_words: Sequence[tuple[str, float]],
                 language: str | None) -> list[float]:
    """emitted_s - reference end, for every reference word that the alignment matches exactly to a decoded word.

    ref_words: (word, end_s); hyp_words: (word, emitted_s). Words are compared normalised (each squeezed to one
    token so the alignment indices stay those of the lists)."""

    def tokens(words: Sequence[tuple[str, float]]) -> list[str]:
        return [normalize(w, language).replace(" ", "") or "\u2205" for w, _ in words]

    ref, hyp = tokens(ref_words), tokens(hyp_words)
    if not ref or not hyp:
        return []
    out = jiwer.process_words(" ".join(ref), " ".join(hyp))
    offsets = []
    for chunk in out.alignments[0]:
        if chunk.type == "equal":
            for i, j in zip(range(chunk.ref_start_idx, chunk.ref_end_idx), range(chunk.hyp_start_idx, chunk.hyp_end_idx)):
                offsets.append(hyp_words[j][1] - ref_words[i][1])
    return offsets


@dataclass
class UtteranceScore:
    id: str
    language: str | None
    reference: str
    hypothesis: str
    words_raw: Counts
    words_norm: Counts
    chars_raw: Counts
    chars_norm: Counts
    blank: bool  # non-empty reference, no decoded text: the "blank rut"
    offsets: list[float] = field(default_factory=list)  # emitted - reference word end, per matched word

    def to_json(self) -> dict:
        row = asdict(self)
        for key in ("words_raw", "words_norm", "chars_raw", "chars_norm"):
            counts = getattr(self, key)
            row[key] = {"errors": counts.errors, "ref": counts.ref, "rate": round(counts.rate, 6)}
        row["offsets"] = [round(x, 4) for x in self.offsets]
        return row


def score_utterance(uid: str, reference: str, hypothesis: str, language: str | None = None,
                    ref_words: Sequence[tuple[str, float]] | None = None,
                    hyp_words: Sequence[tuple[str, float]] | None = None) -> UtteranceScore:
    """All per-utterance numbers. ref_words (word, end_s) and hyp_words (word, emitted_s) give the offsets."""
    ref_norm, hyp_norm = normalize(reference, language), normalize(hypothesis, language)
    return UtteranceScore(
        id=uid,
        language=language,
        reference=reference,
        hypothesis=hypothesis,
        words_raw=word_counts(collapse_spaces(reference), collapse_spaces(hypothesis)),
        words_norm=word_counts(ref_norm, hyp_norm),
        chars_raw=char_counts(reference, hypothesis),
        chars_norm=char_counts(ref_norm, hyp_norm),
        blank=bool(reference.strip()) and not hypothesis.strip(),
        offsets=word_offsets(ref_words, hyp_words, language) if ref_words and hyp_words else [],
    )


def _rate(counts: Iterable[Counts]) -> float | None:
    counts = list(counts)
    total = sum(c.ref for c in counts)
    return sum(c.errors for c in counts) / total if total else None


def _percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def summarize(scores: Sequence[UtteranceScore], delay_s: float = 0.0) -> dict:
    """Corpus numbers of a set of utterances. `offset_*` is emitted - word end on the audio axis (the module
    `decode` convention); `latency_*` adds the delay: how long after a word ends a live listener sees it."""
    offsets = [x for s in scores for x in s.offsets]
    with_text = [s for s in scores if s.reference.strip()]
    return {
        "n_utterances": len(scores),
        "wer_raw": _rate(s.words_raw for s in scores),
        "wer_norm": _rate(s.words_norm for s in scores),
        "cer_raw": _rate(s.chars_raw for s in scores),
        "cer_norm": _rate(s.chars_norm for s in scores),
        "blank_rate": sum(s.blank for s in with_text) / len(with_text) if with_text else None,
        "n_timed_words": len(offsets),
        "offset_p50_s": _percentile(offsets, 50),
        "offset_p90_s": _percentile(offsets, 90),
        "latency_p50_s": None if not offsets else _percentile(offsets, 50) + delay_s,
        "latency_p90_s": None if not offsets else _percentile(offsets, 90) + delay_s,
    }


def summarize_by_language(scores: Sequence[UtteranceScore], delay_s: float = 0.0) -> dict[str, dict]:
    """`summarize` per language ("unknown" where the manifest gives none)."""
    groups: dict[str, list[UtteranceScore]] = {}
    for s in scores:
        groups.setdefault(s.language or "unknown", []).append(s)
    return {lang: summarize(group, delay_s) for lang, group in sorted(groups.items())}
