"""Positions after EOS are cut (never scored, causally inert): loss and gradients are exactly those of the full stream.
Also: items indexed by (epoch, index), what persistent DataLoader workers receive."""

import torch

from voxtral_train import protocol
from voxtral_train.batching import LengthBucketSampler
from voxtral_train.dataset import StreamingDataset, collate
from voxtral_train.delays import DelaySampler
from voxtral_train.manifest import bundled_manifest_path, read_manifest
from voxtral_train.streaming_lm import StreamingLM


def _datasets(tokenizer, n: int = 6):
    rows = read_manifest(bundled_manifest_path("train"))[:n]
    delays = DelaySampler.choices((240, 960))
    return (StreamingDataset(rows, tokenizer, delays, trim_after_eos=False),
            StreamingDataset(rows, tokenizer, delays, trim_after_eos=True))


def _loss_and_grads(model, lm, batch):
    model.zero_grad(set_to_none=True)
    weighted, stats = lm(batch["input_ids"], batch["labels"], batch["num_delay_tokens"], batch["input_features"])
    weighted.backward()
    return weighted.detach(), stats, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_trimmed_stream_gives_the_same_loss_and_gradients(tiny):
    model, tokenizer = tiny()
    model.train()
    lm = StreamingLM(model, tokenizer.ids.streaming_pad, pad_weight=0.5, z_loss=1e-3)
    full, trimmed = _datasets(tokenizer)
    full_batch, trimmed_batch = collate([full[i] for i in range(6)]), collate([trimmed[i] for i in range(6)])
    # Every item lost its positions from EOS on (up to RIGHT_PAD_BUFFER_TOKENS), features to match, no target.
    cut = full_batch["n_positions"] - trimmed_batch["n_positions"]
    assert ((cut >= 1) & (cut <= protocol.RIGHT_PAD_BUFFER_TOKENS)).all() and cut.sum() >= 12, cut
    frames = protocol.MEL_FRAMES_PER_POSITION * trimmed_batch["input_ids"].shape[1]
    assert trimmed_batch["input_features"].shape[-1] == frames
    for row, n in enumerate(trimmed_batch["n_positions"].tolist()):
        assert (full_batch["labels"][row, n:] == -100).all()
        assert full_batch["input_ids"][row, n] == tokenizer.ids.eos

    loss_full, stats_full, grads_full = _loss_and_grads(model, lm, full_batch)
    loss_trim, stats_trim, grads_trim = _loss_and_grads(model, lm, trimmed_batch)
    torch.testing.assert_close(loss_trim, loss_full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats_trim, stats_full, rtol=1e-5, atol=1e-5)
    assert grads_full.keys() == grads_trim.keys() and len(grads_full) > 10
    for name, grad in grads_full.items():  # equal up to fp32 summation order (other matmul shapes)
        assert (grads_trim[name] - grad).abs().max() <= 1e-5 * grad.abs().max(), name


def test_lengths_for_batching_bound_the_trimmed_items(tiny):
    _, tokenizer = tiny()
    _, trimmed = _datasets(tokenizer)
    trimmed.set_epoch(3)
    for bound, item in zip(trimmed.lengths_in_positions(3), (trimmed[i] for i in range(len(trimmed)))):
        assert bound - protocol.RIGHT_PAD_BUFFER_TOKENS <= int(item["n_positions"]) < bound


def test_epoch_tagged_keys_draw_that_epochs_delay(tiny):
    _, tokenizer = tiny()
    _, data = _datasets(tokenizer)
    data.set_epoch(0)  # a persistent worker's copy: stuck at epoch 0
    by_epoch = {e: [int(data[(e, i)]["num_delay_tokens"]) for i in range(len(data))] for e in range(4)}
    assert len({tuple(d) for d in by_epoch.values()}) > 1  # delays really change with the epoch
    for e, delays in by_epoch.items():
        data.set_epoch(e)
        assert delays == [int(data[i]["num_delay_tokens"]) for i in range(len(data))]
    sampler = LengthBucketSampler(data.lengths_in_positions, 400, seed=0, tag_epoch=True)
    sampler.set_epoch(2)
    batches = list(sampler)
    assert {key for batch in batches for key in batch} == {(2, i) for i in range(len(data))}
