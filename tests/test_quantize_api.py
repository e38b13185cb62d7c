"""milo_jax.quantize: rule matching, presets (bits / ranks), the budget preset, report figures
recomputed from the leaves, params-pytree input, a running and exportable quantized model, and
bad input.

Also home of `tiny_quant_dir()`: a tiny random Mixtral (hidden 64, experts 64 wide, 2 layers,
4 experts, 4 heads; K = 64 so group 64 fits) saved with transformers, with heavy tails planted in some
experts (so the kurtosis policy gives them different ranks) and a WordLevel tokenizer.json; the
checkpoint and CLI tests share it.
"""

from __future__ import annotations

import math
import os
import re
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from milo_jax import QuantConfig, QuantizedTensor, Rule, export_hf, load_hf, quantize
from milo_jax.quant import ranks as R
from milo_jax.quant.config import (TENSOR_CLASSES, FrequencyRank, HiddenFractionRank,
                                   KurtosisRank, preset)
from milo_jax.quant.model import (QuantizationReport, leaf_nbytes, model_routing_counts,
                                  recipe_for, split_params)

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

# expert e of every layer's w1 / w3 / w2: a fraction p of entries scaled by a (excess kurtosis
# about 0, 1.4, 7.4, 3.2 -> kurtosis ranks 0, 8 or 16, 64 (capped), 32 for s1)
_TAILS = {1: (0.10, 2.0), 2: (0.05, 3.5), 3: (0.10, 2.5)}
_DIRS: dict = {}


def tiny_quant_dir() -> str:
    """The shared tiny checkpoint directory (written once per test process)."""
    if "mixtral" not in _DIRS:
        from tests.conftest import make_hf_model
        from tests.test_serve_mixtral import build_word_tokenizer

        # 4 kv heads: every attention projection is [64, 64], like the experts' matrices, so the
        # tests compile few MiLo programs (GQA matching is tested on abstract parameter names)
        hf = make_hf_model("mixtral", seed=7, hidden_size=64, intermediate_size=64,
                           num_key_value_heads=4)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in hf.named_parameters():
                # transformers 5 keeps experts stacked ([E, out, in]); older ones per expert
                m = re.search(r"experts\.(\d+)\.", name)
                if m:
                    slices = [(int(m.group(1)), p)]
                else:
                    slices = list(enumerate(p)) if ".experts." in name and p.ndim == 3 else []
                for e, w in slices:
                    if e in _TAILS:
                        frac, scale = _TAILS[e]
                        mask = torch.rand(w.shape, generator=gen) < frac
                        w.mul_(torch.where(mask, scale, 1.0))
        d = tempfile.mkdtemp(prefix="tiny_quant_mixtral_")
        hf.save_pretrained(d)
        build_word_tokenizer(os.path.join(d, "tokenizer.json"), vocab_size=hf.config.vocab_size)
        _DIRS["mixtral"] = d
    return _DIRS["mixtral"]


_MODELS: dict = {}


def tiny_model():
    """The tiny checkpoint loaded in bfloat16 (untouched parameters then count 16 bits each)."""
    if "bf16" not in _MODELS:
        _MODELS["bf16"] = load_hf(tiny_quant_dir(), dtype=jnp.bfloat16, progress=False)
    return _MODELS["bf16"]


TOKENS = np.random.RandomState(3).randint(0, 160, (2, 12)).astype(np.int32)


def forward(model):
    return np.asarray(nnx.jit(lambda m, t: m(t))(model, jnp.asarray(TOKENS)))


def matched(config, names):
    return {n for n in names if config.rule_for(n) is not None}


# ------------------------------------------------------------------------------------ matching
def _abstract_names(hf_dir):
    from converters.hf import expected_params, read_config

    config, _ = read_config(hf_dir)
    return [".".join(str(p) for p in path) for path in expected_params(config, jnp.float32)[1]]


