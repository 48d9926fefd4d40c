"""The frozen-encoder audio-embedding cache: exact prefixes across paddings, fingerprints, and identical training."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
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
    EmbeddingStore,
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
    assert sorted(p.name.split("-")[0] for p in first.folder.iterdir()) == ["data", "index"]

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


# ---- the store: a few append-only files, bounded open files, verified reads, shared by processes --------------------

def entry(i: int) -> torch.Tensor:
    """Entry i: 8 x 128 float32 = 4096 bytes, its values telling which entry it is."""
    return torch.arange(8 * 128, dtype=torch.float32).reshape(8, 128) + 1000 * i


def test_many_batches_make_few_files_and_open_few_at_a_time(tmp_path):
    store = EmbeddingStore(tmp_path, max_file_bytes=16 * 4096, pool_size=3)
    for batch in range(50):
        store.put({f"k{4 * batch + j}": entry(4 * batch + j) for j in range(4)})
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 1 + 200 // 16 + 1 and names[-1].startswith("index-")  # 13 data files + 1 index
    reader = EmbeddingStore(tmp_path, pool_size=3)
    fds_before = len(os.listdir("/proc/self/fd"))
    for i in np.random.default_rng(0).permutation(200):
        assert torch.equal(reader.get(f"k{i}", 8), entry(int(i)))
        assert reader.open_files <= 3 and len(os.listdir("/proc/self/fd")) <= fds_before + 3
    assert reader.get("k0", 9) is None and reader.get("absent", 1) is None  # too short / unknown: a miss
    assert reader.stats.failed_checks == 0


def test_a_truncated_or_damaged_entry_is_a_miss_not_a_crash(tmp_path):
    store = EmbeddingStore(tmp_path)
    store.put({f"k{i}": entry(i) for i in range(4)})
    store.close()
    (data,) = tmp_path.glob("data-*.bin")
    raw = bytearray(data.read_bytes())
    raw[4096 + 17] ^= 0xFF  # a flipped byte in entry 1
    data.write_bytes(bytes(raw[: 3 * 4096 + 100]))  # and entry 3 cut short
    reader = EmbeddingStore(tmp_path)
    assert [reader.get(f"k{i}", 8) is None for i in range(4)] == [False, True, False, True]
    assert reader.stats.failed_checks == 2 and torch.equal(reader.get("k2", 8), entry(2))
    (tmp_path / "index-broken.jsonl").write_text('{"key": "x", "file": \n')  # a damaged index line is no entry
    assert EmbeddingStore(tmp_path).get("x", 1) is None


def test_a_damaged_cache_file_is_recomputed_to_the_same_embeddings(tiny, rows, tmp_path):
    model, tokenizer = lora_model(tiny)
    data = dataset(rows[:2], tokenizer)
    batch = collate([data[0], data[1]])
    args = (batch["input_features"], batch["n_positions"], batch["num_delay_tokens"])
    embeds = AudioEmbeddingCache(tmp_path, model, data.delay_sampler.max_tokens).embeddings_for(*args)
    (data_file,) = (tmp_path).glob("*/data-*.bin")
    data_file.write_bytes(data_file.read_bytes()[:100])
    again = AudioEmbeddingCache(tmp_path, model, data.delay_sampler.max_tokens)
    assert torch.equal(again.embeddings_for(*args), embeds)
    assert (again.stats.hits, again.stats.misses, again.stats.failed_checks) == (0, 2, 2)


SHARED_WRITER = """
import sys, time, torch
from voxtral_train.embedding_cache import EmbeddingStore
folder, me, other = sys.argv[1], sys.argv[2], sys.argv[3]
value = lambda name, i: torch.full((5, 16), float(i)) + (0.5 if name == "a" else 0.25)
store = EmbeddingStore(folder, max_file_bytes=4096, refresh_seconds=0)
for i in range(40):
    store.put({f"{me}{i}": value(me, i)})
deadline = time.monotonic() + 60
while store.get(f"{other}39", 5) is None:  # the other process's last entry
    assert time.monotonic() < deadline, "the other writer's entries never showed up"
    time.sleep(0.05)
assert all(torch.equal(store.get(f"{name}{i}", 5), value(name, i)) for name in "ab" for i in range(40))
print("ok", store.stats.failed_checks)
"""


def test_two_processes_share_a_folder(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", SHARED_WRITER, str(tmp_path), me, other], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for me, other in (("a", "b"), ("b", "a"))]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert [out for out, _ in results] == ["ok 0\n", "ok 0\n"]
    names = [p.name for p in tmp_path.iterdir()]
    assert sum(n.startswith("index-") for n in names) == 2 and sum(n.startswith("data-") for n in names) >= 4
