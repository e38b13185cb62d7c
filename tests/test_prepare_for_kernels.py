"""milo_jax.prepare_for_kernels: 2-D QuantizedTensors become KernelWeights in the layout
quant_matmul's decode kernel reads, quantized routed experts GroupedKernelWeights (grouped_matmul's
layout), everything else stays; the prepared model gives the logits,
generations and perplexity of the unprepared one; idempotent; bad input is a ValueError."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from milo_jax import QuantConfig, QuantizedTensor, Rule, generate, perplexity, prepare_for_kernels, quantize
from milo_jax.models import MoECausalLM, ModelConfig
from milo_jax.models.kernel_weights import prepare_for_kernels_on_gpu
from milo_jax.models.linear import linear
from milo_jax.quant.compensator import QuantizedFactor
from milo_jax.quant.model import split_params
from milo_jax.models.kernel_weights import FusedIntoGate
from pallas_kernels.grouped_matmul.mgpu_sm90 import GroupedKernelWeights
from pallas_kernels.quant_matmul import KernelWeights
from pallas_kernels.quant_matmul.layout import LAYOUT, PAIRS_LAYOUT

# every projection N is a multiple of 64 (kernel column tile) except k_proj / v_proj (2 kv heads of
# 16: N = 32), which prepare refuses and which must stay QuantizedTensors
CFG = ModelConfig(model_type="qwen2_moe", vocab_size=64, hidden_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=64, qkv_bias=True, intermediate_size=128,
                  moe_intermediate_size=64, num_experts=4, num_experts_per_tok=2,
                  shared_expert_intermediate_size=64, shared_expert_gate=True,
                  mlp_kinds=("moe", "dense"))
QCONFIG = QuantConfig((
    Rule(r"^layers\.0\.attn\.o_proj", method="milo", rank=8, rounds=2, compensator_dtype="int8"),
    Rule(r"^layers\.1\.attn\.o_proj", method="milo", rank=8, rounds=2),
    Rule(r"^layers\.1\.mlp\.down_proj", method="rtn", bits=8),
    Rule(r"^layers\.1\.mlp\.up_proj", method="rtn", bits=4),
    Rule("attention", method="rtn"), Rule("dense_mlp", method="rtn"),
    Rule("shared_experts", method="rtn"), Rule("routed_experts", method="rtn")))
TOKENS = np.asarray(jax.random.randint(jax.random.key(3), (2, 12), 0, CFG.vocab_size))


@pytest.fixture(scope="module")
def models():
    model = MoECausalLM(CFG, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    qmodel, _ = quantize(model, QCONFIG)
    return qmodel, prepare_for_kernels(qmodel)


@pytest.fixture(scope="module")
def logits(models):
    """float32 logits [2, 12, V] of TOKENS: (unprepared, prepared)."""
    return tuple(_forward(m) for m in models)


def _same(a, b) -> bool:
    """Same pytree structure (static metadata included) and bit-identical leaves."""
    if jax.tree_util.tree_structure(a) != jax.tree_util.tree_structure(b):
        return False
    return all(np.asarray(x).dtype == np.asarray(y).dtype and np.asarray(x).tobytes() == np.asarray(y).tobytes()
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


_FWD = nnx.jit(lambda m, t: m(t).astype(jnp.float32))   # one compile per model structure and shape


def _forward(model, tokens=TOKENS):
    return np.asarray(_FWD(model, jnp.asarray(tokens)))


def test_leaves_are_kernel_weights_in_the_kernel_layout(models):
    qmodel, prepared = models
    names, before, _ = split_params(qmodel)
    pnames, after, _ = split_params(prepared)
    assert names == pnames
    seen = {"pairs": 0, "nmajor": 0, "refused": 0, "experts": 0, "fused_up": 0, "compensated": 0}
    for name, v, w in zip(names, before, after):
        if isinstance(v, QuantizedTensor) and v.ndim == 2 and v.shape[1] % 64 == 0:
            assert isinstance(w, KernelWeights), name
            assert (w.k, w.n, w.bits, w.group_size) == (*v.shape, v.bits, v.group_size), name
            want = PAIRS_LAYOUT if v.bits in (2, 3, 4) else LAYOUT
            assert w.layout == want, (name, w.layout)
            seen["pairs" if want == PAIRS_LAYOUT else "nmajor"] += 1
            if v.u is not None:
                assert w.rank == v.rank, name
                seen["compensated"] += 1
        elif isinstance(v, QuantizedTensor) and v.ndim == 3 and name.endswith("up_proj"):
            # fused into its gate_proj sibling: one grouped launch for gate and up
            assert isinstance(w, FusedIntoGate) and w.split == v.shape[2], name
            seen["fused_up"] += 1
        elif isinstance(v, QuantizedTensor) and v.ndim == 3:      # routed experts: grouped kernel layout
            assert isinstance(w, GroupedKernelWeights), name
            fused = name.endswith("gate_proj")
            assert w.shape == (v.shape[0], v.shape[1], v.shape[2] * (2 if fused else 1)), name
            assert [c.bits for c in w.classes] == [v.bits] and w.classes[0].experts == tuple(range(v.shape[0]))
            assert w.classes[0].layout == (PAIRS_LAYOUT if v.bits in (2, 3, 4) else LAYOUT), name
            seen["experts"] += 1
        else:
            assert _same(w, v), f"{name}: {type(v).__name__} should have been left as it is"
            if isinstance(v, QuantizedTensor):
                seen["refused"] += 1
        # the input model is not modified
        assert not isinstance(v, KernelWeights), name
    # q/o of 2 layers, shared gate/up/down, dense gate: 3-bit; dense up: 4-bit (pairs too); dense down: 8-bit;
    # k/v of 2 layers (N = 32) refused; stacked experts in the grouped kernel's layout: gate (fused
    # with up) and down
    assert seen == {"pairs": 9, "nmajor": 1, "refused": 4, "experts": 2, "fused_up": 1, "compensated": 2}, seen


def test_prepared_model_gives_the_same_logits(logits):
    want, got = logits
    assert np.isfinite(want).all() and np.abs(want).max() > 0
    # same math (dequantize to bf16, bf16 dots with float32 accumulation), other program: allow
    # bf16 rounding differences only
    np.testing.assert_allclose(got, want, atol=2e-2 * np.abs(want).max(), rtol=2e-2)
    assert np.mean(np.abs(got - want)) < 2e-3 * np.abs(want).max()


def test_generate_and_perplexity_on_a_prepared_model(models, logits):
    qmodel, prepared = models
    # greedy generation with the prepared model (prefill + cached decode steps) must pick, at each
    # step, the argmax of the unprepared model's logits over the same sequence (one forward pass
    # of TOKENS' shape, no second generate compile); positions whose top two logits are within
    # bf16 noise are not judged
    n_prompt, n_new = 8, TOKENS.shape[1] - 8
    got = generate(prepared, [row[:n_prompt].tolist() for row in TOKENS], max_new_tokens=n_new,
                   stop_tokens=[])
    gen = np.asarray(got.tokens)
    assert gen.shape == (2, n_new)
    seq = np.concatenate([TOKENS[:, :n_prompt], gen], axis=1)
    lg = _forward(qmodel, seq)[:, n_prompt - 1:-1]                   # predicts gen
    top2 = np.sort(lg, axis=-1)[..., -2:]
    clear = top2[..., 1] - top2[..., 0] > 2e-2 * np.abs(lg).max()
    assert clear[:, 0].all() and clear.sum() >= clear.size // 2, clear
    np.testing.assert_array_equal(np.where(clear, gen, -1), np.where(clear, lg.argmax(-1), -1))
    # the two rows of TOKENS are the two windows; the unprepared model's NLL from its logits
    lg = logits[0][:, :-1].astype(np.float64)
    lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
    target = np.take_along_axis(lg, TOKENS[:, 1:, None], axis=-1)[..., 0]
    ppl_want = float(np.exp(np.mean(lse - target)))
    result = perplexity(prepared, TOKENS.reshape(-1), window=TOKENS.shape[1], batch_size=2)
    assert result.num_windows == 2 and np.isfinite(result.ppl)
    assert abs(result.ppl - ppl_want) < 1e-2 * ppl_want, (result.ppl, ppl_want)


def test_second_call_is_a_no_op(models):
    _, prepared = models
    again = prepare_for_kernels(prepared)
    names, before, _ = split_params(prepared)
    for name, a, b in zip(names, before, split_params(again)[1]):
        assert _same(a, b), name


def test_params_dict_and_float32_activations():
    from milo_jax import quantize_tensor
    from milo_jax.quant.lowrank import quantize_lowrank

    key = jax.random.key(5)
    w = jax.random.normal(key, (128, 64), jnp.float32)
    qt3 = quantize_lowrank(w, bits=3, group_size=64, rank=4, rounds=2)
    qt8 = quantize_tensor(w, bits=8, group_size=32, method="rtn")
    narrow = quantize_tensor(w[:, :32], bits=3, group_size=64, method="rtn")
    bias = jax.random.normal(jax.random.fold_in(key, 1), (64,))
    params = {"a": {"w": qt3, "b": bias}, "c": qt8, "d": narrow, "e": (qt8, qt8)}
    out = prepare_for_kernels(params)
    assert isinstance(out["a"]["w"], KernelWeights) and out["a"]["w"].layout == PAIRS_LAYOUT
    assert isinstance(out["c"], KernelWeights) and out["c"].layout == LAYOUT
    assert out["a"]["b"] is bias and out["d"] is narrow
    assert isinstance(params["c"], QuantizedTensor)          # input untouched
    # a per-expert tuple of QuantizedTensors: routed experts in the grouped kernel layout, same product
    from pallas_kernels.grouped_matmul.api import grouped_matmul
    assert isinstance(out["e"], GroupedKernelWeights) and out["e"].shape == (2, 128, 64)
    assert isinstance(params["e"], tuple)
    xs = jax.random.normal(jax.random.fold_in(key, 3), (5, 128), jnp.float32).astype(jnp.bfloat16)
    gs = jnp.asarray([2, 3], jnp.int32)
    want = np.asarray(grouped_matmul(xs, list(params["e"]), gs).astype(jnp.float32))
    got = np.asarray(grouped_matmul(xs, out["e"], gs).astype(jnp.float32))
    np.testing.assert_allclose(got, want, atol=2e-2 * np.abs(want).max(), rtol=2e-2)
    # float32 activations keep the exact float32 product of the unprepared weight
    x = jax.random.normal(jax.random.fold_in(key, 2), (3, 128), jnp.float32)
    for qt, kw in ((qt3, out["a"]["w"]), (qt8, out["c"])):
        want = np.asarray(linear(x, qt), np.float64)
        got = np.asarray(linear(x, kw), np.float64)
        assert got.dtype == want.dtype
        # v is stored in bf16 by prepare: only the compensator term may move, and only a little
        np.testing.assert_allclose(got, want, atol=1e-3 * np.abs(want).max(), rtol=1e-3)
    # bf16 activations: the quant_matmul reference path on CPU, same answer as the QuantizedTensor
    xb = x.astype(jnp.bfloat16)
    want = np.asarray(linear(xb, qt3).astype(jnp.float32))
    got = np.asarray(linear(xb, out["a"]["w"]).astype(jnp.float32))
    np.testing.assert_allclose(got, want, atol=2e-2 * np.abs(want).max(), rtol=2e-2)


def test_quantized_factor_compensator_is_kept(models):
    qmodel, prepared = models
    names, before, _ = split_params(qmodel)
    after = dict(zip(names, split_params(prepared)[1]))
    kw = after["layers.0.attn.o_proj.kernel"]
    assert isinstance(kw, KernelWeights) and isinstance(kw.u, QuantizedFactor) and kw.rank == 8


def test_on_gpu_variant_is_the_identity_on_cpu(models):
    qmodel, _ = models
    if jax.devices()[0].platform != "cpu":
        pytest.skip("CPU-only check")
    assert prepare_for_kernels_on_gpu(qmodel) is qmodel


@pytest.mark.parametrize("bad", [3, [1, 2], "model"])
def test_bad_input_is_a_value_error(bad):
    with pytest.raises(ValueError, match="prepare_for_kernels: expected a milo_jax model"):
        prepare_for_kernels(bad)


def test_single_tensor_or_state_is_a_value_error(models):
    qmodel, _ = models
    from milo_jax import quantize_tensor
    qt = quantize_tensor(jax.random.normal(jax.random.key(6), (64, 64)), bits=3, group_size=64,
                         method="rtn")
    with pytest.raises(ValueError, match="single QuantizedTensor"):
        prepare_for_kernels(qt)
    with pytest.raises(ValueError, match="nnx.State"):
        prepare_for_kernels(nnx.state(qmodel))
    with pytest.raises(ValueError, match="not a string"):
        prepare_for_kernels({1: qt})


def test_saving_a_prepared_model_is_refused(tmp_path):
    """checkpoint.encode_value names the problem instead of failing inside orbax."""
    from milo_jax.checkpoint import encode_value
    from milo_jax.quant import quantize_tensor
    from pallas_kernels.quant_matmul import layout

    w = jax.random.normal(jax.random.key(3), (128, 64), jnp.float32).astype(jnp.bfloat16)
    kw = layout.prepare(quantize_tensor(w, bits=4, group_size=64))
    with pytest.raises(ValueError, match="save the model before preparing"):
        encode_value(kw, {})
    from pallas_kernels.grouped_matmul.mgpu_sm90 import prepare_grouped
    gkw = prepare_grouped([quantize_tensor(w, bits=3, group_size=64)] * 2)
    with pytest.raises(ValueError, match="GroupedKernelWeights leaves"):
        encode_value(gkw, {})
