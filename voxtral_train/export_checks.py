"""`voxtral-export check DIR`: validate an exported folder against the rules its loader applies, before anyone serves it.

Three kinds, detected from the files present:
- mistral (params.json): what `vllm serve DIR --tokenizer-mode mistral --config-format mistral --load-format mistral`
  loads. Checks the file set, params.json keys, every tensor's name/shape/dtype against the config, the tensor count
  (711 for the released config), tekken.json and its `audio` section, and stale weight files beside.
- adapter (adapter_config.json): a LoRA adapter for vLLM's `--lora-modules`. Checks the key pattern vLLM maps onto
  the decoder, ranks, and the config fields vLLM rejects.
- hf (config.json): a transformers folder (`save_pretrained`, the legacy or the current layout).

What the checker cannot see from one folder: whether q/k rows are in Mistral (interleaved) or HF (rotate-half) order.
Both orders have identical names, shapes and dtypes. Give `reference=` (a Mistral folder of the model this one was
fine-tuned from) and it compares every RoPE-permuted tensor (q and k of every decoder and encoder layer, and the
encoder's q bias) with the reference as written, with the HF permutation undone, and with it applied once more:
fine-tuning moves weights a little, a skipped or doubled permutation moves them a lot.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from voxtral_train import mistral_format as mf
from voxtral_train import protocol
from voxtral_train.trainable import EXTRA_TRAINABLE_FILE

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
VLLM_LORA_KEY = re.compile(
    r"base_model\.model\.language_model\.model\.layers\.(\d+)\."
    r"(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)\.lora_(A|B)\.weight"
)
_FLOAT_DTYPES = {"BF16", "F16", "F32"}


@dataclass
class CheckReport:
    path: Path
    kind: str
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        head = f"{self.path} ({self.kind}): " + ("OK" if self.ok else f"{len(self.problems)} problem(s)")
        return "\n".join([head, *(f"  PROBLEM: {p}" for p in self.problems), *(f"  note: {n}" for n in self.notes)])


def detect_kind(path: Path) -> str:
    for marker, kind in ((mf.PARAMS_FILE, "mistral"), (ADAPTER_CONFIG, "adapter"), ("config.json", "hf")):
        if (path / marker).is_file():
            return kind
    return "unknown"


def check_folder(path: str | Path, reference: str | Path | None = None) -> CheckReport:
    path = Path(path)
    kind = detect_kind(path) if path.is_dir() else "missing"
    report = CheckReport(path, kind)
    if kind == "missing":
        report.problems.append(f"{path} is not a directory")
    elif kind == "unknown":
        report.problems.append(f"no {mf.PARAMS_FILE}, {ADAPTER_CONFIG} or config.json: not an exported folder")
    else:
        {"mistral": _check_mistral, "adapter": _check_adapter, "hf": _check_hf}[kind](path, report, reference)
    return report


# ---------------------------------------------------------------------------------------------------------------
# shared helpers


def _load_json(file: Path, report: CheckReport) -> dict | None:
    if not file.is_file():
        report.problems.append(f"{file.name} is missing")
        return None
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        report.problems.append(f"{file.name} is not valid JSON: {err}")
        return None


def _headers(files: list[Path]) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, safetensors dtype) without reading tensor data."""
    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            for key in handle.keys():
                sl = handle.get_slice(key)
                out[key] = (tuple(sl.get_shape()), sl.get_dtype())
    return out


def _compare_tensors(
    have: dict[str, tuple[tuple[int, ...], str]], want: dict[str, tuple[int, ...]], report: CheckReport
) -> None:
    for name in sorted(set(want) - set(have)):
        report.problems.append(f"missing tensor {name}")
    for name in sorted(set(have) - set(want)):
        report.problems.append(f"unexpected tensor {name}")
    for name in sorted(set(have) & set(want)):
        if have[name][0] != want[name]:
            report.problems.append(f"tensor {name} has shape {list(have[name][0])}, the config needs {list(want[name])}")
    dtypes = sorted({dtype for _, dtype in have.values()})
    if set(dtypes) - _FLOAT_DTYPES or len(dtypes) > 1:
        report.problems.append(f"tensor dtypes {dtypes}: expected one floating dtype (BF16)")
    elif dtypes and dtypes != ["BF16"]:
        report.notes.append(f"tensors are {dtypes[0]}, the released checkpoint is BF16")
    if len(have) != len(want):
        report.problems.append(f"{len(have)} tensors, the config needs {len(want)}")


# ---------------------------------------------------------------------------------------------------------------
# mistral


def _key_paths(d: dict, prefix: str = "") -> set[str]:
    keys = set()
    for k, v in d.items():
        keys.add(prefix + k)
        if isinstance(v, dict):
            keys |= _key_paths(v, f"{prefix}{k}.")
    return keys


