"""Hopper (sm90) Mosaic GPU kernel: y = x @ W_hat + (x @ u) @ v with W_hat dequantized in-kernel.

Orientation (as in shared/design/mgpu_gemv_probe.md): each CTA owns BN output columns and one
block of MB tokens and computes the transposed product
    acc[BN, MB] += A[BN, BK] @ x_tile^T[BK, MB]      (wgmma, f32 accumulator)
where A is the dequantized weight tile, written by the warpgroup into swizzled shared memory
from N-major planar codes (layout.py). The K loop is an `emit_pipeline` over planar tiles
(per * slab rows each); inside a step the slots are dequantized in chunks into two alternating
A buffers, so the (asynchronous) wgmma of one chunk overlaps the unpack of the next.
Epilogue: acc += v_t[BN, Rp] @ xu^T[Rp, MB] (one more wgmma; xu = x @ u comes in as bf16), then
bf16 out through shared memory and TMA into out_t [N, M_pad]. The wrapper transposes back.

Weight bytes are read once per token block; for M <= MB (decode) that is once in total.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from milo_jax.quant import packing
from pallas_kernels.quant_matmul import layout
from pallas_kernels.quant_matmul.layout import KernelWeights


@dataclasses.dataclass(frozen=True)
class Config:
    block_n: int = 64          # output columns per CTA (A rows); 64 or 128
    block_m: int = 0           # tokens per CTA (wgmma N); multiple of 8, <= 128; 0 = from M
    chunk_slots: int = 4       # slots dequantized per wgmma (chunk = chunk_slots * slab K rows)
    stages: int = 2            # pipeline depth (max_concurrent_steps)
    overlap: bool = True       # double-buffered A + wgmma_wait(1); False: wait after every chunk
    k_splits: int = 1          # split K over this many CTAs (f32 partials summed by XLA)
    # How a slab of codes becomes the bf16 A tile (see UNPACKS). "f32" is the measured default;
    # "magic_*" need weights prepared with layout="planar_pairs" (bits 2, 3, 4).
    unpack: str = "f32"
    # magic_* only: hand each dequantized pair-slot ([BN, 2 * slab]) to wgmma straight from
    # registers (WGMMA layout, which the magic conversion already produces) instead of storing the
    # A tile to swizzled shared memory and reading it back: no A buffers, no commit_smem fence.
    a_regs: bool = False
    # "split_k": grid (N/BN, M/MB, k_splits), one (column tile, K split) per CTA, XLA sums the splits.
    # "stream_k": stream_k_sm90.py, a persistent grid (2 CTAs per SM) whose CTAs each run one pipeline
    # over a contiguous range of (column tile, K tile) steps; k_splits is unused there.
    schedule: str = "split_k"


# Unpack/dequant variants of the decode kernel (issue 6: the unpack chain is the bottleneck).
#  f32        shift, mask, int->f32 convert, f32 FMA (q * s - z * s), round to bf16 (~5 instr/code).
#  bf16       jnp level: convert straight to bf16, ((q - z_hi) - z_lo) * s in bf16 (z = z_hi + z_lo).
#  magic_bf16 "planar_pairs" layout; per u32 word of codes (two codes 16 bits apart) inline PTX:
#             shr, lop3 -> v = (128 + c0, 128 + c1) as bf16x2, then fma.bf16x2 v * s + hi and
#             fma.bf16x2 (* 1) + lo, where hi + lo = -(128 + z) * s split into two bf16 (so the
#             per-group offset keeps ~16 bits: with one bf16 offset, -z*s rounded per group gave
#             1.2e-2 relative error per-channel); ~2 instructions per code, no f32, no convert. Needs plgpu.inline_mgpu (native only;
#             interpret mode runs a jnp emulation with the same roundings).
#  magic_f16  the same with 1024 + c as f16x2 and f16 arithmetic (4x finer rounding than bf16);
#             the A tile and x are then f16 (x is converted in the wrapper: activations must be
#             inside f16 range, |x| < 65504).
#  magic_fold "planar_pairs", kernels whose accumulator is a carried value (stream-K; the grouped
#             launches): A = 128 + code exactly (shr, lop3: no scale or zero in
#             the conversion), one wgmma per group into a fresh accumulator, then
#             y += s * acc_g - (128 + z) * s * X in float32 with X the group's sums of x (computed by
#             XLA beside the kernel) (`_fold_unpack_and_multiply`). No bf16 rounding of the weight.
UNPACKS = ("f32", "bf16", "magic_bf16", "magic_f16", "magic_fold")


# Split K until about this many CTAs run (H100: 132 SMs). Measured on 4096 x 14336, 3-bit g64:
# 224 CTAs (no split) 36.7 us, 448 (split 2) 36.8 us, 896 (split 4) 31.1 us at M=1. The same
# target for other shapes is a heuristic (not measured there).
TARGET_CTAS = 7 * 132


def _pick_splits(steps: int, ctas: int, target: int = TARGET_CTAS) -> int:
    best = 1
    for d in range(1, steps + 1):
        if steps % d == 0 and ctas * d <= target:
            best = d
    return best


# Stream-K takes the magic_fold unpack up to this many tokens per block: kernel 14.2 -> 12.9 us at M=1,
# 15.5 -> 14.6 at M=16, but 26.5 -> 31.2 at M=64 (its float32 fold grows with MB), 4096 x 14336 3-bit
# g64, H200, 2026-12-03 (benchmarks/results/logs/h200_2026-12-03_s17c_time_m*.txt).
FOLD_MAX_BLOCK_M = 16


def default_config(m: int, kw: KernelWeights, schedule: str = "stream_k") -> Config:
    """The decode kernel's config for M tokens. Stream-K measured faster than split-K on every shape
    and M tried (H100, 2026-11-24, 3-bit g64; kernel us, split-K -> stream-K): 4096 x 14336 M=1 15.8
    -> 15.1, M=16 19.0 -> 16.0, M=64 ~53 -> ~28; 2048 x 1408 M=1 3.19 -> 3.07, M=64 5.5 -> 4.2
    (benchmarks/results/logs/h100_2026-11-24_s12f_*.txt)."""
    mb = min(128, max(8, -(-m // 8) * 8)) if m <= 64 else 64
    per = packing.slots_per_tile(kw.bits)
    chunk = max(1, min(per, 128 // kw.slab))
    pairs = kw.layout == layout.PAIRS_LAYOUT
    # A from registers with the magic unpack: 17.7 us against 24.0 us through shared memory
    # (4096 x 14336, M=1, H100, 2026-11-23, benchmarks/results/quant_matmul_variants.md)
    unpack = dict(unpack="magic_bf16" if pairs else "f32", a_regs=pairs)
    if schedule == "stream_k" and pairs and mb <= FOLD_MAX_BLOCK_M and not (kw.group_rows % (2 * kw.slab)):
        unpack["unpack"] = "magic_fold"
    if schedule == "stream_k":
        return Config(block_n=64, block_m=mb, chunk_slots=chunk, stages=2, k_splits=1, schedule="stream_k",
                      **unpack)
    steps = kw.k_pad // (per * kw.slab)
    m_blocks = -(-m // mb)
    splits = _pick_splits(steps, (kw.n // 64) * m_blocks)
    if splits > 1:
        chunk = max(1, min(per, 64 // kw.slab))   # smaller A buffers: more CTAs per SM (measured best)
    return Config(block_n=64, block_m=mb, chunk_slots=chunk, stages=2, k_splits=splits, **unpack)


def _unpack_slot(planes, bits: int, j: int):
    """Slot j of one planar tile, planes = [BN, slab] uint32 arrays (3 for 3-bit, else 1)."""
    mask = jnp.uint32(2**bits - 1)
    if bits != 3:
        w = planes[0]
        return (w if j == 0 else (w >> jnp.uint32(bits * j))) & mask
    if j < 30:
        w = planes[j // 10]
        sh = 3 * (j % 10)
        return (w if sh == 0 else (w >> jnp.uint32(sh))) & mask
    low = planes[j - 30] >> jnp.uint32(30)
    high = (planes[2] >> jnp.uint32(j)) & jnp.uint32(1)
    return low | (high << jnp.uint32(2))


def _dequant_slab(planes, bits: int, j: int, s_ref, z_ref, g: int, bn: int, slab: int, unpack: str):
    """Slot j dequantized at jnp level: [BN, slab] bf16 ("f32" or "bf16" arithmetic)."""
    sc = s_ref[g, :].astype(jnp.float32)                                # [BN]
    bc = -(z_ref[g, :].astype(jnp.float32) * sc)
    q = _unpack_slot(planes, bits, j).astype(jnp.int32)
    if unpack == "bf16":
        # codes straight to bf16 (exact: < 256), then ((q - z_hi) - z_lo) * s in bf16 with
        # z_hi + z_lo = z: q - z_hi is exact, every later rounding is relative to |q - z|
        # (q * s + bf16(-z * s) gave ~1.1e-2 relative error: the offset rounds once per group)
        zf = z_ref[g, :].astype(jnp.float32)
        z_hi = zf.astype(jnp.bfloat16)
        z_lo = (zf - z_hi.astype(jnp.float32)).astype(jnp.bfloat16)
        wide = lambda v: lax.broadcast_in_dim(v, (bn, slab), (0,))
        return ((q.astype(jnp.bfloat16) - wide(z_hi)) - wide(z_lo)) * wide(sc.astype(jnp.bfloat16))
    d = q.astype(jnp.float32) * lax.broadcast_in_dim(sc, (bn, slab), (0,)) + lax.broadcast_in_dim(bc, (bn, slab), (0,))
    return d.astype(jnp.bfloat16)


_MAGIC = {  # A dtype, magic pair (base + code as two 16-bit floats), base, 1.0 pair, PTX type
    "magic_bf16": (jnp.bfloat16, 0x43004300, 128.0, 0x3F803F80, "bf16x2"),
    "magic_f16": (jnp.float16, 0x64006400, 1024.0, 0x3C003C00, "f16x2"),
}
_MAGIC["magic_fold"] = _MAGIC["magic_bf16"]   # the same 128 + code pairs, left unscaled


def _pair_mask(bits: int) -> int:
    """Both halves' code bits: 0x00070007 at 3 bits, 0x000F000F at 4, 0x00030003 at 2."""
    return ((1 << bits) - 1) * 0x00010001


