"""Training throughput, MFU and peak memory of the real architecture (random weights) on one GPU.

    python benchmarks/gpu_mfu.py                                   # full size, bf16, LoRA + full FT, SDPA (+ flash)
    python benchmarks/gpu_mfu.py --batch 8 --seconds 30 --steps 10
    python benchmarks/gpu_mfu.py --size small --device cpu --steps 2   # smoke test, no GPU

For each parameter mode (full fine-tuning first, then LoRA on the same weights) and each attention kernel (SDPA;
flash_attention_2 when `flash_attn` imports) it runs `--warmup` untimed steps, then `--steps` timed steps between
`torch.cuda.synchronize()` calls. A step = the trainer's own forward + chunked CE
(`voxtral_train.streaming_lm.StreamingLM`, the fused loss unless --checkpointed-loss) on random labels, backward,
fused AdamW step. Full FT uses torch AdamW on the bf16 weights (bf16 moments, no fp32 master: 8 B/param) so it fits
one 80 GB GPU; if the memory planner says the batch does not fit, gradient checkpointing is switched on and the line
says so.

MFU = model FLOPs per position (`voxtral_train.flops.step_flops`, no recomputation) x positions/s / peak;
HFU adds the recomputation of checkpointing (and of the CE chunks with --checkpointed-loss). The peak used is
printed (H100/H200 SXM dense bf16: 989 TFLOP/s; `--peak-tflops` for anything else). `--shapes 6,12,20,30` cycles
the steps through bucket shapes, as training does (a static shape flatters compiled layers). Audio-seconds/s counts
the clips' own audio (batch x --seconds per step), not the stream's pad positions (32 left + delay + 11 right: +13 %
at 30 s clips, +67 % at 6 s).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch
from transformers import VoxtralRealtimeForConditionalGeneration

from voxtral_train import flops, protocol
from voxtral_train.config import PeftSettings
from voxtral_train.memory_plan import GIB, plan_memory
from voxtral_train.compiled import compile_layers
from voxtral_train.model import tiny_config, voxtral_mini_4b_config
from voxtral_train.patches import apply_training_fixes
from voxtral_train.streaming_lm import StreamingLM, unwrap_peft
from voxtral_train.trainable import apply_trainable_policy, enable_gradient_checkpointing
from voxtral_train.window_attention import use_window_blocks

SIZES = {"full": voxtral_mini_4b_config, "small": tiny_config}
CPU_NOMINAL_TFLOPS = 1.0  # no meaningful CPU peak: MFU on CPU only checks the arithmetic
CHUNK_POSITIONS = 1024
DELAY_TOKENS = protocol.delay_ms_to_tokens(protocol.DEFAULT_DELAY_MS)


@dataclass
class Result:
    mode: str
    attention: str
    batch: int
    positions: int
    checkpointing: bool
    positions_per_s: float
    audio_s_per_s: float
    gflop_per_position: float  # model FLOPs (what MFU counts)
    mfu: float
    hfu: float
    peak_memory_gib: float | None  # torch.cuda.max_memory_allocated; None on CPU
    planned_gib: float


def peak_flops(device: torch.device, override_tflops: float | None) -> tuple[float, str]:
    """(FLOP/s, where it came from)."""
    if override_tflops:
        return override_tflops * 1e12, "--peak-tflops"
    if device.type != "cuda":
        return CPU_NOMINAL_TFLOPS * 1e12, "nominal CPU value (MFU meaningless here)"
    name = torch.cuda.get_device_name(device)
    for gpu, value in flops.PEAK_BF16_FLOPS.items():
        if gpu in name:
            return value, f"{gpu} dense bf16"
    raise SystemExit(f"unknown GPU {name!r}: pass --peak-tflops (its dense bf16 peak)")


def attention_kernels() -> list[str]:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        print("flash_attention_2: skipped (flash_attn does not import)")
        return ["sdpa"]
    return ["sdpa", "flash_attention_2"]


def random_batch(config, batch: int, positions: int, device: torch.device, dtype: torch.dtype) -> dict:
    vocab = config.text_config.vocab_size
    return {
        "input_ids": torch.randint(0, vocab, (batch, positions), device=device),
        "input_features": torch.randn(batch, config.audio_config.num_mel_bins,
                                      protocol.MEL_FRAMES_PER_POSITION * positions, device=device, dtype=dtype),
        "labels": torch.randint(0, vocab, (batch, positions), device=device),
        "num_delay_tokens": torch.full((batch,), DELAY_TOKENS, device=device),
    }


def train_step(lm: StreamingLM, optimizer, batch: dict) -> None:
    """The trainer's forward + loss (`StreamingLM`), backward, optimizer step."""
    weighted, _ = lm(**batch)
    (weighted / batch["labels"].numel()).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(lm: StreamingLM, optimizer, batches: list[dict], warmup: int, steps: int,
               device: torch.device) -> float:
    """Seconds of `steps` timed steps cycling through `batches` (bucket shapes, as in training), after `warmup`
    untimed steps on each shape (compilation of each shape)."""
    for batch in batches:
        for _ in range(warmup):
            train_step(lm, optimizer, batch)
    _sync(device)
    start = time.perf_counter()
    for i in range(steps):
        train_step(lm, optimizer, batches[i % len(batches)])
    _sync(device)
    return time.perf_counter() - start


