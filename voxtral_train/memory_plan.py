"""Per-GPU memory plan of a training setup, before any weights load: weights, grads, optimizer, activations, logits.

Bytes per parameter (N = all parameters, T = trainable ones; `a` = 2 for bf16, 4 for fp32):
- weights N*a; grads T*a (ZeRO-2/3 divide grads by n_gpus; ZeRO-3 also divides the weights and adds a workspace of
  two gathered decoder layers, the current and the prefetched one).
- optimizer per trainable parameter: `adamw` fp32 moments 8 B, plus a 4 B fp32 master copy when the weights are bf16
  (so full FT costs 16 B/param in both precisions); `adamw8bit` 2 B (bitsandbytes, updates the weights in their own
  dtype, no master); `adamw_bf16` 4 B (torch AdamW on bf16 weights: bf16 moments, no master; what
  `benchmarks/gpu_mfu.py` runs); `adamw_offload` 0 B on the GPU and 8 (+4) B in CPU memory (DeepSpeed offload).
  ZeRO-1/2/3 divide the optimizer by n_gpus. PEFT keeps LoRA matrices in fp32; at < 1 % of the weights this is ignored.
- activations: tensors autograd saves, per position, for every part that gradients flow through
  (`flops.backward_plan`; a frozen encoder saves nothing). One transformer layer saves, per token:
  its two RMSNorm inputs in fp32 (HF's RMSNorm upcasts): 2*d*4 B; the norm outputs, (decoder) the delay-scaled MLP
  input, q after RoPE, k, v, the attention output, and the MLP's gate, up, act(gate), act*up: (3d + 2q + 2kv + 4f)*a
  (decoder) or (2d + 2q + 2kv + 4f)*a (encoder); with LoRA, each wrapped projection keeps its own fp32 copy of its
  input (PEFT casts it to the adapter dtype and applies dropout): (5d + q + f)*4 B, unless fp32 without dropout.
  The encoder runs 4 frames per position; the conv stem and adapter add their inputs and GELU outputs when they
  train. With gradient checkpointing a layer keeps only its input (d*a), and one layer's full set is alive while it
  is recomputed. Softmax statistics, masks and RoPE tables are left out.
- logits: [positions alive] x vocab x (a + 12) B: the logits in the compute dtype, their fp32 copy, the fp32
  log-softmax / logsumexp intermediate and their gradient. Chunked CE (`voxtral_train.loss`, each chunk checkpointed)
  keeps one chunk alive; the plain path keeps the whole micro-batch.
The total is a sum (grads grow while activations shrink during backward, so it over-counts a little); `fits` keeps a
reserve for the allocator and the CUDA context. `benchmarks/memory_planner_check.py` compares it with measurements.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal

import torch
from transformers import VoxtralRealtimeConfig, VoxtralRealtimeForConditionalGeneration

from voxtral_train import flops, protocol
from voxtral_train.config import PeftSettings, PlanOptions
from voxtral_train.model import tiny_config, voxtral_mini_4b_config
from voxtral_train.trainable import apply_trainable_policy

Precision = Literal["bf16", "fp32"]
Optimizer = Literal["adamw", "adamw8bit", "adamw_bf16", "adamw_offload"]
DTYPE_BYTES = {"bf16": 2, "fp32": 4}
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw8bit": 2, "adamw_bf16": 4, "adamw_offload": 0}  # per trainable param, GPU
MASTER_BYTES = 4  # fp32 master copy of bf16 weights (adamw, adamw_offload)
FP32 = 4
LOGITS_EXTRA_BYTES = 12  # fp32 copy + fp32 log-softmax intermediate + fp32 gradient, per logit
GIB = 2**30


@dataclass(frozen=True)
class MemoryPlan:
    """Per-GPU bytes of each part; `cpu_bytes` is what an offloaded optimizer keeps in host memory."""

    weights: int
    grads: int
    optimizer: int
    activations: int
    logits: int
    workspace: int  # ZeRO-3 gathered layers
    cpu_bytes: int
    n_params: int
    n_trainable: int

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.activations + self.logits + self.workspace

    def fits(self, gpu_gb: float, reserve: float = 0.1) -> bool:
        """True when the total stays under `gpu_gb` GiB less a `reserve` fraction (allocator, CUDA context)."""
        return self.total <= gpu_gb * GIB * (1 - reserve)


def parameter_counts(config: VoxtralRealtimeConfig, settings: PeftSettings) -> tuple[int, int]:
    """(all, trainable) parameters, exactly as the trainer will see them: the model is built on the meta device."""
    with torch.device("meta"):
        model = VoxtralRealtimeForConditionalGeneration(config)
    model = apply_trainable_policy(model, dataclasses.replace(settings))
    params = {id(p): p for p in model.parameters()}.values()  # tied embeddings once
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def _layer_saved_bytes(cfg, act: int, *, decoder: bool, lora_copies: bool, checkpointed: bool) -> float:
    """Saved bytes per token of one transformer layer (see the module docstring)."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    if checkpointed:
        return d * act
    norm_outputs = 3 * d if decoder else 2 * d
    saved = 2 * d * FP32 + (norm_outputs + 2 * q + 2 * kv + 4 * f) * act
    if lora_copies:
        saved += (5 * d + q + f) * FP32
    return saved


