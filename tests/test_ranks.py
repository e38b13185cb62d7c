"""Rank policies (milo_jax.quant.ranks): uniform, kurtosis (monotone), frequency (mean kept),
routing-count collection, and the bits-per-weight budget allocator."""

import numpy as np
import pytest

from milo_jax.quant import compensator, quantize_tensor
from milo_jax.quant import ranks as R
from milo_jax.quant.lowrank import frobenius_error, quantize_lowrank

K, N = 128, 64


def lowrank_plus_t(shape, true_rank, amp, seed):
    rng = np.random.default_rng(seed)
    *lead, k, n = shape
    a = rng.standard_normal((*lead, k, true_rank)) @ rng.standard_normal((*lead, true_rank, n))
    return (amp * a / np.sqrt(true_rank) + 0.01 * rng.standard_t(3, size=shape)).astype(np.float32)


# ---------------------------------------------------------------- uniform

def test_uniform_dense_and_sparse():
    shapes = {"attn.q": (K, N), "experts.up": (4, K, N), "tiny": (16, 8)}
    out = R.uniform_ranks(shapes, dense_rank=32, sparse_rank=16)
    assert out["attn.q"].shape == () and int(out["attn.q"]) == 32
    np.testing.assert_array_equal(out["experts.up"], [16] * 4)
    assert int(out["tiny"]) == 8                                   # capped at min(K, N)
    custom = R.uniform_ranks(shapes, dense_rank=4, sparse_rank=2,
                             is_sparse=lambda name, shape: "experts" in name or name == "tiny")
    assert int(custom["tiny"]) == 2 and int(custom["attn.q"]) == 4
    with pytest.raises(ValueError, match=">= 0"):
        R.uniform_ranks(shapes, dense_rank=-1, sparse_rank=0)


# ---------------------------------------------------------------- kurtosis

def test_kurtosis_mapping_published_values_and_monotone():
    # published values below the cap: 0 if round(k) < 1, else 2^(round(k) + c)
    np.testing.assert_array_equal(R.kurtosis_rank([-1.0, 0.49, 0.5, 1.4, 2.0, 3.6], c=2),
                                  [0, 0, 8, 8, 16, 64])
    np.testing.assert_array_equal(R.kurtosis_rank([1.0, 5.0], c=3), [16, 256])
    ks = np.linspace(-3, 30, 3301)
    for c in (2, 3):
        r = R.kurtosis_rank(ks, c=c)
        assert np.all(np.diff(r) >= 0)                              # monotone non-decreasing
        assert r.max() == 1024 and np.all(r[ks > 9] == 1024)        # the published k > 9 value
        # the published mapping is not monotone: round(k) = 9 gives 2^(9 + c) > 1024
        published = np.where(ks > 9, 1024, np.where(np.floor(ks + 0.5) < 1, 0,
                                                    2.0 ** (np.floor(ks + 0.5) + c)))
        assert np.any(np.diff(published) < 0)
    assert np.all(R.kurtosis_rank(ks, c=2, cap=64) <= 64)


def test_excess_kurtosis_and_policy():
    rng = np.random.default_rng(0)
    gauss = rng.standard_normal((K, N))
    heavy = rng.standard_t(5, size=(K, N))                          # excess kurtosis 6 in theory
    w = np.stack([gauss, heavy]).astype(np.float32)
    k = R.excess_kurtosis(w)
    for i in range(2):
        x = w[i].astype(np.float64).ravel() - w[i].mean()
        ref = np.mean(x ** 4) / np.mean(x ** 2) ** 2 - 3
        assert k[i] == pytest.approx(ref, rel=1e-4, abs=1e-4)
    out = R.kurtosis_ranks({"experts": w, "dense": gauss.astype(np.float32)}, variant="s2",
                           dense_rank=16)
    np.testing.assert_array_equal(out["experts"], R.kurtosis_rank(k, c=3).clip(max=min(K, N)))
    assert out["experts"][0] == 0 and out["experts"][1] > 0 and int(out["dense"]) == 16
    with pytest.raises(ValueError, match="variant"):
        R.kurtosis_ranks({"experts": w}, variant="s3")


# ---------------------------------------------------------------- frequency

