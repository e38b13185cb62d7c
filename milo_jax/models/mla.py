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
  * "expand": run kv_b over every cached slot and attend with ordinary per-head k/v. Every weight
    matmul goes through `linear()` (where quantized kernels are dispatched); cost
    O(T * C * H * (dn + dv)) per call on top of attention, fine for prefill (S ~ T).
  * "absorb": fold kv_b into the query and the output instead: q_lat = q_nope @ W_uk^T [H, C],
    score = q_lat . c + q_rope . k_rope, o_lat = p @ c, out_h = o_lat @ W_uv. Cost
    O(S * T * H * (C + dr)), the right choice for decode (S = 1). Needs kv_b as a dense
    [C, H, dn + dv] array (`materialize`: dequantized once per call for a QuantizedTensor).
MLASpec.absorb picks: "decode" (default: absorb iff a cache is given and S == 1), "always", "never".

Weights follow the project convention y = x @ W, W [in, out] (HF's nn.Linear weight transposed).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from milo_jax.models import rope_yarn
from milo_jax.models.linear import Linear, linear, materialize
from milo_jax.models.norm import RMSNorm, rms_norm
from milo_jax.models.registry import register_attention

NORM_EPS = 1e-6  # q_a_layernorm / kv_a_layernorm use the RMSNorm default, not rms_norm_eps


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


# quantize_model `include` for MLA models: every attention projection (MLA and GQA names) and the
# routed experts; routers, the correction bias, norms, embeddings, lm_head and shared experts stay.
MLA_QUANT_INCLUDE = (r"^layers\.\d+\.(attn\.(q|k|v|o|q_a|q_b|kv_a|kv_b)_proj\.kernel"
                     r"|mlp\.experts\.(gate|up|down)_proj)$")


def init_mla_cache(spec: MLASpec, batch: int, max_len: int, dtype=jnp.float32) -> dict:
    """Per-layer MLA cache: latent [B, T, C] (after kv_a_layernorm), k_rope [B, T, dr] (roped)."""
    return {"latent": jnp.zeros((batch, max_len, spec.kv_lora_rank), dtype),
            "k_rope": jnp.zeros((batch, max_len, spec.qk_rope_head_dim), dtype)}


def _precision(dtype):
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _write_cache(cache_arr, new, positions):
    """cache_arr [B, T, ...], new [B, S, ...], positions [B, S] -> cache with slot p = new row."""
    b = jnp.arange(cache_arr.shape[0])[:, None]
    return cache_arr.at[b, positions].set(new.astype(cache_arr.dtype), mode="drop")


def mla_attention(
    params: Mapping[str, Any], x: jnp.ndarray, positions: jnp.ndarray, spec: MLASpec,
    cache: Optional[dict] = None,
) -> tuple[jnp.ndarray, Optional[dict]]:
    """x [B, S, D], positions [B, S] int -> (out [B, S, D], new cache or None).

    Without a cache, x's own tokens are the keys and a query at position p sees those at positions
    <= p (causal for increasing positions). With a cache, the new latents are written at
    slot == position and a query at position p sees slots j <= p.
    """
    B, S, _ = x.shape
    H, dn, dr, dv, C = (spec.num_heads, spec.qk_nope_head_dim, spec.qk_rope_head_dim,
                        spec.v_head_dim, spec.kv_lora_rank)
    dtype = x.dtype
    get_b = lambda k: params.get(k) if spec.attention_bias else None  # noqa: E731

    if spec.q_lora_rank is None:
        q = linear(x, params["q_proj"])
    else:
        q_lat = linear(x, params["q_a_proj"], get_b("q_a_proj_bias"))
        q = linear(rms_norm(q_lat, params["q_a_norm"], NORM_EPS), params["q_b_proj"])
    q = q.reshape(B, S, H, dn + dr)
    q_nope, q_rope = q[..., :dn], q[..., dn:]

    ckv = linear(x, params["kv_a_proj"], get_b("kv_a_proj_bias"))
    latent = rms_norm(ckv[..., :C], params["kv_a_norm"], NORM_EPS)     # [B, S, C]
    k_rope = ckv[..., C:][:, :, None, :]                                # [B, S, 1, dr]

    cos, sin = rope_yarn.rope_cos_sin(spec.rope, positions)
    q_rope = rope_yarn.apply_rope(q_rope, cos, sin, spec.rope.interleaved)
    k_rope = rope_yarn.apply_rope(k_rope, cos, sin, spec.rope.interleaved)[:, :, 0, :]  # [B, S, dr]

    if cache is not None:
        cache = {"latent": _write_cache(cache["latent"], latent, positions),
                 "k_rope": _write_cache(cache["k_rope"], k_rope, positions)}
        all_latent, all_k_rope = cache["latent"].astype(dtype), cache["k_rope"].astype(dtype)
        T = all_latent.shape[1]
        mask = jnp.arange(T)[None, None, :] <= positions[:, :, None]        # [B, S, T]
    else:
        all_latent, all_k_rope = latent, k_rope
        T = S
        mask = positions[:, None, :] <= positions[:, :, None]              # key pos <= query pos

    absorb = spec.absorb == "always" or (spec.absorb == "decode" and cache is not None and S == 1)
    scale = spec.softmax_scale
    prec = _precision(dtype)
    acc = dict(preferred_element_type=jnp.float32, precision=prec)   # scores accumulate in f32
    if absorb:
        w_kv = materialize(params["kv_b_proj"], dtype).reshape(C, H, dn + dv)
        w_uk, w_uv = w_kv[..., :dn], w_kv[..., dn:]
        q_lat = jnp.einsum("bshd,chd->bshc", q_nope, w_uk, precision=prec)
        scores = (jnp.einsum("bshc,btc->bhst", q_lat, all_latent, **acc)
                  + jnp.einsum("bshr,btr->bhst", q_rope, all_k_rope, **acc))
    else:
        kv = linear(all_latent, params["kv_b_proj"]).reshape(B, T, H, dn + dv)
        k_nope, v = kv[..., :dn], kv[..., dn:]
        scores = (jnp.einsum("bshd,bthd->bhst", q_nope, k_nope, **acc)
                  + jnp.einsum("bshr,btr->bhst", q_rope, all_k_rope, **acc))
    scores = scores * scale
    scores = jnp.where(mask[:, None, :, :], scores, jnp.finfo(jnp.float32).min)  # no NaN rows
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    if absorb:
        o_lat = jnp.einsum("bhst,btc->bshc", probs, all_latent, precision=prec)
        o = jnp.einsum("bshc,chv->bshv", o_lat, w_uv, precision=prec)
    else:
        o = jnp.einsum("bhst,bthv->bshv", probs, v, precision=prec)
    out = linear(o.reshape(B, S, H * dv), params["o_proj"], get_b("o_proj_bias"))
    return out, cache


def mla_spec_from_config(config, absorb: str = "decode") -> MLASpec:
    """MLASpec from a ModelConfig whose `extra` holds the MLA sizes (see converters.arch_deepseek)."""
    e = config.extra_get
    rope = rope_yarn.rope_spec_from_config(
        config.rope_scaling, dim=e("qk_rope_head_dim"), theta=config.rope_theta,
        max_position_embeddings=config.max_position_embeddings,
        interleaved=bool(e("rope_interleave", True)), source=f"{config.model_type} config")
    return MLASpec(
        hidden_size=config.hidden_size, num_heads=config.num_attention_heads,
        q_lora_rank=e("q_lora_rank"), kv_lora_rank=e("kv_lora_rank"),
        qk_nope_head_dim=e("qk_nope_head_dim"), qk_rope_head_dim=e("qk_rope_head_dim"),
        v_head_dim=e("v_head_dim"), rope=rope, attention_bias=config.qkv_bias,
        absorb=e("mla_absorb", absorb))


class MLAttention(nnx.Module):
    """NNX holder of the MLA weights; registered as attention kind "mla".

    Submodules (HF name in brackets): q_proj [q_proj] or q_a_proj, q_a_norm, q_b_proj
    [q_a_proj, q_a_layernorm, q_b_proj]; kv_a_proj [kv_a_proj_with_mqa], kv_a_norm [kv_a_layernorm],
    kv_b_proj, o_proj. Cache: {"latent": [B, T, C], "k_rope": [B, T, dr]}.
    """

    def __init__(self, config, layer_idx: int, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        self.spec = mla_spec_from_config(config)
        sp, D = self.spec, config.hidden_size
        bias = sp.attention_bias
        H = sp.num_heads
        if sp.q_lora_rank is None:
            self.q_proj = Linear(D, H * sp.qk_head_dim, dtype=dtype, rngs=rngs)
        else:
            self.q_a_proj = Linear(D, sp.q_lora_rank, use_bias=bias, dtype=dtype, rngs=rngs)
            self.q_a_norm = RMSNorm(sp.q_lora_rank, NORM_EPS, dtype=dtype)
            self.q_b_proj = Linear(sp.q_lora_rank, H * sp.qk_head_dim, dtype=dtype, rngs=rngs)
        self.kv_a_proj = Linear(D, sp.kv_lora_rank + sp.qk_rope_head_dim, use_bias=bias, dtype=dtype,
                                rngs=rngs)
        self.kv_a_norm = RMSNorm(sp.kv_lora_rank, NORM_EPS, dtype=dtype)
        self.kv_b_proj = Linear(sp.kv_lora_rank, H * (sp.qk_nope_head_dim + sp.v_head_dim),
                                dtype=dtype, rngs=rngs)
        self.o_proj = Linear(H * sp.v_head_dim, D, use_bias=bias, dtype=dtype, rngs=rngs)

    def init_cache(self, batch_size: int, max_len: int, dtype) -> dict:
        return init_mla_cache(self.spec, batch_size, max_len, dtype)

    def _params(self) -> dict:
        p = {}
        for name in ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj", "kv_b_proj", "o_proj"):
            mod = getattr(self, name, None)
            if mod is None:
                continue
            p[name] = mod.kernel.get_value()
            if mod.bias is not None:
                p[name + "_bias"] = mod.bias.get_value()
        for name in ("q_a_norm", "kv_a_norm"):
            mod = getattr(self, name, None)
            if mod is not None:
                p[name] = mod.scale.get_value()
        return p

    def __call__(self, x: jax.Array, positions: jax.Array, cache: dict | None = None):
        return mla_attention(self._params(), x, positions, self.spec, cache)


register_attention("mla", MLAttention)
