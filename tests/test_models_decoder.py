"""models.decoder: cache semantics (per-row positions, padding, scatter) and jit/bf16 on a random
model; no transformers needed."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from milo_jax.models import ModelConfig, MoECausalLM

CFG = ModelConfig(model_type="qwen2_moe", vocab_size=64, hidden_size=32, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                  max_position_embeddings=64, qkv_bias=True, intermediate_size=40,
                  moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2,
                  shared_expert_intermediate_size=24, shared_expert_gate=True,
                  mlp_kinds=("moe", "dense"))


_FWD = nnx.jit(lambda m, t: m(t))   # compiled once per model structure


@pytest.fixture(scope="module")
def model():
    return MoECausalLM(CFG, rngs=nnx.Rngs(0))


def _step_fn(model):
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda s, t, p, c: nnx.merge(graphdef, s)(t, positions=p, cache=c))
    return lambda t, p, c: fn(state, t, p, c)


def test_rows_at_different_positions_match_full_forward(model):
    """Right-padded prefill, then one decode step per row at its own position: each row's logits
    equal the full (cache-less) forward over that row's true tokens."""
    rng = np.random.RandomState(0)
    lengths = [3, 6, 5]
    tokens = rng.randint(1, 64, (3, 7))
    step = _step_fn(model)
    cache = model.init_cache(3, 12)
    assert cache[0]["k"].shape == (3, 12, 2, 8)
    prompts = tokens[:, :6].copy()
    for b, n in enumerate(lengths):
        prompts[b, n:] = 0
    pos = jnp.broadcast_to(jnp.arange(6, dtype=jnp.int32), (3, 6))
    _, cache = step(jnp.asarray(prompts), pos, cache)
    nxt = tokens[np.arange(3), lengths]                   # each row's next true token
    logits, cache = step(jnp.asarray(nxt[:, None]), jnp.asarray(lengths, jnp.int32)[:, None], cache)
    full = np.asarray(_FWD(model, jnp.asarray(tokens)))   # causal: position n sees tokens[:n + 1] only
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(np.asarray(logits[b, 0]), full[b, n], atol=1e-5)
    # the new key went into slot == position, per row
    k0 = np.asarray(cache[0]["k"])
    assert not np.allclose(k0[0, 3], 0) and np.allclose(k0[0, 7:], 0)


def test_positions_without_cache_shift_rope(model):
    t = jnp.asarray(np.random.RandomState(1).randint(0, 64, (1, 5)))
    fwd = nnx.jit(lambda m, t, p: m(t, positions=p))
    base = _FWD(model, t)
    same = fwd(model, t, jnp.arange(5, dtype=jnp.int32)[None])
    np.testing.assert_allclose(np.asarray(base), np.asarray(same), atol=1e-6)
    # a uniform shift of all positions leaves relative RoPE attention unchanged
    shifted = fwd(model, t, jnp.arange(5, dtype=jnp.int32)[None] + 11)
    np.testing.assert_allclose(np.asarray(base), np.asarray(shifted), atol=1e-4)


def test_bf16_model_and_cache(model):
    m32 = model
    m = nnx.eval_shape(lambda: MoECausalLM(CFG, dtype=jnp.bfloat16))
    nnx.update(m, jax.tree.map(lambda a: a.astype(jnp.bfloat16), nnx.state(m32, nnx.Param)))
    assert m.layers[0].mlp.experts.down_proj.get_value().dtype == jnp.bfloat16
    t = jnp.asarray(np.random.RandomState(2).randint(0, 64, (2, 4)))
    cache = m.init_cache(2, 8)
    assert cache[1]["v"].dtype == jnp.bfloat16
    logits, _ = _step_fn(m)(t, jnp.broadcast_to(jnp.arange(4, dtype=jnp.int32), (2, 4)), cache)
    assert logits.dtype == jnp.float32
    ref = np.asarray(_FWD(m32, t))
    assert np.abs(np.asarray(logits) - ref).max() < 0.05 * np.abs(ref).max() + 0.05


def test_bad_calls(model):
    with pytest.raises(ValueError, match="positions are required"):
        model(jnp.zeros((1, 2), jnp.int32), cache=model.init_cache(1, 4))
    with pytest.raises(ValueError, match=r"\[B, S\]"):
        model(jnp.zeros((2,), jnp.int32))


def test_quantized_params_under_jit_match_dequantized_model(model):
    """Swapping Params for QuantizedTensors (experts, attention, router, shared expert; K = 32) keeps the
    model jit-able through split/merge with a cache, and equals a model holding the dequantized
    weights as plain arrays (both the dense and the gathered expert paths)."""
    from milo_jax import QuantizedTensor, quantize_tensor

    qmodel, ref = nnx.clone(model), nnx.clone(model)
    moe = qmodel.layers[0].mlp
    params = [moe.experts.gate_proj, moe.experts.up_proj,
              qmodel.layers[1].attn.q_proj.kernel, moe.shared_expert.up_proj.kernel,
              moe.router.gate.kernel]
    for p in params:
        p.set_value(quantize_tensor(p.get_value(), bits=3, group_size=None, method="rtn"))
    qstate = nnx.state(qmodel, nnx.Param)
    assert any(isinstance(v, QuantizedTensor)
               for v in jax.tree.leaves(qstate, is_leaf=lambda x: isinstance(x, QuantizedTensor)))
    dense = jax.tree.map(lambda v: v.dequantize(jnp.float32) if isinstance(v, QuantizedTensor) else v,
                         qstate, is_leaf=lambda x: isinstance(x, QuantizedTensor))
    nnx.update(ref, dense)
    t = jnp.asarray(np.random.RandomState(3).randint(0, 64, (2, 5)))
    # prefill: 10 tokens x top-2 >= 8 experts -> every (quantized) expert run densely
    step = _step_fn(qmodel)
    pos = jnp.broadcast_to(jnp.arange(5, dtype=jnp.int32), (2, 5))
    prefill, cache = step(t, pos, qmodel.init_cache(2, 8))
    np.testing.assert_allclose(np.asarray(prefill), np.asarray(_FWD(ref, t)), atol=1e-5)
    # decode: 2 rows x top-2 < 8 experts -> gathered (quantized) expert weights
    got, _ = step(t[:, :1], jnp.full((2, 1), 5, jnp.int32), cache)
    want = _FWD(ref, jnp.concatenate([t, t[:, :1]], axis=1))[:, -1]
    np.testing.assert_allclose(np.asarray(got[:, 0]), np.asarray(want), atol=1e-5)
