"""Encoder forward time and attention work across clip lengths: SDPA (dense mask from 15 s on) vs `window_blocks`.

    python benchmarks/encoder_attention.py [--threads 2] [--seconds 10,20,30,60] [--repeats 3]

The scaled-proportion encoder (`scaled_config`: 320 x 8 layers, window 750 frames = 15 s), random weights, one clip
per length, no gradient (what a LoRA step runs). For each length the two sides take turns `--repeats` times, the
order flipping each time; medians with min-max. Attention work = key positions scored per query: SDPA with a mask
scores every key of the clip; window blocks score at most two windows per query block. The rest of the encoder
(linear layers, conv stem) is the same on both sides, so the time ratio is below the work ratio.
"""

from __future__ import annotations

import argparse
import time

import torch
from ab import machine_line, pin_threads, spread, turns
from transformers import VoxtralRealtimeForConditionalGeneration

from voxtral_train import protocol
from voxtral_train.model import scaled_config
from voxtral_train.patches import apply_training_fixes
from voxtral_train.window_attention import NAME as WINDOW_BLOCKS

ENCODER_FRAMES_PER_SECOND = protocol.SAMPLE_RATE / protocol.HOP_LENGTH / 2  # conv stride 2: 50 frames per second


def keys_per_query(frames: int, window: int) -> tuple[float, float]:
    """(SDPA with a dense mask, window blocks): mean key positions each query's scores are computed for."""
    if frames <= window:  # both run SDPA causal: flash kernels skip the masked half
        return (frames + 1) / 2, (frames + 1) / 2
    blocks = sum((min(s + window, frames) - s) * (min(s + window, frames) - max(0, s - window + 1))
                 for s in range(0, frames, window))
    return float(frames), blocks / frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=lambda t: [float(x) for x in t.split(",")], default=[10.0, 20.0, 30.0, 60.0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    pin_threads(args.threads)
    print("before:", machine_line())
    config = scaled_config()
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = apply_training_fixes(VoxtralRealtimeForConditionalGeneration(config)).eval()
    tower = model.model.audio_tower
    window = config.audio_config.sliding_window
    print("| clip | encoder frames | keys per query, SDPA / window blocks | SDPA forward s | window blocks s | "
          "speed-up |")
    print("|---|---|---|---|---|---|")
    for seconds in args.seconds:
        frames = int(seconds * ENCODER_FRAMES_PER_SECOND)
        features = torch.randn(1, protocol.NUM_MEL_BINS, 2 * frames)
        times: dict[str, list[float]] = {"sdpa": [], WINDOW_BLOCKS: []}
        for r in range(args.repeats + 1):  # round 0 warms up
            for side in turns(list(times), r):
                tower.set_attn_implementation(side)
                started = time.perf_counter()
                with torch.no_grad():
                    model.model.get_audio_features(input_features=features)
                if r:
                    times[side].append(time.perf_counter() - started)
        dense, blocks = keys_per_query(frames, window)
        ratios = [a / b for a, b in zip(times["sdpa"], times[WINDOW_BLOCKS])]
        print(f"| {seconds:g} s | {frames} | {dense:.0f} / {blocks:.0f} ({dense / blocks:.1f}x) | "
              f"{spread(times['sdpa'])} | {spread(times[WINDOW_BLOCKS])} | {spread(ratios)}x |", flush=True)
    print("after: ", machine_line())


if __name__ == "__main__":
    main()
