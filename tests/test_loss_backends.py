"""train.loss_backend: the optional fused-kernel libraries (Liger Kernel, cut-cross-entropy) against the chunked loss,
and the one-line refusals when one cannot run (package missing or too old, no CUDA device, ZeRO-3, z-loss)."""

import importlib
import importlib.metadata
import math
import os
import subprocess
import sys
import textwrap
import types
import typing
from functools import partial
from pathlib import Path

import pytest
import torch

from voxtral_train.config import ConfigError, TrainSettings, settings_from_dict
from voxtral_train.loss import CHUNKED, IGNORE_INDEX, LOSS_BACKENDS, STAT_NAMES, streaming_loss_sums
from voxtral_train.streaming_lm import StreamingLM

PAD = 32
REPO = Path(__file__).resolve().parent.parent
UNMEASURED = ("text_correct", "text_as_pad")  # cut-cross-entropy computes no argmax


def _batch(seed: int = 0, batch: int = 3, positions: int = 37, dim: int = 16, vocab: int = 50,
           device: str = "cpu"):
    """Hidden states, a bias-free lm_head and labels where all four text statistics are non-zero: PAD is often the
    argmax (its weight row is long, as in a stream) and every third position points at its own target."""
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(dim, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, dim, generator=g))
        head.weight[PAD] *= 3
    labels = torch.randint(0, vocab, (batch, positions), generator=g)
    labels[torch.rand(batch, positions, generator=g) < 0.5] = PAD
    hidden = torch.randn(batch, positions, dim, generator=g)
    hidden[:, ::3] = 2 * head.weight.detach()[labels[:, ::3]] / head.weight.detach()[labels[:, ::3]].norm(
        dim=-1, keepdim=True)
    labels[:, :5] = IGNORE_INDEX  # prompt positions are not scored
    labels[1, -7:] = IGNORE_INDEX  # right padding of a shorter clip
    return hidden.to(device).requires_grad_(True), head.to(device), labels.to(device)


def _loss_and_grads(backend: str, z_loss: float = 0.0, **batch_kw):
    """(statistics vector, d(3 x weighted)/d(hidden, lm_head weight)) of one backend on the same batch."""
    hidden, head, labels = _batch(**batch_kw)
    sums = streaming_loss_sums(hidden, head, labels, PAD, pad_weight=0.5, text_weight=1.0, z_loss=z_loss,
                               chunk_positions=7, backend=backend)
    return sums.stats(), torch.autograd.grad(3.0 * sums.weighted, [hidden, head.weight])


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


# --- the setting ------------------------------------------------------------------------------------------------

def test_the_setting_offers_exactly_the_backends_the_loss_knows():
    offered = typing.get_args(typing.get_type_hints(TrainSettings)["loss_backend"])
    assert set(offered) == {CHUNKED, *LOSS_BACKENDS}
    assert TrainSettings().loss_backend == CHUNKED


def test_settings_refuse_zero3_and_z_loss_where_a_backend_cannot_do_them():
    def problems(raw: dict) -> list[str]:
        with pytest.raises(ConfigError) as err:
            settings_from_dict(raw)
        return err.value.problems

    (zero3,) = problems({"train": {"loss_backend": "liger"}, "deepspeed": {"zero_stage": 3}})
    assert zero3.startswith("train.loss_backend: liger reads the lm_head weight whole, which ZeRO-3 partitions")
    assert "train.loss_backend=chunked" in zero3
    (z_loss,) = problems({"train": {"loss_backend": "cut_cross_entropy", "z_loss": 1e-4}})
    assert z_loss.startswith("train.z_loss: cut_cross_entropy has no z-loss term")
    (typo,) = problems({"train": {"loss_backend": "ligr"}})
    assert typo.startswith("train.loss_backend: 'ligr' is not one of 'chunked', 'liger', 'cut_cross_entropy'")
    # what each backend can do passes
    assert settings_from_dict({"train": {"loss_backend": "liger", "z_loss": 1e-4}}).train.loss_backend == "liger"
    assert settings_from_dict({"train": {"z_loss": 1e-4}, "deepspeed": {"zero_stage": 3}}).deepspeed.zero_stage == 3
    assert settings_from_dict({"train": {"loss_backend": "cut_cross_entropy"},
                               "deepspeed": {"zero_stage": 2}}).train.loss_backend == "cut_cross_entropy"