def _check_tekken(path: Path, params: dict | None, report: CheckReport) -> None:
    """tekken.json: its vocabulary fits the model, and its `audio` section agrees with params.json and with the
    streaming protocol this trainer (and vLLM) build the stream with."""
    tekken = _load_json(path / mf.TEKKEN_FILE, report)
    if tekken is None:
        return
    vocab_size = params.get("vocab_size") if params else None
    n_tokens = tekken.get("config", {}).get("default_vocab_size")
    if isinstance(n_tokens, int) and isinstance(vocab_size, int) and n_tokens > vocab_size:
        report.problems.append(f"{mf.TEKKEN_FILE} has {n_tokens} tokens, params.json vocab_size is {vocab_size}")
    audio = tekken.get("audio")
    if not audio:
        report.problems.append(f"{mf.TEKKEN_FILE} has no 'audio' section: vLLM cannot build the streaming encoder")
        return
    delay = audio.get("transcription_delay_ms")
    try:
        protocol.delay_ms_to_tokens(float(delay))
    except (TypeError, ValueError):
        report.problems.append(f"{mf.TEKKEN_FILE} audio.transcription_delay_ms={delay!r}: needs a positive multiple "
                               f"of {protocol.POSITION_MS} ms")
    encoding = audio.get("audio_encoding_config") or {}
    args = ((params or {}).get("multimodal", {}).get("whisper_model_args", {}).get("encoder_args", {})
            .get("audio_encoding_args", {}))
    expected = {  # tekken.json field -> (its value, what the protocol needs, params.json's value or None)
        "sampling_rate": (audio.get("sampling_rate"), protocol.SAMPLE_RATE, args.get("sampling_rate")),
        "frame_rate": (audio.get("frame_rate"), protocol.FRAME_RATE, args.get("frame_rate")),
        "streaming_n_left_pad_tokens": (audio.get("streaming_n_left_pad_tokens"), protocol.N_LEFT_PAD_TOKENS, None),
        "audio_encoding_config.num_mel_bins": (encoding.get("num_mel_bins"), protocol.NUM_MEL_BINS,
                                               args.get("num_mel_bins")),
        "audio_encoding_config.hop_length": (encoding.get("hop_length"), protocol.HOP_LENGTH, args.get("hop_length")),
        "audio_encoding_config.window_size": (encoding.get("window_size"), protocol.WINDOW_SIZE,
                                              args.get("window_size")),
    }
    for name, (value, protocol_value, params_value) in expected.items():
        if value != protocol_value:
            report.problems.append(f"{mf.TEKKEN_FILE} audio.{name}={value!r}: the streaming protocol needs "
                                   f"{protocol_value!r}")
        elif params_value is not None and params_value != value:
            report.problems.append(f"{mf.TEKKEN_FILE} audio.{name}={value!r} but params.json's audio_encoding_args "
                                   f"say {params_value!r}")


def _check_stale(path: Path, legit: set[str], report: CheckReport) -> None:
    for f in mf.stale_weight_files(path):
        if f.name not in legit:
            report.problems.append(f"stale weight file {f.name} beside the export: a loader may pick it up silently")


def _check_mistral(path: Path, report: CheckReport, reference: str | Path | None) -> None:
    params = _load_json(path / mf.PARAMS_FILE, report)
    _check_tekken(path, params, report)
    if params is None:
        return
    try:
        config = mf.config_from_params(params)
    except (mf.MistralFormatError, TypeError, ValueError) as err:
        report.problems.append(f"params.json: {err}")
        return
    for key in sorted(_key_paths(mf.params_from_config(config)) - _key_paths(params)):
        report.problems.append(f"params.json lacks key '{key}'")
    try:
        files = mf.weight_files(path)
    except mf.MistralFormatError as err:
        report.problems.append(str(err))
        return
    legit = {f.name for f in files} | ({mf.INDEX_FILE} if (path / mf.INDEX_FILE).is_file() else set())
    _check_stale(path, legit, report)
    have = _headers(files)
    if "output.weight" in have:
        report.problems.append("output.weight present: this model has tied embeddings, vLLM expects no output head")
    _compare_tensors(have, mf.expected_shapes(config), report)
    if reference is not None and report.ok:
        _check_rope_order(path, files, Path(reference), config, report)


def _rope_tensors(config) -> dict[str, int]:
    """Mistral name -> heads its rows are grouped by, for every RoPE-permuted tensor of the config."""
    return {name: heads for name, hf_name in mf.name_map(config).items()
            if (heads := mf.rope_heads_for(hf_name, config)) is not None}


def _read_tensor(files: list[Path], name: str) -> torch.Tensor:
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            if name in handle.keys():
                return handle.get_tensor(name).float()
    raise KeyError(name)


