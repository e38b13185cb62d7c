"""One launch for a mixed-precision expert layer: every bit-width class in one Mosaic GPU grid.

Why: `mgpu_sm90.grouped_matmul_mgpu` launches one kernel per bit-width class, each with its own
padded copy of x, its own split-K partial buffer and its own read-back. On a mixed 2/3/4-bit Mixtral
FFN at 1 token that cost 136.6 us against 99.7 us for the uniform 3-bit layer with the same bytes
(H200, 2026-12-02, benchmarks/results/moe_layer_s14a_mixtral.md): +11 us of Mosaic time for the
extra launches (a class with no rows still launches its grid) and +25 us of XLA ops around them.

Here the experts are ordered by class ("positions": class 0's experts, then class 1's, ...), x is
scattered once into one padded buffer in that order (every expert's segment starts at a multiple
of MB rows), and one grid (N/BN, B, splits) covers all row blocks: a CTA finds its position from the
block counts (an unrolled select over the E positions, as `_block_expert`), hence its class and its
expert within the class (static tables), and runs that class's pipeline under `pl.when` (one branch
per class; their shared-memory scopes are disjoint in time). One output, one read-back.

Scope: classes in the "planar_pairs" layout (2/3/4-bit, the magic unpack with A in registers: the
models' default) without compensators, all of one N. Anything else keeps the per-class launches
(`applies` says which).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from milo_jax.quant import packing
from pallas_kernels.grouped_matmul import mgpu_sm90 as grouped
from pallas_kernels.grouped_matmul.mgpu_sm90 import Config, ExpertClass, _read_back, block_m_for
from pallas_kernels.quant_matmul import layout, mgpu_sm90 as qm
from pallas_kernels.quant_matmul.mgpu_sm90 import (_accumulate_and_store, _interpret_params,
                                                   _scale_blocks, _swizzle_transforms, _tiling,
                                                   _unpack_and_multiply, _unpack_plan)


@dataclasses.dataclass(frozen=True)
class ClassPlan:
    """Static description of one class inside the multi-class kernel."""
    bits: int
    slab: int
    group_rows: int
    k_pad: int
    num_experts: int
    chunk_slots: int


def applies(gkw) -> bool:
    """Whether a layer takes the one-launch path: several classes, all quantized in planar_pairs
    (magic unpack, A in registers), no compensators."""
    cs = gkw.classes
    return len(cs) > 1 and all(isinstance(c, ExpertClass) and c.layout == layout.PAIRS_LAYOUT and c.u is None
                               and c.bits in layout.PAIRS_BITS for c in cs)


# Pipeline depth of the launch under magic_fold. The one-class launches take 3 (grouped.DECODE_STAGES: Mixtral
# FFN 80.7 vs 84.4 us at 1 token, H100 s26g). Here the mixed 2/3/4-bit FFN at 1 token took 86.8 us at 3 against
# 87.3 at 2 (H100, s27a, one process each), then 86.3 against 87.8 (s28a, one call): 3.
FOLD_STAGES = 3


@functools.lru_cache(maxsize=None)
def build(plans: tuple, n: int, num_blocks: int, mb: int, splits: int, k_pad_x: int, interpret: bool,
          scales_upfront: bool = False, fold: bool = False, rows: bool = False):
    """f(counts [E] int32 by position, (codes, scales, zeros) per class, x [B*MB, k_pad_x] bf16)
    -> [splits*N, B*MB] (bf16 for one split, else float32 partials). counts[p] = MB-row blocks of
    the expert at position p (classes in order, each class's experts in order). scales_upfront:
    grouped Config.scales_upfront. fold: quant_matmul's magic_fold unpack in every class; then x's
    sums per fold block follow x, one array per class (`fold_sums`). rows (fold only, grouped.ROWS_OUT):
    the output by padded row, [B*MB, splits*N]."""
    if rows and not fold:
        raise ValueError("multi-class build: rows (ROWS_OUT) needs the fold unpack")
    bn = 64
    cls_of = [ci for ci, p in enumerate(plans) for _ in range(p.num_experts)]
    local_of = [e for p in plans for e in range(p.num_experts)]
    total = len(cls_of)
    n_blocks = n // bn
    out_dtype = jnp.bfloat16 if splits == 1 else jnp.float32
    per_class = []
    for p in plans:
        tl = _tiling(p.bits, p.slab, p.k_pad, n, Config(block_n=bn, block_m=mb, chunk_slots=p.chunk_slots,
                                                       k_splits=splits))
        g_block, scale_index = _scale_blocks(p.group_rows, tl.tile_rows, p.k_pad)
        plan = _unpack_plan("magic_fold" if fold else "magic_bf16", True, True, p.bits, tl.chunk, tl.nchunks,
                            p.slab, scales_upfront=scales_upfront)
        per_class.append((p, tl, g_block, scale_index, (p.k_pad // p.group_rows) // g_block, plan))
    wg = plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup)

    def kernel(*refs):
        counts = refs[0]
        weights = [refs[1 + 3 * i:4 + 3 * i] for i in range(len(plans))]
        x, *xs, out, o_smem = refs[1 + 3 * len(plans):]
        ni = lax.axis_index("n")
        mi = lax.axis_index("m")
        ki = lax.axis_index("k")
        cls, local, end = jnp.int32(0), jnp.int32(0), jnp.int32(0)
        for pos in range(total):           # unrolled: static class / local expert per position
            start = end
            end = start + counts[pos]
            hit = (start <= mi) & (mi < end)
            cls = lax.select(hit, jnp.int32(cls_of[pos]), cls)
            local = lax.select(hit, jnp.int32(local_of[pos]), local)
        valid = mi < end

        def class_specs(ci, x_transforms, **x_kw):
            """Class ci's pipeline inputs at this CTA's expert and column tile: the code planes, scales,
            zeros and x (with `x_transforms`)."""
            p, tl, g_block, scale_index, sbpe, _ = per_class[ci]
            wps, off = tl.wps, ki * tl.steps
            row_block = local * n_blocks + ni             # this expert's column tile in stacked codes
            scale_base = local * sbpe
            specs = [plgpu.BlockSpec((bn, p.slab), (lambda s, q=q: (row_block, wps * (s + off) + q)))
                     for q in range(wps)]
            return specs + [plgpu.BlockSpec((g_block, bn), lambda s: (scale_base + scale_index(s + off), ni)),
                            plgpu.BlockSpec((g_block, bn), lambda s: (scale_base + scale_index(s + off), ni)),
                            plgpu.BlockSpec((mb, tl.tile_rows), lambda s: (mi, s + off), transforms=x_transforms,
                                            **x_kw)]

        def run_class(ci, acc_ref):
            p, tl, g_block, _, _, plan = per_class[ci]
            codes, scales, zeros = weights[ci]
            wps = tl.wps

            def body(_, *step_refs):
                planes = [r[...] for r in step_refs[:wps]]
                s_ref, z_ref, x_ref = step_refs[wps:]
                _unpack_and_multiply(acc_ref, None, planes, s_ref, z_ref, x_ref, bits=p.bits, slab=p.slab,
                                     bn=bn, chunk=tl.chunk, nchunks=tl.nchunks, group_rows=p.group_rows,
                                     g_block=g_block, plan=plan, interpret=interpret)

            specs = class_specs(ci, _swizzle_transforms(p.slab), delay_release=1)
            plgpu.emit_pipeline(body, grid=(tl.steps,), in_specs=specs, max_concurrent_steps=2)(
                *([codes] * wps), scales, zeros, x)
            plgpu.wgmma_wait(0)

        def run_class_fold(ci):   # the accumulator as the pipeline's carry; stores its own tile
            p, tl, g_block, _, _, _ = per_class[ci]
            codes, scales, zeros = weights[ci]
            f_rows, fold_k = qm.fold_blocks(p.group_rows, tl.tile_rows, p.slab)
            specs = class_specs(ci, qm.x_transforms(fold_k, p.slab))
            grouped._fold_pipeline(specs, (*([codes] * tl.wps), scales, zeros, x, xs[ci]), valid & (cls == ci), ki,
                                   mi, ki * tl.steps, out, o_smem, False, (), ni, wps=tl.wps, bits=p.bits, slab=p.slab,
                                   bn=bn, mb=mb, n=n, nf=tl.tile_rows // f_rows, group_rows=p.group_rows,
                                   g_block=g_block, tile_rows=tl.tile_rows, steps=tl.steps, stages=FOLD_STAGES,
                                   interpret=interpret, rows=rows)

        if fold:
            for ci in range(len(plans)):
                run_class_fold(ci)
            return

        def compute(acc_ref):
            for ci in range(len(plans)):
                # one branch per class; blocks past the last real one run none (no weight reads)
                pl.when(valid & (cls == ci))(functools.partial(run_class, ci, acc_ref))
            return acc_ref[...]

        _accumulate_and_store(compute, o_smem, out.at[pl.ds(ki * n + ni * bn, bn), pl.ds(mi * mb, mb)],
                              bn, mb, interpret, store=valid)

    out_shape = (num_blocks * mb, splits * n) if rows else (splits * n, num_blocks * mb)
    return plgpu.kernel(kernel, out_type=jax.ShapeDtypeStruct(out_shape, out_dtype),
                        grid=(n_blocks, num_blocks, splits), grid_names=("n", "m", "k"), compiler_params=wg,
                        scratch_types=[plgpu.SMEM((mb, bn) if rows else (bn, mb), out_dtype)],
                        **_interpret_params(interpret))


def plan_layer(m: int, gkw):
    """(plans, MB, row blocks B, splits, k_pad of x) for M sorted rows through `gkw`."""
    e, n = gkw.num_experts, gkw.n
    mb = block_m_for(m, e)      # E of the whole layer: rows spread over every class's experts
    num_blocks = max(1, min(-(-m // mb) + e, m))
    steps = [c.k_pad // (packing.slots_per_tile(c.bits) * c.slab) for c in gkw.classes]
    active = min(-(-m // mb) + e, max(1, m))          # at most this many real blocks per column tile
    splits = grouped.decode_splits(functools.reduce(math.gcd, steps), (n // 64) * active,   # module constants read per
                                   max(c.k_pad for c in gkw.classes))                     # call: benchmarks override them
    plans = []
    for c in gkw.classes:
        per = packing.slots_per_tile(c.bits)
        chunk = max(2, min(per, (64 if splits > 1 else 128) // c.slab))
        plans.append(ClassPlan(bits=c.bits, slab=c.slab, group_rows=c.group_rows, k_pad=c.k_pad,
                               num_experts=len(c.experts), chunk_slots=chunk))
    return tuple(plans), mb, num_blocks, splits, max(c.k_pad for c in gkw.classes)


def multi_class_matmul(x: jax.Array, gkw, group_sizes: jax.Array, *, interpret: bool = False) -> jax.Array:
    """x [M, K] sorted by expert -> float32 [M, N] (rows past sum(group_sizes) are 0) in one launch."""
    if not applies(gkw):
        raise ValueError("grouped_matmul multi-class launch: needs several planar_pairs classes without "
                         f"compensators (got {[(c.bits, getattr(c, 'layout', None)) for c in gkw.classes]})")
    m, k = x.shape
    plans, mb, num_blocks, splits, k_pad_x = plan_layer(m, gkw)
    dest, in_groups, counts = grouped.position_rows(group_sizes, gkw.order, m, mb)
    dest = jnp.where(in_groups, dest, num_blocks * mb)             # rows past the groups: dropped
    x_pad = jnp.zeros((num_blocks * mb, k_pad_x), jnp.bfloat16).at[dest, :k].set(x.astype(jnp.bfloat16),
                                                                                 mode="drop")
    out = multi_class_kernel(x_pad, counts, gkw, m, interpret)   # [splits * N, B * MB] or by rows
    return _read_back(out, dest, in_groups, num_blocks * mb, splits, gkw.n, rows_out(m, gkw))


def multi_class_kernel(x_pad, counts, gkw, m: int, interpret: bool = False):
    """The one launch over padded rows: x_pad [B*MB, >= K] bf16 in position order (plan_layer(m,
    gkw)), counts [E] int32 MB-row blocks per position -> [splits*N, B*MB] (bf16 for one split, else
    float32 partials; blocks past the last real one are not written),
    [B*MB, splits*N] where `rows_out(m, gkw)`."""
    plans, mb, num_blocks, splits, k_pad_x = plan_layer(m, gkw)
    x_pad = x_pad[:, :k_pad_x] if x_pad.shape[1] >= k_pad_x else jnp.pad(x_pad, ((0, 0), (0, k_pad_x - x_pad.shape[1])))
    fold = uses_fold(plans, mb)
    f = build(plans, gkw.n, num_blocks, mb, splits, k_pad_x, bool(interpret), m <= grouped.UPFRONT_ROWS, fold,
              rows_out(m, gkw))
    args = [a for c in gkw.classes for a in (c.codes, c.scales, c.zeros)]
    x_pad = x_pad.astype(jnp.bfloat16)
    sums = fold_sums(x_pad, plans) if fold else []
    return f(counts, *args, x_pad, *sums)


def rows_out(m: int, gkw) -> bool:
    """Whether the launch for m rows stores its output by padded row (grouped.ROWS_OUT, under the fold)."""
    plans, mb = plan_layer(m, gkw)[:2]
    return grouped.ROWS_OUT and uses_fold(plans, mb)


def uses_fold(plans, mb: int) -> bool:
    """Whether the launch takes magic_fold: grouped.FOLD_MAX_BLOCK_M (the single-class launches' switch)
    and every class's groups made of whole pair-slots.

    Layers holding a g128 class once failed natively with CUDA_ERROR_MISALIGNED_ADDRESS (H200,
    2026-12-03, s18b) and were kept on magic_bf16; the 4-bit g128 class's x-sum boxes were 64 B, so a
    second pipeline stage's TMA destination was not 128-byte aligned. With the boxes padded to 4-row
    multiples (qm.fold_rows_per_tile) the same layers passed natively (s20a), and the exclusion is gone."""
    return mb <= grouped.FOLD_MAX_BLOCK_M and all(not p.group_rows % (2 * p.slab) for p in plans)


def fold_sums(x_pad, plans) -> list:
    """Per class: x's sums over its fold blocks, [tiles * R, B*MB] float32 (qm.fold_group_sums; classes with
    the same fold blocks and tiles share one array: XLA computes it once)."""
    out, cache = [], {}
    for p in plans:
        tile_rows = packing.slots_per_tile(p.bits) * p.slab
        key = (qm.fold_blocks(p.group_rows, tile_rows, p.slab)[0], tile_rows, p.k_pad)
        if key not in cache:
            cache[key] = qm.fold_group_sums(x_pad[:, :p.k_pad], bits=p.bits, slab=p.slab, group_rows=p.group_rows)
        out.append(cache[key])
    return out