def test_frequency_ranks_keep_mean_and_order():
    rng = np.random.default_rng(1)
    counts = rng.integers(0, 1000, size=(3, 8)).astype(float)
    counts[1, 3] = 0
    counts[2] = 0                                                   # a layer never routed: uniform
    for mean_rank, step in [(16, 1), (32, 8), (13, 1)]:
        r = R.frequency_ranks(counts, mean_rank, step=step)
        assert r.shape == counts.shape and np.all(r % step == 0) and np.all(r >= 0)
        np.testing.assert_array_equal(r.sum(axis=1), [mean_rank * 8] * 3)
        for l in range(2):                                          # more tokens -> rank not smaller
            o = np.argsort(counts[l], kind="stable")
            assert np.all(np.diff(r[l][o]) >= 0)
            ideal = counts[l] / counts[l].sum() * mean_rank * 8
            assert np.all(np.abs(r[l] - ideal) < step + 1e-9)       # proportional up to rounding
        np.testing.assert_array_equal(r[2], [mean_rank] * 8)
    assert R.frequency_ranks(counts, 16)[1, 3] == 0
    capped = R.frequency_ranks(np.array([[1000.0, 1, 1, 1]]), 16, max_rank=32)
    assert capped.max() == 32 and capped.sum() == 64


def test_collect_routing_counts_from_a_router_hook():
    layers, experts, k = 3, 4, 2

    def router_topk(tokens):                                        # a stand-in for the model hook
        t = np.asarray(tokens)
        return np.stack([np.stack([(t + l) % experts, (t * 3 + l + 1) % experts], -1)
                         for l in range(layers)])                   # [L, B, T, k]

    batches = list(R.random_token_batches(50, batch=2, seq_len=16, num_batches=3, seed=4))
    assert len(batches) == 3 and batches[0].shape == (2, 16)
    counts = R.collect_routing_counts(router_topk, batches, layers, experts)
    assert counts.shape == (layers, experts) and counts.sum() == layers * 3 * 2 * 16 * k
    ref = np.zeros((layers, experts), int)
    for b in batches:
        idx = router_topk(b)
        for l in range(layers):
            ref[l] += np.bincount(idx[l].ravel(), minlength=experts)
    np.testing.assert_array_equal(counts, ref)
    with pytest.raises(ValueError, match="layers"):
        R.collect_routing_counts(router_topk, batches, layers + 1, experts)


# ---------------------------------------------------------------- budget

@pytest.fixture(scope="module")
def synthetic_set():
    """Tensors with very different residual spectra: strong low rank, spread, nearly pure noise."""
    return {"strong": lowrank_plus_t((2, K, N), 4, 0.05, 1),
            "spread": lowrank_plus_t((K, N), 32, 0.02, 2),
            "noise": lowrank_plus_t((2, K, N), 2, 0.001, 3)}


def uniform_cost(ws, r, dtype="bfloat16"):
    nbytes, err = 0, 0.0
    for w in ws.values():
        m = int(np.prod(w.shape[:-2]))
        nbytes += m * (R.base_nbytes(K, N, 3, 64) + compensator.compensator_nbytes(K, N, r, dtype))
        sv, _ = R.residual_spectrum(w)
        err += float((sv[..., r:] ** 2).sum())
    return nbytes, err


def test_budget_beats_uniform_at_equal_bytes(synthetic_set):
    ws = synthetic_set
    nw = sum(w.size for w in ws.values())
    nbytes, err_uniform = uniform_cost(ws, 16)
    plan = R.budget_ranks(ws, target_bits_per_weight=8 * nbytes / nw)
    assert plan.nbytes <= nbytes and plan.bits_per_weight <= 8 * nbytes / nw
    assert plan.sq_error < 0.85 * err_uniform
    assert plan.tensors["strong"].ranks.min() > plan.tensors["noise"].ranks.max()
    # measured with quantize_lowrank: the plan's bytes are exact and its error is lower
    meas_u = meas_p = 0.0
    for name, w in ws.items():
        qp = quantize_lowrank(w, rank=plan.tensors[name].ranks)
        assert qp.nbytes == plan.tensors[name].nbytes
        e2 = frobenius_error(w, qp) ** 2
        assert e2 <= plan.tensors[name].sq_error * 1.01          # MiLo only improves on round 1
        meas_p += e2
        meas_u += frobenius_error(w, quantize_lowrank(w, rank=16)) ** 2
    assert meas_p < 0.9 * meas_u


