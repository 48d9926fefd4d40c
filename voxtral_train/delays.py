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
        return int(self.draws(seed, epoch, np.array([index]))[0])

    def draws(self, seed: int, epoch: int, indices: np.ndarray) -> np.ndarray:
        """The delays in tokens of items `indices` in `epoch`: for each index, what
        `np.random.default_rng([seed, epoch, index]).choice(len(delays_tokens), p=weights)` picks, computed for all
        indices at once (one Generator per item costs ~40 us: 3 minutes per epoch of 5 M items)."""
        tokens = np.asarray(self.delays_tokens, dtype=np.int64)
        if len(tokens) == 1:
            return np.full(len(indices), tokens[0], dtype=np.int64)
        cdf = np.asarray(self.weights, dtype=np.float64).cumsum()  # exactly what Generator.choice does with p
        cdf /= cdf[-1]
        return tokens[cdf.searchsorted(first_uniforms([seed, epoch], indices), side="right")]


# --------------------------------------------------------------------------------------------------------------
# numpy's default_rng([*entropy, index]).random(), vectorised over index
# --------------------------------------------------------------------------------------------------------------
# SeedSequence (numpy/random/bit_generator.pyx) hashes the entropy words into a pool of 4 uint32 and expands it into
# PCG64's 128-bit state and increment; PCG64 (pcg64.h) steps a 128-bit LCG and outputs XSL-RR. numpy guarantees
# these streams stay fixed (NEP 19); tests/test_delays.py compares with the Generator itself.
_M32 = np.uint64(0xFFFFFFFF)
_POOL_SIZE = 4
_INIT_A, _MULT_A, _INIT_B, _MULT_B = 0x43B0D7E5, 0x931E8875, 0x8B51F9DD, 0x58F38DED
_MIX_MULT_L, _MIX_MULT_R, _XSHIFT = 0xCA01F9DD, 0x4973F715, np.uint64(16)
_PCG_MULT = 0x2360ED051FC65DA44385DF649FCCF645
_MULT_HI, _MULT_LO = np.uint64(_PCG_MULT >> 64), np.uint64(_PCG_MULT & 0xFFFFFFFFFFFFFFFF)


def _uint32_words(n: int) -> list[int]:
    """An entropy integer as SeedSequence reads it: little-endian 32-bit words, [0] for 0."""
    if n < 0:
        raise ValueError(f"seed entropy must be >= 0, got {n}")
    words = []
    while True:
        words.append(n & 0xFFFFFFFF)
        n >>= 32
        if not n:
            return words


def _seed_state(prefix: Sequence[int], index: np.ndarray) -> list[np.ndarray]:
    """SeedSequence(prefix + [index]).generate_state(4, uint64) per index (uint32 arithmetic held in uint64)."""
    entropy = [np.full(index.shape, w, np.uint64) for p in prefix for w in _uint32_words(p)] + [index]
    hash_const = _INIT_A

    def hashmix(value: np.ndarray) -> np.ndarray:
        nonlocal hash_const
        value = value ^ np.uint64(hash_const)
        hash_const = (hash_const * _MULT_A) & 0xFFFFFFFF
        value = (value * np.uint64(hash_const)) & _M32
        return value ^ (value >> _XSHIFT)

    def mix(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        result = (np.uint64(_MIX_MULT_L) * x - np.uint64(_MIX_MULT_R) * y) & _M32
        return result ^ (result >> _XSHIFT)

    zero = np.zeros(index.shape, np.uint64)
    pool = [hashmix(entropy[i] if i < len(entropy) else zero) for i in range(_POOL_SIZE)]
    for src in range(_POOL_SIZE):
        for dst in range(_POOL_SIZE):
            if src != dst:
                pool[dst] = mix(pool[dst], hashmix(pool[src]))
    for src in range(_POOL_SIZE, len(entropy)):
        for dst in range(_POOL_SIZE):
            pool[dst] = mix(pool[dst], hashmix(entropy[src]))
    hash_const, words = _INIT_B, []
    for i in range(8):
        value = pool[i % _POOL_SIZE] ^ np.uint64(hash_const)
        hash_const = (hash_const * _MULT_B) & 0xFFFFFFFF
        value = (value * np.uint64(hash_const)) & _M32
        words.append(value ^ (value >> _XSHIFT))
    return [words[2 * k] | (words[2 * k + 1] << np.uint64(32)) for k in range(4)]


def _mul_hi(a: np.ndarray, b: np.uint64) -> np.ndarray:
    """The high 64 bits of the 128-bit product a * b."""
    a0, a1, b0, b1 = a & _M32, a >> np.uint64(32), b & _M32, b >> np.uint64(32)
    p00, p01, p10 = a0 * b0, a0 * b1, a1 * b0
    mid = (p00 >> np.uint64(32)) + (p01 & _M32) + (p10 & _M32)
    return a1 * b1 + (p01 >> np.uint64(32)) + (p10 >> np.uint64(32)) + (mid >> np.uint64(32))


def _add128(hi: np.ndarray, lo: np.ndarray, add_hi: np.ndarray, add_lo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    total = lo + add_lo
    return hi + add_hi + (total < lo).astype(np.uint64), total


def _pcg_step(hi: np.ndarray, lo: np.ndarray, inc_hi: np.ndarray,
              inc_lo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """state * PCG_MULT + inc, modulo 2**128."""
    return _add128(_mul_hi(lo, _MULT_LO) + lo * _MULT_HI + hi * _MULT_LO, lo * _MULT_LO, inc_hi, inc_lo)


def first_uniforms(prefix: Sequence[int], indices: np.ndarray) -> np.ndarray:
    """`np.random.default_rng([*prefix, i]).random()` for each i in `indices` (each < 2**32)."""
    index = np.asarray(indices, dtype=np.int64)
    if index.size and (index.min() < 0 or index.max() >= 2**32):
        raise ValueError("item indices must lie in [0, 2**32)")
    with np.errstate(over="ignore"):  # the arithmetic is modulo 2**64 by design
        seed_hi, seed_lo, seq_hi, seq_lo = _seed_state(prefix, index.astype(np.uint64))
        inc_hi = (seq_hi << np.uint64(1)) | (seq_lo >> np.uint64(63))  # inc = (initseq << 1) | 1
        inc_lo = (seq_lo << np.uint64(1)) | np.uint64(1)
        zero = np.zeros_like(seed_hi)
        hi, lo = _pcg_step(zero, zero, inc_hi, inc_lo)  # pcg64_srandom_r
        hi, lo = _pcg_step(*_add128(hi, lo, seed_hi, seed_lo), inc_hi, inc_lo)
        hi, lo = _pcg_step(hi, lo, inc_hi, inc_lo)  # next64: step, then output the new state
        mixed, rotation = hi ^ lo, hi >> np.uint64(58)
        out = (mixed >> rotation) | (mixed << ((np.uint64(64) - rotation) & np.uint64(63)))
    return (out >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)
