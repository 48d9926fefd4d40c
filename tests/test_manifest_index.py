"""ManifestIndex: the same rows, errors and seconds as read_manifest, at a few bytes of heap per row."""

import json
import pickle
import random
import tracemalloc

import numpy as np
import pytest

from voxtral_train import manifest_index
from voxtral_train.manifest import ManifestError, known_seconds, read_manifest
from voxtral_train.manifest_index import ManifestIndex

WORDS = [{"word": "one", "start": 0.1, "end": 0.5}, {"word": "two]", "start": 0.5, "end": 9.25}]


def tricky_lines() -> list[str]:
    """Rows that a byte scan could misread: the `end` of words, keys in any order, NeMo rows, brackets and keys
    inside strings, escapes, nested objects with the same keys, repeated keys, values that are not numbers."""
    rows = [
        {"id": "a", "audio": "a.wav", "text": "x", "duration": 1.5, "words": WORDS},
        {"words": WORDS, "end": 7.25, "text": "y [laughs] {", "audio": "b.wav", "offset": 2.0},
        {"audio_filepath": "c.wav", "text": "z", "offset": 2.0, "duration": 1.5},
        {"id": "d", "audio": "d.wav", "text": 'he said "end": 3, "duration": 9', "end": 4.0},
        {"id": "e", "audio": "e.wav", "text": "no time", "words": WORDS},
        {"id": "f", "audio": "f.wav", "text": "x", "end": 3, "duration": None},
        {"id": "g", "audio": "g.wav", "text": "x", "meta": {"end": 100, "duration": 5, "list": [{"end": 1}]}, "end": 2},
        {"id": "h", "audio": "h.wav", "text": "é ü \\ back", "duration": 3e0},
        {"id": "i", "words": [{"word": "w", "start": 0.0, "end": 1.0, "duration": 7}], "audio": "i.wav", "text": "w"},
        {"id": "j", "audio": "j.wav", "text": "x", "offset": 1.0, "end": 1.5e1, "words": []},
        {"id": "k", "audio": "k.wav", "text": "x", "duration": -0.0},
    ]
    lines = [json.dumps(r, ensure_ascii=i % 2 == 0) for i, r in enumerate(rows)]
    lines += [
        "   ",  # blank lines are skipped (and counted)
        '{"id": "l", "audio": "l.wav", "text": "x", "\\u0064uration": 2.5}',  # an escaped key is still "duration"
        '{"id": "m", "audio": "m.wav", "text": "x", "duration": 1, "duration": 4}',  # json.loads keeps the last
        '{"id":"n","audio":"n.wav","text":"x","end":6,"offset":0.5}\r',  # no spaces, a CRLF line end
        '  {"id" : "o" , "audio" : "o.wav" , "text" : "x" , "duration" : 2 }  ',
        '{"id": "q", "audio": "q.wav", "text": "\\\\", "duration": 1.25}',  # an escaped backslash before a quote
    ]
    rng = random.Random(0)
    for i in range(200):  # keys in random order, with and without the three keys
        row = {"id": f"r{i}", "audio": f"r{i}.wav", "text": "w " * rng.randint(0, 5), "words": WORDS}
        for key in ("duration", "offset", "end"):
            if rng.random() < 0.5:
                row[key] = round(rng.uniform(0, 30), rng.randint(0, 4))
        items = list(row.items())
        rng.shuffle(items)
        lines.append(json.dumps(dict(items)))
    return lines


def write(tmp_path, lines, end="\n"):
    path = tmp_path / "m.jsonl"
    path.write_bytes((("\n".join(lines)) + end).encode())
    return path


@pytest.mark.parametrize("chunk_bytes", [manifest_index.CHUNK_BYTES, 300])  # 300: lines longer than a chunk too
def test_rows_and_seconds_equal_read_manifest(tmp_path, monkeypatch, chunk_bytes):
    monkeypatch.setattr(manifest_index, "CHUNK_BYTES", chunk_bytes)
    path = write(tmp_path, tricky_lines())
    expected = read_manifest(path)
    index = ManifestIndex(path)
    assert len(index) == len(expected) and list(index) == expected
    assert index[-1] == expected[-1] and index[3:5] == expected[3:5]
    seconds = [known_seconds(u) for u in expected]
    assert index.seconds.tolist() == pytest.approx([np.nan if s is None else s for s in seconds], nan_ok=True, abs=0)
    assert [index.line_number(i) for i in (10, 11)] == [11, 13]  # line 12 is blank


