"""Bring your own data: each bad input a new user meets, driven through the real `voxtral-prep` command line.

Every case asserts the reason code or message and the exit status, and that no traceback reached the user.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from data_prep import validate
from data_prep.text import clean_transcript
from data_prep.validate import PrepOptions, SourceRow, prepare
from voxtral_train.manifest import read_manifest
from voxtral_train.protocol import SAMPLE_RATE

ROOT = Path(__file__).resolve().parent.parent


def speechlike(seconds: float, seed: int = 0) -> np.ndarray:
    """Noise bursts between silences: a signal with a speech span for the energy heuristic."""
    rng = np.random.default_rng(seed)
    x = np.zeros(int(seconds * SAMPLE_RATE), np.float32)
    x[int(0.2 * SAMPLE_RATE) : int((seconds - 0.2) * SAMPLE_RATE)] = 0.1 * rng.standard_normal(
        int((seconds - 0.2) * SAMPLE_RATE) - int(0.2 * SAMPLE_RATE))
    return x


def clip(folder: Path, name: str, text: str | None, seconds: float = 1.0, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    sf.write(folder / f"{name}.wav", speechlike(seconds, seed), SAMPLE_RATE, subtype="PCM_16")
    if text is not None:
        (folder / f"{name}.txt").write_text(text, encoding="utf-8")
    return folder / f"{name}.wav"


def prep(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "data_prep.cli", *args, "--workers", "1"], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)
    assert "Traceback" not in done.stderr, done.stderr
    return done


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]


# ---- timings: auto by default, strict on request -------------------------------------------------------------------

def test_untimed_folder_gets_heuristic_timings_and_the_summary_says_what_they_cost(tmp_path):
    clip(tmp_path / "in", "a", "first clip here")
    clip(tmp_path / "in", "b", "second one", seed=1)
    done = prep("folder", str(tmp_path / "in"), "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:2] == ["kept 2, rejected 0", "timings: heuristic 2"]
    assert lines[2].startswith("note: 2 rows have heuristic timings") and "--self-align-model" in lines[2]
    rows = read_manifest(tmp_path / "out" / "manifest.jsonl")
    assert [u.timing_source for u in rows] == ["heuristic", "heuristic"]
    assert all(u.words and len(u.words) == len(u.text.split()) for u in rows)


def test_timings_none_keeps_rows_untimed_and_says_training_will_refuse_them(tmp_path):
    clip(tmp_path / "in", "a", "first clip here")
    done = prep("folder", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--timings", "none")
    assert done.returncode == 0 and done.stdout.splitlines()[1] == "timings: untimed 1"
    assert "note: 1 rows have no word timings: voxtral-train refuses them" in done.stdout


def test_timings_manifest_rejects_untimed_rows_with_their_own_reason(tmp_path):
    timed = clip(tmp_path, "timed", None)
    untimed = clip(tmp_path, "untimed", None)
    table = tmp_path / "list.jsonl"
    table.write_text(json.dumps({"id": "t", "audio": str(timed), "text": "one",
                                 "words": [{"word": "one", "start": 0.2, "end": 0.6}]}) + "\n"
                     + json.dumps({"id": "u", "audio": str(untimed), "text": "two"}) + "\n")
    done = prep("table", str(table), "--out", str(tmp_path / "out"), "--timings", "manifest")
    assert done.returncode == 0
    assert done.stdout.splitlines()[:2] == ["kept 1, rejected 1 (no_word_timings: 1)", "timings: manifest 1"]
    (rej,) = jsonl(tmp_path / "out" / "rejects.jsonl")
    assert (rej["id"], rej["line"], rej["reason"]) == ("u", 2, "no_word_timings")
    assert "--timings auto" in rej["message"]


def test_auto_falls_back_to_the_heuristic_for_rows_an_aligner_could_not_time(tmp_path):
    rows = [SourceRow({}, "a", str(clip(tmp_path, "a", None)), "some words")]
    (u,) = prepare(rows, PrepOptions(aligner=True), workers=1).kept
    assert u.words is None  # left for the alignment model
    assert validate.heuristic_fill([u]) == 1 and u.timing_source == "heuristic" and len(u.words) == 2


# ---- transcripts ---------------------------------------------------------------------------------------------------

DIRTY = {
    "nul_bel": ("hel\x00lo wo\x07rld", "hello world"),
    "ansi": ("\x1b[1;31mhello\x1b[0m world", "hello world"),
    "zero_width": ("hello\u200b world\u2060", "hello world"),
    "bom_bidi": ("\ufeffhello \u202eworld\u200f", "hello world"),
    "c1_whitespace": ("hello\x85\x9b2J\tworld\n", "hello world"),
}


@pytest.mark.parametrize("dirty,clean", DIRTY.values(), ids=DIRTY.keys())
def test_clean_transcript(dirty, clean):
    cleaned, removed = clean_transcript(dirty)
    assert cleaned == clean and removed
    assert clean_transcript(" plain   text\n") == ("plain text", [])  # whitespace alone is no change to report
    assert clean_transcript("fa\u200cx")[0] == "fa\u200cx"  # ZWNJ is spelling in Persian and Indic scripts


def test_cleaned_rows_are_kept_flagged_reported_and_reach_the_tokenizer_clean(tmp_path):
    from voxtral_train.tokenizer import StreamingTokenizer

    for i, (name, (dirty, _)) in enumerate(DIRTY.items()):
        clip(tmp_path / "in", name, dirty, seed=i)
    done = prep("folder", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--tokenizer", "tiny")
    assert done.returncode == 0 and done.stdout.splitlines()[0] == f"kept {len(DIRTY)}, rejected 0"
    assert f"cleaned {len(DIRTY)} transcripts" in done.stdout
    rows = {u.id: u for u in read_manifest(tmp_path / "out" / "manifest.jsonl")}
    changes = {c["id"]: c for c in jsonl(tmp_path / "out" / "changes.jsonl")}
    tokenizer = StreamingTokenizer.tiny()
    plain = tokenizer.encode_text("hello world")
    for name, (dirty, clean) in DIRTY.items():
        assert rows[name].text == clean and rows[name].extra["text_cleaned"] is True
        assert (changes[name]["original"], changes[name]["cleaned"]) == (dirty, clean) and changes[name]["removed"]
        assert tokenizer.encode_text(rows[name].text) == plain
        assert tokenizer.encode_text(dirty) != plain  # uncleaned, the same row reaches the model as other tokens


@pytest.mark.parametrize("value", [42, ["a", "list"], None])
def test_a_transcript_that_is_not_a_string_has_its_own_reason_and_line(tmp_path, value):
    audio = clip(tmp_path, "a", None)
    (tmp_path / "list.jsonl").write_text("\n" + json.dumps({"id": "ok", "audio": str(audio), "text": "fine"}) + "\n"
                                         + json.dumps({"id": "x", "audio": str(audio), "text": value}) + "\n{oops\n")
    done = prep("table", str(tmp_path / "list.jsonl"), "--out", str(tmp_path / "out"))
    assert done.returncode == 0
    assert done.stdout.splitlines()[0] == "kept 1, rejected 2 (bad_row: 1, transcript_not_text: 1)"
    not_text, broken = jsonl(tmp_path / "out" / "rejects.jsonl")
    assert (not_text["id"], not_text["line"], not_text["reason"]) == ("x", 3, "transcript_not_text")
    assert "not a string" in not_text["message"] and "missing" not in not_text["message"]
    assert (broken["line"], broken["reason"]) == (4, "bad_row")


# ---- audio: specific reasons, cheap checks -------------------------------------------------------------------------

def test_empty_file_and_text_renamed_wav_say_what_they_are(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "zero.wav").write_bytes(b"")
    (tmp_path / "in" / "notes.wav").write_text("meeting notes, not a recording\n" * 5)
    for name in ("zero", "notes"):
        (tmp_path / "in" / f"{name}.txt").write_text("some words")
    done = prep("folder", str(tmp_path / "in"), "--out", str(tmp_path / "out"))
    assert done.returncode == 0 and done.stdout.startswith("kept 0, rejected 2 (empty_file: 1, not_audio: 1)")
    notes, zero = jsonl(tmp_path / "out" / "rejects.jsonl")
    assert "empty (0 bytes)" in zero["message"] and "not an audio file" in notes["message"]


def test_too_long_is_rejected_from_the_header_without_decoding(tmp_path, monkeypatch):
    long = tmp_path / "long.flac"
    sf.write(long, np.zeros(int(600 * 8000), np.int16), 8000, subtype="PCM_16")  # 10 minutes
    decoded = []
    monkeypatch.setattr(validate, "read_native", lambda *a, **k: decoded.append(a) or pytest.fail("decoded"))
    started = time.perf_counter()
    (rej,) = prepare([SourceRow({}, "long", str(long), "a b")], PrepOptions(), workers=1).rejects
    assert time.perf_counter() - started < 1.0 and not decoded
    assert rej.reason == "too_long" and "600.00 s" in rej.message
    assert "--max-seconds" in rej.message and "--segment" in rej.message


def test_too_long_through_the_cli_names_both_options(tmp_path):
    clip(tmp_path / "in", "long", "a b c", seconds=3.0)
    done = prep("folder", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--max-seconds", "2")
    (rej,) = jsonl(tmp_path / "out" / "rejects.jsonl")
    assert done.returncode == 0 and rej["reason"] == "too_long"
    assert "--max-seconds 2" in rej["message"] and "--segment" in rej["message"]


def test_usage_errors_exit_2_without_a_traceback(tmp_path):
    done = prep("folder", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"))
    assert done.returncode == 2 and "input not found" in done.stderr
    done = prep("folder", str(tmp_path), "--out", str(tmp_path / "out"), "--timings", "sometimes")
    assert done.returncode == 2 and "invalid choice" in done.stderr


# ---- start-up ------------------------------------------------------------------------------------------------------

def test_prep_imports_neither_torch_nor_transformers(tmp_path):
    clip(tmp_path / "in", "a", "some words")
    argv = ["folder", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--workers", "1"]
    code = (f"import sys\nfrom data_prep.cli import main\nassert main({argv!r}) == 0\n"
            "print(sorted(m for m in ('torch', 'transformers', 'datasets', 'mistral_common') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[]"
    started = time.perf_counter()
    assert prep("--help").returncode == 0
    assert time.perf_counter() - started < 3.0  # ~0.3 s idle; generous for a loaded 2-core CI machine


# ---- training: every bad input refused before the model loads, through `voxtral-train` ------------------------------

FAST_TRAIN = ["train.max_steps=3", "train.warmup_steps=1", "train.eval_every=0", "train.save_every=0",
              "train.log_every=1", "logging.progress_bar=false", "logging.tensorboard=false"]


def train_cli(cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    done = subprocess.run(["voxtral-train", *overrides], capture_output=True, text=True, cwd=cwd, timeout=900)
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return done


def timed_row(uid: str, audio: Path, seconds: float = 1.0) -> dict:
    return {"id": uid, "audio": str(audio), "text": "one two",
            "words": [{"word": "one", "start": 0.2, "end": 0.4}, {"word": "two", "start": 0.5, "end": seconds - 0.2}]}


BAD_RUNS = {
    "missing_manifest": ([], "no such file"),
    "empty_manifest": ([""], "has no rows"),
    "every_row_bad": (["{oops", {"id": "g", "audio": "gone.wav", "text": "x"}],
                      "none of the 2 rows of data.train_manifest"),
    "untimed": ([{"id": "u", "audio": "a.wav", "text": "one two"}], "1 of 1 rows have no word timings"),
    "budget_below_longest_clip": ([timed_row("t", Path("a.wav"))], "data.max_positions_per_batch=50: the longest item"),
    "resume_not_a_checkpoint": ([timed_row("t", Path("a.wav"))], "train.resume="),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", BAD_RUNS)
def test_bad_training_inputs_exit_2_with_one_message_and_no_run_folder(tmp_path, case):
    rows, expected = BAD_RUNS[case]
    clip(tmp_path, "a", None)
    manifest = tmp_path / "m.jsonl"
    if case != "missing_manifest":
        manifest.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    overrides = ["data=manifest", f"data.train_manifest={manifest}", f"train.output_root={tmp_path / 'runs'}",
                 *FAST_TRAIN]
    overrides += {"budget_below_longest_clip": ["data.max_positions_per_batch=50"],
                  "resume_not_a_checkpoint": [f"train.resume={tmp_path}"]}.get(case, [])
    done = train_cli(tmp_path, *overrides)
    assert done.returncode == 2 and expected in done.stderr, done.stderr[-3000:]
    assert done.stderr.startswith("voxtral-train: the run cannot start (nothing was loaded)")
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_the_documented_path_folder_prep_train_on_untimed_transcripts(tmp_path):
    """README 'Your own data', run as written on bundled clips given plain .txt transcripts (no word times)."""
    import re
    import shlex
    import shutil

    section = (ROOT / "README.md").read_text().split("## Your own data", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    commands = [shlex.split(line.split("  #")[0]) for line in block.splitlines() if line.strip()]
    assert [c[0] for c in commands] == ["voxtral-prep", "voxtral-train"]
    for utt in read_manifest("bundled:train")[:8]:
        target = tmp_path / "my_clips" / Path(utt.audio).name
        target.parent.mkdir(exist_ok=True)
        shutil.copy(utt.audio, target)
        target.with_suffix(".txt").write_text(utt.text + "\n")
    prep_done = subprocess.run(commands[0], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert prep_done.returncode == 0 and "Traceback" not in prep_done.stderr, prep_done.stderr
    assert prep_done.stdout.splitlines()[:2] == ["kept 8, rejected 0", "timings: heuristic 8"]
    done = train_cli(tmp_path, *commands[1][1:], *FAST_TRAIN)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "runs" / "mine" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert train_rows and train_rows[-1]["step"] == 3 and all(r["skipped_items"] == 0 for r in train_rows)
    assert (tmp_path / "runs" / "mine" / "final").is_dir()
