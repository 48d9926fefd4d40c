"""The vectorised delay draws are numpy's Generator draws, bit for bit: a resumed or rerun training (and every
run made before the draws were vectorised) sees the same delay for each (seed, epoch, index)."""

import numpy as np
import pytest

from voxtral_train.delays import DelaySampler, first_uniforms


@pytest.mark.parametrize("seed, epoch", [(0, 0), (3, 7), (2**40 + 5, 1), (2**32 - 1, 2**33)])
def test_uniforms_are_the_generators_first_random(seed, epoch):
    indices = np.concatenate([np.arange(3000), [2**31, 2**32 - 1]])
    expected = [np.random.default_rng([seed, epoch, int(i)]).random() for i in indices]
    assert first_uniforms([seed, epoch], indices).tolist() == expected


@pytest.mark.parametrize("sampler", [DelaySampler.uniform(80, 2400), DelaySampler.choices([480, 960], [3, 1]),
                                     DelaySampler.choices([240, 480, 960], [0.2, 0.0, 0.8]), DelaySampler.fixed(480)])
def test_draws_equal_one_generator_per_item(sampler):
    n = len(sampler.delays_tokens)
    for seed, epoch in ((0, 0), (5, 3)):
        expected = [sampler.delays_tokens[np.random.default_rng([seed, epoch, i]).choice(n, p=sampler.weights)]
                    if n > 1 else sampler.delays_tokens[0] for i in range(2000)]
        assert sampler.draws(seed, epoch, np.arange(2000)).tolist() == expected
        assert [sampler.draw(seed, epoch, i) for i in (0, 17, 1999)] == [expected[0], expected[17], expected[1999]]


def test_indices_beyond_32_bits_are_refused():
    with pytest.raises(ValueError, match="2\\*\\*32"):
        first_uniforms([0, 0], np.array([2**32]))
