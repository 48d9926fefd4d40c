"""Training targets of the streaming protocol: where each word's tokens sit on the 80 ms grid.

The token stream is x_0 .. x_{P-1}, one token per 80 ms position, with P = protocol.n_total_positions(n_samples, d,
extra_right_pad) for a delay of d tokens (docs/MODEL.md, "Token protocol"):

- Prompt: x_0 = BOS, x_1 .. x_{L+d} = [STREAMING_PAD] (L = protocol.N_LEFT_PAD_TOKENS), prompt_length(d) tokens.
- Word slot: a word whose anchor time is `a` seconds (its end by default, its start with anchor="start") gets slot
  q = prompt_length(d) + floor(a / POSITION_SECONDS) + offset_frames, never earlier than prompt_length(d).
  Position q-1 = L + k + d holds audio frame k + d (k = floor(a / 0.08)), so it has heard the anchor frame plus d frames
  of look-ahead when it predicts x_q: "after the word ends, plus the delay".
- A word opens a group: x_q = [STREAMING_WORD], then the word's pieces (with leading space) one per position. A word
  whose slot is still taken (q <= the last index used by earlier words) follows the previous word's pieces directly,
  without a new [STREAMING_WORD]; so words sharing a slot share one [STREAMING_WORD]. Words are never placed before
  their slot and never dropped.
- Every other position after the prompt is [STREAMING_PAD]. EOS sits at max(last used + 1, prompt_length(d) +
  n_audio_positions). When that index would not fit in the stream, the right pad grows (`extra_right_pad`), so the
  audio padding must be grown by the same amount (features.pad_audio takes it). After EOS the inputs are
  [STREAMING_PAD] and the labels -100.
- labels are already shifted: labels[p] = x_{p+1}, the token the logits at position p are scored against. They are
  -100 for the first prompt_length(d) - 1 positions (they predict prompt tokens, which are given, not generated) and
  from the EOS position on.

Worked example (d = 6 i.e. 480 ms, 1.2 s of audio = 15 positions, so P = 32 + 15 + 17 = 64, prompt 39 tokens):
words "the" (ends 0.50 s), "cat" (ends 0.55 s), "a" (ends 1.00 s); "cat" has two pieces c1 c2.

    slots:   the -> 39 + floor(0.50/0.08) = 45,  cat -> 45 (taken: follows "the"),  a -> 39 + 12 = 51
    x_0 = BOS, x_1..x_44 = PAD, x_45 = WORD, x_46 = the, x_47 = c1, x_48 = c2, x_49..x_50 = PAD,
    x_51 = WORD, x_52 = a, x_53 = PAD, x_54 = EOS (= max(53 + 1, 39 + 15)), x_55..x_63 = PAD
    labels[0..37] = -100, labels[p] = x_{p+1} for p in 38..53, labels[54..63] = -100
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Protocol, Sequence

from voxtral_train import protocol
from voxtral_train.tokenizer import StreamingTokenizer

# Times come as decimal seconds (0.24 / 0.08 is 2.9999999999999996 in floats): a frame boundary within this many
# frames counts as reached.
_FRAME_EPS = 1e-6

Anchor = Literal["end", "start"]


class WordLike(Protocol):
    word: str
    start: float
    end: float


@dataclass(frozen=True)
class StreamTargets:
    input_ids: list[int]  # x_0 .. x_{P-1}
    labels: list[int]  # labels[p] = x_{p+1} where scored, else protocol.IGNORE_INDEX
    n_positions: int  # P
    extra_right_pad: int  # positions added to the standard right pad so that every word and EOS fit
    word_slots: list[int]  # per placed word: its slot q (the earliest index it may occupy)
    word_positions: list[int]  # per placed word: index of its first piece (>= slot + 1 when it opens a group)
    eos_position: int


def frame_index(seconds: float) -> int:
    """Index of the 80 ms frame that contains time `seconds` (robust to decimal rounding)."""
    return math.floor(seconds / protocol.POSITION_SECONDS + _FRAME_EPS)


def prompt_ids(tokenizer: StreamingTokenizer, delay_tokens: int) -> list[int]:
    """BOS + [STREAMING_PAD] x (left pad + delay): the tokens given before the model generates anything."""
    return [tokenizer.ids.bos] + [tokenizer.ids.streaming_pad] * (protocol.prompt_length(delay_tokens) - 1)


def word_slot(word: WordLike, delay_tokens: int, anchor: Anchor = "end", offset_frames: int = 0) -> int:
    """Slot q of a word: the prompt length + the frame of its anchor time + offset, not before the prompt's end."""
    if anchor not in ("end", "start"):
        raise ValueError(f"anchor must be 'end' or 'start', got {anchor!r}")
    seconds = word.end if anchor == "end" else word.start
    first_generated = protocol.prompt_length(delay_tokens)
    return max(first_generated, first_generated + frame_index(seconds) + offset_frames)


def build_targets(
    words: Sequence[WordLike],
    tokenizer: StreamingTokenizer,
    n_samples: int,
    delay_tokens: int,
    anchor: Anchor = "end",
    offset_frames: int = 0,
) -> StreamTargets:
    """The token stream and shifted labels for one utterance of `n_samples` samples (see the module docstring)."""
    ids = tokenizer.ids
    prompt = prompt_ids(tokenizer, delay_tokens)
    generated: dict[int, int] = {}  # index -> token, for the non-pad tokens after the prompt
    last_used = len(prompt) - 1
    slots: list[int] = []
    positions: list[int] = []
    for word in words:
        if not word.word.strip():
            continue
        q = word_slot(word, delay_tokens, anchor, offset_frames)
        if q > last_used:  # a free slot: open a new group
            generated[q] = ids.streaming_word
            last_used = q
        slots.append(q)
        positions.append(last_used + 1)
        for piece in tokenizer.encode_word(word.word):
            last_used += 1
            generated[last_used] = piece

    eos = max(last_used + 1, len(prompt) + protocol.n_audio_positions(n_samples))
    standard = protocol.n_total_positions(n_samples, delay_tokens)
    extra = max(0, eos + 1 - standard)
    n_positions = standard + extra

    stream = prompt + [ids.streaming_pad] * (n_positions - len(prompt))
    for index, token in generated.items():
        stream[index] = token
    stream[eos] = ids.eos
    # Position p predicts x_{p+1}: scored from the last prompt position up to the one that predicts EOS.
    labels = [protocol.IGNORE_INDEX] * n_positions
    labels[len(prompt) - 1 : eos] = stream[len(prompt) : eos + 1]
    return StreamTargets(stream, labels, n_positions, extra, slots, positions, eos)
