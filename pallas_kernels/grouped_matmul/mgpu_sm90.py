"""Hopper (sm90) Mosaic GPU grouped kernel: token rows sorted by expert times their expert's
quantized weight, all experts of one bit-width class in ONE launch.

Weights are repacked once (`prepare_grouped`) into a quant_matmul kernel layout
(pallas_kernels/quant_matmul/layout.py: "planar_pairs" for 2/3/4-bit experts by default, read by the
magic-number unpack "magic_bf16"; "planar_nmajor", read by the f32 unpack, for 8-bit experts or
with low_bit_layout="planar_nmajor") per expert and stacked per class of equal (bits, group rows, slab,
K_pad, layout): codes [Ec*N, Kp*bits/32], scales / zeros [Ec*Gp, N], v_t [Ec*N, Rp], u [Ec, K, R]. Mixed precision per expert = several classes. Classes in planar_pairs without compensators
(the models' 2/3/4-bit default) run in ONE launch (multi_class_sm90.py: each class's pipeline under
pl.when in one grid; Mixtral FFN at 1 token 101.8 us mixed 2/3/4 vs 100.3 us uniform 3-bit, H200,
2026-12-02); other mixes run one launch per class (the unpack is static per bit width), each
launch touching only rows of its own experts.

Row blocks: the wrapper copies each expert's rows into a padded buffer in which every expert's
segment starts at a multiple of MB rows (MB = token block, wgmma N), so a row block belongs to one
expert. The grid is (N/BN, B_max, k_splits) with B_max = ceil(rows/MB) + Ec, an upper bound of the
number of blocks; each CTA finds its expert from the class's group sizes (read from GMEM with
static indices, an unrolled select over the Ec experts as in jax's ragged_dot_mgpu.py) and blocks
past the last real one exit at once: experts without rows cost nothing and their weights are never
read (decode reads only the active experts). Per block the body is the quant_matmul decode kernel
(emit_pipeline over planar K tiles, chunked unpack into two alternating swizzled A buffers, wgmma
acc[BN, MB] += A @ x^T, compensator epilogue acc += v_t @ (x@u)^T); its unpack and MMA helpers are
imported from pallas_kernels.quant_matmul.mgpu_sm90, not copied (Config.unpack picks the variant).

Tested in GPU interpret mode on CPU and natively on the H100 (tests/test_grouped_matmul.py -m gpu);
measured by benchmarks/moe_layer.py (NOTES.md).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from milo_jax.quant import packing
from milo_jax.quant.compensator import materialize_factor
from milo_jax.quant.tensor import QuantizedTensor
from pallas_kernels.grouped_matmul import reference
from pallas_kernels.quant_matmul import layout, mgpu_sm90 as qm
from pallas_kernels.quant_matmul.api import dequantize_kernel_weights
from pallas_kernels.quant_matmul.mgpu_sm90 import (TARGET_CTAS, UNPACKS, _accumulate_and_store, _compensator_copies,
                                                   _compensator_mma, compensator_transforms, _decode_scratch, _interpret_params,
                                                   _mma_xt, _pick_splits, _scale_blocks, _split_decode_refs,
                                                   _swizzle_transforms, _tiling, _unpack_and_multiply,
                                                   _unpack_plan)

# Kernel layout of 2/3/4-bit classes (`prepare_grouped(w, low_bit_layout=...)`). "planar_pairs" feeds
# the magic-number unpack (Config.unpack "magic_bf16" with A in registers, quant_matmul's measured
# decode default for 3-bit: 17.45 vs 31.4 us dense at 4096 x 14336, M=1, H100; native tests pass in
# this grouped kernel too). 8-bit classes stay "planar_nmajor" (layout.decode_layout).
LOW_BIT_LAYOUT = layout.PAIRS_LAYOUT


@dataclasses.dataclass(frozen=True)
class Config:
    block_n: int = 64          # output columns per CTA
    block_m: int = 0           # rows per block (wgmma N), multiple of 8, <= 128; 0 = from M and E
    chunk_slots: int = 4       # slots dequantized per wgmma
    stages: int = 2            # pipeline depth
    k_splits: int = 0          # 0 = heuristic (quant_matmul's target of ~7 CTAs per SM)
    # quant_matmul's unpack variant (quant_matmul.mgpu_sm90.UNPACKS). "" = per class from its layout:
    # "magic_bf16" for planar_pairs (2/3/4-bit) classes, "f32" otherwise. An explicit "magic_*" applies
    # to the planar_pairs classes (8-bit classes, planar_nmajor only, keep "f32"); a 2/3/4-bit class
    # whose layout the named unpack does not read raises ValueError.
    unpack: str = ""
    # quant_matmul's Config.a_regs: magic_* classes hand A to wgmma from registers.
    a_regs: bool = False
    # every group's scale pairs of a K tile computed at the step's start (quant_matmul's
    # SCALES_UPFRONT, planar_pairs classes only); default_config: at most UPFRONT_ROWS rows
    scales_upfront: bool = False


@dataclasses.dataclass(frozen=True)
class ExpertClass:
    """Experts of one (bits, group rows, slab, K_pad) stacked in the kernel layout."""
    codes: jax.Array                 # [Ec * N, Kp * bits // 32] uint32
    scales: jax.Array                # [Ec * Gp, N] 16-bit
    zeros: jax.Array                 # [Ec * Gp, N]
    u: Optional[jax.Array] = None    # [Ec, K, R] bf16 (zero columns past each expert's rank)
    v_t: Optional[jax.Array] = None  # [Ec * N, Rp] bf16
    experts: tuple = dataclasses.field(default=(), metadata=dict(static=True))   # global expert ids
    bits: int = dataclasses.field(default=3, metadata=dict(static=True))
    group_size: int = dataclasses.field(default=64, metadata=dict(static=True))
    k: int = dataclasses.field(default=0, metadata=dict(static=True))
    n: int = dataclasses.field(default=0, metadata=dict(static=True))
    k_pad: int = dataclasses.field(default=0, metadata=dict(static=True))
    slab: int = dataclasses.field(default=32, metadata=dict(static=True))
    group_rows: int = dataclasses.field(default=64, metadata=dict(static=True))
    layout: str = dataclasses.field(default=layout.LAYOUT, metadata=dict(static=True))   # quant_matmul layout

    @property
    def num_groups_pad(self) -> int:
        return self.k_pad // self.group_rows

    def expert_kernel_weights(self, i: int) -> layout.KernelWeights:
        """Local expert i as a quant_matmul KernelWeights (reference path, tests)."""
        n, gp = self.n, self.num_groups_pad
        u = v_t = None
        if self.u is not None:
            u, v_t = self.u[i], self.v_t[i * n:(i + 1) * n]
        return layout.KernelWeights(codes=self.codes[i * n:(i + 1) * n], scales=self.scales[i * gp:(i + 1) * gp],
                                    zeros=self.zeros[i * gp:(i + 1) * gp], u=u, v_t=v_t, bits=self.bits,
                                    group_size=self.group_size, k=self.k, n=self.n, k_pad=self.k_pad, slab=self.slab,
                                    layout=self.layout)


@dataclasses.dataclass(frozen=True)
class FloatClass:
    """bf16 experts stacked transposed: w_t [Ec * N, K_pad] (row e*N + n = column n of expert e's W,
    K zero-padded to a multiple of FLOAT_BLOCK_K), the wgmma A operand as the quantized kernel's."""
    w_t: jax.Array
    experts: tuple = dataclasses.field(default=(), metadata=dict(static=True))
    k: int = dataclasses.field(default=0, metadata=dict(static=True))
    n: int = dataclasses.field(default=0, metadata=dict(static=True))
    k_pad: int = dataclasses.field(default=0, metadata=dict(static=True))
    bits: int = dataclasses.field(default=16, metadata=dict(static=True))
    u = None


