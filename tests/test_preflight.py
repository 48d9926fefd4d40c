"""The pre-flight check of a training run, and what happens to an item whose audio breaks mid-run.

Unit tests of `voxtral_train.preflight` on small manifests (no model), then the skip path of the dataset and the
micro-batch stream.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from accelerate.state import AcceleratorState

from voxtral_train import dataset as dataset_module
from voxtral_train.audio import AudioError
from voxtral_train.batching import LengthBucketSampler, micro_batches
from voxtral_train.config import Settings
from voxtral_train.dataset import StreamingDataset, auto_num_workers, collate
from voxtral_train.delays import DelaySampler
from voxtral_train.manifest import Utterance, Word
from voxtral_train.preflight import PreflightError, UnreadableData, check_manifest, check_run, settings_warnings
from voxtral_train.protocol import SAMPLE_RATE
from voxtral_train.tokenizer import StreamingTokenizer

WORDS = [{"word": "one", "start": 0.1, "end": 0.4}, {"word": "two", "start": 0.5, "end": 0.9}]


def wav(path: Path, seconds: float = 1.0) -> str:
    sf.write(path, np.zeros(int(seconds * SAMPLE_RATE), np.float32), SAMPLE_RATE, subtype="PCM_16")
    return str(path)


def manifest(path: Path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def settings_for(train_manifest: str, **data) -> Settings:
    s = Settings()
    s.data.train_manifest, s.data.eval_manifest = train_manifest, None
    for key, value in data.items():
        setattr(s.data, key, value)
    return s


def refusal(s: Settings) -> str:
    with pytest.raises(PreflightError) as err:
        check_run(s)
    return str(err.value)


def test_good_rows_pass_with_durations_from_the_headers(tmp_path):
    audio = wav(tmp_path / "a.wav", 1.5)
    path = manifest(tmp_path / "m.jsonl", [{"id": "a", "audio": audio, "text": "one two", "words": WORDS},
                                           {"id": "b", "audio": audio, "text": "one two", "words": WORDS,
                                            "offset": 0.5}])
    checked = check_run(settings_for(path))
    assert [(u.id, u.duration) for u in checked.train] == [("a", 1.5), ("b", 1.0)] and checked.eval is None
    assert check_run(Settings()).eval is not None  # the bundled set


def test_untimed_rows_are_counted_named_and_the_fix_is_a_command(tmp_path):
    audio = wav(tmp_path / "a.wav")
    rows = [{"id": f"u{i}", "audio": audio, "text": "one two"} for i in range(5)]
    path = manifest(tmp_path / "mine.jsonl", [{"id": "t", "audio": audio, "text": "one two", "words": WORDS}, *rows])
    message = refusal(settings_for(path))
    assert "5 of 6 rows have no word timings" in message and "u0; u1; u2; ..." in message
    assert f"fix: voxtral-prep validate {path} --out {tmp_path / 'mine_prepared'}" in message
    assert f"data.train_manifest={tmp_path / 'mine_prepared' / 'manifest.jsonl'}" in message


def test_every_problem_of_a_manifest_at_once_with_line_numbers(tmp_path):
    audio = wav(tmp_path / "a.wav")
    (tmp_path / "notes.wav").write_text("not a recording")
    path = manifest(tmp_path / "m.jsonl", [
        {"id": "ok", "audio": audio, "text": "one two", "words": WORDS},
        "{broken json",
        {"id": "no_text", "audio": audio},
        {"id": "gone", "audio": str(tmp_path / "gone.wav"), "text": "x", "words": WORDS[:1]},
        {"id": "notes", "audio": str(tmp_path / "notes.wav"), "text": "x", "words": WORDS[:1]},
        {"id": "late", "audio": audio, "text": "x", "offset": 3.0, "words": WORDS[:1]},
    ])
    message = refusal(settings_for(path))
    assert "2 of 6 rows are not manifest rows: line 2: invalid JSON" in message
    assert "line 3: key 'text' is missing" in message
    assert "2 of 6 rows have audio that cannot be read: line 4 (gone): missing_file" in message
    assert "line 5 (notes): not_audio" in message
    assert "1 of 6 rows name a segment outside their audio file: line 6 (late)" in message
    assert "none of" not in message


def test_a_long_manifest_checked_on_several_processes_says_the_same(tmp_path, monkeypatch):
    """Past PARALLEL_ROWS rows the check runs in chunks on forked processes: the same problems (counts, the first
    examples in row order), notes, durations and longest item as one process."""
    from voxtral_train import preflight

    audio, long = wav(tmp_path / "a.wav"), wav(tmp_path / "long.wav", 4.0)
    rows = []
    for i in range(240):
        kind = i % 7
        rows.append("{broken" if kind == 1 else
                    {"id": f"r{i}", "audio": str(tmp_path / "gone.wav"), "text": "x"} if kind == 2 else
                    {"id": f"r{i}", "audio": audio, "text": "one two"} if kind == 3 else
                    {"id": f"r{i}", "audio": long, "text": "one two", "words": WORDS + [
                        {"word": "three", "start": 3.0, "end": 3.8}]} if kind == 4 else
                    {"id": f"r{i}", "audio": audio, "text": "one two", "words": WORDS, "offset": i / 1000})
    path = manifest(tmp_path / "m.jsonl", rows)
    one = check_manifest("data.train_manifest", path, settings_for(path, max_seconds=2.0).data)
    monkeypatch.setattr(preflight, "PARALLEL_ROWS", 10)
    monkeypatch.setattr(preflight.os, "sched_getaffinity", lambda pid: {0, 1, 2})
    forked = []
    real_check_rows = preflight._check_rows
    monkeypatch.setattr(preflight, "_check_rows", lambda *a: forked.append(a[1]) or real_check_rows(*a))
    many = check_manifest("data.train_manifest", path, settings_for(path, max_seconds=2.0).data)
    assert forked == []  # every chunk ran in a forked process (this process's patched function never did)
    assert many[1] == one[1] and many[2] == one[2] and len(one[1]) >= 4 and one[2]
    assert np.array_equal(many[0].seconds, one[0].seconds, equal_nan=True)


@pytest.mark.parametrize("case", ["missing", "folder", "empty", "all_bad"])
def test_manifest_level_problems(tmp_path, case):
    path = tmp_path / "m.jsonl"
    if case == "folder":
        path.mkdir()
        (path / "manifest.jsonl").write_text("")
    elif case == "empty":
        path.write_text("\n\n")
    elif case == "all_bad":
        manifest(path, [{"id": "a", "audio": str(tmp_path / "gone.wav"), "text": "x"}, "[1, 2]"])
    message = refusal(settings_for(str(path)))
    assert {"missing": "no such file", "folder": f"is a folder, not a JSONL manifest: pass data.train_manifest="
                                                  f"{path / 'manifest.jsonl'}",
            "empty": "has no rows", "all_bad": "none of the 2 rows"}[case] in message


def test_long_rows_are_cut_and_a_batch_budget_below_the_longest_item_is_refused(tmp_path):
    audio = wav(tmp_path / "long.wav", 12.0)
    words = [{"word": w, "start": i * 2.0, "end": i * 2.0 + 1.0} for i, w in enumerate("a b c d e f".split())]
    path = manifest(tmp_path / "m.jsonl", [{"id": "long", "audio": audio, "text": "a b c d e f", "words": words}])
    data = settings_for(path, max_seconds=5.0).data
    rows, problems, notes = check_manifest("data.train_manifest", path, data)
    assert problems == [] and notes == ["data.train_manifest: 1 rows longer than data.max_seconds=5 are cut at word "
                                        "boundaries (3 items in all)"]
    message = refusal(settings_for(path, max_seconds=5.0, max_positions_per_batch=80))
    # 5 s = 63 positions of audio + 32 left + 6 delay + 11 right pad
    assert "data.max_positions_per_batch=80: the longest item" in message and "needs 112 positions" in message
    words[1] = {"word": "b", "start": 2.0, "end": 9.0}  # a 7 s word cannot be cut at 5 s
    path = manifest(tmp_path / "m.jsonl", [{"id": "long", "audio": audio, "text": "a b c d e f", "words": words}])
    assert "are longer than data.max_seconds=5 and cannot be cut" in refusal(settings_for(path, max_seconds=5.0))


def test_a_resume_folder_that_is_not_a_checkpoint_is_refused(tmp_path):
    s = Settings()
    s.train.resume = str(tmp_path)
    assert "train.resume=" in refusal(s)


def test_warmup_longer_than_the_run_is_a_warning():
    s = Settings()
    assert settings_warnings(s) == []
    s.train.max_steps, s.train.warmup_steps = 30, 30
    (warning,) = settings_warnings(s)
    assert "train.warmup_steps=30 >= train.max_steps=30" in warning and warning in check_run(s).notes


def test_auto_num_workers_never_exceeds_the_cores():
    assert [auto_num_workers(1, cores) for cores in (1, 2, 4, 16)] == [0, 1, 3, 4]
    assert auto_num_workers(8, 16) == 1 and auto_num_workers(2, 2) == 0


def test_auto_num_workers_gets_no_pytorch_warning_where_too_many_would():
    import os
    import warnings

    def start(workers: int) -> None:
        iter(torch.utils.data.DataLoader(range(4), num_workers=workers))._shutdown_workers()

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        start(auto_num_workers())
    with pytest.warns(UserWarning, match="worker"):
        start(len(os.sched_getaffinity(0)) + 1)


# ---- audio that breaks mid-run -------------------------------------------------------------------------------------

def _dataset(tmp_path, n: int = 4) -> StreamingDataset:
    rows = [Utterance(f"u{i}", wav(tmp_path / f"u{i}.wav", 0.5), "one two", 0.5, words=[Word("one", 0.1, 0.2),
                                                                                        Word("two", 0.3, 0.4)])
            for i in range(n)]
    return StreamingDataset(rows, StreamingTokenizer.tiny(), DelaySampler.fixed(480))


def test_an_item_whose_file_changed_is_skipped_with_its_id(tmp_path):
    data = _dataset(tmp_path)
    (tmp_path / "u1.wav").write_bytes(b"")  # replaced after the check, e.g. by a failed copy
    item = data[1]
    assert item == {"id": "u1", "skipped": f"{tmp_path / 'u1.wav'} is empty (0 bytes)"}
    batch = collate([data[0], item, data[2]])
    assert batch["ids"] == ["u0", "u2"] and batch["input_ids"].shape[0] == 2
    assert batch["skipped"] == [("u1", item["skipped"])]
    assert collate([item]) == {"ids": [], "skipped": [("u1", item["skipped"])]}


def test_a_batch_that_lost_every_item_hands_its_ids_to_the_next(tmp_path, monkeypatch):
    data = _dataset(tmp_path)
    real = dataset_module.load_audio

    def flaky(path, *args, **kwargs):
        if Path(path).stem in ("u0", "u1"):
            raise AudioError("missing_file", f"no such file: {path}")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(dataset_module, "load_audio", flaky)
    sampler = LengthBucketSampler(data.lengths_in_positions, 150, shuffle=False)  # two items per batch
    loader = torch.utils.data.DataLoader(data, batch_sampler=sampler, collate_fn=collate)
    epoch, consumed, batch = next(micro_batches(loader, sampler, 0, 0))
    assert (epoch, consumed) == (0, 2)  # the lost batch still counts as consumed (resume position)
    assert sorted(batch["ids"]) == ["u2", "u3"] and sorted(uid for uid, _ in batch["skipped"]) == ["u0", "u1"]
    monkeypatch.setattr(dataset_module, "load_audio", lambda path, *a, **k: flaky(tmp_path / "u0.wav"))
    with pytest.raises(UnreadableData, match="no item of epoch 0 could be read"):
        next(micro_batches(loader, sampler, 0, 0))


def test_a_run_whose_files_break_mid_run_skips_logs_and_counts_them(tmp_path, monkeypatch, capfd):
    from test_train import fresh_accelerator_state  # noqa: F401  (each run builds its own Accelerator)

    from voxtral_train.config import compose_settings
    from voxtral_train.train import train

    real = dataset_module.load_audio
    broken = set()

    def flaky(path, *args, **kwargs):  # every third clip "was replaced on disk" after the pre-flight check
        if sum(map(ord, Path(path).name)) % 3 == 0:
            broken.add(Path(path).name)
            raise AudioError("unreadable_audio", f"{path}: truncated")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(dataset_module, "load_audio", flaky)
    run = ["+experiment=tiny_demo", f"train.output_root={tmp_path}", "train.name=flaky", "train.warmup_steps=1",
           "train.log_every=1", "train.eval_every=0", "train.save_every=0", "data.final_eval_split=none",
           "data.max_positions_per_batch=300", "data.num_workers=0", "logging.progress_bar=false",
           "logging.tensorboard=false"]
    result = train(compose_settings([*run, "train.max_steps=3"]))
    assert result.final_step == 3 and result.stopped is None and broken
    AcceleratorState._reset_state(True)
    resumed = train(compose_settings([*run, "train.max_steps=6", "train.resume=latest"]))  # the count carries on
    assert resumed.final_step == 6 and resumed.stopped is None
    rows = [json.loads(line) for line in (tmp_path / "flaky" / "metrics.jsonl").read_text().splitlines()]
    counts = [r["skipped_items"] for r in rows if r["split"] == "train"]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    logged = capfd.readouterr().err
    assert counts == sorted(counts) and counts[-1] == logged.count("voxtral-train: skipped item ") > counts[2] > 0
    assert "truncated" in logged


def test_eval_clips_that_break_mid_run_are_left_out_and_named(tmp_path, monkeypatch, capfd):
    from test_train import fresh_accelerator_state  # noqa: F401  (each run builds its own Accelerator)

    import voxtral_train.evaluate as evaluate_module
    from voxtral_train.config import compose_settings
    from voxtral_train.manifest import read_manifest
    from voxtral_train.train import train

    real, broken = evaluate_module.load_audio, set()
    eval_ids = {u.id for u in read_manifest("bundled:eval")}

    def flaky(path, *args, **kwargs):  # two held-out clips "were replaced on disk" after the pre-flight check
        if Path(path).stem in ("espeak_057", "espeak_060"):
            broken.add(Path(path).stem)
            raise AudioError("unreadable_audio", f"{path}: truncated")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(evaluate_module, "load_audio", flaky)
    result = train(compose_settings([
        "+experiment=tiny_demo", f"train.output_root={tmp_path}", "train.name=flaky_eval", "train.max_steps=2",
        "train.warmup_steps=1", "train.eval_every=1", "train.eval_wer_clips=8", "train.save_every=0",
        "data.final_eval_split=eval", "data.max_positions_per_batch=300", "data.num_workers=0",
        "logging.progress_bar=false", "logging.tensorboard=false"]))
    assert result.final_step == 2 and result.stopped is None and broken <= eval_ids and len(broken) == 2
    report = json.loads((tmp_path / "flaky_eval" / "eval" / "report.json").read_text())
    assert report["models"][0]["n_utterances"] == 8 - 2
    logged = capfd.readouterr().err
    assert all(f"voxtral-train: eval skipped item {uid}: " in logged for uid in broken)
