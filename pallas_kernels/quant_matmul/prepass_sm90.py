"""Pre-pass of the stream-K decode kernel (Hopper, Mosaic GPU): x's pad, fold-block sums and x @ u in one launch.

Why: beside the stream-K kernel (12.98 us; 4096 x 14336 3-bit g64, M = 1, H200, 2026-12-04, s20d) XLA ran
the fusion that pads x and sums its fold blocks (1.4 us) and, with a rank-32 compensator, a GEMM for
x @ u (2.2 us) plus its split-K reduce (1.3 us): the compensator cost +29% where issue 6 allows +10%.
Each of those is a launch whose cost is almost all fixed. Here one launch, one CTA per (K tile t, token
block), reads x in place (TMA zero-fills the rows >= M and columns >= K of a box, so x needs no pad op)
and writes, per K tile:

  xp[m, k]              x zero-padded to [M_pad, Kp] (the decode kernel's x input)
  xs[t * R + f, m]      sum of x[m, k] over fold block f of tile t  (= mgpu_sm90.fold_group_sums(xp))
  xu_parts[t, m, :]     x[m, tile t] @ u[tile t, :] rounded to bf16 (the tile's share of x @ u)

with two wgmmas on the tile: A = the fold blocks' indicator rows [64, T] @ x^T (the sums, float32),
and x [64 token rows, T] @ u [T, Rp]. The decode kernel's compensator step then adds
v^T @ xu_parts[t]^T for every t (`stream_k_sm90`, kt small wgmmas). The sum over tiles is thus taken
after each tile's x @ u share is rounded to bf16 (the reference rounds the whole x @ u once): the
tests bound the difference against float64.

Limits (the caller falls back to the XLA ops otherwise, `usable`): x boxes are 64 token rows (a wgmma
M), so token blocks of MB <= 64; TMA reads x and u in place only when their tiled shapes allow it
(M <= 8 or a multiple of 8, K a multiple of 64, rank a multiple of 8); kt * MB * Rp bf16 parts fit the
decode kernel's shared memory.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.quant_matmul import mgpu_sm90 as base

X_ROWS = 64                       # token rows of an x box: the M of the x @ u wgmma
MAX_PART_BYTES = 32 * 1024        # kt * MB * Rp * 2: the decode kernel's shared memory for the parts
# Load only the x rows of the token block (MB) and the fold rows of the indicator (R rounded to 8) instead
# of 64-row boxes that TMA mostly zero-fills: the wgmma rows past them are left as whatever the shared
# memory held and only produce output rows that are never stored (a matmul's row i reads only row i of
# A). 4096 x 14336 3-bit rank 32 (H100, 2026-12-07): M = 1 18.5 / 18.4 us against 19.3 on full boxes,
# M = 16 20.9 / 20.7 against 21.8 (s26a / s26c, both forms in one call each); native tests pass in both
# forms (s26c). Tested in interpret mode too, where the rows past the box hold NaN.
SHORT_BOXES = True


MAX_SMEM = 224 * 1024              # the pre-pass's own buffers (an H100 CTA may have 227 KB)


def smem_bytes(tile_rows: int, mb: int, rank_pad: int) -> int:
    """Shared memory of one pre-pass CTA: the x and indicator boxes, u's tile, the two output tiles."""
    x_rows = X_ROWS if rank_pad else mb
    return (x_rows + X_ROWS) * tile_rows * 2 + tile_rows * rank_pad * 2 + X_ROWS * mb * 4 + X_ROWS * rank_pad * 2


def usable(m: int, k: int, mb: int, rank: int, rank_pad: int, k_tiles: int, tile_rows: int = 512) -> bool:
    """Whether the pre-pass can serve a call (else the XLA pad / sums / x @ u ops run): x and u readable
    in place by TMA, the shares within the decode kernel's shared memory, and the pre-pass's own
    buffers within one CTA's (rank 128 with 512-row tiles is not). rank 0: pad and sums only."""
    tiles_ok = (m <= 8 or m % 8 == 0) and k % 64 == 0 and rank % 8 == 0
    return (mb <= X_ROWS and tiles_ok and k_tiles * mb * rank_pad * 2 <= MAX_PART_BYTES
            and smem_bytes(tile_rows, mb, rank_pad) <= MAX_SMEM)


