"""MoE routing in milo_jax.models.moe: the sorted/grouped forward against the previous dense
formulation (every expert on every token, routing weights zero outside the top-k, kept here as the
reference) and a float64 numpy per-pair loop; routing bookkeeping; mixed per-expert bit widths."""

from __future__ import annotations

import dataclasses
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import milo_jax
from milo_jax.models.linear import materialize
from milo_jax.models.moe import StackedExperts, sort_by_expert, group_offsets


def dense_reference(experts: StackedExperts, x, weights, ids):
    """The previous forward: all E experts on all T tokens, combined with a [T, E] weight matrix."""
    t, _ = ids.shape
    e = experts.num_experts
    prec = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None

    def mat(p):
        v = p.get_value()
        if isinstance(v, (list, tuple)):
            return jnp.stack([materialize(w, x.dtype) for w in v])
        return materialize(v, x.dtype)

    wg, wu, wd = mat(experts.gate_proj), mat(experts.up_proj), mat(experts.down_proj)
    combine = jnp.zeros((t, e), jnp.float32).at[jnp.arange(t)[:, None], ids].add(weights)
    xe = jnp.broadcast_to(x[None], (e,) + x.shape)
    h = jax.nn.silu(jnp.einsum("etk,ekn->etn", xe, wg, precision=prec)) * jnp.einsum(
        "etk,ekn->etn", xe, wu, precision=prec)
    y = jnp.einsum("etk,ekn->etn", h, wd, precision=prec)
    return jnp.einsum("eth,te->th", y, combine.astype(y.dtype))


def numpy_reference(experts: StackedExperts, x, weights, ids):
    """float64 loop over (token, slot) pairs on the float weights."""
    wg, wu, wd = (np.asarray(p.get_value(), np.float64) for p in
                  (experts.gate_proj, experts.up_proj, experts.down_proj))
    x64 = np.asarray(x, np.float64)
    out = np.zeros_like(x64)
    for t in range(ids.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            g = x64[t] @ wg[e]
            h = g / (1 + np.exp(-g)) * (x64[t] @ wu[e])
            out[t] += float(weights[t, j]) * (h @ wd[e])
    return out


def make_routing(t, e, k, rng, kind="random"):
    """weights [T, k] float32 (positive, sum 1), ids [T, k] int32 distinct per token."""
    if kind == "random":
        ids = np.stack([rng.permutation(e)[:k] for _ in range(t)])
    elif kind == "skewed":   # every token uses expert 1 in its first slot; experts >= k+1 stay empty
        ids = np.stack([np.concatenate([[1], rng.permutation([i for i in range(k + 1) if i != 1])[:k - 1]])
                        for _ in range(t)])
    else:
        raise ValueError(kind)
    w = rng.uniform(0.1, 1.0, (t, k))
    w = w / w.sum(-1, keepdims=True)
    return jnp.asarray(w, jnp.float32), jnp.asarray(ids, jnp.int32)


def rel(a, b):
    a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
    b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


E, H, I, K = 6, 32, 64, 2


@pytest.fixture(scope="module")
def experts():
    m = StackedExperts(E, H, I, rngs=nnx.Rngs(0))
    for p in (m.gate_proj, m.up_proj, m.down_proj):   # larger weights: activations well above noise
        p.set_value(p.get_value() * 25)
    return m


def _forward(module, x, w, ids):
    graph, state = nnx.split(module)
    return jax.jit(lambda s, x, w, i: nnx.merge(graph, s)(x, w, i))(state, x, w, ids)


def _dense(module, x, w, ids):
    """dense_reference, jitted (eager dequantization of many small experts is slow on CPU)."""
    graph, state = nnx.split(module)
    return jax.jit(lambda s, x, w, i: dense_reference(nnx.merge(graph, s), x, w, i))(state, x, w, ids)


def test_sort_by_expert_bookkeeping():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 7, (9, 3)).astype(np.int32)
    order, inverse, gs = jax.jit(sort_by_expert, static_argnums=1)(jnp.asarray(ids), 7)
    flat = ids.reshape(-1)
    np.testing.assert_array_equal(order, np.argsort(flat, kind="stable"))
    np.testing.assert_array_equal(np.asarray(order)[np.asarray(inverse)], np.arange(flat.size))
    np.testing.assert_array_equal(gs, np.bincount(flat, minlength=7))
    np.testing.assert_array_equal(group_offsets(gs), np.concatenate([[0], np.cumsum(gs)[:-1]]))
    np.testing.assert_array_equal(flat[np.asarray(order)], np.sort(flat))


