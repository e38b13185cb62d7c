"""Shared fixtures: tiny random Hugging Face MoE models (torch, CPU) for parity tests."""

from __future__ import annotations

import functools
import math

import pytest

TINY = dict(vocab_size=160, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=128)


def _hf_classes(arch: str):
    import transformers as tf
    return {
        "mixtral": (tf.MixtralConfig, tf.MixtralForCausalLM,
                    dict(intermediate_size=48, num_local_experts=4)),
        "qwen2_moe": (tf.Qwen2MoeConfig, tf.Qwen2MoeForCausalLM,
                      dict(intermediate_size=40, moe_intermediate_size=24, num_experts=8,
                           shared_expert_intermediate_size=40, norm_topk_prob=False)),
        "qwen3_moe": (tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM,
                      dict(intermediate_size=40, moe_intermediate_size=24, num_experts=8,
                           norm_topk_prob=True, head_dim=16)),
        "olmoe": (tf.OlmoeConfig, tf.OlmoeForCausalLM,
                  dict(intermediate_size=24, num_experts=8, eos_token_id=1, pad_token_id=0)),
    }[arch]


def make_hf_model(arch: str, seed: int = 0, **overrides):
    """A tiny random transformers model in eval mode, float32, with O(1) logits.

    HF's default init (std 0.02) gives nearly tied logits and routing; we redraw every matrix with
    std 1/sqrt(fan_in) (embeddings std 1) and norm scales around 1 so that greedy tokens and top-k
    routing are well separated and a parity failure is a real difference.
    """
    import torch

    torch.manual_seed(seed)
    config_cls, model_cls, extra = _hf_classes(arch)
    kw = dict(TINY, **extra)
    kw.update(overrides)
    model = model_cls(config_cls(**kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.normal_(0.0, 1.0)
            else:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]))
    return model


@pytest.fixture
def hf_model_factory():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    return make_hf_model


@functools.cache
def cuda_lowering_unavailable():
    """None when this jaxlib lowers Mosaic GPU kernels for CUDA from the CPU host, else the reason.

    The probe lowers quant_matmul's f32-unpack decode kernel, which has compiled and run natively on
    the H100, so a failure here is the environment, not the code under test; tests that lower
    other kernels skip only on this probe and let their own lowering errors fail."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import milo_jax  # noqa: F401  (import order: milo_jax before pallas_kernels)
    from milo_jax.quant import quantize_tensor
    from pallas_kernels.quant_matmul import api, layout, mgpu_sm90

    w = jnp.asarray(np.random.default_rng(0).standard_normal((1024, 128)) * 0.02, jnp.bfloat16)
    kw = layout.prepare(quantize_tensor(w, bits=3, group_size=64))
    cfg = mgpu_sm90.Config(block_m=0, chunk_slots=4, unpack="f32")
    f = jax.jit(lambda x, kw: api.matmul(x, kw, impl="kernel", config=cfg, interpret=False))
    try:
        f.trace(jax.ShapeDtypeStruct((1, 1024), jnp.bfloat16), kw).lower(lowering_platforms=("cuda",))
    except Exception as e:  # pragma: no cover - a jaxlib without the Mosaic GPU lowering
        return f"this jaxlib cannot lower Mosaic GPU kernels on CPU: {type(e).__name__}: {str(e)[:200]}"
    return None
