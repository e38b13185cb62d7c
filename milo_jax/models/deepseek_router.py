"""DeepSeek routers: which experts each token uses and with what weight.

All take router logits [N, E] (float32; x @ W_gate computed by the caller) and return
(weights [N, k] float32, expert ids [N, k] int32). The order of the k picks is unspecified.

* `softmax_topk`        DeepSeek-MoE (v1) and DeepSeek-V2 "greedy": softmax over all experts, top-k.
* `softmax_group_limited` DeepSeek-V2 "group_limited_greedy": experts split into n_group groups, a
                        group's score is its best expert; keep the topk_group best groups, top-k in them.
* `sigmoid_noaux_tc`    DeepSeek-V3: sigmoid scores; selection uses scores + e_score_correction_bias,
                        group score = sum of the 2 best biased scores; weights are the unbiased scores.
Normalisation (norm_topk_prob) and routed_scaling_factor follow each model's transformers code.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from milo_jax.models.linear import Linear, linear
from milo_jax.models.registry import register_router


def _group_mask(group_scores: jnp.ndarray, topk_group: int, n_group: int, n_experts: int) -> jnp.ndarray:
    """group_scores [N, G] -> bool [N, E], True for experts in the topk_group best groups."""
    _, gidx = jax.lax.top_k(group_scores, topk_group)                     # [N, topk_group]
    keep_group = jnp.any(gidx[..., None] == jnp.arange(n_group), axis=-2)  # [N, G]
    return jnp.repeat(keep_group, n_experts // n_group, axis=-1)


def _check_groups(n_experts: int, n_group, topk_group):
    if not n_group or not topk_group:
        raise ValueError(f"group-limited routing needs n_group and topk_group, got {n_group}, {topk_group}")
    if n_experts % n_group:
        raise ValueError(f"n_routed_experts={n_experts} is not divisible by n_group={n_group}")
    if not 0 < topk_group <= n_group:
        raise ValueError(f"topk_group={topk_group} must be in [1, n_group={n_group}]")


def _normalize(w, norm_topk_prob: bool):
    if norm_topk_prob:
        w = w / (jnp.sum(w, axis=-1, keepdims=True) + 1e-20)
    return w


def softmax_topk(logits, top_k: int, norm_topk_prob: bool = False, routed_scaling_factor: float = 1.0):
    """logits [N, E] -> (weights [N, k], ids [N, k]). v1: scale 1; V2 greedy: norm False, scale."""
    scores = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    w, idx = jax.lax.top_k(scores, top_k)
    w = _normalize(w, norm_topk_prob and top_k > 1)  # v1 skips normalising a single pick
    return w * routed_scaling_factor, idx.astype(jnp.int32)


def softmax_group_limited(logits, top_k: int, n_group: int, topk_group: int,
                          routed_scaling_factor: float = 1.0):
    """DeepSeek-V2 group_limited_greedy (transformers: experts outside kept groups score 0)."""
    n_experts = logits.shape[-1]
    _check_groups(n_experts, n_group, topk_group)
    scores = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    group_scores = scores.reshape(*scores.shape[:-1], n_group, n_experts // n_group).max(axis=-1)
    keep = _group_mask(group_scores, topk_group, n_group, n_experts)
    w, idx = jax.lax.top_k(jnp.where(keep, scores, 0.0), top_k)
    return w * routed_scaling_factor, idx.astype(jnp.int32)


def sigmoid_noaux_tc(logits, correction_bias, top_k: int, n_group: int, topk_group: int,
                     norm_topk_prob: bool = True, routed_scaling_factor: float = 1.0):
    """DeepSeek-V3 routing. correction_bias [E] (float32) shifts selection only, not the weights."""
    n_experts = logits.shape[-1]
    _check_groups(n_experts, n_group, topk_group)
    if n_experts // n_group < 2:
        raise ValueError(f"V3 routing scores groups by their 2 best experts; n_routed_experts/n_group "
                         f"= {n_experts // n_group} < 2")
    scores = jax.nn.sigmoid(logits.astype(jnp.float32))
    choice = scores + correction_bias.astype(jnp.float32)
    grouped = choice.reshape(*choice.shape[:-1], n_group, n_experts // n_group)
    group_scores = jax.lax.top_k(grouped, 2)[0].sum(axis=-1)
    keep = _group_mask(group_scores, topk_group, n_group, n_experts)
    _, idx = jax.lax.top_k(jnp.where(keep, choice, -jnp.inf), top_k)
    w = jnp.take_along_axis(scores, idx, axis=-1)
    w = _normalize(w, norm_topk_prob)  # V3 normalises even at k=1
    return w * routed_scaling_factor, idx.astype(jnp.int32)


# ---- NNX routers, registered for ModelConfig.router_kind -------------------------------------
# Each holds gate.kernel [H, E] (HF: mlp.gate.weight transposed); logits are computed in float32
# (transformers' V2/V3 upcast both x and the weight; harmless for v1). Hyper-parameters come from
# config.extra (filled by converters.arch_deepseek).

class _GateRouter(nnx.Module):
    def __init__(self, config, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = bool(config.norm_topk_prob)
        self.routed_scaling_factor = float(config.extra_get("routed_scaling_factor", 1.0))
        self.n_group = config.extra_get("n_group")
        self.topk_group = config.extra_get("topk_group")
        self.gate = Linear(config.hidden_size, config.num_experts, dtype=dtype, rngs=rngs)

    def logits(self, x):
        """x [T, H] -> [T, E] float32."""
        return linear(x.astype(jnp.float32), self.gate.kernel.get_value())


class DeepseekMoERouter(_GateRouter):
    """DeepSeek-MoE (v1, model_type "deepseek"): softmax top-k, optional renormalisation."""

    def __call__(self, x):
        return softmax_topk(self.logits(x), self.top_k, self.norm_topk_prob)


class DeepseekV2Router(_GateRouter):
    """DeepSeek-V2: softmax; topk_method "greedy" or "group_limited_greedy"; x routed_scaling_factor."""

    def __init__(self, config, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        super().__init__(config, dtype=dtype, rngs=rngs)
        self.topk_method = config.extra_get("topk_method", "greedy")
        if self.topk_method not in ("greedy", "group_limited_greedy"):
            raise ValueError(f"deepseek_v2 topk_method {self.topk_method!r} is not supported")
        if self.topk_method == "group_limited_greedy":
            _check_groups(config.num_experts, self.n_group, self.topk_group)

    def __call__(self, x):
        logits = self.logits(x)
        if self.topk_method == "greedy":
            return softmax_topk(logits, self.top_k, False, self.routed_scaling_factor)
        return softmax_group_limited(logits, self.top_k, self.n_group, self.topk_group,
                                     self.routed_scaling_factor)


class DeepseekV3Router(_GateRouter):
    """DeepSeek-V3: sigmoid + e_score_correction_bias [E] (float32), group-limited top-k."""

    def __init__(self, config, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        super().__init__(config, dtype=dtype, rngs=rngs)
        _check_groups(config.num_experts, self.n_group, self.topk_group)
        self.e_score_correction_bias = nnx.Param(jnp.zeros((config.num_experts,), jnp.float32))

    def __call__(self, x):
        return sigmoid_noaux_tc(self.logits(x), self.e_score_correction_bias.get_value(), self.top_k,
                                self.n_group, self.topk_group, self.norm_topk_prob,
                                self.routed_scaling_factor)


register_router("deepseek_moe", DeepseekMoERouter)
register_router("deepseek_v2", DeepseekV2Router)
register_router("deepseek_v3", DeepseekV3Router)
