"""DeepSeek-V2 / DeepSeek-V3 parity with transformers (PyTorch, CPU) on tiny random checkpoints.

Each case writes a random transformers model with save_pretrained, loads it with converters.hf,
and checks float32 logits over a batch (max abs diff <= 1e-4) and 20 greedy tokens decoded with
the latent KV cache (torch side: full recompute, no cache).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import milo_jax  # noqa: E402,F401  (import order: milo_jax imports converters.hf)
from converters.errors import CheckpointError  # noqa: E402
from converters.hf import load_hf  # noqa: E402

VOCAB = 128
BASE = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=64, moe_intermediate_size=16,
            num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4,
            num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
            v_head_dim=12, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False)
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32,
        "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 1.0}

CASES = {
    # V3 layout: q_lora, YaRN with mscale != mscale_all_dim (cos/sin and softmax scale both move),
    # interleaved rope, sigmoid + bias routing over 2 groups keeping 1, normalised, scaled.
    "v3_yarn": ("v3", dict(q_lora_rank=24, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
                           topk_group=1, n_shared_experts=1, norm_topk_prob=True,
                           routed_scaling_factor=2.5, rope_scaling=YARN, rope_interleave=True)),
    # V3 without q_lora, half-split rope, 4 groups keep 2, top-3, not normalised.
    "v3_plain": ("v3", dict(q_lora_rank=None, n_routed_experts=8, num_experts_per_tok=3, n_group=4,
                            topk_group=2, n_shared_experts=2, norm_topk_prob=False,
                            routed_scaling_factor=1.0, rope_interleave=False)),
    # V2-Lite layout: no q_lora, greedy softmax top-k, YaRN, 2 shared experts.
    "v2_greedy_yarn": ("v2", dict(q_lora_rank=None, n_routed_experts=8, num_experts_per_tok=2,
                                  n_shared_experts=2, topk_method="greedy",
                                  routed_scaling_factor=1.0,
                                  rope_scaling=dict(YARN, mscale=1.0))),
    # V2 layout: q_lora, group_limited_greedy, scaled; attention_bias (q_a, kv_a and o biases).
    "v2_group": ("v2", dict(q_lora_rank=24, n_routed_experts=8, num_experts_per_tok=3, n_group=4,
                            topk_group=2, n_shared_experts=1, topk_method="group_limited_greedy",
                            routed_scaling_factor=16.0, attention_bias=True)),
}


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """The tiny torch models run ~30x faster single-threaded on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def jax_logits(model, tokens: np.ndarray) -> np.ndarray:
    """model(tokens) without a cache, jitted (compiling is faster than running op by op)."""
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda st, t: nnx.merge(graphdef, st)(t))
    return np.asarray(fwd(state, jnp.asarray(tokens)))


