"""The typed training settings: the one home of every default, and the one validation that reports every problem.

The dataclasses below ARE the defaults: `Settings()` is exactly the run that plain `voxtral-train` starts. They are
registered in Hydra's ConfigStore as the base of `configs/train.yaml`, and each group file
(`configs/peft/lora_unfreeze_encoder.yaml`, ...) states only what it changes. Hydra composes a plain mapping;
`settings_from_dict` checks it against the dataclasses (unknown keys, wrong types, values out of range, `???` left
unset) and returns `Settings`. Each problem names its key (`optim.lr: must be > 0, got -0.001`), and all of them are
reported at once, so a typo stops the run before any model loads.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

from voxtral_train import protocol

MISSING = "???"  # OmegaConf's mark for a value the user must set. Group files say `null` instead (merging "???"
# onto a default keeps the default): null for a field that cannot be null means the same, "required, not set".
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
RUN_CONFIG_FILE = "config.yaml"  # the resolved settings, in a run folder, each of its checkpoints and final/
DEFAULTS_NODE = "voxtral_defaults"  # ConfigStore name of `Settings()`, the first entry of configs/train.yaml
Dtype = Literal["float32", "bfloat16", "float16"]  # weight dtypes, by torch's names, wherever a dtype is chosen


@dataclass
class ModelSettings:
    # "mini" (the embedded pretrained mini base), "tiny" / "mini-scratch" (random-init), or a local HF-format /
    # Mistral-format folder
    path: str = "mini"
    dtype: Dtype = "float32"  # weight dtype at load (mixed precision is train.mixed_precision)
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    # The audio encoder's attention: "window_blocks" costs at most 2 windows per query block at any clip length
    # (voxtral_train.window_attention); "same" = attn_implementation (SDPA: a dense mask from 15 s of audio on).
    encoder_attention: Literal["same", "window_blocks"] = "same"


@dataclass
class DataSettings:
    # JSONL manifest path, or a bundled espeak-ng set: bundled:medical_train / bundled:medical_eval (the domain the
    # default run adapts the mini base to), bundled:train / bundled:eval (the tiny demo's short sentences).
    # train_manifest may also be a shard folder (voxtral-prep shards): streamed in order, for corpora at scale.
    train_manifest: str = "bundled:medical_train"
    eval_manifest: str | None = "bundled:medical_eval"  # held-out manifest for periodic eval; null = none
    delays_ms: list[int] = field(default_factory=lambda: [protocol.DEFAULT_DELAY_MS])  # sampled per utterance (80 ms grid)
    delay_weights: list[float] | None = None  # relative weight of each of delays_ms; null = equally likely
    anchor: Literal["end", "start"] = "end"  # a word's slot counts from its end (released model) or its start
    max_seconds: float = 30.0  # longer utterances are cut at word boundaries (the pre-flight check says how many)
    # Training items: consecutive utterances of one speaker (manifest key speaker or source) played back to back up
    # to this many seconds, one prompt and one EOS per stream; null = one utterance per item.
    stream_seconds: float | None = None
    # A shard corpus's shards at another place than beside its shards.json, {name} = a shard's file name: a path, a
    # URL (http, gs) or "pipe:COMMAND" writing the shard to stdout (pipe:aws s3 cp s3://bucket/dir/{name} -).
    shard_url: str | None = None
    shards_per_window: int = 2  # shards whose rows are bucketed together (a DataLoader worker holds one window)
    max_positions_per_batch: int = 1000  # micro-batch size in 80 ms positions (padding included), per process
    num_workers: int | None = None  # DataLoader worker processes; null = auto (the cores per process, minus one, <= 4)
    pcm16: bool = True  # quantise audio to 16-bit PCM before the log-mel, as serving (mistral-common, vLLM) does
    audio_embedding_cache: bool = False  # plain LoRA only: run the frozen encoder once per clip, reuse it every epoch
    audio_embedding_cache_dir: str | None = None  # null = <train.output_root>/audio_embedding_cache (shared by runs)
    # decoded at the end: eval = held-out WER (generalisation), train = memorisation check (the tiny demo)
    final_eval_split: Literal["train", "eval", "none"] = "eval"


@dataclass
class PeftSettings:
    mode: Literal["lora", "encoder_lora", "full"] = "lora"
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.05
    rslora: bool = False  # alpha / sqrt(rank) scaling instead of alpha / rank
    unfreeze_encoder: bool = False  # train the causal audio encoder fully (LoRA modes)
    unfreeze_adapter: bool = False  # train the audio->text projector fully (LoRA modes)
    adapter_fp32: bool = True  # LoRA weights in fp32 (PEFT's default); false keeps them in the model dtype (bf16):
    # no per-layer casts (faster on a GPU: benchmarks/gpu_check.sh measures it), bf16 optimizer precision


@dataclass
class OptimSettings:
    """torch.optim.AdamW over the trainable parameters (the only optimizer the loop, the memory planner and the
    checkpoints are tested with)."""

    lr: float = 5e-3  # the mini base's LoRA demo (2e-3: 98 % held-out WER after 150 steps, 5e-3: 83 % after 300);
    # the 4B recipes use 1e-4 (LoRA) and 1e-5 (full)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.0  # applied to matrices (>= 2-D) only, never to norms or biases


@dataclass
class TrainSettings:
    name: str = "mini_medical"  # run folder: <output_root>/<name>
    output_root: str = "runs"
    seed: int = 0
    max_steps: int = 300  # optimizer steps
    gradient_accumulation_steps: int = 1
    warmup_steps: int = 20
    schedule: Literal["cosine", "linear", "constant"] = "cosine"  # shape after warmup
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio (cosine / linear)
    max_grad_norm: float = 1.0  # clip the global gradient norm; 0 = no clipping
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    gradient_checkpointing: bool = False
    compile: bool = False  # regional torch.compile of every layer (~30 s once; fuses the elementwise kernels)
    pad_loss_weight: float = 0.5  # weight of [STREAMING_PAD] targets (docs/TINY_MODELS.md: 0.5)
    text_loss_weight: float = 1.0  # weight of word / [STREAMING_WORD] / EOS targets
    z_loss: float = 0.0  # weight of log(Z)^2, keeps logits from drifting
    loss_chunk_positions: int = 1024  # scored positions per lm_head chunk: bounds the [n, vocab] fp32 logits
    # The training steps' lm_head + CE: chunked (built in) or an optional CUDA-only kernel library, never a
    # dependency (voxtral_train.loss.LOSS_BACKENDS: the package to install, what each gives up). Eval runs chunked.
    loss_backend: Literal["chunked", "liger", "cut_cross_entropy"] = "chunked"
    log_every: int = 10
    eval_every: int = 100  # periodic eval (teacher-forced loss + a short WER); 0 = off
    eval_wer_clips: int = 16  # clips decoded for the periodic WER
    save_every: int = 50  # checkpoint every N optimizer steps (and at the end); 0 = only at the end
    keep_last: int = 2  # complete checkpoints kept
    resume: str | None = None  # null, latest (newest checkpoint that verifies), or a checkpoint folder
    # Resume although world size x batch, model, parameter mode, seed or train manifest changed (not exact then).
    allow_inexact_resume: bool = False
    # A NaN/inf loss: stop (before the update), or rollback: reload the last good checkpoint, skip the offending
    # batch, multiply the lr by nonfinite_lr_scale, and stop after max_nonfinite_events such events.
    on_nonfinite: Literal["stop", "rollback"] = "stop"
    max_nonfinite_events: int = 3
    nonfinite_lr_scale: float = 0.5
    collective_timeout_s: float = 600.0  # several processes: a collective that waits longer (a hung rank) ends the run


@dataclass
class LoggingSettings:
    tensorboard: bool = True  # <run>/tensorboard
    wandb: bool = False  # WANDB_MODE=offline works without a network; no key and no mode -> offline, with a warning
    wandb_project: str = "voxtral-train"
    progress_bar: bool = True


@dataclass
class DeepSpeedSettings:
    zero_stage: Literal[0, 2, 3] = 0  # 0 = no DeepSpeed (plain DDP through accelerate)
    offload_optimizer: bool = False  # ZeRO optimizer states in CPU memory
    offload_params: bool = False  # ZeRO-3 parameters in CPU memory


@dataclass
class PlanOptions:
    """The `plan.*` keys of `voxtral-train plan`: what a memory plan needs beyond the training settings (which say
    model, batch, precision, ZeRO)."""

    n_gpus: int = 1  # GPUs sharing the run (ZeRO partitions over them)
    gpu_gb: float = 80.0  # memory of one GPU, GiB
    optimizer: str | None = None  # adamw8bit / adamw_bf16 to see a leaner optimizer; default: adamw (offloaded
    # with deepspeed.offload_optimizer)


@dataclass
class Settings:
    model: ModelSettings = field(default_factory=ModelSettings)
    peft: PeftSettings = field(default_factory=PeftSettings)
    data: DataSettings = field(default_factory=DataSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    deepspeed: DeepSpeedSettings = field(default_factory=DeepSpeedSettings)


class ConfigError(ValueError):
    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid training config:\n  " + "\n  ".join(problems))


def settings_from_dict(raw: Mapping[str, Any]) -> Settings:
    """Typed settings from a composed config; raises ConfigError listing every problem."""
    problems: list[str] = []
    settings = _convert(Settings, raw, "", problems)  # a wrong value keeps its default, so the checks below run
    problems += value_problems(settings)
    if problems:
        raise ConfigError(problems)
    return settings


def value_problems(s: Settings) -> list[str]:
    """Range and consistency checks on well-typed settings."""
    checks = [
        (s.optim.lr > 0, f"optim.lr: must be > 0, got {s.optim.lr}"),
        (len(s.optim.betas) == 2 and all(0 <= b < 1 for b in s.optim.betas), f"optim.betas: two values in [0, 1), got {s.optim.betas}"),
        (s.optim.weight_decay >= 0, f"optim.weight_decay: must be >= 0, got {s.optim.weight_decay}"),
        (s.train.max_steps > 0, f"train.max_steps: must be > 0, got {s.train.max_steps}"),
        (s.train.gradient_accumulation_steps >= 1, f"train.gradient_accumulation_steps: must be >= 1, got {s.train.gradient_accumulation_steps}"),
        (s.train.warmup_steps >= 0, f"train.warmup_steps: must be >= 0, got {s.train.warmup_steps}"),
        (0 <= s.train.min_lr_ratio <= 1, f"train.min_lr_ratio: must be in [0, 1], got {s.train.min_lr_ratio}"),
        (s.train.max_grad_norm >= 0, f"train.max_grad_norm: must be >= 0, got {s.train.max_grad_norm}"),
        (s.train.pad_loss_weight >= 0, f"train.pad_loss_weight: must be >= 0, got {s.train.pad_loss_weight}"),
        (s.train.text_loss_weight > 0, f"train.text_loss_weight: must be > 0, got {s.train.text_loss_weight}"),
        (s.train.z_loss >= 0, f"train.z_loss: must be >= 0, got {s.train.z_loss}"),
        (s.train.loss_chunk_positions > 0, f"train.loss_chunk_positions: must be > 0, got {s.train.loss_chunk_positions}"),
        (s.train.loss_backend == "chunked" or s.deepspeed.zero_stage != 3,
         f"train.loss_backend: {s.train.loss_backend} reads the lm_head weight whole, which ZeRO-3 partitions: use "
         f"train.loss_backend=chunked (or deepspeed.zero_stage=2)"),
        (s.train.loss_backend != "cut_cross_entropy" or not s.train.z_loss,
         f"train.z_loss: cut_cross_entropy has no z-loss term, got {s.train.z_loss}: set train.z_loss=0, or use "
         f"train.loss_backend=chunked (or liger)"),
        (s.train.log_every > 0, f"train.log_every: must be > 0, got {s.train.log_every}"),
        (s.train.eval_every >= 0, f"train.eval_every: must be >= 0, got {s.train.eval_every}"),
        (s.train.save_every >= 0, f"train.save_every: must be >= 0, got {s.train.save_every}"),
        (s.train.keep_last >= 1, f"train.keep_last: must be >= 1, got {s.train.keep_last}"),
        (s.train.max_nonfinite_events >= 1, f"train.max_nonfinite_events: must be >= 1, got {s.train.max_nonfinite_events}"),
        (0 < s.train.nonfinite_lr_scale <= 1, f"train.nonfinite_lr_scale: must be in (0, 1], got {s.train.nonfinite_lr_scale}"),
        (s.train.collective_timeout_s > 0, f"train.collective_timeout_s: must be > 0, got {s.train.collective_timeout_s}"),
        (bool(s.train.name) and "/" not in s.train.name, f"train.name: a folder name without '/', got {s.train.name!r}"),
        (bool(s.data.delays_ms) and all(_on_delay_grid(d) for d in s.data.delays_ms),
         f"data.delays_ms: positive multiples of {protocol.POSITION_MS} ms, got {s.data.delays_ms}"),
        (s.data.delay_weights is None or (len(s.data.delay_weights) == len(s.data.delays_ms)
                                          and all(w >= 0 for w in s.data.delay_weights) and sum(s.data.delay_weights) > 0),
         f"data.delay_weights: one non-negative weight per delay of data.delays_ms, got {s.data.delay_weights}"),
        (s.data.max_seconds > 0, f"data.max_seconds: must be > 0, got {s.data.max_seconds}"),
        (s.data.stream_seconds is None or s.data.stream_seconds > 0,
         f"data.stream_seconds: must be > 0 (or null = off), got {s.data.stream_seconds}"),
        (s.data.shards_per_window >= 1, f"data.shards_per_window: must be >= 1, got {s.data.shards_per_window}"),
        (s.data.shard_url is None or "{name}" in s.data.shard_url,
         f"data.shard_url: must contain {{name}} (where a shard's file name goes), got {s.data.shard_url!r}"),
        (s.data.max_positions_per_batch > 0, f"data.max_positions_per_batch: must be > 0, got {s.data.max_positions_per_batch}"),
        (s.data.num_workers is None or s.data.num_workers >= 0,
         f"data.num_workers: must be >= 0 (or null = auto), got {s.data.num_workers}"),
        (s.data.final_eval_split != "eval" or s.data.eval_manifest is not None,
         "data.final_eval_split: 'eval' needs data.eval_manifest"),
        (s.peft.rank > 0, f"peft.rank: must be > 0, got {s.peft.rank}"),
        (0 <= s.peft.dropout < 1, f"peft.dropout: must be in [0, 1), got {s.peft.dropout}"),
        (not (s.peft.mode == "full" and (s.peft.unfreeze_encoder or s.peft.unfreeze_adapter)),
         "peft.unfreeze_encoder/unfreeze_adapter: only for LoRA modes (peft.mode=full trains everything)"),
        (not s.deepspeed.offload_params or s.deepspeed.zero_stage == 3,
         f"deepspeed.offload_params: needs deepspeed.zero_stage=3, got {s.deepspeed.zero_stage}"),
        (not (s.deepspeed.zero_stage and s.train.mixed_precision == "fp16"),
         "train.mixed_precision: use bf16 (or no) with DeepSpeed; fp16 loss scaling is not wired here"),
    ]
    return [message for ok, message in checks if not ok]


def _on_delay_grid(delay_ms: int) -> bool:
    try:
        protocol.delay_ms_to_tokens(delay_ms)
    except ValueError:
        return False
    return True


def _convert(kind: Any, value: Any, key: str, problems: list[str]) -> Any:
    """`value` checked against the type `kind`; problems appended (named by `key`), defaults kept where wrong."""
    if (isinstance(value, str) and value == MISSING) or (value is None and not _nullable(kind)):
        problems.append(f"{key}: required value is not set: pass {key}=...")
        return None
    if dataclasses.is_dataclass(kind):
        return _convert_dataclass(kind, value, key, problems)
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, key, problems)
    if origin is Literal:
        if value not in args or isinstance(value, bool) != isinstance(args[0], bool):
            problems.append(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            problems.append(f"{key}: expected a list, got {type(value).__name__} {value!r}")
            return []
        return [_convert(args[0], item, f"{key}[{i}]", problems) for i, item in enumerate(value)]
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[kind]
    if not ok:
        problems.append(f"{key}: expected {kind.__name__}, got {type(value).__name__} {value!r}")
        return value
    return float(value) if kind is float else value


def _nullable(kind: Any) -> bool:
    return typing.get_origin(kind) in (typing.Union, types.UnionType) and type(None) in typing.get_args(kind)


def _convert_dataclass(kind: type, value: Any, key: str, problems: list[str]) -> Any:
    where = key or "config"
    if not isinstance(value, Mapping):
        problems.append(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        return kind()
    hints = typing.get_type_hints(kind)
    names = [f.name for f in dataclasses.fields(kind)]
    for unknown in sorted(set(value) - set(names)):
        problems.append(f"{_join(key, unknown)}: unknown key (known keys of {where}: {', '.join(names)})")
    values = {}
    for name in names:
        if name in value:
            before = len(problems)
            converted = _convert(hints[name], value[name], _join(key, name), problems)
            # A section keeps its good values even when one of its keys was wrong (the wrong ones keep defaults).
            if len(problems) == before or dataclasses.is_dataclass(hints[name]):
                values[name] = converted
    return kind(**values)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def settings_to_dict(settings: Settings) -> dict[str, Any]:
    """Plain nested dict (what `config.yaml` of a run holds)."""
    return dataclasses.asdict(settings)


def register_defaults() -> None:
    """Put `Settings()` into Hydra's ConfigStore as the base that configs/train.yaml composes its groups onto."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=DEFAULTS_NODE, node=settings_to_dict(Settings()))


def compose_settings(overrides: list[str]) -> Settings:
    """The settings `voxtral-train <overrides>` would run with (for tests, `voxtral-train plan` and recipes)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    register_defaults()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose("train", overrides=overrides)
    return settings_from_dict(OmegaConf.to_container(cfg, resolve=True))
