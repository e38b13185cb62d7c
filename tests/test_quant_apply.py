"""quantize_model: which Params are swapped, the report's accounting, the forward pass, bad input."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import milo_jax  # noqa: F401  (import order: milo_jax before converters)
from converters.registry import get_arch
from milo_jax.models.decoder import MoECausalLM
from milo_jax.quant import QuantizedTensor, quantize_tensor
from milo_jax.quant.apply import DEFAULT_INCLUDE, quantize_model


@pytest.fixture(scope="module")
def model():
    hf = dict(model_type="mixtral", vocab_size=96, hidden_size=64, intermediate_size=128,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              max_position_embeddings=32, num_local_experts=4, num_experts_per_tok=2)
    cfg = get_arch("mixtral").parse_config(hf, "test config")
    m = MoECausalLM(cfg, rngs=nnx.Rngs(7))
    # heavier-tailed weights than the 0.02-normal init, so that quantization error is visible
    for layer in m.layers:
        for p in (layer.attn.q_proj.kernel, layer.mlp.experts.down_proj):
            key = jax.random.key(p.get_value().size)
            p.set_value(jax.random.t(key, 3.0, p.get_value().shape) * 0.02)
    return m


def _params(m):
    return {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(m, nnx.Param))}


def test_default_selects_attention_and_experts_only(model):
    new, report = quantize_model(model, bits=3, group_size=64, method="hqq")
    before, after = _params(model), _params(new)
    assert before.keys() == after.keys()
    quantized = {k for k, v in after.items() if isinstance(v, QuantizedTensor)}
    expected = {f"layers.{i}.attn.{p}_proj.kernel" for i in range(2) for p in "qkvo"}
    expected |= {f"layers.{i}.mlp.experts.{p}_proj" for i in range(2) for p in ("gate", "up", "down")}
    assert quantized == expected
    assert {t.path for t in report.tensors} == expected
    # untouched: router, embeddings, lm_head, norms; and the input model is not modified
    for k in after.keys() - expected:
        np.testing.assert_array_equal(np.asarray(after[k]), np.asarray(before[k]))
    assert not any(isinstance(v, QuantizedTensor) for v in before.values())
    assert re.search(DEFAULT_INCLUDE, "layers.0.mlp.router.gate.kernel") is None


def test_report_matches_quantize_tensor(model):
    new, report = quantize_model(model, bits=3, group_size=64, method="rtn")
    before = _params(model)
    for t in report.tensors:
        w = before[t.path]
        qt = quantize_tensor(w, bits=3, group_size=64, method="rtn")
        assert t.shape == tuple(w.shape) and t.num_weights == w.size
        assert t.nbytes == qt.nbytes and t.bits_per_weight == pytest.approx(8 * qt.nbytes / w.size)
        err = float(jnp.mean(jnp.abs(qt.dequantize(jnp.float32) - w)))
        assert t.mean_abs_err == pytest.approx(err, rel=1e-5)
        assert 0 < t.mean_abs_err < float(jnp.mean(jnp.abs(w)))
    n = sum(t.num_weights for t in report.tensors)
    assert report.num_weights == n
    assert report.bits_per_weight == pytest.approx(8 * sum(t.nbytes for t in report.tensors) / n)
    assert report.bits_per_weight == pytest.approx(3.5)   # 3-bit codes + fp16 scale, zero per 64
    d = report.to_dict()
    assert d["method"] == "rtn" and len(d["tensors"]) == len(report.tensors)


def test_forward_uses_dequantized_weights(model):
    """The quantized model equals the float model with every selected weight replaced by its
    dequantized value, and differs from the original float model."""
    new, report = quantize_model(model, bits=3, group_size=64, method="hqq")
    tokens = jax.random.randint(jax.random.key(3), (2, 24), 0, 96)
    ref = nnx.clone(model)
    for path, v in nnx.to_flat_state(nnx.state(new, nnx.Param)):
        if isinstance(v.get_value(), QuantizedTensor):
            target = ref
            for p in path[:-1]:
                target = target[p] if isinstance(p, int) else getattr(target, p)
            getattr(target, path[-1]).set_value(v.get_value().dequantize(jnp.float32))
    out_q, out_ref, out_fp = new(tokens), ref(tokens), model(tokens)
    np.testing.assert_allclose(np.asarray(out_q), np.asarray(out_ref), rtol=1e-5, atol=1e-5)
    assert float(jnp.max(jnp.abs(out_q - out_fp))) > 1e-4


def test_hqq_error_not_above_rtn(model):
    _, rtn = quantize_model(model, bits=3, group_size=64, method="rtn")
    _, hqq = quantize_model(model, bits=3, group_size=64, method="hqq")
    assert hqq.mean_abs_err < rtn.mean_abs_err


def test_custom_include_and_bad_input(model):
    new, report = quantize_model(model, bits=4, group_size=32, include=r"experts\.down_proj$")
    assert [t.path for t in report.tensors] == [f"layers.{i}.mlp.experts.down_proj" for i in range(2)]
    assert report.bits_per_weight == pytest.approx(4 + 32 / 32)
    with pytest.raises(ValueError, match="matches no parameter"):
        quantize_model(model, include=r"no_such_weight")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(new, include=r"experts\.down_proj$")
    with pytest.raises(ValueError, match=r"quantize_model: Rule\(.*\): bits=5 is not supported"):
        quantize_model(model, bits=5)
