"""Plain-jnp reference for y = x @ deq(Q) + (x @ U) @ V: dequantize, then dot with f32 accumulation.

Runs anywhere (CPU, any GPU); `api.matmul` uses it where the Mosaic GPU kernel does not apply.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from milo_jax.quant.tensor import QuantizedTensor


def matmul_reference(x: jax.Array, qt: QuantizedTensor, *, out_dtype=jnp.bfloat16) -> jax.Array:
    """x [..., M, K] (bf16) @ W_hat [K, N] (+ (x @ u) @ v) -> [..., M, N] in `out_dtype`.

    The weight is dequantized to bf16 (as the kernel's tensor-core operand is) and both dots
    accumulate in float32; x @ u is rounded to bf16 before @ v, as in the kernel's epilogue.
    """
    if qt.ndim != 2:
        raise ValueError(f"matmul_reference: expected a 2-D QuantizedTensor [K, N], got shape {qt.shape}")
    if x.shape[-1] != qt.k:
        raise ValueError(f"matmul_reference: x {tuple(x.shape)} does not match K={qt.k} of weight {qt.shape}")
    xb = x.astype(jnp.bfloat16)
    w = qt.dequantize(jnp.bfloat16, compensator=False)
    y = jnp.dot(xb, w, preferred_element_type=jnp.float32)
    if qt.u is not None:
        xu = jnp.dot(xb, qt.u.astype(jnp.bfloat16), preferred_element_type=jnp.float32)
        y = y + jnp.dot(xu.astype(jnp.bfloat16), qt.v.astype(jnp.bfloat16),
                        preferred_element_type=jnp.float32)
    return y.astype(out_dtype)
