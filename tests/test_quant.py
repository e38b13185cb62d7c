"""RTN and HQQ group quantization, QuantizedTensor accounting, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import milo_jax
from milo_jax.quant import QuantizedTensor, quantize_tensor


def heavy_tailed(shape, seed, df=3.0, scale=0.02):
    return (np.random.default_rng(seed).standard_t(df, size=shape) * scale).astype(np.float32)


def gaussian(shape, seed, scale=0.02):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def mean_abs_err(w, qt):
    return float(np.mean(np.abs(np.asarray(qt.dequantize(jnp.float32), np.float64) - w)))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128, None])
def test_rtn_error_within_half_step(bits, group_size):
    """RTN: every element is within half a quantization step (plus 16-bit rounding of s and z)."""
    w = gaussian((256, 24), seed=bits * 7 + (group_size or 0))
    qt = quantize_tensor(w, bits=bits, group_size=group_size, method="rtn")
    g = qt.group_size
    assert g == (group_size or 256)
    s = np.repeat(np.asarray(qt.scales, np.float64), g, axis=0)
    err = np.abs(np.asarray(qt.dequantize(jnp.float32), np.float64) - w)
    assert err.max() > 0
    assert np.all(err <= 0.52 * s + 1e-7), (err / s).max()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128, None])
def test_hqq_beats_rtn_and_stays_in_range(bits, group_size):
    w = heavy_tailed((256, 32), seed=bits + (group_size or 1))
    rtn = quantize_tensor(w, bits=bits, group_size=group_size, method="rtn")
    hqq = quantize_tensor(w, bits=bits, group_size=group_size, method="hqq")
    e_rtn, e_hqq = mean_abs_err(w, rtn), mean_abs_err(w, hqq)
    assert e_hqq <= e_rtn * 1.0001
    if bits <= 4:
        assert e_hqq < 0.995 * e_rtn  # heavy tails: the lp zero point must win visibly
    # HQQ only moves the zero point: no element is off by more than its group's range.
    g = hqq.group_size
    wg = w.reshape(256 // g, g, -1)
    rng_ = np.repeat(wg.max(1) - wg.min(1), g, axis=0)
    assert np.all(np.abs(np.asarray(hqq.dequantize(jnp.float32)) - w) <= rng_ + 1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("dist", ["gaussian", "student_t"])
def test_hqq_matches_hqq_package(bits, dist):
    """Our mean |W - W_hat| is at most 1.01x the hqq package's on the same matrices."""
    torch = pytest.importorskip("torch")
    quantizer = pytest.importorskip("hqq.core.quantize").Quantizer
    make = gaussian if dist == "gaussian" else heavy_tailed
    w = make((3, 512, 256), seed=bits * 13 + len(dist))  # [experts, K=in, N=out]
    ours = mean_abs_err(w, quantize_tensor(w, bits=bits, group_size=64, method="hqq"))
    theirs = []
    for e in range(w.shape[0]):
        w_t = torch.tensor(w[e].T.copy())  # torch Linear layout [out, in]; groups along in (axis=1)
        w_q, meta = quantizer.quantize(w_t, nbits=bits, group_size=64, axis=1, device="cpu",
                                       compute_dtype=torch.float32)
        meta["compute_dtype"] = torch.float32
        theirs.append(float((quantizer.dequantize(w_q, meta) - w_t).abs().double().mean()))
    assert ours <= 1.01 * float(np.mean(theirs)), (ours, np.mean(theirs))


