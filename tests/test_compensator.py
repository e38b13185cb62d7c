"""Compensator storage (milo_jax.quant.compensator): int8 / int4 factor round trips, exact bytes,
ragged per-expert ranks, the refit after quantizing the factors, pytree behaviour."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from milo_jax.quant import compensator, quantize_tensor
from milo_jax.quant.compensator import (QuantizedFactor, RaggedFactor, compensator_nbytes,
                                        quantize_factor)
from milo_jax.quant.lowrank import _dequant, milo_alternation, quantize_lowrank

K, N = 128, 64


def lowrank_plus_t(shape, seed, true_rank=6):
    rng = np.random.default_rng(seed)
    *lead, k, n = shape
    a = rng.standard_normal((*lead, k, true_rank)) @ rng.standard_normal((*lead, true_rank, n))
    return (0.02 * a / np.sqrt(true_rank) + 0.01 * rng.standard_t(3, size=shape)).astype(np.float32)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("transposed", [False, True])
def test_factor_round_trip_within_half_step(bits, transposed):
    rng = np.random.default_rng(bits + transposed)
    shape = (2, 8, N) if transposed else (2, K, 8)        # V [.., r, N] / U [.., K, r]
    f = (rng.standard_t(4, size=shape) * 0.05).astype(np.float32)
    qf = quantize_factor(jnp.asarray(f), bits=bits, group_size=32, transposed=transposed)
    assert qf.shape == shape
    back = np.asarray(qf.materialize(), np.float64)
    # per group of 32 along the long axis: |err| <= s / 2 with s = max|x| / (2^(b-1) - 1)
    x = np.swapaxes(f, -1, -2) if transposed else f
    xg = x.reshape(2, x.shape[1] // 32, 32, x.shape[2]).astype(np.float64)
    s = np.abs(xg).max(axis=2, keepdims=True) / (2 ** (bits - 1) - 1)
    err = np.abs((np.swapaxes(back, -1, -2) if transposed else back).reshape(xg.shape) - xg)
    assert np.all(err <= s * 0.5 * (1 + 2 ** -7) + 1e-12)     # + bf16 rounding of the scale
    rel = np.linalg.norm(back - f) / np.linalg.norm(f)
    assert rel < (0.01 if bits == 8 else 0.15)
    assert qf.codes.dtype == jnp.uint32 and qf.codes.shape[-2] == x.shape[1] * bits // 32


def test_factor_zero_column_is_exact():
    f = np.zeros((K, 4), np.float32)
    f[:, 1] = np.linspace(-1, 1, K)
    back = np.asarray(quantize_factor(jnp.asarray(f), bits=4).materialize())
    assert np.all(back[:, 0] == 0) and np.all(back[:, 2:] == 0)


@pytest.mark.parametrize("dtype,elem_bits", [("bfloat16", 16), ("int8", 8.25), ("int4", 4.25),
                                             ("float32", 32)])
def test_bits_accounting_exact(dtype, elem_bits):
    w = lowrank_plus_t((3, K, N), seed=1)
    r = 8
    qt = quantize_lowrank(w, rank=r, compensator_dtype=dtype)
    base = quantize_tensor(w)
    comp = 3 * compensator_nbytes(K, N, r, dtype)
    assert comp * 8 == pytest.approx(3 * elem_bits * r * (K + N))
    assert qt.nbytes == base.nbytes + comp
    assert qt.bits_per_weight == pytest.approx(3.5 + elem_bits * r * (K + N) / (K * N))


def test_ragged_int4_bytes_and_product():
    w = lowrank_plus_t((3, K, N), seed=2)
    ranks = np.array([8, 0, 16])
    qt = quantize_lowrank(w, rank=ranks, compensator_dtype="int4")
    assert isinstance(qt.u, RaggedFactor) and isinstance(qt.u.data, QuantizedFactor)
    base = quantize_tensor(w)
    # int4 + one bf16 scale per 64 along the long axis, only for the 24 real columns
    assert qt.nbytes - base.nbytes == 24 * (K + N) // 2 + 2 * 24 * (K // 64 + N // 64)
    assert qt.nbytes - base.nbytes == sum(compensator_nbytes(K, N, int(r), "int4") for r in ranks)
    # the padded view: expert e's columns in place, zeros past its rank
    u = np.asarray(qt.u.padded())
    v = np.asarray(qt.v.padded())
    assert u.shape == (3, K, 16) and v.shape == (3, 16, N)
    assert np.all(u[0, :, 8:] == 0) and np.all(u[1] == 0) and np.all(v[0, 8:] == 0)
    data_u = np.asarray(qt.u.data.materialize())
    np.testing.assert_array_equal(u[2], data_u[:, 8:24])
    prod = np.asarray(compensator.low_rank_product(qt.u, qt.v))
    np.testing.assert_allclose(prod[0], data_u[:, :8] @ np.asarray(qt.v.data.materialize())[:8],
                               rtol=1e-5, atol=1e-7)
    # a ragged factor has no expert axis: slicing leaves by expert must fail loudly, not silently
    taken = jax.tree_util.tree_map(lambda a: jnp.take(a, jnp.array([2, 0]), axis=0), qt)
    with pytest.raises(ValueError, match="no leading"):
        dataclasses.replace(taken, shape=(2, K, N)).dequantize(jnp.float32)


@pytest.mark.parametrize("dtype", ["int4", "int8"])
def test_refit_not_worse(dtype):
    """The stored result (refit Q = HQQ(W - deq(U) deq(V)), the better of refit / not refit /
    plain HQQ kept) is never worse than keeping the loop's Q with the quantized factors.
    (Measured: the refit alone is usually slightly worse in Frobenius norm, since HQQ minimises an
    L_0.7 error and the loop's Q is already the best of all rounds; hence the best-of.)"""
    w = lowrank_plus_t((3, K, N), seed=3)
    r = 8
    qt, st = quantize_lowrank(w, rank=r, compensator_dtype=dtype, return_stats=True)
    raw = milo_alternation(w, rank=r)
    qf_u = quantize_factor(raw["u"], bits=compensator.INT_DTYPES[dtype])
    qf_v = quantize_factor(raw["v"], bits=compensator.INT_DTYPES[dtype], transposed=True)
    uv = np.asarray(qf_u.materialize() @ qf_v.materialize(), np.float64)
    no_refit = np.array([np.linalg.norm(w[b] - np.asarray(_dequant(raw["codes"][b], raw["s16"][b],
                                                                    raw["z16"][b], 64)) - uv[b])
                         for b in range(3)])
    stored = np.linalg.norm((np.asarray(qt.dequantize(jnp.float32), np.float64) - w)
                            .reshape(3, -1), axis=1)
    assert np.all(stored <= no_refit * (1 + 1e-5))
    # quantized factors cost accuracy vs float32 factors, but stay well below plain HQQ
    assert np.all(st.err >= st.loop_err * (1 - 1e-3)) and np.all(st.err < 0.97 * st.hqq_err)


def test_quantized_tensor_with_quantized_factors_is_a_pytree():
    w = lowrank_plus_t((3, K, N), seed=4)
    qt = quantize_lowrank(w, rank=8, compensator_dtype="int8")
    assert isinstance(qt.u, QuantizedFactor) and qt.rank == 8 and qt.u.shape == (3, K, 8)
    ref = np.asarray(qt.dequantize(jnp.float32))
    out = jax.jit(lambda t: t.dequantize(jnp.float32))(qt)
    # jit may fuse (and FMA) the dequantize differently from the eager ops: equal to a float32 ulp or so
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-6, atol=1e-7)
    # slicing experts leaf by leaf (what models/linear.py does for gathered experts) stays valid
    idx = jnp.array([2, 0])
    taken = jax.tree_util.tree_map(lambda a: jnp.take(a, idx, axis=0), qt)
    taken = dataclasses.replace(taken, shape=(2, K, N))
    np.testing.assert_array_equal(np.asarray(taken.dequantize(jnp.float32)), ref[[2, 0]])


def test_bad_factor_arguments():
    with pytest.raises(ValueError, match="unsupported bits"):
        quantize_factor(jnp.ones((K, 4)), bits=3)
    with pytest.raises(ValueError, match="cannot be packed"):
        quantize_factor(jnp.ones((K + 4, 4)), bits=4)
    with pytest.raises(ValueError, match="unknown compensator dtype"):
        compensator_nbytes(K, N, 4, "int2")