# --- the startup check (StreamingLM) ----------------------------------------------------------------------------

def _environment(monkeypatch, *, installed: dict[str, str], cuda: bool, broken: str | None = None) -> None:
    """Pretend which optional packages are installed (distribution -> version), whether a CUDA device is visible,
    and that importing `broken` fails."""
    def version(package: str) -> str:
        if package not in installed:
            raise importlib.metadata.PackageNotFoundError(package)
        return installed[package]

    def import_module(name: str, package: str | None = None):
        if name == broken:
            raise ImportError("No module named 'triton'")
        return None  # the module itself is not needed by the check

    monkeypatch.setattr(importlib.metadata, "version", version)
    monkeypatch.setattr(importlib, "import_module", import_module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)


def _startup_problems(backend: str) -> list[str]:
    with pytest.raises(ConfigError) as err:
        StreamingLM(torch.nn.Identity(), PAD, loss_backend=backend)
    assert all("\n" not in problem for problem in err.value.problems)  # one line each
    return err.value.problems


def test_a_missing_package_stops_at_startup_naming_the_setting_the_install_and_the_fallback(monkeypatch):
    _environment(monkeypatch, installed={}, cuda=True)
    (liger,) = _startup_problems("liger")
    assert liger == ("train.loss_backend=liger: the optional package liger-kernel is not installed: "
                     "pip install 'liger-kernel>=0.8.0', or run train.loss_backend=chunked (the built-in loss, "
                     "no extra package)")
    (cce,) = _startup_problems("cut_cross_entropy")
    assert "pip install 'cut-cross-entropy'," in cce and "train.loss_backend=chunked" in cce


def test_no_cuda_device_stops_at_startup(monkeypatch):
    _environment(monkeypatch, installed={"liger-kernel": "0.8.5", "cut-cross-entropy": "25.1.1"}, cuda=False)
    for backend, package in (("liger", "liger-kernel"), ("cut_cross_entropy", "cut-cross-entropy")):
        (problem,) = _startup_problems(backend)
        assert problem == (f"train.loss_backend={backend}: {package} runs Triton kernels on a CUDA GPU and none is "
                           f"visible: run train.loss_backend=chunked (the built-in loss, no extra package)")


def test_an_old_or_broken_install_stops_at_startup(monkeypatch):
    _environment(monkeypatch, installed={"liger-kernel": "0.7.0"}, cuda=True)
    (old,) = _startup_problems("liger")
    assert old.startswith("train.loss_backend=liger: liger-kernel 0.7.0 is too old: pip install 'liger-kernel>=0.8.0'")
    _environment(monkeypatch, installed={"cut-cross-entropy": "25.1.1"}, cuda=False, broken="cut_cross_entropy")
    broken, no_gpu = _startup_problems("cut_cross_entropy")  # every problem at once
    assert "`import cut_cross_entropy` failed (No module named 'triton')" in broken
    assert "none is visible" in no_gpu


def test_a_usable_backend_and_chunked_pass_the_startup_check(monkeypatch):
    _environment(monkeypatch, installed={"liger-kernel": "0.8.0"}, cuda=True)
    assert StreamingLM(torch.nn.Identity(), PAD, loss_backend="liger").loss_backend == "liger"
    _environment(monkeypatch, installed={}, cuda=False)
    assert StreamingLM(torch.nn.Identity(), PAD).loss_backend == CHUNKED


