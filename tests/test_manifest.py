import json

import pytest

from voxtral_train.manifest import ManifestError, Utterance, Word, read_manifest, write_manifest


def test_round_trip_keeps_every_field_and_writes_relative_paths(tmp_path):
    (tmp_path / "clips").mkdir()
    outside = tmp_path.parent / "elsewhere.wav"
    rows = [
        Utterance("a", str(tmp_path / "clips" / "a.flac"), "Hello there.", duration=1.25, language="en",
                  words=[Word("Hello", 0.1, 0.5), Word("there.", 0.5, 1.2)], timing_source="heuristic"),
        Utterance("b", str(outside), "Part two", duration=2.0, offset=3.0, end=5.0, extra={"speaker": "s1"}),
    ]
    path = tmp_path / "manifest.jsonl"
    write_manifest(path, rows)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0]["audio"] == "clips/a.flac"
    assert lines[1]["audio"] == str(outside)
    assert lines[1]["speaker"] == "s1"
    assert read_manifest(path) == rows


def test_nemo_rows_are_accepted(tmp_path):
    path = tmp_path / "nemo.json"
    path.write_text(json.dumps({"audio_filepath": "x/long.wav", "text": "hi", "offset": 2.0, "duration": 1.5}) + "\n")
    (row,) = read_manifest(path)
    assert row.audio == str(tmp_path / "x" / "long.wav")
    assert (row.id, row.offset, row.end, row.duration) == ("long@2.00", 2.0, 3.5, 1.5)


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"id": "a", "text": "hi"}', ":2: key 'audio'"),
        ('{"id": "a", "audio": "a.wav"}', ":2: key 'text'"),
        ('{"id": "a", "audio": "a.wav", "text": "x", "offset": "3"}', ":2: key 'offset'"),
        ('{"id": "a", "audio": "a.wav", "text": "x", "words": [{"word": "x", "start": 2, "end": 1}]}', ":2: key 'words[0]'"),
        ('{"id": "a", "audio": "a.wav", "text": "x", "timing_source": "guess"}', ":2: key 'timing_source'"),
        ("{not json", ":2: invalid JSON"),
    ],
)
def test_errors_name_line_and_key(tmp_path, line, message):
    path = tmp_path / "m.jsonl"
    path.write_text('{"id": "ok", "audio": "ok.wav", "text": "fine"}\n' + line + "\n")
    with pytest.raises(ManifestError, match=message.replace("[", r"\[").replace("]", r"\]")):
        read_manifest(path)


def test_bundled_spec_reads_the_bundled_manifest():
    from voxtral_train.manifest import bundled_manifest_path, read_manifest

    assert read_manifest("bundled:eval") == read_manifest(bundled_manifest_path("eval"))


def test_a_line_that_is_not_utf8_is_a_bad_row_named_by_its_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"id": "ok", "audio": "ok.wav", "text": "fine"}\n{"id": "b", "audio": "b.wav", "text": "caf\xe9"}\n')
    with pytest.raises(ManifestError, match=r"m\.jsonl:2: invalid JSON \(not UTF-8 text .*write the manifest as UTF-8"):
        read_manifest(path)
