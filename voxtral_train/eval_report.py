"""Evaluation report files: `report.json`, `report.md`, `errors.jsonl` and two PNG plots.

Input: a list of model results as `evaluate.evaluate_model` returns them, one per evaluated model:

    {"model": name, "n_utterances": N,
     "delays": [{"delay_ms", "delay_tokens", "wer_raw", "wer_norm", "cer_raw", "cer_norm", "blank_rate",
                 "offset_p50_s", "offset_p90_s", "latency_p50_s", "latency_p90_s", "n_timed_words",
                 "audio_seconds", "decode_seconds", "x_real_time", "by_language": {lang: {...}}}, ...],
     "utterances": [{"delay_ms", "id", "reference", "hypothesis", ..., "words": [[word, emitted_s]]}, ...],
     "skipped": [[id, why], ...]}   (clips a run's eval left out: their audio no longer reads)

`report.json` holds everything but the per-utterance rows, which go to `errors.jsonl` (one line per model, delay
and utterance, worst first within each model and delay). A training run's `summary.md` (`write_run_summary`)
links to the report of its final evaluation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

PLOT_WER = "wer_vs_delay.png"
PLOT_LATENCY = "latency_hist.png"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _sec(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def markdown_table(results: Sequence[dict[str, Any]]) -> str:
    """Models x delays: WER raw/norm, CER, blank-rut rate, latency p50/p90, decode speed."""
    lines = [
        "| model | delay ms | WER raw % | WER norm % | CER norm % | blank rut % | latency p50 / p90 s | × real time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        for d in result["delays"]:
            lines.append(
                f"| {result['model']} | {d['delay_ms']} | {_pct(d['wer_raw'])} | {_pct(d['wer_norm'])} | "
                f"{_pct(d['cer_norm'])} | {_pct(d['blank_rate'])} | "
                f"{_sec(d['latency_p50_s'])} / {_sec(d['latency_p90_s'])} | {d['x_real_time']:.1f} |"
            )
    return "\n".join(lines)


def markdown_report(results: Sequence[dict[str, Any]], settings: dict[str, Any]) -> str:
    languages = sorted({lang for r in results for d in r["delays"] for lang in d["by_language"]})
    parts = [
        "# Evaluation",
        "",
        f"Manifest: `{settings.get('manifest', '?')}`, {results[0]['n_utterances'] if results else 0} utterances. "
        "Greedy streaming decode, one token per 80 ms.",
        "",
        markdown_table(results),
        "",
        "- WER norm / CER norm: text normalised (`voxtral_train.scoring`: English or basic, by language); raw: as "
        "written. Corpus rates (all errors / all reference words).",
        "- blank rut: utterances with speech in the reference whose decode has no text.",
        "- latency: time from a word's reference end to the moment a live stream emits its [STREAMING_WORD] "
        "(offset on the audio axis + the delay), over words matched by alignment; needs word times in the manifest.",
        "- × real time: audio seconds decoded per wall-clock second (features + batched decode).",
    ]
    if len(languages) > 1:
        parts += ["", "## Normalised WER % per language", "",
                  "| model | delay ms | " + " | ".join(languages) + " |",
                  "|---|---|" + "---|" * len(languages)]
        for r in results:
            for d in r["delays"]:
                cells = [_pct(d["by_language"].get(lang, {}).get("wer_norm")) for lang in languages]
                parts.append(f"| {r['model']} | {d['delay_ms']} | " + " | ".join(cells) + " |")
    parts += ["", f"![WER vs delay]({PLOT_WER})", "", f"![latency]({PLOT_LATENCY})", ""]
    return "\n".join(parts)


def plot_wer_vs_delay(results: Sequence[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        delays = [d["delay_ms"] for d in r["delays"]]
        line = ax.plot(delays, [100 * (d["wer_norm"] or 0) for d in r["delays"]], "o-", label=f"{r['model']} (norm)")
        ax.plot(delays, [100 * (d["wer_raw"] or 0) for d in r["delays"]], "x--", color=line[0].get_color(),
                alpha=0.6, label=f"{r['model']} (raw)")
    ax.set_xlabel("delay (ms)")
    ax.set_ylabel("WER (%)")
    ax.set_title("WER vs delay")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_latency(results: Sequence[dict[str, Any]], path: Path) -> None:
    """Histogram of per-word latency (offset + delay) for every model and delay."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = False
    for r in results:
        for d in r["delays"]:
            values = [x + d["delay_ms"] / 1000 for u in r["utterances"] if u["delay_ms"] == d["delay_ms"]
                      for x in u["offsets"]]
            if values:
                ax.hist(values, bins=30, alpha=0.5, label=f"{r['model']} @ {d['delay_ms']} ms")
                drawn = True
    if not drawn:
        ax.text(0.5, 0.5, "no word times in the manifest\n(or no word matched)", ha="center", va="center",
                transform=ax.transAxes)
    else:
        ax.legend(fontsize=8)
    ax.set_xlabel("latency after the word ends (s)")
    ax.set_ylabel("words")
    ax.set_title("Word emission latency")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _worst_first(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda u: (-u["words_norm"]["errors"], u["id"]))


