"""The one place where every weight matmul of the models happens.

`linear(x, w)`         y = x @ w       for w a plain array [K, N] or a QuantizedTensor of logical
                                       shape [K, N].
`expert_linear(x, w)`  y[e] = x[e] @ w[e]  for stacked experts w [E, K, N] and x [E, T, K].
`gathered_expert_linear(x, w, idx)`  y[t, j] = x[t, j] @ w[idx[t, j]]  for x [T, k, K], idx [T, k]
                                       (reads only the selected experts' weights).

`linear` with bf16 activations and a 2-D QuantizedTensor (or its kernel layout, `KernelWeights`
from `pallas_kernels.quant_matmul.prepare`; `milo_jax.prepare_for_kernels(model)` converts a whole
model once, so the repack does not run inside every call) runs `pallas_kernels.quant_matmul.matmul`:
the Mosaic GPU kernel on Hopper, its jnp reference elsewhere. float32 activations (parity tests) and the stacked
expert variants dequantize and multiply with jnp; the grouped MoE kernel will plug in there. float32 inputs use Precision.HIGHEST so that GPUs
do not silently drop to TF32 and parity holds there too.

`Linear` is the NNX module that holds `kernel` [K, N] (and an optional `bias` [N]) as nnx.Param;
the Param's value may be swapped for a QuantizedTensor (`module.kernel.set_value(qt)`), which
nnx.split / nnx.merge / nnx.jit carry as a pytree.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from milo_jax.quant.tensor import QuantizedTensor
from pallas_kernels.quant_matmul import KernelWeights
from pallas_kernels.quant_matmul import matmul as quant_matmul
from pallas_kernels.quant_matmul.layout import unpack_codes
from pallas_kernels.grouped_matmul.api import grouped_matmul


def _precision(dtype):
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _dequantize_kernel_weights_f32(kw: KernelWeights) -> jax.Array:
    """W_hat (+ u v) [K, N] float32 from the kernel layout: the same float32 math as
    QuantizedTensor.dequantize, so a prepared weight (milo_jax.prepare_for_kernels) gives a
    float32 linear the values its QuantizedTensor gave (api.dequantize_kernel_weights rounds to bf16)."""
    codes = unpack_codes(kw).astype(jnp.float32)                    # [K_pad, N]
    rows = kw.group_rows
    s = kw.scales.astype(jnp.float32)[:, None, :]
    z = kw.zeros.astype(jnp.float32)[:, None, :]
    w_hat = (s * (codes.reshape(kw.k_pad // rows, rows, kw.n) - z)).reshape(kw.k_pad, kw.n)[:kw.k]
    if kw.u is not None:
        w_hat = w_hat + jnp.matmul(kw.u.astype(jnp.float32), kw.v_t[:, :kw.rank].T.astype(jnp.float32),
                                   precision=jax.lax.Precision.HIGHEST)
    return w_hat


def materialize(w, dtype) -> jax.Array:
    """The weight as a dense array in `dtype` (dequantizing a QuantizedTensor)."""
    if isinstance(w, QuantizedTensor):
        return w.dequantize(dtype)
    if isinstance(w, KernelWeights):
        return _dequantize_kernel_weights_f32(w).astype(dtype)
    return jnp.asarray(w).astype(dtype)


def weight_shape(w) -> tuple:
    """Logical shape of a plain or quantized weight."""
    if isinstance(w, KernelWeights):
        return (w.k, w.n)
    return tuple(w.shape)


def linear(x: jax.Array, w, bias=None) -> jax.Array:
    """x [..., K] @ w [K, N] (+ bias [N]) -> [..., N] in x.dtype."""
    shape = weight_shape(w)
    if len(shape) != 2 or x.shape[-1] != shape[0]:
        raise ValueError(f"linear: x {x.shape} does not match weight of shape {shape}")
    # a prepared weight (KernelWeights) takes the same route as its QuantizedTensor: float32
    # activations (parity tests, float32 routers) keep the exact float32 product
    if isinstance(w, (QuantizedTensor, KernelWeights)) and x.dtype == jnp.bfloat16:
        y = quant_matmul(x, w).astype(x.dtype)
    else:
        y = jnp.matmul(x, materialize(w, x.dtype), precision=_precision(x.dtype))
    if bias is not None:
        y = y + jnp.asarray(bias).astype(y.dtype)
    return y


def expert_linear(x: jax.Array, w) -> jax.Array:
    """Batched over experts: x [E, T, K], w [E, K, N] -> [E, T, N]."""
    shape = weight_shape(w)
    if len(shape) != 3 or x.ndim != 3 or x.shape[0] != shape[0] or x.shape[-1] != shape[1]:
        raise ValueError(f"expert_linear: x {x.shape} does not match stacked weight {shape}")
    return jnp.einsum("etk,ekn->etn", x, materialize(w, x.dtype), precision=_precision(x.dtype))


def _take_experts(w, idx: jax.Array):
    """w [E, K, N] (array or QuantizedTensor) -> the experts idx [...] as [..., K, N]."""
    if isinstance(w, QuantizedTensor):
        leaves = jax.tree_util.tree_map(lambda a: jnp.take(a, idx, axis=0), w)
        return dataclasses.replace(leaves, shape=tuple(idx.shape) + tuple(w.shape[1:]))
    return jnp.take(w, idx, axis=0)


def gathered_expert_linear(x: jax.Array, w, idx: jax.Array) -> jax.Array:
    """x [T, k, K] with expert ids idx [T, k] into w [E, K, N] -> [T, k, N] (x[t,j] @ w[idx[t,j]])."""
    shape = weight_shape(w)
    if len(shape) != 3 or x.shape[-1] != shape[1] or x.shape[:-1] != idx.shape:
        raise ValueError(f"gathered_expert_linear: x {x.shape}, idx {idx.shape}, weight {shape}")
    wk = materialize(_take_experts(w, idx), x.dtype)           # [T, k, K, N]
    return jnp.einsum("tjk,tjkn->tjn", x, wk, precision=_precision(x.dtype))


def grouped_expert_linear(x_sorted: jax.Array, w, group_sizes: jax.Array) -> jax.Array:
    """Rows sorted by expert: x_sorted [T*k, K], w [E, K, N] (array or QuantizedTensor, or a list of
    E per-expert weights [K, N] with their own bit widths), group_sizes [E] -> [T*k, N] in x.dtype.

    Row r belongs to the expert whose segment (exclusive cumsum of group_sizes) contains it; rows past
    sum(group_sizes) give 0. Runs `pallas_kernels.grouped_matmul.api.grouped_matmul`.
    """
    return grouped_matmul(x_sorted, w, group_sizes)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias); kernel [in_features, out_features]."""

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool = False,
                 dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        self.in_features, self.out_features = in_features, out_features
        if rngs is not None:
            init = jax.random.normal(rngs.params(), (in_features, out_features), dtype) * 0.02
        else:
            init = jnp.zeros((in_features, out_features), dtype)
        self.kernel = nnx.Param(init)
        self.bias = nnx.Param(jnp.zeros((out_features,), dtype)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        bias = None if self.bias is None else self.bias.get_value()
        return linear(x, self.kernel.get_value(), bias)