def _check_rope_order(path: Path, files: list[Path], reference: Path, config, report: CheckReport) -> None:
    """Each q/k tensor must be nearest to the reference as written: nearer after undoing the HF permutation means
    it was written in HF order; nearer after applying it once more means the permutation was applied twice."""
    ref_files = mf.weight_files(reference)
    for name, heads in _rope_tensors(config).items():
        w, ref = _read_tensor(files, name), _read_tensor(ref_files, name)
        if w.shape != ref.shape:
            report.problems.append(f"{name}: shape {list(w.shape)} differs from the reference's {list(ref.shape)}")
            continue
        as_is = (w - ref).norm().item()
        undone = (mf.unpermute_for_rope(w, heads) - ref).norm().item()
        redone = (mf.permute_for_rope(w, heads) - ref).norm().item()
        if undone < min(as_is, redone):
            report.problems.append(f"{name} matches the reference only after undoing the HF RoPE permutation: it was "
                                   "written in HF rotate-half order, vLLM needs Mistral interleaved order")
        elif redone < as_is:
            report.problems.append(f"{name} matches the reference only after one more RoPE permutation: the HF -> "
                                   "Mistral permutation was applied twice")
    report.notes.append(f"RoPE order compared with {reference} ({len(_rope_tensors(config))} q/k tensors)")


# ---------------------------------------------------------------------------------------------------------------
# adapter


def adapter_config_problems(cfg: dict) -> list[str]:
    """vLLM's rules for a LoRA adapter_config, as problems (empty when it serves). `voxtral-export adapter` refuses a
    PEFT config with any of them; `check` reports them in a written folder: one list for both."""
    rules = [
        (cfg.get("peft_type", "LORA") == "LORA", f"peft_type {cfg.get('peft_type')!r} is not LORA"),
        (cfg.get("r") in VLLM_LORA_RANKS, f"r={cfg.get('r')!r}: vLLM supports ranks {list(VLLM_LORA_RANKS)}"),
        (bool(cfg.get("lora_alpha")), "lora_alpha is missing"),
        (cfg.get("bias", "none") == "none", f"bias={cfg.get('bias')!r}: vLLM needs 'none'"),
        (not cfg.get("modules_to_save"), f"modules_to_save={cfg.get('modules_to_save')}: vLLM rejects it"),
        (not cfg.get("use_dora"), "use_dora=true: vLLM does not serve DoRA"),
        (not (cfg.get("rank_pattern") or cfg.get("alpha_pattern")), "per-module rank/alpha patterns: vLLM ignores them"),
    ]
    return [problem for ok, problem in rules if not ok]


def _check_adapter(path: Path, report: CheckReport, reference: str | Path | None) -> None:
    cfg = _load_json(path / ADAPTER_CONFIG, report)
    if cfg is not None:
        report.problems += [f"adapter_config.json {p}" for p in adapter_config_problems(cfg)]
        if not cfg.get("target_modules"):
            report.problems.append("adapter_config.json lacks 'target_modules'")
    if (path / EXTRA_TRAINABLE_FILE).is_file():
        report.problems.append(f"{EXTRA_TRAINABLE_FILE} beside the adapter: vLLM would ignore these trained weights")
    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file():
        report.problems.append(f"{ADAPTER_WEIGHTS} is missing")
        return
    have = _headers([weights])
    for name in sorted(k for k in have if not VLLM_LORA_KEY.fullmatch(k)):
        report.problems.append(f"key {name} is not a decoder LoRA key vLLM loads (encoder keys are silently ignored)")
    for name in sorted(k for k in have if VLLM_LORA_KEY.fullmatch(k)):
        partner = name.replace("lora_A", "lora_B") if "lora_A" in name else name.replace("lora_B", "lora_A")
        if partner not in have:
            report.problems.append(f"{name} has no matching {partner.rsplit('.', 2)[-2]}")
        if cfg is not None and isinstance(cfg.get("r"), int):
            rank_dim = have[name][0][0 if ".lora_A." in name else 1]
            if rank_dim != cfg["r"]:
                report.problems.append(f"{name} has rank {rank_dim}, adapter_config.json says r={cfg['r']}")
    if not have:
        report.problems.append(f"{ADAPTER_WEIGHTS} holds no tensors")


# ---------------------------------------------------------------------------------------------------------------
# hf


def _check_hf(path: Path, report: CheckReport, reference: str | Path | None) -> None:
    from transformers import VoxtralRealtimeConfig, VoxtralRealtimeForConditionalGeneration

    cfg = _load_json(path / "config.json", report)
    index = path / "model.safetensors.index.json"
    files = (
        [path / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        if index.is_file()
        else [path / "model.safetensors"]
    )
    for f in files:
        if not f.is_file():
            report.problems.append(f"{f.name} is missing")
    for f in path.glob("consolidated*.safetensors"):
        report.problems.append(f"stale {f.name} beside an HF export: mixing formats in one folder misleads loaders")
    if cfg is None or not report.ok:
        return
    config = VoxtralRealtimeConfig.from_pretrained(path)
    with torch.device("meta"):
        model = VoxtralRealtimeForConditionalGeneration(config)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != mf.HF_TIED_HEAD}
    have = {mf.hf_canonical_name(k): v for k, v in _headers(files).items()}
    have.pop(mf.HF_TIED_HEAD, None)  # tied: may or may not be written
    _compare_tensors(have, want, report)
