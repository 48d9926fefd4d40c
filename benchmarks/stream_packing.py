"""FLOPs per real audio-second: one stream per clip vs clips packed into streams (`data.stream_seconds`).

    python benchmarks/stream_packing.py [--stream-seconds 30] [--delay-ms 480]

Every stream pays a prompt (BOS + 32 left-pad positions + the delay) and, after EOS is trimmed, about one position
past the audio; a per-clip stream pays them per clip. The step FLOPs per position come from `voxtral_train.flops`
for the released architecture (LoRA step, decoder checkpointing off), at each stream's own length, so attention's
growth with length is counted too. Positions are those of `StreamingDataset` items (trimmed after EOS; the last
word's pieces, which push EOS a little further, are left out: the same on both sides). FLOPs only: wall time was
not measured (a 2-core shared machine cannot time the real-size model).
"""

from __future__ import annotations

import argparse
import math

from voxtral_train import flops, protocol
from voxtral_train.model import voxtral_mini_4b_config


def stream_positions(audio_seconds: float, delay_tokens: int) -> int:
    """Positions of a trimmed stream: the prompt, the audio, EOS (targets.build_targets, dataset trim)."""
    return protocol.prompt_length(delay_tokens) + math.ceil(audio_seconds / protocol.POSITION_SECONDS)


def gflop_per_audio_second(audio_seconds: float, delay_tokens: int, mode: str = "lora") -> float:
    positions = stream_positions(audio_seconds, delay_tokens)
    step = flops.step_flops(voxtral_mini_4b_config(), positions, mode)
    return step.model * positions / audio_seconds / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stream-seconds", type=float, default=30.0)
    parser.add_argument("--delay-ms", type=int, default=protocol.DEFAULT_DELAY_MS)
    args = parser.parse_args()
    d = protocol.delay_ms_to_tokens(args.delay_ms)
    print(f"| clip s | per-clip stream: positions, GFLOP per audio-s | packed into {args.stream_seconds:g} s: "
          f"positions per clip, GFLOP per audio-s | saving |")
    print("|---|---|---|---|")
    for clip in (2.0, 4.0, 6.0, 10.0, 15.0, 30.0):
        k = max(1, int(args.stream_seconds // clip))
        alone, packed = gflop_per_audio_second(clip, d), gflop_per_audio_second(k * clip, d)
        print(f"| {clip:g} | {stream_positions(clip, d)}, {alone:.0f} | "
              f"{stream_positions(k * clip, d) / k:.1f}, {packed:.0f} | {alone / packed:.2f}x |")


if __name__ == "__main__":
    main()
