"""The routed experts of an MoE FFN kept in the padded row domain between their two grouped launches.

y[t] = sum_j weights[t, j] * FFN_e(x[t]) with e = ids[t, j], FFN_e(x) = (act(x @ G_e) * (x @ U_e)) @ D_e,
gate and up fused into one [E, H, 2I] projection (`mgpu_sm90.fuse_columns`: expert e's I gate
columns, then its I up columns).

Why: through `grouped_matmul` (rows sorted by expert in, rows sorted by expert out) the Mixtral FFN
at 1 token took 95-100 us on the H200, of which ~21 us were ~19 XLA ops around the two launches
(stop 15, grouped NOTES): the (token, slot) pairs argsorted and gathered, a padded copy of x
scattered for each launch, each launch's split-K partials read back through a gather along their
minor (row) axis, the inverse permutation. Here:
* the pairs go straight to their padded rows: a pair's row is its expert's first padded row plus
  its rank among the pairs routed to that expert (a cumulative sum of one-hot rows; no sort, no
  inverse permutation). Ranks follow the pair order t * k + j, as the stable sort did. At decode
  (at most UNROLL_PAIRS pairs) the ranks and starts are unrolled compares over the pairs instead:
  elementwise work XLA fuses, where the cumulative sums were ~3 us of small fusions at 1 token;
* the padded x is a gather of token rows, one source pair per padded row (-1: a zero row), not a
  scatter of x's rows (XLA's row scatter took 2.4 us at 1 token, stop 20; the gather fuses with x's
  fold sums). Mixtral FFN 3-bit at 1 token with both changes: 82.3 -> 80.0 us (H200, s21a);
* the gate/up launch's partials are summed over the splits and SiLU(gate) * up of every padded row IS
  the down launch's padded x (same experts, same order, same MB): nothing is gathered or scattered
  between the launches. Padding rows are zero in x, so they are zero in the product (act(0) * 0);
  blocks past the last real one are written by neither launch and never read. The decode launches
  store their output by padded row (grouped.ROWS_OUT): the split sum is elementwise adds of column
  slices that XLA fuses into SiLU(gate) * up, with no transpose between the launches;
* the down launch's partials are added the same way inside the combine's row gather, which reads
  each pair's row once (by rows: only the real rows' bytes) and weights it.
A down projection whose classes order the experts differently (mixed precision with other bit
widths than gate/up) gets its own padded rows between the launches: a row gather up to UNROLL_PAIRS
pairs, a row scatter above (see routed_ffn).

Scope (`applies`): both projections quantized GroupedKernelWeights that run as one launch each (one
class holding every expert, or the multi-class launch), fewer rows than the prefill path takes.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from pallas_kernels.grouped_matmul import mgpu_sm90 as grouped, multi_class_sm90


# Two other forms were timed and removed (grouped NOTES, stops 16, 21 and 29): the weighted combine as k unrolled
# row reads (87.5 vs 86.0-86.2 us at 1 token, H200 s16a/b) and the down partials summed in a reduction of their
# own before the combine's gather (79.6 vs 80.0, H200 s21a; 88.5 vs 88.0, H100 s26e): neither
# paid for its branch. Nor did the decode bookkeeping packed into one int32 array (FUSED_BOOKKEEPING: XLA still
# made two fusions; mixed 87.5 vs 83.2 us at 1 token, H100 s29a). Commit 3bdd085 holds all three.

# The mixed re-pad's row gather reads a materialized h (an optimization barrier: True) or computes SiLU(gate) * up
# of the rows it reads (False). By columns the barrier is needed: fused into the gather, XLA recomputed
# SiLU(gate) * up from the strided partials per gathered element (9.2 us at 1 token, H200 s21a), so by columns the
# barrier stays whatever this says. By rows (grouped.ROWS_OUT) a gathered row's partials are contiguous: Mixtral's mixed
# 2/3/4-bit FFN at 1 token took 83.9 us without the barrier against 87.8 with it (H100, 2026-12-07, s28a, one
# call; 282.9 at 16 tokens both, where the row scatter takes over).
REPAD_BARRIER = False

# Routing bookkeeping (padded rows and each padded row's source pair) as unrolled compares for at most
# this many (token, slot) pairs, else cumulative sums and an int32 scatter (0: always the latter). The
# unrolled work grows as pairs squared; 8 covers decode of up to 4 tokens at top-2.
UNROLL_PAIRS = 8


@dataclasses.dataclass(frozen=True)
class Launch:
    """One projection's launch over padded rows, for M = T * k pairs (all static)."""
    order: tuple          # global expert at each position (the padded buffer's expert order)
    mb: int               # rows per block
    num_blocks: int       # static bound B of row blocks
    splits: int           # split-K partials in the output
    run: Callable         # (x_pad [B*MB, K'] , counts [>= E] int32) -> [splits * N, B * MB], or by rows:
    rows: bool            # [B * MB, splits * N] (grouped.ROWS_OUT)

    @property
    def rows_pad(self) -> int:
        return self.num_blocks * self.mb


