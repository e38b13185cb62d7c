"""Multi-head Latent Attention (MLA) of DeepSeek-V2/V3, with a compressed-latent KV cache.

Per token, MLA projects the hidden state h [D] to
  * queries: q = q_b(rms(q_a(h))) (or q_proj(h) when q_lora_rank is None), split per head into
    q_nope [dn] and q_rope [dr];
  * a latent c = rms(kv_a(h)[:C]) [C = kv_lora_rank] shared by all heads, and one shared rope key
    k_rope = rope(kv_a(h)[C:]) [dr];
  * per-head keys/values from the latent: [k_nope | v] = kv_b(c) [H, dn + dv].
score(h, s, t) = (q_nope . k_nope + q_rope . k_rope) * softmax_scale; out = o_proj(concat_h(p @ v)).

KV cache: we cache the latent c and the roped k_rope, (C + dr) numbers per token per layer (576 for
V3) instead of H * (dn + dr + dv) for full keys/values (40960 for V3's 128 heads): 71x less memory
and memory traffic, which is what decode is bound by. Two ways to attend over it (same math):
  * "expand": run kv_b over every cached slot and attend with ordinary per-head k/v. Every matmul
    goes through `linear()`, so a quantized kv_b is read in its packed form; cost O(T * C * H * (dn+dv))
    per step, fine for prefill (S ~ T).
  * "absorb": fold kv_b into the query and the output instead: q_lat = q_nope @ W_uk^T [H, C],
    score = q_lat . c + q_rope . k_rope, o_lat = p @ c, out_h = o_lat @ W_uv. Cost O(T * C * H) per
    step, the right choice for decode (S = 1). Needs kv_b as a dense [C, H, dn + dv] array
    (dequantized once per call when it is a QuantizedTensor).

Weights follow the project convention y = x @ W, W [in, out] (HF's nn.Linear weight transposed).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp

from milo_jax.models import rope_yarn

try:  # the core's linear (handles QuantizedTensor); fallback only until the core lands
    from milo_jax.models.linear import linear as _core_linear
except ImportError:  # pragma: no cover
    _core_linear = None

NORM_EPS = 1e-6  # q_a_layernorm / kv_a_layernorm use the RMSNorm default, not rms_norm_eps


def linear(x, w, bias=None):
    if _core_linear is not None:
        return _core_linear(x, w, bias) if bias is not None else _core_linear(x, w)
    wd = w.dequantize(x.dtype) if hasattr(w, "dequantize") else w
    y = x @ wd.astype(x.dtype)
    return y if bias is None else y + bias.astype(y.dtype)


def dense_weight(w, dtype) -> jnp.ndarray:
    """W as a dense array (dequantized if it is a QuantizedTensor)."""
    return w.dequantize(dtype) if hasattr(w, "dequantize") else jnp.asarray(w, dtype)


@dataclasses.dataclass(frozen=True)
class MLASpec:
    """Static shape facts of one MLA block (hashable)."""

    hidden_size: int
    num_heads: int
    q_lora_rank: Optional[int]
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope: rope_yarn.RopeSpec
    attention_bias: bool = False
    absorb: str = "decode"   # "decode": absorb iff a cache is given and S == 1; "always"; "never"

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        return rope_yarn.yarn_softmax_scale(self.rope, self.qk_head_dim)

    def param_shapes(self) -> dict[str, tuple]:
        """Expected parameter names and shapes ([in, out] for linears)."""
        H, D = self.num_heads, self.hidden_size
        s = {}
        if self.q_lora_rank is None:
            s["q_proj"] = (D, H * self.qk_head_dim)
        else:
            s["q_a_proj"] = (D, self.q_lora_rank)
            s["q_a_norm"] = (self.q_lora_rank,)
            s["q_b_proj"] = (self.q_lora_rank, H * self.qk_head_dim)
        s["kv_a_proj"] = (D, self.kv_lora_rank + self.qk_rope_head_dim)
        s["kv_a_norm"] = (self.kv_lora_rank,)
        s["kv_b_proj"] = (self.kv_lora_rank, H * (self.qk_nope_head_dim + self.v_head_dim))
        s["o_proj"] = (H * self.v_head_dim, D)
        if self.attention_bias:
            if self.q_lora_rank is not None:
                s["q_a_proj_bias"] = (self.q_lora_rank,)
            s["kv_a_proj_bias"] = (self.kv_lora_rank + self.qk_rope_head_dim,)
            s["o_proj_bias"] = (D,)
        return s


class MLACache(NamedTuple):
    """Per-layer MLA cache. latent [B, T, C] (after kv_a_layernorm), k_rope [B, T, dr] (roped)."""

    latent: jnp.ndarray
    k_rope: jnp.ndarray


def init_mla_cache(spec: MLASpec, batch: int, max_len: int, dtype=jnp.float32) -> MLACache:
    return MLACache(
        latent=jnp.zeros((batch, max_len, spec.kv_lora_rank), dtype),
        k_rope=jnp.zeros((batch, max_len, spec.qk_rope_head_dim), dtype),
    )


def rms_norm(x, weight, eps=NORM_EPS):
    """transformers' RMSNorm: normalize in float32, cast back, then scale."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * xf.astype(x.dtype)


