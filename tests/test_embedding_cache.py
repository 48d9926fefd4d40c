"""The frozen-encoder audio-embedding cache: exact prefixes across paddings, fingerprints, and identical training."""

from __future__ import annotations

import pytest
import torch

from voxtral_train import protocol
from voxtral_train.audio import load_audio
from voxtral_train.config import PeftSettings
from voxtral_train.dataset import StreamingDataset, collate
from voxtral_train.delays import DelaySampler
from voxtral_train.embedding_cache import (
    AudioEmbeddingCache,
    EmbeddingCacheError,
    inner_model,
)
from voxtral_train.features import log_mel, pad_audio, silence_value
from voxtral_train.loss import STAT_NAMES
from voxtral_train.manifest import bundled_manifest_path, read_manifest
from voxtral_train.streaming_lm import StreamingLM
from voxtral_train.trainable import apply_trainable_policy

FRAMES = protocol.MEL_FRAMES_PER_POSITION


@pytest.fixture(scope="module")
def rows():
    return read_manifest(bundled_manifest_path("train"))[:6]


def test_longer_padding_holds_shorter_padding_as_exact_prefix(tiny, rows):
    model, _ = tiny()
    samples = load_audio(rows[0].audio)
    short = log_mel(pad_audio(samples, delay_tokens=0))  # right pad 11 positions: the shortest there is
    long = log_mel(pad_audio(samples, delay_tokens=30, extra_right_pad=3))
    n_short = short.shape[-1]
    assert n_short == FRAMES * protocol.n_total_positions(len(samples), 0)
    # Log-mel: the centred STFT reflects zeros at the end, so the short stream is an exact prefix ...
    assert torch.equal(long[:, :n_short], short)
    # ... and what the longer pad adds is the log-mel of silence, which collate pads with.
    assert torch.equal(long[:, n_short:], torch.full_like(long[:, n_short:], silence_value()))
    with torch.no_grad():
        e_short = model.model.get_audio_features(input_features=short[None]).pooler_output[0]
        e_long = model.model.get_audio_features(input_features=long[None]).pooler_output[0]
    assert e_short.shape[0] == n_short // FRAMES
    torch.testing.assert_close(e_long[: e_short.shape[0]], e_short, atol=1e-6, rtol=0)
    # The tail is not trivially equal to the prefix's end: the check above compares real numbers.
    assert not torch.allclose(e_short[:5], e_short[-5:])


def lora_model(tiny):
    model, tokenizer = tiny(seed=0)
    return apply_trainable_policy(model, PeftSettings(rank=4, alpha=8, dropout=0.0)), tokenizer


def dataset(rows, tokenizer):
    # Three delays drawn per item and epoch: the second epoch reuses entries stored under other delays.
    return StreamingDataset(rows, tokenizer, DelaySampler.choices([240, 480, 960]), seed=3)


def train_losses(tiny, rows, cache_root=None, epochs=2):
    """A few AdamW LoRA steps; returns (losses, LoRA weights, cache)."""
    model, tokenizer = lora_model(tiny)
    data = dataset(rows, tokenizer)
    cache = AudioEmbeddingCache(cache_root, model, data.delay_sampler.max_tokens) if cache_root else None
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    lm = StreamingLM(model, tokenizer.ids.streaming_pad, pad_weight=0.5)  # the trainer's forward + loss
    losses = []
    for epoch in range(epochs):
        data.set_epoch(epoch)
        for batch_rows in ([0, 1, 2], [3, 4, 5]):
            batch = collate([data[i] for i in batch_rows])
            inputs = {key: batch[key] for key in ("input_ids", "labels", "num_delay_tokens")}
            if cache is None:
                inputs["input_features"] = batch["input_features"]
            else:
                inputs["audio_embeds"] = cache.embeddings_for(batch["input_features"], batch["n_positions"],
                                                              batch["num_delay_tokens"])
            weighted, stats = lm(**inputs)
            loss = weighted / stats[STAT_NAMES.index("weight")]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return losses, lora, cache


def test_training_with_cache_equals_training_without(tiny, rows, tmp_path):
    plain_losses, plain_lora, _ = train_losses(tiny, rows)
    cached_losses, cached_lora, cache = train_losses(tiny, rows, tmp_path)
    assert cache.stats.misses == len(rows) and cache.stats.hits == len(rows)  # epoch 2 came from the cache
    assert len(plain_losses) == 4 and plain_losses[0] != plain_losses[-1]
    for a, b in zip(plain_losses, cached_losses):
        assert abs(a - b) <= 1e-5, (plain_losses, cached_losses)
    assert plain_lora.keys() == cached_lora.keys() and plain_lora
    for name in plain_lora:
        # Adam divides by sqrt(v): where a gradient is near zero, float noise of 1e-7 in it moves the weight by up to
        # ~lr * 3e-3 after four steps (2.7e-5 seen at lr 1e-2, on weights of ~0.04), the same with or without cache.
        torch.testing.assert_close(cached_lora[name], plain_lora[name], atol=5e-5, rtol=1e-4, msg=name)


def test_entries_persist_and_a_changed_encoder_is_a_miss(tiny, rows, tmp_path):
    model, tokenizer = lora_model(tiny)
    data = dataset(rows[:2], tokenizer)
    batch = collate([data[0], data[1]])
    first = AudioEmbeddingCache(tmp_path, model, data.delay_sampler.max_tokens)
    embeds = first.embeddings_for(batch["input_features"], batch["n_positions"], batch["num_delay_tokens"])
    assert first.stats.misses == 2
    assert not list(first.folder.glob(".*tmp")) and len(list(first.folder.glob("shard-*.safetensors"))) == 1

    again = AudioEmbeddingCache(tmp_path, model, data.delay_sampler.max_tokens)  # a new process: reads the shard
    assert again.folder == first.folder
    assert torch.equal(again.embeddings_for(batch["input_features"], batch["n_positions"],
                                            batch["num_delay_tokens"]), embeds)
    assert (again.stats.hits, again.stats.misses) == (2, 0)

    with torch.no_grad():
        inner_model(model).audio_tower.layers[0].self_attn.q_proj.weight[0, 0] += 1e-3
    changed = AudioEmbeddingCache(tmp_path, model, data.delay_sampler.max_tokens)
    assert changed.folder != first.folder
    changed.embeddings_for(batch["input_features"], batch["n_positions"], batch["num_delay_tokens"])
    assert (changed.stats.hits, changed.stats.misses) == (0, 2)


def test_refuses_a_trainable_encoder(tiny, tmp_path):
    model, _ = tiny()
    model = apply_trainable_policy(model, PeftSettings(rank=4, unfreeze_adapter=True))
    with pytest.raises(EmbeddingCacheError, match="multi_modal_projector.*requires grad"):
        AudioEmbeddingCache(tmp_path, model, max_delay_tokens=6)