def _torch_model(version: str, overrides: dict, seed: int = 0):
    if version == "v3":
        cfg = transformers.DeepseekV3Config(**BASE, **overrides)
        model = transformers.DeepseekV3ForCausalLM(cfg)
    else:
        cfg = transformers.DeepseekV2Config(**BASE, **overrides)
        model = transformers.DeepseekV2ForCausalLM(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:   # RMSNorm scales around 1, not exactly 1
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
    return model.eval()


def _torch_greedy(model, tokens: np.ndarray, steps: int) -> np.ndarray:
    seq = torch.as_tensor(tokens)
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    return seq[:, tokens.shape[1]:].numpy()


def jax_greedy(model, tokens: np.ndarray, steps: int) -> np.ndarray:
    """Greedy decoding of equal-length prompts through the KV cache (the parity tests' ragged
    decoder with every row at full length)."""
    from tests.test_models_hf_parity import jax_greedy as ragged_greedy

    return ragged_greedy(model, tokens, [tokens.shape[1]] * tokens.shape[0], steps)


@pytest.mark.parametrize("case", sorted(CASES))
def test_deepseek_parity_with_transformers(case, tmp_path):
    version, overrides = CASES[case]
    tm = _torch_model(version, overrides)
    tm.save_pretrained(tmp_path)
    model = load_hf(str(tmp_path), dtype=jnp.float32, progress=False)
    assert model.config.attention_kind == "mla"
    assert model.config.mlp_kinds == ("dense", "moe", "moe")

    rng = np.random.default_rng(1)
    tokens = rng.integers(0, VOCAB, size=(3, 10))
    with torch.no_grad():
        ref = tm(torch.as_tensor(tokens)).logits.numpy()
    got = jax_logits(model, tokens)
    assert got.dtype == np.float32 and got.shape == ref.shape
    err = np.abs(got - ref).max()
    assert err <= 1e-4, f"{case}: logits differ by {err} (scale {np.abs(ref).max()})"

    prompt = tokens[:, :6]
    ref_tokens = _torch_greedy(tm, prompt, 20)
    got_tokens = jax_greedy(model, prompt, 20)
    np.testing.assert_array_equal(got_tokens, ref_tokens)


def _write_config(tmp_path, version, overrides, edit):
    tm = _torch_model(version, overrides)
    tm.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    hf = json.loads(path.read_text())
    edit(hf)
    path.write_text(json.dumps(hf))
    return tmp_path


@pytest.mark.parametrize("edit, match", [
    (lambda hf: hf.update(some_new_knob=3), "some_new_knob"),
    (lambda hf: hf.update(norm_topk_prob=True), "norm_topk_prob"),
    (lambda hf: hf.update(topk_method="noaux_tc"), "topk_method"),
    (lambda hf: hf.update(scoring_func="sigmoid"), "scoring_func"),
    (lambda hf: hf.update(quantization_config={"quant_method": "fp8"}), "quantization_config"),
    (lambda hf: hf.update(num_key_value_heads=2), "num_key_value_heads"),
    (lambda hf: hf.update(rope_parameters={"rope_type": "linear", "factor": 2.0}), "linear"),
    (lambda hf: hf.update(rope_parameters=dict(YARN, rope_theta=10000.0, wobble=1)), "wobble"),
    (lambda hf: hf.update(mlp_bias=True), "mlp_bias"),
], ids=["unknown", "v2_norm", "v2_method", "v2_scoring", "quantized", "kv_heads", "rope_linear",
        "rope_key", "mlp_bias"])
def test_deepseek_v2_config_refused(tmp_path, edit, match):
    path = _write_config(tmp_path, "v2", CASES["v2_group"][1], edit)
    with pytest.raises(CheckpointError, match=match):
        load_hf(str(path), progress=False)


@pytest.mark.parametrize("edit, match", [
    (lambda hf: hf.update(n_group=3), "n_group"),
    (lambda hf: hf.update(topk_method="greedy"), "topk_method"),
    (lambda hf: hf.update(scoring_func="softmax"), "scoring_func"),
    (lambda hf: hf.update(qk_head_dim=99), "qk_head_dim"),
], ids=["groups", "method", "scoring", "qk_head_dim"])
def test_deepseek_v3_config_refused(tmp_path, edit, match):
    path = _write_config(tmp_path, "v3", CASES["v3_yarn"][1], edit)
    with pytest.raises(CheckpointError, match=match):
        load_hf(str(path), progress=False)


def test_deepseek_v3_mtp_layer_skipped_and_export_roundtrip(tmp_path):
    """V3 checkpoints carry multi-token-prediction layer(s) at index num_hidden_layers: they are
    dropped on load. Export writes a checkpoint transformers reads back with the same logits."""
    from safetensors.numpy import load_file, save_file

    from converters.export import export_hf

    src = tmp_path / "src"
    tm = _torch_model("v3", CASES["v3_yarn"][1])
    tm.save_pretrained(src)
    sd = load_file(str(src / "model.safetensors"))
    for k in [k for k in sd if k.startswith("model.layers.2.")]:
        sd[k.replace("model.layers.2.", "model.layers.3.")] = sd[k]
    sd["model.layers.3.eh_proj.weight"] = np.ones((48, 96), np.float32)
    sd["model.layers.3.enorm.weight"] = np.ones((48,), np.float32)
    save_file(sd, str(src / "model.safetensors"))
    model = load_hf(str(src), progress=False)

    tokens = np.random.default_rng(2).integers(0, VOCAB, size=(2, 7))
    got = jax_logits(model, tokens)
    out = export_hf(model, str(tmp_path / "exported"))
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = tm(torch.as_tensor(tokens)).logits.numpy()
        ref_back = back(torch.as_tensor(tokens)).logits.numpy()
    assert np.abs(got - ref).max() <= 1e-4
    assert np.abs(ref_back - ref).max() <= 1e-5


def test_mla_quantized_kv_b_absorb_matches_expand(tmp_path):
    """With kv_b_proj a QuantizedTensor, the absorbed (decode) and expanded (prefill) MLA paths
    agree, with and without a cache, and differ from the unquantized output (so it is used)."""
    import dataclasses

    from milo_jax.models import mla

    tm = _torch_model("v3", CASES["v3_yarn"][1])
    tm.save_pretrained(tmp_path)
    model = load_hf(str(tmp_path), progress=False)
    attn = model.layers[1].attn
    x = jnp.asarray(np.random.default_rng(5).standard_normal((2, 5, 48)), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(5, dtype=jnp.int32), (2, 5))
    dense_out, _ = jax.jit(lambda x, pos: mla.mla_attention(attn._params(), x, pos, attn.spec))(x, pos)
    w = attn.kv_b_proj.kernel.get_value()
    attn.kv_b_proj.kernel.set_value(__import__("milo_jax").quantize_tensor(w, bits=4, group_size=None))
    params = attn._params()
    outs = {}
    for absorb in ("never", "always"):
        spec = dataclasses.replace(attn.spec, absorb=absorb)
        run = jax.jit(lambda p, x, pos, c, spec=spec: mla.mla_attention(p, x, pos, spec, c))
        outs[absorb], _ = run(params, x, pos, None)
        cache = mla.init_mla_cache(spec, 2, 8)
        cached, cache = run(params, x[:, :3], pos[:, :3], cache)
        step, _ = run(params, x[:, 3:], pos[:, 3:], cache)
        np.testing.assert_allclose(np.concatenate([cached, step], 1), outs[absorb], atol=2e-5)
    np.testing.assert_allclose(outs["always"], outs["never"], atol=2e-5)
    # RoPE (YaRN included) is relative: shifting every position leaves the output unchanged
    shifted, _ = run(params, x, pos + 7, None)
    np.testing.assert_allclose(shifted, outs["always"], atol=2e-5)
    assert np.abs(np.asarray(outs["never"]) - np.asarray(dense_out)).max() > 1e-4


def test_deepseek_v2_generate_ragged_prompts(tmp_path):
    """milo_jax.generate (right-padded batch, latent cache donated across jit steps) gives each
    prompt the same greedy tokens as transformers on that prompt alone."""
    from milo_jax import generate

    tm = _torch_model("v2", CASES["v2_group"][1])
    tm.save_pretrained(tmp_path)
    model = load_hf(str(tmp_path), progress=False)
    rng = np.random.default_rng(7)
    prompts = [rng.integers(0, VOCAB, size=n).tolist() for n in (3, 8, 5)]
    res = generate(model, prompts, max_new_tokens=12, stop_tokens=[])
    for p, got in zip(prompts, res.tokens):
        np.testing.assert_array_equal(got, _torch_greedy(tm, np.asarray([p]), 12)[0])


def test_deepseek_v3_bfloat16_load_runs_close(tmp_path):
    """bf16 load: weights bf16, the routing bias stays float32 (as in transformers), logits stay
    close to the float32 reference and the cached decode runs."""
    tm = _torch_model("v3", CASES["v3_yarn"][1])
    tm.save_pretrained(tmp_path)
    m16 = load_hf(str(tmp_path), dtype=jnp.bfloat16, progress=False)
    router = m16.layers[1].mlp.router
    assert router.e_score_correction_bias.get_value().dtype == jnp.float32
    assert m16.layers[1].attn.kv_b_proj.kernel.get_value().dtype == jnp.bfloat16
    tokens = np.random.default_rng(6).integers(0, VOCAB, size=(2, 8))
    with torch.no_grad():
        l32 = tm(torch.as_tensor(tokens)).logits.numpy()
    l16 = jax_logits(m16, tokens)
    assert l16.dtype == np.float32 and np.isfinite(l16).all()
    # transformers' own bf16 model is off by ~6% (mean abs) on this random model; allow 10%
    assert np.abs(l16 - l32).mean() < 0.10 * np.abs(l32).mean()
    assert jax_greedy(m16, tokens[:, :4], 4).shape == (2, 4)


def _fp8_block_quantize(w: np.ndarray, block):
    """float32 [out, in] -> (float8_e4m3fn [out, in], float32 scale_inv [ceil(out/bm), ceil(in/bn)])."""
    import ml_dtypes

    bm, bn = block
    o, i = w.shape
    so, si = -(-o // bm), -(-i // bn)
    padded = np.zeros((so * bm, si * bn), np.float32)
    padded[:o, :i] = w
    amax = np.abs(padded.reshape(so, bm, si, bn)).max(axis=(1, 3))
    scale = np.maximum(amax, 1e-12) / 448.0
    q = (w / np.repeat(np.repeat(scale, bm, 0), bn, 1)[:o, :i]).astype(ml_dtypes.float8_e4m3fn)
    return q, scale.astype(np.float32)


def test_deepseek_v3_fp8_checkpoint_dequantized(tmp_path):
    """An FP8 block-quantized V3 checkpoint (two shards, one scale stored away from its weight) is
    refused by load_hf, converted by dequantize_fp8_checkpoint, and then matches transformers
    running the same dequantized weights."""
    from safetensors.numpy import load_file

    from converters.arch_deepseek import dequantize_fp8_block, dequantize_fp8_checkpoint
    from converters.safetensors_io import write_safetensors

    block = (16, 16)
    tm = _torch_model("v3", CASES["v3_yarn"][1])
    tm.save_pretrained(tmp_path / "orig")
    sd = load_file(str(tmp_path / "orig" / "model.safetensors"))
    fp8 = {}
    for k, v in sd.items():
        quantize = (k.endswith("_proj.weight") or k.endswith("kv_a_proj_with_mqa.weight"))
        if quantize:
            q, s = _fp8_block_quantize(v, block)
            fp8[k], fp8[k + "_scale_inv"] = q, s
            sd[k] = dequantize_fp8_block(q, s, block)   # what the converted checkpoint will hold
        else:
            fp8[k] = v
    # the torch reference: the same dequantized weights, read back by transformers
    from safetensors.numpy import save_file
    save_file(sd, str(tmp_path / "orig" / "model.safetensors"))
    tm = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "orig"),
                                                           dtype=torch.float32).eval()

    src = tmp_path / "fp8"
    src.mkdir()
    keys = sorted(fp8)
    moved = "model.layers.1.self_attn.kv_b_proj.weight_scale_inv"
    shard1 = {k: fp8[k] for k in keys if k.startswith("model.layers.1.") and k != moved}
    shard2 = {k: fp8[k] for k in keys if k not in shard1}
    weight_map = {}
    for name, part in (("model-00001-of-00002.safetensors", shard1),
                       ("model-00002-of-00002.safetensors", shard2)):
        write_safetensors(str(src / name), part)
        weight_map.update({k: name for k in part})
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    hf = json.loads((tmp_path / "orig" / "config.json").read_text())
    hf["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3",
                                 "quant_method": "fp8", "weight_block_size": list(block)}
    (src / "config.json").write_text(json.dumps(hf))

    with pytest.raises(CheckpointError, match="dequantize_fp8_checkpoint"):
        load_hf(str(src), progress=False)
    dst = dequantize_fp8_checkpoint(str(src), str(tmp_path / "deq"), dtype="float32")
    model = load_hf(dst, progress=False)
    tokens = np.random.default_rng(8).integers(0, VOCAB, size=(2, 7))
    with torch.no_grad():
        ref = tm(torch.as_tensor(tokens)).logits.numpy()
    assert np.abs(jax_logits(model, tokens) - ref).max() <= 1e-4
    # bf16 output (the default) holds the same weights up to bf16 rounding
    dst16 = dequantize_fp8_checkpoint(str(src), str(tmp_path / "deq16"))
    w16 = load_file(str(tmp_path / "deq16" / "model-00001-of-00002.safetensors"))
    k = "model.layers.1.self_attn.kv_b_proj.weight"
    np.testing.assert_allclose(w16[k].astype(np.float32), sd[k], rtol=1e-2, atol=1e-6)
    assert json.loads((tmp_path / "deq16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert "quantization_config" not in json.loads((tmp_path / "deq16" / "config.json").read_text())
    assert dst16


def test_deepseek_v3_quantize_model_mla_projections(tmp_path):
    """quantize_model with MLA_QUANT_INCLUDE quantizes every MLA projection and the routed
    experts (not the router or its bias), and the quantized model stays close."""
    from milo_jax.models.mla import MLA_QUANT_INCLUDE
    from milo_jax.quant.apply import quantize_model

    tm = _torch_model("v3", CASES["v3_yarn"][1])
    tm.save_pretrained(tmp_path)
    model = load_hf(str(tmp_path), progress=False)
    # 8 bits: this random model's sharp attention amplifies weight error (4-bit RTN moves the
    # logits by ~60%, linearly in the step size), so "close" is only testable at 8 bits
    qmodel, report = quantize_model(model, bits=8, group_size=None, method="rtn",
                                    include=MLA_QUANT_INCLUDE)
    names = {t.path for t in report.tensors}
    for p in ("q_a_proj", "q_b_proj", "kv_a_proj", "kv_b_proj", "o_proj"):
        assert f"layers.1.attn.{p}.kernel" in names
    assert "layers.1.mlp.experts.down_proj" in names
    assert not any("router" in n or "shared_expert" in n for n in names)
    tokens = np.random.default_rng(9).integers(0, VOCAB, size=(2, 6))
    with torch.no_grad():
        ref = tm(torch.as_tensor(tokens)).logits.numpy()
    got = jax_logits(qmodel, tokens)
    rel = np.abs(got - ref).mean() / np.abs(ref).mean()
    assert 0 < rel < 0.1
