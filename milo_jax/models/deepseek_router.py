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
