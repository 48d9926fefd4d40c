"""`voxtral-export`: merge, Mistral export, vLLM adapter export and the folder checker (tiny model, CPU)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from tiny_inputs import tiny_logits

from voxtral_train import export, export_checks
from voxtral_train import mistral_format as mf
from voxtral_train.model import load_model
from voxtral_train.trainable import DECODER_LORA_REGEX, save_trainable


def lora_model(target_modules=DECODER_LORA_REGEX, rank: int = 8):
    """A fresh tiny base (deterministic weights) wrapped in a LoRA whose B is non-zero, so merging matters."""
    base, tokenizer = load_model("tiny")
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=16, target_modules=target_modules))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.02 * torch.randn(param.shape, generator=g))
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def decoder_lora(tmp_path_factory):
    """(PEFT model, its logits, adapter folder as training writes it)."""
    model, _ = lora_model()
    folder = tmp_path_factory.mktemp("adapter")
    save_trainable(model, folder)
    return model, tiny_logits(model), folder


@pytest.fixture(scope="module")
def base_mistral(tmp_path_factory):
    """The tiny base model exported to a Mistral folder (bf16), as a checker reference and a good folder."""
    model, tokenizer = load_model("tiny")
    return mf.write_mistral_folder(tmp_path_factory.mktemp("base") / "m", model.config, model.state_dict(),
                                   tokenizer.tekken_path)


# ---------------------------------------------------------------------------------------------------------------
# merge


def test_merge_equals_the_peft_model_and_keeps_embeddings_tied(decoder_lora):
    _, peft_logits, folder = decoder_lora
    base, _ = load_model("tiny")
    assert (tiny_logits(base.eval()) - peft_logits).abs().max() > 1e-3  # the LoRA matters
    merged = export.merge_adapter(base, folder)
    assert merged.lm_head.weight is merged.model.language_model.embed_tokens.weight
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    assert torch.allclose(tiny_logits(merged.eval()), peft_logits, atol=1e-5, rtol=0)


def test_merge_loads_fully_trained_projector_from_extra_trainable(tmp_path):
    model, _ = lora_model()
    projector = model.base_model.model.model.multi_modal_projector
    with torch.no_grad():
        projector.linear_1.weight.add_(0.05 * torch.randn(projector.linear_1.weight.shape))
    projector.requires_grad_(True)  # what the trainer does when the adapter/projector is unfrozen
    save_trainable(model, tmp_path)
    assert (tmp_path / "extra_trainable.safetensors").is_file()
    base, _ = load_model("tiny")
    merged = export.merge_adapter(base, tmp_path)
    assert torch.allclose(tiny_logits(merged.eval()), tiny_logits(model), atol=1e-5, rtol=0)


def test_cli_merge_then_mistral_serves_the_peft_logits(decoder_lora, base_mistral, tmp_path, capsys):
    _, peft_logits, folder = decoder_lora
    merged, served = tmp_path / "merged", tmp_path / "served"
    assert export.main(["merge", "--base", "tiny", "--adapter", str(folder), "--out", str(merged)]) == 0
    assert (merged / "tekken.json").is_file()
    assert export.main(["mistral", "--model", str(merged), "--out", str(served), "--dtype", "float32",
                        "--delay-ms", "960", "--reference", str(base_mistral)]) == 0
    out = capsys.readouterr().out
    assert (f"vllm serve {served} --tokenizer-mode mistral --config-format mistral --load-format mistral "
            "--enforce-eager") in out
    assert "RoPE order compared" in out
    assert json.loads((served / "tekken.json").read_text())["audio"]["transcription_delay_ms"] == 960
    reloaded, _ = load_model(served)
    assert torch.allclose(tiny_logits(reloaded.eval()), peft_logits, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# vLLM adapter


def test_adapter_export_has_exactly_the_vllm_keys(decoder_lora, tmp_path, capsys):
    model, _, folder = decoder_lora
    out = tmp_path / "vllm_lora"
    assert export.main(["adapter", "--adapter", str(folder), "--out", str(out), "--name", "mine"]) == 0
    layers = model.config.text_config.num_hidden_layers
    modules = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    expected = {f"base_model.model.language_model.model.layers.{i}.{m}.lora_{ab}.weight"
                for i in range(layers) for m in modules for ab in "AB"}
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert set(tensors) == expected
    peft_b = dict(model.named_parameters())["base_model.model.model.language_model.layers.1.self_attn.k_proj.lora_B.default.weight"]
    assert torch.equal(tensors["base_model.model.language_model.model.layers.1.self_attn.k_proj.lora_B.weight"], peft_b)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16 and config["bias"] == "none"
    assert config["target_modules"] == sorted(m.split(".")[1] for m in modules)
    assert "modules_to_save" not in config and not config.get("use_dora")
    assert (f"--enable-lora --lora-modules mine={out} --max-lora-rank 8 "
            "--lora-target-modules qkv_proj o_proj gate_up_proj down_proj") in capsys.readouterr().out


def _edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("fault", ["encoder_lora", "modules_to_save", "dora", "rank_4", "extra_trainable"])
def test_adapter_export_refuses_what_vllm_cannot_serve(decoder_lora, tmp_path, fault):
    src = tmp_path / "src"
    if fault == "encoder_lora":
        model, _ = lora_model(target_modules=["q_proj"])  # a plain list wraps the audio encoder too
        save_trainable(model, src)
    else:
        shutil.copytree(decoder_lora[2], src)
    if fault == "modules_to_save":
        _edit_config(src, modules_to_save=["multi_modal_projector"])
    elif fault == "dora":
        _edit_config(src, use_dora=True)
    elif fault == "rank_4":
        _edit_config(src, r=4)
    elif fault == "extra_trainable":
        save_file({"model.multi_modal_projector.linear_2.weight": torch.zeros(2, 2)},
                  str(src / "extra_trainable.safetensors"))
    with pytest.raises(export.ExportError, match="use `voxtral-export merge` \\+ `voxtral-export mistral` instead"):
        export.convert_adapter(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# checker


def test_check_accepts_good_folders(base_mistral, decoder_lora, tmp_path):
    assert export_checks.check_folder(base_mistral).ok
    assert export_checks.check_folder(base_mistral, reference=base_mistral).ok
    export.convert_adapter(decoder_lora[2], tmp_path / "a")
    assert export_checks.check_folder(tmp_path / "a").kind == "adapter" and export_checks.check_folder(tmp_path / "a").ok


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_check_catches_a_wrong_tensor_name(base_mistral, tmp_path, capsys):
    bad = _copy(base_mistral, tmp_path / "bad")
    sd = load_file(str(bad / "consolidated.safetensors"))
    sd["layers.0.attention.wq_proj.weight"] = sd.pop("layers.0.attention.wq.weight")
    save_file(sd, str(bad / "consolidated.safetensors"))
    assert export.main(["check", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "missing tensor layers.0.attention.wq.weight" in out
    assert "unexpected tensor layers.0.attention.wq_proj.weight" in out


def test_check_catches_a_wrong_shape_and_an_output_head(base_mistral, tmp_path):
    bad = _copy(base_mistral, tmp_path / "bad")
    sd = load_file(str(bad / "consolidated.safetensors"))
    sd["norm.weight"] = sd["norm.weight"][:-1].clone()
    sd["output.weight"] = sd["mm_streams_embeddings.embedding_module.tok_embeddings.weight"].clone()
    save_file(sd, str(bad / "consolidated.safetensors"))
    problems = "\n".join(export_checks.check_folder(bad).problems)
    assert "tensor norm.weight has shape" in problems
    assert "output.weight present" in problems
    assert "tensors, the config needs" in problems


def test_check_catches_missing_tekken_and_stale_weights(base_mistral, tmp_path):
    bad = _copy(base_mistral, tmp_path / "bad")
    (bad / "tekken.json").unlink()
    (bad / "model.safetensors").write_bytes(b"stale")
    problems = export_checks.check_folder(bad).problems
    assert "tekken.json is missing" in problems
    assert any("stale weight file model.safetensors" in p for p in problems)


def test_check_catches_missing_params_keys(base_mistral, tmp_path):
    bad = _copy(base_mistral, tmp_path / "bad")
    params = json.loads((bad / "params.json").read_text())
    del params["multimodal"]["whisper_model_args"]["encoder_args"]["vocab_size"]
    (bad / "params.json").write_text(json.dumps(params))
    assert export_checks.check_folder(bad).problems == [
        "params.json lacks key 'multimodal.whisper_model_args.encoder_args.vocab_size'"
    ]


def test_check_with_reference_catches_q_left_in_hf_order(base_mistral, tmp_path, monkeypatch):
    model, tokenizer = load_model("tiny")
    monkeypatch.setattr(mf, "unpermute_for_rope", lambda w, heads: w)
    bad = mf.write_mistral_folder(tmp_path / "bad", model.config, model.state_dict(), tokenizer.tekken_path)
    monkeypatch.undo()
    assert export_checks.check_folder(bad).ok  # names, shapes and dtypes cannot show the order
    problems = export_checks.check_folder(bad, reference=base_mistral).problems
    # q and k of every decoder and encoder layer (2 + 2 layers in the tiny model); its encoder q biases are zero,
    # so their order cannot be told apart (the bias test below gives them values)
    assert len(problems) == 8 and all("HF rotate-half order" in p for p in problems)


def test_check_catches_encoder_lora_keys_in_an_adapter(decoder_lora, tmp_path):
    out = tmp_path / "a"
    export.convert_adapter(decoder_lora[2], out)
    tensors = load_file(str(out / "adapter_model.safetensors"))
    encoder_key = "base_model.model.model.audio_tower.layers.0.self_attn.q_proj.lora_A.weight"
    tensors[encoder_key] = torch.zeros(8, 64)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    problems = export_checks.check_folder(out).problems
    assert len(problems) == 1 and encoder_key in problems[0]


def test_check_catches_adapter_config_faults(decoder_lora, tmp_path):
    out = tmp_path / "a"
    export.convert_adapter(decoder_lora[2], out)
    _edit_config(out, r=4, bias="all", modules_to_save=["x"])
    problems = "\n".join(export_checks.check_folder(out).problems)
    assert "r=4" in problems and "bias='all'" in problems and "modules_to_save" in problems
    assert "has rank 8, adapter_config.json says r=4" in problems


def test_check_catches_a_tokenizer_that_does_not_fit(base_mistral, tmp_path):
    bad = _copy(base_mistral, tmp_path / "bad")
    tekken = json.loads((bad / "tekken.json").read_text())
    tekken["config"]["default_vocab_size"] = json.loads((bad / "params.json").read_text())["vocab_size"] + 1
    del tekken["audio"]
    (bad / "tekken.json").write_text(json.dumps(tekken))
    problems = "\n".join(export_checks.check_folder(bad).problems)
    assert "tokens, params.json vocab_size is" in problems and "no 'audio' section" in problems


# ---------------------------------------------------------------------------------------------------------------
# the checker at full power, the delay from the run, world-readable files


def _model_with_biases():
    """The tiny model with non-zero encoder q biases (zero biases look the same in any order)."""
    model, tokenizer = load_model("tiny")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in model.model.audio_tower.layers:
            layer.self_attn.q_proj.bias.copy_(torch.randn(layer.self_attn.q_proj.bias.shape, generator=g))
    return model, tokenizer


def _tampered(folder, name, change):
    weights = folder / "consolidated.safetensors"
    tensors = load_file(str(weights))
    tensors[name] = change(tensors[name]).contiguous()
    save_file(tensors, str(weights), metadata={"format": "pt"})


def test_check_with_reference_names_each_wrong_layer_bias_and_double_permutation(tmp_path):
    model, tokenizer = _model_with_biases()
    ref = mf.write_mistral_folder(tmp_path / "ref", model.config, model.state_dict(), tokenizer.tekken_path)
    enc = "mm_streams_embeddings.embedding_module.whisper_encoder.transformer.layers.1.attention"
    heads_kv, heads_enc = model.config.text_config.num_key_value_heads, model.config.audio_config.num_attention_heads
    cases = {  # tensor -> what a faulty export would have written there
        "layers.1.attention.wk.weight": (lambda w: mf.permute_for_rope(w, heads_kv), "HF rotate-half order"),
        f"{enc}.wq.bias": (lambda w: mf.permute_for_rope(w, heads_enc), "HF rotate-half order"),
        f"{enc}.wk.weight": (lambda w: mf.unpermute_for_rope(w, heads_enc), "applied twice"),
    }
    for name, (change, message) in cases.items():
        bad = _copy(ref, tmp_path / name)
        _tampered(bad, name, change)
        assert export_checks.check_folder(bad).ok
        problems = export_checks.check_folder(bad, reference=ref).problems
        assert len(problems) == 1 and problems[0].startswith(name) and message in problems[0], problems
    assert export_checks.check_folder(ref, reference=ref).ok


def test_check_compares_the_tekken_audio_section_with_params_and_the_protocol(base_mistral, tmp_path):
    bad = _copy(base_mistral, tmp_path / "bad")
    tekken = json.loads((bad / "tekken.json").read_text(encoding="utf-8"))
    tekken["audio"]["sampling_rate"] = 8000
    tekken["audio"]["transcription_delay_ms"] = 0
    (bad / "tekken.json").write_text(json.dumps(tekken), encoding="utf-8")
    params = json.loads((bad / "params.json").read_text())
    params["multimodal"]["whisper_model_args"]["encoder_args"]["audio_encoding_args"]["hop_length"] = 320
    (bad / "params.json").write_text(json.dumps(params))
    problems = export_checks.check_folder(bad).problems
    assert "tekken.json audio.sampling_rate=8000: the streaming protocol needs 16000" in problems
    assert "tekken.json audio.audio_encoding_config.hop_length=160 but params.json's audio_encoding_args say 320" in problems
    assert any("transcription_delay_ms=0: needs a positive multiple of 80 ms" in p for p in problems)


def test_exported_weights_are_world_readable(decoder_lora, base_mistral, tmp_path):
    export.convert_adapter(decoder_lora[2], tmp_path / "a")
    for path in [base_mistral / "consolidated.safetensors", tmp_path / "a" / "adapter_model.safetensors"]:
        assert path.stat().st_mode & 0o044 == 0o044, oct(path.stat().st_mode)


def _full_run(tmp_path, delays_ms):
    """A run folder as a full fine-tune leaves it: final/ holds a whole HF model and the run's config.yaml."""
    import yaml

    model, tokenizer = load_model("tiny")
    final = tmp_path / "run" / "final"
    model.save_pretrained(final, safe_serialization=True)
    shutil.copyfile(tokenizer.tekken_path, final / "tekken.json")
    (final / "config.yaml").write_text(yaml.safe_dump({"data": {"delays_ms": delays_ms}}))
    return final.parent, model


