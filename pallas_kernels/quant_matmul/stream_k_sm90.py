"""Stream-K decode kernel (Hopper, Mosaic GPU): a persistent grid whose one pipeline runs across work.

Why (pallas_kernels/quant_matmul/NOTES.md, stop 11): the split-K decode kernel (mgpu_sm90.build)
gives every CTA one (column tile, K split) of only 2 pipeline steps at M=1 on 4096 x 14336; its loads
alone (no unpack, no MMA) took 11-13 us of the ~8.5 us the bytes need at the copy ceiling: each CTA
pays a pipeline prologue and an epilogue, and 896 CTAs run in ~1.7 waves.

Here the work is the flat list of T = m_blocks * (N / BN) * (K / tile) steps, ordered (token block,
column tile, K tile) with K fastest, and CTA j takes the contiguous range [j * L, (j + 1) * L): a few
CTAs per SM, each with a single `emit_pipeline` over its L steps, so loads stay in flight from the
first step to the last, across column tiles. A range that crosses into a new column tile stores the
finished partial sum and starts a new one (the accumulator is the pipeline's carry). A column tile is
shared by at most `slots` consecutive CTAs; each writes its float32 partial to its own slot of
out [slots, M_pad, N] (slot = CTA index - first CTA of the tile; [slots, N, M_pad] without ROWS_OUT) and
the wrapper sums the slots that were written (a static mask: which slots a tile has follows from T, L
and the tiling alone).

The per-step work (unpack + wgmma into acc[BN, MB] += A[BN, BK] @ x^T) is the split-K kernel's
(`mgpu_sm90._unpack_and_multiply`), or under unpack="magic_fold" (the default up to 16 tokens per
block) `mgpu_sm90._fold_unpack_and_multiply`: unscaled codes, one wgmma per group, scale and zero
folded into the float32 carry with x's group sums (an extra input, [Kp / F, M_pad]). The compensator is added by the range that holds a column tile's
K tile 0, in that step: its x @ u rows and v^T columns load while the step unpacks and multiplies,
and one more wgmma adds them at the step's end. (Fetching them there and adding them at the range's
last step for the tile hung natively once a range held several steps of a tile: H100, 2026-11-24.)
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from milo_jax.quant import packing
from pallas_kernels.quant_matmul import layout, mgpu_sm90 as base, prepass_sm90
from pallas_kernels.quant_matmul.layout import KernelWeights

H100_SMS = 132
# With a compensator, run x's pad, fold sums and x @ u as one Mosaic pre-pass (prepass_sm90) instead of
# three XLA ops (a module switch so that benchmarks can time both: --set stream_k_sm90.PREPASS=False).
PREPASS = True
# The same pre-pass without a compensator (pad and fold sums only) in place of XLA's pad + reduce fusion
# (1.4 us): slower, so off (4096 x 14336 M = 1, H100: 17.3 vs 16.1 us on full boxes, s25a; 16.8 vs 16.2 on
# short boxes, s26a).
PREPASS_RANK0 = False
# The partials by token row, [slots, M_pad, N] (each CTA's [BN, MB] accumulator turned WGMMA_TRANSPOSED and
# stored through the transposed view of an [MB, BN] tile, as grouped_matmul's ROWS_OUT), so the slot sum reads
# only the M real rows; False: [slots, N, M_pad], where at M = 1 the sum read MB = 8 padded rows per real one.
# 4096 x 14336 3-bit g64, us at M = 1 / 4 / 16 / 64 (H100, 2026-12-07, s28b, same call): 16.0 / 16.3 / 17.9 / 28.9
# against 16.1 / 16.3 / 18.0 / 30.2; rank 32 at M = 1 18.2 vs 18.4. Native tests pass with it (31, s28b).
ROWS_OUT = True
# A producer warpgroup per CTA (`plgpu.emit_pipeline_warp_specialized`): one warpgroup only issues the TMA loads,
# WS_STAGES steps ahead, the other unpacks and multiplies, so loads are never held up behind a step's compute.
# Why (NOTES.md, stop 29): the kernel's loads alone reach 81% of copy with this pipeline, the whole kernel 63%.
# magic_fold (the default up to 16 tokens) without a compensator only: the other steps allocate scoped buffers,
# which a one-warpgroup region cannot (interpret mode refuses it).
# With ONE compute warpgroup (WS_COMPUTE_WGS = 1) it was slower: 4096 x 14336 3-bit, kernel us at M = 1 / 4 / 16,
# 15.21 / 15.41 / 16.71 against 13.57 / 13.68 / 14.91 (6 stages 15.50; two CTAs per SM 17.5; H100, 2026-12-08,
# s30a): the default's two CTAs per SM are two compute warpgroups per SM, and the kernel is issue-bound (NOTES,
# stops 15 and 23). So WS_COMPUTE_WGS = 2: two compute warpgroups per CTA (one CTA per SM), each running the
# step on its half of BN = 128 columns (a switch on the warpgroup index picks the static half), both reading
# the step's x and fold sums; the producer keeps WS_STAGES steps in flight for both. Off until timed.
WARP_SPECIALIZED = False
WS_STAGES = 4
WS_COMPUTE_WGS = 2
WS_MEMORY_REGISTERS = 40   # the producer warpgroup's register budget (setmaxnreg), as jax's Hopper examples use
# CTAs per SM under WARP_SPECIALIZED: the compute warpgroups are raised to (512 - 40) / WS_COMPUTE_WGS registers
# (256 at most), so a CTA takes most of an SM's 64K registers; the schedule deals its steps to one CTA per SM.
WS_CTAS_PER_SM = 1
# Two other forms were built, timed and removed (NOTES.md, stop 26): x @ u inside the decode launch (producer
# CTAs and GMEM semaphores; 20.6 vs 18.4 us at M = 1, rank 32) and x's fold sums inside the kernel (a ones @
# x^T wgmma per MMA chunk; 16.6 vs 16.3 us at M = 1, 23.7 vs 18.3 at M = 16), H100 2026-12-07.


@dataclasses.dataclass(frozen=True)
class Schedule:
    """How T steps are dealt to CTAs: CTA j runs steps [j * per_cta, min((j + 1) * per_cta, total))."""
    total: int           # T = m_blocks * col_tiles * k_tiles
    per_cta: int         # L
    ctas: int            # ceil(T / L)
    k_tiles: int         # steps per (token block, column tile)
    slots: int           # most CTAs that share one column tile

    def written(self) -> np.ndarray:
        """[slots, tiles] bool: slot s of tile b holds a partial sum (tiles = m_blocks * col_tiles)."""
        tiles = self.total // self.k_tiles
        b = np.arange(tiles)
        first = (b * self.k_tiles) // self.per_cta
        last = ((b + 1) * self.k_tiles - 1) // self.per_cta
        return np.arange(self.slots)[:, None] <= (last - first)[None, :]


def schedule(total: int, k_tiles: int, max_ctas: int) -> Schedule:
    per = -(-total // max_ctas)
    ctas = -(-total // per)
    tiles = total // k_tiles
    b = np.arange(tiles)
    slots = int(((((b + 1) * k_tiles - 1) // per) - (b * k_tiles) // per).max()) + 1
    return Schedule(total=total, per_cta=per, ctas=ctas, k_tiles=k_tiles, slots=slots)


def build(bits: int, slab: int, group_rows: int, k_pad: int, n: int, m_pad: int, rank_pad: int,
          cfg: base.Config, max_ctas: int, interpret: bool, xu_parts: int = 0, rows: bool = False,
          ws_stages: int = 0, ws_wgs: int = 1):
    """f(codes, scales, zeros, x [m_pad, k_pad] bf16[, xu, v_t [N, Rp]][, xs [Kp / F, m_pad]]) ->
    float32 partial sums [slots, N, m_pad] ([slots, m_pad, N] with rows; slots the schedule does not
    write are garbage).
    xu: x @ u [m_pad, Rp] bf16 (xu_parts = 0) or its per-K-tile shares [xu_parts, m_pad, Rp] from the
    pre-pass (prepass_sm90), which the compensator step multiplies by v^T one by one.
    xs (unpack magic_fold only): x's sums over fold blocks of F rows (mgpu_sm90.fold_group_sums).
    ws_stages > 0: a producer warpgroup issuing the loads ws_stages steps ahead and ws_wgs compute
    warpgroups, each on BN / ws_wgs of the step's columns (see WARP_SPECIALIZED)."""
    cfg = dataclasses.replace(cfg, k_splits=1)
    tl = base._tiling(bits, slab, k_pad, n, cfg)
    wps, tile_rows, kt = tl.wps, tl.tile_rows, tl.steps
    bn, mb, chunk, nchunks = tl.bn, tl.mb, tl.chunk, tl.nchunks
    if m_pad % mb:
        raise ValueError(f"M={m_pad} is not tiled by MB={mb}")
    g_block, scale_index = base._scale_blocks(group_rows, tile_rows, k_pad)
    col_tiles = n // bn
    sched = schedule((m_pad // mb) * col_tiles * kt, kt, max_ctas)
    per, total = sched.per_cta, sched.total
    comp = rank_pad > 0
    parts = xu_parts
    plan = base._unpack_plan(cfg.unpack, cfg.a_regs, cfg.overlap, bits, chunk, nchunks, slab, scales_upfront=True)
    # the compensator step and the non-fold steps allocate scoped buffers, which a one-warpgroup region cannot
    # (interpret mode refuses it): warp specialization for magic_fold without a compensator only
    warp_specialized = ws_stages > 0 and plan.fold and not comp
    wgs = ws_wgs if warp_specialized else 1
    if bn % (64 * wgs):
        raise ValueError(f"{wgs} compute warpgroups need BN = {bn} to hold 64 columns each")
    bw = bn // wgs                                  # columns per compute warpgroup
    tr = base._swizzle_transforms(slab)
    tr_r = base.compensator_transforms(rank_pad)
    # x is wgmma's B operand; with A in registers its swizzle is free: 128 B (64 K columns) when the
    # per-MMA K slice (chunk * slab) allows, else the A tile's slab-wide swizzle (32 B boxes)
    f_rows, mma_k = base.fold_blocks(group_rows, tile_rows, slab) if plan.fold else (tile_rows, chunk * slab)
    nf = tile_rows // f_rows
    tr_x = base.x_transforms(mma_k, slab, plan.a_regs)
    wg = plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup)

    def where_is(j, s):
        """Step s of CTA j -> (valid, token block, column tile, K tile, first, last, slot)."""
        g = j * per + s
        valid = g < total
        g = jnp.minimum(g, total - 1)
        tile, t = g // kt, g % kt
        first = (s == 0) | (t == 0)
        last = (s == per - 1) | (t == kt - 1) | (g == total - 1)
        slot = j - (tile * kt) // per
        return valid, tile // col_tiles, tile % col_tiles, t, first, last, slot

    def kernel(*refs):
        n_in = (6 if comp else 4) + plan.fold
        ins, out = refs[:n_in], refs[n_in]
        rest = list(refs[n_in + 1:])
        a_buf = None if plan.a_regs else rest.pop(0)
        o_smem = rest.pop(0)
        codes, scales, zeros, x = ins[:4]
        j = lax.axis_index("cta")

        def tile_of(s):
            _, mi, ci, t, *_ = where_is(j, s)
            return mi, ci, t

        def body(idx, *step_refs):
            (s,) = idx
            *step_refs, acc = step_refs
            codes_s, s_ref, z_ref, x_ref = step_refs[:4]
            xs_ref = step_refs[4] if plan.fold else None
            valid, mi, ci, t, first, last, slot = where_is(j, s)
            if comp:
                xu, v_t = ins[4:6]
                xu_smem, v_smem, bar = rest[0], rest[1], rest[2]
                # the range holding K tile 0 adds the compensator: its operands load during this
                # step's unpack and MMA, and are multiplied in at the end of the same step
                xu_tile = xu.at[:, pl.ds(mi * mb, mb)] if parts else xu.at[pl.ds(mi * mb, mb)]
                base._compensator_copies(t == 0, xu_tile, v_t.at[pl.ds(ci * bn, bn)], xu_smem, v_smem, bar)
            def planes_of(h):   # the code words of column part h (of wgs): wps arrays [bw, slab] uint32
                rows_h = slice(None) if wgs == 1 else pl.ds(h * bw, bw)
                return [codes_s.at[rows_h, pl.ds(p * slab, slab)][...] for p in range(wps)]

            planes = planes_of(0) if wgs == 1 else None                 # [BN, slab] uint32
            zero = jnp.zeros((bw, mb), jnp.float32)
            if not interpret:
                zero = plgpu.layout_cast(zero, plgpu.Layout.WGMMA)
            acc = lax.cond(first, lambda a: zero, lambda a: a, acc)     # a new column tile

            def step(acc_ref):
                base._unpack_and_multiply(acc_ref, a_buf, planes, s_ref, z_ref, x_ref, bits=bits, slab=slab,
                                          bn=bn, chunk=chunk, nchunks=nchunks, group_rows=group_rows,
                                          g_block=g_block, plan=plan, interpret=interpret)
                plgpu.wgmma_wait(0)

            if plan.fold:   # scale and zero folded in float32 per group (mgpu_sm90._fold_unpack_and_multiply)
                def fold(h, a):   # column part h: its code words, scales and zeros (one part: the whole tile)
                    cols = pl.ds(h * bw, bw)
                    words, sc, zr = ((planes, s_ref, z_ref) if wgs == 1 else
                                     (planes_of(h), s_ref.at[:, cols], z_ref.at[:, cols]))
                    return base._fold_unpack_and_multiply(
                        a, words, sc, zr, x_ref, xs_ref, bits=bits, slab=slab, bn=bw, mb=mb,
                        group_rows=group_rows, g_block=g_block, tile_rows=tile_rows, interpret=interpret)
                if wgs == 1:
                    acc = fold(0, acc)
                else:       # each compute warpgroup its own static half (the branch index is the warpgroup's)
                    acc = lax.switch(lax.axis_index("wg"), [functools.partial(fold, h) for h in range(wgs)], acc)
            else:
                acc = base._run_acc(step, acc, interpret)
            if comp:
                acc = base._add_compensator(acc, t == 0, v_smem, xu_smem, bar, interpret, parts=parts)

            @pl.when(last & valid)
            def _store():
                h = lax.axis_index("wg") if wgs > 1 else None      # this warpgroup's buffer and columns
                o_h = o_smem if h is None else o_smem.at[h]
                # evaluated where the destination is built: the one-warpgroup kernel's ops in their old order
                col0 = lambda: ci * bn if h is None else ci * bn + h * bw
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)          # o_smem's last store has read it
                if not rows:
                    o_h[...] = acc
                    dst = out.at[slot, pl.ds(col0(), bw), pl.ds(mi * mb, mb)]
                else:
                    if interpret:
                        o_h[...] = acc.T
                    else:   # lanes swap 2x2 blocks, then the store goes through the transposed view
                        o_h.T[...] = plgpu.layout_cast(acc, plgpu.Layout.WGMMA_TRANSPOSED)
                    dst = out.at[slot, pl.ds(mi * mb, mb), pl.ds(col0(), bw)]
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(o_h, dst)
            return acc

        # one TMA box for the tile's wps planes (wps * slab words per row: 192 B at 3 bits, where
        # one box per plane moved 64 B rows); x with the widest swizzle its wgmma slices allow
        in_specs = [
            plgpu.BlockSpec((bn, wps * slab), lambda s: (tile_of(s)[1], tile_of(s)[2])),
            plgpu.BlockSpec((g_block, bn), lambda s: (scale_index(tile_of(s)[2]), tile_of(s)[1])),
            plgpu.BlockSpec((g_block, bn), lambda s: (scale_index(tile_of(s)[2]), tile_of(s)[1])),
            plgpu.BlockSpec((mb, tile_rows), lambda s: (tile_of(s)[0], tile_of(s)[2]), transforms=tr_x),
        ]
        pipe_in = [codes, scales, zeros, x]
        if plan.fold:   # the fold blocks' sums of x: [Kp / F, M_pad] float32, nf rows per K tile
            in_specs.append(plgpu.BlockSpec((base.fold_rows_per_tile(nf), mb),
                                            lambda s: (tile_of(s)[2], tile_of(s)[0])))
            pipe_in.append(ins[-1])
        def init():
            zero = jnp.zeros((bw, mb), jnp.float32)
            return zero if interpret else plgpu.layout_cast(zero, plgpu.Layout.WGMMA)

        if warp_specialized:
            def compute(pipeline):   # runs in the compute warpgroup only; the body's stores are its own
                pipeline(init())
                plgpu.wait_smem_to_gmem(0)
            plgpu.emit_pipeline_warp_specialized(
                body, grid=(per,), memory_registers=WS_MEMORY_REGISTERS, in_specs=in_specs,
                max_concurrent_steps=ws_stages, wg_axis="wg", num_compute_wgs=wgs, compute_context=compute)(*pipe_in)
        else:
            plgpu.emit_pipeline(body, grid=(per,), in_specs=in_specs, max_concurrent_steps=cfg.stages,
                                init_carry=init())(*pipe_in)
            plgpu.wait_smem_to_gmem(0)

    scratch = [] if plan.a_regs else [plgpu.SMEM((plan.nbuf, bn, chunk * slab), plan.a_dtype, transforms=tr)]
    staging = (mb, bw) if rows else (bw, mb)                # per compute warpgroup
    scratch += [plgpu.SMEM(staging if wgs == 1 else (wgs,) + staging, jnp.float32)]
    if comp:
        scratch += [plgpu.SMEM((parts, mb, rank_pad) if parts else (mb, rank_pad), jnp.bfloat16, transforms=tr_r),
                    plgpu.SMEM((bn, rank_pad), jnp.bfloat16, transforms=tr_r),
                    plgpu.Barrier(num_arrivals=2)]
    out_shape = (sched.slots, m_pad, n) if rows else (sched.slots, n, m_pad)
    threads = dict(num_threads=wgs + 1, thread_name="wg") if warp_specialized else {}
    f = plgpu.kernel(kernel, out_type=jax.ShapeDtypeStruct(out_shape, jnp.float32),
                     grid=(sched.ctas,), grid_names=("cta",), compiler_params=wg, scratch_types=scratch,
                     **threads, **base._interpret_params(interpret))
    return f, sched


