"""evaluate_model, the report files, the voxtral-eval CLI and its probe-anchor mode, on the bundled eval clips."""

import json

import pytest
import torch

from voxtral_train import evaluate, protocol
from voxtral_train.audio import load_audio
from voxtral_train.decode import words_with_times
from voxtral_train.evaluate import evaluate_model, main
from voxtral_train.features import log_mel, pad_audio
from voxtral_train.manifest import bundled_manifest_path, read_manifest
from voxtral_train.eval_report import PLOT_LATENCY, PLOT_WER
from voxtral_train.targets import build_targets

DELAY_KEYS = {"delay_ms", "delay_tokens", "wer_raw", "wer_norm", "cer_raw", "cer_norm", "blank_rate", "n_timed_words",
              "offset_p50_s", "offset_p90_s", "latency_p50_s", "latency_p90_s", "audio_seconds", "decode_seconds",
              "x_real_time", "by_language", "n_utterances"}


@pytest.fixture(scope="module")
def clips():
    return read_manifest(bundled_manifest_path("eval"))[:3]


def _assert_png(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_model_writes_a_consistent_report(tiny, clips, tmp_path):
    model, tokenizer = tiny()
    model.train()
    result = evaluate_model(model, tokenizer, clips, [240, 480], out_dir=tmp_path, progress=False, name="tiny")
    assert model.training, "evaluate_model must restore the training mode"
    assert [d["delay_ms"] for d in result["delays"]] == [240, 480]
    assert set(result["delays"][0]) == DELAY_KEYS
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["models"][0]["delays"] == json.loads(json.dumps(result["delays"]))
    rows = [json.loads(line) for line in (tmp_path / "errors.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * len(clips)
    assert {"model", "delay_ms", "id", "reference", "hypothesis", "words_norm", "chars_norm", "blank", "offsets",
            "words"} <= set(rows[0])
    for d in result["delays"]:  # the corpus WER is the pooled count of the per-utterance rows
        mine = [r for r in rows if r["delay_ms"] == d["delay_ms"]]
        pooled = sum(r["words_norm"]["errors"] for r in mine) / sum(r["words_norm"]["ref"] for r in mine)
        assert d["wer_norm"] == pytest.approx(pooled)
    markdown = (tmp_path / "report.md").read_text()
    assert "| tiny | 240 |" in markdown and "| tiny | 480 |" in markdown
    _assert_png(tmp_path / PLOT_WER)
    _assert_png(tmp_path / PLOT_LATENCY)


def test_a_perfect_decode_scores_zero_with_latency_within_one_frame_of_the_delay(tiny, clips, monkeypatch):
    """Wiring check: a decoder that emits exactly the training targets gets WER 0 and word latencies in
    (delay, delay + 80 ms], so references, word times and delays reach the metrics correctly."""
    model, tokenizer = tiny()
    delay_ms = 480
    delay = protocol.delay_ms_to_tokens(delay_ms)
    streams = []
    for utt in clips:
        samples = load_audio(utt.audio)
        targets = build_targets(utt.words, tokenizer, len(samples), delay)
        assert targets.extra_right_pad == 0
        streams.append((log_mel(pad_audio(samples, delay)),
                        targets.input_ids[protocol.prompt_length(delay) : targets.eos_position + 1]))

    def perfect(model, tokenizer, features, n_positions, delay_tokens):
        out = []
        for row, n in zip(features, n_positions):
            (emitted,) = [ids for f, ids in streams if f.shape[1] == 8 * n and torch.equal(f, row[:, : 8 * n])]
            out.append(evaluate.Decoded(tokenizer.decode(emitted), emitted,
                                        words_with_times(tokenizer, emitted, delay_tokens), delay_tokens))
        return out

    monkeypatch.setattr(evaluate, "greedy_decode", perfect)
    result = evaluate_model(model, tokenizer, clips, [delay_ms], progress=False)
    d = result["delays"][0]
    assert d["wer_raw"] == 0 and d["wer_norm"] == 0 and d["cer_norm"] == 0 and d["blank_rate"] == 0
    assert d["n_timed_words"] == sum(len(u.words) for u in clips)
    latencies = [x + delay_ms / 1000 for u in result["utterances"] for x in u["offsets"]]
    # Words that follow another word's pieces without their own marker are timed at that marker, i.e. earlier.
    assert all(x <= delay_ms / 1000 + protocol.POSITION_SECONDS + 1e-6 for x in latencies)
    assert delay_ms / 1000 < d["latency_p50_s"] <= delay_ms / 1000 + protocol.POSITION_SECONDS


def test_cli_compares_models_and_writes_files(tmp_path, capsys):
    manifest = str(bundled_manifest_path("eval"))
    assert main(["--model", "tiny", "--model", "tiny", "--manifest", manifest, "--delays", "480",
                 "--out", str(tmp_path), "--limit", "2"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("| tiny | 480 |") == 2
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["settings"]["limit"] == 2 and len(report["models"]) == 2
    assert report["models"][0]["n_utterances"] == 2
    with pytest.raises(SystemExit):
        main(["--model", "tiny", "--manifest", manifest, "--delays", "500", "--out", str(tmp_path)])


def test_probe_anchor_cli(tmp_path, capsys):
    manifest = str(bundled_manifest_path("eval"))
    assert main(["probe-anchor", "--model", "tiny", "--manifest", manifest, "--delay", "480",
                 "--out", str(tmp_path), "--limit", "2"]) == 0
    payload = json.loads((tmp_path / "probe_anchor.json").read_text())
    combos = [(r["anchor"], r["offset_frames"]) for r in payload["rows"]]
    assert combos == [(a, o) for a in ("end", "start") for o in (-2, -1, 0, 1, 2)]
    losses = [r["loss"] for r in payload["rows"]]
    assert len(set(losses)) > 1, "different anchors place words differently, so the losses differ"
    assert payload["lowest"]["loss"] == min(losses)
    assert "(lowest)" in capsys.readouterr().out
