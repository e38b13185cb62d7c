"""`QuantizedTensor`: a group-quantized weight W [..., K, N] (y = x @ W) as a JAX pytree.

Leaves (arrays): `codes` packed uint32 along K, `scales` and `zeros` (16-bit, one per group of
`group_size` consecutive K rows and per column), and optional low-rank compensator factors `u`
[..., K, r] and `v` [..., r, N]. Leading axes are stacked experts.
Static metadata (pytree aux data, never traced): bits, group_size, logical shape, layout, slab.

The represented weight is  W_hat = scales * (codes - zeros)  (+ u @ v when a compensator is present).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from milo_jax.quant import packing


@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
    codes: jax.Array                 # [..., K * bits // 32, N] uint32, packed along K
    scales: jax.Array                # [..., K // group_size, N] float16 / bfloat16
    zeros: jax.Array                 # [..., K // group_size, N] same dtype as scales (float zero point)
    u: Optional[jax.Array] = None    # [..., K, r] compensator factor (or None)
    v: Optional[jax.Array] = None    # [..., r, N] compensator factor (or None)
    # --- static metadata ---
    bits: int = dataclasses.field(default=3, metadata=dict(static=True))
    group_size: int = dataclasses.field(default=64, metadata=dict(static=True))
    shape: tuple = dataclasses.field(default=(), metadata=dict(static=True))   # logical [..., K, N]
    layout: str = dataclasses.field(default="planar", metadata=dict(static=True))
    slab: int = dataclasses.field(default=32, metadata=dict(static=True))
    dtype: str = dataclasses.field(default="bfloat16", metadata=dict(static=True))  # of the source W

    # ---- derived shape facts ----
    @property
    def k(self) -> int:
        return self.shape[-2]

    @property
    def n(self) -> int:
        return self.shape[-1]

    @property
    def lead_shape(self) -> tuple:
        return tuple(self.shape[:-2])

    @property
    def num_groups(self) -> int:
        return self.k // self.group_size

    @property
    def rank(self) -> int:
        return 0 if self.u is None else int(self.u.shape[-1])

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    # ---- values ----
    def unpacked_codes(self) -> jax.Array:
        """Codes [..., K, N] as uint32 in [0, 2**bits)."""
        return packing.unpack(self.codes, self.bits, self.k, self.slab)

    def dequantize(self, dtype=None, *, compensator: bool = True) -> jax.Array:
        """W_hat [..., K, N] in `dtype` (default: the source dtype); float32 math inside."""
        q = self.unpacked_codes().astype(jnp.float32)
        g = self.group_size
        lead = self.lead_shape
        q = q.reshape(*lead, self.num_groups, g, self.n)
        s = self.scales.astype(jnp.float32)[..., :, None, :]
        z = self.zeros.astype(jnp.float32)[..., :, None, :]
        w = (s * (q - z)).reshape(self.shape)
        if compensator and self.u is not None:
            # u / v may be arrays, quantized or ragged factors (milo_jax.quant.compensator)
            from milo_jax.quant.compensator import low_rank_product
            w = w + low_rank_product(self.u, self.v)
        return w.astype(jnp.dtype(dtype or self.dtype))

    # ---- memory accounting ----
    @property
    def nbytes(self) -> int:
        """Bytes of every leaf: codes, scales, zeros and compensator factors."""
        return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
                   for x in jax.tree_util.tree_leaves(self))

    @property
    def bits_per_weight(self) -> float:
        """8 * nbytes / number of logical weights: codes, scales, zeros and compensator included."""
        return 8.0 * self.nbytes / self.size

    def __repr__(self) -> str:
        comp = f", rank={self.rank}" if self.u is not None else ""
        return (f"QuantizedTensor(shape={self.shape}, bits={self.bits}, group_size={self.group_size}"
                f"{comp}, bits_per_weight={self.bits_per_weight:.3f})")


def _register():
    fields = dataclasses.fields(QuantizedTensor)
    data = [f.name for f in fields if not f.metadata.get("static")]
    meta = [f.name for f in fields if f.metadata.get("static")]
    jax.tree_util.register_dataclass(QuantizedTensor, data_fields=data, meta_fields=meta)


_register()