def set_attention(model, kernel: str) -> None:
    unwrap_peft(model).set_attn_implementation(kernel)


def run_mode(model, mode: str, kernels: list[str], args, device: torch.device, dtype: torch.dtype,
             peak: float) -> list[Result]:
    config = unwrap_peft(model).config
    settings = PeftSettings(mode=mode)
    positions = flops.positions_for_clip(args.seconds)
    precision = "bf16" if dtype == torch.bfloat16 else "fp32"
    optimizer_kind = "adamw_bf16" if (mode == "full" and precision == "bf16") else "adamw"
    plan_args = dict(precision=precision, optimizer=optimizer_kind, chunk_positions=CHUNK_POSITIONS)
    plan = plan_memory(config, settings, args.batch * positions, **plan_args)
    gpu_gib = torch.cuda.get_device_properties(device).total_memory / GIB if device.type == "cuda" else None
    checkpointing = args.checkpointing or (gpu_gib is not None and not plan.fits(gpu_gib))
    if checkpointing:
        if not args.checkpointing:
            print(f"{mode}: planned {plan.total / GIB:.1f} GiB does not fit {gpu_gib:.0f} GiB: gradient checkpointing on")
        enable_gradient_checkpointing(model)
        plan = plan_memory(config, settings, args.batch * positions, gradient_checkpointing=True, **plan_args)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-6, fused=device.type == "cuda")
    # One batch per bucket shape, each holding about the positions of --batch clips of --seconds.
    shapes = [(s, flops.positions_for_clip(s)) for s in (args.shapes or [args.seconds])]
    sizes = [(s, max(1, round(args.batch * positions / p)), p) for s, p in shapes]
    batches = [random_batch(config, b, p, device, dtype) for _, b, p in sizes]
    timed = [sizes[i % len(sizes)] for i in range(args.steps)]
    timed_positions = sum(b * p for _, b, p in timed)
    timed_audio = sum(b * s for s, b, _ in timed)
    steps = [flops.step_flops(config, p, mode, gradient_checkpointing=checkpointing,
                              checkpointed_loss_chunks=args.checkpointed_loss) for _, _, p in timed]
    model_flops = sum(st.model * b * p for st, (_, b, p) in zip(steps, timed)) / timed_positions  # per position
    hardware_flops = sum(st.hardware * b * p for st, (_, b, p) in zip(steps, timed)) / timed_positions
    results = []
    for kernel in kernels:
        set_attention(model, kernel)
        if args.window_blocks:  # after set_attention, which sets the encoder's kernel too
            use_window_blocks(model)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        lm = StreamingLM(model, pad_id=0, chunk_positions=CHUNK_POSITIONS,  # random labels: every target weighs 1
                         fused_loss=not args.checkpointed_loss, loss_backend=args.loss_backend)
        seconds = time_steps(lm, optimizer, batches, args.warmup, args.steps, device)
        rate = timed_positions / seconds
        results.append(Result(
            mode=mode, attention=kernel, batch=args.batch, positions=positions, checkpointing=checkpointing,
            positions_per_s=rate, audio_s_per_s=timed_audio / seconds,
            gflop_per_position=model_flops / 1e9, mfu=flops.mfu(model_flops, rate, peak),
            hfu=flops.mfu(hardware_flops, rate, peak),
            peak_memory_gib=torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None,
            planned_gib=plan.total / GIB,
        ))
        print(format_result(results[-1]), flush=True)
    del optimizer
    model.zero_grad(set_to_none=True)
    if checkpointing:
        model.gradient_checkpointing_disable()
    return results


