"""WER/CER against jiwer and hand counts, the normalisers, the blank-rut rate and word emission offsets."""

import jiwer
import pytest

from voxtral_train.scoring import (
    Counts,
    char_counts,
    normalize,
    normalize_basic,
    normalize_english,
    score_utterance,
    summarize,
    summarize_by_language,
    word_counts,
    word_offsets,
)

PAIRS = [
    ("the cat sat on the mat", "the cat sit on mat"),
    ("a b c d", "a x b c d e"),
    ("hello world", "hello world"),
    ("one two three", "four"),
]


@pytest.mark.parametrize("ref,hyp", PAIRS)
def test_word_and_char_rates_equal_jiwer(ref, hyp):
    assert word_counts(ref, hyp).rate == pytest.approx(jiwer.wer(ref, hyp))
    assert char_counts(ref, hyp).rate == pytest.approx(jiwer.cer(ref, hyp))


def test_hand_counted_values():
    assert word_counts("the cat sat on the mat", "the cat sit on mat") == Counts(2, 6)  # 1 sub + 1 del
    assert word_counts("a b c d", "a x b c d e") == Counts(2, 4)  # 2 insertions
    assert char_counts("abc", "abd") == Counts(1, 3)
    assert char_counts("ab  c", " ab c") == Counts(0, 4)  # whitespace collapsed before counting
    assert word_counts("", "x y") == Counts(2, 0)  # empty reference: every word is an insertion
    assert word_counts("", "").rate == 0.0


def test_corpus_rate_pools_errors_not_utterance_rates():
    scores = [score_utterance("a", "x y", "x"), score_utterance("b", "a b c d e f g h", "a b c d e f g h")]
    summary = summarize(scores)
    assert summary["wer_raw"] == pytest.approx(1 / 10)  # a mean of per-utterance rates would give 0.25
    assert summary["n_utterances"] == 2


@pytest.mark.parametrize(
    "text,expected",
    [
        ("Hello, World!", "hello world"),
        ("Don\u2019t stop\u2014believing.", "dont stop believing"),
        ("[noise] Uh, the cat (laughs) sat", "the cat sat"),
        ("well-known 20% Twenty", "well known 20 twenty"),
        ("\uff21\uff22\uff23  x", "abc x"),  # full-width letters fold to ASCII (NFKC)
    ],
)
def test_english_normaliser(text, expected):
    assert normalize_english(text) == expected
    assert normalize(text, "en") == normalize(text, None) == expected


@pytest.mark.parametrize(
    "text,expected",
    [
        ("\u00c7a va? Tr\u00e8s bien!", "\u00e7a va tr\u00e8s bien"),  # diacritics kept
        ("l'homme, 3 \u20ac", "l homme 3"),
        ("Stra\u00dfe", "strasse"),  # casefold
        ("\u00bfQu\u00e9 tal?  uh", "qu\u00e9 tal uh"),  # no English hesitation list
    ],
)
def test_basic_normaliser(text, expected):
    assert normalize_basic(text) == expected
    assert normalize(text, "fr") == expected


def test_normalised_wer_forgives_case_and_punctuation():
    score = score_utterance("u", "The cat, sat.", "the cat sat", language="en")
    assert score.words_raw.errors == 3 and score.words_norm.errors == 0  # "The", "cat,", "sat." all differ raw
    assert score.chars_norm.errors == 0 and score.chars_raw.errors == 3


def test_blank_rut_rate_counts_only_utterances_with_speech():
    scores = [
        score_utterance("a", "hello there", ""),
        score_utterance("b", "hello there", "hello"),
        score_utterance("c", "", ""),  # nothing said, nothing decoded: not a rut
    ]
    assert [s.blank for s in scores] == [True, False, False]
    assert summarize(scores)["blank_rate"] == pytest.approx(1 / 2)


def test_word_offsets_match_words_by_alignment():
    ref = [("The", 0.50), ("cat", 0.55), ("sat.", 1.00)]
    hyp = [("the", 0.56), ("dog", 0.56), ("Sat", 1.04), ("extra", 1.2)]
    assert word_offsets(ref, hyp, "en") == pytest.approx([0.06, 0.04])
    assert word_offsets(ref, [], "en") == []


def test_summary_latency_adds_the_delay_and_languages_split():
    en = score_utterance("a", "the cat", "the cat", "en", [("the", 0.5), ("cat", 1.0)], [("the", 0.56), ("cat", 1.04)])
    fr = score_utterance("b", "le chat", "le", "fr")
    summary = summarize([en, fr], delay_s=0.48)
    assert summary["offset_p50_s"] == pytest.approx(0.05)
    assert summary["latency_p50_s"] == pytest.approx(0.53)
    assert summary["n_timed_words"] == 2
    by_language = summarize_by_language([en, fr])
    assert by_language["en"]["wer_norm"] == 0.0
    assert by_language["fr"]["wer_norm"] == pytest.approx(0.5)
    assert by_language["fr"]["latency_p50_s"] is None
