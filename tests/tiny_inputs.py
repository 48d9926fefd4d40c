"""Helpers shared by tests: a fixed random forward of a tiny model (importable because pytest puts tests/ on the path)."""

import torch

from voxtral_train import protocol


def tiny_logits(model, n_positions: int = 5, delay_tokens: int = 6) -> torch.Tensor:
    """Logits of `model` on seeded random token ids and log-mel features (the same inputs on every call)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.text_config.vocab_size, (1, n_positions), generator=g)
    features = torch.randn(1, protocol.NUM_MEL_BINS, protocol.MEL_FRAMES_PER_POSITION * n_positions, generator=g)
    with torch.no_grad():
        return model(input_ids=ids, input_features=features, num_delay_tokens=delay_tokens, use_cache=False).logits
