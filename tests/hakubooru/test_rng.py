"""hakubooru.rng against splitmix64's published outputs and its own definitions."""
import numpy as np

from hakubooru.rng import generator, hash64, hash64_array, splitmix64, uniform

MASK = 2**64 - 1


def test_hash64_is_splitmix64_chained():
    # hash64(a, b) = splitmix64(splitmix64(0 ^ a) ^ b), with the published vector splitmix64(0)
    assert hash64() == 0
    assert hash64(0) == splitmix64(0) == 0xE220A8397B1DCDAF
    assert hash64(0, 5) == splitmix64(0xE220A8397B1DCDAF ^ 5)
    assert hash64(-1) == splitmix64(MASK)  # negatives as their 64-bit two's complement


def test_array_version_equals_the_scalar_one():
    ids = np.array([0, 1, 2, 7, 123456789, 2**40 + 3, 2**62], dtype=np.int64)
    for seed in (0, 1, 42, 2**63 + 5, MASK):
        got = hash64_array(seed, ids)
        assert got.dtype == np.uint64
        assert got.tolist() == [hash64(seed, int(i)) for i in ids]


def test_uniform_is_the_top_53_bits():
    values = [uniform(3, i) for i in range(4000)]
    for i in (0, 1, 999):
        u = uniform(3, i)
        assert u * 2**53 == hash64(3, i) >> 11  # exact: 53 bits over 2**53
    assert all(0.0 <= u < 1.0 for u in values)
    assert min(values) < 0.001 and max(values) > 0.999  # the whole interval, not half of it
    assert abs(np.mean(values) - 0.5) < 0.02


def test_generator_is_seeded_by_hash64():
    a = generator(1, 2).integers(0, 2**62, 4)
    b = np.random.Generator(np.random.PCG64(hash64(1, 2))).integers(0, 2**62, 4)
    assert a.tolist() == b.tolist()
    assert generator(1, 3).integers(0, 2**62, 4).tolist() != a.tolist()
