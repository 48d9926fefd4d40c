"""data.stream_seconds: consecutive utterances of one speaker as one stream (one prompt, one EOS, words at their
offset), checked against hand-built streams."""

import numpy as np
import pytest
import soundfile as sf
import torch

from voxtral_train import protocol
from voxtral_train.audio import load_audio
from voxtral_train.dataset import StreamingDataset, streams
from voxtral_train.delays import DelaySampler
from voxtral_train.features import log_mel, pad_audio
from voxtral_train.manifest import Utterance, Word
from voxtral_train.targets import build_targets
from voxtral_train.tokenizer import StreamingTokenizer

TOK = StreamingTokenizer.tiny()
SR = protocol.SAMPLE_RATE


def _row(tmp_path, name: str, seconds: float, words: list[Word], **extra) -> Utterance:
    path = tmp_path / f"{name}.wav"
    sf.write(path, (0.1 * np.random.default_rng(len(name)).standard_normal(int(seconds * SR))).astype(np.float32), SR)
    return Utterance(id=name, audio=str(path), text=" ".join(w.word for w in words), duration=seconds, words=words,
                     extra=extra)


def test_two_clips_make_one_stream_with_words_at_their_offset(tmp_path):
    a = _row(tmp_path, "a", 1.2, [Word("the", 0.1, 0.4), Word("cat", 0.5, 1.0)], speaker="s1")
    b = _row(tmp_path, "b", 0.8, [Word("sat", 0.2, 0.6)], speaker="s1")
    data = StreamingDataset([a, b], TOK, DelaySampler.fixed(480), stream_seconds=5.0)
    assert len(data) == 1
    item = data[0]
    # Hand-built: the audio back to back, "sat" moved by a's 1.2 s, one prompt, one EOS.
    samples = np.concatenate([load_audio(a.audio), load_audio(b.audio)])
    words = [Word("the", 0.1, 0.4), Word("cat", 0.5, 1.0), Word("sat", 1.4, 1.8)]
    targets = build_targets(words, TOK, len(samples), 6)
    n = targets.eos_position
    assert item["input_ids"].tolist() == targets.input_ids[:n]
    assert item["labels"].tolist() == targets.labels[:n]
    torch.testing.assert_close(item["input_features"], log_mel(pad_audio(samples, 6))[:, : 8 * n], rtol=0, atol=0)
    ids = item["input_ids"].tolist()
    assert ids.count(TOK.ids.bos) == 1 and item["labels"].tolist().count(TOK.ids.eos) == 1
    assert item["id"] == "a+b" and item["audio_seconds"].item() == pytest.approx(2.0)
    # Per-clip items pay the prompt twice: the stream saves at least one prompt.
    per_clip = StreamingDataset([a, b], TOK, DelaySampler.fixed(480))
    assert n <= sum(int(per_clip[i]["n_positions"]) for i in range(2)) - protocol.prompt_length(6)
    assert data.lengths_in_positions(0)[0] >= n


def test_streams_hold_one_speaker_and_the_budget():
    def row(i: int, seconds: float, speaker: str | None) -> Utterance:
        return Utterance(id=str(i), audio="x.wav", text="w", duration=seconds,
                         extra={} if speaker is None else {"speaker": speaker})

    rows = [row(0, 6, "a"), row(1, 6, "a"), row(2, 6, "b"), row(3, 20, "b"), row(4, 12, "b"), row(5, 40, "b"),
            row(6, 3, None), row(7, 3, None)]
    assert streams(rows, 30.0) == [[0, 1], [2, 3], [4], [5], [6, 7]]
    assert streams(rows, 6.0) == [[0], [1], [2], [3], [4], [5], [6, 7]]
    assert streams(rows, 5.0) == [[i] for i in range(8)]
