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
Every leaf is an nnx.Param holding a plain array or a milo_jax.QuantizedTensor (swap with
`param.set_value(qt)` or nnx.update with a state whose leaves are QuantizedTensors); all matmuls go
through models.linear, which dequantizes (later: dispatches to the Pallas kernels).
"""

from milo_jax.models.config import ModelConfig
from milo_jax.models.decoder import DecoderLayer, MoECausalLM
from milo_jax.models.linear import Linear, expert_linear, gathered_expert_linear, linear
from milo_jax.models.registry import (ATTENTION, ROUTERS, register_attention, register_router)
from milo_jax.models.rope import apply_rope, register_rope, rope_frequencies

__all__ = ["ModelConfig", "MoECausalLM", "DecoderLayer", "Linear", "linear", "expert_linear",
           "gathered_expert_linear", "ATTENTION", "ROUTERS", "register_attention",
           "register_router", "apply_rope", "register_rope", "rope_frequencies"]
