import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from data_prep import sources
from data_prep.cli import main
from data_prep.timings import check_words, frame_rms, speech_span, spread_words
from data_prep.validate import PrepOptions, SourceRow, prepare
from voxtral_train.audio import load_audio
from voxtral_train.manifest import Word, bundled_manifest_path, read_manifest
from voxtral_train.protocol import SAMPLE_RATE, SAMPLES_PER_POSITION

SR = SAMPLE_RATE


def tone(seconds: float, sr: int = SR, channels: int = 1) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    x = 0.3 * np.sin(2 * np.pi * 220 * t)
    return np.stack([x] * channels, axis=1) if channels > 1 else x


def write(path: Path, x: np.ndarray, sr: int = SR, subtype: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, x, sr, subtype=subtype)
    return path


def row(audio: Path, text: str = "hello world", uid: str | None = None, **kw) -> SourceRow:
    return SourceRow({"audio": str(audio)}, uid or audio.stem, str(audio), text, **kw)


# ---- heuristic timings: hand-computed examples -------------------------------------------------

def test_spread_words_by_character_share_with_ends_at_share_end():
    words = spread_words(["a", "bbb"], 1.0, 2.0)  # 4 chars: "a" gets 1/4 of the second
    assert words == [Word("a", 1.0, 1.25), Word("bbb", 1.25, 2.0)]
    assert spread_words([], 0.0, 1.0) == []


def test_frame_rms_and_speech_span():
    np.testing.assert_allclose(frame_rms(np.array([3.0, 4.0, 1.0]), 2), [np.sqrt(12.5), np.sqrt(0.5)])
    # 100 ms silence, 200 ms at 0.5, 100 ms at 0.001 (-54 dB: silence), at 1 kHz -> 20 ms frames of 20 samples
    x = np.concatenate([np.zeros(100), np.full(200, 0.5), np.full(100, 0.001)])
    assert speech_span(x, 1000) == pytest.approx((0.1, 0.3))
    assert speech_span(np.zeros(500), 1000) == (0.0, 0.5)


def test_check_words_keeps_text_spelling_and_rejects_disorder():
    got = check_words([Word("hello", 0.1, 0.4), Word("world", 0.4, 1.03)], "Hello, world!", 1.0)
    assert got == [Word("Hello,", 0.1, 0.4), Word("world!", 0.4, 1.0)]  # end clipped within tolerance
    for bad in (
        [Word("a", 0.5, 0.6), Word("b", 0.2, 0.3)],  # goes back
        [Word("a", 0.5, 0.4), Word("b", 0.5, 0.6)],  # end before start
        [Word("a", 0.1, 0.2), Word("b", 0.3, 1.2)],  # past the clip
        [Word("a", 0.1, 0.2)],  # word count differs
    ):
        with pytest.raises(ValueError):
            check_words(bad, "a b", 1.0)


# ---- validation and the reject report ------------------------------------------------------------

def test_every_bad_input_gets_its_reason(tmp_path):
    good = write(tmp_path / "good.wav", tone(0.5))
    stereo = write(tmp_path / "stereo.wav", tone(0.5, 8000, channels=2), 8000, "PCM_24")
    nan = write(tmp_path / "nan.wav", np.array([0.1, np.nan] * 2000, np.float32), subtype="FLOAT")
    empty = write(tmp_path / "empty.wav", np.zeros(0))
    short = write(tmp_path / "short.wav", tone((SAMPLES_PER_POSITION - 1) / SR))
    long = write(tmp_path / "long.wav", tone(3.0))
    (tmp_path / "text.wav").write_text("not audio at all\n" * 10)
    (tmp_path / "corrupt.flac").write_bytes(b"fLaC" + bytes(300))
    (tmp_path / "zero.wav").write_bytes(b"")
    rows = [
        row(good), row(stereo), row(nan), row(empty), row(short), row(long), row(tmp_path / "text.wav"),
        row(tmp_path / "corrupt.flac"), row(tmp_path / "zero.wav"), row(tmp_path / "missing.wav"), row(good, "   ", uid="blank"),
        row(good, uid="good"), row(good, "zzz", uid="unk"),
        row(good, uid="badtimes", words=[Word("hello", 0.3, 0.2), Word("world", 0.3, 0.4)]),
    ]
    encode = lambda text: [0] if "zzz" in text else [5, 6]  # noqa: E731  (id 0 plays the unk id)
    result = prepare(rows, PrepOptions(max_seconds=2.0), encode=encode, unk_id=0, workers=2)
    reasons = {r.id: r.reason for r in result.rejects}
    assert reasons == {
        "nan": "non_finite_samples", "empty": "empty_audio", "short": "too_short", "long": "too_long",
        "text": "not_audio", "corrupt": "unreadable_audio", "zero": "empty_file", "missing": "missing_file",
        "blank": "empty_transcript", "good": "duplicate_id", "unk": "unencodable_text", "badtimes": "bad_word_timings",
    }
    assert [u.id for u in result.kept] == ["good", "stereo"]
    assert result.kept[1].duration == pytest.approx(0.5)
    assert all(r.source["audio"] for r in result.rejects)
    assert result.summary().startswith("kept 2, rejected 12 (bad_word_timings: 1, duplicate_id: 1, empty_audio: 1, empty_file: 1,")