@pytest.mark.parametrize("t,kind", [(11, "random"), (16, "skewed"), (2, "random")])
def test_grouped_and_gather_paths_equal_dense(experts, t, kind):
    rng = np.random.default_rng(t)
    x = jnp.asarray(rng.standard_normal((t, H)), jnp.float32)
    w, ids = make_routing(t, E, K, rng, kind)
    ref = dense_reference(experts, x, w, ids)
    assert rel(ref, numpy_reference(experts, x, w, ids)) < 1e-5
    for gather_below in (0, 10**6):          # force the grouped path, then the gather path
        experts.gather_below = gather_below
        assert experts.uses_gather_path(t, K) == (gather_below > 0)
        assert rel(_forward(experts, x, w, ids), ref) < 1e-5
    experts.gather_below = E


def test_quantized_stacked_and_mixed_bits(experts):
    """bf16 activations with stacked 3-bit experts, and a tuple of per-expert weights of 2/3/4 bits
    (gate/up and down with different widths, one expert with a compensator), vs the dense reference."""
    rng = np.random.default_rng(7)
    t = 13
    x = jnp.asarray(rng.standard_normal((t, H)), jnp.bfloat16)
    w, ids = make_routing(t, E, K, rng, "random")
    q = nnx.clone(experts)
    for p in (q.gate_proj, q.up_proj, q.down_proj):
        p.set_value(milo_jax.quantize_tensor(p.get_value(), bits=3, group_size=32, method="rtn"))
    ref = _dense(q, x, w, ids)
    assert rel(_forward(q, x, w, ids), ref) < 2e-2

    mixed = nnx.clone(experts)
    gate_bits, down_bits = [2, 3, 4, 3, 2, 4], [4, 4, 3, 2, 3, 3]
    for p, bits in ((mixed.gate_proj, gate_bits), (mixed.up_proj, gate_bits), (mixed.down_proj, down_bits)):
        full = p.get_value()
        per = [milo_jax.quantize_tensor(full[e], bits=b, group_size=32, method="rtn")
               for e, b in enumerate(bits)]
        kk, nn_ = full.shape[1:]
        per[2] = dataclasses.replace(per[2], u=jnp.asarray(rng.standard_normal((kk, 4)) * 0.1, jnp.bfloat16),
                                     v=jnp.asarray(rng.standard_normal((4, nn_)) * 0.1, jnp.bfloat16))
        p.set_value(tuple(per))
    assert not mixed.uses_gather_path(1, K)      # per-expert tuples always take the grouped path
    ref = _dense(mixed, x, w, ids)
    assert rel(_forward(mixed, x, w, ids), ref) < 2e-2


def test_no_python_loop_over_experts():
    """The traced grouped forward has the same number of operations for 4 and 64 experts."""
    def count(e):
        m = StackedExperts(e, 16, 16, rngs=nnx.Rngs(1))
        m.gather_below = 0
        x = jnp.ones((8, 16))
        ids = jnp.zeros((8, 2), jnp.int32).at[:, 1].set(1)
        w = jnp.full((8, 2), 0.5)
        graph, state = nnx.split(m)
        jaxpr = jax.make_jaxpr(lambda s: nnx.merge(graph, s)(x, w, ids))(state)
        return len(jaxpr.eqns)
    assert count(4) == count(64)
