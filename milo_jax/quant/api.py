"""`quantize_tensor`: the public entry for quantizing one (stacked) weight tensor."""

from __future__ import annotations

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


@jax.jit
def _value_checks(w):
    w32 = w.astype(jnp.float32)
    return jnp.all(jnp.isfinite(w32))


def _pick_store_dtype(w, bits: int, g: int):
    """float16 (more mantissa for the zero point) unless the min-max scales leave its normal range."""
    k, n = w.shape[-2:]
    wg = w.astype(jnp.float32).reshape(-1, k // g, g, n)
    s, _ = jax.jit(jax.vmap(lambda x: hqq.minmax_params(x, bits)))(wg)
    lo, hi = float(s.min()), float(s.max())
    return jnp.dtype(jnp.float16 if (hi <= _FP16_MAX / 4 and lo >= _FP16_MIN_NORMAL) else jnp.bfloat16)


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
    if not bool(_value_checks(w)):
        raise ValueError(f"weight of shape {tuple(w.shape)} contains NaN or Inf values")
    store = jnp.dtype(scale_dtype) if scale_dtype is not None else _pick_store_dtype(w, bits, g)
    if store.itemsize != 2 or not jnp.issubdtype(store, jnp.floating):
        raise ValueError(f"scale_dtype must be a 16-bit float (float16 or bfloat16), got {store}")
    codes, scales, zeros = hqq.quantize_stacked(w, bits=bits, group_size=g, method=method,
                                                store_dtype=store, kappa=kappa, iters=iters)
    k = w.shape[-2]
    slab = packing.default_slab(k, bits) if slab is None else slab
    return QuantizedTensor(
        codes=_pack_jit(codes, bits, slab), scales=scales, zeros=zeros,
        bits=bits, group_size=g, shape=tuple(w.shape), slab=slab, dtype=jnp.dtype(w.dtype).name)


def _pack_jit(codes, bits, slab):
    return jax.jit(packing.pack, static_argnums=(1, 2))(codes, bits, slab)


def dequantization_error(w, qt: QuantizedTensor) -> float:
    """Mean |W - W_hat| in float32."""
    return float(jnp.mean(jnp.abs(jnp.asarray(w, jnp.float32) - qt.dequantize(jnp.float32))))


__all__ = ["quantize_tensor", "validate_weight", "dequantization_error", "SUPPORTED_BITS",
           "SUPPORTED_GROUP_SIZES", "METHODS"]