def test_segment_long_timed_recording_and_copy_audio(tmp_path):
    audio = write(tmp_path / "long.wav", tone(5.0))
    words = [Word("One", 0.2, 1.0), Word("two", 1.2, 2.0), Word("three", 2.4, 3.5), Word("four.", 3.7, 4.8)]
    opts = PrepOptions(max_seconds=3.0, segment=True, copy_dir=tmp_path / "copies")
    result = prepare([row(audio, "One two three four.", words=words)], opts, workers=1)
    assert [u.id for u in result.kept] == ["long#0", "long#1"]
    assert [u.text for u in result.kept] == ["One two", "three four."]
    first, second = result.kept
    # cuts at 1.1, 2.2, 3.6: [0, 2.2] and [2.2, 5.0] (the clip end)
    assert (first.duration, second.duration) == (pytest.approx(2.2), pytest.approx(2.8))
    assert first.offset is None and Path(first.audio).parent == tmp_path / "copies"
    np.testing.assert_allclose(load_audio(first.audio), tone(5.0)[: int(2.2 * SR)], atol=1e-4)
    assert second.words[0] == Word("three", pytest.approx(0.2), pytest.approx(1.3))


def test_segments_without_copy_are_offset_rows_of_the_original(tmp_path):
    audio = write(tmp_path / "long.wav", tone(5.0))
    words = [Word("One", 0.2, 1.0), Word("two", 1.2, 2.0), Word("three", 2.4, 3.5), Word("four.", 3.7, 4.8)]
    kept = prepare([row(audio, "One two three four.", words=words)], PrepOptions(max_seconds=3.0, segment=True), workers=1).kept
    assert [(u.audio, u.offset, u.end) for u in kept] == [
        (str(audio), 0.0, pytest.approx(2.2)), (str(audio), pytest.approx(2.2), 5.0)]
    unsegmented = prepare([row(audio, "One two three four.", words=words)], PrepOptions(max_seconds=3.0), workers=1)
    assert [r.reason for r in unsegmented.rejects] == ["too_long"]


