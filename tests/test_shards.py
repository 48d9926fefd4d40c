"""Shard corpora (voxtral_train.shards, shard_stream): written from a manifest, streamed as the same training items,
planned per epoch from the index alone, resumed exactly, read through a pipe: URL, damaged shards named."""

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from torch.utils.data import DataLoader

from voxtral_train.batching import micro_batches
from voxtral_train.config import DataSettings, compose_settings
from voxtral_train.dataset import StreamingDataset, collate
from voxtral_train.delays import DelaySampler
from voxtral_train.manifest import read_manifest, write_manifest
from voxtral_train.preflight import PreflightError, check_run, check_shards
from voxtral_train.shard_stream import ShardStream, as_is, plan_epoch, round_robin
from voxtral_train.shards import ShardError, ShardIndex, read_shard, write_shards
from voxtral_train.tokenizer import StreamingTokenizer
from voxtral_train.train import train

DELAYS = DelaySampler.choices([240, 480, 960])
BUDGET = 300
KEYS = ("input_features", "input_ids", "labels", "num_delay_tokens", "n_positions", "audio_seconds")


@pytest.fixture(scope="module")
def rows():
    return read_manifest("bundled:train")[:24]


@pytest.fixture(scope="module")
def corpus(rows, tmp_path_factory) -> Path:
    """24 bundled rows in manifest order (row key = manifest index), ~4 rows per shard."""
    out = tmp_path_factory.mktemp("shards") / "corpus"
    write_shards(rows, out, shard_bytes=120_000, seed=None)
    return out


@pytest.fixture(scope="module")
def tokenizer():
    return StreamingTokenizer.tiny()


def stream(corpus, tokenizer, **kw) -> ShardStream:
    kw.setdefault("num_workers", 2)
    return ShardStream(ShardIndex.open(corpus, kw.pop("url", None)), tokenizer, DELAYS, max_positions=BUDGET,
                       seed=3, **kw)


def served(s: ShardStream) -> list[dict]:
    return list(DataLoader(s, batch_size=None, collate_fn=as_is, num_workers=s.num_workers))


def test_the_index_describes_the_shards(corpus, rows):
    index = ShardIndex.open(corpus)
    assert len(index) == 24 and len(index.names) >= 5 and int(index.rows.sum()) == 24
    assert index.missing_shards() == []
    for name, size in zip(index.names, index.sizes):
        assert (corpus / name).stat().st_size == size
    listed = subprocess.run(["tar", "tf", str(corpus / index.names[0])], capture_output=True, text=True).stdout
    assert listed.split()[:2] == ["0000000000.flac", "0000000000.json"]  # a plain tar: row key + member kind
    first = json.loads(subprocess.run(["tar", "xOf", str(corpus / index.names[0]), "0000000000.json"],
                                      capture_output=True, text=True).stdout)
    assert first["id"] == rows[0].id and first["words"][0]["start"] == rows[0].words[0].start  # exact, not rounded


def test_streamed_batches_equal_the_manifests_items(corpus, rows, tokenizer):
    """Two real workers; every batch is, tensor for tensor, the collate of the manifest items of its rows (same
    delays, same audio after the FLAC round trip), and one rank serves every row exactly once per epoch."""
    s = stream(corpus, tokenizer)
    reference = StreamingDataset(rows, tokenizer, DELAYS, seed=3)
    plan = s.plan(0)
    batches = served(s)
    assert [b["position"] for b in batches] == list(range(len(plan.served)))
    seen = []
    for batch in batches:
        _, window, k = plan.served[batch["position"]]
        members = plan.batches[window][k].tolist()
        expected = collate([reference[(0, r)] for r in members])
        for key in KEYS:
            assert torch.equal(batch[key], expected[key]), key
        assert batch["ids"] == expected["ids"] and batch["skipped"] == []
        assert int(batch["n_positions"].max()) * len(members) <= BUDGET
        seen += members
    assert sorted(seen) == list(range(24))


