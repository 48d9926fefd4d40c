"""The synthetic corpus generator: deterministic by seed, exact word times per written word, held-out sentences
unseen, and a domain whose terms the general text never contains."""

import hashlib
import json
from pathlib import Path

from data_prep import synth_lexicon as lex
from data_prep.cli import main as prep_main
from data_prep.espeak import Espeak, group_by_written_word
from data_prep.synth_corpus import STYLES, build_corpus, sentences
from voxtral_train.manifest import read_manifest
from voxtral_train.scoring import normalize_english


def _fingerprint(out: Path) -> tuple[str, str]:
    manifests = "".join((out / name).read_text() for name in ("manifest.jsonl", "manifest_eval.jsonl", "rejects.jsonl"))
    audio = hashlib.sha256()
    for clip in sorted((out / "clips").glob("*.flac")):
        audio.update(clip.name.encode() + clip.read_bytes())
    return manifests, audio.hexdigest()


def test_same_seed_gives_identical_manifests_and_audio_with_any_number_of_workers(tmp_path):
    build_corpus(tmp_path / "a", "general", 10, 4, seed=7, workers=1)
    build_corpus(tmp_path / "b", "general", 10, 4, seed=7, workers=2)
    build_corpus(tmp_path / "c", "general", 10, 4, seed=8, workers=1)
    assert _fingerprint(tmp_path / "a") == _fingerprint(tmp_path / "b")
    assert _fingerprint(tmp_path / "a")[1] != _fingerprint(tmp_path / "c")[1]


def test_cli_writes_train_eval_and_rejects_with_word_times_inside_each_clip(tmp_path):
    assert prep_main(["synth", "--out", str(tmp_path), "--domain", "medical", "--sentences", "12",
                      "--eval-sentences", "5", "--workers", "1"]) == 0
    train, held_out = read_manifest(tmp_path / "manifest.jsonl"), read_manifest(tmp_path / "manifest_eval.jsonl")
    rejects = [json.loads(line) for line in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert len(train) + len(held_out) + len(rejects) == 17 and train and held_out
    assert not {u.text for u in train} & {u.text for u in held_out}
    for u in train + held_out:
        assert u.extra["voice"] in STYLES["medical"].voices and u.timing_source == "espeak"
        assert [w.word for w in u.words] == u.text.split()
        ends = [w.end for w in u.words]
        assert ends == sorted(ends) and 0 < ends[0] and ends[-1] <= u.duration
        assert all(w.start <= w.end for w in u.words)


def test_a_written_number_spoken_as_several_words_is_one_timed_word():
    syn = Espeak().synth("Did Tom buy 25 apples?", "en-us", 160)
    assert syn is not None and len(syn.word_samples) == 5
    (start, end), (next_start, _) = syn.word_samples[3], syn.word_samples[4]
    # "twenty five" lasts well over one spoken word's worth (> 0.4 s at 160 wpm) and ends where "apples" starts
    assert (end - start) / syn.sr > 0.4 and end <= next_start


def test_grouping_merges_events_inside_a_word_and_refuses_a_word_without_one():
    spoken = [(0, 10), (10, 20), (20, 30), (30, 40)]
    # "We paid 25 now": bytes 1, 4, 9 (two events: "twenty", "five"), 12
    assert group_by_written_word(spoken, [1, 4, 9, 10], "We paid 25 now") is None  # "now" has no event
    assert group_by_written_word(spoken, [1, 4, 9, 12], "We paid 25 now") == [(0, 10), (10, 20), (20, 30), (30, 40)]
    assert group_by_written_word(spoken[:3] + [(30, 45)], [1, 4, 9, 10], "We paid 25") == [(0, 10), (10, 20), (20, 45)]


def test_held_out_sentences_are_distinct_and_domain_terms_never_occur_in_general_text():
    general = sentences("general", 3000, seed=0)
    assert len(set(general)) == 3000
    general_words = {w for text in general for w in normalize_english(text).split()}
    assert 1000 < len(general_words)
    medical_terms = {normalize_english(t) for t in lex.MEDICAL_TERMS}
    assert not medical_terms & general_words
    medical_words = {w for text in sentences("medical", 300, seed=0) for w in normalize_english(text).split()}
    assert len(medical_terms & medical_words) > 40
    assert not set(STYLES["medical"].voices) & set(STYLES["general"].voices)
    assert min(STYLES["medical"].rates) > max(STYLES["general"].rates)
