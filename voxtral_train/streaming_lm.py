"""The model and its streaming loss as one module: the forward every caller shares.

Training, teacher-forced evaluation, the anchor probe and the benchmarks all run `StreamingLM`, so a benchmark
times the trainer's own step. It is also what accelerate / DeepSpeed wrap: under ZeRO-3 the tied lm_head must be
gathered inside a module's forward, and the loss projects hidden states through it chunk by chunk
(`voxtral_train.loss`), never materialising `[batch, positions, vocab]` logits.
"""

from __future__ import annotations

import torch
from peft import PeftModel

from voxtral_train.config import ConfigError
from voxtral_train.loss import CHUNKED, backend_problems, streaming_loss_sums


def unwrap_peft(model: torch.nn.Module) -> torch.nn.Module:
    """The HF `VoxtralRealtimeForConditionalGeneration` inside a PEFT wrapper (LoRA layers stay injected)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


class StreamingLM(torch.nn.Module):
    """`model` (plain or PEFT-wrapped) plus the weighted streaming loss. `forward` returns
    (weighted loss sum, detached statistics vector `voxtral_train.loss.STAT_NAMES`)."""

    def __init__(self, model: torch.nn.Module, pad_id: int, *, pad_weight: float = 1.0, text_weight: float = 1.0,
                 z_loss: float = 0.0, chunk_positions: int = 1024, fused_loss: bool = True,
                 loss_backend: str = CHUNKED):
        super().__init__()
        problems = backend_problems(loss_backend)  # before any step: a missing package or GPU is one line each
        if problems:
            raise ConfigError(problems)
        self.model = model
        self.pad_id = pad_id
        self.pad_weight, self.text_weight, self.z_loss = pad_weight, text_weight, z_loss
        self.chunk_positions = chunk_positions
        self.fused_loss = fused_loss  # logit gradients made in the loss forward (voxtral_train.loss._FusedLinearCE)
        self.loss_backend = loss_backend  # train.loss_backend: an optional fused kernel library for training steps

    @property
    def base(self) -> torch.nn.Module:
        return unwrap_peft(self.model)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, num_delay_tokens: torch.Tensor,
                input_features: torch.Tensor | None = None, audio_embeds: torch.Tensor | None = None,
                min_chunks: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        base = self.base
        embeddings = base.get_input_embeddings()
        if audio_embeds is not None:  # frozen-encoder cache (voxtral_train.embedding_cache): skip the encoder
            inputs = {"inputs_embeds": embeddings(input_ids) + audio_embeds.to(embeddings.weight.dtype)}
        else:
            inputs = {"input_ids": input_ids, "input_features": input_features.to(embeddings.weight.dtype)}
        hidden = base.model(  # final hidden states [B, P, D]; the loss makes the logits in chunks
            **inputs, num_delay_tokens=num_delay_tokens, use_cache=False,
        ).last_hidden_state
        sums = streaming_loss_sums(hidden, base.lm_head, labels, self.pad_id, pad_weight=self.pad_weight,
                                   text_weight=self.text_weight, z_loss=self.z_loss,
                                   chunk_positions=self.chunk_positions, min_chunks=min_chunks, fused=self.fused_loss,
                                   backend=self.loss_backend)
        return sums.weighted, sums.stats()
