"""Which parameters train: LoRA on the decoder (default), optional unfrozen encoder/adapter, encoder LoRA, or full.

| mode           | trains                                                              | vLLM adapter? |
|----------------|---------------------------------------------------------------------|---------------|
| `lora`         | LoRA on decoder q/k/v/o/gate/up/down (+ full encoder/adapter if the  | yes (plain)   |
|                | `unfreeze_*` switches are on)                                       | no if unfrozen|
| `encoder_lora` | LoRA on the decoder AND the audio encoder's projections             | no: merge     |
| `full`         | every parameter                                                     | no: merge     |

The encoder reuses the decoder's leaf names (`q_proj`, `gate_proj`, ...), so a plain PEFT list would wrap it too;
the target set is an exact regex instead (docs/MODEL.md, "LoRA and vLLM"). vLLM ignores encoder LoRA weights, so
`encoder_lora` models reach vLLM only through `voxtral-export merge` + `mistral`.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file

from voxtral_train.config import PeftSettings

PROJECTIONS = r"(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
DECODER_LORA_REGEX = rf".*language_model\.(model\.)?layers\.\d+\.{PROJECTIONS}"
ENCODER_LORA_REGEX = rf".*audio_tower\.layers\.\d+\.{PROJECTIONS}"
EXTRA_TRAINABLE_FILE = "extra_trainable.safetensors"  # fully trained tensors beside a LoRA adapter, HF names

# Component of a parameter, by the first pattern its (PEFT-stripped) name matches. Order matters: the delay
# conditioning lives inside decoder layers.
COMPONENTS = (
    ("delay conditioning", re.compile(r"ada_rms_norm|time_embedding")),
    ("embeddings", re.compile(r"embed_tokens|lm_head")),
    ("encoder", re.compile(r"audio_tower")),
    ("adapter", re.compile(r"multi_modal_projector")),
    ("decoder", re.compile(r"language_model")),
)
TABLE_ORDER = ("encoder", "adapter", "decoder", "delay conditioning", "embeddings", "other")


def apply_trainable_policy(model: torch.nn.Module, settings: PeftSettings) -> torch.nn.Module:
    """Freeze/unfreeze and wrap with PEFT as `settings` says; returns the model to train."""
    if settings.mode == "full":
        model.requires_grad_(True)
        return model
    if settings.mode not in ("lora", "encoder_lora"):
        raise ValueError(f"peft.mode={settings.mode!r}: expected lora, encoder_lora or full")
    target = DECODER_LORA_REGEX
    if settings.mode == "encoder_lora":
        target = rf"({DECODER_LORA_REGEX})|({ENCODER_LORA_REGEX})"
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        use_rslora=settings.rslora,
        target_modules=target,
        bias="none",
    )
    # freezes everything but the LoRA weights
    model = get_peft_model(model, config, autocast_adapter_dtype=settings.adapter_fp32)
    inner = model.base_model.model.model
    if settings.unfreeze_encoder:
        inner.audio_tower.requires_grad_(True)
    if settings.unfreeze_adapter:
        inner.multi_modal_projector.requires_grad_(True)
    return model


def component_of(name: str) -> str:
    for component, pattern in COMPONENTS:
        if pattern.search(name):
            return component
    return "other"


def parameter_counts(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """{component: (trainable, total)}; tied tensors counted once."""
    counts: dict[str, list[int]] = {}
    seen: set[int] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            continue
        seen.add(id(param))
        entry = counts.setdefault(component_of(name), [0, 0])
        entry[1] += param.numel()
        if param.requires_grad:
            entry[0] += param.numel()
    return {component: (trainable, total) for component, (trainable, total) in counts.items()}


def parameter_table(model: torch.nn.Module) -> str:
    """The start-up table: trainable / total parameters per component."""
    counts = parameter_counts(model)
    rows = [f"{'component':<20} {'trainable':>14} {'total':>14} {'%':>7}"]
    total_trainable = total = 0
    for component in sorted(counts, key=TABLE_ORDER.index):
        trainable, n = counts[component]
        total_trainable, total = total_trainable + trainable, total + n
        rows.append(f"{component:<20} {trainable:>14,} {n:>14,} {100 * trainable / max(n, 1):>6.2f}%")
    rows.append(f"{'all':<20} {total_trainable:>14,} {total:>14,} {100 * total_trainable / max(total, 1):>6.2f}%")
    return "\n".join(rows)


def extra_trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Fully trained (non-LoRA) tensors of a PEFT model, under the base model's HF names."""
    if not isinstance(model, PeftModel):
        return {}
    state = {}
    for name, param in model.base_model.model.named_parameters():
        if param.requires_grad and "lora_" not in name:
            state[name] = param.detach().to("cpu").contiguous()
    return state


def save_trainable(model: torch.nn.Module, out_dir: str | Path) -> None:
    """LoRA modes: PEFT `adapter_model.safetensors` + `extra_trainable.safetensors`; full: the whole HF model."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(model, PeftModel):
        model.save_pretrained(out_dir, safe_serialization=True)
        extra = extra_trainable_state(model)
        if extra:
            save_file(extra, out_dir / EXTRA_TRAINABLE_FILE)
    else:
        model.save_pretrained(out_dir, safe_serialization=True)


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Non-reentrant activation checkpointing of every layer; PEFT models also need grads at the embeddings' output.

    With the in-place fusion fix (`voxtral_train.patches`), this works for LoRA, frozen embeddings and full FT alike.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if isinstance(model, PeftModel):
        model.enable_input_require_grads()


def find_adapter_dir(path: str | Path) -> Path:
    """The PEFT adapter folder of `path`: the folder itself, a run's `final/`, or a checkpoint's `adapter/`.

    So `voxtral-export` and `voxtral-eval` accept `runs/NAME`, `runs/NAME/final` or
    `runs/NAME/checkpoints/step_000500` as well as a plain adapter folder.
    """
    path = Path(path)
    for candidate in (path, path / "final", path / "adapter"):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    raise FileNotFoundError(f"{path} holds no LoRA adapter (adapter_config.json), nor does its final/ or adapter/; "
                            "a full fine-tune's final/ is a whole model: pass it as the model instead")