def test_default_rules_match_the_intended_tensor_classes_only(hf_model_factory, tmp_path):
    # Qwen2-MoE: layer 0 MoE with a gated shared expert and qkv biases, layer 1 a dense MLP
    hf = hf_model_factory("qwen2_moe", mlp_only_layers=[1])
    hf.save_pretrained(tmp_path)
    names = _abstract_names(tmp_path) + _abstract_names(tiny_quant_dir())
    mla = [f"layers.0.attn.{p}_proj.kernel" for p in ("q_a", "q_b", "kv_a", "kv_b", "o")] + [
        "layers.0.attn.q_a_norm.scale", "layers.0.attn.kv_a_norm.scale",
        "layers.0.mlp.router.e_score_correction_bias", "layers.0.mlp.router.gate.kernel"]
    names += mla
    want = {
        "attention": r"\.attn\.(q|k|v|o|q_a|q_b|kv_a|kv_b)_proj\.kernel$",
        "routed_experts": r"\.mlp\.experts\.(gate|up|down)_proj$",
        "shared_experts": r"\.mlp\.shared_expert\.(gate|up|down)_proj\.kernel$",
        "dense_mlp": r"^layers\.\d+\.mlp\.(gate|up|down)_proj\.kernel$",
    }
    for cls, rx in want.items():
        got = {n for n in names if Rule(cls).matches(n)}
        expect = {n for n in names if re.search(rx, n)}
        assert got == expect and got, cls
    for name in ("rtn-3bit", "hqq-3bit", "milo-3bit-s1", "milo-3.5bpw"):
        q = matched(preset(name), names)
        assert q == {n for n in names if any(re.search(rx, n) for rx in want.values())}, name
        left = set(names) - q
        # routers, shared-expert gate, biases, norms, embeddings, lm_head stay untouched
        assert all(re.search(r"router|shared_expert_gate|bias|norm|embed_tokens|lm_head", n)
                   for n in left), sorted(left)
        assert any("router" in n for n in left) and "lm_head.kernel" in left
        assert "layers.0.mlp.shared_expert_gate.kernel" in left
    # first match wins; a skip rule in front removes layer 0
    cfg = QuantConfig((Rule(r"^layers\.0\.", skip=True), Rule("attention", method="rtn")))
    assert matched(cfg, names) == {n for n in names if Rule("attention").matches(n)
                                   and not n.startswith("layers.0.")}
    assert set(TENSOR_CLASSES) == set(want)


# ------------------------------------------------------------------------------------ presets
def _recompute_report(qmodel, report: QuantizationReport, original):
    """Every figure of the report from the leaves of the quantized model."""
    names, values, _ = split_params(qmodel)
    onames, ovalues, _ = split_params(original)
    orig = dict(zip(onames, ovalues))
    total_w = sum(math.prod(v.shape) for v in values)
    total_b = 0
    for name, v in zip(names, values):
        leaves = jax.tree_util.tree_leaves(v)
        total_b += sum(x.size * x.dtype.itemsize for x in leaves)
    assert report.total_weights == total_w and report.total_nbytes == total_b
    assert report.bits_per_weight == pytest.approx(8 * total_b / total_w)
    qt = {n: v for n, v in zip(names, values) if isinstance(v, QuantizedTensor)}
    assert {t.path for t in report.tensors} == set(qt)
    assert {u.path for u in report.untouched} == set(names) - set(qt)
    qb = sum(leaf_nbytes(v) for v in qt.values())
    qw = sum(math.prod(v.shape) for v in qt.values())
    assert report.quantized_bits_per_weight == pytest.approx(8 * qb / qw)
    for t in report.tensors:
        w = np.asarray(orig[t.path], np.float32)
        d = w - np.asarray(qt[t.path].dequantize(jnp.float32))
        assert t.nbytes == leaf_nbytes(qt[t.path]) and t.num_weights == w.size
        assert t.mean_abs_err == pytest.approx(np.abs(d).mean(), rel=1e-4)
        assert t.rel_fro_err == pytest.approx(np.linalg.norm(d) / np.linalg.norm(w), rel=1e-4)
        assert 0 < t.rel_fro_err < 0.5
    for u in report.untouched:
        assert u.nbytes == math.prod(u.shape) * 2       # bf16 model


def test_hqq_and_rtn_presets_bits_and_report_figures():
    model = tiny_model()
    q_hqq, rep_hqq = quantize(model, "hqq-3bit")
    q_rtn, rep_rtn = quantize(model, "rtn-3bit")
    for q, rep, method in ((q_hqq, rep_hqq, "hqq"), (q_rtn, rep_rtn, "rtn")):
        assert all(t.method == method and t.bits == 3 and t.group_size == 64 and t.ranks == ()
                   for t in rep.tensors)
        # codes 3 bits + a 16-bit scale and zero per 64 weights = 3.5 bits per weight
        assert rep.quantized_bits_per_weight == pytest.approx(3.5)
        _recompute_report(q, rep, model)
    assert rep_hqq.mean_abs_err < rep_rtn.mean_abs_err       # HQQ's solver beats plain rounding
    assert not any(isinstance(v, QuantizedTensor) for v in split_params(model)[1])  # input intact


