"""voxtral-train: fine-tuning for Mistral's streaming speech-to-text model Voxtral Mini 4B Realtime."""

from __future__ import annotations

from typing import Any

__all__ = ["load_model"]


def __getattr__(name: str) -> Any:
    # Lazy: importing any submodule runs this file, and `voxtral-prep` (manifest, audio) must not pay for torch.
    if name == "load_model":
        from voxtral_train.model import load_model

        return load_model
    raise AttributeError(f"module 'voxtral_train' has no attribute {name!r}")
