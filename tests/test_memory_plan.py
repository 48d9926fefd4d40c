"""Memory planner: closed-form bytes per parameter, ZeRO sharding, logits, and saved activations measured on CPU."""

import importlib.util
import sys
from pathlib import Path

import pytest

from voxtral_train.config import ConfigError
import torch

from voxtral_train import memory_plan as mp
from voxtral_train.model import load_model, tiny_config, voxtral_mini_4b_config
from voxtral_train.config import PeftSettings
from voxtral_train.trainable import apply_trainable_policy

ROOT = Path(__file__).resolve().parents[1]
FULL, LORA = PeftSettings(mode="full"), PeftSettings(mode="lora")


def _state(plan: mp.MemoryPlan) -> int:
    return plan.weights + plan.grads + plan.optimizer


def test_full_fine_tune_costs_16_bytes_per_parameter():
    config = tiny_config()
    for precision in ("fp32", "bf16"):  # 4+4+8, or 2+2+(4 master + 8 moments)
        plan = mp.plan_memory(config, FULL, 100, precision, optimizer="adamw")
        assert plan.n_trainable == plan.n_params
        assert _state(plan) == 16 * plan.n_params
    assert _state(mp.plan_memory(config, FULL, 100, "bf16", optimizer="adamw8bit")) == 6 * mp.parameter_counts(
        config, FULL)[0]
    offload = mp.plan_memory(config, FULL, 100, "bf16", optimizer="adamw_offload")
    assert offload.optimizer == 0 and offload.cpu_bytes == 12 * offload.n_params


def test_zero_stages_divide_what_they_partition():
    config, n = tiny_config(), 8
    base = mp.plan_memory(config, FULL, 100, "bf16")
    z2 = mp.plan_memory(config, FULL, 100, "bf16", zero_stage=2, n_gpus=n)
    z3 = mp.plan_memory(config, FULL, 100, "bf16", zero_stage=3, n_gpus=n)
    assert (z2.weights, z2.grads, z2.optimizer) == (base.weights, base.grads // n, base.optimizer // n)
    assert (z3.weights, z3.grads, z3.optimizer) == (base.weights // n, base.grads // n, base.optimizer // n)
    assert z3.activations == base.activations and z3.workspace > 0 == base.workspace


def test_trainable_count_matches_the_real_lora_model():
    model, _ = load_model("tiny")
    model = apply_trainable_policy(model, LORA)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_params, n_trainable = mp.parameter_counts(model.get_base_model().config, LORA)
    assert n_trainable == trainable > 0
    assert n_params == sum(p.numel() for p in model.parameters())


def test_logits_chunked_or_not():
    config = tiny_config()  # vocab 2000
    assert mp.logits_bytes(config, 3000, "bf16", None) == 3000 * 2000 * (2 + 12)
    assert mp.logits_bytes(config, 3000, "fp32", 1024) == 1024 * 2000 * (4 + 12)
    assert mp.logits_bytes(config, 500, "fp32", 1024) == 500 * 2000 * 16


def test_activation_model_properties():
    config = tiny_config()
    lora = mp.activation_bytes(config, LORA, 1000, "bf16", False)
    assert mp.activation_bytes(config, LORA, 2000, "bf16", False) == 2 * lora  # linear in positions
    assert mp.activation_bytes(config, LORA, 1000, "bf16", True) < lora
    assert mp.activation_bytes(config, FULL, 1000, "bf16", False) > lora  # the encoder saves too
    bigger_encoder = tiny_config()
    bigger_encoder.audio_config.num_hidden_layers = 8
    assert mp.activation_bytes(bigger_encoder, LORA, 1000, "bf16", False) == lora  # frozen encoder saves nothing


def test_released_shape_verdicts():
    config = voxtral_mini_4b_config()
    assert mp.plan_memory(config, LORA, 3392).fits(80)  # 8 x 30 s clips
    assert not mp.plan_memory(config, FULL, 2048).fits(80)  # 16 B/param = 66 GiB + activations
    assert mp.plan_memory(config, FULL, 2048, zero_stage=3, n_gpus=8).fits(80)
    plan = mp.plan_memory(config, LORA, 3392)
    assert plan.weights == pytest.approx(8.9e9, rel=0.01)  # docs/PERFORMANCE.md: bf16 weights 8.9 GB


def _benchmark():
    spec = importlib.util.spec_from_file_location("memory_planner_check",
                                                  ROOT / "benchmarks" / "memory_planner_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_planned_activations_match_saved_tensors_of_mid_model(mode):
    """Every tensor autograd saves, measured; the planner must be within 0.7x-1.3x (fp32, no checkpointing)."""
    bench = _benchmark()
    setup = bench.Setup(size="mid", mode=mode, batch=2, positions=100)
    torch.manual_seed(0)
    model = bench.build(setup)
    config = bench.SIZES["mid"]()
    saved = bench.saved_activation_bytes(model, bench.random_batch(config, setup))
    planned = mp.activation_bytes(config, PeftSettings(mode=mode), 200, "fp32", False)
    assert 0.7 <= planned / saved <= 1.3, (planned, saved)


def test_main_plan_plans_the_composed_training_config(capsys):
    plan = mp.main_plan(["model.path=tiny", "peft=full", "deepspeed=zero2", "plan.n_gpus=2", "optim.lr=1e-4"])
    out = capsys.readouterr().out
    assert "optimizer states" in out and "fits in 80 GiB" in out and "ZeRO-2 x 2 GPU" in out
    assert plan.optimizer == plan.n_params * 8 // 2  # tiny is fp32: no master copy, moments over 2 GPUs


def test_main_plan_defaults_to_the_released_shape_and_plans_recipes():
    released = mp.main_plan([])
    assert released.n_params > 4e9 and released.n_trainable < 0.01 * released.n_params  # LoRA by default
    recipe = mp.main_plan(["+experiment=new_language_full_8gpu", "model.path=released", "plan.n_gpus=8"])
    assert recipe.n_trainable == recipe.n_params and recipe.weights < released.weights / 7  # ZeRO-3 over 8


def test_main_plan_errors_name_the_key():
    with pytest.raises(ValueError, match="plan.zero: unknown key"):
        mp.main_plan(["plan.zero=2"])
    with pytest.raises(ConfigError, match="train.gradient_checkpointing"):
        mp.main_plan(["train.gradient_checkpointing=maybe"])
