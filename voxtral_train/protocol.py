"""The streaming protocol of Voxtral Mini 4B Realtime: the one place that knows its numbers.

Everything that places audio or text on the model's 80 ms grid imports from here
(docs/MODEL.md, "Token protocol"). Token *ids* are not here: they are read from the
tokenizer (`voxtral_train.tokenizer`), which checks them against the values below.
"""

from __future__ import annotations

SAMPLE_RATE = 16_000
HOP_LENGTH = 160  # samples per mel frame (10 ms)
WINDOW_SIZE = 400  # STFT window (25 ms)
NUM_MEL_BINS = 128
GLOBAL_LOG_MEL_MAX = 1.5
MEL_FRAMES_PER_POSITION = 8  # conv stride 2, then 4 encoder frames concatenated by the adapter
SAMPLES_PER_POSITION = HOP_LENGTH * MEL_FRAMES_PER_POSITION  # 1280 samples = 80 ms = one decoder token
POSITION_SECONDS = SAMPLES_PER_POSITION / SAMPLE_RATE  # 0.08
POSITION_MS = 1000 * SAMPLES_PER_POSITION // SAMPLE_RATE  # 80: delays are whole multiples of it
FRAME_RATE = SAMPLE_RATE / SAMPLES_PER_POSITION  # 12.5 positions per second

N_LEFT_PAD_TOKENS = 32  # tekken.json audio.streaming_n_left_pad_tokens
RIGHT_PAD_BUFFER_TOKENS = 10  # mistral-common OFFLINE_STREAMING_BUFFER_TOKENS: room for the last word
DEFAULT_DELAY_MS = 480
IGNORE_INDEX = -100  # label value the cross-entropy loss skips (PyTorch's default)

# Expected token ids of the released tokenizer; the tokenizer module checks that its vocabulary agrees.
EXPECTED_SPECIAL_IDS = {"<s>": 1, "</s>": 2, "<pad>": 11, "[STREAMING_PAD]": 32, "[STREAMING_WORD]": 33}


def delay_ms_to_tokens(delay_ms: float) -> int:
    """480 ms -> 6. A delay is a positive whole multiple of 80 ms: the model has no finer grid, and a zero delay
    is refused by mistral-common when it reads tekken.json (the model card covers 240-2400 ms)."""
    tokens = delay_ms / POSITION_MS
    if tokens < 1 - 1e-6 or abs(tokens - round(tokens)) > 1e-6:
        raise ValueError(f"delay {delay_ms} ms is not a positive multiple of {POSITION_MS} ms")
    return int(round(tokens))


def delay_tokens_to_ms(delay_tokens: int) -> int:
    return delay_tokens * POSITION_MS


def n_right_pad_tokens(delay_tokens: int) -> int:
    """Right pad after the audio: the delay, one for BOS, and a buffer for the last word (17 at 480 ms)."""
    return delay_tokens + 1 + RIGHT_PAD_BUFFER_TOKENS


def n_audio_positions(n_samples: int) -> int:
    """Positions the real audio covers once padded up to a whole position (integer ceiling: exact for ints and for
    numpy arrays of them, which batching passes for every item at once)."""
    return -(-n_samples // SAMPLES_PER_POSITION)


def n_total_positions(n_samples: int, delay_tokens: int, extra_right_pad_tokens: int = 0) -> int:
    """Positions of the padded stream: left pad + audio + right pad (+ any extension for late words)."""
    return N_LEFT_PAD_TOKENS + n_audio_positions(n_samples) + n_right_pad_tokens(delay_tokens) + extra_right_pad_tokens


def prompt_length(delay_tokens: int) -> int:
    """BOS + [STREAMING_PAD] x (left pad + delay): 39 tokens at 480 ms."""
    return 1 + N_LEFT_PAD_TOKENS + delay_tokens
