"""Feed-forward blocks: the dense SwiGLU MLP, the softmax top-k router, stacked experts, and the
MoE block (routed experts + optional shared expert with an optional sigmoid gate)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from milo_jax.models.kernel_weights import FusedIntoGate
from milo_jax.models.linear import Linear, gathered_expert_linear, grouped_expert_linear
from milo_jax.models.registry import get_router, register_router
from milo_jax.quant.tensor import QuantizedTensor
from pallas_kernels.grouped_matmul.api import routed_ffn, routed_ffn_applies

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


def sort_by_expert(ids: jax.Array, num_experts: int):
    """Routing bookkeeping for the grouped path (static shapes, no loop over experts).

    ids [T, k] int32 -> (order [T*k], inverse [T*k], group_sizes [E] int32) where `order` lists the
    flat (token, slot) pair indices t*k + j sorted by expert (stable: by token within an expert),
    `inverse` is its inverse permutation (sorted position of pair p) and group_sizes[e] counts the
    pairs routed to e (offsets per expert are its exclusive cumsum).
    """
    flat = ids.reshape(-1).astype(jnp.int32)
    n = flat.shape[0]
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    inverse = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
    group_sizes = jnp.zeros((num_experts,), jnp.int32).at[flat].add(1)
    return order, inverse, group_sizes


def group_offsets(group_sizes: jax.Array) -> jax.Array:
    """[E] exclusive cumsum: the first sorted row of each expert."""
    return jnp.cumsum(group_sizes) - group_sizes


# Prefill of prepared mixed-precision experts (the sorted path from PREFILL_ROWS pairs on): experts
# renamed by their position in gate/up's class order before the sort (`_by_position`), so the grouped
# prefill GEMM of gate/up (and of down, when its classes share that order) permutes no rows; False: rows
# sorted by expert id, each projection permuting its rows into class order and back. Off until timed
# (the stop-21 mixed layer at 4096 tokens: 7.77 ms against 5.90 for the uniform one, H200).
POSITION_SORTED_PREFILL = False


def _by_position(gate_up, down, ids: jax.Array, num_pairs: int):
    """(gate_up, down, ids) with the experts renamed by gate_up's class positions, for prepared mixed
    experts at prefill rows (anything else comes back unchanged). The FFN is the same: only the names
    of the experts, hence the order of the sorted rows, change."""
    from pallas_kernels.grouped_matmul import mgpu_sm90 as grouped
    if not (isinstance(gate_up, grouped.GroupedKernelWeights) and isinstance(down, grouped.GroupedKernelWeights)
            and grouped.prefill_applies(num_pairs, gate_up)):
        return gate_up, down, ids
    new_id = grouped.positions(gate_up.order)
    if np.array_equal(new_id, np.arange(new_id.shape[0])):
        return gate_up, down, ids
    return (grouped.relabel_experts(gate_up, new_id), grouped.relabel_experts(down, new_id),
            jnp.asarray(new_id)[ids])


class StackedExperts(nnx.Module):
    """E SwiGLU experts stored stacked: gate_proj, up_proj [E, H, I], down_proj [E, I, H].

    Each is an nnx.Param holding a plain array or a QuantizedTensor with a leading E axis, or a tuple
    of E per-expert weights (arrays / QuantizedTensors with their own bit widths: mixed precision).
    Forward (no Python loop over experts, static shapes):
    * grouped path (default): the T*k (token, slot) pairs are sorted by expert (stable argsort),
      token rows gathered in that order, one `grouped_expert_linear` per projection over all experts
      (gate, up, SiLU(gate)*up, down), then the rows are put back in (token, slot) order with the
      inverse permutation and combined with the routing weights (no scatter-add: deterministic).
    * gather path (decode): when T * k < gather_below (default E) and the weights are stacked (not a
      per-expert tuple), each pair gathers its expert's weights and multiplies them: it reads only the
      T*k selected experts' weights, while the grouped reference dequantizes all E. Experts prepared
      for the GPU (`milo_jax.prepare_for_kernels`: GroupedKernelWeights) always take the grouped path:
      on Hopper that is the grouped Mosaic kernel, which reads only the experts with tokens (Mixtral
      FFN 3-bit, 1 token: 106 us against 1087 us for the gather path, H100, 2026-11-23); an up_proj
      holding `FusedIntoGate` was fused into gate_proj at load (one grouped matmul for both); on sm90
      such experts run both launches in the padded row domain (`grouped_matmul.routed_ffn`: no sort,
      no gather or scatter between the launches).
    """

    def __init__(self, num_experts: int, hidden: int, intermediate: int, act: str = "silu", *,
                 dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        self.act = act
        self.num_experts = num_experts
        self.gather_below = num_experts

        def init(shape):
            if rngs is None:
                return jnp.zeros(shape, dtype)
            return jax.random.normal(rngs.params(), shape, dtype) * 0.02

        self.gate_proj = nnx.Param(init((num_experts, hidden, intermediate)))
        self.up_proj = nnx.Param(init((num_experts, hidden, intermediate)))
        self.down_proj = nnx.Param(init((num_experts, intermediate, hidden)))

    def uses_gather_path(self, num_tokens: int, top_k: int) -> bool:
        # only plain stacked arrays / QuantizedTensors can be gathered per pair (not per-expert
        # tuples, nor the grouped kernel layout pallas_kernels.grouped_matmul.mgpu_sm90 prepares)
        stacked = all(isinstance(p.get_value(), (jax.Array, QuantizedTensor))
                      for p in (self.gate_proj, self.up_proj, self.down_proj))
        return stacked and num_tokens * top_k < self.gather_below

    def __call__(self, x: jax.Array, weights: jax.Array, ids: jax.Array) -> jax.Array:
        """x [T, H], weights [T, k] float32, ids [T, k] int32 -> [T, H]."""
        t, k = ids.shape
        act = activation(self.act)
        wg, wu, wd = (self.gate_proj.get_value(), self.up_proj.get_value(),
                      self.down_proj.get_value())
        if self.uses_gather_path(t, k):
            xk = jnp.broadcast_to(x[:, None, :], (t, k, x.shape[-1]))
            h = act(gathered_expert_linear(xk, wg, ids)) * gathered_expert_linear(xk, wu, ids)
            y = gathered_expert_linear(h, wd, ids)                       # [T, k, H]
            return jnp.sum(y * weights[..., None].astype(y.dtype), axis=1)
        if isinstance(wu, FusedIntoGate) and routed_ffn_applies(t * k, wg, wd):
            # prepared for the GPU: both launches in the padded row domain (grouped_matmul.routed_ffn)
            return routed_ffn(x, weights, ids, wg, wd, act=act)
        if isinstance(wu, FusedIntoGate) and POSITION_SORTED_PREFILL:
            wg, wd, ids = _by_position(wg, wd, ids, t * k)
        order, inverse, group_sizes = sort_by_expert(ids, self.num_experts)
        x_sorted = jnp.take(x, order // k, axis=0)                       # [T*k, H]
        if isinstance(wu, FusedIntoGate):   # prepare_for_kernels fused up into gate: one launch
            gu = grouped_expert_linear(x_sorted, wg, group_sizes)         # [T*k, 2I]
            h = act(gu[:, :wu.split]) * gu[:, wu.split:]
        else:
            h = act(grouped_expert_linear(x_sorted, wg, group_sizes)) * grouped_expert_linear(x_sorted, wu, group_sizes)
        y_sorted = grouped_expert_linear(h, wd, group_sizes)             # [T*k, H]
        y = jnp.take(y_sorted, inverse, axis=0).reshape(t, k, -1)        # back to (token, slot)
        return jnp.sum(y * weights[..., None].astype(y.dtype), axis=1)


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
