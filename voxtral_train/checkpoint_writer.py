"""What a run writes to disk besides its logs: the run's resolved config, checkpoint contents, and the final weights.

`voxtral_train.checkpoint` decides *when* a checkpoint is complete (atomic folder, manifest last, pruning);
this module decides *what* goes into it. Every folder carries the same self-description: `config.yaml` (the
resolved settings the run trained with; `voxtral-export` reads its delay from there) and `tekken.json`.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from peft import PeftModel

from voxtral_train.config import RUN_CONFIG_FILE, Settings, settings_to_dict
from voxtral_train.distributed import gathered_parameters
from voxtral_train.tokenizer import StreamingTokenizer
from voxtral_train.trainable import save_trainable


class _TiedHeadNote(logging.Filter):
    """Drops accelerate's "Removed shared tensor {...lm_head.weight} while saving ... check by verifying" warning.

    The lm_head is tied to the token embeddings in every mode, so safetensors stores that storage once; the reload
    re-ties it (resumed runs match unbroken ones, tests/test_train.py). Any other shared tensor still warns."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()  # accelerate may prefix it with "[RANK n] "
        if "Removed shared tensor {" not in message:
            return True
        names = message.split("Removed shared tensor {", 1)[1].split("}", 1)[0]
        return any(not name.strip(" '\"").endswith("lm_head.weight") for name in names.split(","))


logging.getLogger("accelerate.utils.other").addFilter(_TiedHeadNote())


class RunWriter:
    """Writes one run's folders; every method is called on every rank (saves are collective under DeepSpeed)."""

    def __init__(self, accelerator: Accelerator, wrapped: torch.nn.Module, tokenizer: StreamingTokenizer,
                 settings: Settings, run_dir: Path):
        self.accelerator, self.wrapped, self.tokenizer = accelerator, wrapped, tokenizer
        self.settings, self.run_dir = settings, run_dir

    @property
    def model(self) -> torch.nn.Module:
        """The plain or PEFT-wrapped HF model inside accelerate's / DeepSpeed's wrappers and `StreamingLM`."""
        return self.accelerator.unwrap_model(self.wrapped).model

    def _describe(self, folder: Path) -> None:
        shutil.copyfile(self.run_dir / RUN_CONFIG_FILE, folder / RUN_CONFIG_FILE)
        shutil.copyfile(self.tokenizer.tekken_path, folder / "tekken.json")

    def checkpoint_contents(self, folder: Path) -> None:
        """Everything of a checkpoint but its state file and manifest (`checkpoint.save_checkpoint` writes those)."""
        self.accelerator.save_state(str(folder), safe_serialization=True)  # weights, optimizer, scheduler, RNG
        model = self.model
        if isinstance(model, PeftModel):
            with gathered_parameters(model, self.settings.deepspeed.zero_stage, trainable_only=True):
                if self.accelerator.is_main_process:
                    save_trainable(model, folder / "adapter")
        if self.accelerator.is_main_process:
            self._describe(folder)

    def final_weights(self) -> Path:
        """`<run>/final/`: the adapter (LoRA modes) or the whole HF model (full) + tekken.json + config.yaml,
        ready for `load_model(folder)` / `voxtral-export`."""
        out = self.run_dir / "final"
        model = self.model
        with gathered_parameters(model, self.settings.deepspeed.zero_stage,
                                 trainable_only=isinstance(model, PeftModel)):
            if self.accelerator.is_main_process:
                save_trainable(model, out)
                self._describe(out)
        self.accelerator.wait_for_everyone()
        return out


def write_run_config(run_dir: Path, settings: Settings) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RUN_CONFIG_FILE).write_text(yaml.safe_dump(settings_to_dict(settings), sort_keys=False))