def test_chunked_never_imports_the_optional_packages(tmp_path):
    """Poisoned stand-ins for both packages come first on the path: a chunked StreamingLM, its training loss and
    backward must run without touching them (the imports are lazy, inside the backend's own function)."""
    for module in ("liger_kernel", "cut_cross_entropy"):
        (tmp_path / module).mkdir()
        (tmp_path / module / "__init__.py").write_text(f"raise RuntimeError('{module} was imported')\n")
    script = textwrap.dedent(f"""
        import torch
        import voxtral_train.train
        from voxtral_train.loss import streaming_loss_sums
        from voxtral_train.streaming_lm import StreamingLM
        StreamingLM(torch.nn.Identity(), {PAD})
        hidden = torch.randn(2, 9, 8, requires_grad=True)
        labels = torch.randint(0, 40, (2, 9))
        sums = streaming_loss_sums(hidden, torch.nn.Linear(8, 40, bias=False), labels, {PAD}, pad_weight=0.5,
                                   text_weight=1.0)
        sums.weighted.backward()
        print("ok")
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


# --- the loss function ------------------------------------------------------------------------------------------

def _stats(backend: str, **kw) -> torch.Tensor:
    hidden, head, labels = _batch()
    return streaming_loss_sums(hidden, head, labels, PAD, pad_weight=0.5, text_weight=1.0, chunk_positions=7,
                               backend=backend, **kw).stats()


def test_without_gradients_every_backend_runs_the_chunked_loss():
    """Eval and the anchor probe: no library is imported (none needs to be installed) and the statistics are
    exact; under ZeRO-3 padding (min_chunks) too."""
    with torch.no_grad():
        expected = _stats(CHUNKED)
        for backend in LOSS_BACKENDS:
            torch.testing.assert_close(_stats(backend), expected, rtol=0, atol=0)
            torch.testing.assert_close(_stats(backend, min_chunks=9), expected, rtol=0, atol=0)


def test_training_with_a_backend_refuses_an_lm_head_it_cannot_read_and_a_z_loss_it_lacks():
    hidden, head, labels = _batch()
    kw = dict(pad_weight=0.5, text_weight=1.0)
    for backend in LOSS_BACKENDS:
        with pytest.raises(ValueError, match=rf"train.loss_backend={backend} needs the lm_head as one bias-free"):
            streaming_loss_sums(hidden, lambda h: head(h), labels, PAD, backend=backend, **kw)  # no .weight
        with pytest.raises(ValueError, match="not ZeRO-3 partitioned"):
            streaming_loss_sums(hidden, head, labels, PAD, backend=backend, min_chunks=3, **kw)
    with pytest.raises(ValueError, match="train.loss_backend=cut_cross_entropy has no z-loss term"):
        streaming_loss_sums(hidden, head, labels, PAD, backend="cut_cross_entropy", z_loss=1e-3, **kw)


def _compare(backend: str, stats_rtol: float, grad_rel: float, z_loss: float = 0.0, **batch_kw) -> dict[str, float]:
    """The backend against the chunked loss on the same batch: every statistic the backend measures, and the
    gradients of the hidden states and of a trained lm_head (norm-relative error). Returns the errors seen."""
    stats_ref, grads_ref = _loss_and_grads(CHUNKED, z_loss, **batch_kw)
    stats, grads = _loss_and_grads(backend, z_loss, **batch_kw)
    measured = [i for i, name in enumerate(STAT_NAMES) if backend == "liger" or name not in UNMEASURED]
    for i, name in enumerate(STAT_NAMES):
        if i not in measured:
            assert math.isnan(stats[i].item()), name  # unmeasured reads as nan, never as a plausible 0
    torch.testing.assert_close(stats[measured].cpu(), stats_ref[measured].cpu(), rtol=stats_rtol, atol=1e-4)
    errors = {name: _relative_error(got, want) for name, got, want in zip(("hidden", "lm_head"), grads, grads_ref)}
    assert max(errors.values()) < grad_rel, errors
    return errors


def test_cut_cross_entropy_matches_the_chunked_loss_on_cpu(monkeypatch):
    """Our wiring (weights, statistics, gradients) through cut-cross-entropy's pure-torch implementation, which
    runs on a CPU; the Triton kernel itself is `test_backends_match_the_chunked_loss_on_a_gpu`."""
    cce = pytest.importorskip("cut_cross_entropy")
    monkeypatch.setattr(cce, "linear_cross_entropy", partial(cce.linear_cross_entropy, impl="torch_compile"))
    errors = _compare("cut_cross_entropy", stats_rtol=1e-5, grad_rel=1e-5)
    print(f"cut_cross_entropy (torch_compile, CPU, fp32) gradient errors: {errors}")


def _liger_stand_in(monkeypatch) -> list[dict]:
    """A pure-torch `liger_kernel.transformers.functional` with the contract of liger_fused_linear_cross_entropy
    (reduction="sum": the sum of CE + lse_square_scale * lse^2; return_z_loss: that z-loss sum on its own;
    return_predicted_tokens: the argmax per target), so our side of the Liger wiring runs on a CPU; the Triton
    kernel itself is `test_backends_match_the_chunked_loss_on_a_gpu`. Returns the calls' arguments."""
    calls: list[dict] = []

    def fused_linear_cross_entropy(input, weight, target, *, lse_square_scale, reduction, return_z_loss,
                                   accum_dtype, return_predicted_tokens):
        calls.append(dict(n=target.numel(), reduction=reduction, accum_dtype=accum_dtype))
        logits = (input @ weight.t()).float()
        lse = logits.logsumexp(-1)
        z = lse_square_scale * lse.square()
        ce = lse - logits.gather(-1, target[:, None]).squeeze(-1)
        return types.SimpleNamespace(loss=(ce + z).sum(), z_loss=z.sum().detach() if return_z_loss else None,
                                     predicted_tokens=logits.argmax(-1) if return_predicted_tokens else None)

    functional = types.ModuleType("liger_kernel.transformers.functional")
    functional.liger_fused_linear_cross_entropy = fused_linear_cross_entropy
    for name in ("liger_kernel", "liger_kernel.transformers"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, functional.__name__, functional)
    return calls


def test_the_liger_wiring_matches_the_chunked_loss_on_cpu(monkeypatch):
    """One sum call per target kind, weighted here: loss, every statistic (argmax ones included) and gradients
    equal the chunked loss's, with and without z-loss, and when a micro-batch has no text target at all."""
    calls = _liger_stand_in(monkeypatch)
    for z_loss in (0.0, 1e-3):
        errors = _compare("liger", stats_rtol=1e-5, grad_rel=1e-5, z_loss=z_loss)
        print(f"liger wiring (stand-in, CPU, fp32) z_loss={z_loss} gradient errors: {errors}")
    assert {(c["reduction"], c["accum_dtype"]) for c in calls} == {("sum", torch.float32)}
    hidden, head, labels = _batch()
    labels[labels != IGNORE_INDEX] = PAD  # only pad targets: the text call is skipped, its sums are 0
    calls.clear()
    sums = streaming_loss_sums(hidden, head, labels, PAD, pad_weight=0.5, text_weight=1.0, backend="liger")
    assert len(calls) == 1 and sums.text_ce.item() == sums.text_correct.item() == sums.text_as_pad.item() == 0
    torch.testing.assert_close(sums.weighted, 0.5 * sums.pad_ce)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("backend", list(LOSS_BACKENDS))
def test_backends_match_the_chunked_loss_on_a_gpu(backend: str, autocast: bool):
    """The Triton kernels against the chunked loss on a larger batch: fp32, and under bf16 autocast (what
    train.mixed_precision=bf16 runs). The tolerances follow the kernels' arithmetic, not a measured run: Liger
    computes fp32 CE on cuBLAS logits; cut-cross-entropy multiplies with TF32/bf16 tl.dot and drops small gradient
    entries (filter_eps), so it gets more room."""
    pytest.importorskip(LOSS_BACKENDS[backend].module)
    batch = dict(batch=4, positions=300, dim=256, vocab=4096, device="cuda")
    stats_rtol, grad_rel = {("liger", False): (1e-4, 1e-3), ("liger", True): (2e-2, 3e-2),
                            ("cut_cross_entropy", False): (5e-3, 2e-2),
                            ("cut_cross_entropy", True): (2e-2, 5e-2)}[backend, autocast]
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        for z_loss in (0.0, 1e-3) if backend == "liger" else (0.0,):
            errors = _compare(backend, stats_rtol, grad_rel, z_loss, **batch)
            print(f"{backend} autocast={autocast} z_loss={z_loss}: gradient errors {errors}")
