"""MiLo: HQQ plus a low-rank compensator, fitted by alternation (ALGORITHMS.md section 2).

Per weight matrix W [K, N] (y = x @ W) and rank r, each round:
    1. Q = HQQ(W - U V)           (round 1: U V = 0, i.e. plain HQQ(W))
    2. E = W - deq(Q)             (the residual of the ORIGINAL W)
    3. U, V = best rank-r factors of E, singular values split as sqrt on both sides.
The stored model is deq(Q) + U V; its error ||W - deq(Q) - U V||_F is measured every round.

Step 3 is a warm-started subspace iteration, not a fresh SVD: the right basis Omega [N, p]
(p = r + oversample) carried over from the previous round is refined by `power_iters` rounds of
X = orth(E Omega), Omega = orth(E^T X); then X = orth(E Omega), B = X^T E [p, N] and the SVD of that
small p x N matrix (Rayleigh-Ritz) gives U = X Ub sqrt(S), V = sqrt(S) Vb^T truncated to r, and the
next round's Omega = Vb. Round 1 starts from a Gaussian Omega drawn with a fixed key. Because E
changes little between rounds, the warm start makes a few iterations per round as good as an exact
truncated SVD (tests check within 1%).

Stopping (the paper's rule, not the published code's fixed 20 rounds): after round i the relative
improvement (err_{i-1} - err_i) / err_{i-1} is compared with `tol`; the loop ends below it (or when
the error grew) or after `rounds` rounds. The best iterate (Q, U, V) over all rounds is kept.
Everything runs in one jit-compiled lax.while_loop per matrix, vmapped over the stacked experts
(experts that stop early stay frozen while the others continue). A single matrix runs unbatched:
on XLA:CPU a size-1 vmap batch compiles to different last-bit arithmetic, and the alternation is
chaotic enough for that to change codes; batches of B > 1 reproduce the unbatched program exactly,
so one expert alone gives bit-identical results to the same expert inside a batch.

Per-expert ranks: the loop runs at r_max = max rank with the columns past each expert's own rank
masked to zero (the SVD's singular values are sorted, so the first r_e columns are that expert's
best rank-r_e factors). Storage then keeps only real columns (compensator.store_factors: uniform
ranks -> u [..., K, r], v [..., r, N]; mixed ranks -> RaggedFactor, concatenated along the rank
axis), so bits_per_weight counts no padding.

Compensator storage (`compensator_dtype`): float32 / bfloat16 / float16 / int8 / int4. After the
factors are rounded to it, the base quantization is refitted once, Q = HQQ(W - deq(U) deq(V)); of
{refit, not refit, plain HQQ with zero factors} the one with the smallest Frobenius error of the
stored representation is kept, so the result is never worse than plain HQQ. (Measured on
low-rank + Student-t matrices: the refit alone is usually slightly WORSE in Frobenius norm, because
HQQ minimises an L_0.7 error and the loop's Q is already the best of all rounds; so in practice the
loop's Q is kept and int8 factors cost almost nothing, int4 about +1.5% error at r = 16.)

HQQ itself is milo_jax.quant.hqq.quantize_matrix (same solver, defaults and zero-point storage as
quantize_tensor, so round 1 is bit-identical to quantize_tensor(W)).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from milo_jax.quant import api, compensator, hqq, packing
from milo_jax.quant.tensor import QuantizedTensor

_HI = jax.lax.Precision.HIGHEST


def _mm(a, b):
    return jnp.matmul(a, b, precision=_HI)


def _orth(x):
    """Orthonormal basis of the span of x's columns, x [M, p] (p small).

    Symmetric orthonormalisation x (x^T x)^(-1/2) through the eigendecomposition of the p x p Gram
    matrix, done twice (the second pass removes what float32 lost in the first, as in CholeskyQR2).
    Why not jnp.linalg.qr: XLA:CPU's QR of a tall-skinny [14336, 32] block is ~30x slower than
    this, and the round loop calls it five times per round. Directions with (near-)zero weight get
    a clamped eigenvalue, so an all-zero x stays zero instead of turning into NaN.
    """
    for _ in range(2):
        lam, vecs = jnp.linalg.eigh(_mm(x.T, x))
        lam = jnp.maximum(lam, 1e-12 * jnp.max(lam) + 1e-30)
        x = _mm(x, vecs * jax.lax.rsqrt(lam)[None, :])
    return x


def _dequant(codes, s16, z16, group_size):
    """codes [K, N] (any int dtype), scales / zeros [K//g, N] -> W_hat [K, N] float32."""
    k, n = codes.shape
    q = codes.astype(jnp.float32).reshape(k // group_size, group_size, n)
    s = s16.astype(jnp.float32)[:, None, :]
    z = z16.astype(jnp.float32)[:, None, :]
    return (s * (q - z)).reshape(k, n)


def low_rank_factors(e, omega, rank_mask, *, power_iters: int):
    """Warm-started best rank-r factors of E [K, N].

    omega [N, p]: right basis to start from (p >= r); rank_mask [r] bool: which of the r columns
    this matrix keeps. Returns U [K, r], V [r, N] (sqrt-split singular values; masked columns
    zero) and the next round's basis [N, p].
    """
    r = rank_mask.shape[0]
    omega = _orth(omega)
    for _ in range(power_iters):
        x = _orth(_mm(e, omega))
        omega = _orth(_mm(e.T, x))
    x = _orth(_mm(e, omega))                                  # [K, p]
    # SVD of b = x^T E [p, N] through a small one: b^T = Q R (Q [N, p] orthonormal, R = Q^T b^T
    # [p, p]), svd(R^T) = ub diag(sv) wr^T, so b = ub diag(sv) (Q wr)^T. (XLA:CPU's SVD of a wide
    # [p, N] matrix is the slowest step of a round otherwise.)
    bt = _mm(e.T, x)                                          # [N, p] = b^T
    q = _orth(bt)
    ub, sv, wrt = jnp.linalg.svd(_mm(q.T, bt).T)              # [p, p], [p], [p, p]
    vbt = _mm(wrt, q.T)                                       # [p, N]
    sq = jnp.sqrt(sv[:r]) * rank_mask
    u = _mm(x, ub[:, :r]) * sq[None, :]
    v = sq[:, None] * vbt[:r]
    return u, v, vbt.T


@dataclasses.dataclass(frozen=True)
class _Config:
    rank: int                  # r_max
    oversample: int
    bits: int
    group_size: int
    store_dtype: object
    errs_len: int              # length of the per-round error record (>= rounds; static)
    power_iters: int
    kappa: float
    hqq_iters: int
    seed: int
    warm_start: bool = True    # False: a fresh random basis every round (the published svd_lowrank)


def _errs_len(rounds: int) -> int:
    """Static record length: 20 or the next multiple of 20, so most `rounds` share one program."""
    return 20 * max(1, -(-int(rounds) // 20))


def _hqq(w, cfg: _Config):
    codes, s16, z16 = hqq.quantize_matrix(w, bits=cfg.bits, group_size=cfg.group_size, method="hqq",
                                          store_dtype=cfg.store_dtype, kappa=cfg.kappa,
                                          iters=cfg.hqq_iters)
    return codes, s16, z16


def _milo_matrix(w, rank_e, rounds, tol, cfg: _Config):
    """MiLo alternation for one matrix W [K, N] (float32) at rank_e <= cfg.rank (traced int);
    rounds (int) and tol (float) are traced too, so changing them does not recompile.

    Returns a dict of the best iterate: codes [K, N] uint8, s16, z16 [K//g, N], u [K, r], v [r, N]
    (float32, masked past rank_e), err (its Frobenius error), hqq_err (round 1's Q alone),
    rounds (number of rounds run) and errs [rounds] (the error after each round, inf if not run).
    """
    k, n = w.shape
    r, p = cfg.rank, cfg.rank + cfg.oversample
    mask = (jnp.arange(r) < rank_e).astype(jnp.float32)
    omega0 = jax.random.normal(jax.random.PRNGKey(cfg.seed), (n, p), jnp.float32)

    def one_round(u, v, omega):
        codes, s16, z16 = _hqq(w - _mm(u, v), cfg)
        e = w - _dequant(codes, s16, z16, cfg.group_size)
        u, v, omega = low_rank_factors(e, omega if cfg.warm_start else omega0, mask,
                                       power_iters=cfg.power_iters)
        err = jnp.linalg.norm(e - _mm(u, v))
        return codes, s16, z16, e, u, v, omega, err

    # round 1 outside the loop: it also gives plain HQQ's error ||E_1||
    codes, s16, z16, e1, u, v, omega, err = one_round(jnp.zeros((k, r)), jnp.zeros((r, n)), omega0)
    hqq_err = jnp.linalg.norm(e1)
    errs0 = jnp.full((cfg.errs_len,), jnp.inf, jnp.float32).at[0].set(err)
    best0 = (codes.astype(jnp.uint8), s16, z16, u, v, err)

    def cond(c):
        i, go = c[0], c[-1]
        return (i < rounds) & go

    def body(c):
        i, u, v, omega, prev_err, best, errs, _ = c
        codes, s16, z16, _, u, v, omega, err = one_round(u, v, omega)
        better = err < best[-1]
        cand = (codes.astype(jnp.uint8), s16, z16, u, v, err)
        best = jax.tree_util.tree_map(lambda new, old: jnp.where(better, new, old), cand, best)
        errs = errs.at[i].set(err)
        go = (prev_err - err) > tol * prev_err          # stop on a small (or negative) gain
        return i + 1, u, v, omega, err, best, errs, go

    init = (jnp.int32(1), u, v, omega, err, best0, errs0, rounds > 1)
    i, _, _, _, _, best, errs, _ = jax.lax.while_loop(cond, body, init)
    codes, s16, z16, u, v, err = best
    return dict(codes=codes, s16=s16, z16=z16, u=u, v=v, err=err, hqq_err=hqq_err, rounds=i,
                errs=errs)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _milo_stacked(w, ranks, rounds, tol, cfg: _Config):
    """W [B, K, N], ranks [B] int32 -> _milo_matrix's dict with a leading B axis."""
    rounds = jnp.asarray(rounds, jnp.int32)
    tol = jnp.asarray(tol, jnp.float32)
    one = lambda wi, ri: _milo_matrix(wi.astype(jnp.float32), ri, rounds, tol, cfg)
    if w.shape[0] == 1:
        # a single matrix runs unbatched: XLA:CPU lowers a size-1 vmap batch differently (last-bit
        # float differences), while B > 1 batches reproduce the unbatched program exactly.
        return jax.tree_util.tree_map(lambda x: x[None], one(w[0], ranks[0]))
    return jax.vmap(one)(w, ranks)


def _finish_matrix(w, codes, s16, z16, uq, vq, cfg: _Config):
    """Refit the base quantization once against the stored factors and keep the best of
    {refit, no refit, plain HQQ without compensator}. Returns (codes uint8, s16, z16, use_comp, err).
    """
    w = w.astype(jnp.float32)
    uv = _mm(uq, vq)
    err_keep = jnp.linalg.norm(w - _dequant(codes, s16, z16, cfg.group_size) - uv)
    rc, rs, rz = _hqq(w - uv, cfg)
    err_refit = jnp.linalg.norm(w - _dequant(rc, rs, rz, cfg.group_size) - uv)
    pc, ps, pz = _hqq(w, cfg)
    err_plain = jnp.linalg.norm(w - _dequant(pc, ps, pz, cfg.group_size))
    refit = err_refit < err_keep
    c = jnp.where(refit, rc.astype(jnp.uint8), codes)
    s = jnp.where(refit, rs, s16)
    z = jnp.where(refit, rz, z16)
    err_comp = jnp.minimum(err_refit, err_keep)
    use_comp = err_comp <= err_plain
    c = jnp.where(use_comp, c, pc.astype(jnp.uint8))
    s = jnp.where(use_comp, s, ps)
    z = jnp.where(use_comp, z, pz)
    return c, s, z, use_comp, jnp.where(use_comp, err_comp, err_plain)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _finish_stacked(w, codes, s16, z16, uq, vq, cfg: _Config):
    if w.shape[0] == 1:  # unbatched, as in _milo_stacked
        out = _finish_matrix(w[0], codes[0], s16[0], z16[0], uq[0], vq[0], cfg)
        return jax.tree_util.tree_map(lambda x: x[None], out)
    return jax.vmap(lambda *a: _finish_matrix(*a, cfg))(w, codes, s16, z16, uq, vq)


@dataclasses.dataclass(frozen=True)
class MiloStats:
    """Per-expert diagnostics of one quantize_lowrank call (arrays of the leading shape)."""

    ranks: np.ndarray        # rank per expert
    hqq_err: np.ndarray      # ||W - deq(HQQ(W))||_F
    loop_err: np.ndarray     # best iterate's error with float32 factors
    err: np.ndarray          # error of the stored QuantizedTensor (factors in compensator_dtype)
    rounds: np.ndarray       # rounds run
    errs: np.ndarray         # [..., rounds] error after each round (inf: not run)
    used_compensator: np.ndarray  # False where plain HQQ was better (its factors are then zero)


def _resolve_ranks(rank, lead_shape, k, n) -> np.ndarray:
    """An int or an int array of the leading shape -> int64 ranks [*lead_shape], validated."""
    where = f"weight of shape {tuple(lead_shape) + (k, n)}"
    arr = np.asarray(rank)
    if arr.ndim and arr.shape != tuple(lead_shape):
        raise ValueError(f"{where}: rank array of shape {arr.shape} does not match the expert axes "
                         f"{tuple(lead_shape)}")
    if arr.dtype.kind not in "iuf" or not np.all(arr == np.round(arr)):
        raise ValueError(f"{where}: ranks must be integers, got {rank!r}")
    ranks = np.broadcast_to(arr, tuple(lead_shape)).astype(np.int64)
    if ranks.min(initial=0) < 0 or ranks.max(initial=0) > min(k, n):
        raise ValueError(f"{where}: ranks must be in [0, min(K, N)={min(k, n)}], got "
                         f"{ranks.min(initial=0)}..{ranks.max(initial=0)}")
    return ranks


def quantize_lowrank(w, *, rank, bits: int = 3, group_size=64, compensator_dtype: str = "bfloat16",
                     rounds: int = 20, tol: float = 1e-4, power_iters: int = 2, oversample: int = 0,
                     compensator_group_size: int = compensator.DEFAULT_FACTOR_GROUP,
                     scale_dtype=None, slab: int | None = None, kappa: float = 1.01,
                     iters: int = 20, seed: int = 0, return_stats: bool = False):
    """MiLo-quantize W [..., K, N] (leading axes: stacked experts) -> QuantizedTensor with u / v.

    rank: an int (all experts) or an int array of the leading shape (one rank per expert; mixed
    ranks are stored as RaggedFactors, see compensator.py). Rank 0 everywhere: plain HQQ (u = v =
    None), identical to quantize_tensor. bits / group_size / scale_dtype / slab / kappa / iters: as
    quantize_tensor (HQQ). compensator_dtype: one of compensator.COMPENSATOR_DTYPES.
    rounds, tol: at most `rounds` alternation rounds, stop when the relative improvement < tol.
    power_iters: subspace iterations per round; oversample: extra basis columns (published: 0).
    return_stats: also return a MiloStats.
    """
    g = api.validate_weight(w, bits, group_size, "hqq")
    w = jnp.asarray(w)
    *lead, k, n = w.shape
    lead = tuple(lead)
    where = f"weight of shape {tuple(w.shape)}"
    if compensator_dtype not in compensator.COMPENSATOR_DTYPES:
        raise ValueError(f"{where}: unknown compensator_dtype {compensator_dtype!r}; expected one "
                         f"of {compensator.COMPENSATOR_DTYPES}")
    if rounds < 1 or power_iters < 0 or oversample < 0 or not tol >= 0:
        raise ValueError(f"{where}: need rounds >= 1, power_iters >= 0, oversample >= 0, tol >= 0; "
                         f"got {rounds}, {power_iters}, {oversample}, {tol}")
    ranks = _resolve_ranks(rank, lead, k, n)
    r_max = int(ranks.max(initial=0))
    base = api.quantize_tensor(w, bits=bits, group_size=g, scale_dtype=scale_dtype, slab=slab,
                               kappa=kappa, iters=iters) if r_max == 0 else None
    if base is not None:
        if return_stats:
            e = np.asarray(jnp.linalg.norm((w.astype(jnp.float32) - base.dequantize(jnp.float32))
                                           .reshape(*lead, -1), axis=-1))
            st = MiloStats(ranks, e, e, e, np.ones(lead, np.int32), e[..., None],
                           np.zeros(lead, bool))
            return base, st
        return base
    if r_max + oversample > min(k, n):
        oversample = min(k, n) - r_max
    finite, s_min, s_max = jax.device_get(api._inspect(w, bits=bits, group_size=g))
    if not finite:
        raise ValueError(f"{where} contains NaN or Inf values")
    store = jnp.dtype(scale_dtype) if scale_dtype is not None else api._store_dtype_for(s_min, s_max)
    slab = packing.default_slab(k, bits) if slab is None else slab
    packing.check_packable(k, bits, slab)
    cfg = _Config(rank=r_max, oversample=int(oversample), bits=bits, group_size=g,
                  store_dtype=store, errs_len=_errs_len(rounds),
                  power_iters=int(power_iters), kappa=float(kappa), hqq_iters=int(iters),
                  seed=int(seed))
    wb = w.reshape(-1, k, n)
    out = _milo_stacked(wb, jnp.asarray(ranks.reshape(-1), jnp.int32), int(rounds), float(tol), cfg)
    su, sv = compensator.store_factors(out["u"], out["v"], ranks, lead, compensator_dtype,
                                       compensator_group_size)
    uq = compensator.materialize_factor(su).reshape(-1, k, r_max)
    vq = compensator.materialize_factor(sv).reshape(-1, r_max, n)
    codes, s16, z16, use_comp, err = _finish_stacked(wb, out["codes"], out["s16"], out["z16"],
                                                     uq, vq, cfg)
    use = np.asarray(use_comp)
    if not use.all():  # plain HQQ won for some experts: their stored factors become zero
        keep = jnp.asarray(use, jnp.float32)
        su, sv = compensator.store_factors(out["u"] * keep[:, None, None], out["v"], ranks, lead,
                                           compensator_dtype, compensator_group_size)
    packed = jax.jit(packing.pack, static_argnums=(1, 2))(codes.astype(jnp.uint32), bits, slab)
    qt = QuantizedTensor(codes=packed.reshape(*lead, *packed.shape[-2:]),
                         scales=s16.reshape(*lead, *s16.shape[-2:]),
                         zeros=z16.reshape(*lead, *z16.shape[-2:]), u=su, v=sv, bits=bits,
                         group_size=g, shape=tuple(w.shape), slab=slab,
                         dtype=jnp.dtype(w.dtype).name)
    if not return_stats:
        return qt
    stats = MiloStats(ranks=ranks, hqq_err=np.asarray(out["hqq_err"]).reshape(lead),
                      loop_err=np.asarray(out["err"]).reshape(lead),
                      err=np.asarray(err).reshape(lead),
                      rounds=np.asarray(out["rounds"]).reshape(lead),
                      errs=np.asarray(out["errs"])[:, :rounds].reshape(*lead, rounds),
                      used_compensator=use.reshape(lead))
    return qt, stats


def milo_alternation(w, *, rank, bits: int = 3, group_size: int = 64, rounds: int = 20,
                     tol: float = 1e-4, power_iters: int = 2, oversample: int = 0,
                     store_dtype=jnp.float16, kappa: float = 1.01, iters: int = 20, seed: int = 0,
                     warm_start: bool = True):
    """The raw alternation, without storage or refit: W [B, K, N], rank int or [B] ints ->
    dict of [B, ...] arrays: codes [K, N] uint8 (unpacked), s16 / z16 [K//g, N], u [K, r_max],
    v [r_max, N] (float32, zero past each rank), err, hqq_err, rounds, errs [rounds].
    warm_start=False restarts the subspace iteration from the same random basis every round (the
    published randomized-SVD behaviour; for comparisons)."""
    w = jnp.asarray(w)
    if w.ndim != 3:
        raise ValueError(f"milo_alternation: expected W [B, K, N], got shape {tuple(w.shape)}")
    ranks = _resolve_ranks(rank, w.shape[:1], *w.shape[1:])
    r_max = int(ranks.max(initial=0))
    cfg = _Config(rank=r_max, oversample=min(int(oversample), min(w.shape[1:]) - r_max),
                  bits=bits, group_size=group_size, store_dtype=jnp.dtype(store_dtype),
                  errs_len=_errs_len(rounds), power_iters=int(power_iters),
                  kappa=float(kappa), hqq_iters=int(iters), seed=int(seed),
                  warm_start=bool(warm_start))
    out = _milo_stacked(w, jnp.asarray(ranks, jnp.int32), int(rounds), float(tol), cfg)
    return dict(out, errs=out["errs"][:, :rounds])


def frobenius_error(w, qt: QuantizedTensor) -> float:
    """||W - W_hat||_F over the whole (stacked) tensor, float32."""
    return float(jnp.linalg.norm(jnp.asarray(w, jnp.float32) - qt.dequantize(jnp.float32)))


__all__ = ["quantize_lowrank", "milo_alternation", "low_rank_factors", "MiloStats", "frobenius_error"]
