"""Storage of MiLo's low-rank compensator factors U [..., K, r] and V [..., r, N].

A QuantizedTensor's `u` / `v` leaves may hold any of:

* a plain array (float32 / bfloat16 / float16): the factor itself;
* `QuantizedFactor`: a symmetric int8 or int4 group-quantized factor with its own 16-bit scales;
* `RaggedFactor`: the factors of experts with DIFFERENT ranks, concatenated along the rank axis
  (U_cat [K, sum r_e], V_cat [sum r_e, N]; the data either a plain array or a QuantizedFactor).
  Only real rank columns are stored: no zero padding ever reaches memory, so `nbytes` (the sum of
  the leaves' bytes) is exactly what the compensator costs. The per-expert ranks are static
  metadata. The price: the factor has no leading expert axis, so code that slices experts out of a
  QuantizedTensor leaf by leaf (tree_map over axis 0) must materialise it first
  (`RaggedFactor.padded()` gives [..., K, r_max] with zero columns).

`low_rank_product(u, v)` -> U V [..., K, N] float32 handles every combination;
`QuantizedTensor.dequantize` uses it.

Quantized factors: groups of `group_size` consecutive elements along the factor's LONG axis (K for
U, N for V), one scale per group and rank column, symmetric: code = round(x / s) with
s = max|x| / (2^(b-1) - 1), stored offset by 2^(b-1) as unsigned and packed 32 // b codes per uint32
word with milo_jax.quant.packing's planar layout (int8: 4 per word, int4: 8 per word), along the long
axis. V is stored transposed (V^T [..., N, r]) so both factors pack along their long axis.
Cost per factor element: b + 16 / group_size bits (int8 g64: 8.25, int4 g64: 4.25).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np

from milo_jax.quant import packing

FLOAT_DTYPES = ("float32", "bfloat16", "float16")
INT_DTYPES = {"int8": 8, "int4": 4}
COMPENSATOR_DTYPES = FLOAT_DTYPES + tuple(INT_DTYPES)
DEFAULT_FACTOR_GROUP = 64


def _register(cls):
    fields = dataclasses.fields(cls)
    data = [f.name for f in fields if not f.metadata.get("static")]
    meta = [f.name for f in fields if f.metadata.get("static")]
    jax.tree_util.register_dataclass(cls, data_fields=data, meta_fields=meta)
    return cls


def _static(default=None):
    return dataclasses.field(default=default, metadata=dict(static=True))


def _resolve_factor_group(length: int, group_size: int) -> int:
    """The factor group size: `group_size` when it divides the long axis, else one group per column."""
    return group_size if group_size and length % group_size == 0 else length


@_register
@dataclasses.dataclass(frozen=True)
class QuantizedFactor:
    """A symmetric group-quantized factor F [..., rows, cols] (U: rows=K, cols=r; V: rows=r, cols=N).

    Stored along its long axis L (K for U; N for V, i.e. V^T): codes [..., L * bits // 32, c] uint32
    (planar-packed), scales [..., L // group_size, c] 16-bit, c = the rank axis. The leading axes are
    read from the leaves (so slicing experts leaf by leaf keeps it valid).
    """

    codes: jax.Array
    scales: jax.Array
    bits: int = _static(8)
    group_size: int = _static(DEFAULT_FACTOR_GROUP)
    rows: int = _static(0)
    cols: int = _static(0)
    transposed: bool = _static(False)  # True: stored as F^T (the long axis is `cols`)
    slab: int = _static(1)

    @property
    def long_len(self) -> int:
        return self.cols if self.transposed else self.rows

    @property
    def shape(self) -> tuple:
        return tuple(self.codes.shape[:-2]) + (self.rows, self.cols)

    @property
    def dtype(self):
        return jnp.dtype(jnp.float32)

    def materialize(self, dtype=jnp.float32) -> jax.Array:
        """F [..., rows, cols] in `dtype` (float32 math)."""
        lead = tuple(self.codes.shape[:-2])
        c = self.codes.shape[-1]
        g = self.group_size
        q = packing.unpack(self.codes, self.bits, self.long_len, self.slab).astype(jnp.float32)
        q = q - 2.0 ** (self.bits - 1)
        s = self.scales.astype(jnp.float32)
        f = (q.reshape(*lead, self.long_len // g, g, c) * s[..., :, None, :]).reshape(
            *lead, self.long_len, c)
        if self.transposed:
            f = jnp.swapaxes(f, -1, -2)
        return f.astype(dtype)

    def astype(self, dtype):  # so `x.astype(...)` works on any factor kind
        return self.materialize(dtype)


def quantize_factor(f: jax.Array, *, bits: int, group_size: int = DEFAULT_FACTOR_GROUP,
                    transposed: bool = False, scale_dtype=jnp.bfloat16) -> QuantizedFactor:
    """F [..., rows, cols] -> QuantizedFactor (symmetric, groups along the long axis).

    transposed=False: the long axis is rows (U [..., K, r]); True: cols (V [..., r, N]).
    The codes are recomputed from the 16-bit-rounded scales, so materialize() reproduces them.
    """
    if bits not in (4, 8):
        raise ValueError(f"compensator factor of shape {tuple(f.shape)}: unsupported bits {bits}; "
                         "expected 8 (int8) or 4 (int4)")
    rows, cols = f.shape[-2:]
    x = jnp.swapaxes(f, -1, -2) if transposed else f          # [..., L, c]
    lead = tuple(x.shape[:-2])
    length, c = x.shape[-2:]
    try:
        packing.check_packable(length, bits)
    except ValueError as e:
        raise ValueError(f"compensator factor of shape {tuple(f.shape)}: {e}") from None
    g = _resolve_factor_group(length, group_size)
    xg = x.astype(jnp.float32).reshape(*lead, length // g, g, c)
    qmax = 2.0 ** (bits - 1) - 1
    s = (jnp.abs(xg).max(axis=-2) / qmax).astype(scale_dtype)           # [..., G, c]
    s32 = s.astype(jnp.float32)
    inv = jnp.where(s32 > 0, 1.0 / jnp.where(s32 > 0, s32, 1.0), 0.0)
    q = jnp.clip(jnp.round(xg * inv[..., :, None, :]), -qmax, qmax) + 2.0 ** (bits - 1)
    q = q.astype(jnp.uint32).reshape(*lead, length, c)
    slab = packing.default_slab(length, bits)
    return QuantizedFactor(codes=packing.pack(q, bits, slab), scales=s, bits=bits, group_size=g,
                           rows=rows, cols=cols, transposed=transposed, slab=slab)


@_register
@dataclasses.dataclass(frozen=True)
class RaggedFactor:
    """Factors of experts with different ranks, concatenated along the rank axis.

    side "u": data is U_cat [K, R] (R = sum(ranks)), expert e owns columns offsets[e]:offsets[e+1].
    side "v": data is V_cat [R, N], expert e owns those rows. `data` is a plain array or a
    QuantizedFactor of that shape. `ranks` are per expert in row-major order of `lead_shape`.
    """

    data: Any
    ranks: tuple = _static(())
    lead_shape: tuple = _static(())
    side: str = _static("u")
    length: int = _static(0)         # K ('u') or N ('v'): the factor's long axis

    @property
    def max_rank(self) -> int:
        return max(self.ranks) if self.ranks else 0

    @property
    def shape(self) -> tuple:
        """The padded logical shape [..., K, r_max] ('u') or [..., r_max, N] ('v')."""
        tail = (self.length, self.max_rank) if self.side == "u" else (self.max_rank, self.length)
        return tuple(self.lead_shape) + tail

    @property
    def dtype(self):
        return jnp.dtype(jnp.float32) if isinstance(self.data, QuantizedFactor) else self.data.dtype

    def padded(self, dtype=jnp.float32) -> jax.Array:
        """[..., K, r_max] ('u') or [..., r_max, N] ('v') with zero columns / rows past each rank."""
        total = sum(self.ranks)
        if isinstance(self.data, QuantizedFactor):   # codes [L * bits // 32, R] (V stored as V^T)
            stored = self.data.codes
            ok = tuple(stored.shape) == (self.length * self.data.bits // 32, total)
        else:
            stored = self.data
            ok = tuple(stored.shape) == ((self.length, total) if self.side == "u"
                                         else (total, self.length))
        if not ok:
            # e.g. after slicing experts leaf by leaf (tree_map over axis 0): there is no expert axis
            raise ValueError(f"RaggedFactor ({self.side}) data of shape {tuple(stored.shape)} does not "
                             f"hold {total} concatenated rank columns of length {self.length}; a "
                             "ragged compensator has no leading "
                             "expert axis: dequantize the whole QuantizedTensor before selecting experts")
        d = materialize_factor(self.data, jnp.float32)
        r_max = self.max_rank
        offsets = np.concatenate([[0], np.cumsum(self.ranks)]).astype(np.int64)
        # gather index per (expert, slot); slots past an expert's rank read column 0 and are masked
        idx = np.zeros((len(self.ranks), r_max), np.int32)
        mask = np.zeros((len(self.ranks), r_max), bool)
        for e, r in enumerate(self.ranks):
            idx[e, :r] = offsets[e] + np.arange(r)
            mask[e, :r] = True
        if self.side == "u":
            p = jnp.where(jnp.asarray(mask)[:, None, :], jnp.take(d, jnp.asarray(idx), axis=1)
                          .transpose(1, 0, 2), 0.0)                      # [E, K, r_max]
        else:
            p = jnp.where(jnp.asarray(mask)[:, :, None], jnp.take(d, jnp.asarray(idx), axis=0), 0.0)
        return p.reshape(tuple(self.lead_shape) + p.shape[1:]).astype(dtype)

    def astype(self, dtype):
        return self.padded(dtype)


Factor = Union[jax.Array, QuantizedFactor, RaggedFactor]


def materialize_factor(f: Factor, dtype=jnp.float32) -> jax.Array:
    """Any factor kind -> a dense array (a RaggedFactor: zero-padded to its max rank)."""
    if isinstance(f, QuantizedFactor):
        return f.materialize(dtype)
    if isinstance(f, RaggedFactor):
        return f.padded(dtype)
    return jnp.asarray(f).astype(dtype)


def low_rank_product(u: Factor, v: Factor) -> jax.Array:
    """U V [..., K, N] in float32 for any pair of factor kinds (ragged: padded columns are zero)."""
    return jnp.matmul(materialize_factor(u), materialize_factor(v),
                      precision=jax.lax.Precision.HIGHEST)


def factor_nbytes(length: int, rank: int, dtype: str, group_size: int = DEFAULT_FACTOR_GROUP,
                  scale_itemsize: int = 2) -> int:
    """Bytes of one factor with long axis `length` and `rank` columns stored as `dtype`."""
    if dtype in FLOAT_DTYPES:
        return length * rank * jnp.dtype(dtype).itemsize
    if dtype not in INT_DTYPES:
        raise ValueError(f"unknown compensator dtype {dtype!r}; expected one of {COMPENSATOR_DTYPES}")
    bits = INT_DTYPES[dtype]
    g = _resolve_factor_group(length, group_size)
    return length * rank * bits // 8 + (length // g) * rank * scale_itemsize


def compensator_nbytes(k: int, n: int, rank: int, dtype: str,
                       group_size: int = DEFAULT_FACTOR_GROUP) -> int:
    """Bytes of U [K, r] and V [r, N] of one matrix stored as `dtype` (what quantize_lowrank stores)."""
    return factor_nbytes(k, rank, dtype, group_size) + factor_nbytes(n, rank, dtype, group_size)


def store_factors(u: jax.Array, v: jax.Array, ranks, lead_shape: tuple, dtype: str,
                  group_size: int = DEFAULT_FACTOR_GROUP):
    """Padded float factors U [B, K, r_max], V [B, r_max, N] (B = prod(lead_shape)) -> stored (u, v).

    Uniform ranks keep the leading axes ([..., K, r]); mixed ranks become RaggedFactors holding
    only the real columns. dtype: one of COMPENSATOR_DTYPES.
    """
    ranks = tuple(int(r) for r in np.asarray(ranks).reshape(-1))
    if dtype not in COMPENSATOR_DTYPES:
        raise ValueError(f"unknown compensator dtype {dtype!r}; expected one of {COMPENSATOR_DTYPES}")
    k, n = u.shape[-2], v.shape[-1]
    uniform = len(set(ranks)) == 1
    if uniform:
        r = ranks[0]
        uu = u[..., :r].reshape(*lead_shape, k, r)
        vv = v[..., :r, :].reshape(*lead_shape, r, n)
    else:
        uu = jnp.concatenate([u[e, :, :r] for e, r in enumerate(ranks)], axis=-1)     # [K, R]
        vv = jnp.concatenate([v[e, :r, :] for e, r in enumerate(ranks)], axis=0)      # [R, N]
    if dtype in FLOAT_DTYPES:
        su, sv = uu.astype(dtype), vv.astype(dtype)
    else:
        bits = INT_DTYPES[dtype]
        su = quantize_factor(uu, bits=bits, group_size=group_size, transposed=False)
        sv = quantize_factor(vv, bits=bits, group_size=group_size, transposed=True)
    if uniform:
        return su, sv
    return (RaggedFactor(su, ranks=ranks, lead_shape=tuple(lead_shape), side="u", length=k),
            RaggedFactor(sv, ranks=ranks, lead_shape=tuple(lead_shape), side="v", length=n))


__all__ = ["QuantizedFactor", "RaggedFactor", "quantize_factor", "materialize_factor",
           "low_rank_product", "factor_nbytes", "compensator_nbytes", "store_factors",
           "COMPENSATOR_DTYPES", "FLOAT_DTYPES", "INT_DTYPES", "DEFAULT_FACTOR_GROUP"]
