"""Greedy streaming decode: one token per 80 ms position, the way the model runs live.

Stream convention (docs/MODEL.md, "Token protocol", the same as `voxtral_train.targets`): x_0 = BOS,
x_1..x_{L-1} = [STREAMING_PAD] with L = `protocol.prompt_length(d)`; position p's input is
`embed(x_p) + audio_embed[p]` and its argmax is x_{p+1}. A sample with P positions yields x_L..x_P
(the last one predicted at position P-1, the last position that has audio) or stops earlier at EOS.

Word times. The target builder puts a word ending at `end` seconds at slot q = L + floor(end / 0.08).
We give the token x_q the time `(q - L + 1) * 0.08` s: the end of the 80 ms frame that the slot
stands for, on the audio's own time axis (the delay is not included). A correctly placed word thus
gets `0 < emitted - end <= 0.08`; a live listener sees it `delay` later (`token_available_s`). Every word of a
group gets the time of the [STREAMING_WORD] that opens the run of pieces it starts in (a word that
follows another word's pieces without its own marker shares that marker, as the protocol says).

Two modes:
- `greedy_decode`: batched, offline audio features (the encoder is causal, so running it once on the whole
  clip gives the same audio embeddings as running it live), decoder with a KV cache.
- `online_decode`: what a live server does, for one stream: log-mel from 80 ms chunks of raw samples
  (with only 2.5 ms of look-ahead), the encoder run chunk by chunk with its KV cache and conv padding
  cache, one decoder step per chunk. It must emit the same tokens as `greedy_decode`.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

import numpy as np
import torch
from transformers import DynamicCache
from transformers.models.voxtral_realtime.modeling_voxtral_realtime import VoxtralRealtimeConv1dPaddingCache

from voxtral_train import protocol
from voxtral_train.tokenizer import StreamingTokenizer

SMALL_MODEL_HIDDEN = 512  # decoder width up to which CPU decoding runs on one thread

_WORD = re.compile(r"\S+")

@dataclass
class Decoded:
    text: str
    token_ids: list[int]  # emitted tokens x_L, x_{L+1}, ... (EOS last when the model emitted it)
    words: list[tuple[str, float]]  # (word, emitted_s) on the audio time axis, see module docstring
    delay_tokens: int


def token_time(stream_index: int, delay_tokens: int) -> float:
    """Seconds on the audio axis that the token x_q stands for: the end of its 80 ms frame."""
    return (stream_index - protocol.prompt_length(delay_tokens) + 1) * protocol.POSITION_SECONDS


def prompt_ids(tokenizer: StreamingTokenizer, delay_tokens: int) -> list[int]:
    """BOS + [STREAMING_PAD] x (left pad + delay), from `voxtral_train.targets` (the one definition)."""
    from voxtral_train.targets import prompt_ids as build

    return list(build(tokenizer, delay_tokens))


def words_with_times(tokenizer: StreamingTokenizer, token_ids: list[int], delay_tokens: int) -> list[tuple[str, float]]:
    """Words of the emitted tokens (x_L onward), each with its emission time (module docstring)."""
    ids = tokenizer.ids
    controls = {ids.bos, ids.eos, ids.streaming_pad, ids.streaming_word}
    first = protocol.prompt_length(delay_tokens)
    pieces: list[int] = []
    piece_times: list[float] = []
    anchor: float | None = None
    for offset, token in enumerate(token_ids):
        if token == ids.streaming_word:
            anchor = token_time(first + offset, delay_tokens)
        elif token in controls:
            anchor = None  # a run of pieces ends at a pad
        else:
            if anchor is None:  # pieces without a marker: the model skipped it; use their own time
                anchor = token_time(first + offset, delay_tokens)
            pieces.append(token)
            piece_times.append(anchor)
    # Character offset where each piece's text starts, so words (split on the full text) map back to pieces.
    text = _raw_decode(tokenizer, pieces)
    starts = [len(_raw_decode(tokenizer, pieces[:k])) for k in range(len(pieces))]
    words = []
    for match in _WORD.finditer(text):
        k = int(np.searchsorted(starts, match.start(), side="right")) - 1
        words.append((match.group(), piece_times[max(k, 0)]))
    return words


def _raw_decode(tokenizer: StreamingTokenizer, ids: list[int]) -> str:
    from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

    return tokenizer.tekken.decode(list(ids), special_token_policy=SpecialTokenPolicy.IGNORE)


def _as_delays(delay_tokens: int | torch.Tensor | list[int], batch: int) -> list[int]:
    delays = torch.as_tensor(delay_tokens).reshape(-1).tolist()
    if len(delays) == 1:
        delays = delays * batch
    if len(delays) != batch:
        raise ValueError(f"delay_tokens has {len(delays)} values for a batch of {batch}")
    return [int(d) for d in delays]


@contextlib.contextmanager
def decode_threads(model):
    """One intra-op thread for small models on CPU: a token step's matrices are too small to split, and on a busy
    2-core machine two threads spin against each other (the bundled eval set decoded at 3x real time with 2 threads,
    125x with 1). Large models and GPUs keep the process's setting."""
    small_on_cpu = model.device.type == "cpu" and model.config.text_config.hidden_size <= SMALL_MODEL_HIDDEN
    previous = torch.get_num_threads()
    if small_on_cpu:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@torch.no_grad()
