"""The encoder's `window_blocks` attention equals SDPA with transformers' dense sliding-window mask, forward and
backward, once the input is longer than the window (window shrunk to 24 frames so a short input crosses it)."""

import torch
from transformers import VoxtralRealtimeForConditionalGeneration

from voxtral_train.model import tiny_config
from voxtral_train.patches import apply_training_fixes
from voxtral_train.window_attention import use_window_blocks

WINDOW = 24


def _encoder_output_and_grads(model, features):
    model.zero_grad(set_to_none=True)
    out = model.model.get_audio_features(input_features=features).pooler_output
    out.square().sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.model.audio_tower.named_parameters()}


def _model():
    config = tiny_config()
    config.audio_config.sliding_window = WINDOW
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return apply_training_fixes(VoxtralRealtimeForConditionalGeneration(config)).train()


def test_window_blocks_equal_sdpa_with_the_dense_window_mask():
    model = _model()
    features = torch.randn(2, 128, 8 * 23, generator=torch.Generator().manual_seed(1))  # 92 encoder frames
    expected, grads_expected = _encoder_output_and_grads(model, features)
    use_window_blocks(model)
    assert model.model.audio_tower.config._attn_implementation == "window_blocks"
    assert model.config.text_config._attn_implementation == "sdpa"  # the decoder keeps its kernel
    got, grads = _encoder_output_and_grads(model, features)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    for name, grad in grads_expected.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_the_window_is_applied():
    # Without a window the encoder sees more context: the outputs differ, so the test above can fail.
    model = _model()
    features = torch.randn(1, 128, 8 * 23, generator=torch.Generator().manual_seed(1))
    use_window_blocks(model)
    with torch.no_grad():
        windowed = model.model.get_audio_features(input_features=features).pooler_output
        model.model.audio_tower.config.sliding_window = 10_000
        unwindowed = model.model.get_audio_features(input_features=features).pooler_output
    assert (windowed - unwindowed).abs().max() > 1e-3
