"""FLOP model: the table of docs/PERFORMANCE.md, exact counts against the built model, and the GPU benchmark's CPU
smoke run."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import VoxtralRealtimeForConditionalGeneration

from voxtral_train import flops
from voxtral_train.model import tiny_config, voxtral_mini_4b_config
from voxtral_train.patches import apply_training_fixes

ROOT = Path(__file__).resolve().parents[1]


def test_positions_for_a_30s_clip():
    assert flops.positions_for_clip(30.0) == 424  # 32 left pad + 375 audio + 17 right pad (docs/PERFORMANCE.md)


def test_reproduces_the_performance_model_table():
    config, positions = voxtral_mini_4b_config(), 424
    fwd = flops.forward_flops(config, positions)
    step = lambda mode, **kw: flops.step_flops(config, positions, mode, **kw)  # noqa: E731
    table = {  # docs/PERFORMANCE.md (hand count), GFLOP per position, 30 s clips
        "audio forward": (fwd.audio, 8.6),
        "text forward": (fwd.text, 7.0),
        "whole forward": (fwd.total, 15.6),
        "full step": (step("full").model, 46.7),
        "lora step": (step("lora").model, 22.5),
        "lora cached step": (step("lora_cached").model, 13.9),
        "checkpointing adds": (step("lora", gradient_checkpointing=True, checkpointed_loss_chunks=True).recompute, 7.0),
    }
    for name, (got, want) in table.items():
        assert got / 1e9 == pytest.approx(want, rel=0.03), name


def test_linear_params_of_the_released_shape():
    p = flops.linear_params(voxtral_mini_4b_config())
    assert p.encoder == 32 * (4 * 1280 * 2048 + 3 * 1280 * 5120)
    assert p.adapter == 5120 * 3072 + 3072 * 3072
    assert p.decoder + p.delay_conditioning == pytest.approx(3_031e6, rel=1e-3)
    assert p.lm_head == 131072 * 3072


def _linear_weights(module: torch.nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d)))


def test_linear_params_match_the_built_tiny_model():
    model = VoxtralRealtimeForConditionalGeneration(tiny_config())
    p = flops.linear_params(tiny_config())
    inner = model.model
    assert p.encoder + p.conv_stem == _linear_weights(inner.audio_tower)
    assert p.conv_stem == _linear_weights(inner.audio_tower.embedder)
    assert p.adapter == _linear_weights(inner.multi_modal_projector)
    assert p.decoder + p.delay_conditioning == _linear_weights(inner.language_model)
    assert p.lm_head == model.lm_head.weight.numel()


def test_tiny_forward_by_hand():
    # tiny: enc d64, 2 layers, q=k=v=64, ffn 256; dec d128, 2 layers, q 128, kv 64, ffn 384; vocab 2000.
    # P = 10 positions -> 40 encoder frames (window 750 and 8192 not reached).
    fwd = flops.forward_flops(tiny_config(), 10)
    assert fwd.encoder_linear == 2 * 4 * 2 * (4 * 64 * 64 + 3 * 64 * 256)  # 2 FLOPs x 4 frames x 2 layers
    assert fwd.encoder_attention == pytest.approx(4 * 4 * (41 / 2) * 64 * 2)  # mean causal context (40+1)/2
    assert fwd.conv_stem == 2 * (3 * 128 * 64 * 8 + 3 * 64 * 64 * 4)
    assert fwd.adapter == 2 * (256 * 128 + 128 * 128)
    assert fwd.decoder_linear == 2 * 2 * (128 * (128 + 2 * 64) + 128 * 128 + 3 * 128 * 384)
    assert fwd.decoder_attention == pytest.approx(4 * (11 / 2) * 128 * 2)
    assert fwd.lm_head == 2 * 2000 * 128


def test_sliding_window_context():
    assert flops.mean_causal_context(4, None) == 2.5
    assert flops.mean_causal_context(6, 2) == (1 + 2 * 5) / 6


def test_counted_forward_matches_torch_flop_counter():
    """torch's counter sees every matmul/conv; eager attention computes the full square (no causal saving)."""
    config = tiny_config()
    config._attn_implementation = "eager"
    model = apply_training_fixes(VoxtralRealtimeForConditionalGeneration(config)).eval()
    batch, positions = 2, 10
    fwd = flops.forward_flops(config, positions)
    p = flops.linear_params(config)
    dense_attention = 4 * 40 * 64 * 2 * 40 + 4 * 10 * 128 * 2 * 10  # per sample: enc (L=40) + dec (L=10), full L^2
    delay = 2 * p.delay_conditioning  # once per forward here: one int delay for the batch
    expected = batch * (positions * (fwd.total - fwd.encoder_attention - fwd.decoder_attention) + dense_attention) + delay
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(input_ids=torch.zeros(batch, positions, dtype=torch.long),
              input_features=torch.zeros(batch, 128, 8 * positions), num_delay_tokens=6, use_cache=False)
    assert counter.get_total_flops() == expected


def test_step_modes():
    config, positions = voxtral_mini_4b_config(), 424
    fwd = flops.forward_flops(config, positions)
    full = flops.step_flops(config, positions, "full")
    assert full.model == pytest.approx(3 * fwd.total)
    cached = flops.step_flops(config, positions, "lora_cached")
    lora = flops.step_flops(config, positions, "lora")
    assert lora.model - cached.model == pytest.approx(fwd.audio)  # the cache saves exactly the audio forward
    assert flops.step_flops(config, positions, "encoder_lora").model > lora.model
    with pytest.raises(ValueError, match="frozen"):
        flops.backward_plan("lora_cached", unfreeze_encoder=True)


def test_mfu():
    assert flops.mfu(22.5e9, 19_800, 989e12) == pytest.approx(0.45, rel=0.01)  # docs/PERFORMANCE.md: 45 % MFU for LoRA


def _load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def test_gpu_mfu_benchmark_smoke_on_cpu():
    bench = _load_benchmark("gpu_mfu")
    results = bench.main(["--size", "small", "--device", "cpu", "--steps", "2", "--warmup", "1", "--batch", "2",
                          "--seconds", "1", "--peak-tflops", "2"])
    assert [r.mode for r in results if r.attention == "sdpa"] == ["full", "lora"]
    positions = flops.positions_for_clip(1.0)
    for r in results:
        assert r.positions == positions and r.positions_per_s > 0 and r.audio_s_per_s > 0 and r.mfu > 0
        step = flops.step_flops(tiny_config(), positions, r.mode)  # the fused loss recomputes nothing
        assert r.mfu == pytest.approx(step.model * r.positions_per_s / 2e12)
        assert r.hfu == pytest.approx(step.hardware * r.positions_per_s / 2e12)
        assert r.audio_s_per_s == pytest.approx(r.positions_per_s * 1.0 / positions)  # the clip's 1 s, no pads