def max_ctas_default(per_sm: int = 2) -> int:
    """CTAs the schedule may use: per_sm per SM of the local GPU (132 SMs on the H100; 4 in interpret runs,
    enough to give tiles several ranges)."""
    try:
        dev = jax.devices()[0]
        sms = getattr(dev, "core_count", None) if dev.platform == "gpu" else None
    except RuntimeError:
        sms = None
    return per_sm * (sms or H100_SMS)


def matmul_stream_k(x: jax.Array, kw: KernelWeights, *, config: base.Config | None = None,
                    max_ctas: int | None = None, interpret: bool = False) -> jax.Array:
    """x [M, K] -> bf16 [M, N] through the stream-K decode kernel (weights in the kernel layout)."""
    m, k = x.shape
    if k != kw.k:
        raise ValueError(f"quant_matmul: x {tuple(x.shape)} does not match K={kw.k}")
    cfg = config or base.default_config(m, kw, schedule="stream_k")
    if cfg.block_m == 0:
        cfg = dataclasses.replace(cfg, block_m=base.default_config(m, kw).block_m)
    per = packing.slots_per_tile(kw.bits)
    if per % cfg.chunk_slots:
        cfg = dataclasses.replace(cfg, chunk_slots=per)
    if cfg.unpack.startswith("magic") != (kw.layout == layout.PAIRS_LAYOUT):
        raise ValueError(f"quant_matmul: unpack={cfg.unpack!r} does not read weights in layout {kw.layout!r}")
    mb = cfg.block_m
    m_pad = -(-m // mb) * mb
    rank_pad = 0 if kw.u is None else kw.v_t.shape[1]
    fold = cfg.unpack == "magic_fold"
    ws_stages = WS_STAGES if WARP_SPECIALIZED and fold and not rank_pad else 0   # where build can specialize
    ws_wgs = WS_COMPUTE_WGS if ws_stages else 1
    if ws_wgs > 1 and config is None and kw.n % (64 * ws_wgs) == 0:   # 64 of the tile's columns per warpgroup
        cfg = dataclasses.replace(cfg, block_n=64 * ws_wgs)
    if cfg.block_n % (64 * ws_wgs):
        ws_wgs = 1
    max_ctas = max_ctas or (4 if interpret else max_ctas_default(WS_CTAS_PER_SM if ws_stages else 2))
    tile_rows = kw.tile_rows
    k_tiles = kw.k_pad // tile_rows
    parts = 0
    if ((PREPASS and rank_pad or PREPASS_RANK0 and fold and not rank_pad) and cfg.unpack != "magic_f16"
            and prepass_sm90.usable(m, k, mb, kw.rank, rank_pad, k_tiles, tile_rows)):
        # one launch for the pad, the fold sums and x @ u (prepass_sm90: the compensator's XLA ops were
        # +4.5 us on a 15.5 us call)
        f_rows = base.fold_blocks(kw.group_rows, tile_rows, kw.slab)[0] if fold else tile_rows
        xp, xs, xu = prepass_sm90.prepass(x, kw.u, mb=mb, k_pad=kw.k_pad, tile_rows=tile_rows, f_rows=f_rows,
                                          rank_pad=rank_pad, interpret=bool(interpret))
        args = [kw.codes, kw.scales, kw.zeros, xp] + ([xu, kw.v_t] if rank_pad else []) + ([xs] if fold else [])
        parts = k_tiles if rank_pad else 0
    else:           # x padded, x @ u and the fold sums by XLA
        xp = jnp.pad(x.astype(jnp.bfloat16), ((0, m_pad - m), (0, kw.k_pad - k)))
        if cfg.unpack == "magic_f16":
            xp = xp.astype(jnp.float16)
        args = [kw.codes, kw.scales, kw.zeros, xp]
        if rank_pad:
            args += [base.compensator_xu(xp, kw.u, k, rank_pad), kw.v_t]
        if fold:
            args.append(base.fold_group_sums(xp, bits=kw.bits, slab=kw.slab, group_rows=kw.group_rows))
    f, sched = _build_cached(kw.bits, kw.slab, kw.group_rows, kw.k_pad, kw.n, m_pad, rank_pad, cfg,
                             max_ctas, bool(interpret), parts, ROWS_OUT, ws_stages, ws_wgs)
    partials = f(*args)                                # [slots, N, m_pad] f32; by rows [slots, m_pad, N]
    bn = cfg.block_n
    written = sched.written().reshape(sched.slots, m_pad // mb, kw.n // bn)
    if ROWS_OUT:   # the real rows only; a slot's mask is per (token block, column tile)
        mask = np.repeat(written, mb, axis=1)[:, :m, :, None]                   # [slots, m, col_tiles, 1]
        real = partials[:, :m].reshape(sched.slots, m, kw.n // bn, bn)
        return jnp.where(jnp.asarray(mask), real, 0.0).sum(0).reshape(m, kw.n).astype(jnp.bfloat16)
    partials = partials.reshape(sched.slots, kw.n // bn, bn, m_pad // mb, mb)
    mask = jnp.asarray(written.transpose(0, 2, 1))[:, :, None, :, None]
    y_t = jnp.where(mask, partials, 0.0).sum(0).reshape(kw.n, m_pad)
    return y_t[:, :m].T.astype(jnp.bfloat16)


@functools.lru_cache(maxsize=None)
def _build_cached(*args):
    return build(*args)
