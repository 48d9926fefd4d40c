"""A real learning check: the tiny demo (`+experiment=tiny_demo`: tiny model, bundled sentences, 250 steps)
transcribes its training set.

Thresholds (docs/TINY_MODELS.md, three seeds of this model size): before training the decode is garbage or nothing
(WER > 100 %); after 200-225 steps the training-set WER is < 20 %. We require untrained > 90 % and trained < 50 %:
a margin for machine-to-machine float differences, while a broken loss, target or decoder (which leaves the WER at
~100 %) fails. The tiny model memorises: held-out WER is not expected to fall, so it is not tested here.
"""

import pytest
from accelerate.state import AcceleratorState

from voxtral_train import load_model
from voxtral_train.evaluate import evaluate_model
from voxtral_train.manifest import bundled_manifest_path, read_manifest
from voxtral_train.config import compose_settings
from voxtral_train.train import train


@pytest.mark.slow
def test_demo_learns_its_training_sentences(tmp_path):
    utterances = read_manifest(bundled_manifest_path("train"))
    untrained, tokenizer = load_model("tiny", seed=0)
    before = evaluate_model(untrained, tokenizer, utterances, [480], progress=False)["delays"][0]["wer_norm"]

    AcceleratorState._reset_state(True)
    try:
        result = train(compose_settings(["+experiment=tiny_demo", f"train.output_root={tmp_path}", "logging.progress_bar=false",
                                         "logging.tensorboard=false", "train.eval_every=0", "train.save_every=0"]))
    finally:
        AcceleratorState._reset_state(True)

    assert result.final_step == 250 and result.stopped is None
    assert before > 0.9, f"the untrained model already transcribes ({100 * before:.1f}% WER)?"
    assert result.final_wer < 0.5, f"training-set WER after 250 steps: {100 * result.final_wer:.1f}%"
    assert result.losses[-1] < 0.3 * result.losses[0]
