"""`voxtral-export`: turn training outputs into folders that transformers and vLLM load.

    voxtral-export merge   --base SOURCE --adapter RUN/ckpt --out merged/          # LoRA (+ extra) -> HF folder
    voxtral-export mistral --model runs/NAME --out served/                        # full FT run -> vLLM folder
    voxtral-export mistral --model merged/ --out served/                          # HF / Mistral folder -> vLLM
    voxtral-export adapter --adapter RUN/ckpt --out lora_vllm/                    # decoder LoRA -> vLLM adapter
    voxtral-export check   served/ [--reference BASE_MISTRAL_DIR]                  # validate any of the above

Every step runs `voxtral_train.export_checks` on what it wrote and fails (exit 1) when the checker finds a problem.
Every argument is checked before anything is written. `mistral` writes the delay the run trained at (read from the
`config.yaml` a run leaves in `final/`, its checkpoints and `merge`'s output); a run that trained several delays,
or a folder without a run config, needs `--delay-ms`. Written files are world-readable (0644).

Adapter folders written by training (`voxtral_train.trainable.save_trainable`) hold PEFT's `adapter_model.safetensors`
and, when some modules were trained fully (projector, encoder), `extra_trainable.safetensors` with full tensors under
HF names. `merge` loads those over the base first, then merges the LoRA.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import VoxtralRealtimeConfig

from voxtral_train import export_checks, protocol
from voxtral_train import mistral_format as mf
from voxtral_train.config import RUN_CONFIG_FILE
from voxtral_train.model import DTYPES
from voxtral_train.trainable import EXTRA_TRAINABLE_FILE, find_adapter_dir

# PEFT prefixes its keys with `base_model.model.` + the transformers module path; vLLM wants the Mistral-side
# module path `language_model.model.layers...` (the legacy transformers layout).
_PEFT_DECODER_PREFIX = "base_model.model.model.language_model.layers."
_VLLM_DECODER_PREFIX = "base_model.model.language_model.model.layers."
_USE_MERGE = "use `voxtral-export merge` + `voxtral-export mistral` instead (serve the merged model)"


class ExportError(ValueError):
    pass


def _fail_on_problems(path: Path, reference: Path | None = None) -> export_checks.CheckReport:
    report = export_checks.check_folder(path, reference)
    print(report.format())
    if not report.ok:
        raise ExportError(f"{path} failed its check; see the problems above")
    return report


def _refuse_weights_in(out: Path) -> None:
    stale = (mf.stale_weight_files(out) + sorted(out.glob(export_checks.ADAPTER_WEIGHTS))) if out.exists() else []
    if stale:
        raise ExportError(f"{out} already holds weights {[f.name for f in stale]}; write into an empty folder")


# ---------------------------------------------------------------------------------------------------------------
# merge


def load_extra_trainable(model: torch.nn.Module, adapter_dir: Path) -> list[str]:
    """Load `extra_trainable.safetensors` (full tensors, HF names) over `model`; returns the names loaded."""
    path = adapter_dir / EXTRA_TRAINABLE_FILE
    if not path.is_file():
        return []
    params = dict(model.named_parameters(remove_duplicate=False))
    extra = {mf.hf_canonical_name(k.replace(".base_layer.", ".")): v for k, v in load_file(str(path)).items()}
    unknown = sorted(set(extra) - set(params))
    if unknown:
        raise ExportError(f"{path}: tensors {unknown[:10]} are not parameters of the base model")
    with torch.no_grad():
        for name, tensor in extra.items():
            if params[name].shape != tensor.shape:
                raise ExportError(f"{path}: {name} has shape {list(tensor.shape)}, the base has {list(params[name].shape)}")
            params[name].copy_(tensor)
    return sorted(extra)


def merge_adapter(model: torch.nn.Module, adapter_dir: str | Path) -> torch.nn.Module:
    """Base model + extra trainable tensors + PEFT LoRA -> a plain transformers model with the LoRA folded in."""
    from peft import PeftModel

    adapter_dir = find_adapter_dir(adapter_dir)
    load_extra_trainable(model, adapter_dir)
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    head, embed = merged.lm_head.weight, merged.get_input_embeddings().weight
    if head is not embed:
        raise ExportError("merging untied lm_head from the embeddings; the Mistral format cannot store an untied head")
    return merged


def cmd_merge(args: argparse.Namespace) -> None:
    from voxtral_train.model import load_model

    out = Path(args.out)
    _refuse_weights_in(out)
    try:
        adapter_dir = find_adapter_dir(args.adapter)
    except FileNotFoundError as err:
        raise ExportError(str(err)) from None
    model, tokenizer = load_model(args.base, dtype=args.dtype)
    merged = merge_adapter(model, adapter_dir)
    merged.save_pretrained(out, safe_serialization=True)
    shutil.copyfile(tokenizer.tekken_path, out / mf.TEKKEN_FILE)  # lets `mistral` find the tokenizer by itself
    run_config = _run_config_path(adapter_dir)
    if run_config is not None:  # the delay (and the rest of the run's settings) travel on to `mistral`
        shutil.copyfile(run_config, out / RUN_CONFIG_FILE)
    mf.make_world_readable(out)
    _fail_on_problems(out)
    print(f"merged model written to {out}; next: voxtral-export mistral --model {out} --out SERVE_DIR")


# ---------------------------------------------------------------------------------------------------------------
# mistral


def read_hf_folder(path: str | Path) -> tuple[VoxtralRealtimeConfig, dict[str, torch.Tensor]]:
    """config.json + model*.safetensors -> (config, state dict under `state_dict()` names), no model instance."""
    path = Path(path)
    config = VoxtralRealtimeConfig.from_pretrained(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = [path / "model.safetensors"]
    sd = {}
    for f in files:
        if not f.is_file():
            raise ExportError(f"{path}: weight file {f.name} is missing")
        with safe_open(str(f), framework="pt") as handle:
            sd.update({mf.hf_canonical_name(k): handle.get_tensor(k) for k in handle.keys()})
    return config, sd


def vllm_serve_command(model_dir: Path) -> str:
    return (
        f"vllm serve {model_dir} --tokenizer-mode mistral --config-format mistral --load-format mistral "
        "--enforce-eager"
    )


def _run_config_path(folder: Path) -> Path | None:
    """The run's `config.yaml` for a run's final/, a checkpoint, its adapter/ or a merged folder."""
    for candidate in (folder / RUN_CONFIG_FILE, folder.parent / RUN_CONFIG_FILE):
        if candidate.is_file():
            return candidate
    return None


def resolve_model_dir(path: Path) -> Path:
    """`--model`: an HF folder, a Mistral folder, or a run folder (its final/ when that holds a whole model)."""
    for candidate in (path, path / "final"):
        if (candidate / "config.json").is_file() or (candidate / mf.PARAMS_FILE).is_file():
            return candidate
        if (candidate / export_checks.ADAPTER_CONFIG).is_file():
            raise ExportError(f"{candidate} holds a LoRA adapter, not a whole model: merge it first "
                              f"(voxtral-export merge --base BASE --adapter {path} --out MERGED), then export "
                              f"MERGED, or serve the adapter (voxtral-export adapter)")
    raise ExportError(f"{path} is neither an HF folder (config.json), a Mistral folder ({mf.PARAMS_FILE}) nor a run "
                      f"folder with final/")


def serving_delay_ms(model_dir: Path, asked: int | None) -> tuple[int, str]:
    """(delay, where it came from): --delay-ms, else the single delay the run trained at, else the delay already in
    a Mistral folder's tekken.json. A run that trained several delays must choose one."""
    if asked is not None:
        return asked, "--delay-ms"
    run_config = _run_config_path(model_dir)
    if run_config is not None:
        delays = yaml.safe_load(run_config.read_text(encoding="utf-8")).get("data", {}).get("delays_ms") or []
        if len(delays) == 1:
            return int(delays[0]), f"the run's training delay ({run_config})"
        raise ExportError(f"the run trained at several delays {delays} ms ({run_config}): pass --delay-ms with the "
                          f"one to serve (one model serves them all; tekken.json holds the default)")
    if (model_dir / mf.PARAMS_FILE).is_file() and (model_dir / mf.TEKKEN_FILE).is_file():
        audio = json.loads((model_dir / mf.TEKKEN_FILE).read_text(encoding="utf-8")).get("audio") or {}
        if audio.get("transcription_delay_ms"):
            return int(audio["transcription_delay_ms"]), f"{model_dir / mf.TEKKEN_FILE}"
    raise ExportError(f"{model_dir} carries no training config ({RUN_CONFIG_FILE}) to read the delay from: pass "
                      f"--delay-ms (the delay the model was trained for; {protocol.DEFAULT_DELAY_MS} ms is the "
                      f"released default)")


