import torch
import torch.nn.functional as F

from voxtral_train.loss import (
    IGNORE_INDEX,
    STAT_NAMES,
    backward_scale,
    streaming_loss_sums,
    summarize,
    target_weights,
)

PAD = 32


def _batch(seed: int = 0, batch: int = 3, positions: int = 37, dim: int = 16, vocab: int = 50):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, positions, dim, generator=g, dtype=torch.float64).float().requires_grad_(True)
    head = torch.nn.Linear(dim, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, dim, generator=g))
    labels = torch.randint(0, vocab, (batch, positions), generator=g)
    labels[torch.rand(batch, positions, generator=g) < 0.5] = PAD
    labels[:, :5] = IGNORE_INDEX  # prompt positions are not scored
    labels[1, -7:] = IGNORE_INDEX  # right padding of a shorter clip
    return hidden, head, labels


def _plain(hidden, head, labels, pad_weight, text_weight, z_loss):
    """The reference: full logits, per-token CE, weighted sum."""
    logits = head(hidden).float()
    ce = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
    w = torch.where(labels == PAD, pad_weight, text_weight) * (labels != IGNORE_INDEX)
    z = torch.logsumexp(logits, -1).square()
    return (w * ce).sum() + z_loss * (w * z).sum()


def test_target_weights():
    labels = torch.tensor([[IGNORE_INDEX, PAD, 7, 33, PAD]])
    assert target_weights(labels, PAD, 0.5, 2.0).tolist() == [[0.0, 0.5, 2.0, 2.0, 0.5]]


def test_chunked_loss_equals_plain_cross_entropy_with_gradients():
    for z_loss in (0.0, 1e-3):
        hidden, head, labels = _batch()
        expected = _plain(hidden, head, labels, 0.5, 1.0, z_loss)
        grads_expected = torch.autograd.grad(expected, [hidden, head.weight])
        # 7 positions per chunk: chunks do not align with rows, and the last chunk is partial.
        sums = streaming_loss_sums(hidden, head, labels, PAD, pad_weight=0.5, text_weight=1.0, z_loss=z_loss,
                                   chunk_positions=7)
        grads = torch.autograd.grad(sums.weighted, [hidden, head.weight])
        torch.testing.assert_close(sums.weighted, expected, rtol=1e-6, atol=1e-6)
        for got, want in zip(grads, grads_expected):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_statistics_are_counted_per_target_kind():
    dim, vocab = 4, 40
    head = torch.nn.Linear(dim, vocab, bias=False)
    with torch.no_grad():
        head.weight.zero_()
        head.weight[PAD, 0] = 20.0  # hidden e0 predicts PAD
        head.weight[7, 1] = 20.0  # hidden e1 predicts 7
    eye = torch.eye(dim)
    hidden = torch.stack([eye[0], eye[0], eye[1], eye[0], eye[1]])[None]
    labels = torch.tensor([[PAD, 7, 7, 9, IGNORE_INDEX]])
    sums = streaming_loss_sums(hidden, head, labels, PAD, pad_weight=0.5, text_weight=1.0, chunk_positions=2)
    m = summarize(sums.stats())
    assert m["target_tokens"] == 4
    assert m["text_accuracy"] == 1 / 3  # one of the three text targets (7, 7, 9) is predicted
    assert m["text_predicted_as_pad"] == 2 / 3  # targets 7 and 9 at hidden e0 got PAD
    assert sums.weight.item() == 0.5 + 3.0
    assert m["pad_loss"] < 1e-3 and m["text_loss"] > 1.0


def test_global_normalisation_does_not_depend_on_the_split():
    """Sum of micro-batch losses scaled by backward_scale (then divided as accelerate does) == whole batch."""
    hidden, head, labels = _batch(seed=1, batch=4)
    kw = dict(pad_weight=0.5, text_weight=1.0, chunk_positions=16)
    whole = streaming_loss_sums(hidden, head, labels, PAD, **kw)
    expected = torch.autograd.grad(whole.weighted / whole.weight, head.weight)[0]

    micro = [streaming_loss_sums(hidden[i : i + 1], head, labels[i : i + 1], PAD, **kw) for i in range(4)]
    global_weight = sum(m.weight.item() for m in micro)  # counted before the window, as the loop does
    steps, world = 2, 2  # 4 micro-batches = 2 accumulation steps x 2 ranks
    scale = backward_scale(global_weight, steps, world)
    # accelerate divides each loss by `steps`, DDP averages over `world` ranks.
    total = sum(m.weighted * scale / steps for m in micro) / world
    got = torch.autograd.grad(total, head.weight)[0]
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


def test_no_grad_path_gives_same_sums_and_stats_vector_order():
    hidden, head, labels = _batch(seed=2)
    kw = dict(pad_weight=0.3, text_weight=1.0, chunk_positions=5)
    with torch.no_grad():
        a = streaming_loss_sums(hidden, head, labels, PAD, **kw)
    b = streaming_loss_sums(hidden, head, labels, PAD, **kw)
    torch.testing.assert_close(a.stats(), b.stats())
    assert len(STAT_NAMES) == a.stats().numel()
    assert a.stats()[STAT_NAMES.index("pad_count")] == (labels == PAD).sum()


def test_padding_with_empty_chunks_changes_nothing():
    """ZeRO-3 pads every rank to the same number of lm_head calls; the extra calls see no positions."""
    hidden, head, labels = _batch(seed=3)
    calls = []
    head.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    kw = dict(pad_weight=0.5, text_weight=1.0, chunk_positions=64)
    with torch.no_grad():
        plain = streaming_loss_sums(hidden, head, labels, PAD, **kw)
        n_plain = len(calls)
        padded = streaming_loss_sums(hidden, head, labels, PAD, min_chunks=n_plain + 3, **kw)
    assert len(calls) - n_plain == n_plain + 3 and calls[-1] == 0
    torch.testing.assert_close(plain.stats(), padded.stats())


def test_fused_loss_equals_the_checkpointed_one_with_gradients():
    """The fused chunk step (logit gradient made in the forward) against the checkpointed recompute path: same sums,
    same gradients for the hidden states and for a trained lm_head, chunks not aligned with rows."""
    for z_loss in (0.0, 1e-3):
        results = []
        for fused in (False, True):
            hidden, head, labels = _batch(seed=2)
            sums = streaming_loss_sums(hidden, head, labels, PAD, pad_weight=0.5, text_weight=1.0, z_loss=z_loss,
                                       chunk_positions=7, fused=fused)
            grads = torch.autograd.grad(3.0 * sums.weighted, [hidden, head.weight])
            results.append((sums.stats(), grads))
        (stats_ref, grads_ref), (stats_fused, grads_fused) = results
        torch.testing.assert_close(stats_fused, stats_ref, rtol=1e-6, atol=1e-5)
        for got, expected in zip(grads_fused, grads_ref):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_fused_loss_falls_back_where_the_weight_is_not_a_plain_linear():
    hidden, head, labels = _batch(seed=3)
    kw = dict(pad_weight=0.5, text_weight=1.0, chunk_positions=16)
    as_function = streaming_loss_sums(hidden, lambda h: head(h), labels, PAD, **kw)  # no .weight: checkpointed
    fused = streaming_loss_sums(hidden, head, labels, PAD, **kw)
    def made_by_fused(sums) -> bool:  # the weighted sum is one entry of the fused function's output vector
        return "_FusedLinearCEBackward" in str(sums.weighted.grad_fn.next_functions)

    assert made_by_fused(fused) and not made_by_fused(as_function)
    torch.testing.assert_close(fused.weighted, as_function.weighted)
