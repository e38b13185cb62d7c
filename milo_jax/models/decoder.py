"""The decoder-only causal LM: embedding, N pre-norm decoder layers, final norm, LM head.

Interface (used by milo_jax.serve):
    model(tokens int32 [B, S]) -> logits float32 [B, S, V]            (positions 0 .. S-1)
    model(tokens, positions=positions) -> logits                        (positions int32 [B, S])
    model.init_cache(batch_size, max_len, dtype=None) -> cache          (tuple, one entry per layer)
    model(tokens, positions=positions, cache=cache) -> (logits, new_cache)
Params: every weight is an nnx.Param whose value is a plain array or a QuantizedTensor.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from milo_jax.models import attention as _attention  # noqa: F401  (registers "gqa")
from milo_jax.models.config import ModelConfig
from milo_jax.models.linear import Linear, _precision, materialize
from milo_jax.models.moe import MLP, MoEBlock
from milo_jax.models.norm import RMSNorm
from milo_jax.models.registry import get_attention


class DecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, *, dtype=jnp.float32,
                 rngs: nnx.Rngs | None = None):
        c = config
        self.input_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype=dtype)
        self.attn = get_attention(c.attention_kind)(c, layer_idx, dtype=dtype, rngs=rngs)
        self.post_attn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype=dtype)
        if c.mlp_kinds[layer_idx] == "moe":
            self.mlp = MoEBlock(c, dtype=dtype, rngs=rngs)
        else:
            self.mlp = MLP(c.hidden_size, c.intermediate_size, c.hidden_act, dtype=dtype, rngs=rngs)

    def __call__(self, x, positions, cache=None):
        h, new_cache = self.attn(self.input_norm(x), positions, cache)
        x = x + h
        x = x + self.mlp(self.post_attn_norm(x))
        return x, new_cache


class Embedding(nnx.Module):
    def __init__(self, vocab: int, hidden: int, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        init = (jax.random.normal(rngs.params(), (vocab, hidden), dtype) * 0.02 if rngs is not None
                else jnp.zeros((vocab, hidden), dtype))
        self.embedding = nnx.Param(init)

    def __call__(self, tokens):
        return jnp.take(self.embedding.get_value(), tokens, axis=0)


class MoECausalLM(nnx.Module):
    """The model; `config` is the parsed ModelConfig (static)."""

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        self.config = config
        self.dtype = jnp.dtype(dtype).name
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(config, i, dtype=dtype, rngs=rngs)
                                for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.lm_head = (None if config.tie_word_embeddings else
                        Linear(config.hidden_size, config.vocab_size, dtype=dtype, rngs=rngs))

    def init_cache(self, batch_size: int, max_len: int, dtype=None):
        """Preallocated per-layer caches (for GQA: {"k", "v"} [B, max_len, kv_heads, head_dim])."""
        dtype = jnp.dtype(dtype or self.dtype)
        return tuple(layer.attn.init_cache(batch_size, max_len, dtype) for layer in self.layers)

    def logits(self, h: jax.Array) -> jax.Array:
        if self.lm_head is None:
            w = materialize(self.embed_tokens.embedding.get_value(), h.dtype)
            out = jnp.matmul(h, w.T, precision=_precision(h.dtype))
        else:
            out = self.lm_head(h)
        return out.astype(jnp.float32)

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None, cache=None):
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [B, S], got shape {tokens.shape}")
        b, s = tokens.shape
        if positions is None:
            if cache is not None:
                raise ValueError("positions are required when a cache is given")
            positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        positions = jnp.asarray(positions, jnp.int32)
        if cache is not None and len(cache) != len(self.layers):
            raise ValueError(f"cache has {len(cache)} layers, model has {len(self.layers)}")
        x = self.embed_tokens(tokens).astype(self.dtype)
        new_cache = []
        for i, layer in enumerate(self.layers):
            x, c = layer(x, positions, None if cache is None else cache[i])
            new_cache.append(c)
        logits = self.logits(self.norm(x))
        if cache is None:
            return logits
        return logits, tuple(new_cache)
