"""Plain-jnp reference for the grouped (MoE) matmul: the definition of correct.

Rows of x are sorted by expert: rows offsets[e] .. offsets[e] + group_sizes[e] belong to expert e
(offsets = exclusive cumsum of group_sizes); rows past sum(group_sizes) give 0.

    y[r] = x[r] @ W_hat[e(r)]  (+ (x[r] @ u[e(r)]) @ v[e(r)])

Weights (see `expert_stack`): a stacked array [E, K, N], a QuantizedTensor with lead shape (E,),
or a list / tuple of E per-expert weights [K, N] (arrays or QuantizedTensors, each with its own
bits, group size and compensator rank: mixed precision per expert).

Numerics follow pallas_kernels.quant_matmul.reference: for non-float32 x the weight is
dequantized to bf16 and the dot accumulates in float32, x @ u is rounded to bf16 before @ v, and
the result is returned in x.dtype. float32 x runs in float32 with Precision.HIGHEST (parity tests).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from milo_jax.quant.compensator import materialize_factor
from milo_jax.quant.tensor import QuantizedTensor


def compute_dtype(x_dtype):
    """float32 stays float32 (parity tests); anything else runs bf16 operands, f32 accumulation."""
    return jnp.float32 if jnp.dtype(x_dtype) == jnp.float32 else jnp.bfloat16


def _precision(dtype):
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def is_expert_list(w) -> bool:
    return isinstance(w, (list, tuple))


def expert_shape(w) -> tuple:
    """(E, K, N) of any accepted weight form; ValueError if the experts disagree on K or N."""
    if is_expert_list(w):
        if not w:
            raise ValueError("grouped_matmul: empty list of expert weights")
        shapes = [tuple(e.shape) for e in w]
        bad = [i for i, s in enumerate(shapes) if len(s) != 2 or s != shapes[0]]
        if bad:
            raise ValueError(f"grouped_matmul: per-expert weights must all be 2-D of one shape [K, N]; "
                             f"expert {bad[0]} has {shapes[bad[0]]}, expert 0 has {shapes[0]}")
        return (len(w),) + shapes[0]
    shape = tuple(w.shape)
    if len(shape) != 3:
        raise ValueError(f"grouped_matmul: stacked expert weight must be [E, K, N], got shape {shape}")
    return shape


def _dequant_one(w, dtype):
    if isinstance(w, QuantizedTensor):
        return w.dequantize(dtype, compensator=False)
    return jnp.asarray(w).astype(dtype)


def expert_stack(w, dtype):
    """-> (W_hat [E, K, N] in dtype without compensator, u [E, K, R] | None, v [E, R, N] | None).

    Per-expert compensators of different ranks (list form) are zero-padded to the largest rank;
    experts without one get zero factors (they add exactly 0).
    """
    e, k, n = expert_shape(w)
    if hasattr(w, "classes"):   # GroupedKernelWeights (kernel layout): dequantize from it
        from pallas_kernels.grouped_matmul.mgpu_sm90 import dequantize_grouped
        dense, u, v = dequantize_grouped(w)
        return dense.astype(dtype), (None if u is None else u.astype(dtype)), (None if v is None else v.astype(dtype))
    if not is_expert_list(w):
        if isinstance(w, QuantizedTensor) and w.u is not None:
            return (w.dequantize(dtype, compensator=False), materialize_factor(w.u, dtype),
                    materialize_factor(w.v, dtype))
        return _dequant_one(w, dtype), None, None
    dense = jnp.stack([_dequant_one(we, dtype) for we in w])
    ranks = [we.rank if isinstance(we, QuantizedTensor) else 0 for we in w]
    r = max(ranks)
    if r == 0:
        return dense, None, None
    us, vs = [], []
    for we, re in zip(w, ranks):
        if re == 0:
            us.append(jnp.zeros((k, r), dtype))
            vs.append(jnp.zeros((r, n), dtype))
        else:
            us.append(jnp.pad(materialize_factor(we.u, dtype), ((0, 0), (0, r - re))))
            vs.append(jnp.pad(materialize_factor(we.v, dtype), ((0, r - re), (0, 0))))
    return dense, jnp.stack(us), jnp.stack(vs)


def check_args(x, w, group_sizes):
    e, k, n = expert_shape(w)
    if x.ndim != 2 or x.shape[1] != k:
        raise ValueError(f"grouped_matmul: x {tuple(x.shape)} must be [M, K] with K={k} of the weights [E={e}, K, N={n}]")
    if group_sizes.shape != (e,):
        raise ValueError(f"grouped_matmul: group_sizes {tuple(group_sizes.shape)} must be [E={e}]")
    if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"grouped_matmul: group_sizes dtype {group_sizes.dtype} is not an integer type")
    return e, k, n


def grouped_matmul_reference(x: jax.Array, w, group_sizes: jax.Array) -> jax.Array:
    """x [M, K] sorted by expert @ each row's expert weight -> [M, N] in x.dtype (jax.lax.ragged_dot).

    Dequantizes every expert (reads all weights): a reference, not a decode path.
    """
    check_args(x, w, group_sizes)
    dt = compute_dtype(x.dtype)
    prec = _precision(dt)
    gs = group_sizes.astype(jnp.int32)
    xc = x.astype(dt)
    dense, u, v = expert_stack(w, dt)
    y = jax.lax.ragged_dot(xc, dense, gs, precision=prec, preferred_element_type=jnp.float32)
    if u is not None:
        xu = jax.lax.ragged_dot(xc, u, gs, precision=prec, preferred_element_type=jnp.float32)
        y = y + jax.lax.ragged_dot(xu.astype(dt), v, gs, precision=prec, preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


def grouped_matmul_masked(x: jax.Array, w, group_sizes: jax.Array) -> jax.Array:
    """Same result as `grouped_matmul_reference` without ragged_dot: every expert on every row, each
    row keeping its own expert's product (E times the FLOPs; a cross-check and a fallback)."""
    e, _, n = check_args(x, w, group_sizes)
    dt = compute_dtype(x.dtype)
    prec = _precision(dt)
    xc = x.astype(dt)
    row_expert = row_expert_ids(group_sizes, x.shape[0])          # [M], E for rows past the end
    dense, u, v = expert_stack(w, dt)
    y = jnp.zeros((x.shape[0], n), jnp.float32)
    for i in range(e):   # static and small; a reference only
        yi = jnp.dot(xc, dense[i], precision=prec, preferred_element_type=jnp.float32)
        if u is not None:
            xu = jnp.dot(xc, u[i], precision=prec, preferred_element_type=jnp.float32)
            yi = yi + jnp.dot(xu.astype(dt), v[i], precision=prec, preferred_element_type=jnp.float32)
        y = jnp.where((row_expert == i)[:, None], yi, y)
    return y.astype(x.dtype)


def row_expert_ids(group_sizes: jax.Array, m: int) -> jax.Array:
    """[M] int32: the expert of each sorted row (E for rows past sum(group_sizes))."""
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    return jnp.searchsorted(ends, jnp.arange(m, dtype=jnp.int32), side="right").astype(jnp.int32)
