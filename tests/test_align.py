"""Self-alignment: the Viterbi recovers a known placement, and its timings rebuild the same target stream.
CTC alignment: the trellis recovers planted paths, and a tiny random wav2vec2 folder times every word."""

import itertools

import numpy as np
import pytest
import torch

from voxtral_train import protocol
from voxtral_train.align import (AlignmentError, ctc_char_ids, ctc_forced_align, ctc_word_timings, self_align,
                                 slots_to_words, viterbi_word_slots)
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


# --- CTC forced alignment -------------------------------------------------------------------------------------------

def _ctc_logp(frame_ids: list[int], vocab: int, peak: float = 0.9) -> torch.Tensor:
    """Row t puts `peak` on frame_ids[t] and shares the rest: emissions whose best path is exactly `frame_ids`."""
    logp = torch.full((len(frame_ids), vocab), float(np.log((1 - peak) / (vocab - 1))))
    logp[torch.arange(len(frame_ids)), torch.tensor(frame_ids)] = float(np.log(peak))
    return logp


def test_ctc_hand_example():
    # blank 0; target "a a b" = [1, 1, 2]; path: _ a a _ a b b _  (the repeat needs the blank at frame 3)
    path = [0, 1, 1, 0, 1, 2, 2, 0]
    assert ctc_forced_align(_ctc_logp(path, 3), [1, 1, 2], blank_id=0) == [(1, 2), (4, 4), (5, 6)]
    # every frame says "a": a repeated "a a" still has to spend the middle frame on a blank
    assert ctc_forced_align(_ctc_logp([1, 1, 1], 3), [1, 1], blank_id=0) == [(0, 0), (2, 2)]


def test_ctc_prefers_the_likely_path_over_the_peaks_of_a_wrong_token():
    # frames 1-2 strongly say token 2, but the target is [1]: the token must go where 1 is most likely (frame 3)
    logp = torch.log(torch.tensor([[.8, .1, .1], [.15, .05, .8], [.15, .05, .8], [.3, .6, .1], [.8, .1, .1]]))
    assert ctc_forced_align(logp, [1], blank_id=0) == [(3, 3)]


def test_ctc_refuses_targets_longer_than_the_frames():
    with pytest.raises(AlignmentError):
        ctc_forced_align(torch.zeros(3, 4), [1, 1, 2], blank_id=0)  # needs 4 frames: a blank between the 1s


def test_ctc_recovers_random_planted_alignments():
    rng = np.random.default_rng(0)
    for _ in range(50):
        vocab, n = 6, int(rng.integers(1, 8))
        targets = rng.integers(1, vocab, n).tolist()
        path, planted = [0] * int(rng.integers(0, 3)), []
        for i, token in enumerate(targets):
            if i and token == targets[i - 1]:
                path.append(0)  # a repeat is only readable after a blank
            path += [0] * int(rng.integers(0, 3))
            start = len(path)
            path += [token] * int(rng.integers(1, 4))
            planted.append((start, len(path) - 1))
        path += [0] * int(rng.integers(0, 3))
        assert ctc_forced_align(_ctc_logp(path, vocab), targets, blank_id=0) == planted, (targets, path)


def test_ctc_word_timings_use_character_spans_and_skip_unknown_words():
    # vocab {0: blank, 1: |, 2: h, 3: i}; words "hi" "?!" "ih": frames _ h i | i h _ _ , 0.02 s each
    path = [0, 2, 3, 1, 3, 2, 0, 0]
    words = ctc_word_timings(_ctc_logp(path, 4), ["Hi,", "?!", "ih"], [[2, 3], [], [3, 2]], blank_id=0,
                             seconds_per_frame=0.02, delimiter_id=1)
    assert words == [Word("Hi,", 0.02, 0.06), Word("?!", 0.06, 0.06), Word("ih", 0.08, 0.12)]


def test_ctc_char_ids_match_the_vocabulary_case_and_drop_the_rest():
    vocab = {"<pad>": 0, "|": 1, "H": 2, "I": 3, "'": 4}
    assert ctc_char_ids("hi,'|", vocab, skip={0, 1}) == [2, 3, 4]


def _tiny_wav2vec2(folder) -> None:
    """A random 2-layer Wav2Vec2ForCTC with a character vocabulary, saved like a real checkpoint (no download)."""
    import json

    from transformers import (Wav2Vec2Config, Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC,
                              Wav2Vec2Processor)

    chars = list("abcdefghijklmnopqrstuvwxyz'")
    vocab = {"<pad>": 0, "<unk>": 1, "|": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    tokenizer = Wav2Vec2CTCTokenizer(str(folder / "vocab.json"), unk_token="<unk>", pad_token="<pad>",
                                     word_delimiter_token="|")
    extractor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                                         return_attention_mask=False)
    config = Wav2Vec2Config(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, conv_dim=(32, 32), conv_kernel=(10, 3), conv_stride=(5, 2),
                            num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, pad_token_id=0,
                            feat_extract_norm="group", do_stable_layer_norm=False)
    torch.manual_seed(0)
    Wav2Vec2ForCTC(config).save_pretrained(folder)
    Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(folder)


def test_ctc_align_utterances_and_prep_cli_with_a_tiny_wav2vec2(tmp_path):
    import json

    import soundfile as sf

    from data_prep.cli import main
    from voxtral_train.align import ctc_align_utterances
    from voxtral_train.manifest import Utterance

    model_dir = tmp_path / "w2v"
    _tiny_wav2vec2(model_dir)
    clips = tmp_path / "clips"
    clips.mkdir()
    sf.write(clips / "a.wav", np.random.default_rng(2).normal(0, 0.1, 16000).astype(np.float32), 16000)
    text = "Good morning, 42 friends"
    utterances = [Utterance("a", str(clips / "a.wav"), text)]
    assert ctc_align_utterances(utterances, str(model_dir)) == 1
    words = utterances[0].words
    assert [w.word for w in words] == text.split() and utterances[0].timing_source == "ctc_align"
    assert all(0 <= w.start <= w.end <= 1.0 for w in words)
    assert all(a.end <= b.start for a, b in itertools.pairwise(words))
    assert all(w.end > w.start for i, w in enumerate(words) if i != 2)  # "42" has no letter: zero length

    (clips / "a.txt").write_text(text)
    assert main(["folder", str(clips), "--out", str(tmp_path / "out"), "--ctc-align-model", str(model_dir)]) == 0
    row = json.loads((tmp_path / "out" / "manifest.jsonl").read_text().splitlines()[0])
    assert row["timing_source"] == "ctc_align"
    assert [w["word"] for w in row["words"]] == text.split()