FLOAT_BLOCK_K = 64     # bf16 K tile: 128-byte swizzle


@dataclasses.dataclass(frozen=True)
class GroupedKernelWeights:
    """All E experts of one projection, as one or more bit-width classes."""
    classes: tuple                                                       # of ExpertClass / FloatClass
    num_experts: int = dataclasses.field(default=0, metadata=dict(static=True))
    k: int = dataclasses.field(default=0, metadata=dict(static=True))
    n: int = dataclasses.field(default=0, metadata=dict(static=True))

    @property
    def shape(self) -> tuple:
        return (self.num_experts, self.k, self.n)

    @property
    def order(self) -> tuple:
        """The global expert at each position, the classes laid end to end: the row order of the
        multi-class launch and routed_ffn's padded rows, the stacking order of the prefill path."""
        return tuple(i for c in self.classes for i in c.experts)


def positions(order) -> np.ndarray:
    """[E] int32: the position of each global expert in `order` (its inverse permutation)."""
    pos = np.empty(len(order), np.int32)
    pos[list(order)] = np.arange(len(order), dtype=np.int32)
    return pos


def position_rows(group_sizes: jax.Array, order: tuple, m: int, mb: int = 1):
    """Rows sorted by expert id -> (dest [M], in_groups [M], counts [E]) when the experts are laid out by
    position (`order`) with each expert's rows starting at a multiple of mb: counts = mb-row blocks per
    position, dest = a row's index in that layout (meaningless where in_groups is False: rows past the
    groups)."""
    e = len(order)
    gs = group_sizes.astype(jnp.int32)
    counts = (gs[np.asarray(order)] + mb - 1) // mb                # blocks per position
    start = (jnp.cumsum(counts) - counts) * mb                     # first row of each position
    offsets = jnp.cumsum(gs) - gs                                  # first sorted row of each global expert
    row_expert = reference.row_expert_ids(gs, m)                   # E past the groups
    safe = jnp.minimum(row_expert, e - 1)
    dest = start[jnp.asarray(positions(order))[safe]] + jnp.arange(m, dtype=jnp.int32) - offsets[safe]
    return dest, row_expert < e, counts


def _register(cls):
    fields = dataclasses.fields(cls)
    jax.tree_util.register_dataclass(cls, data_fields=[f.name for f in fields if not f.metadata.get("static")],
                                     meta_fields=[f.name for f in fields if f.metadata.get("static")])


_register(ExpertClass)
_register(FloatClass)
_register(GroupedKernelWeights)


def _split_experts(w) -> list:
    """Any accepted weight form -> list of E 2-D weights (QuantizedTensors or float arrays)."""
    if isinstance(w, (list, tuple)):
        return list(w)
    if isinstance(w, QuantizedTensor):
        e = w.shape[0]
        u = v = None
        if w.u is not None:   # any factor kind (quantized, ragged) -> dense [E, K, r] / [E, r, N]
            u, v = materialize_factor(w.u, jnp.bfloat16), materialize_factor(w.v, jnp.bfloat16)
        base = dataclasses.replace(w, u=u, v=v)
        return [dataclasses.replace(jax.tree_util.tree_map(lambda a, i=i: a[i], base), shape=tuple(w.shape[1:]))
                for i in range(e)]
    w = jnp.asarray(w)
    return [w[i] for i in range(w.shape[0])]


