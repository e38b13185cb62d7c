"""quant_matmul decode-kernel unpack variants (mgpu_sm90.Config.unpack, issue 6) and the
"planar_pairs" kernel layout, against the float64 reference.

Interpret mode (CPU) runs every variant's kernel body; for the magic_* variants the inline-PTX
conversion is replaced by its jnp twin (`_magic_pair_emulated`, same roundings), so here the
layout, the pair order and the dequant arithmetic are checked, not the PTX itself (that runs only
natively: benchmarks/quant_matmul_variants.py and the `gpu` test below).
"""

from __future__ import annotations


import jax.numpy as jnp

import milo_jax  # noqa: F401  (first: importing pallas_kernels first hits a circular import)
import numpy as np
import pytest

from pallas_kernels.quant_matmul import api, layout, mgpu_sm90
from tests.conftest import cuda_lowering_unavailable
from tests.test_quant_matmul import TOL, make_weight, make_x, ref64, rel_err

_SEED = [500]


def _rng():
    _SEED[0] += 1
    return np.random.default_rng(_SEED[0])


@pytest.mark.parametrize("slab", [8, 16, 32])
def test_pack_pairs_roundtrip(slab):
    rng = _rng()
    codes = jnp.asarray(rng.integers(0, 8, (2 * 32 * slab, 5)), jnp.uint32)
    words = layout.pack_pairs(codes, slab)
    assert words.shape == (2 * 3 * slab, 5) and words.dtype == jnp.uint32
    np.testing.assert_array_equal(np.asarray(layout.unpack_pairs(words, slab)), np.asarray(codes))


def test_pair_words_hold_adjacent_rows_16_bits_apart():
    """Word w of pair-slot 0 holds rows pair_row(w) and pair_row(w) + 1 in bits 0-2 and 16-18."""
    rng = _rng()
    slab = 16
    codes = rng.integers(0, 8, (32 * slab, 1))
    w = np.asarray(layout.pack_pairs(jnp.asarray(codes, jnp.uint32), slab))[:slab, 0]
    for col in range(slab):
        k0 = layout.pair_row(col)
        assert (w[col] & 7) == codes[k0, 0] and ((w[col] >> 16) & 7) == codes[k0 + 1, 0]