def format_result(r: Result) -> str:
    memory = "n/a" if r.peak_memory_gib is None else f"{r.peak_memory_gib:.1f}"
    return (f"{r.mode:<5} {r.attention:<18} B={r.batch} P={r.positions} ckpt={str(r.checkpointing):<5} "
            f"{r.positions_per_s:>10,.0f} pos/s {r.audio_s_per_s:>8,.0f} audio-s/s "
            f"{r.gflop_per_position:.3g} GFLOP/pos  MFU {100 * r.mfu:5.1f} %  HFU {100 * r.hfu:5.1f} %  "
            f"peak {memory} GiB (planned {r.planned_gib:.1f})")


def build(size: str, device: torch.device, dtype: torch.dtype):
    """Random-init weights created directly on the device (no slow CPU init of 4.4 B parameters)."""
    config = SIZES[size]()
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with device:
        model = VoxtralRealtimeForConditionalGeneration(config).to(dtype)
    return apply_training_fixes(model).train()


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--batch", type=int, default=8, help="clips per step")
    parser.add_argument("--seconds", type=float, default=30.0, help="clip length; positions include the stream pads")
    parser.add_argument("--shapes", type=lambda text: [float(x) for x in text.split(",")], default=None,
                        help="comma list of clip seconds: the steps cycle through these bucket shapes (about the "
                             "positions of --batch x --seconds each) instead of one static shape")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--modes", default="full,lora", help="comma list of full, lora (full runs first)")
    parser.add_argument("--checkpointing", action="store_true", help="force gradient checkpointing")
    parser.add_argument("--lora-bf16", action="store_true", help="LoRA weights in bf16 (peft.adapter_fp32=false)")
    parser.add_argument("--compile", action="store_true", help="regional torch.compile of every layer (compile_layers)")
    parser.add_argument("--window-blocks", action="store_true",
                        help="encoder attention by window blocks (model.encoder_attention=window_blocks)")
    parser.add_argument("--checkpointed-loss", action="store_true",
                        help="loss chunks under checkpointing (recompute the lm_head) instead of the fused chunk step")
    parser.add_argument("--loss-backend", choices=["chunked", "liger", "cut_cross_entropy"], default="chunked",
                        help="train.loss_backend: an optional fused-loss package, when installed")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak dense FLOP/s of the device, in TFLOP/s")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[Result]:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    peak, source = peak_flops(device, args.peak_tflops)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {name}, {dtype}, peak {peak / 1e12:.0f} TFLOP/s ({source})")
    model = build(args.size, device, dtype)
    results = []
    modes = args.modes.split(",")
    kernels = attention_kernels()
    for mode in sorted(modes, key=["full", "lora"].index):  # LoRA wraps the model in place: full FT first
        if mode == "lora":
            model = apply_trainable_policy(model, PeftSettings(mode="lora", adapter_fp32=not args.lora_bf16))
        compiled = compile_layers(model) if args.compile else None
        if compiled:
            print(f"{mode}: compiled {compiled.layers} layers (the warm-up steps include the compilation)")
        results += run_mode(model, mode, kernels, args, device, dtype, peak)
        if compiled:
            print(f"{mode}: compiled layers {compiled.metrics()}", flush=True)
    return results


if __name__ == "__main__":
    main()