def test_milo_s1_preset_ranks_run_and_export(tmp_path):
    model = tiny_model()
    qmodel, rep = quantize(model, "milo-3bit-s1")
    names, values, _ = split_params(model)
    orig = dict(zip(names, values))
    planted = False
    for t in rep.tensors:
        assert t.method == "milo" and t.bits == 3 and t.group_size == 64
        if ".experts." in t.path:
            want = R.kurtosis_rank(R.excess_kurtosis(orig[t.path]), c=2, cap=1024)
            want = np.minimum(want, 64)
            assert t.ranks == tuple(int(r) for r in want), t.path
            planted |= len(set(t.ranks)) > 2
            # s2 (c = 3) doubles every non-zero kurtosis rank (before the cap)
            r2 = recipe_for(t.path, orig[t.path], preset("milo-3bit-s2").rule_for(t.path), 1).ranks
            assert tuple(r2) == tuple(np.minimum(np.where(want > 0, 2 * want, 0), 64))
        else:
            assert t.ranks == (64 // 8,), t.path           # hidden 64 / 8 (Mixtral: 4096 / 8 = 512)
    assert planted, "planted heavy tails should give the experts different kurtosis ranks"
    _recompute_report(qmodel, rep, model)
    # MiLo's compensators lower the error of the tensors that got a rank, vs plain HQQ
    q_hqq, rep_hqq = quantize(model, "hqq-3bit")
    for t in rep.tensors:
        h = rep_hqq.tensor(t.path)
        assert t.rel_fro_err <= h.rel_fro_err + 1e-6
        if min(t.ranks) > 0:
            assert t.rel_fro_err < 0.9 * h.rel_fro_err
    # the quantized model runs and stays close to the original; export writes its dequantized form
    ref, got = forward(model), forward(qmodel)
    err = np.abs(got - ref).mean()
    assert np.isfinite(got).all() and err < 0.4 * np.abs(ref).mean()
    assert err < np.abs(forward(q_hqq) - ref).mean()          # closer than plain HQQ end to end
    export_hf(qmodel, tmp_path / "export")
    back = load_hf(tmp_path / "export", dtype=jnp.bfloat16, progress=False)
    qvals = dict(zip(*split_params(qmodel)[:2]))
    for name, w in zip(*split_params(back)[:2]):       # export writes exactly the dequantized W
        v = qvals[name]
        want = v.dequantize(jnp.bfloat16) if isinstance(v, QuantizedTensor) else v
        assert np.array_equal(np.asarray(w), np.asarray(want)), name
    # the dense model computes nearly what the quantized one does, token by token; a token whose
    # top-2 routing flips at a near tie (x @ W_hat + (x @ u) @ v vs x @ bf16(W_hat + u v) round
    # differently) differs by O(1): at most 2 of the 24 may (transformers 5.24's init gave one)
    per_token = np.abs(forward(back) - got).mean(-1) / np.abs(got).mean()
    assert np.median(per_token) < 0.03 and (per_token > 0.05).sum() <= 2, np.round(per_token, 3)


def test_budget_preset_never_exceeds_and_beats_uniform_at_equal_bytes():
    model = tiny_model()
    uniform = QuantConfig((Rule("attention", method="milo", rank=8),
                           Rule("routed_experts", method="milo", rank=8)))
    q_u, rep_u = quantize(model, uniform)
    x = math.floor(rep_u.bits_per_weight * 1000) / 1000          # at most the uniform's bytes
    q_b, rep_b = quantize(model, f"milo-{x}bpw")
    assert rep_b.bits_per_weight <= x
    _recompute_report(q_b, rep_b, model)
    sq = lambda rep: sum(t.fro_err ** 2 for t in rep.tensors)     # noqa: E731
    assert sq(rep_b) <= sq(rep_u), (sq(rep_b), sq(rep_u))
    # a tighter budget is met too, and costs error
    q_t, rep_t = quantize(model, "milo-5.5bpw")
    assert rep_t.bits_per_weight <= 5.5 and sq(rep_t) > sq(rep_b)
    with pytest.raises(ValueError, match=r"milo-4bpw.*4\.0 bits per weight"):
        quantize(model, "milo-4bpw")                 # bf16 embeddings alone need more than that


# ------------------------------------------------------------------------------------ pytree
def test_params_pytree_in_same_structure_out():
    model = tiny_model()
    names, values, _ = split_params(model)
    params: dict = {}
    for n, v in zip(names, values):
        d = params
        *head, last = n.split(".")
        for k in head:
            d = d.setdefault(k, {})
        d[last] = v
    qp, rep = quantize(params, "rtn-3bit")
    qm, rep_m = quantize(model, "rtn-3bit")
    assert jax.tree_util.tree_structure(jax.tree_util.tree_map(lambda x: 0, params)) == \
        jax.tree_util.tree_structure(jax.tree_util.tree_map(
            lambda x: 0, qp, is_leaf=lambda x: isinstance(x, QuantizedTensor)))
    assert isinstance(qp["layers"]["0"]["mlp"]["experts"]["down_proj"], QuantizedTensor)
    assert not isinstance(qp["layers"]["0"]["mlp"]["router"]["gate"]["kernel"], QuantizedTensor)
    mvals = dict(zip(*split_params(qm)[:2]))
    leaf = qp["layers"]["1"]["attn"]["q_proj"]["kernel"]
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(leaf),
               jax.tree_util.tree_leaves(mvals["layers.1.attn.q_proj.kernel"])))
    assert rep.total_nbytes == rep_m.total_nbytes
    # HiddenFractionRank reads the width from embed_tokens.embedding
    cfg = QuantConfig((Rule(r"layers\.0\.attn\.q_proj", method="milo", rank=HiddenFractionRank(1 / 16)),))
    _, rep_h = quantize(params, cfg)
    assert rep_h.tensors[0].ranks == (4,)