def prepare_grouped(w, low_bit_layout: str | None = None) -> GroupedKernelWeights:
    """Repack once (load time): stacked QuantizedTensor [E, K, N] or a list of per-expert ones.

    low_bit_layout: kernel layout of the 2/3/4-bit experts, "planar_pairs" (magic-number unpack) or
    "planar_nmajor" (f32 / bf16 unpack); None = LOW_BIT_LAYOUT. 8-bit experts are always planar_nmajor.
    Already prepared weights are returned as they are (their classes keep their layouts)."""
    if low_bit_layout is None:
        low_bit_layout = LOW_BIT_LAYOUT
    if low_bit_layout not in layout.LAYOUTS:
        raise ValueError(f"grouped_matmul.prepare_grouped: low_bit_layout={low_bit_layout!r} is not one of {layout.LAYOUTS}")
    if isinstance(w, GroupedKernelWeights):
        return w
    e, k, n = reference.expert_shape(w)
    parts = _split_experts(w)
    floats = [i for i, p in enumerate(parts) if not isinstance(p, QuantizedTensor)]
    kws = {i: layout.prepare(p, layout=low_bit_layout if p.bits in layout.PAIRS_BITS else layout.LAYOUT)
           for i, p in enumerate(parts) if isinstance(p, QuantizedTensor)}
    buckets: dict = {}
    for i, kw in kws.items():
        buckets.setdefault((kw.bits, kw.group_rows, kw.slab, kw.k_pad, kw.group_size, kw.layout), []).append(i)
    classes = []
    if floats:
        if n % 64:
            raise ValueError(f"grouped_matmul kernel: N={n} must be a multiple of 64 (kernel column tile)")
        k_pad = -(-k // FLOAT_BLOCK_K) * FLOAT_BLOCK_K
        w_t = jnp.concatenate([jnp.pad(jnp.asarray(parts[i]).astype(jnp.bfloat16).T, ((0, 0), (0, k_pad - k)))
                               for i in floats])
        classes.append(FloatClass(w_t=w_t, experts=tuple(floats), k=k, n=n, k_pad=k_pad))
    for (bits, rows, slab, k_pad, g, lay), ids in sorted(buckets.items()):
        members = [kws[i] for i in ids]
        u = v_t = None
        if any(m.u is not None for m in members):
            r = max(m.rank for m in members)
            rp = max(m.v_t.shape[1] for m in members if m.u is not None)
            u = jnp.stack([jnp.zeros((k, r), jnp.bfloat16) if m.u is None else
                           jnp.pad(m.u.astype(jnp.bfloat16), ((0, 0), (0, r - m.rank))) for m in members])
            v_t = jnp.concatenate([jnp.zeros((n, rp), jnp.bfloat16) if m.u is None else
                                   jnp.pad(m.v_t, ((0, 0), (0, rp - m.v_t.shape[1]))) for m in members])
        classes.append(ExpertClass(
            codes=jnp.concatenate([m.codes for m in members]), scales=jnp.concatenate([m.scales for m in members]),
            zeros=jnp.concatenate([m.zeros for m in members]), u=u, v_t=v_t, experts=tuple(ids), bits=bits,
            group_size=g, k=k, n=n, k_pad=k_pad, slab=slab, group_rows=rows, layout=lay))
    return GroupedKernelWeights(classes=tuple(classes), num_experts=e, k=k, n=n)


def fuse_columns(a: GroupedKernelWeights, b: GroupedKernelWeights) -> GroupedKernelWeights:
    """Two projections of the same experts and input, [E, K, Na] and [E, K, Nb] (MoE gate and up),
    as one [E, K, Na + Nb] whose expert e holds its Na columns of `a` then its Nb columns of `b`:
    one launch (and one routing wrapper) instead of two. Compensators are stacked along the rank
    (block-diagonal v). Raises ValueError when the bit-width classes differ (mixed precision with
    different assignments) or the fused rank would exceed quant_matmul's MAX_RANK."""
    if (a.num_experts, a.k) != (b.num_experts, b.k) or len(a.classes) != len(b.classes):
        raise ValueError(f"fuse_columns: expert sets differ ({a.shape} vs {b.shape}, "
                         f"{len(a.classes)} vs {len(b.classes)} classes)")
    classes = []
    for ca, cb in zip(a.classes, b.classes):
        meta = lambda c: (type(c), tuple(c.experts), c.k, c.k_pad, c.bits,
                          getattr(c, "group_size", None), getattr(c, "slab", None),
                          getattr(c, "group_rows", None), getattr(c, "layout", None))
        if meta(ca) != meta(cb):
            raise ValueError(f"fuse_columns: classes differ: {meta(ca)} vs {meta(cb)}")
        ec, na, nb = len(ca.experts), ca.n, cb.n

        def cat_rows(x, y):            # per-expert row blocks [Ec*Na, ...] + [Ec*Nb, ...] -> interleaved
            return jnp.concatenate([x.reshape(ec, na, *x.shape[1:]), y.reshape(ec, nb, *y.shape[1:])],
                                   axis=1).reshape(ec * (na + nb), *x.shape[1:])

        if isinstance(ca, FloatClass):
            classes.append(dataclasses.replace(ca, w_t=cat_rows(ca.w_t, cb.w_t), n=na + nb))
            continue
        u = v_t = None
        if ca.u is not None or cb.u is not None:
            ra = 0 if ca.u is None else ca.u.shape[2]
            rb = 0 if cb.u is None else cb.u.shape[2]
            if ra + rb > layout.MAX_RANK:
                raise ValueError(f"fuse_columns: fused rank {ra} + {rb} exceeds {layout.MAX_RANK}")
            rp = layout.rank_pad(ra + rb)
            parts = [p for p in (ca.u, cb.u) if p is not None]
            u = jnp.concatenate(parts, axis=2) if len(parts) == 2 else parts[0]
            va = jnp.zeros((ec * na, rp), jnp.bfloat16) if ca.u is None else \
                jnp.pad(ca.v_t[:, :ra], ((0, 0), (0, rp - ra)))
            vb = jnp.zeros((ec * nb, rp), jnp.bfloat16) if cb.u is None else \
                jnp.pad(cb.v_t[:, :rb], ((0, 0), (ra, rp - ra - rb)))
            v_t = cat_rows(va, vb)
        classes.append(dataclasses.replace(
            ca, codes=cat_rows(ca.codes, cb.codes), scales=jnp.concatenate([ca.scales, cb.scales], axis=1),
            zeros=jnp.concatenate([ca.zeros, cb.zeros], axis=1), u=u, v_t=v_t, n=na + nb))
    return GroupedKernelWeights(classes=tuple(classes), num_experts=a.num_experts, k=a.k, n=a.n + b.n)


def dequantize_grouped(gkw: GroupedKernelWeights):
    """(W_hat [E, K, N] bf16, u [E, K, R] | None, v [E, R, N] | None) from the kernel layout."""
    dense = [None] * gkw.num_experts
    us, vs = [None] * gkw.num_experts, [None] * gkw.num_experts
    for c in gkw.classes:
        for i, e in enumerate(c.experts):
            if isinstance(c, FloatClass):
                dense[e] = c.w_t[i * c.n:(i + 1) * c.n, :c.k].T
                continue
            kw = c.expert_kernel_weights(i)
            dense[e] = dequantize_kernel_weights(kw)
            if kw.u is not None:
                us[e], vs[e] = kw.u, kw.v_t.T
    if all(u is None for u in us):
        return jnp.stack(dense), None, None
    r = max(u.shape[1] for u in us if u is not None)
    rv = max(v.shape[0] for v in vs if v is not None)
    r = max(r, rv)
    u = jnp.stack([jnp.zeros((gkw.k, r), jnp.bfloat16) if a is None else jnp.pad(a, ((0, 0), (0, r - a.shape[1])))
                   for a in us])
    v = jnp.stack([jnp.zeros((r, gkw.n), jnp.bfloat16) if a is None else jnp.pad(a, ((0, r - a.shape[0]), (0, 0)))
                   for a in vs])
    return jnp.stack(dense), u, v


# Split K until about this many CTAs run in a quantized class's decode launch: twice quant_matmul's
# target (Mixtral gate at 1 token, before gate and up were fused: split 2 / 4 / 8 took 30.1 / 28.3 /
# 27.8 us on the H100, 2026-11-23). benchmarks/moe_layer.py --grouped-cta-target overrides it.
CTA_TARGET = 2 * TARGET_CTAS

# Scale pairs up front (Config.scales_upfront) in quantized decode launches of at most this many
# sorted rows. They cost registers (125 -> 166 per thread: 4 -> 3 CTAs per SM); Mixtral FFN 3-bit
# (H200, 2026-12-02, stop 15): 1 token (2 rows) 100.3 -> 95.5 us, 16 tokens (32 rows) 314.5 -> 342 us.
# benchmarks/moe_layer.py --grouped-upfront-rows overrides it.
UPFRONT_ROWS = 2


# magic_fold (quant_matmul's unscaled-A unpack) in quantized decode launches of MB <= this; 0 = never.
# With quant_matmul's FOLD_SPAN = 4 the Mixtral FFN (3-bit g64, prepared model) took 79.1 us at 1 token
# against 86.0 for magic_bf16, 255.6 against 283.8 at 16 tokens (H200, 2026-12-03, s18a; at span 8 it
# was slower: 93.4 us). benchmarks/moe_layer.py --grouped-fold-mb overrides it.
FOLD_MAX_BLOCK_M = 16

# magic_fold's fold blocks per run_scoped in the grouped decode launches (quant_matmul's FOLD_SPAN, 4, stays
# stream-K's). Mixtral FFN 3-bit on the H100 (2026-12-07, s26f, one process each): span 1 / 2 / 4 took 88.5 /
# 85.7 / 87.8 us at 1 token and 275.1 / 276.0 / 285.8 us at 16 tokens; s26e: 85.9 (2) vs 88.0 (4) and
# 95.6 (8). Stream-K at span 2: 16.4 vs 16.3 us (M = 1), 18.4 vs 18.0 (M = 16), so it keeps 4.
FOLD_SPAN = 2

# Split-K decode launches under magic_fold add their partials into one zeroed [N, rows] float32 buffer (a jax
# Ref aliased through the launch; TMA reduce-add) instead of writing [splits * N, rows] for an XLA sum: the
# routed FFN's combine would read 1/splits of the bytes (Mixtral's down launch: 14 splits, 3.3 us combine at
# 1 token). Native only (GPU interpret mode has no reduce-add: interpret runs keep the partials). The adds
# of the splits land in any order: not bit-reproducible run to run, hence off. Its native tests pass (H100,
# 2026-12-07, s27a-c). Mixtral FFN 3-bit (H100, same calls): by columns 80.0 vs 80.5 us at 1 token (s27a); by
# rows, on every split launch 79.8 vs 79.8, on the down launch only (REDUCE_MIN_SPLITS 4) 78.7 vs 79.8 (s27b)
# and 78.5 vs 79.2 (s27c); 16 tokens 269.8 vs 268.8 and 268.1 vs 269.0.
REDUCE_SPLITS = False


# REDUCE_SPLITS only for launches of at least this many splits: the zeroed buffer costs a launch of its own
# (0.9 us for Mixtral's gate/up at 1 token, 2 splits; 0.6 for the down launch, 14; H100 s27a).
REDUCE_MIN_SPLITS = 2


def reduces_splits(cfg: Config, interpret: bool) -> bool:
    """Whether a one-class launch under `cfg` adds its split-K partials in place (REDUCE_SPLITS)."""
    return (REDUCE_SPLITS and not interpret and cfg.unpack == "magic_fold"
            and cfg.k_splits >= max(2, REDUCE_MIN_SPLITS))


# Decode launches under magic_fold (one-class and multi-class) store their output by padded row:
# [B*MB, splits*N], row r holding split s's N columns at s*N ([B*MB, N] under REDUCE_SPLITS). Each CTA
# turns its [BN, MB] accumulator into WGMMA_TRANSPOSED (a register shuffle) and stores it through a
# transposed view of an [MB, BN] tile, which one TMA box writes. Why: the routed FFN reads a real row's
# partials contiguously (the combine after Mixtral's 14-split down launch read every padded row's 64-byte
# stripe of 3.7 MB for 2 real rows: 3.3 us at 1 token, H100 s27a) and SiLU(gate) * up is elementwise on
# [rows, 2I] (the gate/up split sum + transpose to rows was its own 2.7 us fusion there). False: [splits*N,
# B*MB] as the other decode paths. Mixtral FFN 3-bit (H100, 2026-12-07, s27b, same call): 79.8 vs 82.2 us at
# 1 token, 268.8 vs 276.2 at 16, 527.4 vs 528.3 at 64 (MB 24: not a fold launch); native suites pass.
ROWS_OUT = True


def rows_out(cfg: Config) -> bool:
    """Whether a one-class launch under `cfg` stores its output by padded row (ROWS_OUT)."""
    return ROWS_OUT and cfg.unpack == "magic_fold"


# Pipeline depth of the one-class quantized decode launches under magic_fold (MB <= FOLD_MAX_BLOCK_M; the
# others keep 2, as the multi-class launch). Mixtral FFN 3-bit on the H100 (2026-12-07, s26g, same call,
# fold span 2): 1 token 80.7 us at 3 stages vs 84.4 at 2 (the two launches 69.1 vs 73.2 us), 16 tokens
# 267.3 vs 267.6; the benchmark's relative error against float64 unchanged (1.7e-3). The native test
# suite of that call ran at 2 stages (at 3 it passed in s27a). 4 stages: 83.4 vs 80.5 us at 1 token, 285.9 vs
# 267.2 at 16 (s27a, one process each). emit_pipeline shrinks the depth to a CTA's step count (2 for
# Mixtral's down launch at 1 token).
DECODE_STAGES = 3


# Split-K of quantized decode launches never leaves a split fewer K rows than this (0: no floor). The
# partials are [splits * N, B * MB] float32 whatever the rows, so a deep-K, narrow-N projection (Mixtral's
# down at 1 token: 14 splits of 1024 rows) writes and reads back 3.7 MB for 2 real rows.
# benchmarks/moe_layer.py --set pallas_kernels.grouped_matmul.mgpu_sm90.MIN_SPLIT_ROWS=2048 times it.
MIN_SPLIT_ROWS = 0


def decode_splits(steps: int, ctas: int, k_pad: int) -> int:
    """Split-K of a quantized decode launch over `steps` K tiles with `ctas` CTAs per split: the most
    splits dividing steps within CTA_TARGET CTAs, then fewer while a split holds < MIN_SPLIT_ROWS rows."""
    splits = _pick_splits(steps, ctas, target=CTA_TARGET)
    while splits > 1 and k_pad // splits < MIN_SPLIT_ROWS:
        splits = max(d for d in range(1, splits) if steps % d == 0)
    return splits


def block_m_for(m: int, num_experts: int) -> int:
    """MB for M sorted rows over `num_experts` experts: 1.5x the rows an expert gets under even
    routing, rounded up to 8, at most 64 (see default_config)."""
    even = -(-m // max(1, min(num_experts, m)))
    return min(64, max(8, -(-(3 * even // 2) // 8) * 8))


def default_config(m: int, c: ExpertClass) -> Config:
    """MB from the rows per expert; chunk/split-K as quant_matmul's decode default.

    Quantized classes: MB = 1.5x the rows an expert gets under even routing, rounded up to 8 (at
    most 64). The x tile is MB x 512 bf16 per pipeline stage, so MB = M (the former choice) left one
    CTA per SM at 64 Mixtral tokens (128 rows, MB 64: 156 KB of SMEM) and 0.57 TB/s; the 1.5x
    margin keeps most experts in one block (one weight read). Skewed routing costs extra weight
    reads (an expert with r rows is read ceil(r / MB) times)."""
    if isinstance(c, FloatClass):   # bf16 class: MB from M (measured that way in stop 10)
        mb = min(64, max(8, -(-m // 8) * 8))
        steps = c.k_pad // FLOAT_BLOCK_K
        blocks = min(-(-m // mb) + len(c.experts), max(1, m))
        return Config(block_n=64, block_m=mb, chunk_slots=1, stages=4,
                      k_splits=_pick_splits(steps, (c.n // 64) * blocks))
    mb = block_m_for(m, len(c.experts))
    per = packing.slots_per_tile(c.bits)
    steps = c.k_pad // (per * c.slab)
    # active CTAs: at most min(rows, experts) blocks per column tile. Twice quant_matmul's CTA
    # target: Mixtral gate/up at 1 token (2 blocks x 224 column tiles), split 2 / 4 / 8 took
    # 30.1 / 28.3 / 27.8 us (H100, 2026-11-23, benchmarks/results/logs/h100_2026-11-23_s11c_profile_decode.txt)
    blocks = min(-(-m // mb) + len(c.experts), max(1, m))
    splits = decode_splits(steps, (c.n // 64) * blocks, c.k_pad)
    chunk = max(1, min(per, (64 if splits > 1 else 128) // c.slab))
    unpack = class_unpack("", c)
    if unpack == "magic_bf16" and mb <= FOLD_MAX_BLOCK_M and not c.group_rows % (2 * c.slab):
        unpack = "magic_fold"
    stages = DECODE_STAGES if unpack == "magic_fold" else 2
    return Config(block_n=64, block_m=mb, chunk_slots=chunk, stages=stages, k_splits=splits,
                  unpack=unpack, a_regs=unpack.startswith("magic"), scales_upfront=m <= UPFRONT_ROWS)


def class_unpack(requested: str, c: ExpertClass) -> str:
    """The unpack variant class c runs under Config.unpack=`requested` (see Config.unpack)."""
    if requested and requested not in UNPACKS:
        raise ValueError(f"grouped_matmul: unpack={requested!r} is not one of {UNPACKS}")
    pairs = c.layout == layout.PAIRS_LAYOUT
    if not requested:
        return "magic_bf16" if pairs else "f32"
    if requested.startswith("magic") == pairs:
        return requested
    if c.bits not in layout.PAIRS_BITS:   # only planar_nmajor exists at 8 bits: the magic request is for the others
        return "f32"
    raise ValueError(f"grouped_matmul: unpack={requested!r} does not read the {c.layout!r} layout of the {c.bits}-bit "
                     f"class {c.experts} (magic_* need prepare_grouped(w, low_bit_layout={layout.PAIRS_LAYOUT!r}), "
                     f"the others {layout.LAYOUT!r})")


def _block_expert(counts, mi, num_experts: int):
    """(local expert owning row block mi, whether mi is a real block). Unrolled over the (few dozen
    at most) experts with static GMEM reads, as jax's ragged_dot_mgpu.py does; blocks past the last
    real one are skipped by the caller."""
    expert = jnp.int32(0)
    end = jnp.int32(0)
    for i in range(num_experts):
        start = end
        end = start + counts[i]
        expert = lax.select((start <= mi) & (mi < end), jnp.int32(i), expert)
    return expert, mi < end


@functools.lru_cache(maxsize=None)
def build_float(k_pad: int, n: int, num_experts: int, num_blocks: int, cfg: Config, interpret: bool):
    """bf16 experts: f(block_counts [Ec], w_t [Ec*N, k_pad], x [B*MB, k_pad]) -> [splits*N, B*MB].

    Same grid and skipping as `build`; per K step acc[BN, MB] += W^T tile [BN, 64] @ x tile^T."""
    bk = FLOAT_BLOCK_K
    steps_total = k_pad // bk
    splits = cfg.k_splits
    if steps_total % splits:
        raise ValueError(f"k_splits={splits} does not divide the {steps_total} K tiles")
    steps = steps_total // splits
    bn, mb = cfg.block_n, cfg.block_m
    if n % bn:
        raise ValueError(f"N={n} not tiled by BN={bn}")
    n_blocks = n // bn
    tr = _swizzle_transforms(bk)
    out_dtype = jnp.bfloat16 if splits == 1 else jnp.float32
    wg = plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup)

    def kernel(counts, w_t, x, out, o_smem):
        ni = lax.axis_index("n")
        mi = lax.axis_index("m")
        ki = lax.axis_index("k")
        off = ki * steps
        expert, valid = _block_expert(counts, mi, num_experts)
        row_block = expert * n_blocks + ni
        acc_holder = [None]

        def body(_, w_ref, x_ref):
            _mma_xt(acc_holder[0], w_ref, x_ref, interpret)
            plgpu.wgmma_wait(1)

        in_specs = [plgpu.BlockSpec((bn, bk), lambda s: (row_block, s + off), transforms=tr, delay_release=1),
                    plgpu.BlockSpec((mb, bk), lambda s: (mi, s + off), transforms=tr, delay_release=1)]

        def compute(acc_ref):
            acc_holder[0] = acc_ref

            # The skip sits inside the accumulator scope, around emit_pipeline only, exactly as
            # jax's transposed_ragged_dot_mgpu.py skips empty groups; a skipped block stores its
            # zero accumulator into padding rows nobody reads back.
            @pl.when(valid)
            def _():
                plgpu.emit_pipeline(body, grid=(steps,), in_specs=in_specs,
                                    max_concurrent_steps=max(cfg.stages, 2))(w_t, x)
                plgpu.wgmma_wait(0)

            return acc_ref[...]

        _accumulate_and_store(compute, o_smem,
                              out.at[pl.ds(ki * n + ni * bn, bn), pl.ds(mi * mb, mb)],
                              bn, mb, interpret, store=valid)

    return plgpu.kernel(kernel, out_type=jax.ShapeDtypeStruct((splits * n, num_blocks * mb), out_dtype),
                        grid=(n // bn, num_blocks, splits), grid_names=("n", "m", "k"), compiler_params=wg,
                        scratch_types=[plgpu.SMEM((bn, mb), out_dtype)], **_interpret_params(interpret))


def _fold_pipeline(in_specs, operands, valid, ki, mi, off, out, o_smem, comp, comp_refs, ni, *, wps, bits, slab,
                   bn, mb, n, nf, group_rows, g_block, tile_rows, steps, stages, interpret, reduce=False,
                   rows=False):
    """A row block's K range under quant_matmul's magic_fold unpack: the float32 accumulator is the
    pipeline's carry (`mgpu_sm90._fold_unpack_and_multiply` per step), then the compensator (split 0)
    and the store. Blocks past the last real one read no weights and store nothing; a split-0 CTA
    still waits for its compensator copies so none is in flight when the CTA exits. reduce: every split
    adds its partial into columns [0, N) of `out` (TMA reduce-add; REDUCE_SPLITS) instead of storing it at
    split ki's. rows (ROWS_OUT): out is [B*MB, splits*N] and o_smem [MB, BN] (the tile stored transposed);
    else out is [splits*N, B*MB] and o_smem [BN, MB]."""
    def body(_, *step_refs):
        *step_refs, acc = step_refs
        planes = [r[...] for r in step_refs[:wps]]
        s_ref, z_ref, x_ref, xs_ref = step_refs[wps:]
        return qm._fold_unpack_and_multiply(acc, planes, s_ref, z_ref, x_ref, xs_ref, bits=bits, slab=slab, bn=bn,
                                            mb=mb, group_rows=group_rows, g_block=g_block, tile_rows=tile_rows,
                                            interpret=interpret, span_cap=FOLD_SPAN)

    specs = in_specs + [plgpu.BlockSpec((qm.fold_rows_per_tile(nf), mb), lambda s: (s + off, mi))]

    @pl.when(valid)
    def _():
        init = jnp.zeros((bn, mb), jnp.float32)
        if not interpret:
            init = plgpu.layout_cast(init, plgpu.Layout.WGMMA)
        acc = plgpu.emit_pipeline(body, grid=(steps,), in_specs=specs, max_concurrent_steps=max(stages, 2),
                                  init_carry=init)(*operands)
        if comp:
            xu_smem, v_smem, bar = comp_refs
            acc = qm._add_compensator(acc, ki == 0, v_smem, xu_smem, bar, interpret)
        col = ni * bn if reduce else ki * n + ni * bn     # in the split-major N axis
        if not rows:
            o_smem[...] = acc.astype(o_smem.dtype)
            dst = out.at[pl.ds(col, bn), pl.ds(mi * mb, mb)]
        else:
            if interpret:
                o_smem[...] = acc.T.astype(o_smem.dtype)
            else:   # lanes swap 2x2 blocks (WGMMA -> WGMMA_TRANSPOSED), then store through the transposed view
                tile = plgpu.layout_cast(acc.astype(o_smem.dtype), plgpu.Layout.WGMMA_TRANSPOSED)
                o_smem.T[...] = tile    # (plgpu.transpose_ref asserts on a plain Ref in jax 0.11.2)
            dst = out.at[pl.ds(mi * mb, mb), pl.ds(col, bn)]
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, dst, reduction_op="add" if reduce else None)
        plgpu.wait_smem_to_gmem(0)

    if comp:
        @pl.when(jnp.logical_and(ki == 0, jnp.logical_not(valid)))
        def _():
            plgpu.barrier_wait(comp_refs[2])


@functools.lru_cache(maxsize=None)
def build(bits: int, slab: int, group_rows: int, k_pad: int, n: int, num_experts: int, num_blocks: int,
          rank_pad: int, cfg: Config, interpret: bool, reduce_splits: bool = False, rows: bool = False):
    """f(block_counts [Ec] int32, codes, scales, zeros, x [B*MB, k_pad] bf16[, xu [B*MB, Rp],
    v_t [Ec*N, Rp]]) -> [splits*N, B*MB] (bf16 for one split, else f32 partials); rows (magic_fold only,
    ROWS_OUT): [B*MB, splits*N].
    reduce_splits (magic_fold, native only): f(..., acc) with acc a jax Ref [N, B*MB] ([B*MB, N] with rows)
    float32 of zeros that every split adds its partial into (TMA reduce-add); no output.

    block_counts[e] = number of MB-row blocks of local expert e (its rows rounded up).
    cfg.unpack picks quant_matmul's unpack ("magic_*" read planar_pairs codes; x is then f16 for
    "magic_f16"); the dequant helpers are quant_matmul's, this body only sequences them."""
    tl = _tiling(bits, slab, k_pad, n, cfg)
    wps, tile_rows, steps, splits = tl.wps, tl.tile_rows, tl.steps, tl.splits
    bn, mb, chunk, nchunks = tl.bn, tl.mb, tl.chunk, tl.nchunks
    gp = k_pad // group_rows                   # scale rows per expert
    g_block, scale_index = _scale_blocks(group_rows, tile_rows, k_pad)
    scale_blocks_per_expert = gp // g_block
    n_blocks = n // bn
    comp = rank_pad > 0
    unpack = cfg.unpack or "f32"
    plan = _unpack_plan(unpack, cfg.a_regs and unpack.startswith("magic"), True, bits, chunk, nchunks, slab,
                        scales_upfront=cfg.scales_upfront)
    tr = _swizzle_transforms(slab)
    tr_r = compensator_transforms(rank_pad)
    out_dtype = jnp.bfloat16 if splits == 1 else jnp.float32
    wg = plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup)

    tr_x = tr
    if plan.fold:   # x swizzled for the fold's K = 64 / 128 MMAs, as stream-K
        f_rows, fold_k = qm.fold_blocks(group_rows, tile_rows, slab)
        nf = tile_rows // f_rows
        tr_x = qm.x_transforms(fold_k, slab)

    def kernel(*refs):
        ins, out, a_buf, o_smem, comp_refs = _split_decode_refs(refs, (7 if comp else 5) + plan.fold, plan)
        counts, codes, scales, zeros, x = ins[:5]
        xs = ins[5] if plan.fold else None
        if comp:
            xu, v_t = ins[5 + plan.fold:]
            xu_smem, v_smem, bar = comp_refs
        ni = lax.axis_index("n")
        mi = lax.axis_index("m")
        ki = lax.axis_index("k")
        off = ki * steps
        expert, valid = _block_expert(counts, mi, num_experts)
        if comp:   # compensator operands arrive while the main loop runs (split 0 only; in range for
            # skipped blocks too)
            _compensator_copies(ki == 0, xu.at[pl.ds(mi * mb, mb)], v_t.at[pl.ds(expert * n + ni * bn, bn)],
                                xu_smem, v_smem, bar)
        row_block = expert * n_blocks + ni            # this expert's column tile in stacked codes
        scale_base = expert * scale_blocks_per_expert

        def body(_, *step_refs):
            planes = [r[...] for r in step_refs[:wps]]
            s_ref, z_ref, x_ref = step_refs[wps:]
            _unpack_and_multiply(acc_holder[0], a_buf, planes, s_ref, z_ref, x_ref, bits=bits,
                                 slab=slab, bn=bn, chunk=chunk, nchunks=nchunks, group_rows=group_rows,
                                 g_block=g_block, plan=plan, interpret=interpret)

        code_specs = [plgpu.BlockSpec((bn, slab), (lambda s, p=p: (row_block, wps * (s + off) + p)))
                      for p in range(wps)]
        in_specs = code_specs + [
            plgpu.BlockSpec((g_block, bn), lambda s: (scale_base + scale_index(s + off), ni)),
            plgpu.BlockSpec((g_block, bn), lambda s: (scale_base + scale_index(s + off), ni)),
            plgpu.BlockSpec((mb, tile_rows), lambda s: (mi, s + off), transforms=tr_x,
                            delay_release=1 if plan.overlap else 0),
        ]
        acc_holder = [None]

        if plan.fold:   # quant_matmul's magic_fold: the accumulator is the pipeline's carry
            _fold_pipeline(in_specs, (*([codes] * wps), scales, zeros, x, xs), valid, ki, mi, off, out, o_smem,
                           comp, comp_refs, ni, wps=wps, bits=bits, slab=slab, bn=bn, mb=mb, n=n, nf=nf,
                           group_rows=group_rows, g_block=g_block, tile_rows=tile_rows, steps=steps,
                           stages=cfg.stages, interpret=interpret, reduce=reduce_splits, rows=rows)
            return

        def compute(acc_ref):
            acc_holder[0] = acc_ref

            # Skip blocks past the last real one: inside the accumulator scope, around emit_pipeline
            # only, as jax's transposed_ragged_dot_mgpu.py skips empty groups (no weight reads). The
            # compensator copies / barrier stay unconditional (as quant_matmul); a skipped block
            # stores its accumulator into padding rows that are never read back.
            @pl.when(valid)
            def _():
                plgpu.emit_pipeline(body, grid=(steps,), in_specs=in_specs,
                                    max_concurrent_steps=max(cfg.stages, 2 if plan.overlap else 1))(
                    *([codes] * wps), scales, zeros, x)
                plgpu.wgmma_wait(0)

            if comp:
                _compensator_mma(ki == 0, acc_ref, v_smem, xu_smem, bar, interpret)
            return acc_ref[...]

        _accumulate_and_store(compute, o_smem,
                              out.at[pl.ds(ki * n + ni * bn, bn), pl.ds(mi * mb, mb)],
                              bn, mb, interpret, store=valid)

    if rows and not plan.fold:
        raise ValueError("grouped build: rows (ROWS_OUT) needs magic_fold")
    scratch = _decode_scratch(plan, bn, chunk, slab, mb, out_dtype, comp, rank_pad, tr, tr_r, rows_out=rows)
    out_shape = (num_blocks * mb, splits * n) if rows else (splits * n, num_blocks * mb)
    if reduce_splits:
        if not (plan.fold and splits > 1) or interpret:
            raise ValueError("grouped build: reduce_splits needs magic_fold, split-K and a native run")
        # pl.kernel, not plgpu.kernel: the latter's custom_vmap wrapper does not take a Ref operand. The
        # scratch is allocated by run_scoped as plgpu.kernel does (transformed SMEM refs)
        body = lambda *refs: pl.run_scoped(functools.partial(kernel, *refs), *scratch)
        return pl.kernel(body, out_type=(), mesh=plgpu.Mesh(grid=(n // bn, num_blocks, splits),
                                                            grid_names=("n", "m", "k")), compiler_params=wg)
    return plgpu.kernel(kernel, out_type=jax.ShapeDtypeStruct(out_shape, out_dtype),
                        grid=(n // bn, num_blocks, splits), grid_names=("n", "m", "k"), compiler_params=wg,
                        scratch_types=scratch, **_interpret_params(interpret))


def class_config(m: int, c, cfg: Config | None) -> tuple[Config, int]:
    """(config with its 0 fields resolved, static row-block bound B) of class c for M rows."""
    ec = len(c.experts)
    base = default_config(m, c)
    cfg = cfg or base
    if cfg.block_m == 0:
        cfg = dataclasses.replace(cfg, block_m=base.block_m)
    if cfg.k_splits == 0:
        cfg = dataclasses.replace(cfg, k_splits=base.k_splits)
    is_float = isinstance(c, FloatClass)
    if not is_float:
        cfg = dataclasses.replace(cfg, unpack=class_unpack(cfg.unpack, c))
    per = 1 if is_float else packing.slots_per_tile(c.bits)
    if per % cfg.chunk_slots:
        cfg = dataclasses.replace(cfg, chunk_slots=per)
    # static upper bound of row blocks: each expert's rows rounded up to blocks, and every block
    # holds at least one row (decode, 1 token top-2: 2 blocks, not 1 + Ec)
    return cfg, max(1, min(-(-m // cfg.block_m) + ec, m))


def class_kernel(x_pad, counts, c, cfg: Config, num_blocks: int, interpret: bool):
    """The class's launch over the padded rows: x_pad [B*MB, >= K] (each local expert's rows from
    a multiple of MB; zero rows pad them), counts [Ec] int32 MB-row blocks per local expert ->
    [splits * N, B * MB] (bf16 for one split, else float32 partials; blocks past the last real one
    are not written), or [N, B * MB] float32 summed where `reduces_splits`; both transposed ([B * MB,
    splits * N], [B * MB, N]) where `rows_out(cfg)`."""
    k = c.k
    mb = cfg.block_m
    x_pad = x_pad[:, :c.k_pad] if x_pad.shape[1] >= c.k_pad else jnp.pad(x_pad, ((0, 0), (0, c.k_pad - x_pad.shape[1])))
    x_pad = x_pad.astype(jnp.bfloat16)
    if isinstance(c, FloatClass):
        return build_float(c.k_pad, c.n, len(c.experts), num_blocks, cfg, bool(interpret))(counts, c.w_t, x_pad)
    args = [counts, c.codes, c.scales, c.zeros, x_pad]
    rank_pad = 0
    if c.u is not None:
        rank_pad = c.v_t.shape[1]
        # x @ u per padded row: groups = each local expert's padded segment (zero rows add 0)
        xu = jax.lax.ragged_dot(x_pad[:, :k], c.u, counts * mb, preferred_element_type=jnp.float32)
        xu = jnp.pad(xu.astype(jnp.bfloat16), ((0, 0), (0, rank_pad - c.u.shape[2])))   # only split 0 reads it
        args += [xu, c.v_t]
    if cfg.unpack == "magic_f16":
        args[4] = x_pad.astype(jnp.float16)   # the A tile is f16: wgmma needs both operands f16
    if cfg.unpack == "magic_fold":            # x's sums per fold block, beside x
        args.insert(5, qm.fold_group_sums(x_pad, bits=c.bits, slab=c.slab, group_rows=c.group_rows))
    reduce = reduces_splits(cfg, interpret)
    rows = rows_out(cfg)
    f = build(c.bits, c.slab, c.group_rows, c.k_pad, c.n, len(c.experts), num_blocks, rank_pad, cfg, bool(interpret),
              reduce, rows)
    if reduce:      # [N, B*MB] ([B*MB, N] by rows) float32, the splits already summed
        acc = jax.new_ref(jnp.zeros((num_blocks * mb, c.n) if rows else (c.n, num_blocks * mb), jnp.float32))
        f(*args, acc)
        return acc[...]
    return f(*args)


def _class_matmul(x, group_sizes, c: ExpertClass, cfg: Config | None, interpret: bool):
    """Rows of this class's experts -> (y [M, N] with zeros elsewhere)."""
    m, k = x.shape
    ec = len(c.experts)
    cfg, num_blocks = class_config(m, c, cfg)
    mb = cfg.block_m
    gs = group_sizes.astype(jnp.int32)
    offsets = jnp.cumsum(gs) - gs                        # global sorted-row offsets
    class_ids = jnp.asarray(c.experts, jnp.int32)
    gs_c = gs[class_ids]                                 # [Ec]
    counts = (gs_c + mb - 1) // mb                       # blocks per local expert
    pad_start = (jnp.cumsum(counts) - counts) * mb       # first padded row of each local expert
    # destination of every sorted row in the padded buffer (rows of other classes: out of range)
    row_expert = reference.row_expert_ids(gs, m)         # global expert (E past the end)
    local_of = jnp.full((group_sizes.shape[0] + 1,), -1, jnp.int32).at[class_ids].set(jnp.arange(ec, dtype=jnp.int32))
    local = local_of[row_expert]
    in_class = local >= 0
    lsafe = jnp.maximum(local, 0)
    dest = jnp.where(in_class, pad_start[lsafe] + jnp.arange(m, dtype=jnp.int32) - offsets[class_ids[lsafe]],
                     num_blocks * mb)
    x_pad = jnp.zeros((num_blocks * mb, c.k_pad), jnp.bfloat16).at[dest, :k].set(x.astype(jnp.bfloat16), mode="drop")
    out = class_kernel(x_pad, counts, c, cfg, num_blocks, interpret)   # [splits * N, B * MB] or by rows
    splits = 1 if reduces_splits(cfg, interpret) else cfg.k_splits
    return _read_back(out, dest, in_class, num_blocks * mb, splits, c.n, rows_out(cfg))


def _read_back(out, dest, in_class, rows_pad: int, splits: int, n: int, rows: bool = False):
    """[splits*N, rows_pad] kernel output ([rows_pad, splits*N] with rows) -> [M, N] float32 rows of this
    class (zeros elsewhere).

    Blocks the kernel skipped were never written: only the M rows of this class are gathered, and
    the split-K partials are summed after the gather (at decode the buffer is mostly unwritten)."""
    index = jnp.minimum(dest, rows_pad - 1)
    if rows:
        y = jnp.take(out.reshape(rows_pad, splits, n), index, axis=0).astype(jnp.float32).sum(1)
    else:
        y = jnp.take(out.reshape(splits, n, rows_pad), index, axis=2).astype(jnp.float32).sum(0).T
    return jnp.where(in_class[:, None], y, 0.0)


# Prefill: from this many rows on, a single-class layer dequantizes every expert once (the dequantize
# kernel, magic unpack for 3-bit) and runs jax's Mosaic GPU ragged_dot (a persistent bf16 grouped
# GEMM) instead of re-dequantizing each weight tile per MB-row block in the decode kernel.
PREFILL_ROWS = 1024
# jax.experimental.pallas.ops.gpu.ragged_dot_mgpu tile configuration for the prefill GEMM. Measured
# (H100, 2026-11-23, benchmarks/results/prefill_probe.json; Mixtral expert shapes, 8192 rows over 8
# experts): 128 x 128 x 64 tiles, 5 stages, grid_block_n 4: 1540 us (625 TFLOP/s) for K=4096, N=14336
# and 1590 us (605) for K=14336, N=4096; 4 stages 1670 / 1608; block_m 64 2566; grid_block_n 1 2098;
# block_n 256 8648; XLA's ragged_dot 9374 / 9173 us.
PREFILL_GEMM = dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=5, grid_block_n=4)


def dequantize_class(c, interpret: bool = False) -> jax.Array:
    """W_hat^T of every expert of class c: [Ec, N, K_pad] bf16 (rows k >= K are zero padding)."""
    ec = len(c.experts)
    if isinstance(c, FloatClass):
        return c.w_t.reshape(ec, c.n, c.k_pad)
    return dequantize_layer(GroupedKernelWeights(classes=(c,), num_experts=ec, k=c.k, n=c.n), interpret)


def dequantize_layer(gkw: GroupedKernelWeights, interpret: bool = False) -> jax.Array:
    """W_hat^T of every expert by position (`gkw.order`): [E, N, K_out] bf16, K_out the smallest K_pad of
    the quantized classes (>= K; columns past K are zero). One dequantize launch writes every quantized
    class's rows into one buffer (no concatenation copy); bf16 experts are copied into their rows."""
    quantized = [c for c in gkw.classes if not isinstance(c, FloatClass)]
    e, n = gkw.num_experts, gkw.n
    if not quantized:                                  # bf16 experts only (one FloatClass): already W^T
        return dequantize_class(gkw.classes[0], interpret)
    from pallas_kernels.quant_matmul import mgpu_sm90 as qm
    k_out = min(c.k_pad for c in quantized)
    starts = np.cumsum([0] + [len(c.experts) for c in gkw.classes])[:-1]
    plans = tuple(qm.DequantClass(bits=c.bits, slab=c.slab, group_rows=c.group_rows, k_pad=c.k_pad,
                                  num_experts=len(c.experts), unpack=qm.dequant_unpack(c.layout), start=int(st))
                  for c, st in zip(gkw.classes, starts) if not isinstance(c, FloatClass))
    f = qm.build_dequant_classes(plans, n, k_out, e, bool(interpret))
    w_t = f(*[a for c in quantized for a in (c.codes, c.scales, c.zeros)]).reshape(e, n, k_out)
    for c, st in zip(gkw.classes, starts):
        if isinstance(c, FloatClass):                  # bf16 rows: K_pad = K rounded to 64 <= k_out
            wf = jnp.pad(dequantize_class(c), ((0, 0), (0, 0), (0, k_out - c.k_pad)))
            w_t = lax.dynamic_update_slice(w_t, wf.astype(w_t.dtype), (int(st), 0, 0))
    return w_t


def _uniform(gkw: GroupedKernelWeights) -> bool:
    """One class holding every expert in order (what the prefill path's single GEMM needs)."""
    return len(gkw.classes) == 1 and tuple(gkw.classes[0].experts) == tuple(range(gkw.num_experts))


def _prefill_classes(gkw: GroupedKernelWeights) -> bool:
    """Whether the prefill path takes gkw: one class holding every expert in order (`_uniform`), or
    several classes (mixed precision, bf16 experts among them) none of which has a compensator."""
    return _uniform(gkw) or all(getattr(c, "u", None) is None for c in gkw.classes)


def prefill_applies(m: int, gkw: GroupedKernelWeights) -> bool:
    """Whether `grouped_matmul_mgpu` takes the prefill path by default: at least PREFILL_ROWS rows and
    classes `_prefill_classes` takes."""
    return m >= PREFILL_ROWS and _prefill_classes(gkw)


def relabel_experts(gkw: GroupedKernelWeights, new_id) -> GroupedKernelWeights:
    """The same weights with expert e renamed new_id[e] (a permutation of 0 .. E-1; no array is copied).
    With new_id = positions(gkw.order) the experts' ids are their positions, so the prefill path's class
    stacking is already in id order and permutes no rows."""
    classes = tuple(dataclasses.replace(c, experts=tuple(int(new_id[e]) for e in c.experts)) for c in gkw.classes)
    return dataclasses.replace(gkw, classes=classes)


def grouped_matmul_prefill(x: jax.Array, gkw: GroupedKernelWeights, group_sizes: jax.Array, *,
                           interpret: bool = False, gemm: dict | None = None) -> jax.Array:
    """Prefill path: dequantize each expert once, then a bf16 grouped GEMM (jax's ragged_dot_mgpu;
    in interpret mode jax.lax.ragged_dot stands in for it), compensators as two more ragged_dots.
    x [M, K] sorted by expert -> [M, N] in x.dtype; rows past sum(group_sizes) are 0.

    Several classes (mixed precision): every class dequantized by one launch into one buffer with the
    experts in class order (positions, `dequantize_layer`), x's rows permuted into that order and the
    product's rows back (two row gathers); compensators only in the one-class form (`_prefill_classes`)."""
    if not _prefill_classes(gkw):
        raise ValueError("grouped_matmul prefill path: needs one class holding every expert in order, or classes "
                         f"without compensators (got classes {[c.experts for c in gkw.classes]} with ranks "
                         f"{[None if getattr(c, 'u', None) is None else c.u.shape[-1] for c in gkw.classes]})")
    m, k = x.shape
    gs = group_sizes.astype(jnp.int32)
    xb = x.astype(jnp.bfloat16)
    order = gkw.order
    w_t = dequantize_layer(gkw, interpret)          # [E, N, K_out] by position, one launch
    k_pad = w_t.shape[2]
    if order != tuple(range(gkw.num_experts)):   # experts by position: rows and group sizes follow
        dest, in_groups, _ = position_rows(gs, order, m)
        dest = jnp.where(in_groups, dest, jnp.arange(m, dtype=jnp.int32))   # rows past the groups stay: a permutation
        source = jnp.zeros((m,), jnp.int32).at[dest].set(jnp.arange(m, dtype=jnp.int32))
        x_rows, gs_rows = jnp.take(xb, source, axis=0), gs[np.asarray(order)]
    else:
        dest, x_rows, gs_rows = None, xb, gs
    m8 = -(-m // 8) * 8                  # ragged_dot_mgpu's TMA tiles need M a multiple of 8
    xp = jnp.pad(x_rows, ((0, m8 - m), (0, k_pad - k)))
    if interpret:
        y = lax.ragged_dot(xp, jnp.swapaxes(w_t, 1, 2), gs_rows, preferred_element_type=jnp.float32)
    else:
        from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu
        y = ragged_dot_mgpu.ragged_dot(xp, w_t, group_sizes=gs_rows, transpose_rhs=True, **(gemm or PREFILL_GEMM))
    # rows back in the GEMM's own dtype (bf16 natively: half the bytes of gathering the float32 cast)
    y = (y[:m] if dest is None else jnp.take(y, dest, axis=0)).astype(jnp.float32)
    c = gkw.classes[0]
    if getattr(c, "u", None) is not None:   # one class (in order): the compensator's two ragged_dots
        r = c.u.shape[2]
        xu = lax.ragged_dot(xb, c.u, gs, preferred_element_type=jnp.float32).astype(jnp.bfloat16)
        v = jnp.swapaxes(c.v_t.reshape(len(c.experts), c.n, -1)[:, :, :r], 1, 2)   # [E, R, N]
        y = y + lax.ragged_dot(xu, v, gs, preferred_element_type=jnp.float32)
    rows_used = jnp.arange(m) < jnp.sum(gs)          # the GEMM leaves rows past the groups unwritten
    return jnp.where(rows_used[:, None], y, 0.0).astype(x.dtype)


def grouped_matmul_mgpu(x: jax.Array, w, group_sizes: jax.Array, *, config: Config | None = None,
                        interpret: bool = False, prefill: bool | None = None) -> jax.Array:
    """x [M, K] sorted by expert -> [M, N] in x.dtype (bf16 math) through the Mosaic GPU kernel.

    w: GroupedKernelWeights (from `prepare_grouped`, repack once at load time) or anything
    prepare_grouped takes (then repacked inside every call). prefill: None = `prefill_applies`
    (M >= PREFILL_ROWS, classes it takes), True / False to force (see grouped_matmul_prefill)."""
    gkw = prepare_grouped(w)
    reference.check_args(x, gkw, group_sizes)
    if prefill is None:
        prefill = config is None and prefill_applies(x.shape[0], gkw)
    if prefill:
        return grouped_matmul_prefill(x, gkw, group_sizes, interpret=interpret)
    from pallas_kernels.grouped_matmul import multi_class_sm90
    if config is None and multi_class_sm90.applies(gkw):   # mixed precision: one launch for all classes
        return multi_class_sm90.multi_class_matmul(x, gkw, group_sizes, interpret=interpret).astype(x.dtype)
    y = None
    for c in gkw.classes:              # one launch per bit-width class
        yc = _class_matmul(x, group_sizes, c, config, interpret)
        y = yc if y is None else y + yc
    return y.astype(x.dtype)
