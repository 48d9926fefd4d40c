"""Peak memory of the loss at the real vocabulary: full fp32 logits vs the chunked loss of `voxtral_train.loss`.

    python benchmarks/loss_memory.py                        # CUDA: torch.cuda.max_memory_allocated per side
    python benchmarks/loss_memory.py --device cpu --batch 2 # CPU: ru_maxrss of a fresh subprocess per side

The 131,072-word vocabulary makes `[B, P, V]` fp32 logits the largest tensor of a step (8 x 424 positions: 1.8 GB,
and the same again for its gradient). Both sides compute the same weighted cross-entropy from the final hidden
states [B, P, 3072] and the tied embedding matrix, forward and backward (hidden states need grad, as under LoRA);
only the peak differs. Prints a markdown row.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch
import torch.nn.functional as F

from voxtral_train.loss import streaming_loss_sums

VOCAB, DIM, PAD_ID = 131072, 3072, 32


def inputs(batch: int, positions: int, device: torch.device, dtype: torch.dtype):
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(batch, positions, DIM, device=device, dtype=dtype, generator=g).requires_grad_(True)
    weight = torch.randn(VOCAB, DIM, device=device, dtype=dtype, generator=g).mul_(0.02)  # no temporary copy
    labels = torch.randint(0, VOCAB, (batch, positions), device=device, generator=g)
    return hidden, weight, labels


def full_logits_loss(hidden, weight, labels) -> torch.Tensor:
    """What a plain HF-style loss does: every position's fp32 logits at once."""
    logits = F.linear(hidden, weight).float()  # [B, P, V]
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")


def chunked_loss(hidden, weight, labels, chunk_positions: int) -> torch.Tensor:
    sums = streaming_loss_sums(hidden, lambda h: F.linear(h, weight), labels, PAD_ID, pad_weight=1.0,
                               text_weight=1.0, chunk_positions=chunk_positions)
    return sums.weighted


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def run_side(side: str, batch: int, positions: int, device: torch.device, dtype: torch.dtype, chunk: int) -> dict:
    hidden, weight, labels = inputs(batch, positions, device, dtype)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:  # resident now (inputs included), against the process's high-water mark after the step
        base = current_rss()
    loss = full_logits_loss(hidden, weight, labels) if side == "full" else chunked_loss(hidden, weight, labels, chunk)
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"side": side, "loss": loss.item(), "grad_sum": hidden.grad.float().abs().sum().item(), "peak_bytes": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--positions", type=int, default=424, help="positions per clip (30 s = 424)")
    parser.add_argument("--chunk", type=int, default=1024, help="train.loss_chunk_positions")
    parser.add_argument("--side", choices=["full", "chunked"], help="internal: run one side and print JSON")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.side:
        print(json.dumps(run_side(args.side, args.batch, args.positions, device, dtype, args.chunk)))
        return
    results = {}
    for side in ("full", "chunked"):
        if device.type == "cuda":  # one process: the CUDA peak counter resets between sides
            results[side] = run_side(side, args.batch, args.positions, device, dtype, args.chunk)
            torch.cuda.empty_cache()
        else:  # a fresh process per side: ru_maxrss only grows
            out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--side", side], capture_output=True,
                                 text=True, check=True).stdout
            results[side] = json.loads(out.strip().splitlines()[-1])
    full, chunked = results["full"], results["chunked"]
    gib = 2**30
    print(f"| {device.type} | {dtype} | {args.batch} x {args.positions} | {VOCAB} | {full['peak_bytes'] / gib:.2f} GiB "
          f"| {chunked['peak_bytes'] / gib:.2f} GiB (chunk {args.chunk}) | "
          f"{full['peak_bytes'] / max(chunked['peak_bytes'], 1):.1f}x | loss {full['loss']:.6g} vs {chunked['loss']:.6g} |")


if __name__ == "__main__":
    main()
