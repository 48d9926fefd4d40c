"""Encoder attention whose cost follows its sliding window, not the clip length.

The audio encoder attends causally within a window of 750 frames (15 s). Below that length SDPA runs causal
(flash kernels); from 750 frames on transformers hands SDPA a dense [frames, frames] mask, so a 30 s clip does
2.9x the windowed work and a 120 s clip 8.8x. `"window_blocks"` (registered with transformers' attention and mask
interfaces) splits the queries into blocks of one window; block [s, e) attends keys [s - window + 1, e) with SDPA,
at most two windows of keys: <= 2x the windowed work at any length, and the same result (`tests/test_window_attention.py`).
Shorter inputs, or calls with a KV cache (streaming decode: queries fewer than keys), use plain SDPA.

    use_window_blocks(model)   # the encoder only; the decoder keeps its implementation
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

NAME = "window_blocks"


def _no_mask(*args: Any, **kwargs: Any) -> None:
    """The window is applied inside the attention function: no [frames, frames] mask is ever built."""
    return None


def window_blocks_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                            sliding_window: int | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """query [B, H, S, D], key/value [B, H_kv, S, D] -> ([B, S, H, D], None), causal within `sliding_window`."""
    length = query.shape[2]
    if sliding_window is None or length <= sliding_window or key.shape[2] != length or attention_mask is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    positions = torch.arange(length, device=query.device)
    out = []
    for start in range(0, length, sliding_window):
        end = min(start + sliding_window, length)
        first = max(0, start - sliding_window + 1)
        q_pos, k_pos = positions[start:end, None], positions[None, first:end]
        allowed = (k_pos <= q_pos) & (k_pos > q_pos - sliding_window)  # [Sq, Sk], as transformers' sliding mask
        out.append(torch.nn.functional.scaled_dot_product_attention(
            query[:, :, start:end], key[:, :, first:end], value[:, :, first:end], attn_mask=allowed,
            dropout_p=dropout if module.training else 0.0, scale=scaling))
    return torch.cat(out, dim=2).transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, window_blocks_attention)
AttentionMaskInterface.register(NAME, _no_mask)


def use_window_blocks(model: torch.nn.Module) -> None:
    """Run the audio encoder of `model` (plain or PEFT-wrapped) with `window_blocks` attention."""
    from voxtral_train.streaming_lm import unwrap_peft

    unwrap_peft(model).model.audio_tower.set_attn_implementation(NAME)
