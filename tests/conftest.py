import os

import pytest
import torch

# Tests are CPU-only and must never reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
torch.set_num_threads(1)  # tiny models: per-op threading overhead dominates (2 threads ~50x slower on small ops)


@pytest.fixture(scope="session")
def tiny():
    """A fresh tiny model + tokenizer per call (models are mutated by tests, so callers get a copy)."""
    from voxtral_train import load_model

    def make(seed: int = 0):
        return load_model("tiny", seed=seed)

    return make
