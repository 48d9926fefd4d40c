"""The Tekken tokenizer as the streaming protocol needs it: word pieces, the four control ids, the audio settings.

Wraps mistral-common's `Tekkenizer` (the tokenizer the model ships with, `tekken.json`). Token ids are read from the
vocabulary and checked against `protocol.EXPECTED_SPECIAL_IDS`: a tokenizer whose ids differ is refused, because the
model's embeddings for those rows would be the wrong ones.

`StreamingTokenizer.tiny()` builds a small Tekken file offline from the vocabulary mistral-common ships (the real
special tokens at their real ids, the first BPE ranks of the real vocabulary, the real `audio` section), for the
embedded tiny model and the tests.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy
from mistral_common.tokens.tokenizers.tekken import Tekkenizer

from voxtral_train import protocol

TINY_NUM_SPECIAL = 1000  # Tekken reserves ids 0-999 for special tokens
TINY_NUM_BPE_RANKS = 1000  # docs/TINY_MODELS.md: 500-3000 ranks make little difference at tiny scale

# Names of the special ids the streaming model uses beyond mistral-common's first 20 (which it lists itself).
_EXTRA_SPECIALS = {24: "[AUDIO]", 25: "[BEGIN_AUDIO]", 32: "[STREAMING_PAD]", 33: "[STREAMING_WORD]", 34: "[TRANSCRIBE]"}

# tekken.json `audio` section of the released model (docs/MODEL.md, "Token protocol").
REAL_AUDIO_SECTION = {
    "sampling_rate": protocol.SAMPLE_RATE,
    "frame_rate": protocol.FRAME_RATE,
    "audio_encoding_config": {
        "num_mel_bins": protocol.NUM_MEL_BINS,
        "hop_length": protocol.HOP_LENGTH,
        "window_size": protocol.WINDOW_SIZE,
    },
    "chunk_length_s": None,
    "transcription_format": "streaming",
    "transcription_delay_ms": protocol.DEFAULT_DELAY_MS,
    "streaming_look_ahead_ms": 2.5,
    "streaming_look_back_ms": 52.5,
    "streaming_n_left_pad_tokens": protocol.N_LEFT_PAD_TOKENS,
}


class TokenizerError(ValueError):
    pass


@dataclass(frozen=True)
class SpecialIds:
    bos: int
    eos: int
    streaming_pad: int
    streaming_word: int


class StreamingTokenizer:
    """Tekken tokenizer plus the streaming facts read from its `audio` section."""

    def __init__(self, tekken_path: str | Path):
        self.tekken_path = Path(tekken_path)
        if not self.tekken_path.is_file():
            raise TokenizerError(f"tokenizer file not found: {self.tekken_path} (expected a Mistral tekken.json)")
        self.tekken = Tekkenizer.from_file(self.tekken_path)
        self.ids = SpecialIds(
            bos=self._special_id("<s>"),
            eos=self._special_id("</s>"),
            streaming_pad=self._special_id("[STREAMING_PAD]"),
            streaming_word=self._special_id("[STREAMING_WORD]"),
        )
        audio = json.loads(self.tekken_path.read_text(encoding="utf-8")).get("audio")
        if not audio:
            raise TokenizerError(f"{self.tekken_path} has no 'audio' section: not a Voxtral Realtime tokenizer")
        self.default_delay_ms = int(audio.get("transcription_delay_ms") or protocol.DEFAULT_DELAY_MS)
        n_left = audio.get("streaming_n_left_pad_tokens")
        if n_left is not None and int(n_left) != protocol.N_LEFT_PAD_TOKENS:
            raise TokenizerError(
                f"{self.tekken_path}: streaming_n_left_pad_tokens={n_left}, this trainer is built for "
                f"{protocol.N_LEFT_PAD_TOKENS}"
            )

    def _special_id(self, name: str) -> int:
        try:
            token_id = self.tekken.get_special_token(name)
        except Exception as err:  # mistral-common raises several types for an unknown token
            raise TokenizerError(f"{self.tekken_path} lacks the special token {name}") from err
        expected = protocol.EXPECTED_SPECIAL_IDS.get(name)
        if expected is not None and token_id != expected:
            raise TokenizerError(f"{self.tekken_path}: {name} has id {token_id}, the model was trained with {expected}")
        return token_id

    @property
    def vocab_size(self) -> int:
        return self.tekken.n_words

    def encode_word(self, word: str) -> list[int]:
        """BPE pieces of one word as the model emits it: with its leading space."""
        return self.tekken.encode(" " + word.strip(), bos=False, eos=False)

    def encode_text(self, text: str) -> list[int]:
        """All word pieces of a transcript, in order (no control tokens)."""
        return [piece for word in text.split() for piece in self.encode_word(word)]

    def decode(self, ids: list[int]) -> str:
        """Text of a token stream; control tokens ([STREAMING_PAD], [STREAMING_WORD], BOS/EOS) are dropped."""
        return self.tekken.decode(list(ids), special_token_policy=SpecialTokenPolicy.IGNORE).strip()

    @classmethod
    def tiny(cls, num_bpe_ranks: int = TINY_NUM_BPE_RANKS) -> "StreamingTokenizer":
        """A small real-protocol tokenizer, built once into the user cache (no network)."""
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "voxtral-train"
        path = cache / f"tiny_tekken_{num_bpe_ranks}" / "tekken.json"
        if not path.is_file():
            write_tiny_tekken(path, num_bpe_ranks)
        return cls(path)


def write_tiny_tekken(path: Path, num_bpe_ranks: int = TINY_NUM_BPE_RANKS) -> Path:
    """Write a Tekken file: real specials at real ids, the first `num_bpe_ranks` ranks of the shipped vocabulary."""
    import mistral_common

    source = Path(mistral_common.__file__).parent / "data" / "tekken_240911.json"
    shipped = json.loads(source.read_text(encoding="utf-8"))
    specials = [
        {"rank": t["rank"], "token_str": str(t["token_str"]), "is_control": True}
        for t in Tekkenizer.DEPRECATED_SPECIAL_TOKENS
    ]
    specials += [
        {"rank": i, "token_str": _EXTRA_SPECIALS.get(i, Tekkenizer.SPECIAL_TOKEN_TEMPLATE.format(id=i)), "is_control": True}
        for i in range(len(specials), TINY_NUM_SPECIAL)
    ]
    content = {
        "config": {
            **shipped["config"],
            "version": "v13",
            "num_vocab_tokens": num_bpe_ranks,
            "default_vocab_size": TINY_NUM_SPECIAL + num_bpe_ranks,
            "default_num_special_tokens": TINY_NUM_SPECIAL,
        },
        "vocab": shipped["vocab"][:num_bpe_ranks],
        "special_tokens": specials,
        "audio": REAL_AUDIO_SECTION,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename, so two processes starting at once never read half a file.
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as tmp:
        json.dump(content, tmp)
    os.replace(tmp.name, path)
    return path