def greedy_decode(
    model,
    tokenizer: StreamingTokenizer,
    input_features: torch.Tensor,
    n_positions: torch.Tensor | list[int],
    delay_tokens: int | torch.Tensor | list[int],
) -> list[Decoded]:
    """Greedy decode a batch. input_features [B, 128, 8*P_max]; n_positions [B] (each sample's P);
    delay_tokens an int or [B]. Samples with different delays have different prompt lengths: all samples
    run in lock-step on the same positions, and a sample whose prompt is longer is fed its prompt token
    there instead of its own emission, so no padding ever enters the cache."""
    with decode_threads(model):  # one thread for small models on CPU
        batch = input_features.shape[0]
        delays = _as_delays(delay_tokens, batch)
        lengths = [int(n) for n in torch.as_tensor(n_positions).reshape(-1).tolist()]
        prompt_lens = [protocol.prompt_length(d) for d in delays]
        for b, (n, l) in enumerate(zip(lengths, prompt_lens)):
            if n < l:
                raise ValueError(f"sample {b}: {n} positions is shorter than its prompt ({l} at delay {delays[b]})")
        device = input_features.device
        features = input_features.to(device=device, dtype=model.dtype)
        audio = model.get_audio_features(input_features=features).pooler_output  # [B, P_max, D]
        if audio.shape[1] < max(lengths):
            raise ValueError(f"features cover {audio.shape[1]} positions, n_positions asks for {max(lengths)}")
        forced = torch.full((batch, max(prompt_lens)), tokenizer.ids.streaming_pad, dtype=torch.long, device=device)
        forced[:, 0] = tokenizer.ids.bos
        emitted: list[list[int]] = [[] for _ in range(batch)]
        active = torch.arange(batch, device=device)  # samples still decoding, in cache order
        delay_t = torch.tensor(delays, device=device)
        embed = model.get_input_embeddings()
        cache = DynamicCache(config=model.config.text_config)

        def step(tokens: torch.Tensor, start: int) -> torch.Tensor:
            """Run positions [start, start + tokens.shape[1]) for the active samples; argmax of the last one."""
            embeds = embed(tokens) + audio[active, start : start + tokens.shape[1]]
            out = model(inputs_embeds=embeds, cache=cache, use_cache=True, num_delay_tokens=delay_t[active],
                         logits_to_keep=1)
            return out.logits[:, -1].argmax(-1)

        first = min(prompt_lens)
        prediction = step(forced[:, :first], 0)  # x_first for every sample
        for p in range(first, max(lengths) + 1):
            # `prediction[i]` is x_p of sample active[i]: an emission once past that sample's prompt.
            keep = []
            for i, (b, token) in enumerate(zip(active.tolist(), prediction.tolist())):  # one device sync per step
                if p < prompt_lens[b]:
                    keep.append(i)
                    continue
                emitted[b].append(token)
                if token != tokenizer.ids.eos and p < lengths[b]:  # x_{P_b} is the last token with audio behind it
                    keep.append(i)
            if not keep:
                break
            if len(keep) < len(active):
                index = torch.tensor(keep, device=device)
                cache.batch_select_indices(index)
                active, prediction = active[index], prediction[index]
            prompt_token = forced[active, min(p, forced.shape[1] - 1)]
            in_prompt = torch.tensor([p < prompt_lens[b] for b in active.tolist()], device=device)
            prediction = step(torch.where(in_prompt, prompt_token, prediction)[:, None], p)
        return [_decoded(tokenizer, emitted[b], delays[b]) for b in range(batch)]


def _decoded(tokenizer: StreamingTokenizer, token_ids: list[int], delay_tokens: int) -> Decoded:
    return Decoded(tokenizer.decode(token_ids), token_ids, words_with_times(tokenizer, token_ids, delay_tokens),
                   delay_tokens)


# --- online (live) mode ------------------------------------------------------------------------------

