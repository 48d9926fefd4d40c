"""Two narrow fixes to transformers' `VoxtralRealtimeModel.forward` (5.10-5.24) for training.

1. Upstream fuses audio with `inputs_embeds += audio_embeds`, in place. When the embedding output is a leaf that
   requires grad (frozen embeddings + `enable_input_require_grads()`, which PEFT and gradient checkpointing use), that
   raises "a leaf Variable that requires grad is being used in an in-place operation"; it also mutates a caller's
   `inputs_embeds`. We add out of place.
2. Upstream accepts one delay per forward (`torch.full((1,), num_delay_tokens)`). Training mixes delays in a batch,
   so we accept a `[batch]` tensor and give each sample its own delay conditioning.

The fix is bound to one model instance (`apply_training_fixes(model)`), not to the class, so other models in the
process keep upstream behaviour. Everything else is upstream's code path: the encoder, projector, time embedding and
decoder are called exactly as upstream calls them.
"""

from __future__ import annotations

import types

import torch
from transformers.models.voxtral_realtime.modeling_voxtral_realtime import (
    VoxtralRealtimeForConditionalGeneration,
    VoxtralRealtimeModel,
    VoxtralRealtimeModelOutputWithPast,
)


def delay_conditioning(model: VoxtralRealtimeModel, num_delay_tokens: int | torch.Tensor, batch_size: int,
                       like: torch.Tensor) -> torch.Tensor:
    """t_cond for each sample: [batch or 1, 1, dim], from upstream's own sinusoidal time embedding.

    Upstream's embedding concatenates cos and sin along dim 0, so for n delays shaped [n, 1] it returns
    [cos_1..cos_n, sin_1..sin_n] stacked as [2n, dim/2]; we re-pair the halves. One call for the whole batch keeps
    the module-call count independent of the batch (ZeRO-3 requires every rank to call the same modules).
    """
    delays = torch.as_tensor(num_delay_tokens, device=like.device, dtype=like.dtype).reshape(-1, 1)
    n = delays.shape[0]
    if n not in (1, batch_size):
        raise ValueError(f"num_delay_tokens has {n} values for a batch of {batch_size}")
    cos_then_sin = model.time_embedding(delays)  # [2n, dim/2]
    t_cond = torch.cat([cos_then_sin[:n], cos_then_sin[n:]], dim=-1)  # [n, dim]
    return t_cond[:, None, :]


def _fixed_forward(
    self: VoxtralRealtimeModel,
    input_ids: torch.LongTensor | None = None,
    input_features: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.LongTensor | None = None,
    cache=None,
    encoder_cache=None,
    padding_cache=None,
    inputs_embeds: torch.Tensor | None = None,
    encoder_inputs_embeds: torch.Tensor | None = None,
    use_cache: bool | None = None,
    num_delay_tokens: int | torch.Tensor | None = None,
    past_key_values=None,
    **kwargs,
) -> VoxtralRealtimeModelOutputWithPast:
    if (input_ids is None) ^ (inputs_embeds is not None):
        raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
    if cache is None:
        cache = past_key_values  # the deprecated name, still used by generate()
    if use_cache is None:
        use_cache = self.config.use_cache
    if num_delay_tokens is None:
        num_delay_tokens = self.config.default_num_delay_tokens
    if inputs_embeds is None:
        inputs_embeds = self.get_input_embeddings()(input_ids)

    audio_outputs = None
    if input_features is not None or encoder_inputs_embeds is not None:
        audio_outputs = self.get_audio_features(
            input_features=input_features,
            encoder_inputs_embeds=encoder_inputs_embeds,
            cache=encoder_cache,
            padding_cache=padding_cache,
            use_cache=use_cache,
            return_dict=True,
        )
        # Fix 1: out of place (see module docstring).
        inputs_embeds = inputs_embeds + audio_outputs.pooler_output.to(inputs_embeds.device)

    # Fix 2: one delay per sample.
    t_cond = delay_conditioning(self, num_delay_tokens, inputs_embeds.shape[0], inputs_embeds)
    outputs = self.language_model(
        attention_mask=attention_mask,
        position_ids=position_ids,
        cache=cache,
        inputs_embeds=inputs_embeds,
        use_cache=use_cache,
        t_cond=t_cond,
        **kwargs,
    )
    return VoxtralRealtimeModelOutputWithPast(
        last_hidden_state=outputs.last_hidden_state,
        cache=outputs.cache,
        hidden_states=outputs.hidden_states,
        attentions=outputs.attentions,
        encoder_cache=audio_outputs.cache if (audio_outputs is not None and use_cache) else None,
        padding_cache=audio_outputs.padding_cache if (audio_outputs is not None and use_cache) else None,
        audio_hidden_states=audio_outputs.pooler_output if audio_outputs is not None else None,
    )


def apply_training_fixes(model: VoxtralRealtimeForConditionalGeneration) -> VoxtralRealtimeForConditionalGeneration:
    """Bind the fixed forward to this model's inner `VoxtralRealtimeModel`. Idempotent."""
    inner = model.model
    inner.forward = types.MethodType(_fixed_forward, inner)
    inner._voxtral_train_fixed = True
    return model
