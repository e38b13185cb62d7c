"""Kernel-side weight layout "planar_nmajor" and the one-time repacking from a QuantizedTensor.

Why a second layout: the Mosaic GPU kernel computes y^T = W_hat^T x^T with the dequantized
weight tile as the wgmma A operand [BN, BK] (N rows, K contiguous), the structure that lowered
and ran in the design probe (shared/design/mgpu_gemv_probe.md). With codes stored K-major
([KW, N], the default "planar" layout) the unpacked slab would come out as [slab, BN] and need
a transposed A operand plus a row-broadcast of the per-column scales, neither of which the probe
showed working. So the kernel wants the *same planar packing along K*, transposed to N-major
rows, and a slab it can swizzle (16 or 32 codes = 32 or 64 bytes of bf16):

  codes  [N, Kp * bits // 32] uint32   row n = column n of W; word w of planar tile t, slot j,
                                       holds k = t * per * slab + j * slab + w (3-bit: 3 planes)
  scales [Gp, N], zeros [Gp, N]        unchanged format (16-bit, group-major), zero-padded to Kp
  u      [K, r]                        unchanged (x @ u runs as a small XLA dot)
  v_t    [N, Rp] bf16                  v transposed and zero-padded to Rp in {64, 128}

K is padded to Kp, a multiple of one planar tile (per * slab rows); padded rows have code 0,
scale 0 and zero 0, and x is zero-padded to match, so they contribute exactly 0.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from milo_jax.quant import packing
from milo_jax.quant.tensor import QuantizedTensor

LAYOUT = "planar_nmajor"
MAX_RANK = 128


def kernel_slab(bits: int) -> int:
    """Slab the kernel repacks to: 16 for 3-bit (a 512-row tile), 32 otherwise."""
    return 16 if bits == 3 else 32


@dataclasses.dataclass(frozen=True)
class KernelWeights:
    codes: jax.Array                 # [N, Kp * bits // 32] uint32 (planar along K, N-major rows)
    scales: jax.Array                # [Gp, N] 16-bit
    zeros: jax.Array                 # [Gp, N] 16-bit
    u: Optional[jax.Array] = None    # [K, r]
    v_t: Optional[jax.Array] = None  # [N, Rp] bf16
    bits: int = dataclasses.field(default=3, metadata=dict(static=True))
    group_size: int = dataclasses.field(default=64, metadata=dict(static=True))   # as in the source
    k: int = dataclasses.field(default=0, metadata=dict(static=True))             # logical K
    n: int = dataclasses.field(default=0, metadata=dict(static=True))
    k_pad: int = dataclasses.field(default=0, metadata=dict(static=True))
    slab: int = dataclasses.field(default=32, metadata=dict(static=True))
    layout: str = dataclasses.field(default=LAYOUT, metadata=dict(static=True))

    @property
    def rank(self) -> int:
        return 0 if self.u is None else int(self.u.shape[-1])

    @property
    def group_rows(self) -> int:
        """Rows per scale row in the padded layout (K_pad for per-channel)."""
        return self.k_pad if self.group_size >= self.k else self.group_size

    @property
    def tile_rows(self) -> int:
        return packing.slots_per_tile(self.bits) * self.slab

    @property
    def nbytes_per_call(self) -> int:
        """Bytes of weight data one matmul must read (codes, scales, zeros, u, v)."""
        leaves = [self.codes, self.scales, self.zeros] + ([self.u, self.v_t] if self.u is not None else [])
        return sum(a.size * a.dtype.itemsize for a in leaves)


def _register():
    fields = dataclasses.fields(KernelWeights)
    data = [f.name for f in fields if not f.metadata.get("static")]
    meta = [f.name for f in fields if f.metadata.get("static")]
    jax.tree_util.register_dataclass(KernelWeights, data_fields=data, meta_fields=meta)


_register()


def prepare(qt: QuantizedTensor, slab: int | None = None) -> KernelWeights:
    """Repack a 2-D planar QuantizedTensor [K, N] into the kernel layout (run once, at load time)."""
    if isinstance(qt, KernelWeights):
        return qt
    if qt.ndim != 2:
        raise ValueError(f"quant_matmul.prepare: expected a 2-D QuantizedTensor [K, N], got shape {qt.shape}")
    if qt.layout != "planar":
        raise ValueError(f"quant_matmul.prepare: layout {qt.layout!r} is not supported (need 'planar')")
    if qt.bits not in packing.SUPPORTED_BITS:
        raise ValueError(f"quant_matmul.prepare: bits={qt.bits} not in {packing.SUPPORTED_BITS}")
    k, n = qt.shape
    if n % 64:
        raise ValueError(f"quant_matmul.prepare: N={n} must be a multiple of 64 (kernel column tile)")
    if qt.u is not None and qt.rank > MAX_RANK:
        raise ValueError(f"quant_matmul.prepare: compensator rank {qt.rank} > {MAX_RANK}")
    per_channel = qt.group_size >= k
    if not per_channel and qt.group_size not in (32, 64, 128, 256, 512):
        raise ValueError(f"quant_matmul.prepare: group_size {qt.group_size} unsupported (32..512 or per-channel)")
    slab = slab or kernel_slab(qt.bits)
    tile = packing.slots_per_tile(qt.bits) * slab
    k_pad = -(-k // tile) * tile
    if not per_channel and tile % qt.group_size:
        raise ValueError(f"quant_matmul.prepare: tile of {tile} rows is not a multiple of group {qt.group_size}")
    codes = qt.unpacked_codes()                                   # [K, N] uint32
    scales, zeros = qt.scales, qt.zeros
    if k_pad != k:
        codes = jnp.pad(codes, ((0, k_pad - k), (0, 0)))
        if not per_channel:
            extra = (k_pad - k) // qt.group_size
            scales = jnp.pad(scales, ((0, extra), (0, 0)))
            zeros = jnp.pad(zeros, ((0, extra), (0, 0)))
    words = packing.pack(codes, qt.bits, slab)                    # [Kp*bits/32, N]
    u = v_t = None
    if qt.u is not None:
        r = qt.rank
        rp = 64 if r <= 64 else 128
        u = qt.u
        v_t = jnp.pad(qt.v.astype(jnp.bfloat16).T, ((0, 0), (0, rp - r)))
    return KernelWeights(codes=jnp.asarray(words.T), scales=scales, zeros=zeros, u=u, v_t=v_t,
                         bits=qt.bits, group_size=qt.group_size, k=k, n=n, k_pad=k_pad, slab=slab)