@pytest.mark.parametrize("method", ["rtn", "hqq"])
def test_stacked_experts_equal_one_at_a_time(method):
    w = heavy_tailed((2, 3, 128, 40), seed=5)
    stacked = quantize_tensor(w, bits=3, group_size=64, method=method)
    assert stacked.codes.shape == (2, 3, 128 * 3 // 32, 40)
    for i in range(2):
        for j in range(3):
            one = quantize_tensor(w[i, j], bits=3, group_size=64, method=method)
            np.testing.assert_array_equal(np.asarray(stacked.codes[i, j]), np.asarray(one.codes))
            np.testing.assert_array_equal(np.asarray(stacked.scales[i, j]), np.asarray(one.scales))
            np.testing.assert_array_equal(np.asarray(stacked.zeros[i, j]), np.asarray(one.zeros))


def test_deterministic_bit_identical():
    w = heavy_tailed((4, 256, 64), seed=11)
    a = quantize_tensor(w, bits=3, group_size=64)
    b = quantize_tensor(w.copy(), bits=3, group_size=64)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_bf16_input_and_dtypes():
    w = jnp.asarray(heavy_tailed((128, 64), seed=2), jnp.bfloat16)
    qt = quantize_tensor(w, bits=4, group_size=32)
    assert qt.dtype == "bfloat16"
    assert qt.dequantize().dtype == jnp.bfloat16
    assert qt.scales.dtype in (jnp.float16, jnp.bfloat16) and qt.zeros.dtype == qt.scales.dtype
    assert qt.dequantize(jnp.float32).shape == (128, 64)


def test_scale_dtype_falls_back_to_bf16_for_tiny_weights():
    w = gaussian((128, 16), seed=3, scale=1e-7)
    qt = quantize_tensor(w, bits=3, group_size=64)
    assert qt.scales.dtype == jnp.bfloat16
    assert mean_abs_err(w, qt) < 0.2 * np.mean(np.abs(w))


def test_constant_and_zero_groups_are_exact():
    w = np.zeros((128, 8), np.float32)
    w[:64, :4] = 0.75
    w[64:, 4:] = gaussian((64, 4), seed=4)
    qt = quantize_tensor(w, bits=3, group_size=64)
    deq = np.asarray(qt.dequantize(jnp.float32))
    np.testing.assert_allclose(deq[:64, :4], 0.75, rtol=2e-3)
    np.testing.assert_array_equal(deq[64:, :4], 0.0)
    assert np.all(np.isfinite(deq))


@pytest.mark.parametrize("bits,group_size,expected", [
    (3, 64, 3.5), (3, 128, 3.25), (2, 64, 2.5), (4, 32, 5.0), (8, 128, 8.25)])
def test_bits_per_weight_counts_scales_and_zeros(bits, group_size, expected):
    qt = quantize_tensor(gaussian((2, 256, 64), seed=1), bits=bits, group_size=group_size)
    assert qt.bits_per_weight == pytest.approx(expected)
    assert qt.nbytes == qt.codes.nbytes + qt.scales.nbytes + qt.zeros.nbytes


def test_bits_per_weight_counts_compensator():
    qt = quantize_tensor(gaussian((256, 128), seed=1), bits=3, group_size=64)
    r = 8
    with_comp = QuantizedTensor(codes=qt.codes, scales=qt.scales, zeros=qt.zeros,
                                u=jnp.ones((256, r), jnp.bfloat16), v=jnp.ones((r, 128), jnp.bfloat16),
                                bits=qt.bits, group_size=qt.group_size, shape=qt.shape, slab=qt.slab,
                                dtype=qt.dtype)
    assert with_comp.bits_per_weight == pytest.approx(3.5 + 16 * r * (256 + 128) / (256 * 128))
    np.testing.assert_allclose(np.asarray(with_comp.dequantize(jnp.float32)),
                               np.asarray(qt.dequantize(jnp.float32)) + r, rtol=1e-6)
    assert with_comp.rank == r


def test_quantized_tensor_is_a_pytree_through_jit():
    qt = quantize_tensor(gaussian((3, 128, 32), seed=9), bits=3, group_size=64)
    leaves, treedef = jax.tree_util.tree_flatten(qt)
    assert len(leaves) == 3  # codes, scales, zeros; bits/group/shape are static metadata
    x = jnp.asarray(gaussian((3, 5, 128), seed=10))
    y = jax.jit(lambda x, q: jnp.einsum("ebk,ekn->ebn", x, q.dequantize(jnp.float32)))(x, qt)
    ref = np.einsum("ebk,ekn->ebn", np.asarray(x, np.float64),
                    np.asarray(qt.dequantize(jnp.float32), np.float64))
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-4, atol=1e-6)
    assert jax.tree_util.tree_unflatten(treedef, leaves).bits == 3


# ---- bad input ----

@pytest.mark.parametrize("kwargs,match", [
    (dict(bits=5), "unsupported bit width 5"),
    (dict(bits=1), "unsupported bit width 1"),
    (dict(group_size=48), "unsupported group size 48"),
    (dict(method="gptq"), "unknown method 'gptq'"),
])
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match) as e:
        quantize_tensor(gaussian((128, 16), seed=0), **kwargs)
    assert "(128, 16)" in str(e.value)


def test_k_not_divisible_by_group():
    with pytest.raises(ValueError, match=r"\(96, 16\).*K=96 is not divisible by the group size 64"):
        quantize_tensor(gaussian((96, 16), seed=0), bits=3, group_size=64)


def test_per_channel_k_not_packable():
    with pytest.raises(ValueError, match=r"\(48, 16\).*multiple of 32"):
        quantize_tensor(gaussian((48, 16), seed=0), bits=3, group_size=None)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_inf_raise(bad):
    w = gaussian((128, 16), seed=0)
    w[3, 5] = bad
    with pytest.raises(ValueError, match=r"\(128, 16\) contains NaN or Inf"):
        quantize_tensor(w)


def test_integer_dtype_raises():
    with pytest.raises(ValueError, match=r"\(128, 16\).*int32 is not a floating-point"):
        quantize_tensor(np.ones((128, 16), np.int32))


def test_one_dim_raises():
    with pytest.raises(ValueError, match=r"\(128,\).*at least 2 dims"):
        quantize_tensor(np.ones((128,), np.float32))


def test_public_surface():
    assert milo_jax.quantize_tensor is quantize_tensor
    assert milo_jax.QuantizedTensor is QuantizedTensor