def test_frequency_rank_uses_random_token_routing_counts():
    model = tiny_model()
    counts = model_routing_counts(model)
    assert set(counts) == {0, 1} and all(c.sum() == 8 * 64 * 2 for c in counts.values())
    cfg = QuantConfig((Rule("routed_experts", method="milo", rank=FrequencyRank(mean_rank=8, step=8)),))
    names, values, _ = split_params(model)
    orig = dict(zip(names, values))
    for layer in (0, 1):
        path = f"layers.{layer}.mlp.experts.up_proj"
        r = recipe_for(path, orig[path], cfg.rules[0], 0, routing_counts=counts).ranks
        assert r.sum() == 8 * 4 and np.all(r % 8 == 0)
        order = np.argsort(counts[layer], kind="stable")
        assert np.all(np.diff(r[order]) >= 0)          # more tokens, no smaller rank
    with pytest.raises(ValueError, match="FrequencyRank needs routing_counts"):
        quantize({"layers": {"0": {"mlp": {"experts": {"up_proj": orig["layers.0.mlp.experts.up_proj"]}}}}},
                 cfg)


# ------------------------------------------------------------------------------------ errors
def test_bad_input_raises_value_error_naming_it():
    model = tiny_model()
    with pytest.raises(ValueError, match="unknown preset 'milo-9bit'"):
        quantize(model, "milo-9bit")
    with pytest.raises(ValueError, match=r"bits=5 is not supported"):
        Rule("attention", bits=5)
    with pytest.raises(ValueError, match=r"unknown method 'gptq'"):
        Rule("attention", method="gptq")
    with pytest.raises(ValueError, match=r"compensator_dtype='int3'"):
        Rule("attention", method="milo", rank=8, compensator_dtype="int3")
    with pytest.raises(ValueError, match="needs method='milo'"):
        Rule("attention", method="hqq", rank=KurtosisRank())
    strict = QuantConfig((Rule("attention"), Rule(r"layers\.\d+\.mlp\.experts\.w9")))
    with pytest.raises(ValueError, match=r"rule 1 .*experts\\\\.w9.*matches no parameter"):
        quantize(model, strict, strict=True)
    with pytest.raises(ValueError, match="no rule matches any parameter"):
        quantize(model, QuantConfig((Rule("nothing_here"),)))
    with pytest.raises(ValueError, match=r"layers\.0\.attn\.q_proj\.kernel.*group size 128|"
                                         r"layers\.0\.attn\.q_proj\.kernel.*not divisible"):
        quantize(model, QuantConfig((Rule(r"layers\.0\.attn\.q_proj", group_size=128),)))
    with pytest.raises(ValueError, match=r"input_norm\.scale.*1-D"):
        quantize(model, QuantConfig((Rule(r"layers\.0\.input_norm"),)))
    qmodel, _ = quantize(model, QuantConfig((Rule(r"layers\.0\.attn\.q_proj", method="rtn"),)))
    with pytest.raises(ValueError, match="already quantized"):
        quantize(qmodel, QuantConfig((Rule(r"layers\.0\.attn\.q_proj", method="rtn"),)))
