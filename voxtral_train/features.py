"""Audio -> the model's input: the padded waveform of the streaming layout and its log-mel spectrogram.

`log_mel` is the math of transformers' `VoxtralRealtimeFeatureExtractor` (STFT n_fft 400, hop 160, Hann, centred;
128 Slaney mel bins; last STFT frame dropped; log10 clamped at 1e-10; floored at global max 1.5 - 8; (x + 4) / 4),
computed in torch so that it runs batched, on any device, inside a DataLoader worker, without the extractor's
padding and warnings. A padded stream of P positions gives exactly 8 * P mel frames.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from transformers.audio_utils import mel_filter_bank

from voxtral_train import protocol

N_FFT = protocol.WINDOW_SIZE  # the extractor uses n_fft == win_length == 400
MEL_FLOOR = 1e-10
LOG_MEL_RANGE = 8.0  # decades kept below the global max


def pad_audio(samples: np.ndarray, delay_tokens: int, extra_right_pad: int = 0) -> np.ndarray:
    """zeros(L positions) ‖ audio ‖ zeros(to a whole position, then the right pad + extra): P * 1280 samples."""
    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim != 1:
        raise ValueError(f"expected mono audio of shape [n_samples], got {samples.shape}")
    n_positions = protocol.n_total_positions(len(samples), delay_tokens, extra_right_pad)
    left = protocol.N_LEFT_PAD_TOKENS * protocol.SAMPLES_PER_POSITION
    right = n_positions * protocol.SAMPLES_PER_POSITION - left - len(samples)
    return np.pad(samples, (left, right))


@lru_cache(maxsize=None)
def _mel_filters(device: torch.device) -> torch.Tensor:
    """[n_fft/2 + 1, 128] Slaney filter bank, built once per device."""
    filters = mel_filter_bank(
        num_frequency_bins=1 + N_FFT // 2,
        num_mel_filters=protocol.NUM_MEL_BINS,
        min_frequency=0.0,
        max_frequency=protocol.SAMPLE_RATE / 2,
        sampling_rate=protocol.SAMPLE_RATE,
        norm="slaney",
        mel_scale="slaney",
    )
    return torch.from_numpy(filters).to(device, torch.float32)


def log_mel(padded: np.ndarray | torch.Tensor) -> torch.Tensor:
    """[n_samples] -> [128, n_samples / 160] (or [B, n_samples] -> [B, 128, n_samples / 160]), float32."""
    waveform = torch.as_tensor(padded).to(torch.float32)
    window = torch.hann_window(N_FFT, device=waveform.device)
    stft = torch.stft(waveform, N_FFT, protocol.HOP_LENGTH, window=window, center=True, return_complex=True)
    power = stft[..., :-1].abs() ** 2  # [..., 201, frames]; the last frame is dropped, as upstream does
    mel = _mel_filters(waveform.device).T @ power  # [..., 128, frames]
    log_spec = torch.clamp(mel, min=MEL_FLOOR).log10()
    log_spec = torch.clamp(log_spec, min=protocol.GLOBAL_LOG_MEL_MAX - LOG_MEL_RANGE)
    return (log_spec + 4.0) / 4.0


@lru_cache(maxsize=None)
def silence_value() -> float:
    """The log-mel value of digital silence (what zero padding becomes): the floor, -0.625 with the real settings."""
    return float(log_mel(torch.zeros(protocol.SAMPLES_PER_POSITION))[0, 0])


def pad_features(features: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """[128, 8 * P_i] items -> [B, 128, 8 * P_max], right-padded with the log-mel of silence.

    Both the encoder and the decoder are causal, so padding on the right never changes an earlier position.
    """
    batch = torch.full((len(features), protocol.NUM_MEL_BINS, max(f.shape[1] for f in features)), silence_value())
    for row, item in enumerate(features):
        batch[row, :, : item.shape[1]] = item
    return batch
