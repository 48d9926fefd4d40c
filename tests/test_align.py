"""Self-alignment: the Viterbi recovers a known placement, and its timings rebuild the same target stream."""

import numpy as np
import pytest
import torch

from voxtral_train import protocol
from voxtral_train.align import AlignmentError, self_align, slots_to_words, viterbi_word_slots
from voxtral_train.manifest import Word
from voxtral_train.targets import build_targets
from voxtral_train.tokenizer import StreamingTokenizer

DELAY = 6


def _peaked_logp(stream: list[int], vocab: int) -> torch.Tensor:
    """Row p puts 0.9 on x_{p+1}: the log-probs of a model that has learned exactly this stream."""
    logp = torch.full((len(stream), vocab), float(np.log(0.1 / (vocab - 1))))
    for p in range(len(stream) - 1):
        logp[p, stream[p + 1]] = float(np.log(0.9))
    return logp


def test_viterbi_recovers_the_slots_of_a_built_stream():
    tokenizer = StreamingTokenizer.tiny()
    words = [Word("hello", 0.1, 0.45), Word("there", 0.5, 1.21), Word("friend", 1.3, 2.0)]
    n_samples = int(2.4 * protocol.SAMPLE_RATE)
    targets = build_targets(words, tokenizer, n_samples, DELAY)
    word_tokens = [[tokenizer.ids.streaming_word, *tokenizer.encode_word(w.word)] for w in words]
    slots = viterbi_word_slots(_peaked_logp(targets.input_ids, tokenizer.vocab_size), word_tokens,
                               tokenizer.ids.streaming_pad, protocol.prompt_length(DELAY))
    assert slots == targets.word_slots  # no collisions in this example: every word opens its group at its slot
    # and the recovered times rebuild the identical stream
    rebuilt = build_targets(slots_to_words([w.word for w in words], slots, DELAY), tokenizer, n_samples, DELAY)
    assert rebuilt.input_ids == targets.input_ids and rebuilt.labels == targets.labels


def test_viterbi_hand_example():
    # 8 positions, vocab {0: pad, 1: word, 2: a, 3: b}; two one-piece words; first slot 2.
    logp = torch.full((8, 4), -5.0)
    logp[:, 0] = -0.1
    logp[2, 1], logp[3, 2] = -0.1, -0.1  # row 2 scores x_3 = WORD, row 3 scores x_4 = a  -> word "a" at slot 3
    logp[4, 1], logp[5, 3] = -0.1, -0.1  # word "b" at slot 5
    assert viterbi_word_slots(logp, [[1, 2], [1, 3]], pad_id=0, first_slot=2) == [3, 5]


def test_viterbi_refuses_what_cannot_fit():
    with pytest.raises(AlignmentError):
        viterbi_word_slots(torch.zeros(5, 4), [[1, 2, 2], [1, 3, 3]], pad_id=0, first_slot=2)


def test_self_align_on_tiny_model_gives_ordered_times_inside_the_stream(tiny):
    model, tokenizer = tiny()
    samples = np.random.default_rng(0).normal(0, 0.1, int(1.5 * protocol.SAMPLE_RATE)).astype(np.float32)
    words = self_align(model, tokenizer, samples, "one two three")
    assert [w.word for w in words] == ["one", "two", "three"]
    ends = [w.end for w in words]
    assert ends == sorted(ends) and all(w.start <= w.end for w in words)
    # every word fits the stream that the target builder makes from these times
    targets = build_targets(words, tokenizer, len(samples), DELAY)
    assert tokenizer.decode(targets.input_ids) == "one two three"


def test_prep_cli_self_aligns_untimed_rows(tmp_path):
    import json

    import soundfile as sf

    from data_prep.cli import main

    clips = tmp_path / "clips"
    clips.mkdir()
    rng = np.random.default_rng(1)
    sf.write(clips / "a.wav", rng.normal(0, 0.1, 16000).astype(np.float32), 16000)
    (clips / "a.txt").write_text("good morning")
    assert main(["folder", str(clips), "--out", str(tmp_path / "out"), "--self-align-model", "tiny"]) == 0
    row = json.loads((tmp_path / "out" / "manifest.jsonl").read_text().splitlines()[0])
    assert row["timing_source"] == "self_align"
    assert [w["word"] for w in row["words"]] == ["good", "morning"]
