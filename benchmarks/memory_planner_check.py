"""Check `voxtral_train.memory_plan` against measurements on CPU (no GPU needed).

    python benchmarks/memory_planner_check.py            # tiny + mid-size, LoRA / full, with / without checkpointing

Two measurements per setup, each in a fresh subprocess:
1. saved activations: every tensor autograd saves during the forward, through
   `torch.autograd.graph.saved_tensors_hooks`, counted once per storage, parameters excluded. Exact and
   deterministic; compared with the planner's `activations`.
2. peak process memory: `resource.getrusage(RUSAGE_SELF).ru_maxrss` after one full training step (forward, chunked
   CE, backward, AdamW step) minus the RSS before the model was built (after a throwaway tiny model loaded the lazy modules);
   compared with the planner's total. The CPU allocator has no peak counter; RSS also holds freed-but-cached pages
   and the runtime's scratch buffers, so this is the looser check.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from dataclasses import dataclass

import torch

from voxtral_train.config import PeftSettings
from voxtral_train.memory_plan import plan_memory
from voxtral_train.model import architecture_config, tiny_config
from voxtral_train.patches import apply_training_fixes
from voxtral_train.streaming_lm import StreamingLM, unwrap_peft
from voxtral_train.trainable import apply_trainable_policy, enable_gradient_checkpointing

DELAY_TOKENS = 6
SIZES = {
    "tiny": tiny_config,
    "mid": lambda: architecture_config(enc_dim=256, enc_layers=4, enc_heads=4, enc_head_dim=64, enc_ffn=1024, dec_dim=512,
                           dec_layers=4, dec_heads=8, dec_kv_heads=2, dec_head_dim=64, dec_ffn=1536, vocab_size=8192),
}


@dataclass
class Setup:
    size: str = "mid"
    mode: str = "lora"
    checkpointing: bool = False
    batch: int = 8
    positions: int = 200
    chunk_positions: int = 512


def build(setup: Setup) -> torch.nn.Module:
    from transformers import VoxtralRealtimeForConditionalGeneration

    config = SIZES[setup.size]()
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = apply_training_fixes(VoxtralRealtimeForConditionalGeneration(config))
    model = apply_trainable_policy(model, PeftSettings(mode=setup.mode))
    if setup.checkpointing:
        enable_gradient_checkpointing(model)
    return model.train()


def random_batch(config, setup: Setup) -> dict[str, torch.Tensor]:
    vocab = config.text_config.vocab_size
    return {
        "input_ids": torch.randint(0, vocab, (setup.batch, setup.positions)),
        "input_features": torch.randn(setup.batch, config.audio_config.num_mel_bins, 8 * setup.positions),
        "labels": torch.randint(0, vocab, (setup.batch, setup.positions)),
        "num_delay_tokens": torch.full((setup.batch,), DELAY_TOKENS),
    }


def hidden_states(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The forward up to the final hidden states (what the planner's activation term counts)."""
    return unwrap_peft(model).model(input_ids=batch["input_ids"], input_features=batch["input_features"],
                                    num_delay_tokens=batch["num_delay_tokens"], use_cache=False).last_hidden_state


def saved_activation_bytes(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """Bytes autograd saves in the forward up to the final hidden states, one count per storage, no parameters."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        hidden_states(model, batch)
    return sum(saved.values())


def train_steps(model: torch.nn.Module, batch: dict[str, torch.Tensor], setup: Setup, steps: int = 2) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    lm = StreamingLM(model, pad_id=0, pad_weight=0.5, chunk_positions=setup.chunk_positions)  # the trainer's step
    for _ in range(steps):
        weighted, _ = lm(**batch)
        weighted.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure(setup: Setup) -> dict[str, float]:
    """Both measurements and the planner's numbers for one setup (run it in a fresh process for the RSS)."""
    config = SIZES[setup.size]()
    batch = random_batch(config, setup)
    build(Setup("tiny"))  # load transformers' and PEFT's lazy modules before the baseline
    rss_before = _rss_bytes()
    model = build(setup)
    saved = saved_activation_bytes(model, batch)
    train_steps(model, batch, setup, steps=1)
    peak = _rss_bytes() - rss_before
    plan = plan_memory(config, PeftSettings(mode=setup.mode), setup.batch * setup.positions, "fp32",
                       gradient_checkpointing=setup.checkpointing, chunk_positions=setup.chunk_positions)
    return {"saved_activations": saved, "planned_activations": plan.activations,
            "peak_rss_delta": peak, "planned_total": plan.total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", help="internal: JSON of one Setup, measured in this process")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(Setup(**json.loads(args.one)))))
        return
    print(f"{'setup':<34} {'saved MB':>9} {'plan MB':>8} {'ratio':>6} {'peak MB':>8} {'plan MB':>8} {'ratio':>6}")
    for size, batch, positions in (("tiny", 4, 100), ("mid", 8, 200)):
        for mode in ("lora", "full"):
            for checkpointing in (False, True):
                setup = Setup(size, mode, checkpointing, batch, positions)
                out = subprocess.run([sys.executable, __file__, "--one", json.dumps(setup.__dict__)],
                                     capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
                r = json.loads(out)
                name = f"{size} {mode} ckpt={checkpointing} {batch}x{positions}"
                print(f"{name:<34} {r['saved_activations'] / 1e6:>9.1f} {r['planned_activations'] / 1e6:>8.1f} "
                      f"{r['planned_activations'] / r['saved_activations']:>6.2f} {r['peak_rss_delta'] / 1e6:>8.1f} "
                      f"{r['planned_total'] / 1e6:>8.1f} {r['planned_total'] / r['peak_rss_delta']:>6.2f}")


if __name__ == "__main__":
    main()
