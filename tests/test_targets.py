"""The target builder: one hand-built stream, then properties over random word timings."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from voxtral_train import protocol
from voxtral_train.manifest import Word
from voxtral_train.protocol import IGNORE_INDEX
from voxtral_train.targets import build_targets, frame_index, prompt_ids
from voxtral_train.tokenizer import StreamingTokenizer

TOK = StreamingTokenizer.tiny()
BOS, EOS, PAD, WORD = TOK.ids.bos, TOK.ids.eos, TOK.ids.streaming_pad, TOK.ids.streaming_word
VOCAB = ["the", "cat", "a", "hello", "world", "again", "sat", "on", "mat", "Über", "x"]


def test_worked_example_exact_stream():
    # The module docstring's example: 480 ms, 1.2 s of audio, "the" and "cat" share slot 45, "a" at 51.
    the, cat, a = TOK.encode_word("the"), TOK.encode_word("cat"), TOK.encode_word("a")
    assert (len(the), len(cat), len(a)) == (1, 2, 1)
    words = [Word("the", 0.30, 0.50), Word("cat", 0.51, 0.55), Word("a", 0.90, 1.00)]
    t = build_targets(words, TOK, n_samples=19_200, delay_tokens=6)
    expected = (
        [BOS] + [PAD] * 44  # x_0 .. x_44: prompt (39) and 6 pads
        + [WORD, the[0], cat[0], cat[1]]  # x_45 .. x_48
        + [PAD, PAD]  # x_49, x_50
        + [WORD, a[0]]  # x_51, x_52
        + [PAD, EOS]  # x_53, x_54
        + [PAD] * 9  # x_55 .. x_63
    )
    assert t.input_ids == expected
    assert t.labels == [IGNORE_INDEX] * 38 + expected[39:55] + [IGNORE_INDEX] * 10
    assert (t.n_positions, t.extra_right_pad, t.eos_position) == (64, 0, 54)
    assert t.word_slots == [45, 45, 51]
    assert t.word_positions == [46, 47, 52]


def test_slot_of_a_word_ending_at_one_second_is_51_at_480ms():
    t = build_targets([Word("a", 0.5, 1.0)], TOK, n_samples=32_000, delay_tokens=6)
    assert t.word_slots == [51] and t.input_ids[51] == WORD


def test_start_anchor_and_offset_frames():
    words = [Word("a", 0.40, 1.00)]
    assert build_targets(words, TOK, 32_000, 6, anchor="start").word_slots == [39 + 5]
    assert build_targets(words, TOK, 32_000, 6, offset_frames=1).word_slots == [52]
    assert build_targets(words, TOK, 32_000, 6, anchor="start", offset_frames=-9).word_slots == [39]
    with pytest.raises(ValueError, match="anchor"):
        build_targets(words, TOK, 32_000, 6, anchor="middle")


def test_decimal_times_land_on_their_frame():
    assert [frame_index(s) for s in (0.0, 0.0799, 0.08, 0.24, 0.56, 1.0)] == [0, 0, 1, 3, 7, 12]


def test_no_words_gives_pads_then_eos_after_the_audio():
    t = build_targets([Word("  ", 0.1, 0.2)], TOK, n_samples=1281, delay_tokens=2)  # 2 audio positions
    pl = protocol.prompt_length(2)
    assert t.input_ids == prompt_ids(TOK, 2) + [PAD, PAD, EOS] + [PAD] * (t.n_positions - pl - 3)
    assert t.word_slots == [] and t.eos_position == pl + 2


def test_late_words_extend_the_right_pad():
    # 0.16 s of audio (2 positions) but a long word ending at 3 s: slot far beyond the standard stream.
    n = 2560
    word = Word("Über", 2.9, 3.0)
    t = build_targets([word], TOK, n_samples=n, delay_tokens=0)
    slot = protocol.prompt_length(0) + 37
    assert t.word_slots == [slot]
    assert t.eos_position == slot + 1 + len(TOK.encode_word("Über"))
    assert t.n_positions == t.eos_position + 1 == protocol.n_total_positions(n, 0, t.extra_right_pad)
    assert t.extra_right_pad == t.n_positions - protocol.n_total_positions(n, 0) > 0
    assert t.labels[-2] == EOS and t.labels[-1] == IGNORE_INDEX


@st.composite
def timed_words(draw):
    """Words in order with non-decreasing, often colliding times, within or slightly past the audio."""
    n = draw(st.integers(0, 12))
    t = 0.0
    words = []
    for _ in range(n):
        start = t + draw(st.floats(0.0, 0.6))
        end = start + draw(st.floats(0.0, 0.7))
        words.append(Word(draw(st.sampled_from(VOCAB)), round(start, 3), round(end, 3)))
        t = end
    n_samples = draw(st.integers(1, int((t + 0.5) * protocol.SAMPLE_RATE) + 1))
    return words, n_samples


@settings(max_examples=150, deadline=None)
@given(timed_words(), st.integers(0, 30), st.sampled_from(["end", "start"]), st.integers(-2, 2))
def test_stream_properties(case, delay, anchor, offset_frames):
    words, n_samples = case
    t = build_targets(words, TOK, n_samples, delay, anchor=anchor, offset_frames=offset_frames)
    pl = protocol.prompt_length(delay)
    P = protocol.n_total_positions(n_samples, delay, t.extra_right_pad)

    # Lengths agree with the protocol.
    assert len(t.input_ids) == len(t.labels) == t.n_positions == P
    # The prompt, then the transcript in order, and exactly one EOS after the audio.
    assert t.input_ids[:pl] == prompt_ids(TOK, delay)
    assert TOK.decode(t.input_ids) == " ".join(w.word for w in words)
    assert t.input_ids.count(EOS) == 1 and t.input_ids[t.eos_position] == EOS
    assert t.eos_position >= pl + protocol.n_audio_positions(n_samples)
    assert all(x == PAD for x in t.input_ids[t.eos_position + 1 :])
    # Labels: shifted inputs, masking exactly the prompt (first pl-1) and the tail from EOS on.
    assert t.labels[: pl - 1] == [IGNORE_INDEX] * (pl - 1)
    assert t.labels[pl - 1 : t.eos_position] == t.input_ids[pl : t.eos_position + 1]
    assert t.labels[t.eos_position :] == [IGNORE_INDEX] * (P - t.eos_position)
    # Extension only when needed: the standard stream would have been too short.
    assert t.extra_right_pad == max(0, t.eos_position + 1 - protocol.n_total_positions(n_samples, delay))

    # Every word: never before its slot; a new group exactly when its slot was free; pieces contiguous.
    previous_last, groups = pl - 1, 0
    for word, slot, first in zip(words, t.word_slots, t.word_positions, strict=True):
        anchor_s = word.end if anchor == "end" else word.start
        assert slot == max(pl, pl + frame_index(anchor_s) + offset_frames)
        pieces = TOK.encode_word(word.word)
        assert t.input_ids[first : first + len(pieces)] == pieces
        if slot > previous_last:
            assert first == slot + 1 and t.input_ids[slot] == WORD
            groups += 1
        else:  # collision: shifted later, right after the previous word, no new [STREAMING_WORD]
            assert first == previous_last + 1
        assert first > slot
        previous_last = first + len(pieces) - 1
    assert t.input_ids.count(WORD) == groups