# STFT geometry: mel frame i is centred on sample i*HOP and reads WINDOW samples around it.
_HALF_WINDOW = protocol.WINDOW_SIZE // 2
# Look-back before a chunk so that its first frame's window is inside the slice and the slice starts on
# the hop grid (frames of the slice then coincide with frames of the whole stream): 200 -> 320 samples.
_LOOK_BACK = -(-_HALF_WINDOW // protocol.HOP_LENGTH) * protocol.HOP_LENGTH
# Look-ahead past a position's last sample that its last mel frame needs (40 samples = 2.5 ms,
# tekken.json's streaming_look_ahead_ms).
LOOK_AHEAD_SAMPLES = _HALF_WINDOW - protocol.HOP_LENGTH


def chunk_log_mel(stream: np.ndarray, first_position: int, n_positions: int) -> torch.Tensor:
    """Log-mel frames [128, 8*n] of positions [first, first+n) of a padded stream, reading only the samples
    a live server has by then: up to LOOK_AHEAD_SAMPLES past the chunk. Equals the same columns of
    `features.log_mel(stream)`: the slice starts on the hop grid and every kept frame's window lies inside it
    (the first chunk starts at sample 0 and so gets the same edge handling as the whole stream)."""
    from voxtral_train.features import log_mel

    frames_per_pos = protocol.MEL_FRAMES_PER_POSITION
    start_sample = first_position * protocol.SAMPLES_PER_POSITION
    stop = (first_position + n_positions) * protocol.SAMPLES_PER_POSITION + LOOK_AHEAD_SAMPLES
    if stop > len(stream):
        raise ValueError(f"positions up to {first_position + n_positions} need {stop} samples, stream has {len(stream)}")
    lead = min(_LOOK_BACK, start_sample)
    mel = log_mel(np.asarray(stream[start_sample - lead : stop]))
    skip = lead // protocol.HOP_LENGTH
    return torch.as_tensor(mel)[:, skip : skip + n_positions * frames_per_pos]


class OnlineStream:
    """One live stream: push 80 ms of padded audio at a time, get one token back per position."""

    def __init__(self, model, tokenizer: StreamingTokenizer, delay_tokens: int):
        self.model, self.tokenizer, self.delay_tokens = model, tokenizer, delay_tokens
        self.encoder_cache = None
        self.padding_cache = VoxtralRealtimeConv1dPaddingCache()
        self.cache = DynamicCache(config=model.config.text_config)
        self.delay = torch.tensor([delay_tokens])
        self.position = 0  # next decoder position to run

    def _audio_embeds(self, mel: torch.Tensor) -> torch.Tensor:
        out = self.model.get_audio_features(
            input_features=mel[None].to(self.model.dtype), padding_cache=self.padding_cache,
            cache=self.encoder_cache, use_cache=True,
        )
        self.encoder_cache = out.cache
        return out.pooler_output  # [1, n, D]

    def run(self, mel: torch.Tensor, tokens: list[int]) -> int:
        """Feed len(tokens) positions (their mel frames and input tokens); return the argmax of the last."""
        audio = self._audio_embeds(mel)
        ids = torch.tensor([tokens], device=audio.device)
        embeds = self.model.get_input_embeddings()(ids) + audio
        out = self.model(inputs_embeds=embeds, cache=self.cache, use_cache=True, num_delay_tokens=self.delay,
                         logits_to_keep=1)
        self.position += len(tokens)
        return int(out.logits[0, -1].argmax())


@torch.no_grad()
def online_decode(model, tokenizer: StreamingTokenizer, samples: np.ndarray, delay_tokens: int) -> Decoded:
    """Decode raw 16 kHz audio as a live server would: the stream is the audio with the protocol's padding
    (`features.pad_audio`; the right pad is what a server appends at end of stream), revealed in chunks: a
    first chunk covering the prompt's positions, then one position (1280 samples) at a time."""
    from voxtral_train.features import pad_audio

    padded = np.asarray(pad_audio(samples, delay_tokens))
    total = len(padded) // protocol.SAMPLES_PER_POSITION
    # The last position's last frame looks 2.5 ms past the stream; the offline STFT reflects the silent
    # right pad there, i.e. reads zeros, so the live stream continues with zeros.
    stream = np.concatenate([padded, np.zeros(LOOK_AHEAD_SAMPLES, dtype=padded.dtype)])
    first = protocol.prompt_length(delay_tokens)
    live = OnlineStream(model, tokenizer, delay_tokens)
    token = live.run(chunk_log_mel(stream, 0, first), prompt_ids(tokenizer, delay_tokens))
    emitted = [token]
    for p in range(first, total):
        if token == tokenizer.ids.eos:
            break
        token = live.run(chunk_log_mel(stream, p, 1), [token])
        emitted.append(token)
    return _decoded(tokenizer, emitted, delay_tokens)