def test_heuristic_timings_fill_missing_words(tmp_path):
    x = np.concatenate([np.zeros(SR // 2), tone(1.0), np.zeros(SR // 2)])
    audio = write(tmp_path / "a.wav", x)
    (u,) = prepare([row(audio, "ab cd  efgh")], PrepOptions(timings="heuristic"), workers=1).kept
    assert u.timing_source == "heuristic" and u.text == "ab cd efgh"
    assert [(w.word, w.start, w.end) for w in u.words] == [
        ("ab", pytest.approx(0.5), pytest.approx(0.75)), ("cd", pytest.approx(0.75), pytest.approx(1.0)),
        ("efgh", pytest.approx(1.0), pytest.approx(1.5)),
    ]


# ---- importers on tiny trees of each layout --------------------------------------------------------

def test_folder_importer(tmp_path):
    write(tmp_path / "a" / "one.wav", tone(0.3))
    (tmp_path / "a" / "one.txt").write_text("First  clip.\n")
    write(tmp_path / "b" / "two.flac", tone(0.3))
    (tmp_path / "b" / "two.lab").write_text("Second")
    write(tmp_path / "three.wav", tone(0.3))  # no transcript
    (tmp_path / "four.txt").write_text("no audio")
    got = list(sources.from_folder(tmp_path))
    kept = [(r.id, r.text) for r in got if isinstance(r, SourceRow)]
    assert kept == [("a/one", "First  clip.\n"), ("b/two", "Second")]
    assert sorted((r.id, r.reason) for r in got if not isinstance(r, SourceRow)) == [
        ("four", "missing_file"), ("three", "missing_transcript")]


@pytest.mark.parametrize("kind", ["jsonl", "csv", "tsv"])
def test_table_importer(tmp_path, kind):
    write(tmp_path / "clips" / "x.wav", tone(0.3))
    if kind == "jsonl":
        lines = [{"audio_filepath": "clips/x.wav", "text": "Hi.", "duration": 0.3},
                 {"id": "y", "path": str(tmp_path / "clips" / "x.wav"), "sentence": "There", "offset": 0.1, "end": 0.2}]
        (tmp_path / "m.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n{broken\n")
    else:
        sep = "," if kind == "csv" else "\t"
        (tmp_path / f"m.{kind}").write_text(sep.join(["id", "audio", "transcript", "offset"]) + "\n"
                                            + sep.join(["x", "clips/x.wav", "Hi.", ""]) + "\n"
                                            + sep.join(["y", str(tmp_path / "clips" / "x.wav"), "There", "0.1"]) + "\n")
    got = list(sources.from_table(tmp_path / f"m.{kind}"))
    rows = [r for r in got if isinstance(r, SourceRow)]
    assert [(r.id, r.audio, r.text) for r in rows] == [
        ("clips/x" if kind == "jsonl" else "x", str(tmp_path / "clips" / "x.wav"), "Hi."),
        ("y", str(tmp_path / "clips" / "x.wav"), "There"),
    ]
    assert rows[1].offset == 0.1
    assert [r.reason for r in got if not isinstance(r, SourceRow)] == (["bad_row"] if kind == "jsonl" else [])


def test_librispeech_importer(tmp_path):
    chapter = tmp_path / "dev-clean" / "84" / "121123"
    write(chapter / "84-121123-0000.flac", tone(0.3))
    (chapter / "84-121123.trans.txt").write_text("84-121123-0000 GO DO YOU HEAR\n84-121123-0001 BUT IN LESS\n")
    result = prepare(sources.from_librispeech(tmp_path), PrepOptions(), workers=1)
    assert [(u.id, u.text, u.language) for u in result.kept] == [("84-121123-0000", "GO DO YOU HEAR", "en")]
    assert [(r.id, r.reason) for r in result.rejects] == [("84-121123-0001", "missing_file")]


def test_common_voice_importer(tmp_path):
    write(tmp_path / "clips" / "cv_1.mp3", tone(0.5), subtype="MPEG_LAYER_III")
    (tmp_path / "train.tsv").write_text('client_id\tpath\tsentence\tlocale\nabc\tcv_1.mp3\t"Quoted," she said.\ten\n')
    (r,) = sources.from_common_voice(tmp_path / "train.tsv")
    assert (r.id, r.text, r.language, r.audio) == ("cv_1", '"Quoted," she said.', "en", str(tmp_path / "clips" / "cv_1.mp3"))
    (u,) = prepare([r], PrepOptions(), workers=1).kept
    assert u.duration == pytest.approx(0.5, abs=0.06)  # mp3 adds encoder padding


def test_hf_dataset_importer(tmp_path):
    datasets = pytest.importorskip("datasets")
    write(tmp_path / "src" / "a.wav", tone(0.3))
    ds = datasets.Dataset.from_dict({"audio": [str(tmp_path / "src" / "a.wav")], "sentence": ["From HF."]})
    ds = ds.cast_column("audio", datasets.Audio(decode=False))
    ds.save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "src" / "a.wav").unlink()  # the saved copy must be self-contained
    (r,) = sources.from_hf_dataset(tmp_path / "saved", tmp_path / "out")
    assert (r.id, r.text) == ("data-0000000", "From HF.")
    np.testing.assert_allclose(load_audio(r.audio), tone(0.3), atol=1e-4)


def test_cli_writes_manifest_rejects_and_summary(tmp_path, capsys):
    write(tmp_path / "in" / "ok.wav", tone(0.4))
    (tmp_path / "in" / "ok.txt").write_text("Fine.")
    (tmp_path / "in" / "bad.wav").write_text("text")
    (tmp_path / "in" / "bad.txt").write_text("Broken.")
    assert main(["folder", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--workers", "1"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "kept 1, rejected 1 (not_audio: 1)"
    (u,) = read_manifest(tmp_path / "out" / "manifest.jsonl")
    assert (u.id, u.text, u.duration) == ("ok", "Fine.", pytest.approx(0.4))
    (rej,) = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert (rej["id"], rej["reason"], rej["source"]["transcript"]) == ("bad", "not_audio", str(tmp_path / "in" / "bad.txt"))
    # validating the written manifest keeps the row as it is
    assert main(["validate", str(tmp_path / "out" / "manifest.jsonl"), "--out", str(tmp_path / "again")]) == 0
    assert read_manifest(tmp_path / "again" / "manifest.jsonl") == [u]


# ---- the bundled espeak-ng set ---------------------------------------------------------------------

@pytest.mark.parametrize("split", ["train", "eval"])
def test_bundled_set_loads_decodes_and_words_join(split):
    rows = read_manifest(bundled_manifest_path(split))
    assert len(rows) == {"train": 56, "eval": 8}[split]
    for u in rows:
        info = sf.info(u.audio)
        assert (info.samplerate, info.channels) == (SAMPLE_RATE, 1)
        x = load_audio(u.audio)
        assert len(x) == info.frames and u.duration == pytest.approx(len(x) / SR, abs=1e-4)
        assert " ".join(w.word for w in u.words) == u.text and u.timing_source == "espeak"
        assert check_words(u.words, u.text, u.duration) == u.words
