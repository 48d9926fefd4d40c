"""The FLOP model behind every speed goal (docs/PERFORMANCE.md), as pure functions of a `VoxtralRealtimeConfig`.

Unit: FLOPs per decoder position (80 ms of audio), a multiply-add counted as 2 FLOPs.
- A linear layer with N weights costs 2N per token it runs on. The encoder runs on 4 encoder frames per position
  (`downsample_factor`), the conv stem on 8 mel frames (conv1, stride 1) and 4 frames (conv2, stride 2), the adapter,
  the decoder and the tied lm_head once per position. Biases, norms, activations and RoPE are left out (< 0.1 %).
- Attention: QK^T and PV cost 4 * context * (heads * head_dim) per query per layer, where `context` is the mean
  number of keys a causal sliding-window query sees over the sequence (what an ideal causal kernel must do; a
  masked dense kernel does about twice that, which MFU does not credit).
- The delay conditioning (`ada_rms_norm`) runs once per sample, not per position: its weights are counted as
  parameters but not as per-position FLOPs.
- Backward: a linear layer costs 2x its forward when it needs both the input gradient and the weight gradient, 1x
  when it needs only one of them (a frozen layer that gradients flow through, or a trainable first layer), 0 when no
  gradient reaches it. Attention has no weights; its backward is 2x its forward whenever gradients flow through it.
  LoRA's own rank-r matmuls are left out (rank 16 adds < 1 %).
- Gradient checkpointing re-runs the forward of every checkpointed layer that has a backward (encoder and decoder
  layers, as `enable_gradient_checkpointing` wraps them), and the lm_head when the loss chunks are checkpointed.

MFU counts the FLOPs the step must do (no recomputation); HFU adds the recomputation.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

from transformers import VoxtralRealtimeConfig

from voxtral_train import protocol

Mode = Literal["full", "lora", "encoder_lora", "lora_cached"]
MODES = ("full", "lora", "encoder_lora", "lora_cached")

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s. H200 has the H100 SXM's compute, with more memory.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}

CONV_KERNEL = 3  # both causal convolutions of the stem (docs/MODEL.md, "Shapes")
ADA_NORM_DIM = 32  # bottleneck of the delay conditioning (Linear(dim->32), Linear(32->dim))


@dataclass(frozen=True)
class LinearParams:
    """Weights of the matmuls, per part (biases and norms excluded)."""

    encoder: int  # all encoder layers: q, k, v, o, gate, up, down
    conv_stem: int  # conv1 (mel -> dim) + conv2 (dim -> dim)
    adapter: int  # linear_1 (4 * enc_dim -> dec_dim) + linear_2
    decoder: int  # all decoder layers: q, k, v, o, gate, up, down
    delay_conditioning: int  # ada_rms_norm of every decoder layer (runs once per sample)
    lm_head: int  # tied with the token embeddings: counted once as a matmul here

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))


@dataclass(frozen=True)
class ForwardFlops:
    """Forward FLOPs per decoder position, per part."""

    encoder_linear: float
    encoder_attention: float
    conv_stem: float
    adapter: float
    decoder_linear: float
    decoder_attention: float
    lm_head: float

    @property
    def audio(self) -> float:
        """Encoder + conv stem + adapter: what the frozen-encoder cache saves."""
        return self.encoder_linear + self.encoder_attention + self.conv_stem + self.adapter

    @property
    def text(self) -> float:
        """Decoder + lm_head."""
        return self.decoder_linear + self.decoder_attention + self.lm_head

    @property
    def total(self) -> float:
        return self.audio + self.text


def _layer_linear_params(cfg) -> int:
    """q, k, v, o and the SwiGLU gate, up, down of one transformer layer."""
    q_dim = cfg.num_attention_heads * cfg.head_dim
    kv_dim = cfg.num_key_value_heads * cfg.head_dim
    attention = cfg.hidden_size * (q_dim + 2 * kv_dim) + q_dim * cfg.hidden_size
    return attention + 3 * cfg.hidden_size * cfg.intermediate_size


def linear_params(config: VoxtralRealtimeConfig) -> LinearParams:
    enc, dec = config.audio_config, config.text_config
    return LinearParams(
        encoder=enc.num_hidden_layers * _layer_linear_params(enc),
        conv_stem=CONV_KERNEL * (enc.num_mel_bins * enc.hidden_size + enc.hidden_size * enc.hidden_size),
        adapter=enc.hidden_size * config.downsample_factor * dec.hidden_size + dec.hidden_size * dec.hidden_size,
        decoder=dec.num_hidden_layers * _layer_linear_params(dec),
        delay_conditioning=dec.num_hidden_layers * 2 * dec.hidden_size * ADA_NORM_DIM,
        lm_head=dec.vocab_size * dec.hidden_size,
    )


def mean_causal_context(length: int, window: int | None) -> float:
    """Mean number of keys a query attends to in causal attention over `length` tokens with a sliding window."""
    if length <= 0:
        raise ValueError(f"sequence length must be positive, got {length}")
    w = length if window is None else min(window, length)
    total = w * (w + 1) // 2 + (length - w) * w  # query i (1-based) sees min(i, w) keys
    return total / length


def _attention_flops_per_token(cfg, length: int) -> float:
    return 4 * mean_causal_context(length, cfg.sliding_window) * cfg.num_attention_heads * cfg.head_dim * cfg.num_hidden_layers


def encoder_frames_per_position(config: VoxtralRealtimeConfig) -> int:
    """4: the adapter concatenates `downsample_factor` encoder frames into one position."""
    return config.downsample_factor


def positions_for_clip(seconds: float, delay_ms: float = protocol.DEFAULT_DELAY_MS) -> int:
    """Positions of a padded training sequence for a clip: 424 for 30 s at 480 ms."""
    n_samples = round(seconds * protocol.SAMPLE_RATE)
    return protocol.n_total_positions(n_samples, protocol.delay_ms_to_tokens(delay_ms))


def forward_flops(config: VoxtralRealtimeConfig, positions: int) -> ForwardFlops:
    """Forward FLOPs per position for sequences of `positions` decoder positions (attention depends on length)."""
    params = linear_params(config)
    enc, dec = config.audio_config, config.text_config
    frames = encoder_frames_per_position(config)
    mel_frames = protocol.MEL_FRAMES_PER_POSITION
    conv1 = CONV_KERNEL * enc.num_mel_bins * enc.hidden_size
    conv2 = CONV_KERNEL * enc.hidden_size * enc.hidden_size
    return ForwardFlops(
        encoder_linear=2 * params.encoder * frames,
        encoder_attention=_attention_flops_per_token(enc, positions * frames) * frames,
        conv_stem=2 * (conv1 * mel_frames + conv2 * mel_frames // 2),  # conv2 has stride 2
        adapter=2 * params.adapter,
        decoder_linear=2 * params.decoder,
        decoder_attention=_attention_flops_per_token(dec, positions),
        lm_head=2 * params.lm_head,
    )


@dataclass(frozen=True)
class BackwardPlan:
    """Backward matmuls per forward matmul (0, 1 or 2) of each part, for a training mode."""

    encoder: int
    conv_stem: int
    adapter: int
    decoder: int
    lm_head: int
    audio_runs: bool = True  # False with cached audio embeddings: the audio parts are not run at all


def backward_plan(mode: Mode, *, unfreeze_encoder: bool = False, unfreeze_adapter: bool = False) -> BackwardPlan:
    """Which parts get input and/or weight gradients (see the module docstring)."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: expected one of {MODES}")
    if mode == "full":
        return BackwardPlan(encoder=2, conv_stem=2, adapter=2, decoder=2, lm_head=2)
    if mode == "lora_cached":
        if unfreeze_encoder or unfreeze_adapter:
            raise ValueError("cached audio embeddings need a frozen encoder and adapter")
        return BackwardPlan(encoder=0, conv_stem=0, adapter=0, decoder=1, lm_head=1, audio_runs=False)
    if unfreeze_encoder:  # the whole audio tower trains: weight grads everywhere, input grads through the adapter
        return BackwardPlan(encoder=2, conv_stem=2, adapter=2 if unfreeze_adapter else 1, decoder=1, lm_head=1)
    if mode == "encoder_lora":  # gradients flow through the frozen encoder weights to its LoRA matrices
        return BackwardPlan(encoder=1, conv_stem=0, adapter=2 if unfreeze_adapter else 1, decoder=1, lm_head=1)
    return BackwardPlan(encoder=0, conv_stem=0, adapter=1 if unfreeze_adapter else 0, decoder=1, lm_head=1)