def _stack_bytes(cfg, act: int, tokens: int, *, decoder: bool, lora_copies: bool, checkpointing: bool) -> float:
    """All layers of one stack for `tokens` tokens; with checkpointing, inputs plus one layer being recomputed."""
    full = _layer_saved_bytes(cfg, act, decoder=decoder, lora_copies=lora_copies, checkpointed=False) * tokens
    if not checkpointing:
        return full * cfg.num_hidden_layers
    inputs = _layer_saved_bytes(cfg, act, decoder=decoder, lora_copies=False, checkpointed=True) * tokens
    return inputs * cfg.num_hidden_layers + full


def activation_bytes(config: VoxtralRealtimeConfig, settings: PeftSettings, batch_positions: int, precision: Precision,
                     gradient_checkpointing: bool) -> int:
    """Activations saved for backward by one micro-batch of `batch_positions` positions (excluding the logits)."""
    act = DTYPE_BYTES[precision]
    enc, dec = config.audio_config, config.text_config
    plan = flops.backward_plan(settings.mode, unfreeze_encoder=settings.unfreeze_encoder,
                               unfreeze_adapter=settings.unfreeze_adapter)
    lora = settings.mode != "full"
    copies = lora and (settings.dropout > 0 or precision != "fp32")
    total = _stack_bytes(dec, act, batch_positions, decoder=True, lora_copies=copies,
                         checkpointing=gradient_checkpointing)
    total += batch_positions * dec.hidden_size * (FP32 + act)  # final norm input (fp32) and output (lm_head input)
    frames = batch_positions * flops.encoder_frames_per_position(config)
    if plan.encoder:
        total += _stack_bytes(enc, act, frames, decoder=False, lora_copies=copies and settings.mode == "encoder_lora",
                              checkpointing=gradient_checkpointing)
    if plan.conv_stem:  # mel input, conv1 out + GELU out (8 frames), conv2 out + GELU out (4 frames)
        mel = protocol.MEL_FRAMES_PER_POSITION
        total += batch_positions * act * (mel * enc.num_mel_bins + 2 * mel * enc.hidden_size + mel * enc.hidden_size)
    if plan.adapter:  # concatenated frames, linear_1 out, GELU out
        total += batch_positions * act * (config.downsample_factor * enc.hidden_size + 2 * dec.hidden_size)
    return int(total)


def logits_bytes(config: VoxtralRealtimeConfig, batch_positions: int, precision: Precision,
                 chunk_positions: int | None) -> int:
    """Logits alive at once: the whole micro-batch, or one chunk when the CE is chunked (`chunk_positions`)."""
    alive = batch_positions if chunk_positions is None else min(chunk_positions, batch_positions)
    return alive * config.text_config.vocab_size * (DTYPE_BYTES[precision] + LOGITS_EXTRA_BYTES)


def _shards(stage: int, *, zero_stage: int, n_gpus: int) -> int:
    """How many GPUs share a part that ZeRO partitions from `stage` on (optimizer 1, grads 2, weights 3)."""
    return n_gpus if zero_stage >= stage else 1


