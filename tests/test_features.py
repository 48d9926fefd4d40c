"""Padding layout and log-mel features against transformers' VoxtralRealtimeFeatureExtractor."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import torch
from transformers.models.voxtral_realtime.feature_extraction_voxtral_realtime import VoxtralRealtimeFeatureExtractor

from voxtral_train import protocol
from voxtral_train.audio import load_audio
from voxtral_train.features import log_mel, pad_audio, silence_value
from voxtral_train.manifest import bundled_manifest_path, read_manifest

EXTRACTOR = VoxtralRealtimeFeatureExtractor()


def _reference(padded: np.ndarray) -> torch.Tensor:
    return EXTRACTOR(padded, sampling_rate=protocol.SAMPLE_RATE, return_tensors="pt").input_features[0]


def _synthetic(n: int, seed: int = 0) -> np.ndarray:
    """Noise + a tone + a chirp: energy across the spectrum and a wide dynamic range."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / protocol.SAMPLE_RATE
    audio = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * (100 + 3000 * t) * t)
    return (audio + 0.05 * rng.standard_normal(n)).astype(np.float32)


def _speech(tmp_path) -> np.ndarray:
    """A real speech clip: the bundled set's first clip, or one made with espeak-ng."""
    manifest = bundled_manifest_path("train")
    if manifest.is_file():
        return load_audio(read_manifest(manifest)[0].audio)
    if shutil.which("espeak-ng") is None:
        pytest.skip("neither the bundled speech set nor espeak-ng is available")
    wav = tmp_path / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(wav), "A small bird saw the new garden."], check=True)
    return load_audio(wav)


@pytest.mark.parametrize("n_samples,delay,extra", [(1, 0, 0), (1280, 6, 0), (21_001, 6, 3), (16_000, 30, 0)])
def test_pad_audio_layout(n_samples, delay, extra):
    audio = _synthetic(n_samples)
    padded = pad_audio(audio, delay, extra)
    n_positions = protocol.n_total_positions(n_samples, delay, extra)
    left = protocol.N_LEFT_PAD_TOKENS * protocol.SAMPLES_PER_POSITION
    assert padded.dtype == np.float32 and padded.shape == (n_positions * protocol.SAMPLES_PER_POSITION,)
    assert not padded[:left].any() and not padded[left + n_samples :].any()
    np.testing.assert_array_equal(padded[left : left + n_samples], audio)
    # Right pad = rounding up to a whole position, then (d + 11 + extra) positions.
    rounded = -(-n_samples // protocol.SAMPLES_PER_POSITION) * protocol.SAMPLES_PER_POSITION
    assert len(padded) - left - rounded == (delay + 11 + extra) * protocol.SAMPLES_PER_POSITION


def test_log_mel_matches_transformers_on_speech(tmp_path):
    padded = pad_audio(_speech(tmp_path), delay_tokens=6)
    ours, reference = log_mel(padded), _reference(padded)
    assert ours.shape == reference.shape == (protocol.NUM_MEL_BINS, 8 * len(padded) // protocol.SAMPLES_PER_POSITION)
    assert torch.max(torch.abs(ours - reference)).item() <= 1e-5


def test_log_mel_matches_transformers_on_synthetic_and_batched():
    a = pad_audio(_synthetic(17_777, seed=1), 2, 1)
    b = pad_audio(_synthetic(17_777, seed=2), 2, 1)
    batch = log_mel(torch.from_numpy(np.stack([a, b])))
    assert batch.shape == (2, protocol.NUM_MEL_BINS, 8 * protocol.n_total_positions(17_777, 2, 1))
    for row, padded in zip(batch, (a, b)):
        assert torch.max(torch.abs(row - _reference(padded))).item() <= 1e-5


def test_silence_value_is_the_floor():
    # log10(1e-10) = -10 is floored at 1.5 - 8 = -6.5, then (x + 4) / 4.
    assert silence_value() == pytest.approx((protocol.GLOBAL_LOG_MEL_MAX - 8 + 4) / 4)
    assert torch.all(log_mel(np.zeros(5 * protocol.SAMPLES_PER_POSITION, np.float32)) == silence_value())


# ---- the audio the served model sees: 16-bit PCM (data.pcm16) -------------------------------------------------------

def _served_features(tmp_path, audio: np.ndarray) -> torch.Tensor:
    """Features of `audio` through transformers' VoxtralRealtimeProcessor, i.e. mistral-common's request path (what
    vLLM serves too), built offline from the tiny tokenizer. Its instruct tokenizer needs two more named specials
    ([ARGS], [CALL_ID]); they go into unused slots, as they play no part in transcription."""
    import json

    from transformers import VoxtralRealtimeProcessor
    from transformers.tokenization_mistral_common import MistralCommonBackend

    from voxtral_train.tokenizer import StreamingTokenizer

    tekken = json.loads(StreamingTokenizer.tiny().tekken_path.read_text())
    for token in tekken["special_tokens"]:
        token["token_str"] = {20: "[ARGS]", 21: "[CALL_ID]"}.get(token["rank"], token["token_str"])
    (tmp_path / "tekken.json").write_text(json.dumps(tekken))
    processor = VoxtralRealtimeProcessor(feature_extractor=VoxtralRealtimeFeatureExtractor(),
                                         tokenizer=MistralCommonBackend(tokenizer_path=str(tmp_path / "tekken.json")))
    out = processor(audio, sampling_rate=protocol.SAMPLE_RATE, return_tensors="pt")
    assert int(out.num_delay_tokens) == 6  # the tekken.json default, 480 ms
    return out.input_features[0]


def test_pcm16_features_equal_the_served_processor_and_float_ones_do_not(tmp_path):
    import soundfile as sf

    from voxtral_train.dataset import StreamingDataset
    from voxtral_train.delays import DelaySampler
    from voxtral_train.manifest import Utterance, Word
    from voxtral_train.tokenizer import StreamingTokenizer

    audio = _synthetic(37_000)  # a float WAV: 16-bit quantisation changes it
    sf.write(tmp_path / "clip.wav", audio, protocol.SAMPLE_RATE, subtype="FLOAT")
    served = _served_features(tmp_path, sf.read(tmp_path / "clip.wav", dtype="float32")[0])
    utt = Utterance("clip", str(tmp_path / "clip.wav"), "a tone", 37_000 / protocol.SAMPLE_RATE,
                    words=[Word("a", 0.2, 0.5), Word("tone", 0.6, 1.0)])

    def training_features(pcm16: bool) -> torch.Tensor:
        dataset = StreamingDataset([utt], StreamingTokenizer.tiny(), DelaySampler.fixed(480), pcm16=pcm16)
        return dataset[0]["input_features"]

    # Training items may end early (at EOS): they are a prefix of the same log-mel, which covers all of the audio.
    audio_frames = protocol.MEL_FRAMES_PER_POSITION * (protocol.N_LEFT_PAD_TOKENS + protocol.n_audio_positions(37_000))
    for ours in (training_features(True), log_mel(pad_audio(load_audio(utt.audio), 6))):  # training, evaluation
        assert audio_frames <= ours.shape[1] <= served.shape[1] and ours.shape[0] == served.shape[0]
        assert torch.max(torch.abs(ours - served[:, : ours.shape[1]])).item() <= 1e-6
    unquantised = training_features(False)
    assert torch.max(torch.abs(unquantised - served[:, : unquantised.shape[1]])).item() > 1e-3  # data.pcm16=false