def launch_for(m: int, gkw, interpret: bool = False) -> Launch | None:
    """The padded-row launch of `gkw` for m pairs, or None when it takes several launches (classes
    that the multi-class kernel does not cover) or the prefill path."""
    if grouped.prefill_applies(m, gkw):
        return None
    if grouped._uniform(gkw):
        c = gkw.classes[0]
        if not isinstance(c, grouped.ExpertClass):
            return None
        cfg, nb = grouped.class_config(m, c, None)
        run = lambda x_pad, counts: grouped.class_kernel(x_pad, counts, c, cfg, nb, interpret)
        splits = 1 if grouped.reduces_splits(cfg, interpret) else cfg.k_splits   # summed in the launch
        return Launch(order=tuple(c.experts), mb=cfg.block_m, num_blocks=nb, splits=splits, run=run,
                      rows=grouped.rows_out(cfg))
    if multi_class_sm90.applies(gkw):
        _, mb, nb, splits, _ = multi_class_sm90.plan_layer(m, gkw)
        run = lambda x_pad, counts: multi_class_sm90.multi_class_kernel(x_pad, counts, gkw, m, interpret)
        return Launch(order=gkw.order, mb=mb, num_blocks=nb, splits=splits, run=run,
                      rows=multi_class_sm90.rows_out(m, gkw))
    return None


def applies(m: int, gate_up, down) -> bool:
    """Whether `routed_ffn` takes these projections at m = T * k pairs."""
    ok = lambda w: isinstance(w, grouped.GroupedKernelWeights) and launch_for(m, w) is not None
    return ok(gate_up) and ok(down) and gate_up.num_experts == down.num_experts and gate_up.n == 2 * down.k


def padded_rows(ids: jax.Array, order: tuple, mb: int):
    """ids [T, k] int32 -> (dest [T*k] padded row of each pair, counts [E] MB-row blocks per position).

    Position p holds expert order[p]; its rows start at MB * (blocks of positions before p); pair
    t * k + j goes to its expert's start plus the number of earlier pairs on that expert."""
    e = len(order)
    pos = jnp.asarray(grouped.positions(order))[ids.reshape(-1).astype(jnp.int32)]   # [P]
    if pos.shape[0] <= UNROLL_PAIRS:
        return _padded_rows_unrolled(pos, e, mb)
    onehot = (pos[:, None] == jnp.arange(e, dtype=jnp.int32)[None, :]).astype(jnp.int32)   # [P, E]
    seen = jnp.cumsum(onehot, axis=0)                                        # pairs so far per position
    rank = jnp.sum(seen * onehot, axis=1) - 1
    counts = (seen[-1] + mb - 1) // mb
    pad_start = (jnp.cumsum(counts) - counts) * mb
    return pad_start[pos] + rank, counts


