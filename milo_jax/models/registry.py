"""Pluggable parts of the decoder, chosen by name from the ModelConfig.

ATTENTION[config.attention_kind] -> an nnx.Module class constructed as
    cls(config, layer_idx, *, dtype, rngs)
  with
    __call__(x [B, S, H], positions int32 [B, S], cache=None) -> (y [B, S, H], new_cache or None)
        positions: absolute positions (RoPE); with a cache, new keys/values go to slot == position
        (per row) and a query at position p attends to slots j <= p (and within its sliding window).
        Without a cache the keys are x's own tokens at `positions` with the same masking rule.
    init_cache(batch_size, max_len, dtype) -> this layer's cache pytree (preallocated arrays)

ROUTERS[config.router_kind] -> an nnx.Module class constructed as
    cls(config, *, dtype, rngs)
  with
    __call__(x [T, H]) -> (weights [T, k] float32, expert_ids [T, k] int32)
        the weights are the final per-expert multipliers (any renormalisation or scaling applied).

Register with `register_attention("mla", MLAttention)` / `register_router("deepseek_v3", R)` at
import time of the module that defines them.
"""

from __future__ import annotations

from typing import Dict, Type

ATTENTION: Dict[str, Type] = {}
ROUTERS: Dict[str, Type] = {}


def register_attention(kind: str, cls: Type) -> Type:
    ATTENTION[kind] = cls
    return cls


def register_router(kind: str, cls: Type) -> Type:
    ROUTERS[kind] = cls
    return cls


def get_attention(kind: str) -> Type:
    if kind not in ATTENTION:
        raise ValueError(f"unknown attention kind {kind!r} (registered: {sorted(ATTENTION)})")
    return ATTENTION[kind]


def get_router(kind: str) -> Type:
    if kind not in ROUTERS:
        raise ValueError(f"unknown router kind {kind!r} (registered: {sorted(ROUTERS)})")
    return ROUTERS[kind]
