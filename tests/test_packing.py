"""Bit packing: exact round trips, zero waste, and the planar slab property."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from milo_jax.quant import packing


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]),
       lead=st.lists(st.integers(1, 3), min_size=0, max_size=2),
       tiles=st.integers(1, 5), n=st.integers(1, 9), seed=st.integers(0, 2**31 - 1))
def test_round_trip(bits, lead, tiles, n, seed):
    k = tiles * packing.slots_per_tile(bits) * 2  # not always a multiple of the default slab
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 2**bits, size=(*lead, k, n), dtype=np.uint32)
    words = packing.pack(jnp.asarray(codes), bits)
    assert words.dtype == jnp.uint32
    assert words.shape == (*lead, k * bits // 32, n)  # exactly `bits` bits per code, 3 included
    np.testing.assert_array_equal(np.asarray(packing.unpack(words, bits, k)), codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("slab", [1, 4, 32])
def test_slot_unpacks_contiguous_k_slab(bits, slab):
    """Slot j of a tile's words is exactly K rows [j*slab, (j+1)*slab) of that tile."""
    per = packing.slots_per_tile(bits)
    k, n = 2 * per * slab, 3
    rng = np.random.default_rng(bits * 100 + slab)
    codes = rng.integers(0, 2**bits, size=(k, n), dtype=np.uint32)
    words = np.asarray(packing.pack(jnp.asarray(codes), bits, slab))
    rows_per_tile = packing.words_per_slab_row(bits) * slab
    for t in range(2):
        tile = jnp.asarray(words[t * rows_per_tile:(t + 1) * rows_per_tile])
        for j in range(per):
            got = np.asarray(packing.unpack_slot(tile, bits, j))
            start = t * per * slab + j * slab
            np.testing.assert_array_equal(got, codes[start:start + slab])


def test_three_bit_uses_every_bit():
    """All-ones codes fill every bit of every word: 32 codes in 3 words, no padding bits."""
    codes = jnp.full((64, 2), 7, jnp.uint32)
    words = np.asarray(packing.pack(codes, 3))
    assert words.shape == (6, 2)
    assert (words == 0xFFFFFFFF).all()


@pytest.mark.parametrize("bits,k", [(3, 48), (4, 12), (2, 8), (8, 6)])
def test_unpackable_k_raises(bits, k):
    with pytest.raises(ValueError, match=f"K={k}"):
        packing.pack(jnp.zeros((k, 4), jnp.uint32), bits)


def test_unsupported_bits_raises():
    with pytest.raises(ValueError, match="unsupported bit width 5"):
        packing.pack(jnp.zeros((32, 4), jnp.uint32), 5)