def _padded_rows_unrolled(pos: jax.Array, e: int, mb: int):
    """padded_rows from the pairs' positions pos [P] by compares unrolled over the P pairs: no
    cumulative sum or reduction, so the whole bookkeeping is elementwise."""
    p = pos.shape[0]
    idx = jnp.arange(p, dtype=jnp.int32)
    same = [pos == pos[q] for q in range(p)]                                 # [P] each: on pair q's position
    rank = sum(((idx > q) & same[q]).astype(jnp.int32) for q in range(p))    # earlier pairs on my position
    hits = sum(s.astype(jnp.int32) for s in same)                            # pairs on my position
    blocks = jnp.where(rank == 0, (hits + mb - 1) // mb, 0)                  # carried by each position's first pair
    start = mb * sum(jnp.where(pos[q] < pos, blocks[q], 0) for q in range(p))
    slots = jnp.arange(e, dtype=jnp.int32)
    per_position = sum((slots == pos[q]).astype(jnp.int32) for q in range(p))   # [E]
    return start + rank, (per_position + mb - 1) // mb


def padded_sources(dest: jax.Array, rows_pad: int) -> jax.Array:
    """dest [P] distinct padded rows of the pairs -> src [rows_pad] int32: the pair at each padded row,
    -1 at padding rows. Unrolled compares up to UNROLL_PAIRS pairs, else a scatter of P indices."""
    p = dest.shape[0]
    if p <= UNROLL_PAIRS:
        rows = jnp.arange(rows_pad, dtype=jnp.int32)
        return sum(jnp.where(rows == dest[q], q + 1, 0) for q in range(p)) - 1
    return jnp.full((rows_pad,), -1, jnp.int32).at[dest].set(jnp.arange(p, dtype=jnp.int32))


def gather_rows(a: jax.Array, index: jax.Array) -> jax.Array:
    """a [N, C], index [R] (-1: none) -> [R, C]: row index[r] of a, zeros where index < 0."""
    rows = jnp.take(a, jnp.maximum(index, 0), axis=0)
    return jnp.where((index >= 0)[:, None], rows, jnp.zeros((), a.dtype))


def scatter_rows(a: jax.Array, dest: jax.Array, rows_pad: int) -> jax.Array:
    """a [P, C] -> [rows_pad, C]: row p of a at dest[p], zeros elsewhere (the mixed re-pad above
    UNROLL_PAIRS pairs)."""
    return jnp.zeros((rows_pad, a.shape[1]), a.dtype).at[dest].set(a)


def _summed(out, launch: Launch, n: int) -> jax.Array:
    """The launch's output -> [rows_pad, N] float32, its split-K partials added.

    By rows ([rows_pad, splits * N]) the adds are unrolled over column slices: elementwise work that XLA
    fuses into the consumer (SiLU(gate) * up; the combine's row gather, which then reads only the real
    rows), where a reduction over a split axis is a fusion of its own. By columns ([splits * N,
    rows_pad]) a dense sum, transposed (XLA folds the transpose into the consumer's indexing)."""
    if launch.rows:
        return sum(out[:, s * n:(s + 1) * n].astype(jnp.float32) for s in range(launch.splits))
    return out.astype(jnp.float32).reshape(launch.splits, n, launch.rows_pad).sum(0).T


def routed_ffn(x: jax.Array, weights: jax.Array, ids: jax.Array, gate_up, down, *,
               act: Callable = jax.nn.silu, interpret: bool = False) -> jax.Array:
    """x [T, H], weights [T, k], ids [T, k] int32 -> [T, H] in x.dtype (float32 accumulation and
    combine, bf16 operands). gate_up: GroupedKernelWeights [E, H, 2I] (gate | up per expert),
    down: [E, I, H]; both must pass `applies`."""
    t, k = ids.shape
    m = t * k
    if not applies(m, gate_up, down):
        raise ValueError(f"routed_ffn: projections {gate_up.shape} / {down.shape} at {m} pairs do not run as one "
                         "padded launch each (see routed_ffn.applies)")
    inter = down.k
    first, second = launch_for(m, gate_up, interpret), launch_for(m, down, interpret)
    dest, counts = padded_rows(ids, first.order, first.mb)
    src = padded_sources(dest, first.rows_pad)                               # pair p reads token p // k
    tokens = jnp.where(src >= 0, src // k, -1)
    x_pad = gather_rows(x.astype(jnp.bfloat16), tokens)
    gu = _summed(first.run(x_pad, counts), first, gate_up.n)                 # [R, 2I]
    h = (act(gu[:, :inter]) * gu[:, inter:]).astype(jnp.bfloat16)             # [R, I]
    if (second.order, second.mb, second.num_blocks) != (first.order, first.mb, first.num_blocks):
        dest2, counts2 = padded_rows(ids, second.order, second.mb)
        if m <= UNROLL_PAIRS:   # padded row r of the down launch reads the gate/up row of its pair
            # h materialized first: fused into the gather, XLA recomputed SiLU(gate) * up from the strided
            # partials per gathered element (9.2 us at 1 token, 62 us at 64; H200, s21a). From 16 tokens on
            # the row scatter stays: the gather + the fold sums of h took 28 us there (s21b), the scatter 11
            src2 = padded_sources(dest2, second.rows_pad)
            if REPAD_BARRIER or not first.rows:
                h = jax.lax.optimization_barrier(h)
            h = gather_rows(h, jnp.where(src2 >= 0, dest[jnp.maximum(src2, 0)], -1))
        else:
            h = scatter_rows(jnp.take(h, dest, axis=0), dest2, second.rows_pad)
        dest, counts = dest2, counts2
    y_pad = _summed(second.run(h, counts), second, down.n)                   # [R, H]
    # the pairs' rows gathered and weighted; XLA fuses the down partials' split adds into this gather
    w = weights.astype(jnp.float32)
    y = jnp.sum(jnp.take(y_pad, dest, axis=0).reshape(t, k, down.n) * w[..., None], axis=1)
    return y.astype(x.dtype)