def test_budget_never_exceeded(synthetic_set):
    ws = synthetic_set
    nw = sum(w.size for w in ws.values())
    cheapest = 8 * sum(int(np.prod(w.shape[:-2])) * R.base_nbytes(K, N, 2, 64)
                       for w in ws.values()) / nw
    prev = None
    for target in [3.5, 3.6, 4.2, 5.0, 7.77, 12.0]:
        for cands, dtype in [(((3, 64),), "bfloat16"), (((2, 64), (3, 64), (4, 128)), "int8")]:
            plan = R.budget_ranks(ws, target_bits_per_weight=target, candidates=cands,
                                  compensator_dtype=dtype)
            assert plan.bits_per_weight <= target + 1e-12
            nbytes = 0
            for name, t in plan.tensors.items():
                m = int(np.prod(ws[name].shape[:-2]))
                nbytes += m * R.base_nbytes(K, N, t.bits, t.group_size) + sum(
                    compensator.compensator_nbytes(K, N, int(r), dtype) for r in t.ranks.ravel())
                assert np.all(t.ranks % 8 == 0)
            assert nbytes == plan.nbytes
            if cands == ((3, 64),):                                 # more budget, less error
                assert prev is None or plan.sq_error <= prev
                prev = plan.sq_error
    with pytest.raises(ValueError, match="cheapest"):
        R.budget_ranks(ws, target_bits_per_weight=3.4)
    plan = R.budget_ranks(ws, target_bits_per_weight=cheapest, candidates=((2, 64), (3, 64)))
    assert all(t.bits == 2 and t.ranks.max() == 0 for t in plan.tensors.values())


def test_base_nbytes_matches_quantized_tensor():
    w = lowrank_plus_t((2, K, N), 2, 0.01, 5)
    for bits, g in [(2, 32), (3, 64), (4, 128)]:
        assert quantize_tensor(w, bits=bits, group_size=g).nbytes == 2 * R.base_nbytes(K, N, bits, g)


def test_budget_importance_moves_bytes(synthetic_set):
    """A tensor whose errors count 50x more gets at least the ranks it had, the others no more; the
    plan still fits; unweighted sq_error is reported; bad importance is refused."""
    ws = synthetic_set
    nw = sum(w.size for w in ws.values())
    nbytes, _ = uniform_cost(ws, 16)
    target = 8 * nbytes / nw
    plain = R.budget_ranks(ws, target_bits_per_weight=target)
    heavy = R.budget_ranks(ws, target_bits_per_weight=target, importance={"spread": 50.0})
    assert heavy.bits_per_weight <= target + 1e-12
    assert heavy.tensors["spread"].ranks.sum() > plain.tensors["spread"].ranks.sum()
    assert heavy.tensors["strong"].ranks.sum() <= plain.tensors["strong"].ranks.sum()
    sv, _ = R.residual_spectrum(ws["spread"])
    r = int(heavy.tensors["spread"].ranks)
    assert heavy.tensors["spread"].sq_error == pytest.approx(float((sv[r:] ** 2).sum()), rel=1e-9)
    # per-expert importance of the expert shape; scalars broadcast
    per = R.budget_ranks(ws, target_bits_per_weight=target, importance={"strong": [1.0, 1e-3]})
    assert per.tensors["strong"].ranks[0] >= per.tensors["strong"].ranks[1]
    with pytest.raises(ValueError, match="expert shape"):
        R.budget_ranks(ws, target_bits_per_weight=target, importance={"strong": [1.0, 2.0, 3.0]})
    with pytest.raises(ValueError, match="not a tensor"):
        R.budget_ranks(ws, target_bits_per_weight=target, importance={"missing": 1.0})
    with pytest.raises(ValueError, match="> 0"):
        R.budget_ranks(ws, target_bits_per_weight=target, importance={"noise": 0.0})
    assert R.routing_importance(8, 2) == pytest.approx(1 / 16)
    with pytest.raises(ValueError, match="experts_per_token"):
        R.routing_importance(8, 9)