def cmd_mistral(args: argparse.Namespace) -> None:
    # Every argument is checked before anything is written: a failure leaves no half-written folder.
    model_dir, out = resolve_model_dir(Path(args.model)), Path(args.out)
    tekken = Path(args.base_tekken) if args.base_tekken else model_dir / mf.TEKKEN_FILE
    if not tekken.is_file():
        raise ExportError(f"tokenizer {tekken} not found: pass --base-tekken (the base model's tekken.json)")
    if args.reference and not (Path(args.reference) / mf.PARAMS_FILE).is_file():
        raise ExportError(f"--reference {args.reference} is not a Mistral folder (no {mf.PARAMS_FILE})")
    if args.shard_gb <= 0:
        raise ExportError(f"--shard-gb must be > 0, got {args.shard_gb}")
    delay_ms, source = serving_delay_ms(model_dir, args.delay_ms)
    _refuse_weights_in(out)
    if (model_dir / mf.PARAMS_FILE).is_file():
        config, sd = mf.read_mistral_folder(model_dir)
    else:
        config, sd = read_hf_folder(model_dir)
    mf.write_mistral_folder(out, config, sd, tekken, delay_ms, dtype=DTYPES[args.dtype],
                            shard_bytes=int(args.shard_gb * 1024**3))
    _fail_on_problems(out, Path(args.reference) if args.reference else None)
    print(f"serving delay {delay_ms} ms, from {source}")
    print(f"Mistral-format model written to {out}. Serve it with:\n  {vllm_serve_command(out)}")