def test_the_plan_splits_ranks_evenly_and_changes_per_epoch():
    """A hand-made index of 11 shards for 3 ranks x 2 workers: disjoint ranks, equal step counts, batches within
    the budget, the workers taken in turn, the same plan for the same (seed, epoch) and another one per epoch."""
    rng = np.random.default_rng(0)
    rows = rng.integers(5, 15, size=11)
    samples = rng.integers(8_000, 160_000, size=int(rows.sum()))
    index = ShardIndex(Path("."), tuple(f"s{k}" for k in range(11)), rows, rows * 0, samples)
    lengths = (samples // 1280 + 10).astype(np.int64)

    def plans(epoch):
        return [plan_epoch(index, lengths, 7, epoch, 3, r, 2, 2, 400) for r in range(3)]

    first = plans(0)
    steps = {len(p.served) for p in first}
    assert len(steps) == 1 and steps.pop() > 0
    used = [np.concatenate([p.batches[w][k] for _, w, k in p.served]) for p in first]
    for a in range(3):
        assert len(np.unique(used[a])) == len(used[a])
        for b in range(a + 1, 3):
            assert not set(used[a].tolist()) & set(used[b].tolist())
        shards = np.concatenate(first[a].windows)
        assert len(shards) == 11 // 3
        assert all(lengths[batch].max() * len(batch) <= 400 for window in first[a].batches for batch in window)
    workers = first[0].served[:, 0].tolist()
    assert workers[: 2 * min(workers.count(0), workers.count(1))] == [0, 1] * min(workers.count(0), workers.count(1))
    again = plans(0)
    assert all(np.array_equal(x.served, y.served) for x, y in zip(first, again))
    assert not np.array_equal(np.concatenate(plans(1)[0].windows), np.concatenate(first[0].windows))
    assert round_robin([3, 1, 2]).tolist() == [[0, 0], [1, 0], [2, 0], [0, 1], [2, 1], [0, 2]]


def test_a_resumed_stream_serves_the_rest_of_the_epoch(corpus, tokenizer):
    whole = served(stream(corpus, tokenizer))
    for skip in (1, 4, len(whole) - 1):
        s = stream(corpus, tokenizer)
        s.skip_batches(skip)
        assert len(s) == len(whole) - skip
        rest = served(s)
        assert [b["position"] for b in rest] == list(range(skip, len(whole)))
        assert [b["ids"] for b in rest] == [b["ids"] for b in whole[skip:]]
        assert torch.equal(rest[0]["input_features"], whole[skip]["input_features"])


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 3 workers on 2 cores, on purpose
def test_every_resume_point_with_three_workers_keeps_the_order(corpus, tokenizer):
    """Three workers over uneven windows (some run out before others): from every position, the resumed stream's
    batches are the unbroken stream's tail, in order."""
    whole = served(stream(corpus, tokenizer, num_workers=3, shards_per_window=1))
    workers = stream(corpus, tokenizer, num_workers=3, shards_per_window=1).plan(0).served[:, 0].tolist()
    assert len(set(workers)) == 3 and len({workers.count(w) for w in range(3)}) > 1  # uneven: some run out first
    for skip in range(1, len(whole)):
        s = stream(corpus, tokenizer, num_workers=3, shards_per_window=1)
        s.skip_batches(skip)
        assert [b["ids"] for b in served(s)] == [b["ids"] for b in whole[skip:]], skip


def test_a_pipe_url_streams_the_same_batches(corpus, tokenizer):
    """What object storage looks like to the reader: each shard is a command's standard output (a real process)."""
    local = served(stream(corpus, tokenizer, num_workers=0))
    piped = served(stream(corpus, tokenizer, num_workers=0, url=f"pipe:cat {corpus}/{{name}}"))
    assert [b["ids"] for b in piped] == [b["ids"] for b in local]
    assert all(torch.equal(a["input_features"], b["input_features"]) for a, b in zip(local, piped))


def test_a_url_template_with_other_braces_and_a_wrong_one(corpus, tokenizer, tmp_path):
    """Only {name} is replaced (a command's ${VAR} or JSON stays); a template that reaches no shard is refused by
    the pre-flight check, before any model loads, naming the URL."""
    braces = served(stream(corpus, tokenizer, num_workers=0, url=f'pipe:X=${{HOME}} cat {corpus}/{{name}} # {{"k": 1}}'))
    assert sum(len(b["ids"]) for b in braces) == 24
    data = DataSettings(shard_url=str(tmp_path / "elsewhere" / "{name}"))
    _, problems, _ = check_shards("data.train_manifest", str(corpus), data)
    assert len(problems) == 1 and "elsewhere/shard-000000.tar could not be read" in problems[0]
    assert "No such file or directory" in problems[0] and "data.shard_url" in problems[0]


def test_shards_of_another_write_are_not_taken_for_this_index(corpus, rows, tokenizer, tmp_path):
    """data.shard_url at the shards of another run of voxtral-prep shards (same rows, another order): rows whose
    audio is not the length the index says are skipped and named, never trained under another row's plan."""
    write_shards(rows, tmp_path / "other", shard_bytes=120_000, seed=1)
    batches = served(stream(corpus, tokenizer, url=f"{tmp_path / 'other'}/{{name}}"))
    skipped = [why for b in batches for _, why in b["skipped"]]
    assert len(skipped) + sum(len(b["ids"]) for b in batches) == 24
    length = "not from the same voxtral-prep shards run"
    cut_elsewhere = ("expected sample", "samples, the index says")  # its shards end at other rows, too
    assert any(length in why for why in skipped)
    assert all(length in why or any(c in why for c in cut_elsewhere) for why in skipped)
    reference = StreamingDataset(rows, tokenizer, DELAYS, seed=3)
    for batch in (b for b in batches if b["ids"]):  # what is served is what the index says (lengths that agree)
        for uid, n in zip(batch["ids"], batch["n_positions"].tolist()):
            assert n == reference[(0, [r.id for r in rows].index(uid))]["n_positions"]


def test_more_processes_than_shards_and_an_unfinished_folder(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "64")
    _, problems, _ = check_shards("data.train_manifest", str(corpus), DataSettings())
    assert any("shards for 64 processes" in p and "--shard-mb" in p for p in problems)
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "shard-000000.tar.tmp").write_bytes(b"")
    settings = compose_settings(["+experiment=tiny_demo", f"data.train_manifest={unfinished}"])
    with pytest.raises(PreflightError, match="did not finish; write it again"):
        check_run(settings)