def test_pair_order_matches_wgmma_register_layout():
    """Lane l of an 8-column tile t holds u32 words 8t + 2l + e (e = 0, 1); in the bf16 WGMMA layout
    of the doubled-width result the same lane holds columns 8T + 2l, 8T + 2l + 1 of tile T = 2t + e.
    The native conversion relies on this: no data moves between lanes."""
    for slab in (8, 16, 32):
        rows = sorted(layout.pair_row(w) for w in range(slab))
        assert rows == list(range(0, 2 * slab, 2))
        for t in range(slab // 8):
            for lane in range(4):
                for e in range(2):
                    assert layout.pair_row(8 * t + 2 * lane + e) == 8 * (2 * t + e) + 2 * lane


@pytest.mark.parametrize("magic,base,dtype", [(0x4300, 128, jnp.bfloat16), (0x6400, 1024, jnp.float16)])
def test_magic_number_conversion(magic, base, dtype):
    """(code | magic) read as a 16-bit float is base + code, exactly, for every 3-bit code."""
    halves = np.array([magic | c for c in range(8)], np.uint16)
    vals = np.asarray(jnp.asarray(halves).view(dtype), np.float64)
    np.testing.assert_array_equal(vals, base + np.arange(8))


def test_prepare_pairs_dequantizes_like_planar():
    rng = _rng()
    qt = make_weight(640, 64, 3, 64, 0, rng)               # K padded 640 -> 1024
    kw = layout.prepare(qt, layout=layout.PAIRS_LAYOUT)
    assert kw.layout == layout.PAIRS_LAYOUT and kw.codes.shape == (64, 1024 * 3 // 32)
    np.testing.assert_array_equal(np.asarray(api.dequantize_kernel_weights(kw), np.float32),
                                  np.asarray(api.dequantize_kernel_weights(layout.prepare(qt)), np.float32))


def test_prepare_pairs_rejects_other_bits_and_mismatched_unpack():
    rng = _rng()
    with pytest.raises(ValueError, match="3-bit only"):
        layout.prepare(make_weight(256, 64, 4, 64, 0, rng), layout=layout.PAIRS_LAYOUT)
    qt = make_weight(512, 64, 3, 64, 0, rng)
    x = make_x(2, 512, rng)
    with pytest.raises(ValueError, match="does not read weights"):
        api.matmul(x, layout.prepare(qt), interpret=True, config=mgpu_sm90.Config(unpack="magic_bf16"))
    with pytest.raises(ValueError, match="does not read weights"):
        api.matmul(x, layout.prepare(qt, layout=layout.PAIRS_LAYOUT), interpret=True,
                   config=mgpu_sm90.Config(unpack="f32"))
    with pytest.raises(ValueError, match="unpack"):
        api.matmul(x, layout.prepare(qt), interpret=True, config=mgpu_sm90.Config(unpack="nope"))


# (unpack, group, K, M, rank, chunk_slots, k_splits, a_regs)
VARIANT_CASES = [
    ("bf16", 64, 512, 3, 16, 4, 1, False),
    ("magic_bf16", 64, 1024, 3, 16, 4, 2, False),      # split-K, compensator
    ("magic_bf16", 128, 640, 1, 0, 8, 1, False),       # K padded 640 -> 1024, g128
    ("magic_bf16", None, 320, 16, 0, 2, 1, False),     # per-channel
    ("magic_f16", 64, 512, 5, 8, 4, 1, False),
    ("magic_bf16", 64, 1024, 3, 16, 4, 2, True),       # A from registers: split-K, compensator
    ("magic_bf16", 128, 640, 9, 0, 8, 1, True),        # g128 (one group spans two pair-slots), padded K
    ("magic_f16", None, 320, 1, 0, 2, 1, True),        # per-channel, f16
]


@pytest.mark.parametrize("unpack,group_size,k,m,rank,chunk,splits,a_regs", VARIANT_CASES)
def test_variant_interpret(unpack, group_size, k, m, rank, chunk, splits, a_regs):
    rng = _rng()
    qt = make_weight(k, 64, 3, group_size, rank, rng)
    lay = layout.PAIRS_LAYOUT if unpack.startswith("magic") else layout.LAYOUT
    kw = layout.prepare(qt, layout=lay)
    x = make_x(m, k, rng)
    cfg = mgpu_sm90.Config(block_m=0, chunk_slots=chunk, k_splits=splits, unpack=unpack, a_regs=a_regs)
    y = api.matmul(x, kw, interpret=True, config=cfg)
    assert y.shape == (m, 64) and y.dtype == jnp.bfloat16
    err = rel_err(y, ref64(x, qt))
    assert err < TOL, err


def test_pairs_default_config_picks_magic():
    rng = _rng()
    qt = make_weight(512, 64, 3, 64, 0, rng)
    kw = layout.prepare(qt, layout=layout.PAIRS_LAYOUT)
    assert mgpu_sm90.default_config(1, kw).unpack == "magic_bf16"
    assert mgpu_sm90.default_config(1, layout.prepare(qt)).unpack == "f32"
    x = make_x(2, 512, rng)
    assert rel_err(api.matmul(x, kw, interpret=True), ref64(x, qt)) < TOL


def test_a_regs_needs_magic_unpack():
    rng = _rng()
    qt = make_weight(512, 64, 3, 64, 0, rng)
    with pytest.raises(ValueError, match="a_regs=True needs a magic"):
        api.matmul(make_x(2, 512, rng), layout.prepare(qt), interpret=True,
                   config=mgpu_sm90.Config(unpack="f32", a_regs=True))


@pytest.mark.gpu
@pytest.mark.skipif(not api._on_sm90(), reason="needs an sm90 (Hopper) GPU")
@pytest.mark.parametrize("unpack,a_regs", [("bf16", False), ("magic_bf16", False), ("magic_f16", False),
                                           ("magic_bf16", True), ("magic_f16", True)])
def test_variant_native_gpu(unpack, a_regs):
    rng = _rng()
    k, n = 1408, 512
    for group_size, rank, ms in ((64, 0, (1, 16)), (128, 32, (3, 64)), (None, 0, (8,))):
        qt = make_weight(k, n, 3, group_size, rank, rng)
        kw = layout.prepare(qt, layout=layout.PAIRS_LAYOUT if unpack.startswith("magic") else layout.LAYOUT)
        for m in ms:
            x = make_x(m, k, rng)
            cfg = mgpu_sm90.Config(block_m=0, chunk_slots=4, unpack=unpack, a_regs=a_regs)
            assert rel_err(api.matmul(x, kw, impl="kernel", config=cfg), ref64(x, qt)) < TOL, (m, group_size)


def _lower_native_for_sm90(kw, m, cfg):
    """Lower the native (non-interpret) kernel for CUDA from this CPU host: Mosaic GPU's layout
    inference and dialect lowering (where inline_mgpu's Python body runs) happen here; only
    the final C++ passes and ptxas are left for the GPU."""
    import jax
    x = jax.ShapeDtypeStruct((m, kw.k), jnp.bfloat16)
    f = jax.jit(lambda x, kw: api.matmul(x, kw, impl="kernel", config=cfg, interpret=False))
    return f.trace(x, kw).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("unpack,a_regs", [("magic_bf16", False), ("magic_f16", False), ("magic_bf16", True)])
def test_native_lowering_on_cpu(unpack, a_regs):
    """The inline-PTX conversion builds (layout inference, register mapping) for sm90, and with
    a_regs its result is a legal register A operand of wgmma."""
    reason = cuda_lowering_unavailable()
    if reason:
        pytest.skip(reason)
    rng = _rng()
    qt = make_weight(1024, 128, 3, 64, 0, rng)
    cfg = mgpu_sm90.Config(block_m=0, chunk_slots=4, unpack=unpack, a_regs=a_regs)
    text = _lower_native_for_sm90(layout.prepare(qt, layout=layout.PAIRS_LAYOUT), 3, cfg)
    assert "mosaic_gpu" in text