# ---------------------------------------------------------------------------------------------------------------
# adapter


def vllm_adapter_key(peft_key: str) -> str:
    """PEFT key of the transformers model -> the key vLLM maps onto its decoder; refuses everything else."""
    key = peft_key
    if key.startswith(_PEFT_DECODER_PREFIX):
        key = _VLLM_DECODER_PREFIX + key[len(_PEFT_DECODER_PREFIX) :]
    if not export_checks.VLLM_LORA_KEY.fullmatch(key):
        where = "audio encoder" if "audio_tower" in key else "a module vLLM's LoRA does not cover"
        raise ExportError(f"adapter key {peft_key} belongs to {where}: {_USE_MERGE}")
    return key


def vllm_adapter_config(peft_config: dict, source: Path) -> dict:
    """The fields vLLM reads; refuses what vLLM would reject or silently drop."""
    refusals = export_checks.adapter_config_problems(peft_config)
    if (source / EXTRA_TRAINABLE_FILE).is_file():
        refusals.append(f"{EXTRA_TRAINABLE_FILE}: fully trained encoder/projector weights")
    if refusals:
        raise ExportError(f"{source}: {'; '.join(refusals)}; {_USE_MERGE}")
    return {
        "peft_type": "LORA",
        "r": peft_config["r"],
        "lora_alpha": peft_config["lora_alpha"],
        "use_rslora": bool(peft_config.get("use_rslora", False)),
        "bias": "none",
        "base_model_name_or_path": peft_config.get("base_model_name_or_path"),
    }


