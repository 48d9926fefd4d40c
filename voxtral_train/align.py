"""Self-alignment: word timings in the model's own convention, from a Voxtral checkpoint and nothing else.

For a transcript without word times, the checkpoint itself says where it would emit each word. We run it teacher-
forced over the padded audio, take log-probabilities at every position, and find the monotonic placement of the
words that maximises the stream's log-likelihood, with [STREAMING_PAD] playing the CTC blank (Viterbi):

    gain(w, s) = sum_j  logp[s-1+j, tok_j] - logp[s-1+j, PAD]      tok = [STREAMING_WORD] + pieces of word w
    best(w, s) = gain(w, s) + max_{s' <= s - len(w-1)} best(w-1, s')

(position p scores x_{p+1}, hence the s-1). A word placed at slot s ends, in the model's convention, in frame
s - prompt_length(d), so we record its end at the middle of that frame; `targets.build_targets` maps it back to slot
s exactly. The teacher-forced inputs depend on the alignment itself (each position is fed the previous token), so
we iterate: first with an all-pad stream, then with the stream of the previous alignment. Every word opens its own
group here; the target builder merges groups that collide. Works in every language the checkpoint knows, with no
extra weights. Start times are not observable this way: a word's start is set to the previous word's end.
"""

from __future__ import annotations

import numpy as np
import torch

from voxtral_train import protocol
from voxtral_train.features import log_mel, pad_audio
from voxtral_train.manifest import Word
from voxtral_train.targets import build_targets
from voxtral_train.tokenizer import StreamingTokenizer

TIMING_SOURCE = "self_align"


class AlignmentError(ValueError):
    pass


def viterbi_word_slots(logp: torch.Tensor, word_tokens: list[list[int]], pad_id: int, first_slot: int) -> list[int]:
    """Slots s_w (index of each word's [STREAMING_WORD]) maximising the stream log-likelihood.

    logp: [P, V] log-probabilities, row p scoring x_{p+1}. word_tokens[w] = [STREAMING_WORD, piece, ...].
    The last piece of the last word must leave room for EOS (index <= P - 2).
    """
    n_pos = logp.shape[0]
    pad = logp[:, pad_id]
    best_prev = torch.zeros(n_pos + 1, dtype=logp.dtype)  # [i]: best score of the words before w, all ending < i
    back: list[torch.Tensor] = []
    end_limit = n_pos - 1  # exclusive bound on the last token index (EOS needs index <= P - 1)
    for w, tokens in enumerate(word_tokens):
        length = len(tokens)
        gain = torch.full((n_pos,), float("-inf"), dtype=logp.dtype)
        starts = torch.arange(first_slot, end_limit - length + 1)
        if len(starts) == 0:
            raise AlignmentError(f"word {w} does not fit in a stream of {n_pos} positions")
        rows = starts[:, None] - 1 + torch.arange(length)[None, :]  # [S, length]
        token_ids = torch.tensor(tokens)[None, :].expand_as(rows)
        gain[starts] = (logp[rows, token_ids] - pad[rows]).sum(-1)
        # score[s] = gain[s] + best score of the previous words with their last token before s
        score = gain + best_prev[:n_pos]
        # best_prev for the next word at index i: max over s with s + length <= i
        prefix, arg = torch.cummax(score, dim=0)
        shifted = torch.full((n_pos + 1,), float("-inf"), dtype=logp.dtype)
        shifted_arg = torch.zeros(n_pos + 1, dtype=torch.long)
        shifted[length:] = prefix[: n_pos + 1 - length]
        shifted_arg[length:] = arg[: n_pos + 1 - length]
        back.append(shifted_arg)
        best_prev = shifted
    if torch.isinf(best_prev[end_limit]):
        raise AlignmentError(f"{len(word_tokens)} words do not fit in a stream of {n_pos} positions")
    slots = []
    index = end_limit
    for w in range(len(word_tokens) - 1, -1, -1):
        slot = int(back[w][index])
        slots.append(slot)
        index = slot
    return slots[::-1]


def slots_to_words(words: list[str], slots: list[int], delay_tokens: int) -> list[Word]:
    """Model-convention word times: a word at slot s ends in the middle of frame s - prompt_length(d)."""
    prompt = protocol.prompt_length(delay_tokens)
    out: list[Word] = []
    previous_end = 0.0
    for word, slot in zip(words, slots):
        end = (slot - prompt + 0.5) * protocol.POSITION_SECONDS
        out.append(Word(word, round(previous_end, 4), round(end, 4)))
        previous_end = end
    return out


@torch.no_grad()
def self_align(model: torch.nn.Module, tokenizer: StreamingTokenizer, samples: np.ndarray, text: str,
               delay_tokens: int = 6, iterations: int = 2) -> list[Word]:
    """Word timings for `text` spoken in `samples` (16 kHz mono), as `model` would emit them at `delay_tokens`."""
    words = text.split()
    if not words:
        return []
    word_tokens = [[tokenizer.ids.streaming_word, *tokenizer.encode_word(word)] for word in words]
    # Enough right pad for every token of the transcript, so no alignment is cut off by the stream's end.
    extra = sum(len(tokens) for tokens in word_tokens)
    padded = pad_audio(samples, delay_tokens, extra_right_pad=extra)
    features = log_mel(padded)[None].to(model.dtype)
    n_positions = len(padded) // protocol.SAMPLES_PER_POSITION
    stream = [tokenizer.ids.bos] + [tokenizer.ids.streaming_pad] * (n_positions - 1)
    timed: list[Word] = []
    for _ in range(iterations):
        logits = model(input_ids=torch.tensor([stream]), input_features=features, num_delay_tokens=delay_tokens,
                       use_cache=False).logits[0]
        slots = viterbi_word_slots(logits.float().log_softmax(-1), word_tokens, tokenizer.ids.streaming_pad,
                                   protocol.prompt_length(delay_tokens))
        timed = slots_to_words(words, slots, delay_tokens)
        stream = build_targets(timed, tokenizer, len(samples), delay_tokens).input_ids
        stream += [tokenizer.ids.streaming_pad] * (n_positions - len(stream))  # our padding is the longer one
    return timed


def self_align_utterances(utterances: list, model: torch.nn.Module, tokenizer: StreamingTokenizer,
                          delay_tokens: int = 6) -> int:
    """Fill `words` of every utterance that has none, in place; returns how many were aligned."""
    from voxtral_train.audio import load_audio

    aligned = 0
    model.eval()
    for utterance in utterances:
        if utterance.words:
            continue
        samples = load_audio(utterance.audio, utterance.offset, utterance.end)
        utterance.words = self_align(model, tokenizer, samples, utterance.text, delay_tokens)
        utterance.timing_source = TIMING_SOURCE
        aligned += 1
    return aligned
