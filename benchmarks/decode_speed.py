"""Decode speed: our greedy streaming decoder vs transformers' own `model.generate`, same model, same inputs.

    python benchmarks/decode_speed.py                      # tiny model, bundled eval clips, CPU
    python benchmarks/decode_speed.py --model DIR --device cuda --dtype bfloat16 --manifest data/eval.jsonl

Both decode one clip at a time (batch 1) at one delay; ours also runs batched (--batch-size). "× real time" is
real audio seconds (the clips, not the stream pads) per wall-clock second, features included. The sides take turns
for `--rounds` rounds in one process (order flipping per round, `ab.turns`); medians with min-max, threads pinned,
load printed before and after. `generate` stops one token earlier than ours (it emits
x_L..x_{P-1}; we also emit x_P, the prediction of the last position that has audio), so agreement is checked on
its tokens. Prints one markdown row.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from ab import machine_line, pin_threads, spread, turns

from voxtral_train import protocol
from voxtral_train.audio import load_audio
from voxtral_train.decode import greedy_decode
from voxtral_train.evaluate import decode_utterances, load_for_eval
from voxtral_train.features import log_mel, pad_audio
from voxtral_train.manifest import bundled_manifest_path, read_manifest
from voxtral_train.targets import prompt_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--manifest", default=str(bundled_manifest_path("eval")))
    parser.add_argument("--delay", type=int, default=protocol.DEFAULT_DELAY_MS, help="ms")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds; the sides take turns in each")
    args = parser.parse_args()

    pin_threads(args.threads)
    print(machine_line())
    warnings.filterwarnings("ignore", message=".*max_length.*")  # generate's length is the audio's, on purpose
    model, tokenizer = load_for_eval(args.model, None, args.dtype, args.device)
    utterances = read_manifest(args.manifest)
    delay = protocol.delay_ms_to_tokens(args.delay)
    audio = [load_audio(u.audio, u.offset, u.end) for u in utterances]
    seconds = sum(len(a) for a in audio) / protocol.SAMPLE_RATE
    decode_utterances(model, tokenizer, utterances[:1], delay, progress=False)  # warm-up

    def ours_one_by_one() -> list[list[int]]:
        out = []
        for samples in audio:
            features = log_mel(pad_audio(samples, delay)).to(args.device)
            n = features.shape[1] // protocol.MEL_FRAMES_PER_POSITION
            out.append(greedy_decode(model, tokenizer, features[None], [n], delay)[0].token_ids)
        return out

    @torch.no_grad()
    def transformers_generate() -> list[list[int]]:
        out = []
        prompt = torch.tensor([prompt_ids(tokenizer, delay)], device=args.device)
        for samples in audio:
            features = log_mel(pad_audio(samples, delay)).to(args.device, model.dtype)
            # The prompt is made of [STREAMING_PAD]: without an explicit mask, generate would mask it as padding.
            generated = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                       input_features=features[None], num_delay_tokens=delay,
                                       do_sample=False, eos_token_id=tokenizer.ids.eos,
                                       pad_token_id=tokenizer.ids.streaming_pad)
            out.append(generated[0, prompt.shape[1]:].tolist())
        return out

    def batched() -> None:
        decode_utterances(model, tokenizer, utterances, delay, args.batch_size, progress=False)

    sides = {"ours": ours_one_by_one, "generate": transformers_generate, "batched": batched}
    seconds_of: dict[str, list[float]] = {name: [] for name in sides}
    tokens: dict[str, object] = {}
    for r in range(args.rounds):
        for name in turns(list(sides), r):
            start = time.perf_counter()
            tokens[name] = sides[name]()
            seconds_of[name].append(time.perf_counter() - start)
    ours, theirs = tokens["ours"], tokens["generate"]
    speedups = [t / o for t, o in zip(seconds_of["generate"], seconds_of["ours"])]  # per round: same load
    print(machine_line())
    agree = sum(o[: len(t)] == t for o, t in zip(ours, theirs))
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {args.threads} thread(s)"
    print("| model | device | clips | audio s | delay ms | ours ×RT (batch 1) | generate ×RT (batch 1) | "
          "speed-up | ours ×RT (batch {}) | same tokens |".format(args.batch_size))
    print("|---|---|---|---|---|---|---|---|---|---|")
    def real_time(name: str) -> str:
        return spread([seconds / t for t in seconds_of[name]], ".1f")

    print(f"| {args.model} | {device} | {len(audio)} | {seconds:.1f} | {args.delay} | {real_time('ours')} | "
          f"{real_time('generate')} | {spread(speedups)}× | {real_time('batched')} | {agree}/{len(audio)} |")

if __name__ == "__main__":
    main()
