"""Counter-based randomness: every random choice is a hash of explicit integers.

splitmix64 (Steele, Lea & Flood 2014) is a fixed, documented bit mixer, so the
same (seed, id, step) gives the same number on every platform, Python and NumPy
version — unlike a global RNG, whose output depends on how much was drawn before.
"""
from __future__ import annotations

import numpy as np

MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB


def splitmix64(x: int) -> int:
    """One splitmix64 step on a Python int (reference implementation)."""
    z = (x + _GOLDEN) & MASK64
    z = ((z ^ (z >> 30)) * _M1) & MASK64
    z = ((z ^ (z >> 27)) * _M2) & MASK64
    return z ^ (z >> 31)


def hash64(*values: int) -> int:
    """Mix any number of integers (seed, epoch, post id, step, ...) into one 64-bit value."""
    h = 0
    for v in values:
        h = splitmix64(h ^ (int(v) & MASK64))
    return h


def hash64_array(seed: int, ids: np.ndarray) -> np.ndarray:
    """Vectorised ``hash64(seed, id)`` for an array of ids (uint64 result)."""
    z = np.asarray(ids).astype(np.uint64) ^ np.uint64(splitmix64(int(seed) & MASK64))
    with np.errstate(over="ignore"):
        z = z + np.uint64(_GOLDEN)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(_M1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(_M2)
    return z ^ (z >> np.uint64(31))


def uniform(*values: int) -> float:
    """A float in [0, 1) from the hash of the given integers (53 bits of precision)."""
    return (hash64(*values) >> 11) / float(1 << 53)


def generator(*values: int) -> np.random.Generator:
    """A NumPy Generator seeded from the hash of the given integers, for a local stream
    (e.g. the shuffle of one sample's tags at one step)."""
    return np.random.Generator(np.random.PCG64(hash64(*values)))