@dataclass(frozen=True)
class StepFlops:
    """FLOPs per position of one training step: `model` is what MFU counts, `recompute` what checkpointing adds."""

    forward: float
    backward: float
    recompute: float

    @property
    def model(self) -> float:
        return self.forward + self.backward

    @property
    def hardware(self) -> float:
        return self.model + self.recompute


def step_flops(
    config: VoxtralRealtimeConfig,
    positions: int,
    mode: Mode = "lora",
    *,
    unfreeze_encoder: bool = False,
    unfreeze_adapter: bool = False,
    gradient_checkpointing: bool = False,
    checkpointed_loss_chunks: bool = False,
) -> StepFlops:
    """Training-step FLOPs per position for sequences of `positions` positions."""
    fwd = forward_flops(config, positions)
    plan = backward_plan(mode, unfreeze_encoder=unfreeze_encoder, unfreeze_adapter=unfreeze_adapter)
    decoder = fwd.decoder_linear * (1 + plan.decoder) + fwd.decoder_attention * (1 + _attention_backward(plan.decoder))
    lm_head = fwd.lm_head * (1 + plan.lm_head)
    audio = 0.0
    if plan.audio_runs:
        audio = (
            fwd.encoder_linear * (1 + plan.encoder)
            + fwd.encoder_attention * (1 + _attention_backward(plan.encoder))
            + fwd.conv_stem * (1 + plan.conv_stem)
            + fwd.adapter * (1 + plan.adapter)
        )
    forward = fwd.text + (fwd.audio if plan.audio_runs else 0.0)
    recompute = 0.0
    if gradient_checkpointing:
        if plan.decoder:
            recompute += fwd.decoder_linear + fwd.decoder_attention
        if plan.audio_runs and plan.encoder:
            recompute += fwd.encoder_linear + fwd.encoder_attention
    if checkpointed_loss_chunks:
        recompute += fwd.lm_head
    return StepFlops(forward=forward, backward=decoder + lm_head + audio - forward, recompute=recompute)


def _attention_backward(linear_backward: int) -> int:
    """Attention has no weights: its backward is 2x its forward whenever gradients flow through the part."""
    return 2 if linear_backward else 0


def mfu(flops_per_position: float, positions_per_s: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the hardware peak (a fraction, 0.45 = 45 %)."""
    if peak_flops <= 0:
        raise ValueError(f"peak_flops must be positive, got {peak_flops}")
    return flops_per_position * positions_per_s / peak_flops
