import re
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

from voxtral_train.config import (
    CONFIG_DIR,
    ConfigError,
    Settings,
    compose_settings,
    settings_from_dict,
    settings_to_dict,
)

GROUPS = ("model", "peft", "data", "optim", "train", "logging", "deepspeed")
# Options whose `???` values a user must fill in, with a value that fills them.
REQUIRED = {("model", "voxtral_mini_4b"): ["model.path=/models/voxtral"],
            ("data", "manifest"): ["data.train_manifest=/data/train.jsonl"]}


def _raw(**changes) -> dict:
    """The default settings as a plain dict, with `section.key` values replaced."""
    raw = settings_to_dict(Settings())
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        raw[section][key] = value
    return raw


def _problems(**changes) -> list[str]:
    with pytest.raises(ConfigError) as err:
        settings_from_dict(_raw(**changes))
    return err.value.problems


def test_defaults_are_valid_and_round_trip():
    settings = settings_from_dict(settings_to_dict(Settings()))
    assert settings == Settings()


def test_unknown_key_is_named():
    raw = _raw()
    raw["train"]["learning_rate"] = 1e-3
    with pytest.raises(ConfigError, match=r"train\.learning_rate: unknown key"):
        settings_from_dict(raw)


def test_unknown_section_is_named():
    raw = _raw()
    raw["optimizer"] = {}
    with pytest.raises(ConfigError, match=r"optimizer: unknown key"):
        settings_from_dict(raw)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"train__max_steps": "ten"}, r"train\.max_steps: expected int, got str 'ten'"),
        ({"train__max_steps": 2.5}, r"train\.max_steps: expected int, got float"),
        ({"train__gradient_checkpointing": 1}, r"train\.gradient_checkpointing: expected bool"),
        ({"optim__lr": "fast"}, r"optim\.lr: expected float"),
        ({"data__delays_ms": [480, "x"]}, r"data\.delays_ms\[1\]: expected int"),
        ({"optim__lr": -1e-3}, r"optim\.lr: must be > 0, got -0\.001"),
        ({"peft__mode": "qlora"}, r"peft\.mode: 'qlora' is not one of 'lora', 'encoder_lora', 'full'"),
        ({"deepspeed__zero_stage": 1}, r"deepspeed\.zero_stage: 1 is not one of 0, 2, 3"),
        ({"deepspeed__zero_stage": True}, r"deepspeed\.zero_stage: True is not one of"),
        ({"data__delays_ms": [500]}, r"data\.delays_ms: positive multiples of 80 ms"),
        ({"model__path": "???"}, r"model\.path: required value is not set"),
    ],
)
def test_wrong_type_or_bad_value_is_named(change, message):
    problems = _problems(**change)
    assert len(problems) == 1, problems
    assert re.search(message, problems[0]), problems[0]


def test_every_type_problem_is_reported_at_once():
    raw = _raw(optim__lr="x", train__max_steps="y", peft__mode="qlora")
    raw["logging"]["colour"] = True
    with pytest.raises(ConfigError) as err:
        settings_from_dict(raw)
    keys = sorted(p.split(":")[0] for p in err.value.problems)
    assert keys == ["logging.colour", "optim.lr", "peft.mode", "train.max_steps"]


def test_every_value_problem_is_reported_at_once():
    problems = _problems(optim__lr=0.0, train__keep_last=0)
    assert [p.split(":")[0] for p in problems] == ["optim.lr", "train.keep_last"]


def test_every_shipped_group_option_loads_and_validates():
    seen = 0
    for group in GROUPS:
        for option in sorted((Path(CONFIG_DIR) / group).glob("*.yaml")):
            overrides = [f"{group}={option.stem}", *REQUIRED.get((group, option.stem), [])]
            settings = compose_settings(overrides)
            assert isinstance(settings, Settings)
            seen += 1
    assert seen >= 16  # at least 2 model + 5 peft + 2 data + 1 optim + 1 train + 1 logging + 4 deepspeed


def test_required_values_stop_the_run_until_set():
    with pytest.raises(ConfigError, match=r"model\.path: required value is not set"):
        compose_settings(["model=voxtral_mini_4b"])


def test_command_line_typos_stop_with_the_key():
    with pytest.raises(ConfigCompositionException, match="train.max_stepz"):
        compose_settings(["train.max_stepz=3"])
    with pytest.raises(ConfigError, match=r"train\.max_stepz: unknown key"):
        compose_settings(["+train.max_stepz=3"])
    with pytest.raises(ConfigError, match=r"optim\.lr: must be > 0"):
        compose_settings(["optim.lr=-1"])
    assert compose_settings(["peft=lora", "optim.lr=3e-4"]).optim.lr == 3e-4


def test_delay_weights_must_match_the_delays():
    from voxtral_train.config import ConfigError, settings_from_dict

    with pytest.raises(ConfigError, match="data.delay_weights"):
        settings_from_dict({"data": {"delays_ms": [240, 480], "delay_weights": [1.0]}})
    assert settings_from_dict({"data": {"delays_ms": [240, 480], "delay_weights": [3, 1]}}).data.delay_weights == [3, 1]


def test_the_composed_default_is_the_dataclass_default():
    """configs/train.yaml with no overrides is exactly `Settings()`: the dataclasses are the one home of defaults."""
    assert compose_settings([]) == Settings()


def test_every_problem_is_reported_even_with_an_unknown_key():
    from voxtral_train.config import ConfigError, settings_from_dict

    with pytest.raises(ConfigError) as err:
        settings_from_dict({"train": {"max_stepz": 3, "keep_last": 0}, "optim": {"lr": -1.0}})
    assert [p.split(":")[0] for p in err.value.problems] == ["train.max_stepz", "optim.lr", "train.keep_last"]
