"""Greedy streaming decode: agrees with teacher forcing, with itself one-by-one, and with the live (online) mode."""

import numpy as np
import pytest
import torch

from voxtral_train import protocol
from voxtral_train.decode import greedy_decode, online_decode, token_time, words_with_times
from voxtral_train.features import log_mel, pad_audio, silence_value
from voxtral_train.manifest import Word
from voxtral_train.targets import build_targets, prompt_ids


@pytest.fixture(scope="module")
def lively():
    """The tiny model with larger random weights: its output varies with audio and input tokens (the default
    init emits one token forever, which would let an off-by-one position pass unnoticed)."""
    from voxtral_train import load_model

    model, tokenizer = load_model("tiny", seed=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0, 4.0 / param.shape[-1] ** 0.5, generator=generator)
    return model.eval(), tokenizer


def _clips(seconds, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(int(s * protocol.SAMPLE_RATE)) * 0.1).astype(np.float32) for s in seconds]


def _batch(clips, delays):
    """Features padded with silence to the longest, as data.collate does."""
    feats = [log_mel(pad_audio(a, d)) for a, d in zip(clips, delays)]
    lengths = [f.shape[1] // protocol.MEL_FRAMES_PER_POSITION for f in feats]
    batch = torch.full((len(feats), protocol.NUM_MEL_BINS, max(f.shape[1] for f in feats)), silence_value())
    for row, f in enumerate(feats):
        batch[row, :, : f.shape[1]] = f
    return feats, lengths, batch


CLIP_SECONDS, DELAYS = (1.0, 1.7, 0.6), (6, 3, 12)


def test_greedy_equals_teacher_forced_argmax_over_its_own_output(lively):
    model, tokenizer = lively
    clips = _clips(CLIP_SECONDS)
    feats, lengths, batch = _batch(clips, DELAYS)
    decoded = greedy_decode(model, tokenizer, batch, lengths, list(DELAYS))
    for out, feat, n_pos, delay in zip(decoded, feats, lengths, DELAYS):
        first = protocol.prompt_length(delay)
        assert len(set(out.token_ids)) > 2, "the lively model should not emit one token forever"
        # Stops at EOS or after x_P, the token predicted by the last position that has audio.
        assert out.token_ids[-1] == tokenizer.ids.eos or len(out.token_ids) == n_pos - first + 1
        assert tokenizer.ids.eos not in out.token_ids[:-1]
        stream = prompt_ids(tokenizer, delay) + out.token_ids
        n_in = len(stream) - 1  # every token but the last is an input
        logits = model(input_ids=torch.tensor([stream[:n_in]]), input_features=feat[None, :, : 8 * n_in],
                       num_delay_tokens=delay, use_cache=False).logits[0]
        assert logits.argmax(-1)[first - 1 :].tolist() == stream[first:]


def test_batched_mixed_delays_equals_one_by_one(lively):
    model, tokenizer = lively
    clips = _clips(CLIP_SECONDS, seed=1)
    feats, lengths, batch = _batch(clips, DELAYS)
    together = greedy_decode(model, tokenizer, batch, torch.tensor(lengths), torch.tensor(DELAYS))
    for out, feat, n_pos, delay in zip(together, feats, lengths, DELAYS):
        alone = greedy_decode(model, tokenizer, feat[None], [n_pos], delay)[0]
        assert (alone.token_ids, alone.text, alone.words) == (out.token_ids, out.text, out.words)
    # The delay conditioning matters: the same clip at another delay decodes differently.
    other_features = log_mel(pad_audio(clips[0], 3))
    other = greedy_decode(model, tokenizer, other_features[None], [other_features.shape[1] // 8], 3)[0]
    assert other.token_ids != together[0].token_ids


@pytest.mark.parametrize("seconds,delay", [(0.9, 6), (0.5, 2)])
def test_online_equals_offline(lively, seconds, delay):
    model, tokenizer = lively
    (clip,) = _clips([seconds], seed=2)
    features = log_mel(pad_audio(clip, delay))
    offline = greedy_decode(model, tokenizer, features[None], [features.shape[1] // 8], delay)[0]
    online = online_decode(model, tokenizer, clip, delay)
    assert online.token_ids == offline.token_ids
    assert online.words == offline.words


def test_word_times_follow_the_target_slot_rule(lively):
    _, tokenizer = lively
    delay = 6
    words = [Word("the", 0.0, 0.50), Word("cat", 0.2, 0.55), Word("sat", 0.6, 1.00), Word("down", 1.0, 1.37)]
    targets = build_targets(words, tokenizer, int(1.5 * protocol.SAMPLE_RATE), delay)
    first = protocol.prompt_length(delay)
    emitted = targets.input_ids[first : targets.eos_position + 1]
    timed = words_with_times(tokenizer, emitted, delay)
    assert [w for w, _ in timed] == ["the", "cat", "sat", "down"]
    # Slots: the/cat share 39 + 6 = 45, sat 39 + 12 = 51, down 39 + 17 = 56; time = (slot - 39 + 1) * 0.08.
    assert [round(t, 6) for _, t in timed] == [0.56, 0.56, 1.04, 1.44]
    for (_, t), word in zip(timed, words):
        if word.word != "cat":  # "cat" shares the marker of "the"
            assert 0 < t - word.end <= protocol.POSITION_SECONDS + 1e-9


def test_word_times_of_a_hand_built_stream(lively):
    _, tokenizer = lively
    ids, delay = tokenizer.ids, 2
    first = protocol.prompt_length(delay)
    the, cat = tokenizer.encode_word("the"), tokenizer.encode_word("cat")
    pad, word = ids.streaming_pad, ids.streaming_word
    # pieces without a marker (index 1) take their own time; a pad ends a run; a marker opens one.
    emitted = [pad] + the + [pad, word] + cat + [ids.eos]
    timed = words_with_times(tokenizer, emitted, delay)
    marker_index = first + 1 + len(the) + 1
    assert timed == [("the", token_time(first + 1, delay)), ("cat", token_time(marker_index, delay))]
    assert token_time(first, delay) == pytest.approx(protocol.POSITION_SECONDS)
