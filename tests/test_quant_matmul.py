"""quant_matmul: reference and Mosaic GPU kernel against a float64 numpy reference.

CPU CI runs the kernel body in Mosaic GPU interpret mode (jax's InterpretGPUParams) on tiny
shapes; the only substitution there is the tensor-core product itself (see mgpu_sm90._mma_xt).
Tests marked `gpu` run the native kernel on an sm90 GPU and are skipped elsewhere.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

import milo_jax
from milo_jax.quant import packing
from pallas_kernels.quant_matmul import api, layout, mgpu_sm90, reference

_SEED = [0]


def _rng():
    _SEED[0] += 1
    return np.random.default_rng(1000 + _SEED[0])


def make_weight(k, n, bits, group_size, rank, rng, scale_dtype=None):
    """Heavy-tailed random W [K, N] quantized with RTN, plus a random compensator of `rank`."""
    w = rng.standard_t(df=4, size=(k, n)).astype(np.float32) * 0.02
    qt = milo_jax.quantize_tensor(jnp.asarray(w), bits=bits, group_size=group_size, method="rtn",
                                  scale_dtype=scale_dtype)
    if rank:
        u = jnp.asarray(rng.standard_normal((k, rank)) * 0.05, jnp.bfloat16)
        v = jnp.asarray(rng.standard_normal((rank, n)) * 0.05, jnp.bfloat16)
        qt = dataclasses.replace(qt, u=u, v=v)
    return qt


def ref64(x, qt, compensator=True):
    """y [M, N] in float64 from the packed codes (numpy)."""
    q = np.asarray(packing.unpack(qt.codes, qt.bits, qt.k, qt.slab), np.float64)
    g = qt.group_size
    s = np.repeat(np.asarray(qt.scales, np.float64), g, axis=0)
    z = np.repeat(np.asarray(qt.zeros, np.float64), g, axis=0)
    w = s * (q - z)
    x64 = np.asarray(x, np.float64)
    y = x64 @ w
    if compensator and qt.u is not None:
        y = y + (x64 @ np.asarray(qt.u, np.float64)) @ np.asarray(qt.v, np.float64)
    return y


def rel_err(y, y64):
    y = np.asarray(jnp.asarray(y, jnp.float32), np.float64)
    assert np.all(np.isfinite(y))
    return float(np.linalg.norm(y - y64) / np.linalg.norm(y64))


def make_x(m, k, rng):
    return jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)


TOL = 1e-2   # bf16 weights, bf16 x @ u and bf16 output; float32 accumulation lands near 3e-3


# ------------------------------------------------------------------ reference (fast, full grid)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [64, 128, None])
def test_reference_against_float64(bits, group_size):
    rng = _rng()
    k, n = 256, 64
    for rank in (0, 16):
        qt = make_weight(k, n, bits, group_size, rank, rng)
        for m in (1, 3, 16, 64, 256):
            x = make_x(m, k, rng)
            y = reference.matmul_reference(x, qt)
            assert y.shape == (m, n) and y.dtype == jnp.bfloat16
            assert rel_err(y, ref64(x, qt)) < TOL


def test_reference_compensator_matters():
    rng = _rng()
    qt = make_weight(256, 64, 3, 64, 32, rng)
    x = make_x(5, 256, rng)
    y = reference.matmul_reference(x, qt)
    assert rel_err(y, ref64(x, qt)) < TOL
    assert rel_err(y, ref64(x, qt, compensator=False)) > 5 * TOL


# ------------------------------------------------------------------ layout repacking
@pytest.mark.parametrize("bits,k", [(2, 512), (3, 512), (3, 320), (4, 192), (8, 128)])
def test_prepare_roundtrip(bits, k):
    rng = _rng()
    qt = make_weight(k, 64, bits, 64, 0, rng)
    kw = layout.prepare(qt)
    assert kw.k_pad % kw.tile_rows == 0 and kw.k_pad >= k
    np.testing.assert_array_equal(np.asarray(api.dequantize_kernel_weights(kw), np.float32),
                                  np.asarray(qt.dequantize(jnp.bfloat16, compensator=False), np.float32))


def test_prepare_rejects_bad_shapes():
    rng = _rng()
    with pytest.raises(ValueError, match="multiple of 64"):
        layout.prepare(make_weight(256, 96, 4, 64, 0, rng))
    qt = make_weight(256, 64, 4, 64, 0, rng)
    with pytest.raises(ValueError, match="does not match"):
        api.matmul(make_x(2, 128, rng), qt, impl="kernel", interpret=True)
    big = dataclasses.replace(qt, u=jnp.ones((256, 130), jnp.bfloat16), v=jnp.ones((130, 64), jnp.bfloat16))
    with pytest.raises(ValueError, match="rank"):
        layout.prepare(big)


def test_auto_falls_back_for_unsupported_n():
    rng = _rng()
    qt = make_weight(256, 96, 4, 64, 0, rng)   # N=96: no kernel tile, reference path
    x = make_x(3, 256, rng)
    assert rel_err(api.matmul(x, qt), ref64(x, qt)) < TOL


# ------------------------------------------------------------------ kernel in GPU interpret mode
# (bits, group, K, M, rank): every bit width and group kind, tile and non-tile K, M of 1..256.
INTERPRET_CASES = [
    (2, 64, 512, 1, 0),
    (2, 128, 640, 16, 16),     # K not a tile multiple (tile 512): padded to 1024
    (3, 64, 512, 3, 32),
    (3, 128, 1024, 64, 0),
    (3, None, 320, 16, 8),     # per-channel, K padded 320 -> 512
    (4, 64, 256, 256, 16),     # several token blocks
    (4, 128, 384, 3, 0),       # K padded 384 -> 512
    (4, None, 256, 1, 0),
    (8, 64, 128, 16, 0),
    (8, 128, 384, 1, 16),
]


@pytest.mark.parametrize("bits,group_size,k,m,rank", INTERPRET_CASES)
def test_kernel_interpret(bits, group_size, k, m, rank):
    rng = _rng()
    qt = make_weight(k, 64, bits, group_size, rank, rng)
    x = make_x(m, k, rng)
    y = api.matmul(x, qt, interpret=True)
    assert y.shape == (m, 64) and y.dtype == jnp.bfloat16
    err = rel_err(y, ref64(x, qt))
    assert err < TOL, err
    if rank:
        assert rel_err(y, ref64(x, qt, compensator=False)) > err


def test_kernel_interpret_two_column_tiles_no_overlap():
    """N = 2 column tiles, 128-wide, single-buffered variant, batched leading axes."""
    rng = _rng()
    qt = make_weight(512, 256, 3, 64, 16, rng)
    x = make_x(6, 512, rng)
    cfg = mgpu_sm90.Config(block_n=128, block_m=8, chunk_slots=8, overlap=False)
    y = api.matmul(x.reshape(2, 3, 512), qt, interpret=True, config=cfg)
    assert y.shape == (2, 3, 256)
    assert rel_err(y.reshape(6, 256), ref64(x, qt)) < TOL


def test_dequant_dot_path():
    rng = _rng()
    qt = make_weight(384, 64, 3, 128, 16, rng)
    x = make_x(70, 384, rng)
    y = api.matmul(x, layout.prepare(qt), impl="dequant_dot")
    assert rel_err(y, ref64(x, qt)) < TOL


# ------------------------------------------------------------------ native GPU (sm90 only)
@pytest.mark.gpu
@pytest.mark.skipif(not api._on_sm90(), reason="needs an sm90 (Hopper) GPU")
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [64, 128, None])
def test_kernel_native_gpu(bits, group_size):
    rng = _rng()
    k, n = 1408, 512
    for rank, ms in ((0, (1, 64)), (32, (3, 16, 256))):
        qt = make_weight(k, n, bits, group_size, rank, rng)
        kw = layout.prepare(qt, layout=api._kernel_layout(qt, "kernel", None))   # api.matmul's own choice
        for m in ms:
            x = make_x(m, k, rng)
            y = api.matmul(x, kw, impl="kernel")
            assert rel_err(y, ref64(x, qt)) < TOL, (m, rank)


@pytest.mark.parametrize("splits,rank", [(2, 16), (4, 0)])
def test_kernel_interpret_split_k(splits, rank):
    rng = _rng()
    qt = make_weight(2048, 64, 3, 64, rank, rng)      # 4 tiles of 512 rows
    x = make_x(3, 2048, rng)
    cfg = mgpu_sm90.Config(chunk_slots=8, k_splits=splits)
    err = rel_err(api.matmul(x, qt, interpret=True, config=cfg), ref64(x, qt))
    assert err < TOL, err


@pytest.mark.parametrize("bits,group_size,k,rank", [(3, 64, 640, 16), (8, None, 256, 0)])
def test_mgpu_dequant_dot_interpret(bits, group_size, k, rank):
    """Prefill path through the Mosaic GPU dequantize kernel (interpret mode), against float64."""
    rng = _rng()
    qt = make_weight(k, 128, bits, group_size, rank, rng)
    x = make_x(70, k, rng)
    y = api.matmul(x, layout.prepare(qt), impl="mgpu_dequant_dot", interpret=True)
    assert y.shape == (70, 128)
    assert rel_err(y, ref64(x, qt)) < TOL


@pytest.mark.parametrize("group_size,k", [(64, 1024), (128, 640), (None, 512)])
def test_mgpu_dequantize_magic_interpret(group_size, k):
    """The dequantize kernel on 3-bit planar_pairs weights (magic-number unpack; interpret mode runs
    its jnp twin with the same roundings): W_hat^T matches the f32 dequantization to bf16 rounding,
    and the prefill product matches float64."""
    rng = _rng()
    qt = make_weight(k, 128, 3, group_size, 8, rng)
    kw = layout.prepare(qt, layout=layout.PAIRS_LAYOUT)
    w_t = np.asarray(mgpu_sm90.dequantize_mgpu(kw, interpret=True), np.float32)[:, :k]
    want = np.asarray(api.dequantize_kernel_weights(kw), np.float32).T
    assert w_t.shape == want.shape
    scale = np.abs(want).max()
    assert np.abs(w_t - want).max() < 2e-2 * scale
    assert np.abs(w_t - want).mean() < 2e-3 * scale
    x = make_x(33, k, rng)
    y = api.matmul(x, kw, impl="mgpu_dequant_dot", interpret=True)
    assert rel_err(y, ref64(x, qt)) < TOL
