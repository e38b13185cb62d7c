"""Flax NNX MoE decoder models (Mixtral, Qwen2/Qwen3-MoE, OLMoE; DeepSeek via pluggable parts)."""

from milo_jax.models.config import ModelConfig
from milo_jax.models.decoder import DecoderLayer, MoECausalLM
from milo_jax.models.linear import Linear, expert_linear, gathered_expert_linear, linear
from milo_jax.models.registry import (ATTENTION, ROUTERS, register_attention, register_router)
from milo_jax.models.rope import apply_rope, register_rope, rope_frequencies

__all__ = ["ModelConfig", "MoECausalLM", "DecoderLayer", "Linear", "linear", "expert_linear",
           "gathered_expert_linear", "ATTENTION", "ROUTERS", "register_attention",
           "register_router", "apply_rope", "register_rope", "rope_frequencies"]