def ind_rows(nf: int) -> int:
    """Rows of the indicator array: the nf fold blocks, zero rows up to a multiple of 8 (a swizzle tile)."""
    return -(-nf // 8) * 8


def indicator(tile_rows: int, f_rows: int) -> np.ndarray:
    """[ind_rows(nf), tile_rows] bf16-exact ones: row f < nf marks the rows of fold block f of a K tile."""
    nf = tile_rows // f_rows
    return (np.arange(tile_rows)[None, :] // f_rows == np.arange(ind_rows(nf))[:, None]).astype(np.float32)


def shares_reference(xp: jax.Array, u: jax.Array, *, tile_rows: int, rank_pad: int) -> jax.Array:
    """xu_parts [kt, M_pad, Rp] from the padded x [M_pad, Kp] in plain jnp: each K tile's share of x @ u,
    float32 sums rounded to bf16. (xs is mgpu_sm90.fold_group_sums(xp).)"""
    m_pad, k_pad = xp.shape
    kt = k_pad // tile_rows
    up = jnp.pad(u.astype(jnp.bfloat16).astype(jnp.float32), ((0, k_pad - u.shape[0]), (0, rank_pad - u.shape[1])))
    parts = jnp.einsum("mtk,tkr->tmr", xp.astype(jnp.float32).reshape(m_pad, kt, tile_rows),
                       up.reshape(kt, tile_rows, rank_pad))
    return parts.astype(jnp.bfloat16)


def build(m: int, k: int, m_pad: int, mb: int, k_pad: int, tile_rows: int, f_rows: int, rank_pad: int,
          interpret: bool, short_boxes: bool = False):
    """f(x [M, K] bf16, ind [nf, T] bf16[, u [K, r] bf16]) -> (xp [M_pad, Kp] bf16, xs [kt * R, M_pad] f32[,
    xu_parts [kt, M_pad, Rp] bf16]) (rank_pad = 0: no compensator, pad and sums only). In interpret mode (which checks bounds where TMA zero-fills) the
    caller passes x, ind and u already padded to the boxes (`pad_for_interpret`)."""
    kt, nf = k_pad // tile_rows, tile_rows // f_rows
    rows = base.fold_rows_per_tile(nf)
    if m_pad % mb or mb > X_ROWS or mb % 8:
        raise ValueError(f"quant_matmul pre-pass: token block {mb} must be a multiple of 8 up to {X_ROWS} "
                         f"and tile M_pad={m_pad}")
    if rows > X_ROWS:
        raise ValueError(f"quant_matmul pre-pass: {nf} fold blocks per tile exceed one wgmma's {X_ROWS} rows")
    # one swizzle for every operand: a wgmma takes A and B of the same swizzle, and u's [T, Rp] rows are
    # 64 bytes at Rp = 32 (without a compensator: 128 bytes)
    tr_x = tr_r = base.compensator_transforms(rank_pad) if rank_pad else base._swizzle_transforms(64)
    wg = plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup)

    comp = rank_pad > 0
    x_rows = X_ROWS if comp else mb       # x is wgmma A (64 rows) only for x @ u
    x_box = mb if short_boxes else x_rows
    ind_box = ind_rows(nf) if short_boxes else X_ROWS

    def products(ind_smem, x_smem, u_smem):
        """(sums [64, MB], x @ u [64, Rp] or None) float32: both wgmmas issued before either is waited for."""
        x_block = x_smem.at[pl.ds(0, mb)]
        if interpret:    # GPU interpret mode: no register accumulator, no transposed operand
            dot = lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32)
            return dot(ind_smem[...], x_block[...].T), dot(x_smem[...], u_smem[...]) if comp else None

        def scope(sums_acc, *xu_acc):
            plgpu.wgmma(sums_acc, ind_smem, plgpu.transpose_ref(x_block, (1, 0)))   # [fold rows, tokens]
            if comp:
                plgpu.wgmma(xu_acc[0], x_smem, u_smem)                              # [tokens, rank]
            return sums_acc[...], (xu_acc[0][...] if comp else None)
        accs = [plgpu.ACC((X_ROWS, mb), jnp.float32)] + ([plgpu.ACC((X_ROWS, rank_pad), jnp.float32)] if comp else [])
        return pl.run_scoped(scope, *accs)

    def kernel(*refs):
        x, ind, u = refs[0], refs[1], (refs[2] if comp else None)
        refs = refs[2 + comp:]
        xp, xs, xu_parts = refs[0], refs[1], (refs[2] if comp else None)
        refs = refs[2 + comp:]
        x_smem, ind_smem, xs_smem = refs[:3]
        u_smem, xu_smem = refs[3:5] if comp else (None, None)
        bar = refs[-1]
        t, mi = lax.axis_index("t"), lax.axis_index("m")
        cols = pl.ds(t * tile_rows, tile_rows)
        plgpu.copy_gmem_to_smem(x.at[pl.ds(mi * mb, x_box), cols], x_smem.at[pl.ds(0, x_box)], bar)
        plgpu.copy_gmem_to_smem(ind.at[pl.ds(0, ind_box)], ind_smem.at[pl.ds(0, ind_box)], bar)
        if comp:
            plgpu.copy_gmem_to_smem(u.at[cols, pl.ds(0, rank_pad)], u_smem, bar)
        plgpu.barrier_wait(bar)
        plgpu.copy_smem_to_gmem(x_smem.at[pl.ds(0, mb)], xp.at[pl.ds(mi * mb, mb), cols])
        sums, xu = products(ind_smem, x_smem, u_smem)
        xs_smem[...] = sums
        if comp:
            xu_smem[...] = xu.astype(jnp.bfloat16)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(xs_smem.at[pl.ds(0, rows)], xs.at[pl.ds(t * rows, rows), pl.ds(mi * mb, mb)])
        if comp:
            plgpu.copy_smem_to_gmem(xu_smem.at[pl.ds(0, mb)], xu_parts.at[t, pl.ds(mi * mb, mb)])
        # the stores need only have left shared memory: the next launch sees them complete
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    out_type = (jax.ShapeDtypeStruct((m_pad, k_pad), jnp.bfloat16),
                jax.ShapeDtypeStruct((kt * rows, m_pad), jnp.float32))
    scratch = [plgpu.SMEM((x_rows, tile_rows), jnp.bfloat16, transforms=tr_x),
               plgpu.SMEM((X_ROWS, tile_rows), jnp.bfloat16, transforms=tr_x),
               plgpu.SMEM((X_ROWS, mb), jnp.float32)]
    if rank_pad:
        out_type += (jax.ShapeDtypeStruct((kt, m_pad, rank_pad), jnp.bfloat16),)
        scratch += [plgpu.SMEM((tile_rows, rank_pad), jnp.bfloat16, transforms=tr_r),
                    plgpu.SMEM((X_ROWS, rank_pad), jnp.bfloat16, transforms=tr_r)]
    scratch += [plgpu.Barrier(num_arrivals=3 if rank_pad else 2)]
    return plgpu.kernel(kernel, out_type=out_type, grid=(kt, m_pad // mb), grid_names=("t", "m"),
                        compiler_params=wg, scratch_types=scratch, **base._interpret_params(interpret))


def pad_for_interpret(x, ind, u, *, m_pad: int, mb: int, k_pad: int, rank_pad: int, short_boxes: bool = False):
    """The zero padding TMA supplies natively (reads past an array's end), done by jnp for interpret mode."""
    rows = max(m_pad, m_pad - mb + (X_ROWS if u is not None and not short_boxes else mb))
    x = jnp.pad(x, ((0, rows - x.shape[0]), (0, k_pad - x.shape[1])))
    ind = jnp.pad(ind, ((0, X_ROWS - ind.shape[0]), (0, 0)))
    if u is not None:
        u = jnp.pad(u, ((0, k_pad - u.shape[0]), (0, rank_pad - u.shape[1])))
    return x, ind, u


def prepass(x: jax.Array, u: jax.Array | None, *, mb: int, k_pad: int, tile_rows: int, f_rows: int,
            rank_pad: int, interpret: bool = False):
    """x [M, K], u [K, r] or None -> (xp [M_pad, Kp] bf16, xs [kt * R, M_pad] f32, xu_parts [kt, M_pad, Rp]
    bf16 or None)."""
    m, k = x.shape
    m_pad = -(-m // mb) * mb
    rank_pad = rank_pad if u is not None else 0
    xb = x.astype(jnp.bfloat16)
    ub = None if u is None else u.astype(jnp.bfloat16)
    ind = jnp.asarray(indicator(tile_rows, f_rows), jnp.bfloat16)
    if interpret:
        xb, ind, ub = pad_for_interpret(xb, ind, ub, m_pad=m_pad, mb=mb, k_pad=k_pad, rank_pad=rank_pad,
                                        short_boxes=SHORT_BOXES)
    f = _build_cached(m, k, m_pad, mb, k_pad, tile_rows, f_rows, rank_pad, bool(interpret), SHORT_BOXES)
    outs = f(xb, ind, *([ub] if ub is not None else []))
    return tuple(outs) if ub is not None else (*outs, None)


@functools.lru_cache(maxsize=None)
def _build_cached(*args):
    return build(*args)
