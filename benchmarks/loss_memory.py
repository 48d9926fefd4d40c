"""Peak memory and time of the loss at the real vocabulary: full fp32 logits vs the chunked losses of
`voxtral_train.loss` (checkpointed chunks, which recompute the lm_head in backward, and the fused chunk step,
which makes each chunk's logit gradient in the forward).

    python benchmarks/loss_memory.py                        # CUDA: torch.cuda.max_memory_allocated per side
    python benchmarks/loss_memory.py --device cpu --batch 1 --positions 256 --rounds 2   # CPU: fresh process per side

The 131,072-word vocabulary makes `[B, P, V]` fp32 logits the largest tensor of a step (8 x 424 positions: 1.8 GB,
and the same again for its gradient). Every side computes the same weighted cross-entropy from the final hidden
states [B, P, 3072] and the tied embedding matrix (frozen, as under LoRA), forward and backward; the loss values
are printed to show it. Each round runs every side once, the order flipping per round; medians (min-max) of the
forward + backward seconds, and the largest peak. Prints markdown rows.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from ab import machine_line, spread, turns

from voxtral_train.loss import streaming_loss_sums

VOCAB, DIM, PAD_ID = 131072, 3072, 32


SIDES = ("full", "checkpointed", "fused")


def inputs(batch: int, positions: int, device: torch.device, dtype: torch.dtype):
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(batch, positions, DIM, device=device, dtype=dtype, generator=g).requires_grad_(True)
    head = torch.nn.Linear(DIM, VOCAB, bias=False, device="meta")
    head.weight = torch.nn.Parameter(torch.randn(VOCAB, DIM, device=device, dtype=dtype, generator=g).mul_(0.02),
                                     requires_grad=False)  # filled in place: no temporary copy
    labels = torch.randint(0, VOCAB, (batch, positions), device=device, generator=g)
    return hidden, head, labels


def loss_of(side: str, hidden, head, labels, chunk_positions: int) -> torch.Tensor:
    if side == "full":  # what a plain HF-style loss does: every position's fp32 logits at once
        logits = head(hidden).float()  # [B, P, V]
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
    sums = streaming_loss_sums(hidden, head, labels, PAD_ID, pad_weight=1.0, text_weight=1.0,
                               chunk_positions=chunk_positions, fused=side == "fused")
    return sums.weighted


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def run_side(side: str, batch: int, positions: int, device: torch.device, dtype: torch.dtype, chunk: int) -> dict:
    hidden, head, labels = inputs(batch, positions, device, dtype)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:  # resident now (inputs included), against the process's high-water mark after the step
        base = current_rss()
    started = time.perf_counter()
    loss = loss_of(side, hidden, head, labels, chunk)
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"side": side, "loss": loss.item(), "grad_sum": hidden.grad.float().abs().sum().item(), "peak_bytes": peak,
            "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--positions", type=int, default=424, help="positions per clip (30 s = 424)")
    parser.add_argument("--chunk", type=int, default=1024, help="train.loss_chunk_positions")
    parser.add_argument("--rounds", type=int, default=3, help="every side once per round, order flipping")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--side", choices=SIDES, help="internal: run one side and print JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.side:
        print(json.dumps(run_side(args.side, args.batch, args.positions, device, dtype, args.chunk)))
        return
    print("before:", machine_line())
    results: dict[str, list[dict]] = {side: [] for side in SIDES}
    for r in range(args.rounds + (device.type == "cuda")):  # on CUDA round 0 warms the kernels up, untimed
        for side in turns(SIDES, r):
            if device.type == "cuda":  # one process: the CUDA peak counter resets between sides
                result = run_side(side, args.batch, args.positions, device, dtype, args.chunk)
                torch.cuda.empty_cache()
                if r == 0:
                    continue
            else:  # a fresh process per side: ru_maxrss only grows
                out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--side", side], capture_output=True,
                                     text=True, check=True).stdout
                result = json.loads(out.strip().splitlines()[-1])
            results[side].append(result)
    print("after: ", machine_line())
    gib = 2**30
    print("| side | device | dtype | B x P | peak | seconds fwd+bwd, median (min-max) | loss |")
    print("|---|---|---|---|---|---|---|")
    for side in SIDES:
        rows = results[side]
        label = side if side == "full" else f"{side} (chunk {args.chunk})"
        print(f"| {label} | {device.type} | {dtype} | {args.batch} x {args.positions} | "
              f"{max(r['peak_bytes'] for r in rows) / gib:.2f} GiB | {spread([r['seconds'] for r in rows])} | "
              f"{statistics.median(r['loss'] for r in rows):.6g} |")


if __name__ == "__main__":
    main()
