"""`quantize_tensor`: the public entry for quantizing one (stacked) weight tensor."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from milo_jax.quant import hqq, packing
from milo_jax.quant.tensor import QuantizedTensor

SUPPORTED_BITS = packing.SUPPORTED_BITS
SUPPORTED_GROUP_SIZES = (32, 64, 128)
METHODS = ("rtn", "hqq")
_FP16_MAX = 65504.0
_FP16_MIN_NORMAL = 2.0 ** -14


def resolve_group_size(k: int, group_size) -> int:
    """`None`, -1 or K mean one group per column (per-channel)."""
    if group_size is None or group_size == -1:
        return k
    return int(group_size)


def validate_weight(w, bits: int, group_size, method: str = "hqq") -> int:
    """Check everything about W that can be checked without reading its values; return group size."""
    shape = tuple(getattr(w, "shape", ()))
    where = f"weight of shape {shape}"
    if len(shape) < 2:
        raise ValueError(f"{where}: expected at least 2 dims [..., K, N]")
    dt = jnp.dtype(w.dtype)
    if not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(f"{where}: dtype {dt} is not a floating-point type; pass the float weights")
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"{where}: unsupported bit width {bits}; supported: {SUPPORTED_BITS}")
    if method not in METHODS:
        raise ValueError(f"{where}: unknown method {method!r}; expected one of {METHODS}")
    k = shape[-2]
    g = resolve_group_size(k, group_size)
    if g != k and g not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"{where}: unsupported group size {group_size}; supported: "
                         f"{SUPPORTED_GROUP_SIZES} or K={k} (per channel, also None)")
    if k % g:
        raise ValueError(f"{where}: K={k} is not divisible by the group size {g}")
    try:
        packing.check_packable(k, bits)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return g


@functools.partial(jax.jit, static_argnames=("bits", "group_size"))
def _inspect(w, *, bits, group_size):
    """One pass over W: are all values finite, and the range of the min-max scales."""
    k, n = w.shape[-2:]
    wg = w.reshape(-1, k // group_size, group_size, n).astype(jnp.float32)
    s, _ = jax.vmap(lambda x: hqq.minmax_params(x, bits))(wg)
    return jnp.all(jnp.isfinite(w)), s.min(), s.max()


def _store_dtype_for(s_min: float, s_max: float):
    """float16 (more mantissa for the zero point) unless the scales leave its normal range."""
    fits = s_max <= _FP16_MAX / 4 and s_min >= _FP16_MIN_NORMAL
    return jnp.dtype(jnp.float16 if fits else jnp.bfloat16)


def quantize_tensor(w, *, bits: int = 3, group_size=64, method: str = "hqq",
                    scale_dtype=None, slab: int | None = None, kappa: float = 1.01,
                    iters: int = 20) -> QuantizedTensor:
    """Quantize W [..., K, N] (y = x @ W; leading axes are stacked experts) to a QuantizedTensor.

    bits: 2, 3, 4 or 8. group_size: 32, 64, 128, or None / -1 / K for per-channel.
    method: "rtn" (min-max round to nearest) or "hqq" (half-quadratic zero-point solver).
    scale_dtype: storage of scales and zeros (16-bit); default float16, or bfloat16 when the
    scales fall outside float16's normal range.
    """
    g = validate_weight(w, bits, group_size, method)
    w = jnp.asarray(w)
    finite, s_min, s_max = jax.device_get(_inspect(w, bits=bits, group_size=g))
    if not finite:
        raise ValueError(f"weight of shape {tuple(w.shape)} contains NaN or Inf values")
    store = jnp.dtype(scale_dtype) if scale_dtype is not None else _store_dtype_for(s_min, s_max)
    if store.itemsize != 2 or not jnp.issubdtype(store, jnp.floating):
        raise ValueError(f"scale_dtype must be a 16-bit float (float16 or bfloat16), got {store}")
    k = w.shape[-2]
    slab = packing.default_slab(k, bits) if slab is None else slab
    packing.check_packable(k, bits, slab)
    codes, scales, zeros = _quantize_packed(w, bits=bits, group_size=g, method=method,
                                            store_dtype=store, slab=slab, kappa=kappa, iters=iters)
    return QuantizedTensor(
        codes=codes, scales=scales, zeros=zeros,
        bits=bits, group_size=g, shape=tuple(w.shape), slab=slab, dtype=jnp.dtype(w.dtype).name)


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "method", "store_dtype", "slab",
                                             "kappa", "iters"))
def _quantize_packed(w, *, bits, group_size, method, store_dtype, slab, kappa, iters):
    """Quantize and pack in one program, so unpacked codes never reach device memory."""
    codes, scales, zeros = hqq.quantize_stacked(w, bits=bits, group_size=group_size, method=method,
                                                store_dtype=store_dtype, kappa=kappa, iters=iters)
    return packing.pack(codes, bits, slab), scales, zeros


def dequantization_error(w, qt: QuantizedTensor) -> float:
    """Mean |W - W_hat| in float32."""
    return float(jnp.mean(jnp.abs(jnp.asarray(w, jnp.float32) - qt.dequantize(jnp.float32))))


__all__ = ["quantize_tensor", "validate_weight", "dequantization_error", "SUPPORTED_BITS",
           "SUPPORTED_GROUP_SIZES", "METHODS"]
