"""Which delay each training item gets.

One model serves every delay through its delay conditioning, so training usually mixes them. The sampler is built
once from milliseconds (config, CLI) and then holds delays in tokens, the unit the model and the target builder use.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import numpy as np

from voxtral_train import protocol


@dataclasses.dataclass(frozen=True)
class DelaySampler:
    """Which delay each training item gets: one value, a weighted set, or uniform over a range on the 80 ms grid.

    Built from milliseconds (the unit of configs and the command line), converted to tokens once here; a draw
    depends only on (seed, epoch, index), so reruns, resumed runs and any number of DataLoader workers see the same
    delays.
    """

    delays_tokens: tuple[int, ...]
    weights: tuple[float, ...]  # same length as delays_tokens, normalised to sum 1

    def __post_init__(self) -> None:
        if not self.delays_tokens or len(self.weights) != len(self.delays_tokens):
            raise ValueError(f"delay sampler needs one weight per delay, got {self.delays_tokens} and {self.weights}")
        if min(self.delays_tokens) < 1:
            raise ValueError(f"delays must be at least one token, got {self.delays_tokens}")
        if min(self.weights) < 0 or not math.isclose(sum(self.weights), 1.0):
            raise ValueError(f"delay weights must be >= 0 and sum to 1, got {self.weights}")

    @classmethod
    def fixed(cls, delay_ms: int) -> "DelaySampler":
        return cls((protocol.delay_ms_to_tokens(delay_ms),), (1.0,))

    @classmethod
    def choices(cls, delays_ms: Sequence[int], weights: Sequence[float] | None = None) -> "DelaySampler":
        weights = [1.0] * len(delays_ms) if weights is None else [float(w) for w in weights]
        total = sum(weights)
        if total <= 0:
            raise ValueError(f"delay weights must have a positive sum, got {weights}")
        return cls(tuple(protocol.delay_ms_to_tokens(ms) for ms in delays_ms), tuple(w / total for w in weights))

    @classmethod
    def uniform(cls, min_ms: int, max_ms: int) -> "DelaySampler":
        """Every delay on the grid in [min_ms, max_ms], equally likely."""
        lo, hi = protocol.delay_ms_to_tokens(min_ms), protocol.delay_ms_to_tokens(max_ms)
        if hi < lo:
            raise ValueError(f"delay range is empty: min_ms={min_ms} > max_ms={max_ms}")
        n = hi - lo + 1
        return cls(tuple(range(lo, hi + 1)), (1.0 / n,) * n)

    @classmethod
    def from_config(cls, cfg: int | Mapping[str, Any]) -> "DelaySampler":
        """480 | {fixed_ms: 480} | {choices_ms: [480, 960], weights: [3, 1]} | {min_ms: 240, max_ms: 2400}."""
        if isinstance(cfg, (int, float)) and not isinstance(cfg, bool):
            return cls.fixed(int(cfg))
        if not isinstance(cfg, Mapping):
            raise ValueError(f"delay config must be a number of ms or a mapping, got {cfg!r}")
        keys = set(cfg)
        if keys == {"fixed_ms"}:
            return cls.fixed(cfg["fixed_ms"])
        if keys in ({"choices_ms"}, {"choices_ms", "weights"}):
            return cls.choices(list(cfg["choices_ms"]), cfg.get("weights"))
        if keys == {"min_ms", "max_ms"}:
            return cls.uniform(cfg["min_ms"], cfg["max_ms"])
        raise ValueError(
            f"delay config keys {sorted(keys)} are not one of: fixed_ms | choices_ms (+ weights) | min_ms + max_ms"
        )

    @property
    def delays_ms(self) -> tuple[int, ...]:
        """The delays in milliseconds, for reports and messages."""
        return tuple(protocol.delay_tokens_to_ms(t) for t in self.delays_tokens)

    @property
    def max_tokens(self) -> int:
        return max(self.delays_tokens)

    def draw(self, seed: int, epoch: int, index: int) -> int:
        """The delay in tokens of item `index` in `epoch`."""
        if len(self.delays_tokens) == 1:
            return self.delays_tokens[0]
        rng = np.random.default_rng([seed, epoch, index])
        return self.delays_tokens[rng.choice(len(self.delays_tokens), p=self.weights)]
