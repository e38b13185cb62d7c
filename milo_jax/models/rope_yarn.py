"""Rotary embeddings for the DeepSeek family: YaRN frequencies, mscale, and the interleaved layout.

DeepSeek-V2/V3 rotate only the `qk_rope_head_dim` slice of each query/key head. Two things differ
from Llama-style RoPE:

* Layout. DeepSeek checkpoints store the rotary dims as interleaved pairs (x0, x1), (x2, x3), ...
  each pair rotated by one frequency (transformers' DeepSeek-V2 does this with complex numbers; V3
  with `rope_interleave=True`, the default). V3 with `rope_interleave=False` uses the half-split
  pairing (x_i, x_{i+d/2}) of `rotate_half`. `apply_rope` handles both. Its interleaved output is
  de-interleaved ([rotated evens, rotated odds]); that is a fixed permutation applied to both q and
  k, so every q.k dot product is unchanged and keys cached in this layout stay consistent.
* Frequencies. `rope_scaling` of type "yarn" blends interpolated and extrapolated frequencies with
  a linear ramp (YaRN), multiplies cos/sin by `attention_factor` (= mscale(f, mscale) /
  mscale(f, mscale_all_dim) when both are given), and MLA additionally multiplies the softmax
  scale by mscale(f, mscale_all_dim)^2 (`yarn_softmax_scale`).

The formulas follow transformers' `_compute_yarn_parameters` (v5) so that logits match it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Optional

import jax.numpy as jnp
import numpy as np

# Keys that may appear in a DeepSeek rope_scaling / rope_parameters dict; anything else is refused.
YARN_KEYS = frozenset({
    "type", "rope_type", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
    "mscale", "mscale_all_dim", "attention_factor", "truncate", "rope_theta",
})


@dataclasses.dataclass(frozen=True)
class RopeSpec:
    """Static description of the rotary embedding of one model (hashable, safe as jit static)."""

    dim: int                          # number of rotated dims per head (even)
    theta: float = 10000.0
    rope_type: str = "default"        # "default" or "yarn"
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: Optional[float] = None
    mscale_all_dim: Optional[float] = None
    attention_factor: Optional[float] = None
    truncate: bool = True
    interleaved: bool = True          # DeepSeek pair layout (x0,x1),(x2,x3)... vs rotate_half

    def __post_init__(self):
        if self.dim <= 0 or self.dim % 2:
            raise ValueError(f"rope dim must be a positive even number, got {self.dim}")
        if self.rope_type not in ("default", "yarn"):
            raise ValueError(f"rope_type {self.rope_type!r} is not supported (only 'default' and 'yarn')")


def rope_spec_from_config(
    rope_scaling: Optional[Mapping], *, dim: int, theta: float, max_position_embeddings: int,
    interleaved: bool = True, source: str = "config.json",
) -> RopeSpec:
    """Builds a RopeSpec from a HF `rope_scaling` (old) or `rope_parameters` (transformers v5) dict.

    Raises ValueError for unknown keys or rope types, naming `source`.
    """
    if not rope_scaling:
        return RopeSpec(dim=dim, theta=float(theta), interleaved=interleaved)
    unknown = set(rope_scaling) - YARN_KEYS
    if unknown:
        raise ValueError(f"{source}: rope_scaling has unsupported keys {sorted(unknown)}")
    rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
    theta = float(rope_scaling.get("rope_theta", theta))
    if rope_type == "default":
        return RopeSpec(dim=dim, theta=theta, interleaved=interleaved)
    if rope_type != "yarn":
        raise ValueError(f"{source}: rope_scaling type {rope_type!r} is not supported (only 'yarn')")
    orig = rope_scaling.get("original_max_position_embeddings", max_position_embeddings)
    factor = rope_scaling.get("factor")
    if factor is None:  # transformers: the ratio of max to original positions
        factor = max_position_embeddings / orig
    opt = lambda k: None if rope_scaling.get(k) is None else float(rope_scaling[k])  # noqa: E731
    return RopeSpec(
        dim=dim, theta=theta, rope_type="yarn", factor=float(factor),
        original_max_position_embeddings=int(orig),
        beta_fast=float(rope_scaling.get("beta_fast") or 32.0),
        beta_slow=float(rope_scaling.get("beta_slow") or 1.0),
        mscale=opt("mscale"), mscale_all_dim=opt("mscale_all_dim"),
        attention_factor=opt("attention_factor"),
        truncate=bool(rope_scaling.get("truncate", True)), interleaved=interleaved,
    )


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction 0.1 * mscale * ln(scale) + 1 (1 when not extrapolating)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def inv_freq_and_attention_factor(spec: RopeSpec) -> tuple[np.ndarray, float]:
    """Returns (inv_freq [dim//2] float32 numpy, cos/sin multiplier)."""
    dim, base = spec.dim, spec.theta
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    if spec.rope_type == "default":
        return (1.0 / pos_freqs).astype(np.float32), 1.0
    factor = spec.factor
    if spec.attention_factor is not None:
        att = spec.attention_factor
    elif spec.mscale and spec.mscale_all_dim:
        att = yarn_get_mscale(factor, spec.mscale) / yarn_get_mscale(factor, spec.mscale_all_dim)
    else:
        att = yarn_get_mscale(factor)

    def correction_dim(num_rot):
        return (dim * math.log(spec.original_max_position_embeddings / (num_rot * 2 * math.pi))) / (
            2 * math.log(base))

    low, high = correction_dim(spec.beta_fast), correction_dim(spec.beta_slow)
    if spec.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = (1 - ramp).astype(np.float32)
    inv_extra = 1.0 / pos_freqs
    inv_inter = 1.0 / (np.float32(factor) * pos_freqs)
    inv_freq = inv_inter * (1 - extrapolation_weight) + inv_extra * extrapolation_weight
    return inv_freq.astype(np.float32), float(att)


def yarn_softmax_scale(spec: RopeSpec, qk_head_dim: int) -> float:
    """MLA softmax scale: qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN."""
    scale = qk_head_dim ** -0.5
    if spec.rope_type != "default" and spec.mscale_all_dim:
        m = yarn_get_mscale(spec.factor, spec.mscale_all_dim)
        scale = scale * m * m
    return scale


def rope_cos_sin(spec: RopeSpec, positions: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """positions [B, S] int -> (cos, sin) each [B, S, dim//2] float32, already times attention_factor."""
    inv_freq, att = inv_freq_and_attention_factor(spec)
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    return jnp.cos(angles) * att, jnp.sin(angles) * att


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray, interleaved: bool) -> jnp.ndarray:
    """Rotates x [B, S, H, dim] with cos/sin [B, S, dim//2]; returns [B, S, H, dim] in x.dtype.

    interleaved: pairs (x[2i], x[2i+1]); output is [rotated evens | rotated odds] (see module doc).
    Otherwise pairs (x[i], x[i+dim/2]) as in rotate_half; output keeps that layout.
    """
    dtype = x.dtype
    xf = x.astype(jnp.float32)
    if interleaved:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
    else:
        half = x.shape[-1] // 2
        x1, x2 = xf[..., :half], xf[..., half:]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(dtype)


def _registry_yarn(config, dim: int):
    """rope.ROPE_INIT entry: (inv_freq, cos/sin multiplier) for GQA models whose config asks for
    YaRN (MLA reads the same spec directly and adds the mscale_all_dim softmax correction)."""
    spec = rope_spec_from_config(config.rope_scaling, dim=dim, theta=config.rope_theta,
                                 max_position_embeddings=config.max_position_embeddings,
                                 source=f"{config.model_type} config")
    return inv_freq_and_attention_factor(spec)


def _register():
    from milo_jax.models import rope

    if "yarn" not in rope.ROPE_INIT:
        rope.register_rope("yarn", _registry_yarn)


_register()
