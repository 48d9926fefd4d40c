"""voxtral-train: fine-tuning for Mistral's streaming speech-to-text model Voxtral Mini 4B Realtime."""

from voxtral_train.model import load_model

__all__ = ["load_model"]
