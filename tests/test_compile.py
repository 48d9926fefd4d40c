"""Compiled layers stay compiled through a bucketed multi-epoch run with periodic evaluation and decoding.

A counting backend (dynamo's "eager" backend under `voxtral_train.compiled.counting_backend`, no C++ compiler needed)
records every graph compiled and every layer call that ran no compiled graph.
"""

import pytest
import torch

from voxtral_train.batching import LengthBucketSampler
from voxtral_train.compiled import compile_layers
from voxtral_train.config import PeftSettings
from voxtral_train.dataset import StreamingDataset, collate
from voxtral_train.decode import greedy_decode
from voxtral_train.delays import DelaySampler
from voxtral_train.loss import STAT_NAMES
from voxtral_train.manifest import bundled_manifest_path, read_manifest
from voxtral_train.streaming_lm import StreamingLM
from voxtral_train.trainable import apply_trainable_policy


def _bucketed_run(tiny, *, dynamic: bool, recompile_limit: int, epochs: int, evaluate: bool):
    """`epochs` epochs of LoRA training over 24 bundled clips (3 delays, small buckets: many shapes), with a
    teacher-forced eval and a greedy decode of 2 held-out clips after each epoch if `evaluate`. Returns the compile
    statistics."""
    torch._dynamo.reset()  # other tests' graphs must not count, nor their raised limit
    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = 1
    try:
        model, tokenizer = tiny()
        model = apply_trainable_policy(model, PeftSettings(rank=4, alpha=8, dropout=0.0))
        stats = compile_layers(model, backend="eager", dynamic=dynamic, recompile_limit=recompile_limit)
        lm = StreamingLM(model, tokenizer.ids.streaming_pad, pad_weight=0.5)
        train = StreamingDataset(read_manifest(bundled_manifest_path("train"))[:24], tokenizer,
                                 DelaySampler.choices((240, 480, 960)))
        held_out = StreamingDataset(read_manifest(bundled_manifest_path("eval"))[:4], tokenizer,
                                    DelaySampler.fixed(480))
        sampler = LengthBucketSampler(train.lengths_in_positions, 300, seed=0)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        shapes = set()
        for epoch in range(epochs):
            sampler.set_epoch(epoch)
            train.set_epoch(epoch)
            for indices in sampler:
                batch = collate([train[i] for i in indices])
                shapes.add(tuple(batch["input_ids"].shape))
                weighted, stats_vector = lm(batch["input_ids"], batch["labels"], batch["num_delay_tokens"],
                                            batch["input_features"])
                (weighted / stats_vector[STAT_NAMES.index("weight")]).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if not evaluate:
                continue
            lm.eval()
            with torch.no_grad():
                batch = collate([held_out[i] for i in range(len(held_out))])
                lm(batch["input_ids"], batch["labels"], batch["num_delay_tokens"], batch["input_features"])
                greedy_decode(model.get_base_model(), tokenizer, batch["input_features"][:2],
                              batch["n_positions"][:2], 6)
            lm.train()
        assert len(shapes) >= 4, shapes  # the run must exercise many bucket shapes to prove anything
        return stats
    finally:
        torch._dynamo.config.recompile_limit = limit
        torch._dynamo.reset()


@pytest.mark.slow  # ~20 graphs traced: about a minute on a quiet core
def test_dynamic_compiled_layers_never_fall_back_to_eager(tiny):
    stats = _bucketed_run(tiny, dynamic=True, recompile_limit=64, epochs=3, evaluate=True)
    assert stats.layers == 4  # tiny: 2 encoder + 2 decoder layers
    assert stats.layer_calls > 100
    assert stats.eager_calls == 0, stats
    assert stats.compiled_fraction == 1.0
    assert 0 < stats.graphs < 64


def test_static_shapes_exhaust_a_small_budget_and_the_fallbacks_are_counted(tiny):
    # The counter can fail: static shapes with a budget of 2 graphs per frame must run some layer calls eagerly.
    stats = _bucketed_run(tiny, dynamic=False, recompile_limit=2, epochs=1, evaluate=False)
    assert stats.eager_calls > 0
    assert stats.compiled_fraction < 1.0