def convert_adapter(adapter_dir: str | Path, out: str | Path) -> dict:
    """PEFT LoRA folder -> vLLM LoRA folder. Returns the written adapter_config."""
    adapter_dir, out = find_adapter_dir(adapter_dir), Path(out)
    peft_config = json.loads((adapter_dir / export_checks.ADAPTER_CONFIG).read_text())
    config = vllm_adapter_config(peft_config, adapter_dir)
    tensors = {vllm_adapter_key(k): v.contiguous() for k, v in load_file(str(adapter_dir / export_checks.ADAPTER_WEIGHTS)).items()}
    # leaf module names present, e.g. ["down_proj", "gate_proj", ...]
    config["target_modules"] = sorted({k.split(".")[-3] for k in tensors})
    _refuse_weights_in(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / export_checks.ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (out / export_checks.ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    mf.make_world_readable(out)
    return config


def vllm_lora_command(out: Path, rank: int, name: str) -> str:
    return (
        f"vllm serve BASE_MISTRAL_DIR --tokenizer-mode mistral --config-format mistral --load-format mistral "
        f"--enforce-eager --enable-lora --lora-modules {name}={out} --max-lora-rank {rank} "
        "--lora-target-modules qkv_proj o_proj gate_up_proj down_proj"
    )


def cmd_adapter(args: argparse.Namespace) -> None:
    out = Path(args.out)
    config = convert_adapter(args.adapter, out)
    _fail_on_problems(out)
    print(
        f"vLLM adapter written to {out}. The realtime WebSocket path passes no LoRA request; for realtime serving "
        f"merge instead. Serve it with:\n  {vllm_lora_command(out, config['r'], args.name)}"
    )


# ---------------------------------------------------------------------------------------------------------------
# check + CLI


def cmd_check(args: argparse.Namespace) -> None:
    _fail_on_problems(Path(args.dir), Path(args.reference) if args.reference else None)


def _delay_ms(text: str) -> int:
    try:
        protocol.delay_ms_to_tokens(int(text))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="voxtral-export", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("merge", help="base + PEFT LoRA (+ extra_trainable) -> merged HF-format folder")
    p.add_argument("--base", required=True, help="base model: 'tiny', an HF folder or a Mistral folder")
    p.add_argument("--adapter", required=True, help="folder with adapter_model.safetensors (+ extra_trainable)")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype the merge is computed and saved in")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("mistral", help="HF-format folder -> Mistral-format folder for vLLM")
    p.add_argument("--model", required=True, help="a full fine-tune's run folder, an HF-format folder (e.g. the output "
                   "of merge) or a Mistral-format folder (to re-export, e.g. at another delay)")
    p.add_argument("--base-tekken", help="tekken.json to ship (default: the one in --model)")
    p.add_argument("--delay-ms", type=_delay_ms, default=None,
                   help="serving delay written to tekken.json audio.transcription_delay_ms (a positive multiple of "
                        "80); default: the delay the run trained at")
    p.add_argument("--out", required=True)
    p.add_argument("--shard-gb", type=float, default=mf.DEFAULT_SHARD_BYTES / 1024**3,
                   help="split consolidated.safetensors into shards above this size")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--reference", help="Mistral folder of the base model: also checks the q/k RoPE order")
    p.set_defaults(func=cmd_mistral)

    p = sub.add_parser("adapter", help="decoder-only PEFT LoRA -> vLLM LoRA adapter folder")
    p.add_argument("--adapter", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--name", default="voxtral-lora", help="adapter name in the printed vllm command")
    p.set_defaults(func=cmd_adapter)

    p = sub.add_parser("check", help="validate an exported folder (Mistral, vLLM adapter or HF)")
    p.add_argument("dir")
    p.add_argument("--reference", help="Mistral folder of the base model: also checks the q/k RoPE order")
    p.set_defaults(func=cmd_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ExportError, mf.MistralFormatError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
