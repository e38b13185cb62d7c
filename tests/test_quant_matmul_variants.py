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


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("slab", [8, 16, 32])
def test_pack_pairs_roundtrip(bits, slab):
    rng = _rng()
    tile = (32 if bits == 3 else 32 // bits) * slab
    codes = jnp.asarray(rng.integers(0, 2**bits, (2 * tile, 5)), jnp.uint32)
    words = layout.pack_pairs(codes, slab, bits)
    assert words.shape == (2 * tile * bits // 32, 5) and words.dtype == jnp.uint32
    np.testing.assert_array_equal(np.asarray(layout.unpack_pairs(words, slab, bits)), np.asarray(codes))


@pytest.mark.parametrize("bits", [2, 4])
def test_pair_words_2_4_bit_hold_each_pair_slot_in_both_halves(bits):
    """2/4-bit planar_pairs: one plane; pair-slot i of word w holds rows 2 * slab * i + pair_row(w)
    and the next one at bits bits * i and 16 + bits * i (every bit used)."""
    rng = _rng()
    slab = 16
    tile = (32 // bits) * slab
    codes = rng.integers(0, 2**bits, (tile, 1))
    w = np.asarray(layout.pack_pairs(jnp.asarray(codes, jnp.uint32), slab, bits))[:, 0]
    assert w.shape == (slab,)
    mask = 2**bits - 1
    for col in range(slab):
        for i in range(layout.pair_slots(bits)):
            k0 = 2 * slab * i + layout.pair_row(col)
            assert (w[col] >> (bits * i)) & mask == codes[k0, 0]
            assert (w[col] >> (16 + bits * i)) & mask == codes[k0 + 1, 0]


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
    """(code | magic) read as a 16-bit float is base + code, exactly, for every 2/3/4-bit code (the
    widths planar_pairs holds); at 8 bits bf16 would not be exact, which is why 8-bit stays planar."""
    halves = np.array([magic | c for c in range(16)], np.uint16)
    vals = np.asarray(jnp.asarray(halves).view(dtype), np.float64)
    np.testing.assert_array_equal(vals, base + np.arange(16))
    assert mgpu_sm90._pair_mask(4) == 0x000F000F and mgpu_sm90._pair_mask(2) == 0x00030003
    assert layout.PAIRS_BITS == (2, 3, 4) and layout.decode_layout(8) == layout.LAYOUT


@pytest.mark.parametrize("bits,k_pad", [(3, 1024), (4, 768), (2, 1024)])
def test_prepare_pairs_dequantizes_like_planar(bits, k_pad):
    rng = _rng()
    qt = make_weight(640, 64, bits, 64, 0, rng)            # K padded 640 -> one tile multiple
    kw = layout.prepare(qt, layout=layout.PAIRS_LAYOUT)
    assert kw.layout == layout.PAIRS_LAYOUT and kw.codes.shape == (64, k_pad * bits // 32)
    np.testing.assert_array_equal(np.asarray(api.dequantize_kernel_weights(kw), np.float32),
                                  np.asarray(api.dequantize_kernel_weights(layout.prepare(qt)), np.float32))


def test_prepare_pairs_rejects_other_bits_and_mismatched_unpack():
    rng = _rng()
    with pytest.raises(ValueError, match=r"holds bits \(2, 3, 4\), got bits=8"):
        layout.prepare(make_weight(256, 64, 8, 64, 0, rng), layout=layout.PAIRS_LAYOUT)
    qt = make_weight(512, 64, 3, 64, 0, rng)
    x = make_x(2, 512, rng)
    with pytest.raises(ValueError, match="does not read weights"):
        api.matmul(x, layout.prepare(qt), interpret=True, config=mgpu_sm90.Config(unpack="magic_bf16"))
    with pytest.raises(ValueError, match="does not read weights"):
        api.matmul(x, layout.prepare(qt, layout=layout.PAIRS_LAYOUT), interpret=True,
                   config=mgpu_sm90.Config(unpack="f32"))
    with pytest.raises(ValueError, match="unpack"):
        api.matmul(x, layout.prepare(qt), interpret=True, config=mgpu_sm90.Config(unpack="nope"))


# (unpack, group, K, M, rank, chunk_slots, k_splits, a_regs); 3-bit weights (BITS_CASES: 2 and 4)
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


# (bits, unpack, group, K, M, rank, chunk_slots, k_splits, a_regs): the magic unpack on 2/4-bit
# planar_pairs (one plane, slab 32: a pair-slot is one g64 group, g128 spans two)
BITS_CASES = [
    (4, "magic_bf16", 64, 512, 3, 16, 4, 2, True),     # split-K, compensator, A from registers
    (4, "magic_bf16", 128, 640, 5, 0, 4, 1, False),    # g128, K padded 640 -> 768, through SMEM
    (4, "magic_f16", None, 256, 16, 0, 2, 1, True),    # per-channel, f16
    (2, "magic_bf16", 64, 1024, 1, 16, 4, 2, True),    # split-K, compensator
    (2, "magic_bf16", 128, 640, 9, 0, 8, 1, False),    # g128, K padded 640 -> 1024
]


@pytest.mark.parametrize("unpack,group_size,k,m,rank,chunk,splits,a_regs", VARIANT_CASES)
def test_variant_interpret(unpack, group_size, k, m, rank, chunk, splits, a_regs):
    _check_variant(3, unpack, group_size, k, m, rank, chunk, splits, a_regs)


@pytest.mark.parametrize("bits,unpack,group_size,k,m,rank,chunk,splits,a_regs", BITS_CASES)
def test_variant_interpret_2_4_bit(bits, unpack, group_size, k, m, rank, chunk, splits, a_regs):
    _check_variant(bits, unpack, group_size, k, m, rank, chunk, splits, a_regs)


@pytest.mark.parametrize("bits", [2, 4])
def test_2_4_bit_default_is_pairs_stream_k(bits):
    """api.matmul on a 2/4-bit QuantizedTensor: planar_pairs weights, the magic (fold) unpack with A in
    registers, the stream-K schedule (the default decode path), with a compensator."""
    rng = _rng()
    qt = make_weight(1024, 128, bits, 64, 8, rng)
    kw = layout.prepare(qt, layout=api._kernel_layout(qt, "kernel", None))
    cfg = mgpu_sm90.default_config(4, kw)
    assert kw.layout == layout.PAIRS_LAYOUT and cfg.unpack == "magic_fold" and cfg.a_regs   # M <= 16
    assert cfg.schedule == "stream_k"
    x = make_x(4, 1024, rng)
    assert rel_err(api.matmul(x, qt, interpret=True), ref64(x, qt)) < TOL


def _check_variant(bits, unpack, group_size, k, m, rank, chunk, splits, a_regs):
    rng = _rng()
    qt = make_weight(k, 64, bits, group_size, rank, rng)
    lay = layout.PAIRS_LAYOUT if unpack.startswith("magic") else layout.LAYOUT
    kw = layout.prepare(qt, layout=lay)
    x = make_x(m, k, rng)
    cfg = mgpu_sm90.Config(block_m=0, chunk_slots=chunk, k_splits=splits, unpack=unpack, a_regs=a_regs,
                           schedule="split_k")
    y = api.matmul(x, kw, interpret=True, config=cfg)
    assert y.shape == (m, 64) and y.dtype == jnp.bfloat16
    err = rel_err(y, ref64(x, qt))
    assert err < TOL, err


def test_pairs_default_config_picks_magic():
    rng = _rng()
    qt = make_weight(512, 64, 3, 64, 0, rng)
    kw = layout.prepare(qt, layout=layout.PAIRS_LAYOUT)
    assert mgpu_sm90.default_config(1, kw).unpack == "magic_fold"
    assert mgpu_sm90.default_config(64, kw).unpack == "magic_bf16"
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
    for bits, group_size, rank, ms in ((3, 64, 0, (1, 16)), (3, 128, 32, (3, 64)), (3, None, 0, (8,)),
                                       (4, 64, 16, (1, 16)), (2, 128, 0, (3,))):
        if bits != 3 and unpack == "bf16":
            continue
        qt = make_weight(k, n, bits, group_size, rank, rng)
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


@pytest.mark.parametrize("bits,unpack,a_regs", [(3, "magic_bf16", False), (3, "magic_f16", False),
                                                (3, "magic_bf16", True), (4, "magic_bf16", True),
                                                (4, "magic_bf16", False), (2, "magic_bf16", True)])
def test_native_lowering_on_cpu(bits, unpack, a_regs):
    """The inline-PTX conversion builds (layout inference, register mapping) for sm90, and with
    a_regs its result is a legal register A operand of wgmma; for 2/4-bit with the width's mask."""
    reason = cuda_lowering_unavailable()
    if reason:
        pytest.skip(reason)
    rng = _rng()
    qt = make_weight(1024, 128, bits, 64, 0, rng)
    cfg = mgpu_sm90.Config(block_m=0, chunk_slots=4, unpack=unpack, a_regs=a_regs)
    text = _lower_native_for_sm90(layout.prepare(qt, layout=layout.PAIRS_LAYOUT), 3, cfg)
    assert "mosaic_gpu" in text
    assert f"lop3.b32 t, t, {hex(mgpu_sm90._pair_mask(bits))}" in text
