"""Feed-forward blocks: the dense SwiGLU MLP, the softmax top-k router, stacked experts, and the
MoE block (routed experts + optional shared expert with an optional sigmoid gate)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from milo_jax.models.linear import Linear, expert_linear, gathered_expert_linear
from milo_jax.models.registry import get_router, register_router

ACTIVATIONS = {"silu": jax.nn.silu}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"hidden_act {name!r} is not supported (known: {sorted(ACTIVATIONS)})")
    return ACTIVATIONS[name]


class MLP(nnx.Module):
    """down(act(gate(x)) * up(x)); gate_proj/up_proj [H, I], down_proj [I, H]."""

    def __init__(self, hidden: int, intermediate: int, act: str = "silu", *, dtype=jnp.float32,
                 rngs: nnx.Rngs | None = None):
        self.act = act
        self.gate_proj = Linear(hidden, intermediate, dtype=dtype, rngs=rngs)
        self.up_proj = Linear(hidden, intermediate, dtype=dtype, rngs=rngs)
        self.down_proj = Linear(intermediate, hidden, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(activation(self.act)(self.gate_proj(x)) * self.up_proj(x))


class SoftmaxTopKRouter(nnx.Module):
    """softmax(x @ kernel [H, E]) in float32 -> top-k; renormalised to sum 1 if norm_topk_prob."""

    def __init__(self, config, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = Linear(config.hidden_size, config.num_experts, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array):
        logits = self.gate(x).astype(jnp.float32)                  # [T, E]
        probs = jax.nn.softmax(logits, axis=-1)
        weights, ids = jax.lax.top_k(probs, self.top_k)
        if self.norm_topk_prob:
            weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
        return weights, ids.astype(jnp.int32)


register_router("softmax_topk", SoftmaxTopKRouter)


class StackedExperts(nnx.Module):
    """E SwiGLU experts stored stacked: gate_proj, up_proj [E, H, I], down_proj [E, I, H].

    Each is an nnx.Param holding a plain array or a QuantizedTensor with a leading E axis.
    Forward (no Python loop over experts): when T * k < E, gather the selected experts' weights per
    token (decode: only active experts are read); otherwise run every expert densely on every token
    and combine with the (zero outside the top-k) routing weights.
    """

    def __init__(self, num_experts: int, hidden: int, intermediate: int, act: str = "silu", *,
                 dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        self.act = act
        self.num_experts = num_experts

        def init(shape):
            if rngs is None:
                return jnp.zeros(shape, dtype)
            return jax.random.normal(rngs.params(), shape, dtype) * 0.02

        self.gate_proj = nnx.Param(init((num_experts, hidden, intermediate)))
        self.up_proj = nnx.Param(init((num_experts, hidden, intermediate)))
        self.down_proj = nnx.Param(init((num_experts, intermediate, hidden)))

    def __call__(self, x: jax.Array, weights: jax.Array, ids: jax.Array) -> jax.Array:
        """x [T, H], weights [T, k] float32, ids [T, k] int32 -> [T, H]."""
        t, k = ids.shape
        act = activation(self.act)
        wg, wu, wd = (self.gate_proj.get_value(), self.up_proj.get_value(),
                      self.down_proj.get_value())
        if t * k < self.num_experts:
            xk = jnp.broadcast_to(x[:, None, :], (t, k, x.shape[-1]))
            h = act(gathered_expert_linear(xk, wg, ids)) * gathered_expert_linear(xk, wu, ids)
            y = gathered_expert_linear(h, wd, ids)                       # [T, k, H]
            return jnp.sum(y * weights[..., None].astype(y.dtype), axis=1)
        combine = jnp.zeros((t, self.num_experts), jnp.float32)
        combine = combine.at[jnp.arange(t)[:, None], ids].add(weights)   # [T, E]
        xe = jnp.broadcast_to(x[None], (self.num_experts,) + x.shape)  # [E, T, H]
        h = act(expert_linear(xe, wg)) * expert_linear(xe, wu)
        y = expert_linear(h, wd)                                         # [E, T, H]
        return jnp.einsum("eth,te->th", y, combine.astype(y.dtype))


class MoEBlock(nnx.Module):
    """router -> stacked experts (+ shared expert, optionally sigmoid-gated)."""

    def __init__(self, config, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        c = config
        self.router = get_router(c.router_kind)(c, dtype=dtype, rngs=rngs)
        self.experts = StackedExperts(c.num_experts, c.hidden_size, c.moe_intermediate_size,
                                      c.hidden_act, dtype=dtype, rngs=rngs)
        self.shared_expert = (MLP(c.hidden_size, c.shared_expert_intermediate_size, c.hidden_act,
                                  dtype=dtype, rngs=rngs)
                              if c.shared_expert_intermediate_size else None)
        self.shared_expert_gate = (Linear(c.hidden_size, 1, dtype=dtype, rngs=rngs)
                                   if c.shared_expert_intermediate_size and c.shared_expert_gate
                                   else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, S, H] -> [B, S, H]."""
        b, s, h = x.shape
        flat = x.reshape(b * s, h)
        weights, ids = self.router(flat)
        out = self.experts(flat, weights, ids)
        if self.shared_expert is not None:
            shared = self.shared_expert(flat)
            if self.shared_expert_gate is not None:
                shared = jax.nn.sigmoid(self.shared_expert_gate(flat)) * shared
            out = out + shared
        return out.reshape(b, s, h)
