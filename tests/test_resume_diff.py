from dataclasses import replace

import pytest

from voxtral_train.config import Settings, settings_to_dict
from voxtral_train.resume_diff import APPLIES, INEXACT, SCHEDULE, lr_at, resume_diff


def _config(**changes):
    settings = Settings()
    for section, values in changes.items():
        setattr(settings, section, replace(getattr(settings, section), **values))
    return settings_to_dict(settings)


def test_each_change_gets_its_outcome():
    saved = _config()
    now = _config(optim={"lr": 5e-4}, train={"max_steps": 500, "eval_every": 10, "resume": "latest"},
                  peft={"mode": "full"})
    diff = resume_diff(saved, now, saved_world_size=2, world_size=4)
    assert [(key, outcome) for key, _, _, outcome in diff.rows] == [
        ("optim.lr", SCHEDULE), ("peft.mode", INEXACT), ("train.eval_every", APPLIES), ("train.max_steps", SCHEDULE),
        ("world_size", INEXACT)]  # train.resume differs on every resume and is not listed
    assert diff.inexact == ["peft.mode", "world_size"] and diff.schedule_changed
    lines = diff.table().splitlines()
    assert lines[0].split() == ["setting", "checkpoint", "now", "outcome"] and set(lines[1]) == {"-", " "}
    assert lines[2].split()[:3] == ["optim.lr", "0.005", "0.0005"]
    assert resume_diff(saved, _config(train={"resume": "latest"}), 1, 1).rows == []


def test_lr_at_follows_the_config_schedule():
    config = _config(optim={"lr": 1e-3}, train={"warmup_steps": 10, "max_steps": 110, "schedule": "cosine",
                                                "min_lr_ratio": 0.0})
    assert lr_at(config, 4) == pytest.approx(5e-4)  # warmup: (4 + 1) / 10
    assert lr_at(config, 60) == pytest.approx(5e-4)  # half-way down the cosine
    assert lr_at(config, 60, lr_scale=0.5) == pytest.approx(2.5e-4)


def test_a_shard_streams_window_cannot_change_on_resume():
    """The epoch plan of a shard corpus buckets within windows of data.shards_per_window shards: another window
    size would train some rows twice and skip others, so it is refused like another batch budget."""
    diff = resume_diff(_config(), _config(data={"shards_per_window": 4, "shard_url": "pipe:cat /x/{name}"}), 1, 1)
    assert [(key, outcome) for key, _, _, outcome in diff.rows] == [
        ("data.shard_url", APPLIES), ("data.shards_per_window", INEXACT)]
