"""Delay sampling, segmentation of long recordings, the dataset items, collate and the length-bucket batch sampler."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import soundfile as sf
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from voxtral_train import protocol
from voxtral_train.audio import load_audio
from voxtral_train.batching import LengthBucketSampler, pack, pack_sorted, padding_fraction
from voxtral_train.dataset import StreamingDataset, collate
from voxtral_train.delays import DelaySampler
from voxtral_train.features import log_mel, pad_audio
from voxtral_train.manifest import Utterance, Word, segment_utterance
from voxtral_train.protocol import IGNORE_INDEX
from voxtral_train.targets import build_targets
from voxtral_train.tokenizer import StreamingTokenizer

TOK = StreamingTokenizer.tiny()
SR = protocol.SAMPLE_RATE


# --- delays ---------------------------------------------------------------------------------------------------------
def test_delay_configs():
    assert DelaySampler.from_config(480) == DelaySampler.fixed(480) == DelaySampler.from_config({"fixed_ms": 480})
    assert DelaySampler.from_config({"min_ms": 240, "max_ms": 560}).delays_ms == (240, 320, 400, 480, 560)
    weighted = DelaySampler.from_config({"choices_ms": [480, 960], "weights": [3, 1]})
    assert weighted.weights == (0.75, 0.25) and weighted.max_tokens == 12
    assert DelaySampler.fixed(480).draw(seed=5, epoch=3, index=7) == 6
    bad_configs = [
        {"fixed_ms": 500}, {"min_ms": 960, "max_ms": 480}, {"fixed": 480}, {"choices_ms": [480], "weights": [0]}
    ]
    for bad in bad_configs:
        with pytest.raises(ValueError):
            DelaySampler.from_config(bad)


def test_delay_draws_are_deterministic_and_follow_the_distribution():
    uniform = DelaySampler.uniform(240, 560)
    draws = [uniform.draw(0, 0, i) for i in range(5000)]
    assert draws == [uniform.draw(0, 0, i) for i in range(5000)]  # same (seed, epoch, index) -> same delay
    assert draws != [uniform.draw(0, 1, i) for i in range(5000)]  # a new epoch redraws
    assert draws != [uniform.draw(1, 0, i) for i in range(5000)]
    counts = collections.Counter(draws)
    assert set(counts) == {3, 4, 5, 6, 7} and all(abs(c / 5000 - 0.2) < 0.03 for c in counts.values())
    weighted = collections.Counter(DelaySampler.choices([480, 960], [3, 1]).draw(0, 0, i) for i in range(4000))
    assert abs(weighted[6] / 4000 - 0.75) < 0.03 and set(weighted) == {6, 12}


# --- segmentation ---------------------------------------------------------------------------------------------------
def _utt(words, duration, **kw) -> Utterance:
    return Utterance(id="u", audio="/x.wav", text=" ".join(w.word for w in words), duration=duration, words=words, **kw)


def test_segment_cuts_between_words_exactly():
    words = [Word("a", 0.5, 1.0), Word("b", 1.2, 2.0), Word("c", 2.4, 3.1), Word("d", 8.0, 8.5)]
    segments = segment_utterance(_utt(words, 9.0, offset=10.0), max_seconds=3.0)
    # a, b fit in [0, 3); c would end at 3.1 -> cut at the middle of the 2.0-2.4 gap; d is 5.8 s after: skip silence.
    assert [(s.id, s.offset, s.end, s.text) for s in segments] == [
        ("u#0", 10.0, 12.2, "a b"),
        ("u#1", 12.2, 15.2, "c"),
        ("u#2", 15.5, 18.5, "d"),
    ]
    assert segments[1].words == [Word("c", pytest.approx(0.2), pytest.approx(0.9))]
    assert segments[2].words == [Word("d", 2.5, 3.0)] and segments[2].duration == 3.0


def test_segment_keeps_short_and_rejects_what_it_cannot_cut():
    short = _utt([Word("a", 0.0, 1.0)], 2.0)
    assert segment_utterance(short, 2.0) == [short]
    with pytest.raises(ValueError, match="longer than max_seconds"):
        segment_utterance(_utt([Word("a", 0.0, 4.0)], 5.0), 3.0)
    with pytest.raises(ValueError, match="no word timings"):
        segment_utterance(Utterance(id="v", audio="/x.wav", text="a", duration=9.0), 3.0)
    with pytest.raises(ValueError, match="duration unknown"):
        segment_utterance(Utterance(id="v", audio="/x.wav", text="a", words=[]), 3.0)


@st.composite
def long_utterances(draw):
    t, words = 0.0, []
    for i in range(draw(st.integers(1, 40))):
        start = t + draw(st.floats(0.0, 4.0))
        end = start + draw(st.floats(0.05, 1.4))
        words.append(Word(f"w{i}", start, end))
        t = end
    return _utt(words, t + draw(st.floats(0.0, 3.0)), offset=draw(st.sampled_from([None, 2.0])))


@settings(max_examples=100, deadline=None)
@given(long_utterances(), st.floats(1.5, 10.0))
def test_segment_properties(utt, max_seconds):
    segments = segment_utterance(utt, max_seconds)
    if utt.duration <= max_seconds:
        assert segments == [utt]
        return
    assert [w.word for s in segments for w in s.words] == [w.word for w in utt.words]  # none lost, order kept
    base = utt.offset or 0.0
    originals = {w.word: w for w in utt.words}
    for previous, segment in zip(segments, segments[1:]):
        assert previous.end <= segment.offset + 1e-9  # no overlap
    for segment in segments:
        assert 0 < segment.duration <= max_seconds + 1e-9
        assert segment.end == pytest.approx(segment.offset + segment.duration)
        assert base - 1e-9 <= segment.offset and segment.end <= base + utt.duration + 1e-9
        for w in segment.words:
            assert w.end <= segment.duration + 1e-9  # the word is inside its segment
            assert w.end == pytest.approx(originals[w.word].end - (segment.offset - base))


# --- dataset and collate --------------------------------------------------------------------------------------------
@pytest.fixture
def clips(tmp_path):
    """Two synthetic recordings with word timings: 1.3 s (3 words) and 0.7 s (1 word)."""
    rng = np.random.default_rng(0)
    rows = []
    for name, seconds, words in [
        ("long", 1.3, [Word("the", 0.1, 0.4), Word("cat", 0.45, 0.9), Word("sat", 0.95, 1.25)]),
        ("short", 0.7, [Word("hello", 0.1, 0.6)]),
    ]:
        path = tmp_path / f"{name}.wav"
        sf.write(path, (0.1 * rng.standard_normal(int(seconds * SR))).astype(np.float32), SR)
        rows.append(Utterance(id=name, audio=str(path), text=" ".join(w.word for w in words), duration=seconds,
                              words=words))
    return rows


def test_item_is_targets_plus_features(clips):
    dataset = StreamingDataset(clips, TOK, DelaySampler.fixed(480))
    item = dataset[0]
    samples = load_audio(clips[0].audio)
    targets = build_targets(clips[0].words, TOK, len(samples), 6)
    n = targets.eos_position  # the stream is cut at EOS (nothing from there on is scored)
    assert item["input_ids"].tolist() == targets.input_ids[:n] and item["labels"].tolist() == targets.labels[:n]
    assert set(targets.labels[n:]) == {-100}
    assert item["input_features"].shape == (128, 8 * n)
    torch.testing.assert_close(item["input_features"], log_mel(pad_audio(samples, 6))[:, : 8 * n], rtol=0, atol=0)
    assert (item["num_delay_tokens"].item(), item["n_positions"].item(), item["id"]) == (6, n, "long")
    assert item["audio_seconds"].item() == pytest.approx(1.3)
    untrimmed = StreamingDataset(clips, TOK, DelaySampler.fixed(480), trim_after_eos=False)
    assert untrimmed[0]["input_ids"].tolist() == targets.input_ids
    assert dataset.lengths_in_positions().tolist() == [untrimmed[0]["n_positions"].item(), untrimmed[1]["n_positions"].item()]


def test_lengths_per_epoch_follow_the_drawn_delays(clips):
    dataset = StreamingDataset(clips, TOK, DelaySampler.uniform(80, 2400), seed=4, trim_after_eos=False)
    at_max = dataset.lengths_in_positions()
    for epoch in (0, 1):
        dataset.set_epoch(epoch)
        drawn = dataset.lengths_in_positions(epoch)
        assert drawn.tolist() == [dataset[i]["n_positions"].item() for i in range(len(dataset))]
        assert all(d <= m for d, m in zip(drawn, at_max))
    assert dataset.lengths_in_positions(0).tolist() != dataset.lengths_in_positions(1).tolist()


def test_item_reads_its_segment_and_draws_its_delay(clips):
    segment = Utterance(id="seg", audio=clips[0].audio, text="cat", offset=0.4, end=1.0,
                        words=[Word("cat", 0.05, 0.5)])
    dataset = StreamingDataset([segment], TOK, DelaySampler.uniform(80, 2400), seed=3, trim_after_eos=False)
    delays = []
    for epoch in range(6):
        dataset.set_epoch(epoch)
        item = dataset[0]
        delay = DelaySampler.uniform(80, 2400).draw(3, epoch, 0)
        delays.append(delay)
        assert item["num_delay_tokens"].item() == delay
        assert item["n_positions"].item() == protocol.n_total_positions(int(0.6 * SR), delay)
    assert len(set(delays)) > 1
    torch.testing.assert_close(item["input_features"], log_mel(pad_audio(load_audio(clips[0].audio, 0.4, 1.0), delay)))


def test_item_without_word_timings_names_the_utterance(clips):
    bare = Utterance(id="no_words", audio=clips[0].audio, text="the cat sat", duration=1.3)
    with pytest.raises(ValueError, match="no_words.*data_prep"):
        StreamingDataset([bare], TOK, DelaySampler.fixed(480))[0]


def test_dataset_segments_long_recordings(clips):
    dataset = StreamingDataset(clips, TOK, DelaySampler.fixed(480), max_seconds=1.0)
    assert [u.id for u in dataset.utterances] == ["long#0", "long#1", "short"]
    assert " ".join(u.text for u in dataset.utterances[:2]) == "the cat sat"


def test_collate_pads_to_the_longest(clips):
    dataset = StreamingDataset(clips, TOK, DelaySampler.choices([160, 960]), seed=1)
    items = [dataset[0], dataset[1]]
    batch = collate(items)
    n = [it["n_positions"].item() for it in items]
    p_max = max(n)
    assert batch["input_features"].shape == (2, 128, 8 * p_max) and batch["input_features"].dtype == torch.float32
    assert batch["input_ids"].shape == batch["labels"].shape == (2, p_max)
    assert batch["input_ids"].dtype == batch["labels"].dtype == batch["num_delay_tokens"].dtype == torch.long
    assert batch["n_positions"].tolist() == n and batch["ids"] == ["long", "short"]
    assert batch["num_delay_tokens"].tolist() == [it["num_delay_tokens"].item() for it in items]
    assert batch["audio_seconds"].tolist() == pytest.approx([1.3, 0.7])
    silence = log_mel(np.zeros(protocol.SAMPLES_PER_POSITION, np.float32))[0, 0].item()
    for row, item in enumerate(items):
        k = n[row]
        assert torch.equal(batch["input_features"][row, :, : 8 * k], item["input_features"])
        assert torch.equal(batch["input_ids"][row, :k], item["input_ids"])
        assert torch.equal(batch["labels"][row, :k], item["labels"])
        assert torch.all(batch["input_features"][row, :, 8 * k :] == silence)
        assert torch.all(batch["input_ids"][row, k:] == TOK.ids.streaming_pad)
        assert torch.all(batch["labels"][row, k:] == IGNORE_INDEX)
    assert n[0] != n[1]  # the test pads something


# --- batching -------------------------------------------------------------------------------------------------------
LENGTHS = np.random.default_rng(0).integers(50, 400, size=500).tolist()


def _all(sampler) -> list[list[int]]:
    return list(iter(sampler))


@pytest.mark.parametrize("bucketing", [True, False])
def test_sampler_budget_coverage_and_determinism(bucketing):
    sampler = LengthBucketSampler(LENGTHS, 2000, seed=7, bucketing=bucketing)
    epoch0 = _all(sampler)
    assert all(len(b) * max(LENGTHS[i] for i in b) <= 2000 for b in epoch0)
    assert sorted(i for b in epoch0 for i in b) == list(range(len(LENGTHS)))  # every item once
    assert epoch0 == _all(LengthBucketSampler(LENGTHS, 2000, seed=7, bucketing=bucketing))
    sampler.set_epoch(1)
    assert _all(sampler) != epoch0
    assert _all(LengthBucketSampler(LENGTHS, 2000, seed=8, bucketing=bucketing)) != epoch0


def test_lengths_may_change_per_epoch():
    per_epoch = {e: np.random.default_rng(e).integers(50, 400, size=300).tolist() for e in range(3)}
    sampler = LengthBucketSampler(per_epoch.__getitem__, 2000, seed=1)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        lengths = per_epoch[epoch]
        batches = _all(sampler)
        assert all(len(b) * max(lengths[i] for i in b) <= 2000 for b in batches)
        assert padding_fraction(batches, lengths) < 0.05
    with pytest.raises(ValueError, match="epoch 0"):
        LengthBucketSampler(lambda epoch: [10, 3000], 2000)


def test_bucketing_wastes_less_than_random_batches():
    bucketed = padding_fraction(LengthBucketSampler(LENGTHS, 4000, seed=0).epoch_batches(0), LENGTHS)
    random = padding_fraction(LengthBucketSampler(LENGTHS, 4000, seed=0, bucketing=False).epoch_batches(0), LENGTHS)
    assert bucketed < 0.05 < random


def test_packing_sorted_lengths_per_batch_equals_packing_per_item():
    rng = np.random.default_rng(0)
    for budget in (400, 2000, 8000):
        for _ in range(30):
            lengths = np.sort(rng.integers(40, 400, size=int(rng.integers(1, 600))))
            assert pack_sorted(lengths, budget).tolist() == pack(lengths, budget).tolist()
    assert pack_sorted(np.array([400, 400, 400]), 400).tolist() == [1, 1, 1]


def test_the_plan_is_the_greedy_packing_of_the_sorted_shuffle_in_shuffled_order():
    lengths = np.asarray(LENGTHS)
    for seed, epoch in ((0, 0), (3, 2)):
        rng = np.random.default_rng([seed, epoch])  # what the sampler draws, in its order
        order = rng.permutation(len(lengths))
        order = order[np.argsort(lengths[order], kind="stable")]
        ends = np.cumsum(pack(lengths[order], 2000))
        batches = [order[end - size: end].tolist() for end, size in zip(ends, pack(lengths[order], 2000))]
        expected = [batches[i] for i in rng.permutation(len(batches))]
        assert LengthBucketSampler(LENGTHS, 2000, seed=seed).epoch_batches(epoch) == expected


def test_padding_fraction_by_hand():
    assert padding_fraction([[0, 1], [2]], [10, 30, 5]) == pytest.approx(1 - 45 / 65)


def test_ranks_get_disjoint_equal_shares():
    shares = [_all(LengthBucketSampler(LENGTHS, 1500, seed=3, num_replicas=3, rank=r)) for r in range(3)]
    assert len({len(s) for s in shares}) == 1
    assert len(shares[0]) == len(LengthBucketSampler(LENGTHS, 1500, seed=3, num_replicas=3, rank=0))
    seen = [i for share in shares for b in share for i in b]
    assert len(seen) == len(set(seen))
    all_batches = LengthBucketSampler(LENGTHS, 1500, seed=3).epoch_batches(0)
    assert len(shares[0]) == len(all_batches) // 3
    assert [b for s in zip(*shares) for b in s] == all_batches[: 3 * len(shares[0])]


def test_resume_continues_at_the_same_batch():
    unbroken = LengthBucketSampler(LENGTHS, 2000, seed=11, num_replicas=2, rank=1)
    unbroken.set_epoch(2)
    expected = _all(unbroken)

    first = LengthBucketSampler(LENGTHS, 2000, seed=11, num_replicas=2, rank=1)
    first.set_epoch(2)
    iterator = iter(first)
    consumed = [next(iterator) for _ in range(4)]
    next(iterator)  # prefetched by a DataLoader, never trained on
    state = first.state_dict(consumed_batches=4)

    resumed = LengthBucketSampler(LENGTHS, 2000, seed=11, num_replicas=2, rank=1)
    resumed.load_state_dict(state)
    assert len(resumed) == len(expected) - 4
    resumed.set_epoch(2)  # the training loop's own set_epoch keeps the pending skip
    assert consumed + _all(resumed) == expected
    assert _all(resumed) == expected  # the skip applies once
    skipper = LengthBucketSampler(LENGTHS, 2000, seed=11, num_replicas=2, rank=1)
    skipper.set_epoch(2)
    skipper.skip_batches(6)
    assert _all(skipper) == expected[6:]
    with pytest.raises(ValueError, match="seed: saved 11, now 12"):
        LengthBucketSampler(LENGTHS, 2000, seed=12, num_replicas=2, rank=1).load_state_dict(state)


def test_sampler_refuses_items_over_budget():
    with pytest.raises(ValueError, match="item 1 with 300 positions"):
        LengthBucketSampler([100, 300], 250)


def test_batches_feed_the_model_and_right_padding_changes_nothing(clips):
    """A DataLoader batch runs through the tiny model; each item's logits equal those of the item alone (the encoder
    and decoder are causal, so the right padding needs no attention mask)."""
    from voxtral_train.model import load_model

    model, tokenizer = load_model("tiny")
    model.eval()
    dataset = StreamingDataset(clips, tokenizer, DelaySampler.choices([160, 960]), seed=1)
    sampler = LengthBucketSampler(dataset.lengths_in_positions(0), max_positions_per_batch=10_000, seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)
    batch = next(iter(loader))
    assert len(batch["ids"]) == 2 and len(set(batch["n_positions"].tolist())) == 2
    with torch.no_grad():
        logits = model(input_features=batch["input_features"], input_ids=batch["input_ids"],
                       num_delay_tokens=batch["num_delay_tokens"], use_cache=False).logits
        assert logits.shape[:2] == batch["input_ids"].shape
        for row in range(2):
            n = batch["n_positions"][row].item()
            alone = model(input_features=batch["input_features"][row : row + 1, :, : 8 * n],
                          input_ids=batch["input_ids"][row : row + 1, :n],
                          num_delay_tokens=batch["num_delay_tokens"][row : row + 1], use_cache=False).logits
            torch.testing.assert_close(logits[row, :n], alone[0], atol=1e-4, rtol=1e-4)


def test_a_delay_is_a_positive_multiple_of_one_position():
    """0 ms passes nothing downstream (mistral-common refuses such a tekken.json), 100 ms is off the grid."""
    for bad in (0, -80, 100):
        with pytest.raises(ValueError, match="positive multiple of 80 ms"):
            protocol.delay_ms_to_tokens(bad)
    sampler = DelaySampler.choices([240, 2400])
    assert sampler.delays_tokens == (3, 30) and sampler.delays_ms == (240, 2400)
