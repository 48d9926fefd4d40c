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

The end of the module holds the optional alternative: CTC forced alignment with a user-supplied character-CTC
checkpoint (`ctc_align_utterances`), which gives acoustic word spans, start times included.
"""

from __future__ import annotations

import itertools

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


# --- Forced alignment with a user-supplied CTC checkpoint (optional extra) ---------------------------------------
#
# A character CTC model (e.g. a transformers Wav2Vec2ForCTC folder) gives acoustic word boundaries instead of the
# Voxtral convention above. Standard CTC Viterbi over the blank-interleaved target z = [b, y1, b, y2, ..., yL, b]:
#
#     alpha[t, s] = logp[t, z_s] + max(alpha[t-1, s], alpha[t-1, s-1], alpha[t-1, s-2] if z_s != b and z_s != z_{s-2})
#
# ending in state 2L or 2L-1; the frames the best path spends in state 2i+1 are token i's span.

CTC_TIMING_SOURCE = "ctc_align"


def ctc_forced_align(log_probs: torch.Tensor, target_ids: list[int], blank_id: int) -> list[tuple[int, int]]:
    """(first frame, last frame) of every target token on the most likely CTC path. log_probs: [T, V]."""
    n_frames, n_targets = log_probs.shape[0], len(target_ids)
    if n_targets == 0:
        return []
    repeats = sum(a == b for a, b in itertools.pairwise(target_ids))  # a repeated token needs a blank between
    if n_frames < n_targets + repeats:
        raise AlignmentError(f"{n_targets} tokens ({repeats} repeats) do not fit in {n_frames} CTC frames")
    states = torch.full((2 * n_targets + 1,), blank_id, dtype=torch.long)
    states[1::2] = torch.tensor(target_ids)
    n_states = len(states)
    emit = log_probs.float()[:, states]  # [T, S]
    can_skip = torch.zeros(n_states, dtype=torch.bool)  # s-2 -> s allowed: a token that differs from the previous one
    can_skip[3::2] = states[3::2] != states[1:-2:2]
    neg_inf = torch.tensor(float("-inf"))
    alpha = torch.full((n_states,), float("-inf"))
    alpha[:2] = emit[0, :2]
    back = torch.zeros(n_frames, n_states, dtype=torch.uint8)  # 0: stay, 1: from s-1, 2: from s-2
    for t in range(1, n_frames):
        from_prev = torch.cat([neg_inf[None], alpha[:-1]])
        from_skip = torch.where(can_skip, torch.cat([neg_inf.expand(2), alpha[:-2]]), neg_inf)
        best, step = torch.stack([alpha, from_prev, from_skip]).max(0)
        back[t] = step.to(torch.uint8)
        alpha = best + emit[t]
    state = n_states - 1 if alpha[-1] >= alpha[-2] else n_states - 2
    if torch.isinf(alpha[state]):
        raise AlignmentError(f"no CTC path of {n_targets} tokens through {n_frames} frames")
    spans: list[list[int]] = [[n_frames, -1] for _ in range(n_targets)]
    for t in range(n_frames - 1, -1, -1):
        if state % 2:
            span = spans[state // 2]
            span[0], span[1] = t, max(span[1], t)
        state -= int(back[t, state])
    return [(first, last) for first, last in spans]


def ctc_word_timings(log_probs: torch.Tensor, words: list[str], word_ids: list[list[int]], blank_id: int,
                     seconds_per_frame: float, delimiter_id: int | None = None) -> list[Word]:
    """One `Word` per word: from its first character's first frame to its last character's last frame.

    word_ids[w] are the CTC ids of word w (may be empty: a word with no character in the vocabulary gets a zero-length
    span at the previous word's end). `delimiter_id` (wav2vec2's `|`) is aligned between words when the vocabulary
    has one, as the model was trained to emit it there; its frames belong to no word.
    """
    targets: list[int] = []
    owner: list[int] = []  # word index of every target token, -1 for delimiters
    for w, ids in enumerate(word_ids):
        if ids and targets and delimiter_id is not None:
            targets.append(delimiter_id)
            owner.append(-1)
        targets += ids
        owner += [w] * len(ids)
    spans = ctc_forced_align(log_probs, targets, blank_id)
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    for w, (start, end) in zip(owner, spans):
        if w >= 0:
            first.setdefault(w, start)
            last[w] = end
    timed: list[Word] = []
    previous_end = 0.0
    for w, word in enumerate(words):
        if w in first:
            start, end = first[w] * seconds_per_frame, (last[w] + 1) * seconds_per_frame
        else:
            start = end = previous_end
        timed.append(Word(word, round(start, 4), round(end, 4)))
        previous_end = end
    return timed


def ctc_char_ids(word: str, vocab: dict[str, int], skip: set[int]) -> list[int]:
    """CTC ids of `word`'s characters, trying each as written, then upper- and lowercased (vocabularies are
    usually one case); characters not in the vocabulary (punctuation, other scripts) are dropped."""
    ids = []
    for char in word:
        found = next((vocab[c] for c in (char, char.upper(), char.lower()) if c in vocab), None)
        if found is not None and found not in skip:
            ids.append(found)
    return ids


@torch.no_grad()
def ctc_align_utterances(utterances: list, model_dir: str) -> int:
    """Fill `words` of every utterance that has none from a local character-CTC checkpoint, in place; returns how many
    were aligned. An optional extra: `model_dir` is any folder `AutoModelForCTC` + `AutoProcessor` load offline (e.g.
    a fine-tuned wav2vec2); it must be trained on the data's language and script, or the timings are meaningless.
    Times are acoustic word spans (not the Voxtral emission convention that `self_align` gives). Rows whose transcript
    does not fit the clip's frames are left untimed, with a warning naming them.
    """
    import warnings

    from transformers import AutoModelForCTC, AutoProcessor

    from voxtral_train.audio import load_audio

    model = AutoModelForCTC.from_pretrained(model_dir, local_files_only=True).eval()
    processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    tokenizer = processor.tokenizer
    blank_id = model.config.pad_token_id  # the id transformers' CTC loss uses as blank
    delimiter = getattr(tokenizer, "word_delimiter_token", None)
    delimiter_id = tokenizer.convert_tokens_to_ids(delimiter) if delimiter else None
    vocab = tokenizer.get_vocab()
    skip = {blank_id, delimiter_id, tokenizer.unk_token_id}
    aligned = 0
    for utterance in utterances:
        if utterance.words:
            continue
        samples = load_audio(utterance.audio, utterance.offset, utterance.end)
        inputs = processor.feature_extractor(samples, sampling_rate=protocol.SAMPLE_RATE, return_tensors="pt")
        log_probs = model(inputs.input_values).logits[0].float().log_softmax(-1)
        # samples per logit frame from this clip itself: no assumption about the feature encoder's strides
        seconds_per_frame = len(samples) / log_probs.shape[0] / protocol.SAMPLE_RATE
        words = utterance.text.split()
        try:
            timed = ctc_word_timings(log_probs, words, [ctc_char_ids(w, vocab, skip) for w in words], blank_id,
                                     seconds_per_frame, delimiter_id)
        except AlignmentError as err:
            warnings.warn(f"row {utterance.id!r} ({utterance.audio}): left without CTC timings: {err}")
            continue
        duration = len(samples) / protocol.SAMPLE_RATE
        utterance.words = [Word(w.word, min(w.start, duration), min(w.end, duration)) for w in timed]
        utterance.timing_source = CTC_TIMING_SOURCE
        aligned += 1
    return aligned