def write_report(out_dir: str | Path, results: Sequence[dict[str, Any]], settings: dict[str, Any]) -> Path:
    """Write the four kinds of report file into `out_dir` (created); returns the path of report.md."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"settings": settings,
               "models": [{k: v for k, v in r.items() if k != "utterances"} for r in results]}
    (out / "report.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    with open(out / "errors.jsonl", "w") as f:
        for r in results:
            for d in r["delays"]:
                rows = [u for u in r["utterances"] if u["delay_ms"] == d["delay_ms"]]
                for row in _worst_first(rows):
                    f.write(json.dumps({"model": r["model"], **row}, ensure_ascii=False) + "\n")
    plot_wer_vs_delay(results, out / PLOT_WER)
    plot_latency(results, out / PLOT_LATENCY)
    path = out / "report.md"
    path.write_text(markdown_report(results, settings))
    return path


def write_run_summary(run_dir: Path, *, name: str, model: str, peft_mode: str, zero_stage: int, step: int,
                      max_steps: int, audio_seconds_seen: float, first_loss: float | None, last_loss: float | None,
                      final_wer: float | None, final_eval_split: str, stopped: str | None) -> None:
    """`<run>/summary.md`: what ran, how far, the loss from first to last step, the final WER and where to look."""
    lines = [
        f"# Run `{name}`",
        "",
        f"- model: `{model}`, parameters: `{peft_mode}`, DeepSpeed ZeRO stage {zero_stage or 'off'}",
        f"- steps: {step} / {max_steps}, audio seen: {audio_seconds_seen / 3600:.3f} h",
    ]
    if first_loss is not None and last_loss is not None:
        lines.append(f"- training loss: {first_loss:.4f} (first step) -> {last_loss:.4f} (last step)")
    if final_wer is not None:
        lines.append(f"- final WER on the {final_eval_split} manifest: {100 * final_wer:.1f}% "
                     f"([report](eval/report.md), [per utterance](eval/errors.jsonl))")
    if stopped:
        lines.append(f"- **stopped early**: {stopped}")
    if final_wer is not None:
        lines += ["", f"![WER vs delay](eval/{PLOT_WER}) ![latency](eval/{PLOT_LATENCY})"]
    lines += ["", f"Training curves: `voxtral-train plot {run_dir}` draws [loss](plots/loss.png), "
              "[learning rate](plots/lr.png) and [eval WER](plots/wer.png).",
              "", "Files: `config.yaml` (resolved settings), `metrics.jsonl`, `checkpoints/step_NNNNNN/`, "
              "`final/` (weights to export), `tensorboard/`.", ""]
    (run_dir / "summary.md").write_text("\n".join(lines))
