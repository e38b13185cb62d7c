"""Grouped-query attention (GQA, MHA when kv heads == heads) with an optional preallocated KV cache.

`attend` is the masked softmax attention shared by every attention kind (MLA reuses it).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from milo_jax.models.linear import Linear, _precision
from milo_jax.models.norm import RMSNorm
from milo_jax.models.registry import register_attention
from milo_jax.models.rope import apply_rope, rope_frequencies


def visibility_mask(q_pos: jax.Array, k_pos: jax.Array, window: Optional[int] = None) -> jax.Array:
    """[B, S, T] bool: key at k_pos [B, T] is visible to query at q_pos [B, S] iff k <= q
    (and q - window < k when a sliding window is set)."""
    q = q_pos[:, :, None]
    k = k_pos[:, None, :]
    mask = k <= q
    if window is not None:
        mask = mask & (k > q - window)
    return mask


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    """Softmax attention with grouped kv heads.

    q [B, S, Hq, D], k [B, T, Hkv, D], v [B, T, Hkv, Dv], mask [B, S, T] bool -> [B, S, Hq, Dv].
    Query head h uses kv head h // (Hq // Hkv) (HF repeat_kv order). Scores in q.dtype, softmax in
    float32, probabilities cast back to q.dtype (as HF eager attention).
    """
    b, s, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    qg = q.reshape(b, s, hkv, g, d)
    scores = jnp.einsum("bshgd,bthd->bhgst", qg, k, precision=_precision(q.dtype)) * scale
    scores = scores.astype(jnp.float32)
    scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    out = jnp.einsum("bhgst,bthd->bshgd", probs, v, precision=_precision(q.dtype))
    return out.reshape(b, s, hq, v.shape[-1])


def write_cache(cache_arr: jax.Array, new: jax.Array, positions: jax.Array) -> jax.Array:
    """cache [B, L, ...] with new [B, S, ...] written at slots positions [B, S] (per row).
    Positions outside [0, L) are dropped."""
    rows = jnp.arange(cache_arr.shape[0])[:, None]
    return cache_arr.at[rows, positions].set(new.astype(cache_arr.dtype), mode="drop")


class GQAttention(nnx.Module):
    """q/k/v/o projections, optional q/k RMSNorm ("head": over head_dim; "full": over the whole
    projection, OLMoE), optional clip_qkv, RoPE, causal (optionally sliding-window) attention."""

    def __init__(self, config, layer_idx: int, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        c = config
        self.num_heads, self.num_kv_heads, self.head_dim = (c.num_attention_heads,
                                                            c.num_key_value_heads, c.head_dim)
        self.window = c.sliding_windows[layer_idx]
        self.clip_qkv = c.clip_qkv
        self.qk_norm_kind = c.qk_norm
        self.scale = self.head_dim ** -0.5
        qd, kvd = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = Linear(c.hidden_size, qd, use_bias=c.qkv_bias, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(c.hidden_size, kvd, use_bias=c.qkv_bias, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(c.hidden_size, kvd, use_bias=c.qkv_bias, dtype=dtype, rngs=rngs)
        self.o_proj = Linear(qd, c.hidden_size, use_bias=c.o_bias, dtype=dtype, rngs=rngs)
        if c.qk_norm == "head":
            self.q_norm = RMSNorm(self.head_dim, c.rms_norm_eps, dtype=dtype)
            self.k_norm = RMSNorm(self.head_dim, c.rms_norm_eps, dtype=dtype)
        elif c.qk_norm == "full":
            self.q_norm = RMSNorm(qd, c.rms_norm_eps, dtype=dtype)
            self.k_norm = RMSNorm(kvd, c.rms_norm_eps, dtype=dtype)
        elif c.qk_norm is None:
            self.q_norm = self.k_norm = None
        else:
            raise ValueError(f"qk_norm must be None, 'head' or 'full', got {c.qk_norm!r}")
        inv_freq, self.rope_scaling_factor = rope_frequencies(c, self.head_dim)
        self.inv_freq = tuple(float(f) for f in inv_freq)   # static (hashable), not a parameter

    def init_cache(self, batch_size: int, max_len: int, dtype) -> dict:
        shape = (batch_size, max_len, self.num_kv_heads, self.head_dim)
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}

    def __call__(self, x: jax.Array, positions: jax.Array, cache: dict | None = None):
        b, s, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qk_norm_kind == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            c = self.clip_qkv
            q, k, v = jnp.clip(q, -c, c), jnp.clip(k, -c, c), jnp.clip(v, -c, c)
        q = q.reshape(b, s, self.num_heads, self.head_dim)
        k = k.reshape(b, s, self.num_kv_heads, self.head_dim)
        v = v.reshape(b, s, self.num_kv_heads, self.head_dim)
        if self.qk_norm_kind == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q, positions, self.inv_freq, self.rope_scaling_factor)
        k = apply_rope(k, positions, self.inv_freq, self.rope_scaling_factor)
        if cache is None:
            keys, values, k_pos, new_cache = k, v, positions, None
        else:
            keys = write_cache(cache["k"], k, positions)
            values = write_cache(cache["v"], v, positions)
            new_cache = {"k": keys, "v": values}
            keys, values = keys.astype(q.dtype), values.astype(q.dtype)
            k_pos = jnp.broadcast_to(jnp.arange(keys.shape[1], dtype=positions.dtype),
                                     (b, keys.shape[1]))
        mask = visibility_mask(positions, k_pos, self.window)
        out = attend(q, keys, values, mask, self.scale)
        return self.o_proj(out.reshape(b, s, self.num_heads * self.head_dim)), new_cache


register_attention("gqa", GQAttention)
