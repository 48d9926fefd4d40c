"""The trainable-parameter policy: exact LoRA target sets, only trainable tensors move, tied embeddings stay tied."""

import re

import pytest
import torch
from peft.tuners.lora import LoraLayer

from voxtral_train import protocol
from voxtral_train.config import PeftSettings
from voxtral_train.trainable import (
    apply_trainable_policy,
    extra_trainable_state,
    parameter_counts,
    parameter_table,
    save_trainable,
)

PROJ = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj"]


def _lora_modules(model):
    return {name.removeprefix("base_model.model.") for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def _expected(prefix, n_layers):
    return {f"{prefix}.layers.{i}.{p}" for i in range(n_layers) for p in PROJ}


def test_lora_targets_exactly_the_decoder_projections(tiny):
    model, _ = tiny()
    n_dec = model.config.text_config.num_hidden_layers
    model = apply_trainable_policy(model, PeftSettings())
    assert _lora_modules(model) == _expected("model.language_model", n_dec)
    assert len(_lora_modules(model)) == 7 * n_dec


def test_encoder_lora_adds_the_encoder_projections(tiny):
    model, _ = tiny()
    n_dec, n_enc = model.config.text_config.num_hidden_layers, model.config.audio_config.num_hidden_layers
    model = apply_trainable_policy(model, PeftSettings(mode="encoder_lora"))
    assert _lora_modules(model) == _expected("model.language_model", n_dec) | _expected("model.audio_tower", n_enc)


@pytest.mark.parametrize(
    "settings",
    [PeftSettings(dropout=0.0), PeftSettings(dropout=0.0, unfreeze_encoder=True),
     PeftSettings(dropout=0.0, unfreeze_adapter=True), PeftSettings(mode="encoder_lora", dropout=0.0),
     PeftSettings(mode="full")],
    ids=["lora", "lora+encoder", "lora+adapter", "encoder_lora", "full"],
)
def test_one_step_moves_only_trainable_parameters(tiny, settings):
    model, _ = tiny()
    model = apply_trainable_policy(model, settings)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    positions = 10
    features = torch.randn(2, protocol.NUM_MEL_BINS, positions * protocol.MEL_FRAMES_PER_POSITION, generator=gen)
    ids = torch.randint(0, 2000, (2, positions), generator=gen)
    for _ in range(2):  # two steps: lora_A only moves once lora_B is non-zero
        logits = model(input_ids=ids, input_features=features, num_delay_tokens=6, use_cache=False).logits
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.roll(-1, 1).flatten()).backward()
        optimizer.step()
        optimizer.zero_grad()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == trainable
    base = model.base_model.model if settings.mode != "full" else model
    assert base.lm_head.weight is base.model.language_model.embed_tokens.weight
    counts = parameter_counts(model)
    if settings.unfreeze_encoder or settings.mode == "full":
        assert counts["encoder"][0] == counts["encoder"][1]
    if settings.mode != "full":
        assert counts["embeddings"][0] == 0 and counts["delay conditioning"][0] == 0


def test_parameter_table_lists_every_component(tiny):
    model, _ = tiny()
    table = parameter_table(apply_trainable_policy(model, PeftSettings()))
    for component in ("encoder", "adapter", "decoder", "delay conditioning", "embeddings", "all"):
        assert re.search(rf"^{component}\s", table, re.M), table


def test_save_trainable_writes_adapter_and_extra_tensors(tiny, tmp_path):
    model, _ = tiny()
    model = apply_trainable_policy(model, PeftSettings(unfreeze_adapter=True))
    extra = extra_trainable_state(model)
    assert set(extra) == {"model.multi_modal_projector.linear_1.weight", "model.multi_modal_projector.linear_2.weight"}
    save_trainable(model, tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert (tmp_path / "extra_trainable.safetensors").is_file()


@pytest.mark.parametrize("adapter_fp32, expected", [(True, torch.float32), (False, torch.bfloat16)])
def test_adapter_dtype_on_a_bf16_model(adapter_fp32, expected):
    from voxtral_train import load_model

    model, _ = load_model("tiny", dtype="bfloat16")
    model = apply_trainable_policy(model, PeftSettings(adapter_fp32=adapter_fp32))
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {expected}
    assert {p.dtype for n, p in model.named_parameters() if "lora_" not in n} == {torch.bfloat16}