def _pair_words(planes, jp: int, bits: int = 3):
    """(plane indices, PTX that leaves the pair-slot's two codes in the low bits of both halves of `t`)."""
    if bits != 3:                 # one plane, pair-slot jp at bits * jp and 16 + bits * jp
        sh = bits * jp
        return [0], (f"shr.b32 t, $1, {sh};" if sh else "mov.b32 t, $1;")
    if jp < 15:
        sh = 3 * (jp % 5)
        return [jp // 5], (f"shr.b32 t, $1, {sh};" if sh else "mov.b32 t, $1;")
    # pair-slot 15: bit b of both codes in plane b, bits 15 and 31
    return [0, 1, 2], ("shr.b32 t, $1, 15; and.b32 t, t, 0x00010001;"
                       " shr.b32 u, $2, 14; and.b32 u, u, 0x00020002; or.b32 t, t, u;"
                       " shr.b32 u, $3, 13; and.b32 u, u, 0x00040004; or.b32 t, t, u;")


def _magic_pairs_native(planes, jps, scale_list, bn: int, slab: int, unpack: str, bits: int = 3):
    """Pair-slots `jps` of a "planar_pairs" tile -> [BN, 2 * slab * len(jps)] A-dtype values (pair-slot
    i in columns 2*slab*i ...) through inline PTX, one register array ready for wgmma or a store.

    planes: [BN, slab] uint32 arrays; scale_list[i] = (s2, hi2, lo2) of pair-slot i: [BN, 2 * slab]
    scale and the two parts of -(base + zero) * scale, in the A dtype. scale_list None: the raw
    magic values base + code (bf16, exact; the "magic_fold" conversion, two instructions per pair).
    Inside inline_mgpu every array is in Mosaic's WGMMA layout: a lane's vector<2 x i32> of u32
    column tile t holds words 8t + 2l and 8t + 2l + 1, which by the layout's word order are the
    lane's bf16x2 registers of column tiles 2t and 2t + 1 of the pair-slot's result (layout.pair_row).
    """
    import numpy as np
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import llvm, vector
    from jax.experimental.mosaic import gpu as mgpu
    from jax.experimental.mosaic.gpu import utils as mgu

    dt, magic, _, one, ptx_ty = _MAGIC[unpack]
    scaled = scale_list is not None
    n_sc = 3 if scaled else 0
    wgmma = plgpu.Layout.WGMMA
    flat, spans, extracts = [], [], []       # flat args; per pair-slot (first, n words) in flat; PTX
    for i, jp in enumerate(jps):
        idx_planes, extract = _pair_words(planes, jp, bits)
        spans.append((len(flat), len(idx_planes)))
        extracts.append(extract)
        flat += [planes[i] for i in idx_planes] + (list(scale_list[i]) if scaled else [])
    npair = len(jps)
    mask = hex(_pair_mask(bits))

    @plgpu.inline_mgpu(arg_types=tuple(wgmma for _ in flat),
                       return_type=plgpu.ShapeDtypeStruct((bn, 2 * slab * npair), dt, layout=wgmma))
    def convert(ctx, *fas):
        del ctx
        i32 = ir.IntegerType.get_signless(32)
        first_words = fas[spans[0][0]]
        ws0 = first_words.registers.shape
        pair_shape = (ws0[0], 2 * ws0[1]) + tuple(ws0[2:])             # one pair-slot's output grid
        out_ty = (fas[spans[0][0] + spans[0][1]].registers.flat[0].type if scaled
                  else ir.VectorType.get([2], mgu.dtype_to_ir_type(dt)))
        cols = pair_shape[1]
        out_shape = (pair_shape[0], cols * npair) + tuple(pair_shape[2:])
        regs = np.empty(out_shape, dtype=object)
        for p, ((first, n_in), extract) in enumerate(zip(spans, extracts)):
            words = fas[first:first + n_in]
            sc_fas = fas[first + n_in:first + n_in + n_sc]
            for w in words:
                ws = w.registers.shape
                if len(ws) != len(pair_shape) or ws[1] * 2 != cols or any(
                        a != b for d, (a, b) in enumerate(zip(ws, pair_shape)) if d != 1):
                    raise ValueError(f"magic unpack: code words with register grid {ws} do not pair with the "
                                     f"output grid {pair_shape} (one output register = two code halves)")
            for fa_ in sc_fas:
                if fa_.registers.shape != pair_shape:
                    raise ValueError(f"magic unpack: scale grid {fa_.registers.shape} is not the output grid "
                                     f"{pair_shape}")
            for idx in np.ndindex(*pair_shape):
                src = (idx[0], idx[1] // 2) + tuple(idx[2:])
                ins = [vector.extract(w.registers[src], dynamic_position=[],
                                      static_position=ir.DenseI64ArrayAttr.get([idx[1] % 2])) for w in words]
                if scaled:
                    sc_regs = [mgu.bitcast(fa_.registers[idx], i32) for fa_ in sc_fas]
                    si, hi, lo = (f"${n_in + 1 + i}" for i in range(3))
                    asm = ("{ .reg .b32 t, u, c1; " + extract +
                           f" lop3.b32 t, t, {mask}, {hex(magic)}, 0xea;"          # (t & mask) | magic
                           f" mov.b32 c1, {hex(one)};"
                           f" fma.rn.{ptx_ty} t, t, {si}, {hi};"                   # (base + c) * s + hi
                           f" fma.rn.{ptx_ty} $0, t, c1, {lo}; }}")                # + lo
                else:
                    sc_regs = []
                    asm = ("{ .reg .b32 t, u; " + extract +
                           f" lop3.b32 $0, t, {mask}, {hex(magic)}, 0xea; }}")     # base + c, exact
                r = llvm.inline_asm(i32, [*ins, *sc_regs], asm, "=r" + ",r" * (n_in + n_sc))
                regs[(idx[0], p * cols + idx[1]) + tuple(idx[2:])] = mgu.bitcast(r, out_ty)
        out_layout = fas[spans[0][0] + spans[0][1]].layout if scaled else first_words.layout   # both WGMMA
        return mgpu.FragmentedArray(_registers=regs, _layout=out_layout, _is_signed=None)

    return convert(*flat)


def _magic_pair_emulated(planes, jp: int, s2, hi2, lo2, bn: int, slab: int, unpack: str, bits: int = 3):
    """jnp twin of `_magic_pairs_native` (one pair-slot) for interpret mode: same codes, same roundings.

    The emulation interleaves the low/high codes with a stack + reshape, which only interprets
    (interleaving does not lower on Mosaic GPU; the native path needs no data movement)."""
    dt, base = _MAGIC[unpack][0], _MAGIC[unpack][2]
    mask = jnp.uint32(2**bits - 1)
    if bits != 3:
        w = planes[0] >> jnp.uint32(bits * jp)
    elif jp < 15:
        w = planes[jp // 5] >> jnp.uint32(3 * (jp % 5))
    else:
        w = (((planes[0] >> jnp.uint32(15)) & jnp.uint32(0x00010001))
             | ((planes[1] >> jnp.uint32(14)) & jnp.uint32(0x00020002))
             | ((planes[2] >> jnp.uint32(13)) & jnp.uint32(0x00040004)))
    lo = (w & mask).astype(jnp.int32)
    hi = ((w >> jnp.uint32(16)) & mask).astype(jnp.int32)
    # word column w = 8a + 2l + e holds pair i = 8a + 4e + l (layout.pair_row(w) = 2i)
    order = lambda v: v.reshape(bn, slab // 8, 4, 2).transpose(0, 1, 3, 2).reshape(bn, slab)
    codes = jnp.stack([order(lo), order(hi)], axis=2).reshape(bn, 2 * slab)
    if s2 is None:                       # magic_fold: the raw pair values base + code (exact)
        return (codes.astype(jnp.float32) + base).astype(dt)
    # fma in the 16-bit type = f32 product (exact: <= 11 x 11 bits) + sum, rounded to the 16-bit type
    f32 = lambda a: a.astype(jnp.float32)
    t = (f32(codes) + base) * f32(s2) + f32(hi2)
    return (f32(t.astype(dt)) + f32(lo2)).astype(dt)


def _pair_scales(s_ref, z_ref, g: int, bn: int, slab: int, unpack: str):
    """Scale row g as the magic conversion uses it: (s, hi, lo), each [BN, 2 * slab] in the A dtype,
    hi + lo = -(base + z) * s. Computed once per group and reused by its pair-slots. (A packed cvt
    after the broadcast and bfloat16-stored scales were both tried: no faster, quant_matmul NOTES stop 15.)"""
    dt, base = _MAGIC[unpack][0], _MAGIC[unpack][2]
    s16 = s_ref[g, :].astype(dt)
    sc = s16.astype(jnp.float32)                                # the scale the product uses
    off = -(z_ref[g, :].astype(jnp.float32) + base) * sc        # -(base + z) * s, f32
    hi = off.astype(dt)
    lo = (off - hi.astype(jnp.float32)).astype(dt)
    wide = lambda v: lax.broadcast_in_dim(v, (bn, 2 * slab), (0,))
    return wide(s16), wide(hi), wide(lo)


def _dequant_pairs(planes, jps, scale_list, bn: int, slab: int, unpack: str, interpret: bool, bits: int = 3):
    """Pair-slots jps (two slabs, 2 * slab K rows each) of a "planar_pairs" tile, side by side ->
    [BN, 2 * slab * len(jps)] A dtype; scale_list[i]: pair-slot i's (s, hi, lo) from _pair_scales;
    scale_list None: the unscaled values 128 + code (magic_fold)."""
    if interpret:
        scale_list = scale_list or [(None, None, None)] * len(jps)
        parts = [_magic_pair_emulated(planes, jp, *sc, bn, slab, unpack, bits) for jp, sc in zip(jps, scale_list)]
        return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)
    return _magic_pairs_native(planes, jps, scale_list, bn, slab, unpack, bits)


# Kernels that ask for it (_unpack_plan(..., scales_upfront=True): stream-K) compute every group's
# (s, hi, lo) of a K tile at the step's start rather than at the group's first pair-slot, so the scale
# chain (two 16-bit shared-memory loads, seven dependent ops) does not stall the conversion at each
# group boundary: stream-K kernel 14.79 -> 14.18 us at M=1, 15.80 -> 15.39 at M=16 (4096 x 14336 3-bit
# g64, H200, 2026-12-02, benchmarks/results/logs/h200_2026-12-02_s15d_time_m1.txt). It costs registers
# (125 -> 166 per thread); the grouped kernel, slower with it at 16 tokens, does not ask (grouped NOTES,
# stop 15). False turns it off everywhere (profile_decode's sklazy probe).
SCALES_UPFRONT = True


def _pair_scales_by_slot(s_ref, z_ref, *, bn, slab, group_rows, g_block, unpack, upfront_slots: int = 0):
    """pair-slot jp -> its group's (s, hi, lo) from _pair_scales. upfront_slots > 0: the groups of
    pair-slots [0, upfront_slots) are all computed now; otherwise each group once, when its first
    pair-slot asks (the pair-slots of a tile are visited in order)."""
    group_of = lambda jp: (jp * 2 * slab) // group_rows if g_block > 1 else 0
    cache = {}
    if upfront_slots:
        for g in sorted({group_of(jp) for jp in range(upfront_slots)}):
            cache[g] = _pair_scales(s_ref, z_ref, g, bn, slab, unpack)
        return lambda jp: cache[group_of(jp)]

    def scales_of(jp):
        g = group_of(jp)
        if g not in cache:
            cache.clear()
            cache[g] = _pair_scales(s_ref, z_ref, g, bn, slab, unpack)
        return cache[g]

    return scales_of


def _unpack_and_multiply(acc, a_buf, planes, s_ref, z_ref, x_ref, *, bits, slab, bn, chunk,
                         nchunks, group_rows, g_block, plan: _UnpackPlan, interpret):
    """One pipeline step's work, shared by the dense and the grouped decode kernels: the K tile in
    `nchunks` chunks of `chunk` slabs, each dequantized into the next of `nbuf` A buffers and
    multiplied into acc (acc[BN, MB] += A @ x^T), the MMA of one chunk overlapping the unpack of the
    next when `overlap`. pairs: planar_pairs words (magic unpack, one pair-slot = 2 * slab K rows,
    the group's scale/offset pairs computed once and reused); otherwise one slab at a time.
    a_regs (pairs only): A goes to wgmma from registers, one pair-slot per MMA; a_buf is unused."""
    pairs, unpack, nbuf = plan.pairs, plan.unpack, plan.nbuf
    if plan.fold:
        raise ValueError("unpack='magic_fold' runs in the stream-K decode kernel (schedule='stream_k') and the "
                         "grouped launches, not here: this kernel's wgmma register accumulator cannot be folded into")
    scales_of = _pair_scales_by_slot(s_ref, z_ref, bn=bn, slab=slab, group_rows=group_rows,
                                     g_block=g_block, unpack=unpack,
                                     upfront_slots=nchunks * chunk // 2 if plan.scales_upfront else 0)

    if plan.a_regs:
        # One wgmma per chunk (chunk // 2 pair-slots, converted side by side into one register
        # array); wgmma_wait(1) keeps one MMA in flight while the next chunk is converted (its A
        # registers stay live until that wait). Fewer, wider MMAs: fewer fences and waits.
        npc = chunk // 2
        for c in range(nchunks):
            jps = list(range(c * npc, (c + 1) * npc))
            a = _dequant_pairs(planes, jps, [scales_of(jp) for jp in jps], bn, slab, unpack, interpret, bits)
            _mma_xt(acc, a, x_ref.at[:, pl.ds(c * chunk * slab, chunk * slab)], interpret, a_value=True)
            plgpu.wgmma_wait(1)
        return
    for c in range(nchunks):
        buf = a_buf.at[c % nbuf]
        if pairs:
            for jj in range(chunk // 2):
                jp = c * chunk // 2 + jj                                # pair-slot: 2 * slab rows
                buf[:, pl.ds(jj * 2 * slab, 2 * slab)] = _dequant_pairs(
                    planes, [jp], [scales_of(jp)], bn, slab, unpack, interpret, bits)
        else:
            for jj in range(chunk):
                j = c * chunk + jj
                g = (j * slab) // group_rows if g_block > 1 else 0
                buf[:, pl.ds(jj * slab, slab)] = _dequant_slab(planes, bits, j, s_ref, z_ref, g, bn,
                                                               slab, unpack)
        plgpu.commit_smem()
        _mma_xt(acc, buf, x_ref.at[:, pl.ds(c * chunk * slab, chunk * slab)], interpret)
        plgpu.wgmma_wait(1 if plan.overlap else 0)


def fold_blocks(group_rows: int, tile_rows: int, slab: int) -> tuple[int, int]:
    """(F, KC) of the magic_fold step: K rows per fold block (one scale group, or the whole tile when a
    group spans tiles) and K rows per wgmma inside it (at most 128: A registers per MMA)."""
    f = min(group_rows, tile_rows)
    if f % (2 * slab):
        raise ValueError(f"unpack='magic_fold' needs groups of whole pair-slots: group of {group_rows} rows, "
                         f"pair-slot of {2 * slab}")
    return f, min(f, 128)


def _fold_unpack_and_multiply(acc, planes, s_ref, z_ref, x_ref, xs_ref, *, bits, slab, bn, mb, group_rows,
                              g_block, tile_rows, interpret, span_cap: int | None = None):
    """One pipeline step of the magic_fold decode: acc [BN, MB] float32 value -> acc + this K tile.

    xs_ref [R, MB] float32 (R = fold_rows_per_tile(nf)): row f < nf = the sums of x over fold block f
    (X_f[m]). Per fold block f (F K rows with one scale row g, see fold_blocks):
        raw  = (128 + q) @ x_f^T        wgmma, A = the raw magic pairs (exact in bf16)
        acc += s_g * raw - (128 + z_g) * s_g * X_f         (float32; s, z along rows, X along columns)
    which is sum_k s (q - z) x over the block with no bf16 rounding of the weight. The conversion
    is two instructions per pair of codes and needs no per-group bf16 scale pairs (magic_bf16: four
    per pair, plus ~12 per row and group for the scale/offset pairs). Natively the raw accumulators
    of FOLD_SPAN blocks share one run_scoped (its end waits for their MMAs); inside it the previous
    scope's folds and the next conversions run while the MMAs do.
    """
    f_rows, kc = fold_blocks(group_rows, tile_rows, slab)
    nf, nmma, ppm = tile_rows // f_rows, f_rows // kc, kc // (2 * slab)
    base = _MAGIC["magic_fold"][2]

    def terms(f):                  # (s, -(128 + z) * s, X) of fold block f, broadcast to [BN, MB]
        g = f if g_block > 1 else 0
        sc = s_ref[g, :].astype(jnp.float32)
        off = -(z_ref[g, :].astype(jnp.float32) + base) * sc
        rows = lambda v: lax.broadcast_in_dim(v, (bn, mb), (0,))
        return rows(sc), rows(off), lax.broadcast_in_dim(xs_ref[f, :], (bn, mb), (1,))

    def convert(c):                # MMA chunk c (= f * nmma + i) -> A [BN, KC] = 128 + codes
        jps = list(range(c * ppm, (c + 1) * ppm))
        return _dequant_pairs(planes, jps, None, bn, slab, "magic_fold", interpret, bits)

    x_chunk = lambda c: x_ref.at[:, pl.ds(c * kc, kc)]
    fold = lambda acc, raw, t: acc + t[0] * raw + t[1] * t[2]

    if interpret:                  # the same arithmetic as jnp dots (GPU interpret mode has no ACC)
        dot = lambda c: lax.dot_general(convert(c), x_chunk(c)[...], (((1,), (1,)), ((), ())),
                                        preferred_element_type=jnp.float32)
        for f in range(nf):
            acc = fold(acc, sum(dot(c) for c in range(f * nmma, (f + 1) * nmma)), terms(f))
        return acc

    span = fold_span(nf, mb, span_cap)
    a = convert(0)
    pending = []                                    # (raw, f) of the previous scope's blocks
    for f0 in range(0, nf, span):
        def blocks(*raw_refs, a=a, pending=pending, acc=acc, f0=f0):
            for b in range(span):
                for i in range(nmma):
                    c = (f0 + b) * nmma + i
                    plgpu.wgmma(raw_refs[b], a, plgpu.transpose_ref(x_chunk(c), (1, 0)))
                    if i == 0 and b < len(pending):         # the previous scope's block b
                        acc = fold(acc, pending[b][0], terms(pending[b][1]))
                    if c + 1 < nf * nmma:
                        a = convert(c + 1)
                    if i + 1 < nmma:
                        plgpu.wgmma_wait(1)                 # chunk c's A registers stay live until then
            return [r[...] for r in raw_refs], acc, a
        raws, acc, a = pl.run_scoped(blocks, *[plgpu.ACC((bn, mb), jnp.float32) for _ in range(span)])
        pending = [(raws[b], f0 + b) for b in range(span)]
    for raw, f in pending:
        acc = fold(acc, raw, terms(f))
    return acc


# magic_fold: fold blocks whose raw accumulators share one run_scoped (its end waits for their MMAs),
# capped at FOLD_ACC_COLS accumulator columns (span * MB: registers). 4: the grouped launches (2-4
# pipeline steps per CTA) need the first half of a tile's folds to run under the second half's MMAs
# (Mixtral FFN 1 token: span 4 79.3 us, span 8 91.5 us; H200, 2026-12-03); stream-K measured the same
# at 4 and 8 (12.9 us at M = 1, s17c).
FOLD_SPAN = 4
FOLD_ACC_COLS = 64


def fold_span(nf: int, mb: int, cap: int | None = None) -> int:
    """Fold blocks per run_scoped: at most `cap` (None: FOLD_SPAN), nf and FOLD_ACC_COLS // mb, dividing nf."""
    span = max(1, min(FOLD_SPAN if cap is None else cap, nf, FOLD_ACC_COLS // mb))
    while nf % span:
        span -= 1
    return span


def fold_rows_per_tile(nf: int) -> int:
    """Rows of x's group sums one K tile reads: its nf fold blocks, padded to a multiple of 4. Why: the
    pipeline's TMA boxes are (rows, MB) float32, and each stage's buffer must start 128-byte aligned
    (TMA's shared-memory rule); with MB >= 8, 4 rows make 128 B. Unpadded, per-channel weights (nf = 1,
    32 B at MB = 8) or 4-bit g128 (nf = 2) put the second stage's box 32 / 64 bytes in: a misaligned
    TMA destination whenever a CTA runs more than one pipeline step."""
    return -(-nf // 4) * 4


def fold_group_sums(xp: jax.Array, *, bits: int, slab: int, group_rows: int) -> jax.Array:
    """xp [M_pad, Kp] bf16 -> [tiles * R, M_pad] float32: the sums of x over each fold block (F rows, from
    fold_blocks for weights of this bits / slab / group), R = fold_rows_per_tile(nf) rows per K tile
    (the last R - nf rows of a tile zero) — magic_fold's extra kernel input."""
    tile_rows = packing.slots_per_tile(bits) * slab
    f_rows = fold_blocks(group_rows, tile_rows, slab)[0]
    nf = tile_rows // f_rows
    m_pad, k_pad = xp.shape
    sums = xp.astype(jnp.float32).reshape(m_pad, k_pad // tile_rows, nf, f_rows).sum(-1)   # [M, tiles, nf]
    sums = jnp.pad(sums, ((0, 0), (0, 0), (0, fold_rows_per_tile(nf) - nf)))
    return sums.reshape(m_pad, -1).T


def x_transforms(mma_k: int, slab: int, a_regs: bool = True):
    """Swizzle of the x tile (wgmma's B operand) for MMAs over `mma_k` K rows: with A in registers the
    widest (128 B, 64 columns) when the MMA slices allow, else the A tile's slab-wide swizzle."""
    return _swizzle_transforms(64 if a_regs and mma_k % 64 == 0 else slab)


def compensator_xu(xp: jax.Array, u: jax.Array, k: int, rank_pad: int) -> jax.Array:
    """x @ u of the compensator: xp [M_pad, >= K] (x padded) -> [M_pad, Rp] bf16, float32 sums, the
    columns past the rank zero (the kernel reads Rp-wide boxes; at rank 32 and Rp 32 there are none).

    A dot: at M = 1 an XLA GEMM and its split-K reduce, 2.2 + 1.3 us beside a 12.8 us kernel (4096 x
    14336 rank 32, H200, 2026-12-03, s20a). Written as a multiply + reduce it was no faster at M = 1
    (a transpose and a reduction, 1.7 + 2.6 us) and 18.4 us at M = 16 (s20a), so that form is gone.
    (Earlier, on the H100, the dot of the unpadded single row had taken ~40 us; the padded rows
    fixed that.)"""
    r = u.shape[-1]
    xu = jnp.dot(xp[:, :k].astype(jnp.bfloat16), u.astype(jnp.bfloat16), preferred_element_type=jnp.float32)
    return jnp.pad(xu.astype(jnp.bfloat16), ((0, 0), (0, rank_pad - r)))


def _run_acc(compute, acc, interpret: bool):
    """acc + whatever `compute(acc_ref)` accumulates: a wgmma register accumulator initialised from
    the carried value natively; in GPU interpret mode (which has no run_state) a float32 SMEM tile
    holding the value."""
    if not interpret:
        return pl.run_state(compute)(plgpu.ACC.init(acc))

    def scoped(acc_ref):
        acc_ref[...] = acc
        compute(acc_ref)
        return acc_ref[...]
    return pl.run_scoped(scoped, plgpu.SMEM(acc.shape, jnp.float32))


def _add_compensator(acc, add, v_smem, xu_smem, bar, interpret: bool, parts: int = 0):
    """acc (a float32 [BN, MB] value) + v^T tile @ (x @ u)^T where `add` (traced bool) holds, once the
    compensator operands' copies (`_compensator_copies`) have landed. parts > 0: xu_smem holds x @ u
    as `parts` per-K-tile shares [parts, MB, Rp] (the pre-pass's), added by one wgmma each."""
    def with_comp(a):
        def mma(acc_ref):
            plgpu.barrier_wait(bar)
            for p in range(parts) if parts else [None]:
                _mma_xt(acc_ref, v_smem, xu_smem if p is None else xu_smem.at[p], interpret)
            plgpu.wgmma_wait(0)
        return _run_acc(mma, a, interpret)
    return lax.cond(add, with_comp, lambda a: a, acc)


def _mma_xt(acc_ref, a_ref, b_ref, interpret: bool, a_value: bool = False):
    """acc_ref[P, Q] += a_ref[P, R] @ b_ref[Q, R]^T (b is K-major: read transposed).
    a_value: a_ref is a register value [P, R] in the WGMMA layout (P = 64), not a ref.

    On the GPU this is one asynchronous wgmma into a register accumulator. GPU interpret mode
    (jax 0.10.2) takes neither a transposed wgmma operand nor reads of a REGS accumulator, so
    there the accumulator is an f32 shared-memory tile and the same product runs as a jnp dot
    on the shared-memory operand tiles (everything else in the kernel runs as written).
    """
    if interpret:
        a = a_ref if a_value else a_ref[...]
        acc_ref[...] = acc_ref[...] + lax.dot_general(
            a, b_ref[...], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    else:
        plgpu.wgmma(acc_ref, a_ref, plgpu.transpose_ref(b_ref, (1, 0)))


def _swizzle_transforms(cols: int):
    """Tiling + swizzle for a bf16 tile whose K slices are `cols` wide (cols * 2 bytes swizzle)."""
    return (plgpu.TilingTransform((8, cols)), plgpu.SwizzleTransform(2 * cols))


def compensator_transforms(rank_pad: int):
    """Swizzle of the compensator tiles (x @ u [MB, Rp], v^T [BN, Rp]): 64 B at Rp 32, else 128 B
    (64-column K slices); any valid one at rank 0, where the tiles do not exist."""
    return _swizzle_transforms(max(32, min(rank_pad, 64)))


@functools.lru_cache(maxsize=None)
@dataclasses.dataclass(frozen=True)
class _Tiling:
    """How a decode kernel walks K: planar tiles of `tile_rows` rows, `steps` per K split."""
    per: int          # slots (slabs) per planar tile
    wps: int          # words per slab row (3 for 3-bit, else 1)
    tile_rows: int    # K rows per planar tile
    steps: int        # pipeline steps per K split
    splits: int
    bn: int
    mb: int
    chunk: int        # slots unpacked per chunk
    nchunks: int


def _tiling(bits: int, slab: int, k_pad: int, n: int, cfg) -> _Tiling:
    """Derive and check the K tiling shared by the dense and grouped decode kernels."""
    per = packing.slots_per_tile(bits)
    tile_rows = per * slab
    bn, mb, chunk, splits = cfg.block_n, cfg.block_m, cfg.chunk_slots, cfg.k_splits
    if n % bn or k_pad % tile_rows:
        raise ValueError(f"shape N={n}, K={k_pad} not tiled by BN={bn}, tile={tile_rows}")
    steps_total = k_pad // tile_rows
    if steps_total % splits:
        raise ValueError(f"k_splits={splits} does not divide the {steps_total} K tiles")
    if per % chunk:
        raise ValueError(f"chunk_slots={chunk} must divide the {per} slots of a {bits}-bit tile")
    return _Tiling(per=per, wps=packing.words_per_slab_row(bits), tile_rows=tile_rows,
                   steps=steps_total // splits, splits=splits, bn=bn, mb=mb, chunk=chunk,
                   nchunks=per // chunk)


def _scale_blocks(group_rows: int, tile_rows: int, k_pad: int):
    """(g_block, K tile t -> scale-row block index) for scales [Gp, N] read as (g_block, BN) boxes:
    groups smaller than a tile give g_block = tile_rows // group_rows rows per tile; a group spanning
    whole tiles gives one row per tile (per-channel: always row 0)."""
    if group_rows < tile_rows:
        return tile_rows // group_rows, lambda t: t
    if group_rows == k_pad:
        return 1, lambda t: 0 * t
    if group_rows % tile_rows:
        raise ValueError(f"group of {group_rows} rows does not align with tiles of {tile_rows}")
    return 1, lambda t: (t * tile_rows) // group_rows


def _interpret_params(interpret: bool) -> dict:
    """plgpu.kernel keyword for GPU interpret mode (CPU tests), empty for native runs."""
    if not interpret:
        return {}
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    return dict(interpret=InterpretGPUParams())


def _accumulate_and_store(compute, o_smem, out_tile, bn: int, mb: int, interpret: bool, store=None):
    """Run `compute(acc_ref)` on a [bn, mb] float32 accumulator, then store its result through SMEM
    to the GMEM tile `out_tile`. The accumulator lives in its own scope: registers natively, SMEM in
    GPU interpret mode, which cannot mix register and SMEM scratch. store: a traced bool; when
    false the tile is not written (the grouped kernel's skipped blocks: no output traffic)."""
    if interpret:
        def compute_interpret(acc_ref):
            acc_ref[...] = jnp.zeros((bn, mb), jnp.float32)
            return compute(acc_ref)
        res = pl.run_scoped(compute_interpret, plgpu.SMEM((bn, mb), jnp.float32))
    else:
        res = pl.run_scoped(compute, plgpu.ACC((bn, mb), jnp.float32))
    o_smem[...] = res.astype(o_smem.dtype)
    plgpu.commit_smem()

    def write():
        plgpu.copy_smem_to_gmem(o_smem, out_tile)
        plgpu.wait_smem_to_gmem(0)

    if store is None:
        write()
    else:
        pl.when(store)(write)


@dataclasses.dataclass(frozen=True)
class _UnpackPlan:
    """How a decode kernel turns codes into the wgmma A operand (shared by dense and grouped)."""
    unpack: str
    pairs: bool        # planar_pairs words, magic conversion
    a_regs: bool       # A straight from registers (no A buffers)
    a_dtype: object    # bf16, or f16 for magic_f16
    overlap: bool      # one MMA in flight while the next chunk is unpacked
    nbuf: int          # A buffers in shared memory (0 with a_regs)
    scales_upfront: bool = False   # a K tile's scale pairs all at the step's start (see SCALES_UPFRONT)
    fold: bool = False             # magic_fold: unscaled A, scale and zero folded in float32 (not split-K)


def _unpack_plan(unpack: str, a_regs: bool, overlap: bool, bits: int, chunk: int, nchunks: int,
                 slab: int, scales_upfront: bool = False) -> _UnpackPlan:
    if unpack not in UNPACKS:
        raise ValueError(f"unpack={unpack!r} is not one of {UNPACKS}")
    pairs = unpack.startswith("magic")
    if pairs and (bits not in layout.PAIRS_BITS or chunk % 2 or slab % 8):
        raise ValueError(f"unpack={unpack!r} needs planar_pairs weights (bits {layout.PAIRS_BITS}), an even chunk_slots "
                         f"and a slab multiple of 8 (bits={bits}, chunk_slots={chunk}, slab={slab})")
    if a_regs and not pairs:
        raise ValueError(f"a_regs=True needs a magic_* unpack (got unpack={unpack!r})")
    if unpack == "magic_fold" and not a_regs:
        raise ValueError("unpack='magic_fold' hands A to wgmma from registers: it needs a_regs=True")
    # Two alternating A buffers let wgmma of chunk c run while chunk c + 1 is unpacked. The
    # buffer parity must not repeat across a step boundary, so an odd chunk count waits at the end.
    # With A in registers there are no buffers: one MMA stays in flight across the step boundary.
    overlap = a_regs or (overlap and nchunks % 2 == 0)
    return _UnpackPlan(unpack=unpack, pairs=pairs, a_regs=a_regs,
                       a_dtype=_MAGIC[unpack][0] if pairs else jnp.bfloat16, overlap=overlap,
                       nbuf=0 if a_regs else (2 if overlap else 1), scales_upfront=scales_upfront and pairs and SCALES_UPFRONT,
                       fold=unpack == "magic_fold")


def _decode_scratch(plan: _UnpackPlan, bn: int, chunk: int, slab: int, mb: int, out_dtype, comp: bool,
                    rank_pad: int, tr, tr_r, rows_out: bool = False) -> list:
    """SMEM of the decode kernel: the dequantized A buffers (none with A in registers), the output
    tile ([BN, MB], or [MB, BN] where the output is stored by rows: grouped ROWS_OUT) and, with a
    compensator, the x @ u tile, the v^T tile and their barrier."""
    scratch = [] if plan.a_regs else [plgpu.SMEM((plan.nbuf, bn, chunk * slab), plan.a_dtype, transforms=tr)]
    scratch += [plgpu.SMEM((mb, bn) if rows_out else (bn, mb), out_dtype)]
    if comp:
        scratch += [plgpu.SMEM((mb, rank_pad), jnp.bfloat16, transforms=tr_r),
                    plgpu.SMEM((bn, rank_pad), jnp.bfloat16, transforms=tr_r),
                    plgpu.Barrier(num_arrivals=2)]
    return scratch


def _compensator_copies(first_split, xu_tile, v_tile, xu_smem, v_smem, bar):
    """Start the TMA copies of the compensator operands (x @ u rows, v^T columns) in the K split
    that adds the compensator (split 0): the other splits would multiply zeros, and with split-K 4
    their v^T loads were 3/4 of the compensator's traffic."""
    @pl.when(first_split)
    def _():
        plgpu.copy_gmem_to_smem(xu_tile, xu_smem, bar)
        plgpu.copy_gmem_to_smem(v_tile, v_smem, bar)


def _compensator_mma(first_split, acc_ref, v_smem, xu_smem, bar, interpret: bool):
    """acc += v^T tile @ (x @ u)^T in split 0 (the epilogue's one extra wgmma)."""
    @pl.when(first_split)
    def _():
        plgpu.barrier_wait(bar)
        _mma_xt(acc_ref, v_smem, xu_smem, interpret)
        plgpu.wgmma_wait(0)


def _split_decode_refs(refs, n_in: int, plan: _UnpackPlan):
    """(inputs, out, a_buf or None, o_smem, (xu_smem, v_smem, bar) or ()) from a decode kernel's refs."""
    ins, out, rest = refs[:n_in], refs[n_in], list(refs[n_in + 1:])
    a_buf = None if plan.a_regs else rest.pop(0)
    return ins, out, a_buf, rest[0], tuple(rest[1:])


def build(bits: int, slab: int, group_rows: int, k_pad: int, n: int, m_pad: int, rank_pad: int,
          cfg: Config, interpret: bool):
    """f(codes, scales, zeros, x [m_pad, k_pad] bf16[, xu [m_pad, Rp], v_t [N, Rp]]) -> [splits*N, m_pad].

    Output is bf16 for one split, else float32 partial sums (split i in rows i*N .. (i+1)*N).
    """
    tl = _tiling(bits, slab, k_pad, n, cfg)
    wps, tile_rows, steps, splits = tl.wps, tl.tile_rows, tl.steps, tl.splits
    bn, mb, chunk, nchunks = tl.bn, tl.mb, tl.chunk, tl.nchunks
    if m_pad % mb:
        raise ValueError(f"M={m_pad} is not tiled by MB={mb}")
    g_block, scale_index = _scale_blocks(group_rows, tile_rows, k_pad)
    comp = rank_pad > 0
    plan = _unpack_plan(cfg.unpack, cfg.a_regs, cfg.overlap, bits, chunk, nchunks, slab)
    tr = _swizzle_transforms(slab)
    tr_r = compensator_transforms(rank_pad)
    out_dtype = jnp.bfloat16 if splits == 1 else jnp.float32
    wg = plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup)

    def kernel(*refs):
        ins, out, a_buf, o_smem, comp_refs = _split_decode_refs(refs, 6 if comp else 4, plan)
        codes, scales, zeros, x = ins[:4]
        if comp:
            xu, v_t = ins[4:]
            xu_smem, v_smem, bar = comp_refs
        ni = lax.axis_index("n")
        mi = lax.axis_index("m")
        ki = lax.axis_index("k")
        off = ki * steps                      # first K tile of this split
        if comp:  # compensator operands arrive while the main loop runs; only split 0 adds them
            _compensator_copies(ki == 0, xu.at[pl.ds(mi * mb, mb)], v_t.at[pl.ds(ni * bn, bn)],
                                xu_smem, v_smem, bar)

        def body(_, *step_refs):
            plane_refs = step_refs[:wps]
            s_ref, z_ref, x_ref = step_refs[wps:]
            planes = [r[...] for r in plane_refs]                       # [BN, slab] uint32
            _unpack_and_multiply(acc, a_buf, planes, s_ref, z_ref, x_ref, bits=bits, slab=slab,
                                 bn=bn, chunk=chunk, nchunks=nchunks, group_rows=group_rows,
                                 g_block=g_block, plan=plan, interpret=interpret)

        code_specs = [plgpu.BlockSpec((bn, slab), (lambda s, p=p: (ni, wps * (s + off) + p))) for p in range(wps)]
        in_specs = code_specs + [
            plgpu.BlockSpec((g_block, bn), lambda s: (scale_index(s + off), ni)),
            plgpu.BlockSpec((g_block, bn), lambda s: (scale_index(s + off), ni)),
            plgpu.BlockSpec((mb, tile_rows), lambda s: (mi, s + off), transforms=tr,
                            delay_release=1 if plan.overlap else 0),
        ]
        def compute(acc_ref):
            nonlocal acc
            acc = acc_ref
            plgpu.emit_pipeline(body, grid=(steps,), in_specs=in_specs,
                                max_concurrent_steps=max(cfg.stages, 2 if plan.overlap else 1))(
                *([codes] * wps), scales, zeros, x)
            plgpu.wgmma_wait(0)
            if comp:
                _compensator_mma(ki == 0, acc_ref, v_smem, xu_smem, bar, interpret)
            return acc_ref[...]

        acc = None
        _accumulate_and_store(compute, o_smem, out.at[pl.ds(ki * n + ni * bn, bn), pl.ds(mi * mb, mb)],
                              bn, mb, interpret)

    scratch = _decode_scratch(plan, bn, chunk, slab, mb, out_dtype, comp, rank_pad, tr, tr_r)
    return plgpu.kernel(kernel, out_type=jax.ShapeDtypeStruct((splits * n, m_pad), out_dtype),
                        grid=(n // bn, m_pad // mb, splits), grid_names=("n", "m", "k"), compiler_params=wg,
                        scratch_types=scratch, **_interpret_params(interpret))


def matmul_mgpu(x: jax.Array, kw: KernelWeights, *, config: Config | None = None,
                interpret: bool = False) -> jax.Array:
    """x [M, K] -> bf16 [M, N] through the Mosaic GPU kernel (weights in the kernel layout)."""
    m, k = x.shape
    if k != kw.k:
        raise ValueError(f"quant_matmul: x {tuple(x.shape)} does not match K={kw.k}")
    cfg = config or default_config(m, kw)
    if cfg.schedule == "stream_k":
        if cfg.k_splits != 1:
            raise ValueError(f"quant_matmul: k_splits={cfg.k_splits} with schedule='stream_k' (which splits K "
                             "by its own schedule); use schedule='split_k'")
        from pallas_kernels.quant_matmul import stream_k_sm90
        # the caller's config as given: without one stream-K picks its own (BN follows WARP_SPECIALIZED)
        return stream_k_sm90.matmul_stream_k(x, kw, config=config, interpret=interpret)
    if cfg.schedule != "split_k":
        raise ValueError(f"quant_matmul: schedule={cfg.schedule!r} is not 'split_k' or 'stream_k'")
    if cfg.block_m == 0:
        cfg = dataclasses.replace(cfg, block_m=default_config(m, kw).block_m)
    steps = kw.k_pad // (packing.slots_per_tile(kw.bits) * kw.slab)
    if steps % cfg.k_splits:
        raise ValueError(f"quant_matmul: k_splits={cfg.k_splits} does not divide the {steps} K tiles of {kw.k_pad}")
    per = packing.slots_per_tile(kw.bits)
    if per % cfg.chunk_slots:
        cfg = dataclasses.replace(cfg, chunk_slots=per)
    pairs = cfg.unpack.startswith("magic")
    if pairs != (kw.layout == layout.PAIRS_LAYOUT):
        raise ValueError(f"quant_matmul: unpack={cfg.unpack!r} does not read weights in layout {kw.layout!r} "
                         f"(magic_* need layout.prepare(qt, layout={layout.PAIRS_LAYOUT!r}), the others "
                         f"{layout.LAYOUT!r})")
    m_pad = -(-m // cfg.block_m) * cfg.block_m
    xb = x.astype(jnp.bfloat16)
    xp = jnp.pad(xb, ((0, m_pad - m), (0, kw.k_pad - k)))
    if cfg.unpack == "magic_f16":
        xp = xp.astype(jnp.float16)   # A tile is f16: wgmma needs both operands f16
    args = [kw.codes, kw.scales, kw.zeros, xp]
    rank_pad = 0
    if kw.u is not None:
        rank_pad = kw.v_t.shape[1]
        # one [M_pad, Rp] for all K splits: only split 0 reads it (copies and MMA under ki == 0)
        args += [compensator_xu(xp, kw.u, k, rank_pad), kw.v_t]
    f = build(kw.bits, kw.slab, kw.group_rows, kw.k_pad, kw.n, m_pad, rank_pad, cfg, bool(interpret))
    out_t = f(*args)                                       # [k_splits * N, m_pad]
    if cfg.k_splits > 1:
        out_t = out_t.reshape(cfg.k_splits, kw.n, m_pad).sum(0).astype(jnp.bfloat16)
    return out_t[:, :m].T


# ------------------------------------------------------------------------------------------
# Dequantize-only kernel for the prefill path: W_hat^T [N, Kp] bf16, then a bf16 GEMM.
# It reuses the decode kernel's unpack (f32 for planar_nmajor, the magic-number conversion for
# planar_pairs) and writes each dequantized chunk back through TMA. Several experts stacked along
# N (the grouped kernel's classes: codes [E*N, W], scales [E*Gp, N]) are one launch, and so are
# several classes of experts (a mixed-precision layer): each writes its experts' rows of one output.
@dataclasses.dataclass(frozen=True)
class DequantClass:
    """One stack of experts for the dequantize kernel, and where its rows go in the output."""
    bits: int
    slab: int
    group_rows: int
    k_pad: int               # the stack's own K padding (its codes and scales)
    num_experts: int
    unpack: str = "f32"      # "f32" (planar_nmajor) or "magic_bf16" (planar_pairs)
    start: int = 0           # output expert of the stack's first expert


@functools.lru_cache(maxsize=None)
def build_dequant_classes(classes: tuple, n: int, k_out: int, total_experts: int, interpret: bool,
                          block_n: int = 64, stages: int = 2):
    """f(codes, scales, zeros of each class) -> W_hat^T [total_experts * N, k_out] bf16: rows
    [(c.start + e) * N, (c.start + e + 1) * N) hold class c's expert e (its column n, K rows up to k_out);
    rows of experts no class covers are left unwritten (the caller fills them).

    k_out <= every class's k_pad, a multiple of 128: a class padded further (its K tile is longer)
    dequantizes only the tiles that reach k_out and skips the chunk stores past it. Why one launch for
    every class: with one launch per class, stacking their outputs by concatenation copied the whole
    dequantized layer once more (Mixtral gate/up at 4096 tokens: 1.50 ms of a 8.7 ms mixed FFN, H100,
    2026-12-07, benchmarks/results/logs/h100_2026-12-07_s23a_moe_4096.txt)."""
    bn = block_n
    if n % bn:
        raise ValueError(f"dequantize kernel: N={n} is not tiled by BN={bn}")
    if k_out % 128:
        raise ValueError(f"dequantize kernel: output width {k_out} is not a multiple of 128")
    n_blocks = n // bn
    plans = []
    for c in classes:
        per = packing.slots_per_tile(c.bits)
        tile_rows = per * c.slab
        if c.k_pad % tile_rows or c.k_pad < k_out:
            raise ValueError(f"dequantize kernel: K_pad={c.k_pad} of a {c.bits}-bit class is not tiled by its "
                             f"{tile_rows}-row tile or is under the output width {k_out}")
        if c.unpack not in ("f32", "magic_bf16"):
            raise ValueError(f"dequantize kernel: unpack={c.unpack!r} (f32 or magic_bf16: the output is bf16)")
        if c.start < 0 or c.start + c.num_experts > total_experts:
            raise ValueError(f"dequantize kernel: experts [{c.start}, {c.start + c.num_experts}) outside "
                             f"the output's {total_experts}")
        chunk = max(2, min(per, 128 // c.slab))
        if per % chunk:
            chunk = per
        g_block, scale_index = _scale_blocks(c.group_rows, tile_rows, c.k_pad)
        plans.append(dict(c=c, wps=packing.words_per_slab_row(c.bits), tile_rows=tile_rows, chunk=chunk,
                          nchunks=per // chunk, steps=-(-k_out // tile_rows), partial=bool(k_out % tile_rows),
                          plan=_unpack_plan(c.unpack, False, True, c.bits, chunk, per // chunk, c.slab),
                          g_block=g_block, scale_index=scale_index,
                          sbpe=(c.k_pad // c.group_rows) // g_block))
    # A buffers as kernel scratch (the natively tested form), one pair per distinct width and swizzle:
    # classes of one slab share theirs (their branches never run in the same CTA)
    buf_keys = sorted({(q["chunk"] * q["c"].slab, q["c"].slab) for q in plans})
    for q in plans:
        q["buf"] = buf_keys.index((q["chunk"] * q["c"].slab, q["c"].slab))
    wg = plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup)

    def run_class(q, codes, scales, zeros, out, local, col, ni, a_buf):
        c, wps, tile_rows, chunk, g_block = q["c"], q["wps"], q["tile_rows"], q["chunk"], q["g_block"]
        scale_base = local * q["sbpe"]
        row_block = local * n_blocks + col              # this tile in the class's stacked codes

        def body(idx, *step_refs):
            (s,) = idx
            planes = [r[...] for r in step_refs[:wps]]
            s_ref, z_ref = step_refs[wps:]
            scales_of = _pair_scales_by_slot(s_ref, z_ref, bn=bn, slab=c.slab, group_rows=c.group_rows,
                                             g_block=g_block, unpack=c.unpack)
            for ci in range(q["nchunks"]):
                buf = a_buf.at[ci % 2]
                plgpu.wait_smem_to_gmem(1, wait_read_only=True)   # buf's previous store has read it
                if q["plan"].pairs:   # chunk // 2 pair-slots converted side by side, one store
                    jps = list(range(ci * chunk // 2, (ci + 1) * chunk // 2))
                    buf[...] = _dequant_pairs(planes, jps, [scales_of(jp) for jp in jps], bn, c.slab, c.unpack,
                                              interpret, c.bits)
                else:
                    for jj in range(chunk):
                        j = ci * chunk + jj
                        g = (j * c.slab) // c.group_rows if g_block > 1 else 0
                        buf[:, pl.ds(jj * c.slab, c.slab)] = _dequant_slab(planes, c.bits, j, s_ref, z_ref, g, bn,
                                                                           c.slab, "f32")
                plgpu.commit_smem()
                k0 = s * tile_rows + ci * chunk * c.slab

                def store(buf=buf, k0=k0):
                    plgpu.copy_smem_to_gmem(buf, out.at[pl.ds(ni * bn, bn), pl.ds(k0, chunk * c.slab)])
                if q["partial"]:      # the last tile reaches past k_out: its chunks there are not stored
                    pl.when(k0 < k_out)(store)
                else:
                    store()

        in_specs = [plgpu.BlockSpec((bn, c.slab), (lambda s, p=p: (row_block, wps * s + p))) for p in range(wps)]
        in_specs += [plgpu.BlockSpec((g_block, bn), lambda s: (scale_base + q["scale_index"](s), col))] * 2

        plgpu.emit_pipeline(body, grid=(q["steps"],), in_specs=in_specs, max_concurrent_steps=stages)(
            *([codes] * wps), scales, zeros)
        plgpu.wait_smem_to_gmem(0)

    def kernel(*refs):
        out, bufs = refs[3 * len(plans)], refs[3 * len(plans) + 1:]
        ni = lax.axis_index("n")                       # column tile over all output experts
        pos, col = ni // n_blocks, ni % n_blocks
        for i, q in enumerate(plans):
            c = q["c"]
            run = functools.partial(run_class, q, *refs[3 * i:3 * i + 3], out, pos - c.start, col, ni,
                                    bufs[q["buf"]])
            if len(plans) == 1 and c.start == 0 and c.num_experts == total_experts:
                run()                                 # every CTA's: no branch (the launch as it was)
            else:                                     # one branch per class, by the CTA's output expert
                pl.when((pos >= c.start) & (pos < c.start + c.num_experts))(run)

    return plgpu.kernel(kernel, out_type=jax.ShapeDtypeStruct((total_experts * n, k_out), jnp.bfloat16),
                        grid=(total_experts * n // bn,), grid_names=("n",), compiler_params=wg,
                        scratch_types=[plgpu.SMEM((2, bn, width), jnp.bfloat16, transforms=_swizzle_transforms(slab))
                                       for width, slab in buf_keys],
                        **_interpret_params(interpret))


def build_dequant(bits: int, slab: int, group_rows: int, k_pad: int, n: int, interpret: bool,
                  unpack: str = "f32", num_experts: int = 1):
    """f(codes [E*N, W], scales [E*Gp, N], zeros) -> W_hat^T [E*N, k_pad] bf16 (padded K rows included):
    one class of `build_dequant_classes`."""
    cls = DequantClass(bits=bits, slab=slab, group_rows=group_rows, k_pad=k_pad, num_experts=num_experts,
                       unpack=unpack)
    return build_dequant_classes((cls,), n, k_pad, num_experts, interpret)


def dequant_unpack(layout_name: str) -> str:
    """The dequantize kernel's unpack for a kernel layout (magic for planar_pairs)."""
    return "magic_bf16" if layout_name == layout.PAIRS_LAYOUT else "f32"


def dequantize_stacked_mgpu(codes, scales, zeros, *, bits: int, slab: int, group_rows: int, k_pad: int, n: int,
                            num_experts: int, layout_name: str, interpret: bool = False) -> jax.Array:
    """W_hat^T [E*N, k_pad] bf16 of E experts stacked in a kernel layout (codes [E*N, W],
    scales / zeros [E*Gp, N]); rows k >= K are padding."""
    f = build_dequant(bits, slab, group_rows, k_pad, n, bool(interpret), unpack=dequant_unpack(layout_name),
                      num_experts=num_experts)
    return f(codes, scales, zeros)


def dequantize_mgpu(kw: KernelWeights, *, interpret: bool = False) -> jax.Array:
    """W_hat^T [N, k_pad] bf16 through the dequantize kernel (rows k >= K are padding)."""
    return dequantize_stacked_mgpu(kw.codes, kw.scales, kw.zeros, bits=kw.bits, slab=kw.slab,
                                   group_rows=kw.group_rows, k_pad=kw.k_pad, n=kw.n, num_experts=1,
                                   layout_name=kw.layout, interpret=interpret)


def dequant_dot_mgpu(x: jax.Array, kw: KernelWeights, *, interpret: bool = False) -> jax.Array:
    """Prefill path: y = x @ W_hat (+ (x @ u) @ v) with W_hat^T from `dequantize_mgpu`, bf16 GEMM."""
    m, k = x.shape
    xb = x.astype(jnp.bfloat16)
    w_t = dequantize_mgpu(kw, interpret=interpret)
    xp = jnp.pad(xb, ((0, 0), (0, kw.k_pad - k)))
    y = lax.dot_general(xp, w_t, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    if kw.u is not None:
        xu = jnp.dot(xb, kw.u.astype(jnp.bfloat16), preferred_element_type=jnp.float32)
        y = y + lax.dot_general(xu.astype(jnp.bfloat16), kw.v_t[:, :kw.rank], (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32)
    return y.astype(jnp.bfloat16)