def test_a_damaged_shard_skips_its_rows_and_names_it(corpus, tokenizer, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(corpus, damaged)
    index = ShardIndex.open(damaged)
    victim = damaged / index.names[1]
    victim.write_bytes(victim.read_bytes()[:3000])  # cut mid-sample, as an interrupted copy would
    batches = served(stream(damaged, tokenizer))
    skipped = [why for b in batches for _, why in b["skipped"]]
    lost = set(range(int(index.first_rows[1]), int(index.first_rows[1] + index.rows[1])))
    assert len(skipped) == len(lost) >= 1
    assert all(index.names[1] in why for why in skipped)
    assert {uid for b in batches for uid in b["ids"]}.isdisjoint({f"espeak_{r:03d}" for r in lost})
    assert sum(len(b["ids"]) for b in batches) == 24 - len(lost)
    # The pre-flight check sees the size mismatch before any model loads.
    _, problems, _ = check_shards("data.train_manifest", str(damaged), DataSettings())
    assert len(problems) == 1 and f"{index.names[1]} (3000 bytes, the index says {index.sizes[1]})" in problems[0]


def test_fewer_shards_than_processes_is_refused_with_the_fix(corpus, tokenizer):
    index = ShardIndex.open(corpus)
    with pytest.raises(ShardError, match="shards for 64 processes.*--shard-mb"):
        ShardStream(index, tokenizer, DELAYS, max_positions=BUDGET, num_replicas=64, rank=0)


def test_a_tampered_index_is_refused(corpus, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(corpus, copy)
    counts = np.fromfile(copy / "samples.i64", dtype="<i8")
    counts[0] += 1
    counts.tofile(copy / "samples.i64")
    with pytest.raises(ShardError, match="does not match its index"):
        ShardIndex.open(copy)
    (copy / "shards.json").write_text("{not json")
    with pytest.raises(ShardError, match="not a readable shard index"):
        ShardIndex.open(copy)


def test_preflight_refuses_settings_a_shard_corpus_cannot_serve(corpus):
    settings = compose_settings(["+experiment=tiny_demo", f"data.train_manifest={corpus}", "data.stream_seconds=20",
                                 "data.pcm16=false", "data.max_seconds=1", f"data.eval_manifest={corpus}",
                                 "data.max_positions_per_batch=50", "data.final_eval_split=train"])
    with pytest.raises(PreflightError) as err:
        check_run(settings)
    message = str(err.value)
    for expected in ("data.stream_seconds=20", "data.pcm16=false", "> data.max_seconds=1",
                     "data.eval_manifest=", "data.max_positions_per_batch", "data.final_eval_split=train"):
        assert expected in message, expected


def test_the_same_rows_give_the_same_bytes_with_any_workers(rows, tmp_path):
    one = write_shards(rows[:8], tmp_path / "one", shard_bytes=100_000, seed=5, workers=1)
    two = write_shards(rows[:8], tmp_path / "two", shard_bytes=100_000, seed=5, workers=2)
    assert one.shards == two.shards >= 2
    for path in sorted((tmp_path / "one").iterdir()):
        assert path.read_bytes() == (tmp_path / "two" / path.name).read_bytes(), path.name
    index = ShardIndex.open(tmp_path / "one")
    order = [json.loads(sample["json"])["id"] for k in range(len(index.names)) for _, sample in read_shard(index, k)]
    assert sorted(order) == sorted(r.id for r in rows[:8]) and order != [r.id for r in rows[:8]]  # shuffled


def test_micro_batches_refuse_batches_out_of_order():
    loader = [{"position": 0, "ids": ["a"], "skipped": []}, {"position": 2, "ids": ["b"], "skipped": []}]

    class Order:
        def set_epoch(self, epoch): ...

        def skip_batches(self, n): ...

    class Loader(list):
        dataset = dataclasses.make_dataclass("D", [])()
        dataset.set_epoch = lambda epoch: None

    batches = micro_batches(Loader(loader), Order(), 0, 0)
    assert next(batches)[1] == 1
    with pytest.raises(RuntimeError, match="arrived as batch 1"):
        next(batches)


def prep(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data_prep.cli", "shards", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_voxtral_prep_shards_checks_the_manifest_first(rows, tmp_path):
    manifest = tmp_path / "m.jsonl"
    write_manifest(manifest, [rows[0], dataclasses.replace(rows[1], words=None)])
    done = prep(str(manifest), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "1 of 2 rows have no word timings" in done.stderr and "voxtral-prep validate" in done.stderr
    assert not (tmp_path / "out").exists()
    write_manifest(manifest, rows[:3])
    done = prep(str(manifest), "--out", str(tmp_path / "out"), "--workers", "1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "wrote 3 rows" in done.stdout and len(ShardIndex.open(tmp_path / "out")) == 3
    again = prep(str(manifest), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert again.returncode == 2 and "is not empty" in again.stderr and "Traceback" not in again.stderr
    (tmp_path / "notes.txt").write_text("mine")
    into_a_file = prep(str(manifest), "--out", str(tmp_path / "notes.txt"), cwd=tmp_path)
    assert into_a_file.returncode == 2 and "is a file" in into_a_file.stderr and "delete" not in into_a_file.stderr
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.fixture
def fresh_accelerator_state():
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


RUN = ["+experiment=tiny_demo", "train.warmup_steps=2", "logging.progress_bar=false", "logging.tensorboard=false",
       "train.log_every=1", f"data.max_positions_per_batch={BUDGET}", "train.eval_every=0",
       "data.final_eval_split=none", "train.save_every=3", "data.num_workers=2", "optim.lr=3e-3",
       "data.delays_ms=[240,480,960]", "train.keep_last=4"]


def test_training_on_shards_resumes_exactly_across_an_epoch(corpus, tmp_path, fresh_accelerator_state):
    """12 LoRA steps with dropout cross the epoch boundary (8 batches); cut at step 3 (worker 1's turn next, so the
    workers' parts rotate) and resumed asking for 1 DataLoader worker (the run keeps its 2: the order depends on
    them), the losses are the same. The dropout masks stay the same only if the new iterator leaves the global RNG
    alone."""
    settings = [*RUN, f"data.train_manifest={corpus}", f"train.output_root={tmp_path}", "train.max_steps=12",
                "peft=lora", "peft.dropout=0.3"]
    unbroken = train(compose_settings([*settings, "train.name=unbroken"]))
    assert unbroken.final_step == 12 and unbroken.stopped is None
    plan = stream(corpus, StreamingTokenizer.tiny()).plan(0)
    assert len(plan.served) < 12 and plan.served[3, 0] == 1  # into epoch 1; the resumed DataLoader must rotate
    shutil.copytree(tmp_path / "unbroken", tmp_path / "resumed")
    for late in ("step_000006", "step_000009", "step_000012"):
        shutil.rmtree(tmp_path / "resumed" / "checkpoints" / late)
    AcceleratorState._reset_state(True)
    resumed = train(compose_settings([*settings, "train.name=resumed", "train.resume=latest", "data.num_workers=1"]))
    assert resumed.final_step == 12 and len(resumed.losses) == 9
    assert resumed.losses == pytest.approx(unbroken.losses[3:], abs=1e-6, rel=0)