def plan_memory(
    config: VoxtralRealtimeConfig,
    settings: PeftSettings,
    batch_positions: int,
    precision: Precision = "bf16",
    zero_stage: int = 0,
    n_gpus: int = 1,
    gradient_checkpointing: bool = False,
    optimizer: Optimizer = "adamw",
    chunked_ce: bool = True,
    chunk_positions: int = 1024,
) -> MemoryPlan:
    """Per-GPU memory of one training setup. `batch_positions` = micro-batch B x P per GPU (padding included)."""
    problems = []
    if precision not in DTYPE_BYTES:
        problems.append(f"precision={precision!r}: expected one of {sorted(DTYPE_BYTES)}")
    if zero_stage not in (0, 1, 2, 3):
        problems.append(f"zero_stage={zero_stage!r}: expected 0, 1, 2 or 3")
    if optimizer not in OPTIMIZER_STATE_BYTES:
        problems.append(f"optimizer={optimizer!r}: expected one of {sorted(OPTIMIZER_STATE_BYTES)}")
    if n_gpus < 1 or batch_positions < 1:
        problems.append(f"n_gpus={n_gpus} and batch_positions={batch_positions} must be >= 1")
    if problems:
        raise ValueError("; ".join(problems))
    a = DTYPE_BYTES[precision]
    n_params, n_trainable = parameter_counts(config, settings)
    master = MASTER_BYTES if precision == "bf16" and optimizer in ("adamw", "adamw_offload") else 0
    states = n_trainable * (OPTIMIZER_STATE_BYTES[optimizer] + (0 if optimizer == "adamw_offload" else master))
    cpu = n_trainable * (8 + master) if optimizer == "adamw_offload" else 0
    shard = functools.partial(_shards, zero_stage=zero_stage, n_gpus=n_gpus)
    dec = config.text_config
    layer = flops.linear_params(config).decoder // dec.num_hidden_layers
    return MemoryPlan(
        weights=n_params * a // shard(3),
        grads=n_trainable * a // shard(2),
        optimizer=states // shard(1),
        activations=activation_bytes(config, settings, batch_positions, precision, gradient_checkpointing),
        logits=logits_bytes(config, batch_positions, precision, chunk_positions if chunked_ce else None),
        workspace=2 * layer * a if zero_stage == 3 and n_gpus > 1 else 0,
        cpu_bytes=cpu // shard(1),
        n_params=n_params,
        n_trainable=n_trainable,
    )


def format_plan(plan: MemoryPlan, gpu_gb: float = 80) -> str:
    """The table `voxtral-train plan` prints: GiB per part, total, and whether it fits."""
    rows = [("weights", plan.weights), ("gradients", plan.grads), ("optimizer states", plan.optimizer),
            ("activations", plan.activations), ("logits / CE", plan.logits), ("ZeRO-3 workspace", plan.workspace)]
    lines = [f"parameters: {plan.n_params:,} total, {plan.n_trainable:,} trainable",
             f"{'part':<18} {'GiB / GPU':>10}"]
    lines += [f"{name:<18} {value / GIB:>10.2f}" for name, value in rows]
    lines.append(f"{'total':<18} {plan.total / GIB:>10.2f}")
    if plan.cpu_bytes:
        lines.append(f"{'CPU (offload)':<18} {plan.cpu_bytes / GIB:>10.2f}")
    verdict = "fits" if plan.fits(gpu_gb) else "does NOT fit"
    lines.append(f"{verdict} in {gpu_gb:g} GiB (keeping 10 % for the allocator and CUDA context)")
    return "\n".join(lines)


RELEASED = "released"  # model.path value that plans the released shape without reading any folder
PLAN_PLACEHOLDER = "unused-by-plan"  # data.train_manifest when none is given: a plan reads no data