def test_no_trailing_newline_and_empty_files(tmp_path):
    path = write(tmp_path, tricky_lines()[:3], end="")
    assert list(ManifestIndex(path)) == read_manifest(path)
    for text in ("", "\n\n", "  \n"):
        path.write_text(text)
        assert len(ManifestIndex(path)) == 0 == len(read_manifest(path))


@pytest.mark.parametrize("line, message", [
    ('{"id": "a", "text": "hi"}', ":3: key 'audio'"),
    ('{"id": "a", "audio": "a.wav", "text": "x", "duration": "3"}', ":3: key 'duration'"),
    ('{"id": "a", "audio": "a.wav", "text": "x", "duration": true}', ":3: key 'duration'"),
    ("{not json", ":3: invalid JSON"),
    ('{"id": "p", "audio": "p.wav", "text": "x", "duration": 2, "end": NaN}', ":3: key 'end' must be a finite"),
    ('{"id": "p", "audio": "p.wav", "text": "x", "duration": Infinity}', ":3: key 'duration' must be a finite"),
])
def test_errors_name_the_same_line_and_key(tmp_path, line, message):
    path = write(tmp_path, ['{"id": "ok", "audio": "ok.wav", "text": "fine"}', "", line])
    with pytest.raises(ManifestError, match=message) as expected:
        read_manifest(path)
    index = ManifestIndex(path)  # building never fails on a bad row: reading it does, with the same message
    assert np.isnan(index.seconds[1])
    with pytest.raises(ManifestError) as got:
        index[1]
    assert str(got.value) == str(expected.value)


def test_a_row_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"id": "a", "audio": "a.wav", "text": "\xff"}\n')
    with pytest.raises(ManifestError, match=":1: not UTF-8"):
        ManifestIndex(path)[0]


def generated(path, n: int) -> None:
    row = {"id": "", "audio": "clips/x.flac", "text": "Rebecca Powell usually fixed a polite car for Brandon.",
           "duration": 0.0, "language": "en", "words": WORDS * 5, "timing_source": "espeak"}
    with path.open("w") as f:
        for i in range(n):
            row["id"], row["duration"] = f"utt_{i:07d}", 1 + i % 1000 / 100
            f.write(json.dumps(row) + "\n")


def test_heap_per_row_stays_under_300_bytes(tmp_path):
    path, n = tmp_path / "big.jsonl", 20_000
    generated(path, n)
    tracemalloc.start()
    try:
        index = ManifestIndex(path)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(index) == n and index.seconds[5] == 1.05 and index[n - 1].id == f"utt_{n - 1:07d}"
    assert held / n < 300, f"{held / n:.0f} bytes per row"


def test_pickled_index_maps_the_file_again_and_refuses_a_changed_file(tmp_path):
    path = write(tmp_path, tricky_lines()[:6])
    index = ManifestIndex(path).with_seconds(np.arange(6, dtype=np.float64))
    state = pickle.dumps(index)
    assert len(state) < path.stat().st_size + 1000 and b"he said" not in state  # the rows are not in it
    again = pickle.loads(state)
    assert list(again) == list(index) and [u.duration for u in again] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    path.write_text(path.read_text() + '{"id": "z", "audio": "z.wav", "text": "x"}\n')
    with pytest.raises(ManifestError, match="changed since the run indexed it"):
        pickle.loads(state)


def test_a_dataset_over_the_index_equals_one_over_the_list():
    import torch

    from voxtral_train.dataset import StreamingDataset
    from voxtral_train.delays import DelaySampler
    from voxtral_train.tokenizer import StreamingTokenizer

    tokenizer, delays = StreamingTokenizer.tiny(), DelaySampler.uniform(80, 2400)
    for max_seconds in (None, 2.0):  # 2 s: most bundled clips are cut
        lazy = StreamingDataset(ManifestIndex("bundled:eval"), tokenizer, delays, max_seconds=max_seconds, seed=2)
        eager = StreamingDataset(read_manifest("bundled:eval"), tokenizer, delays, max_seconds=max_seconds, seed=2)
        assert len(lazy) == len(eager) and list(lazy.utterances) == list(eager.utterances)
        assert len(lazy) == (8 if max_seconds is None else 11)  # 3 of the 8 clips are cut in two
        for epoch in (None, 0, 5):
            assert lazy.lengths_in_positions(epoch).tolist() == eager.lengths_in_positions(epoch).tolist()
        for key in ((0, 0), (3, len(lazy) - 1)):
            a, b = lazy[key], eager[key]
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k]
                                                for k in a)
