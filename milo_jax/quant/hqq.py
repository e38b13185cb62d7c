"""Asymmetric group quantization: RTN (min-max) and HQQ (half-quadratic zero-point solver).

One weight matrix W [K, N] (y = x @ W) is cut into groups of `g` consecutive K rows per column:
Wg [G, g, N] with G = K // g. Per group, scale s and float zero point z give
    q = clamp(round(W / s + z), 0, 2**bits - 1),   W_hat = s * (q - z).

HQQ (Badri & Shaji 2023; ALGORITHMS.md section 1): s stays min-max, z minimises ||W - W_hat||_p^p
(p = 0.7) by half-quadratic splitting:
    W_e = shrink_p(W - W_hat(z), beta)        # sign(x) * relu(|x| - |x|^(p-1) / beta)
    z   = mean_over_group(q - (W - W_e) / s)
    beta *= kappa
Beta schedule implemented: beta_{i+1} = kappa * beta_i with beta0 = 10, kappa = 1.01 (the paper's,
older hqq's and torchao's; hqq >= 0.2.7 keeps beta fixed, which is kappa = 1.0 here).
Early stop: each iterate's whole-matrix mean |W - W_hat| is measured; the loop ends at the first
iterate that does not improve on the best so far (or after `iters` updates). Best kept: every group keeps the zero point with its
lowest error over all iterates. Groups are independent, so this is never worse than keeping the
matrix-level best iterate.

Everything is float32, jit-compiled and vmapped over stacked experts (leading axes).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# Groups whose (max - min) is below this fraction of their largest magnitude are treated as constant:
# it keeps z = -min / s inside the range of a 16-bit zero point.
_RANGE_FLOOR = 2.0 ** -8


def _grouped(w: jax.Array, g: int) -> jax.Array:
    k, n = w.shape
    return w.reshape(k // g, g, n)


def minmax_params(wg: jax.Array, bits: int) -> tuple[jax.Array, jax.Array]:
    """Min-max scale and zero for grouped W [G, g, N] -> s, z [G, 1, N] (float32)."""
    qmax = 2.0 ** bits - 1
    lo = wg.min(axis=1, keepdims=True)
    hi = wg.max(axis=1, keepdims=True)
    big = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
    s = jnp.maximum(hi - lo, big * _RANGE_FLOOR) / qmax
    s = jnp.where(s > 0, s, 1.0)  # an all-zero group: any s works, q = z = 0
    z = -lo / s
    return s, z


def _codes(wg, inv_s, z, bits):
    return jnp.clip(jnp.round(wg * inv_s + z), 0, 2 ** bits - 1)


def _shrink_lp(x: jax.Array, beta, p: float) -> jax.Array:
    """Proximal operator of |x|^p (generalised soft threshold)."""
    ax = jnp.abs(x)
    # |x|^(p-1) diverges at 0; such entries are shrunk to 0 anyway (relu of a negative number).
    pw = jnp.where(ax > 0, ax, 1.0) ** (p - 1.0)
    return jnp.sign(x) * jax.nn.relu(ax - pw / beta)


def hqq_zero(wg, s, z0, bits: int, *, p: float = 0.7, beta0: float = 10.0, kappa: float = 1.01,
             iters: int = 20):
    """HQQ zero-point solve for one grouped matrix wg [G, g, N] (any float dtype; math in float32).

    Returns (best z [G, 1, N], number of iterates evaluated). One loop step is one pass over W:
    the codes of the current z give both its error (for early stopping and best-keeping) and the
    half-quadratic update to the next z, so XLA fuses each step into a single multi-output reduction.
    """
    inv_s = 1.0 / s

    def cond(c):
        i, _, _, _, _, _, improved = c
        return (i <= iters) & improved

    def body(c):
        i, z, beta, best_z, best_gerr, best_err, _ = c
        w = wg.astype(jnp.float32)
        q = _codes(w, inv_s, z, bits)
        x = w - s * (q - z)                                   # W - W_hat(z)
        gerr = jnp.abs(x).mean(axis=1, keepdims=True)         # error of the current iterate
        w_e = _shrink_lp(x, beta, p)
        z_next = jnp.mean(q - (w - w_e) * inv_s, axis=1, keepdims=True)
        better = gerr < best_gerr
        best_z = jnp.where(better, z, best_z)
        best_gerr = jnp.where(better, gerr, best_gerr)
        err = gerr.mean()
        return i + 1, z_next, beta * kappa, best_z, best_gerr, jnp.minimum(err, best_err), err < best_err

    inf = jnp.full_like(z0, jnp.inf)
    init = (jnp.int32(0), z0, jnp.float32(beta0), z0, inf, jnp.float32(jnp.inf), jnp.bool_(True))
    i, _, _, best_z, _, _, _ = jax.lax.while_loop(cond, body, init)
    return best_z, i


def quantize_matrix(w: jax.Array, *, bits: int, group_size: int, method: str, store_dtype,
                    p: float = 0.7, beta0: float = 10.0, kappa: float = 1.01, iters: int = 20):
    """One matrix W [K, N] -> codes [K, N] (uint32), scales, zeros [K//g, N] in `store_dtype`.

    W stays in its own dtype in memory (bf16 weights are read as bf16, converted to float32 in
    registers), which halves the bytes each solver pass reads. The codes are recomputed from the
    stored (16-bit rounded) scale and zero so that dequantization reproduces exactly what the
    solver optimised, up to that rounding.
    """
    wg = _grouped(w, group_size)
    s, z = minmax_params(wg.astype(jnp.float32), bits)
    if method == "hqq":
        z, _ = hqq_zero(wg, s, z, bits, p=p, beta0=beta0, kappa=kappa, iters=iters)
    elif method != "rtn":
        raise ValueError(f"unknown method {method!r}; expected 'rtn' or 'hqq'")
    s16 = s.astype(store_dtype)
    z16 = z.astype(store_dtype)
    s32 = s16.astype(jnp.float32)
    q = jnp.clip(jnp.round(wg.astype(jnp.float32) / s32 + z16.astype(jnp.float32)), 0, 2 ** bits - 1)
    return q.astype(jnp.uint32).reshape(w.shape), s16[:, 0, :], z16[:, 0, :]


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "method", "store_dtype", "p",
                                             "beta0", "kappa", "iters"))
def quantize_stacked(w: jax.Array, *, bits: int, group_size: int, method: str, store_dtype,
                     p: float = 0.7, beta0: float = 10.0, kappa: float = 1.01, iters: int = 20):
    """W [..., K, N] -> (codes [..., K, N], scales, zeros [..., K//g, N]); vmapped over leading axes."""
    f = functools.partial(quantize_matrix, bits=bits, group_size=group_size, method=method,
                          store_dtype=store_dtype, p=p, beta0=beta0, kappa=kappa, iters=iters)
    for _ in range(w.ndim - 2):
        f = jax.vmap(f)
    return f(w)