def parse_plan_options(items: list[str]) -> PlanOptions:
    """`plan.key=value` items -> PlanOptions; an unknown key or a bad value is an error naming it."""
    options, problems = PlanOptions(), []
    known = {f.name: f for f in fields(PlanOptions)}
    for item in items:
        key, _, value = item.lstrip("+").partition("=")
        name = key.removeprefix("plan.")
        if name not in known:
            problems.append(f"{key}: unknown key; known: {', '.join('plan.' + k for k in known)}")
            continue
        try:
            setattr(options, name, value if name == "optimizer" else type(getattr(options, name))(value))
        except ValueError:
            problems.append(f"{key}: expected a number, got {value!r}")
    if options.optimizer is not None and options.optimizer not in OPTIMIZER_STATE_BYTES:
        problems.append(f"plan.optimizer: expected one of {sorted(OPTIMIZER_STATE_BYTES)}, got {options.optimizer!r}")
    if problems:
        raise ValueError("; ".join(problems))
    return options


def config_for(model_path: str) -> VoxtralRealtimeConfig:
    """The architecture only (no weights are read): tiny, the released shape, or a folder's config.json/params.json."""
    if model_path == "tiny":
        return tiny_config()
    if model_path == RELEASED:
        return voxtral_mini_4b_config()
    folder = Path(model_path)
    if (folder / "config.json").is_file():
        return VoxtralRealtimeConfig.from_pretrained(folder)
    if (folder / "params.json").is_file():
        from voxtral_train.mistral_format import config_from_params

        return config_from_params(json.loads((folder / "params.json").read_text()))
    raise ValueError(f"model.path={model_path!r}: not tiny, {RELEASED}, or a folder with config.json / params.json")


def plan_for_settings(settings, options: PlanOptions) -> MemoryPlan:
    """The plan of a composed training config (`voxtral_train.config.Settings`)."""
    ds = settings.deepspeed
    optimizer = options.optimizer or ("adamw_offload" if ds.offload_optimizer else "adamw")
    chunk = settings.train.loss_chunk_positions
    return plan_memory(config_for(settings.model.path), settings.peft, settings.data.max_positions_per_batch,
                       "bf16" if settings.model.dtype == "bfloat16" else "fp32", ds.zero_stage, options.n_gpus,
                       settings.train.gradient_checkpointing, optimizer, chunked_ce=chunk > 0,
                       chunk_positions=max(chunk, 1))


def main_plan(argv: list[str] | None = None) -> MemoryPlan:
    """`voxtral-train plan [training overrides] [plan.* keys]`: the per-GPU memory table of that training run.

    The overrides are composed and validated exactly as `voxtral-train` would (same schema, same errors), so
    `voxtral-train plan +experiment=domain_lora_1gpu model.path=DIR` plans that recipe. Without a model override it
    plans the released shape (`model=voxtral_mini_4b model.path=released`), reading no weights.
    """
    from voxtral_train.config import compose_settings

    argv = sys.argv[1:] if argv is None else argv
    plan_items = [item for item in argv if item.lstrip("+").startswith("plan.")]
    overrides = [item for item in argv if item not in plan_items]
    given = {item.lstrip("+").split("=")[0] for item in overrides}
    if not given & {"model", "model.path"}:  # the released shape, with LoRA unless a mode is asked for
        overrides = ["model=voxtral_mini_4b", f"model.path={RELEASED}", *([] if given & {"peft", "peft.mode"}
                                                                            else ["peft=lora"]), *overrides]
    for key in ("data.train_manifest", "data.eval_manifest"):  # a plan reads no data: fill what recipes leave open
        if key not in given:
            overrides.append(f"{key}={PLAN_PLACEHOLDER}")
    options = parse_plan_options(plan_items)
    settings = compose_settings(overrides)
    plan = plan_for_settings(settings, options)
    print(f"model {settings.model.path} ({settings.model.dtype}), peft.mode {settings.peft.mode}, "
          f"{settings.data.max_positions_per_batch} positions/GPU, ZeRO-{settings.deepspeed.zero_stage} x "
          f"{options.n_gpus} GPU, checkpointing {settings.train.gradient_checkpointing}, "
          f"CE chunk {settings.train.loss_chunk_positions}")
    print(format_plan(plan, options.gpu_gb))
    return plan


if __name__ == "__main__":
    main_plan()
