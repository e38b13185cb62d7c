"""models.linear: the one matmul entry point, on plain arrays and QuantizedTensors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from milo_jax import quantize_tensor
from milo_jax.models.linear import expert_linear, gathered_expert_linear, linear

KEY = jax.random.key(0)


def _rand(key, shape):
    return jax.random.normal(jax.random.fold_in(KEY, key), shape, jnp.float32)


@pytest.mark.parametrize("quantized", [False, True])
def test_linear_matches_numpy(quantized):
    x, w, b = _rand(1, (3, 5, 64)), _rand(2, (64, 24)), _rand(3, (24,))
    wq = quantize_tensor(w, bits=3, group_size=32, method="rtn") if quantized else w
    dense = np.asarray(wq.dequantize(jnp.float32)) if quantized else np.asarray(w)
    want = np.asarray(x, np.float64) @ dense.astype(np.float64) + np.asarray(b)
    got = np.asarray(linear(x, wq, b))
    assert got.shape == (3, 5, 24)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("quantized", [False, True])
def test_expert_variants_agree_with_per_expert_matmul(quantized):
    e, t, k, n, top = 4, 6, 64, 16, 2
    w = _rand(4, (e, k, n))
    wq = quantize_tensor(w, bits=3, group_size=32, method="rtn") if quantized else w
    dense = np.asarray(wq.dequantize(jnp.float32)) if quantized else np.asarray(w)
    x = _rand(5, (e, t, k))
    got = np.asarray(expert_linear(x, wq))
    want = np.einsum("etk,ekn->etn", np.asarray(x, np.float64), dense)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)

    xs = _rand(6, (t, top, k))
    ids = jax.random.randint(jax.random.fold_in(KEY, 7), (t, top), 0, e)
    got = np.asarray(gathered_expert_linear(xs, wq, ids))
    want = np.einsum("tjk,tjkn->tjn", np.asarray(xs, np.float64), dense[np.asarray(ids)])
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="does not match"):
        linear(jnp.ones((2, 8)), jnp.ones((9, 4)))
    with pytest.raises(ValueError, match="expert_linear"):
        expert_linear(jnp.ones((3, 2, 8)), jnp.ones((4, 8, 4)))


@pytest.mark.parametrize("prepared", [False, True])
def test_bf16_linear_dispatches_to_quant_matmul(monkeypatch, prepared):
    """bf16 activations with a quantized weight go through pallas_kernels.quant_matmul."""
    import importlib
    linear_mod = importlib.import_module("milo_jax.models.linear")
    from pallas_kernels.quant_matmul import prepare

    calls = []
    real = linear_mod.quant_matmul
    monkeypatch.setattr(linear_mod, "quant_matmul", lambda x, w: calls.append(1) or real(x, w))
    x = _rand(5, (2, 3, 128)).astype(jnp.bfloat16)
    qt = quantize_tensor(_rand(6, (128, 64)), bits=3, group_size=64)
    w = prepare(qt) if prepared else qt
    got = np.asarray(linear(x, w).astype(jnp.float32), np.float64)
    assert calls, "quantized bf16 linear did not use quant_matmul"
    want = np.asarray(x.astype(jnp.float32), np.float64) @ np.asarray(qt.dequantize(jnp.float32), np.float64)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-2
    np.testing.assert_allclose(np.asarray(linear_mod.materialize(w, jnp.float32)),
                               np.asarray(qt.dequantize(jnp.float32)), atol=2e-2, rtol=1e-2)
