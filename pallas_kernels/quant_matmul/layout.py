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
  v_t    [N, Rp] bf16                  v transposed and zero-padded to Rp in {32, 64, 128}

K is padded to Kp, a multiple of one planar tile (per * slab rows); padded rows have code 0,
scale 0 and zero 0, and x is zero-padded to match, so they contribute exactly 0.

Second kernel layout "planar_pairs" (bits 2, 3 and 4; `prepare(qt, layout=PAIRS_LAYOUT)`): the
same tile of `slots_per_tile(bits) * slab` K rows, but the two codes that form one bf16x2 (or f16x2)
register of the dequantized A tile, rows k and k + 1, sit 16 bits apart in one word. Then
((w >> bits * i) & mask2) | 0x43004300 (mask2 = 0x00070007 at 3 bits, 0x000F000F at 4, 0x00030003
at 2) is two bf16 values 128 + code at once (the "magic number" conversion; 0x64006400 gives f16
1024 + code), about 2 instructions per pair instead of ~5 f32 instructions per code. Per tile:
pair-slot jp covers tile rows [jp * 2 * slab, (jp + 1) * 2 * slab).
- 3 bits (16 pair-slots in three [N, slab] planes): plane p holds pair-slots 5p + i (i < 5) at bits
  3i (row k0) and 16 + 3i (row k0 + 1); pair-slot 15 keeps bit b of its two codes in plane b, bits 15
  and 31 (zero waste, 3.0 bits per code as in "planar").