def _write_cache(cache_arr, new, positions):
    """cache_arr [B, T, ...], new [B, S, ...], positions [B, S] -> cache with slot p = new row."""
    b = jnp.arange(cache_arr.shape[0])[:, None]
    return cache_arr.at[b, positions].set(new.astype(cache_arr.dtype), mode="drop")


def mla_attention(
    params: Mapping[str, Any], x: jnp.ndarray, positions: jnp.ndarray, spec: MLASpec,
    cache: Optional[MLACache] = None,
) -> tuple[jnp.ndarray, Optional[MLACache]]:
    """x [B, S, D], positions [B, S] int -> (out [B, S, D], new cache or None).

    Without a cache, attention is causal within x (query s sees keys t <= s). With a cache, the new
    latents are written at slot == position and a query at position p sees slots j <= p.
    """
    B, S, _ = x.shape
    H, dn, dr, dv, C = (spec.num_heads, spec.qk_nope_head_dim, spec.qk_rope_head_dim,
                        spec.v_head_dim, spec.kv_lora_rank)
    dtype = x.dtype
    get_b = lambda k: params.get(k) if spec.attention_bias else None  # noqa: E731

    if spec.q_lora_rank is None:
        q = linear(x, params["q_proj"])
    else:
        q = linear(rms_norm(linear(x, params["q_a_proj"], get_b("q_a_proj_bias")), params["q_a_norm"]),
                   params["q_b_proj"])
    q = q.reshape(B, S, H, dn + dr)
    q_nope, q_rope = q[..., :dn], q[..., dn:]

    ckv = linear(x, params["kv_a_proj"], get_b("kv_a_proj_bias"))
    latent = rms_norm(ckv[..., :C], params["kv_a_norm"])          # [B, S, C]
    k_rope = ckv[..., C:][:, :, None, :]                            # [B, S, 1, dr]

    cos, sin = rope_yarn.rope_cos_sin(spec.rope, positions)
    q_rope = rope_yarn.apply_rope(q_rope, cos, sin, spec.rope.interleaved)
    k_rope = rope_yarn.apply_rope(k_rope, cos, sin, spec.rope.interleaved)[:, :, 0, :]  # [B, S, dr]

    if cache is not None:
        cache = MLACache(_write_cache(cache.latent, latent, positions),
                         _write_cache(cache.k_rope, k_rope, positions))
        all_latent, all_k_rope = cache.latent.astype(dtype), cache.k_rope.astype(dtype)
        T = all_latent.shape[1]
        mask = jnp.arange(T)[None, None, :] <= positions[:, :, None]        # [B, S, T]
    else:
        all_latent, all_k_rope = latent, k_rope
        T = S
        mask = jnp.broadcast_to(jnp.tril(jnp.ones((S, S), bool))[None], (B, S, S))

    absorb = spec.absorb == "always" or (spec.absorb == "decode" and cache is not None and S == 1)
    scale = spec.softmax_scale
    f32 = jnp.float32
    if absorb:
        w_kv = dense_weight(params["kv_b_proj"], dtype).reshape(C, H, dn + dv)
        w_uk, w_uv = w_kv[..., :dn], w_kv[..., dn:]
        q_lat = jnp.einsum("bshd,chd->bshc", q_nope, w_uk)
        scores = (jnp.einsum("bshc,btc->bhst", q_lat, all_latent, preferred_element_type=f32)
                  + jnp.einsum("bshr,btr->bhst", q_rope, all_k_rope, preferred_element_type=f32))
    else:
        kv = linear(all_latent, params["kv_b_proj"]).reshape(B, T, H, dn + dv)
        k_nope, v = kv[..., :dn], kv[..., dn:]
        scores = (jnp.einsum("bshd,bthd->bhst", q_nope, k_nope, preferred_element_type=f32)
                  + jnp.einsum("bshr,btr->bhst", q_rope, all_k_rope, preferred_element_type=f32))
    scores = scores * scale
    scores = jnp.where(mask[:, None, :, :], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    if absorb:
        o_lat = jnp.einsum("bhst,btc->bshc", probs, all_latent)
        o = jnp.einsum("bshc,chv->bshv", o_lat, w_uv)
    else:
        o = jnp.einsum("bhst,bthv->bshv", probs, v)
    out = linear(o.reshape(B, S, H * dv), params["o_proj"], get_b("o_proj_bias"))
    return out, cache
