"""milo_jax.save / milo_jax.load: bit-identical leaves (codes, scales, zeros, bf16 / int8 / int4 /
ragged compensator factors), identical static metadata and logits, params pytrees, atomic writes."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from milo_jax import QuantConfig, QuantizedTensor, Rule, load, quantize, save
from milo_jax.checkpoint import META_FILE, load_report
from milo_jax.quant.compensator import QuantizedFactor, RaggedFactor
from milo_jax.quant.config import KurtosisRank
from milo_jax.quant.lowrank import quantize_lowrank
from milo_jax.quant.model import split_params
from tests.test_quantize_api import forward, tiny_model

pytest.importorskip("torch")


def _is_qt(x):
    return isinstance(x, QuantizedTensor)


def assert_bit_identical(a, b):
    """Same pytree structure (static metadata included) and leaves equal bit for bit."""
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


def test_quantized_model_round_trip_is_bit_identical(tmp_path):
    model = tiny_model()
    # int8 ragged factors (kurtosis ranks differ per expert), int4 uniform ones, HQQ elsewhere;
    # few tensors with compensators keep the (eager, per-shape compiled) factor quantizer cheap
    config = QuantConfig((Rule(r"^layers\.0\.mlp\.experts\.down", method="milo",
                               rank=KurtosisRank(c=2), compensator_dtype="int8"),
                          Rule(r"^layers\.1\.attn\.q_proj", method="milo", rank=8,
                               compensator_dtype="int4"),
                          Rule("attention"), Rule("routed_experts")))
    qmodel, report = quantize(model, config)
    kinds = {type(v.u).__name__ + "/" + type(getattr(v.u, "data", v.u)).__name__
             for v in split_params(qmodel)[1] if _is_qt(v) and v.u is not None}
    assert kinds == {"RaggedFactor/QuantizedFactor", "QuantizedFactor/QuantizedFactor"}, kinds
    path = save(qmodel, tmp_path / "ck", report=report)
    back = load(path)
    names, values, _ = split_params(qmodel)
    bnames, bvalues, _ = split_params(back)
    assert names == bnames and back.config == qmodel.config and back.dtype == qmodel.dtype
    for name, v, w in zip(names, values, bvalues):
        assert type(v) is type(w), name
        assert_bit_identical(v, w)
    np.testing.assert_array_equal(forward(back), forward(qmodel))
    assert load_report(path).to_dict() == report.to_dict()
    # the target exists now: refused, unless overwrite
    with pytest.raises(ValueError, match="exists and is not an empty directory"):
        save(qmodel, path)
    save(model, path, overwrite=True)
    plain = load(path)
    assert not any(_is_qt(v) for v in split_params(plain)[1])
    np.testing.assert_array_equal(forward(plain), forward(model))


def test_params_pytree_round_trip_with_ragged_bf16_factors(tmp_path):
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(4, 64, 64)), jnp.bfloat16)
    ragged = quantize_lowrank(w, rank=np.array([0, 8, 8, 16]), rounds=3)
    assert isinstance(ragged.u, RaggedFactor) and not isinstance(ragged.u.data, QuantizedFactor)
    params = {"block": {"experts": ragged, "bias": jnp.asarray(rng.normal(size=(64,)), jnp.float32),
                        "empty": jnp.zeros((0, 3), jnp.float16)},
              "scale": jnp.asarray(rng.normal(size=(2, 3)), jnp.bfloat16)}
    save(params, tmp_path / "p")
    back = load(tmp_path / "p")
    assert set(back) == {"block", "scale"} and set(back["block"]) == {"experts", "bias", "empty"}
    assert_bit_identical(params, back)
    np.testing.assert_array_equal(np.asarray(back["block"]["experts"].dequantize(jnp.float32)),
                                  np.asarray(ragged.dequantize(jnp.float32)))


def test_failed_save_leaves_nothing_and_bad_dirs_are_refused(tmp_path):
    with pytest.raises(Exception):
        save({"a": {"b": object()}}, tmp_path / "bad")
    assert os.listdir(tmp_path) == []                       # no target, no temporary directory
    with pytest.raises(ValueError, match="not a milo-jax checkpoint"):
        load(tmp_path)
    with pytest.raises(ValueError, match="string"):
        save({1: jnp.ones(2)}, tmp_path / "k")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / META_FILE).write_text('{"format": "other", "version": 1}')
    with pytest.raises(ValueError, match="unsupported format"):
        load(tmp_path / "x")