def test_mistral_export_of_a_run_writes_the_delay_it_trained_at(tmp_path, capsys):
    run, model = _full_run(tmp_path, [240])
    served = tmp_path / "served"
    assert export.main(["mistral", "--model", str(run), "--out", str(served)]) == 0
    assert json.loads((served / "tekken.json").read_text(encoding="utf-8"))["audio"]["transcription_delay_ms"] == 240
    assert "serving delay 240 ms, from the run's training delay" in capsys.readouterr().out
    reloaded, _ = load_model(served, dtype="float32")
    assert torch.allclose(tiny_logits(reloaded.eval()), tiny_logits(model.eval().to(torch.bfloat16).float()),
                          atol=1e-5, rtol=0)


def test_mistral_export_asks_for_the_delay_and_writes_nothing_until_every_argument_is_good(tmp_path, capsys):
    run, _ = _full_run(tmp_path, [240, 480])
    out = tmp_path / "served"
    assert export.main(["mistral", "--model", str(run), "--out", str(out)]) == 1
    assert "several delays [240, 480] ms" in capsys.readouterr().err and not out.exists()
    for bad in ("0", "100"):
        with pytest.raises(SystemExit) as exit_info:
            export.main(["mistral", "--model", str(run), "--out", str(out), "--delay-ms", bad])
        assert exit_info.value.code == 2 and "positive multiple of 80 ms" in capsys.readouterr().err
        assert not out.exists()
    assert export.main(["mistral", "--model", str(run), "--out", str(out), "--delay-ms", "960",
                        "--reference", str(tmp_path)]) == 1
    assert "is not a Mistral folder" in capsys.readouterr().err and not out.exists()


def test_mistral_export_refuses_a_lora_run_and_names_the_merge(decoder_lora, tmp_path, capsys):
    run = tmp_path / "lora_run"
    shutil.copytree(decoder_lora[2], run / "final")
    assert export.main(["mistral", "--model", str(run), "--out", str(tmp_path / "o"), "--delay-ms", "480"]) == 1
    assert "voxtral-export merge --base BASE --adapter" in capsys.readouterr().err


def test_mistral_export_accepts_a_mistral_folder_and_keeps_its_delay(base_mistral, tmp_path):
    again = tmp_path / "again"
    assert export.main(["mistral", "--model", str(base_mistral), "--out", str(again)]) == 0
    assert load_file(str(again / "consolidated.safetensors")).keys() == load_file(
        str(base_mistral / "consolidated.safetensors")).keys()
    for name, tensor in load_file(str(base_mistral / "consolidated.safetensors")).items():
        assert torch.equal(load_file(str(again / "consolidated.safetensors"))[name], tensor), name
    assert json.loads((again / "tekken.json").read_text(encoding="utf-8"))["audio"]["transcription_delay_ms"] == 480
