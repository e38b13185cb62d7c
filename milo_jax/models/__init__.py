"""Flax NNX MoE decoder models (Mixtral, Qwen2/Qwen3-MoE, OLMoE; DeepSeek via pluggable parts).

Parameter tree (paths of `nnx.state(model, nnx.Param)`, what quantization rules match on):
    embed_tokens.embedding                      [V, H]
    layers.{i}.input_norm.scale / post_attn_norm.scale        [H]
    layers.{i}.attn.{q,k,v,o}_proj.kernel       [in, out]   (+ .bias [out] when configured)
    layers.{i}.attn.{q,k}_norm.scale            [head_dim] or [projection width]
    layers.{i}.mlp.router.gate.kernel           [H, E]
    layers.{i}.mlp.experts.{gate,up}_proj       [E, H, I]   (stacked experts, y = x @ W[e])
    layers.{i}.mlp.experts.down_proj            [E, I, H]
    layers.{i}.mlp.shared_expert.{gate,up,down}_proj.kernel, layers.{i}.mlp.shared_expert_gate.kernel
    layers.{i}.mlp.{gate,up,down}_proj.kernel   (dense layers)
    norm.scale [H]; lm_head.kernel [H, V] (absent when tie_word_embeddings)
  DeepSeek (MLA attention, sigmoid router):
    layers.{i}.attn.{q_a,q_b,kv_a,kv_b}_proj.kernel (q_proj when q_lora_rank is None), .o_proj.kernel
    layers.{i}.attn.{q_a,kv_a}_norm.scale
    layers.{i}.mlp.router.e_score_correction_bias   [E] float32 (DeepSeek-V3)
Every leaf is an nnx.Param holding a plain array or a milo_jax.QuantizedTensor (swap with
`param.set_value(qt)` or nnx.update with a state whose leaves are QuantizedTensors); all matmuls go
through models.linear (bf16 + QuantizedTensor: pallas_kernels.quant_matmul).
"""

from milo_jax.models.config import ModelConfig
from milo_jax.models.decoder import DecoderLayer, MoECausalLM
from milo_jax.models.linear import (Linear, expert_linear, gathered_expert_linear,
                                     grouped_expert_linear, linear)
from milo_jax.models.registry import (ATTENTION, ROUTERS, register_attention, register_router)
from milo_jax.models.rope import apply_rope, register_rope, rope_frequencies
# Importing these registers the DeepSeek parts: attention "mla", routers "deepseek_moe",
# "deepseek_v2", "deepseek_v3" and rope "yarn".
from milo_jax.models import deepseek_router, mla  # noqa: F401  (registration side effects)

__all__ = ["ModelConfig", "MoECausalLM", "DecoderLayer", "Linear", "linear", "expert_linear",
           "gathered_expert_linear", "grouped_expert_linear", "ATTENTION", "ROUTERS", "register_attention",
           "register_router", "apply_rope", "register_rope", "rope_frequencies"]