- 2 and 4 bits (16 // bits pair-slots in one [N, slab] plane): pair-slot i at bits bits * i (row k0)
  and 16 + bits * i (row k0 + 1): each 16-bit half is full, bits per code as in "planar".
Word column w of a pair-slot holds the pair
starting at row k0(w) = 16 (w // 8) + 8 (w % 2) + 2 ((w % 8) // 2): with the u32 slab loaded in
Mosaic's WGMMA register layout (each lane holds words 2l, 2l + 1 of an 8-word column tile), the
two words of a lane become exactly the lane's bf16x2 registers of column tiles 2t and 2t + 1 of
the WGMMA layout of the [BN, 2 * slab] bf16 result, so no data moves between lanes.
8-bit codes stay "planar_nmajor": 0x4300 | code is 128 + code in bf16 only for codes < 128.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from milo_jax.quant import packing
from milo_jax.quant.tensor import QuantizedTensor

LAYOUT = "planar_nmajor"
PAIRS_LAYOUT = "planar_pairs"
LAYOUTS = (LAYOUT, PAIRS_LAYOUT)
MAX_RANK = 128

PAIR_SLOTS = 16          # 3-bit pair-slots per tile (32 slabs = 16 pairs of slabs)
PAIRS_BITS = (2, 3, 4)   # widths that "planar_pairs" (the magic-number unpack) holds


def rank_pad(rank: int) -> int:
    """Columns of v_t (and of x @ u in the kernel) for a compensator of `rank`: 32, 64 or 128, the
    widths whose bf16 rows are a TMA box and a wgmma K. 32 exists so that rank 32 (the common MiLo
    rank) needs no pad of x @ u per call and no zero columns in v_t."""
    if not 0 < rank <= MAX_RANK:
        raise ValueError(f"compensator rank {rank} outside 1..{MAX_RANK}")
    return 32 if rank <= 32 else 64 if rank <= 64 else 128


def pair_slots(bits: int) -> int:
    """Pair-slots (two slabs each) per planar tile of `bits`-bit codes in "planar_pairs"."""
    if bits not in PAIRS_BITS:
        raise ValueError(f"quant_matmul.layout: {PAIRS_LAYOUT!r} holds bits {PAIRS_BITS}, got bits={bits}")
    return PAIR_SLOTS if bits == 3 else 16 // bits


def decode_layout(bits: int) -> str:
    """Kernel layout the decode and dequantize kernels read fastest at this width: "planar_pairs"
    (magic-number unpack) for 2/3/4 bits, "planar_nmajor" (f32 unpack) for 8 bits."""
    return PAIRS_LAYOUT if bits in PAIRS_BITS else LAYOUT


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


def pair_row(w: int) -> int:
    """First K row (within a pair-slot) of the code pair held by word column w ("planar_pairs")."""
    return 16 * (w // 8) + 8 * (w % 2) + 2 * ((w % 8) // 2)


def _pair_rows(slab: int):
    import numpy as np
    if slab % 8:
        raise ValueError(f"quant_matmul.layout: planar_pairs needs a slab that is a multiple of 8, got {slab}")
    return np.array([pair_row(w) for w in range(slab)])


def pack_pairs(codes: jax.Array, slab: int, bits: int = 3) -> jax.Array:
    """Codes [Kp, N] (Kp a multiple of the planar tile) -> "planar_pairs" words
    [Kp * bits // 32, N] uint32 (one tile: 3 planes of slab words at 3 bits, one plane otherwise)."""
    kp, n = codes.shape
    slots = pair_slots(bits)
    tile = 2 * slots * slab
    if kp % tile:
        raise ValueError(f"quant_matmul.layout.pack_pairs: K={kp} is not a multiple of the tile {tile}")
    rows = _pair_rows(slab)
    q = codes.astype(jnp.uint32).reshape(kp // tile, slots, 2 * slab, n)
    lo, hi = q[:, :, rows, :], q[:, :, rows + 1, :]            # [T, slots, slab, N]
    if bits != 3:
        word = jnp.zeros_like(lo[:, 0])
        for i in range(slots):
            word = word | (lo[:, i] << jnp.uint32(bits * i)) | (hi[:, i] << jnp.uint32(16 + bits * i))
        return word.reshape(kp * bits // 32, n)                 # [T, slab, N] -> words
    planes = []
    for p in range(3):
        word = jnp.zeros_like(lo[:, 0])
        for i in range(5):
            j = 5 * p + i
            word = word | (lo[:, j] << jnp.uint32(3 * i)) | (hi[:, j] << jnp.uint32(16 + 3 * i))
        bit = jnp.uint32(p)
        word = word | (((lo[:, 15] >> bit) & 1) << jnp.uint32(15)) | (((hi[:, 15] >> bit) & 1) << jnp.uint32(31))
        planes.append(word)
    return jnp.stack(planes, axis=1).reshape(kp * 3 // 32, n)   # [T, 3, slab, N] -> words


def unpack_pairs(words: jax.Array, slab: int, bits: int = 3) -> jax.Array:
    """Inverse of `pack_pairs`: words [Kp * bits // 32, N] -> codes [Kp, N] uint32."""
    kw_, n = words.shape
    slots = pair_slots(bits)
    wps = 3 if bits == 3 else 1
    t = kw_ // (wps * slab)
    pl_ = words.reshape(t, wps, slab, n)
    mask = jnp.uint32(2**bits - 1)
    lo, hi = [], []
    for j in range(slots):
        if bits != 3:
            w = pl_[:, 0]
            lo.append((w >> jnp.uint32(bits * j)) & mask)
            hi.append((w >> jnp.uint32(16 + bits * j)) & mask)
        elif j < 15:
            w = pl_[:, j // 5]
            sh = 3 * (j % 5)
            lo.append((w >> jnp.uint32(sh)) & 7)
            hi.append((w >> jnp.uint32(16 + sh)) & 7)
        else:
            lo.append(sum(((pl_[:, b] >> jnp.uint32(15)) & 1) << jnp.uint32(b) for b in range(3)))
            hi.append(sum(((pl_[:, b] >> jnp.uint32(31)) & 1) << jnp.uint32(b) for b in range(3)))
    lo, hi = jnp.stack(lo, 1), jnp.stack(hi, 1)                 # [T, slots, slab, N]
    order = _pair_rows(slab)
    inv = jnp.argsort(jnp.asarray(order))                       # word column for pair row 2 * i
    pairs = jnp.stack([lo[:, :, inv], hi[:, :, inv]], axis=3)   # [T, slots, slab (pair i), 2, N]
    return pairs.reshape(t * 2 * slots * slab, n)


def unpack_codes(kw: "KernelWeights") -> jax.Array:
    """Codes [Kp, N] uint32 of prepared weights, in either kernel layout."""
    if kw.layout == PAIRS_LAYOUT:
        return unpack_pairs(kw.codes.T, kw.slab, kw.bits)
    return packing.unpack(kw.codes.T, kw.bits, kw.k_pad, kw.slab)


def prepare(qt: QuantizedTensor, slab: int | None = None, layout: str = LAYOUT) -> KernelWeights:
    """Repack a 2-D planar QuantizedTensor [K, N] into the kernel layout (run once, at load time).

    layout: "planar_nmajor" (every bit width) or "planar_pairs" (bits 2, 3, 4: for the magic-number
    unpack variants of the decode kernel, `Config(unpack="magic_bf16")`; `decode_layout(bits)`).
    """
    if isinstance(qt, KernelWeights):
        if qt.layout != layout and layout != LAYOUT:
            raise ValueError(f"quant_matmul.prepare: weights are already in layout {qt.layout!r}, not {layout!r}")
        return qt
    if layout not in LAYOUTS:
        raise ValueError(f"quant_matmul.prepare: unknown kernel layout {layout!r} (one of {LAYOUTS})")
    if layout == PAIRS_LAYOUT and qt.bits not in PAIRS_BITS:
        raise ValueError(f"quant_matmul.prepare: layout {PAIRS_LAYOUT!r} holds bits {PAIRS_BITS}, got bits={qt.bits}")
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
    if layout == PAIRS_LAYOUT:
        words = pack_pairs(codes, slab, qt.bits)                  # [Kp*bits/32, N]
    else:
        words = packing.pack(codes, qt.bits, slab)                # [Kp*bits/32, N]
    u = v_t = None
    if qt.u is not None:
        r = qt.rank
        rp = rank_pad(r)
        u = qt.u
        v_t = jnp.pad(qt.v.astype(jnp.bfloat16).T, ((0, 0), (0, rp - r)))
    return KernelWeights(codes=jnp.asarray(words.T), scales=scales, zeros=zeros, u=u, v_t=v_t,
                         bits=qt.bits, group_size=qt.group_size, k=k, n=n, k_pad=k_pad, slab=slab,
                         layout=layout)
