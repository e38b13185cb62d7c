"""Rank policies for MiLo compensators: how many rank columns each weight matrix gets.

Every policy returns ranks as numpy int arrays of a tensor's leading (expert) shape, one rank per
matrix: a scalar array for a 2-D weight, [E] for stacked experts [E, K, N]. They feed
`quantize_lowrank(w, rank=...)` directly.

* `uniform_ranks`: one rank for dense tensors (attention; published "dense") and one for stacked
  experts ("sparse").
* `kurtosis_ranks`: from the excess kurtosis k of each expert matrix (published for Mixtral):
  rank 0 if round(k) < 1, else 2^(round(k) + c), c = 2 ("s1") or 3 ("s2"). The published mapping
  then sets 1024 for k > 9, which makes it NON-monotone (round(k) = 9 gives 2^11 = 2048 for s1 and
  2^12 for s2, larger than the 1024 that k = 9.01 gets). Fixed here by applying one cap to the whole
  formula: rank = min(2^(round(k) + c), cap, min(K, N)), cap = 1024 by default. Every piece is
  non-decreasing in k, so the mapping is monotone; round is round-half-up (floor(k + 0.5)).
* `frequency_ranks`: expert ranks proportional to routing frequency, keeping each layer's mean
  rank (published for DeepSeek); counts come from `collect_routing_counts`.
* `budget_ranks`: ranks (and optionally bits / group size per tensor) chosen to minimise the total
  reconstruction error under a whole-set bits-per-weight budget, every byte counted.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from typing import Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from milo_jax.quant import api, compensator

# --------------------------------------------------------------------------------------------
# uniform


def _is_stacked(name: str, shape: tuple) -> bool:
    return len(shape) >= 3


def _clip_rank(ranks, shape):
    return np.minimum(np.asarray(ranks, np.int64), min(shape[-2:]))


def uniform_ranks(shapes: Mapping[str, tuple], *, dense_rank: int, sparse_rank: int,
                  is_sparse: Callable[[str, tuple], bool] = _is_stacked) -> dict:
    """{name: shape [..., K, N]} -> {name: int ranks [...]} (capped at min(K, N)).

    is_sparse(name, shape): which tensors are experts ("sparse"); default: stacked ones (>= 3 dims).
    """
    if dense_rank < 0 or sparse_rank < 0:
        raise ValueError(f"ranks must be >= 0, got dense_rank={dense_rank}, sparse_rank={sparse_rank}")
    out = {}
    for name, shape in shapes.items():
        shape = tuple(shape)
        if len(shape) < 2:
            raise ValueError(f"uniform_ranks: {name} has shape {shape}; expected [..., K, N]")
        r = sparse_rank if is_sparse(name, shape) else dense_rank
        out[name] = _clip_rank(np.full(shape[:-2], r), shape)
    return out


# --------------------------------------------------------------------------------------------
# kurtosis

KURTOSIS_C = {"s1": 2, "s2": 3}


@jax.jit
def _excess_kurtosis(w):
    x = w.astype(jnp.float32).reshape(*w.shape[:-2], -1)
    x = x - x.mean(axis=-1, keepdims=True)
    m2 = jnp.mean(x * x, axis=-1)
    m4 = jnp.mean((x * x) ** 2, axis=-1)
    return m4 / jnp.maximum(m2 * m2, jnp.finfo(jnp.float32).tiny) - 3.0


def excess_kurtosis(w) -> np.ndarray:
    """Excess (Fisher) kurtosis of each matrix of W [..., K, N] over all its K * N entries -> [...]."""
    w = jnp.asarray(w)
    if w.ndim < 2:
        raise ValueError(f"excess_kurtosis: expected [..., K, N], got shape {tuple(w.shape)}")
    return np.asarray(_excess_kurtosis(w), np.float64)


def kurtosis_rank(k, *, c: int = 2, cap: int = 1024) -> np.ndarray:
    """The monotone kurtosis mapping: 0 if round(k) < 1 else min(2^(round(k) + c), cap)."""
    k = np.asarray(k, np.float64)
    rk = np.floor(k + 0.5)
    expo = np.clip(rk + c, 0, 62)           # clip only to keep 2**x in int64; cap applies below
    r = np.minimum(np.power(2, expo).astype(np.int64), cap)
    return np.where(rk < 1, 0, r).astype(np.int64)


def kurtosis_ranks(weights: Mapping[str, object], *, variant: str = "s1", c: int | None = None,
                   cap: int = 1024, dense_rank: int = 0,
                   is_sparse: Callable[[str, tuple], bool] = _is_stacked) -> dict:
    """{name: W [..., K, N]} -> {name: ranks [...]}: experts by their kurtosis, dense tensors get
    `dense_rank`. variant "s1" (c = 2) or "s2" (c = 3), or pass c directly."""
    if c is None:
        if variant not in KURTOSIS_C:
            raise ValueError(f"unknown kurtosis variant {variant!r}; expected one of {list(KURTOSIS_C)}")
        c = KURTOSIS_C[variant]
    out = {}
    for name, w in weights.items():
        shape = tuple(w.shape)
        if is_sparse(name, shape):
            r = kurtosis_rank(excess_kurtosis(w), c=c, cap=cap)
        else:
            r = np.full(shape[:-2], dense_rank)
        out[name] = _clip_rank(r, shape)
    return out


# --------------------------------------------------------------------------------------------
# frequency


def _proportional_integer(weights: np.ndarray, total: int, cap: int) -> np.ndarray:
    """Non-negative integers proportional to `weights` summing to `total`, each <= cap
    (water-filling for the cap, then largest remainders). Needs total <= cap * len(weights)."""
    n = len(weights)
    w = np.asarray(weights, np.float64)
    if w.sum() <= 0:
        w = np.ones(n)
    ideal = np.zeros(n)
    free = np.ones(n, bool)
    left = float(total)
    for _ in range(n):             # water-filling: clip to cap and spread the excess over the rest
        share = np.where(free, w, 0.0)
        if share.sum() <= 0:
            share = free.astype(np.float64)
        ideal = np.where(free, left * share / share.sum(), ideal)
        over = free & (ideal > cap)
        if not over.any():
            break
        ideal[over] = cap
        free &= ~over
        left = total - ideal[~free].sum()
    base = np.floor(ideal + 1e-9).astype(np.int64)
    short = int(total - base.sum())
    if short > 0:
        frac = np.where(base < cap, ideal - base, -np.inf)
        order = np.lexsort((np.arange(n), -frac))      # largest remainder, ties by index
        base[order[:short]] += 1
    return base


def frequency_ranks(counts, mean_rank: float, *, step: int = 1, max_rank: int | None = None
                    ) -> np.ndarray:
    """Routing counts [L, E] -> ranks [L, E], proportional to each expert's share of its layer's
    tokens, with the layer's mean rank kept: sum_e rank[l, e] = round(mean_rank * E / step) * step
    (exactly mean_rank * E when that is a multiple of `step`). Ranks are multiples of `step`,
    at most `max_rank`; the ordering of counts is preserved (more tokens -> rank not smaller)."""
    counts = np.asarray(counts, np.float64)
    if counts.ndim != 2 or np.any(counts < 0) or not np.all(np.isfinite(counts)):
        raise ValueError(f"frequency_ranks: counts must be a finite non-negative [layers, experts] "
                         f"array, got shape {counts.shape}")
    if mean_rank < 0 or step < 1:
        raise ValueError(f"frequency_ranks: need mean_rank >= 0 and step >= 1, got {mean_rank}, {step}")
    n_e = counts.shape[1]
    units = int(round(mean_rank * n_e / step))
    cap = (max_rank // step) if max_rank is not None else units
    if units > cap * n_e:
        raise ValueError(f"frequency_ranks: mean rank {mean_rank} exceeds max_rank={max_rank}")
    return np.stack([_proportional_integer(row, units, cap) * step for row in counts])


def collect_routing_counts(router_topk: Callable, token_batches: Iterable, num_layers: int,
                           num_experts: int) -> np.ndarray:
    """Token counts [num_layers, num_experts] of expert selections over a token stream.

    router_topk(tokens) -> the top-k expert ids of every routed position per layer: an array
    [num_layers, ..., k] or a sequence of num_layers arrays [..., k]. It is the model-side hook
    (e.g. a forward pass that records each MoE layer's router indices); `token_batches` yields its
    inputs (random tokens are fine: `random_token_batches`).
    """
    counts = np.zeros((num_layers, num_experts), np.int64)
    for tokens in token_batches:
        idx = router_topk(tokens)
        per_layer = list(idx) if not hasattr(idx, "shape") else [idx[i] for i in range(idx.shape[0])]
        if len(per_layer) != num_layers:
            raise ValueError(f"collect_routing_counts: router_topk returned {len(per_layer)} layers, "
                             f"expected {num_layers}")
        for layer, ids in enumerate(per_layer):
            ids = np.asarray(ids).reshape(-1)
            if ids.size and (ids.min() < 0 or ids.max() >= num_experts):
                raise ValueError(f"collect_routing_counts: layer {layer} has expert ids outside "
                                 f"[0, {num_experts})")
            counts[layer] += np.bincount(ids, minlength=num_experts)
    return counts


def random_token_batches(vocab_size: int, *, batch: int, seq_len: int, num_batches: int,
                         seed: int = 0):
    """Uniform random token ids, num_batches arrays [batch, seq_len] int32 (a calibration stand-in)."""
    rng = np.random.default_rng(seed)
    for _ in range(num_batches):
        yield rng.integers(0, vocab_size, size=(batch, seq_len), dtype=np.int32)


# --------------------------------------------------------------------------------------------
# budget


def base_nbytes(k: int, n: int, bits: int, group_size: int) -> int:
    """Bytes of one HQQ-quantized matrix: packed codes + 16-bit scales and zeros per group."""
    return k * n * bits // 8 + 2 * 2 * (k // group_size) * n


@jax.jit
def _singular_values(e):
    return jnp.linalg.svd(e, compute_uv=False)


def residual_spectrum(w, *, bits: int = 3, group_size: int = 64):
    """Singular values [..., min(K, N)] (float64, descending) of W - deq(HQQ(W)) per matrix, and the
    QuantizedTensor they come from. Rank r then leaves an error sum_{i >= r} s_i^2 (its optimum)."""
    qt = api.quantize_tensor(w, bits=bits, group_size=group_size)
    e = jnp.asarray(w, jnp.float32) - qt.dequantize(jnp.float32)
    return np.asarray(_singular_values(e), np.float64), qt


@dataclasses.dataclass(frozen=True)
class TensorPlan:
    bits: int
    group_size: int
    ranks: np.ndarray          # [...] per matrix
    nbytes: int                # base + compensator, exactly what quantize_lowrank stores
    sq_error: float            # predicted ||W - W_hat||_F^2 (HQQ residual beyond each rank)


@dataclasses.dataclass(frozen=True)
class BudgetPlan:
    tensors: dict              # name -> TensorPlan
    num_weights: int
    nbytes: int
    target_bits_per_weight: float

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / self.num_weights

    @property
    def sq_error(self) -> float:
        return sum(t.sq_error for t in self.tensors.values())

    def ranks(self) -> dict:
        return {name: t.ranks for name, t in self.tensors.items()}


@dataclasses.dataclass
class _Candidate:
    bits: int
    group_size: int
    base_bytes: int            # per matrix
    tail: np.ndarray           # [M, R + 1]: squared error at rank index j (rank j * step)
    comp_bytes: np.ndarray     # [R + 1]: compensator bytes per matrix at rank index j


def _candidate(w, bits, group_size, step, max_rank, compensator_dtype, comp_group):
    *lead, k, n = w.shape
    sv, _ = residual_spectrum(w, bits=bits, group_size=group_size)
    sv2 = sv.reshape(-1, sv.shape[-1]) ** 2
    # tail[:, r] = sum_{i >= r} s_i^2
    tail_all = np.concatenate([np.cumsum(sv2[:, ::-1], axis=1)[:, ::-1],
                               np.zeros((sv2.shape[0], 1))], axis=1)
    top = min(k, n) if max_rank is None else min(k, n, max_rank)
    rank_grid = np.arange(0, top // step + 1) * step
    comp = np.array([compensator.compensator_nbytes(k, n, int(r), compensator_dtype, comp_group)
                     for r in rank_grid], np.int64)
    g = api.resolve_group_size(k, group_size)
    return _Candidate(bits, g, base_nbytes(k, n, bits, g), tail_all[:, rank_grid], comp)


def budget_ranks(weights: Mapping[str, object], *, target_bits_per_weight: float,
                 candidates: Sequence[tuple] = ((3, 64),), compensator_dtype: str = "bfloat16",
                 compensator_group_size: int = compensator.DEFAULT_FACTOR_GROUP,
                 rank_step: int = 8, max_rank: int | None = None,
                 importance: Mapping[str, object] | None = None) -> BudgetPlan:
    """Choose ranks (multiples of rank_step) and one (bits, group_size) from `candidates` per tensor
    to minimise the predicted total squared error under a whole-set budget:
        8 * (all codes, scales, zeros and compensator bytes) / (all weights) <= target.
    The error model is the HQQ residual's spectrum: rank r of a matrix leaves sum_{i >= r} s_i^2
    (the exact optimum of round 1 of MiLo, which the alternation only improves on).

    Solver: a Lagrangian relaxation (each tensor picks the config and ranks minimising
    error + lambda * bytes; bisection on lambda for the smallest one within budget), then a greedy
    fill of the left-over bytes with the rank steps of best error decrease per byte that still fit.
    importance: optional {name: a float, or an array of the tensor's leading (expert) shape}: each
    matrix's squared error is multiplied by it in the objective (how much of the model's output an
    error in that matrix reaches; see routing_importance). TensorPlan.sq_error stays unweighted.
    Raises ValueError when even the cheapest candidates at rank 0 exceed the budget.
    """
    if rank_step < 1:
        raise ValueError(f"budget_ranks: rank_step must be >= 1, got {rank_step}")
    names = list(weights)
    if not names:
        raise ValueError("budget_ranks: no tensors given")
    cands = {}
    num_weights = 0
    for name in names:
        w = weights[name]
        shape = tuple(w.shape)
        if len(shape) < 2:
            raise ValueError(f"budget_ranks: {name} has shape {shape}; expected [..., K, N]")
        num_weights += math.prod(shape)
        cands[name] = []
        for bits, g in candidates:
            try:
                api.validate_weight(w, bits, g)
            except ValueError as e:
                raise ValueError(f"budget_ranks: {name}: {e}") from None
            cands[name].append(_candidate(w, bits, g, rank_step, max_rank, compensator_dtype,
                                          compensator_group_size))
    budget = math.floor(target_bits_per_weight * num_weights / 8.0 + 1e-9)
    raw_tail = {name: [c.tail for c in cands[name]] for name in names}
    for name, imp in (importance or {}).items():
        if name not in cands:
            raise ValueError(f"budget_ranks: importance given for {name!r}, which is not a tensor "
                             "of the budget")
        lead = tuple(weights[name].shape[:-2])
        arr = np.asarray(imp, np.float64)
        try:
            arr = np.broadcast_to(arr, lead).reshape(-1)
        except ValueError:
            raise ValueError(f"budget_ranks: importance of {name} has shape {arr.shape}; expected a "
                             f"scalar or the expert shape {lead}") from None
        if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
            raise ValueError(f"budget_ranks: importance of {name} must be finite and > 0")
        for c in cands[name]:
            c.tail = c.tail * arr[:, None]

    def solve(lam):
        """Per tensor: (candidate index, rank indices [M], bytes, sq error) minimising err + lam*bytes."""
        picks, total = {}, 0
        for name in names:
            best = None
            for ci, c in enumerate(cands[name]):
                obj = c.tail + lam * c.comp_bytes[None, :]
                j = np.argmin(obj, axis=1)
                m = c.tail.shape[0]
                nbytes = m * c.base_bytes + int(c.comp_bytes[j].sum())
                err = float(c.tail[np.arange(m), j].sum())
                val = err + lam * nbytes
                if best is None or val < best[-1]:
                    best = (ci, j, nbytes, err, val)
            picks[name] = best[:4]
            total += best[2]
        return picks, total

    cheapest = sum(min(c.tail.shape[0] * (c.base_bytes + int(c.comp_bytes[0])) for c in cands[n])
                   for n in names)
    if cheapest > budget:
        raise ValueError(f"budget_ranks: target {target_bits_per_weight} bits per weight is below the "
                         f"cheapest choice ({8.0 * cheapest / num_weights:.4f} bits per weight, "
                         f"rank 0 at the cheapest candidate)")
    picks, total = solve(0.0)
    if total > budget:
        # bytes(lambda) falls as lambda grows; at 1e60 every tensor takes its cheapest choice
        lo, hi = -60.0, 60.0                   # log10(lambda)
        picks = solve(10.0 ** hi)[0]
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            p, t = solve(10.0 ** mid)
            if t <= budget:
                hi, picks = mid, p
            else:
                lo = mid
    # greedy fill: configs fixed, rank steps by error decrease per byte while they fit
    state = {name: [picks[name][0], np.array(picks[name][1])] for name in names}
    used = sum(picks[name][2] for name in names)
    heap = []

    def push(name, mi):
        c = cands[name][state[name][0]]
        j = state[name][1][mi]
        if j + 1 < c.tail.shape[1]:
            gain = c.tail[mi, j] - c.tail[mi, j + 1]
            cost = int(c.comp_bytes[j + 1] - c.comp_bytes[j])
            heapq.heappush(heap, (-gain / max(cost, 1), names.index(name), mi, cost))

    for name in names:
        for mi in range(cands[name][state[name][0]].tail.shape[0]):
            push(name, mi)
    while heap:
        neg, ti, mi, cost = heapq.heappop(heap)
        if neg >= 0:
            break                              # no step lowers the error any more
        if used + cost > budget:
            continue                           # this matrix's further steps cost at least as much
        name = names[ti]
        state[name][1][mi] += 1
        used += cost
        push(name, mi)

    plans = {}
    for name in names:
        ci, j = state[name]
        c = cands[name][ci]
        m = c.tail.shape[0]
        lead = tuple(weights[name].shape[:-2])
        plans[name] = TensorPlan(bits=c.bits, group_size=c.group_size,
                                 ranks=(j * rank_step).reshape(lead).astype(np.int64),
                                 nbytes=m * c.base_bytes + int(c.comp_bytes[j].sum()),
                                 sq_error=float(raw_tail[name][ci][np.arange(m), j].sum()))
    nbytes = sum(p.nbytes for p in plans.values())
    assert nbytes <= budget, (nbytes, budget)
    return BudgetPlan(tensors=plans, num_weights=num_weights, nbytes=nbytes,
                      target_bits_per_weight=float(target_bits_per_weight))


def routing_importance(num_experts: int, experts_per_token: int) -> float:
    """Weight of a routed expert's squared error relative to a dense tensor's in the budget
    objective: an expert sees a share k / E of the tokens (uniform routing) and its output reaches
    the layer's output multiplied by a router weight of about 1 / k, so squared: (k / E) / k^2 =
    1 / (k E). Calibration-free (no activations, no routing statistics)."""
    if num_experts < 1 or not 1 <= experts_per_token <= num_experts:
        raise ValueError(f"routing_importance: need 1 <= experts_per_token <= num_experts, got "
                         f"{experts_per_token} of {num_experts}")
    return 1.0 / (experts_per_token * num_experts)


__all__ = ["routing_importance", "uniform_ranks", "excess_kurtosis", "kurtosis_rank", "kurtosis_ranks", "KURTOSIS_C",
           "frequency_ranks", "collect_routing_counts", "random_token_batches", "base_nbytes",
           "residual_spectrum", "budget_ranks", "BudgetPlan", "TensorPlan"]
