"""Rotary position embeddings.

`rope_frequencies(config, dim)` returns (inv_freq [dim // 2] float32 numpy, attention_scaling float)
for the config's rope type, looked up in `ROPE_INIT` (key = config.rope_scaling["rope_type"] or
"type", "default" when rope_scaling is None). Other modules add types with
`register_rope("yarn", fn)`, fn(config, dim) -> (inv_freq, attention_scaling).

`apply_rope(x, positions, inv_freq, attention_scaling, interleaved=False)` rotates x [B, S, H, D]
at integer positions [B, S]: the HF "rotate_half" convention (pairs (i, i + D/2)), or adjacent
pairs (2i, 2i+1) with interleaved=True.
"""

from __future__ import annotations

from typing import Callable, Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np

RopeInit = Callable[..., Tuple[np.ndarray, float]]
ROPE_INIT: Dict[str, RopeInit] = {}


def register_rope(rope_type: str, fn: RopeInit) -> None:
    ROPE_INIT[rope_type] = fn


def rope_type(config) -> str:
    rs = config.rope_scaling
    if not rs:
        return "default"
    return rs.get("rope_type", rs.get("type", "default"))


def default_inv_freq(theta: float, dim: int) -> np.ndarray:
    """1 / theta^(2i/dim), i = 0 .. dim/2 - 1, computed in float32 like HF."""
    exps = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    return (1.0 / (np.float32(theta) ** exps)).astype(np.float32)


def _default(config, dim: int):
    return default_inv_freq(config.rope_theta, dim), 1.0


register_rope("default", _default)


def rope_frequencies(config, dim: int | None = None):
    """(inv_freq [dim // 2], attention_scaling) for config's rope type; dim defaults to head_dim."""
    dim = config.head_dim if dim is None else dim
    kind = rope_type(config)
    if kind not in ROPE_INIT:
        raise ValueError(f"rope type {kind!r} is not supported (known: {sorted(ROPE_INIT)})")
    return ROPE_INIT[kind](config, dim)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq, attention_scaling: float = 1.0,
               interleaved: bool = False) -> jax.Array:
    """x [B, S, H, D], positions int [B, S] -> rotated x (same dtype); cos/sin in float32."""
    inv = jnp.asarray(inv_freq, jnp.float32)
    freqs = positions.astype(jnp.float32)[..., None] * inv          # [B, S, D/2]
    cos = (jnp.cos(freqs) * attention_scaling)[:, :, None, :]
    sin = (jnp.sin(freqs) * attention_scaling)[:, :, None, :]
    # HF casts cos/sin to the activation dtype before the rotation
    cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        r1 = x1 * cos - x2 * sin
        r2 = x2 * cos + x1 * sin
        return jnp.stack([r1, r2], axis=-1).reshape(x.shape)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
