import numpy as np
import pytest
import soundfile as sf
import soxr

from voxtral_train.audio import AudioError, audio_duration, load_audio, quantise_pcm16
from voxtral_train.protocol import SAMPLE_RATE


def _reason(path, **kw):
    with pytest.raises(AudioError) as err:
        load_audio(path, **kw)
    return err.value.reason


def test_16k_mono_wav_is_returned_unchanged(tmp_path):
    x = (np.arange(3200) % 100 / 100 - 0.5).astype(np.float32)
    sf.write(tmp_path / "a.wav", x, SAMPLE_RATE, subtype="FLOAT")
    y = load_audio(tmp_path / "a.wav", pcm16=False)
    assert y.dtype == np.float32 and np.array_equal(y, x)
    assert audio_duration(tmp_path / "a.wav") == 0.2


def test_pcm16_is_the_16bit_wav_round_trip_and_idempotent(tmp_path):
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.uniform(-1.2, 1.2, 5000), rng.normal(0, 0.01, 5000)]).astype(np.float32)
    sf.write(tmp_path / "f.wav", x, SAMPLE_RATE, subtype="FLOAT")
    sf.write(tmp_path / "i.wav", x, SAMPLE_RATE, subtype="PCM_16")  # what mistral-common sends the model
    served = sf.read(tmp_path / "i.wav", dtype="float32")[0]
    y = load_audio(tmp_path / "f.wav")
    assert y.dtype == np.float32 and np.array_equal(y, served) and not np.array_equal(y, x)
    assert np.array_equal(quantise_pcm16(y), y)  # 16-bit sources are unchanged
    assert np.array_equal(load_audio(tmp_path / "i.wav"), served)


def test_stereo_8k_24bit_is_channel_mean_resampled(tmp_path):
    rng = np.random.default_rng(0)
    stereo = rng.uniform(-0.5, 0.5, size=(4000, 2))
    sf.write(tmp_path / "s.wav", stereo, 8000, subtype="PCM_24")
    stored = sf.read(tmp_path / "s.wav", dtype="float32")[0]  # after 24-bit quantisation
    y = load_audio(tmp_path / "s.wav", pcm16=False)
    assert len(y) == 2 * len(stereo)
    expected = soxr.resample(stored.mean(axis=1), 8000, SAMPLE_RATE, quality="HQ")
    np.testing.assert_allclose(y, expected, atol=1e-6)
    np.testing.assert_allclose(stored.mean(axis=1), stereo.mean(axis=1), atol=1e-6)


def test_segment_reads_only_offset_to_end(tmp_path):
    x = np.linspace(-1, 1, SAMPLE_RATE, dtype=np.float32)
    sf.write(tmp_path / "a.flac", x, SAMPLE_RATE, subtype="PCM_16")
    full = load_audio(tmp_path / "a.flac")
    seg = load_audio(tmp_path / "a.flac", offset=0.25, end=0.5)
    assert np.array_equal(seg, full[4000:8000])


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda p: None, "missing_file"),
        (lambda p: p.write_text("this is text, not audio\n" * 20), "not_audio"),
        (lambda p: p.write_bytes(b""), "empty_file"),
        (lambda p: p.write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt " + bytes(range(200))), "unreadable_audio"),
        (lambda p: sf.write(p, np.zeros(0, np.float32), SAMPLE_RATE), "empty_audio"),
        (lambda p: sf.write(p, np.array([0, np.nan, 0.1], np.float32), SAMPLE_RATE, subtype="FLOAT"), "non_finite_samples"),
        (lambda p: sf.write(p, np.array([0, np.inf, 0.1], np.float32), SAMPLE_RATE, subtype="FLOAT"), "non_finite_samples"),
    ],
    ids=["missing", "text_as_wav", "zero_bytes", "corrupt_header", "empty", "nan", "inf"],
)
def test_bad_files_raise_their_reason(tmp_path, make, reason):
    path = tmp_path / "bad.wav"
    make(path)
    assert _reason(path) == reason
