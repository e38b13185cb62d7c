"""DeepSeek-MoE (model_type "deepseek", e.g. deepseek-moe-16b) against a float64 torch reference.

The architecture ships as remote code (modeling_deepseek.py), not in transformers, so the reference
below is written from that file's semantics:
  * Llama attention: q/k/v/o projections, GQA (repeat_kv), rotate_half RoPE with default
    frequencies, causal softmax(q k^T / sqrt(head_dim)).
  * DeepseekMoE: MoEGate logits = x @ W_gate^T, scores = softmax, top-k, renormalised only when
    top_k > 1 and norm_topk_prob; y = sum_k w_k * expert_k(x) + shared_experts(x), with
    shared_experts a SwiGLU MLP of width moe_intermediate_size * n_shared_experts.
  * layer i is MoE iff n_routed_experts is set, i >= first_k_dense_replace and
    i % moe_layer_freq == 0; otherwise a dense SwiGLU MLP of width intermediate_size.
Weights are written as safetensors with a config.json and read back with converters.hf.load_hf.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import milo_jax  # noqa: E402,F401  (import order: milo_jax imports converters.hf)
from converters.errors import CheckpointError  # noqa: E402
from converters.hf import load_hf  # noqa: E402
from milo_jax.quant.tensor import QuantizedTensor  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402
from tests.test_models_deepseek import _one_torch_thread, jax_greedy, jax_logits  # noqa: E402,F401

VOCAB = 160


def _config(**over):
    cfg = {
        "architectures": ["DeepseekForCausalLM"], "model_type": "deepseek",
        "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekConfig"},
        "vocab_size": VOCAB, "hidden_size": 48, "intermediate_size": 80,
        "moe_intermediate_size": 16, "num_hidden_layers": 3, "num_attention_heads": 4,
        "num_key_value_heads": 2, "n_shared_experts": 2, "n_routed_experts": 8,
        "num_experts_per_tok": 3, "moe_layer_freq": 1, "first_k_dense_replace": 1,
        "norm_topk_prob": False, "scoring_func": "softmax", "aux_loss_alpha": 0.001,
        "seq_aux": True, "hidden_act": "silu", "max_position_embeddings": 4096,
        "initializer_range": 0.02, "rms_norm_eps": 1e-6, "use_cache": True,
        "bos_token_id": 100000, "eos_token_id": 100001, "pretraining_tp": 1,
        "tie_word_embeddings": False, "rope_theta": 10000.0, "rope_scaling": None,
        "attention_bias": False, "attention_dropout": 0.0, "torch_dtype": "float32",
    }
    cfg.update(over)
    return cfg


def _is_moe(cfg, i):
    return (cfg["n_routed_experts"] is not None and i >= cfg["first_k_dense_replace"]
            and i % cfg["moe_layer_freq"] == 0)


def _random_weights(cfg, seed=0):
    rng = np.random.default_rng(seed)
    H, nh, kvh = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = H // nh
    w = lambda *s: (0.3 * rng.standard_normal(s)).astype(np.float32)  # noqa: E731
    norm = lambda n: (1 + 0.1 * rng.standard_normal(n)).astype(np.float32)  # noqa: E731
    sd = {"model.embed_tokens.weight": w(VOCAB, H), "model.norm.weight": norm(H),
          "lm_head.weight": w(VOCAB, H)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = norm(H)
        sd[p + "post_attention_layernorm.weight"] = norm(H)
        sd[p + "self_attn.q_proj.weight"] = w(nh * hd, H)
        sd[p + "self_attn.k_proj.weight"] = w(kvh * hd, H)
        sd[p + "self_attn.v_proj.weight"] = w(kvh * hd, H)
        sd[p + "self_attn.o_proj.weight"] = w(H, nh * hd)
        if _is_moe(cfg, i):
            I = cfg["moe_intermediate_size"]
            sd[p + "mlp.gate.weight"] = w(cfg["n_routed_experts"], H)
            for e in range(cfg["n_routed_experts"]):
                sd[p + f"mlp.experts.{e}.gate_proj.weight"] = w(I, H)
                sd[p + f"mlp.experts.{e}.up_proj.weight"] = w(I, H)
                sd[p + f"mlp.experts.{e}.down_proj.weight"] = w(H, I)
            Is = I * cfg["n_shared_experts"]
            sd[p + "mlp.shared_experts.gate_proj.weight"] = w(Is, H)
            sd[p + "mlp.shared_experts.up_proj.weight"] = w(Is, H)
            sd[p + "mlp.shared_experts.down_proj.weight"] = w(H, Is)
        else:
            I = cfg["intermediate_size"]
            sd[p + "mlp.gate_proj.weight"] = w(I, H)
            sd[p + "mlp.up_proj.weight"] = w(I, H)
            sd[p + "mlp.down_proj.weight"] = w(H, I)
    return sd


# ------------------------------------------------------------------ float64 torch reference
def _rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _mlp(x, sd, p):
    g = x @ sd[p + "gate_proj.weight"].T
    u = x @ sd[p + "up_proj.weight"].T
    return (torch.nn.functional.silu(g) * u) @ sd[p + "down_proj.weight"].T


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def reference_logits(sd_np, cfg, tokens):
    """float64 forward of DeepseekForCausalLM (no cache); tokens [B, S] -> logits [B, S, V]."""
    sd = {k: torch.as_tensor(v, dtype=torch.float64) for k, v in sd_np.items()}
    H, nh, kvh = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd, eps, k = H // nh, cfg["rms_norm_eps"], cfg["num_experts_per_tok"]
    tok = torch.as_tensor(tokens)
    B, S = tok.shape
    inv_freq = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    freqs = torch.outer(torch.arange(S, dtype=torch.float64), inv_freq)
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos()[None, None], emb.sin()[None, None]
    causal = torch.full((S, S), float("-inf"), dtype=torch.float64).triu(1)
    h = sd["model.embed_tokens.weight"][tok]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        x = _rms(h, sd[p + "input_layernorm.weight"], eps)
        q = (x @ sd[p + "self_attn.q_proj.weight"].T).view(B, S, nh, hd).transpose(1, 2)
        kk = (x @ sd[p + "self_attn.k_proj.weight"].T).view(B, S, kvh, hd).transpose(1, 2)
        v = (x @ sd[p + "self_attn.v_proj.weight"].T).view(B, S, kvh, hd).transpose(1, 2)
        q, kk = q * cos + _rotate_half(q) * sin, kk * cos + _rotate_half(kk) * sin
        kk = kk.repeat_interleave(nh // kvh, dim=1)
        v = v.repeat_interleave(nh // kvh, dim=1)
        att = torch.softmax(q @ kk.transpose(2, 3) / hd ** 0.5 + causal, dim=-1)
        o = (att @ v).transpose(1, 2).reshape(B, S, nh * hd)
        h = h + o @ sd[p + "self_attn.o_proj.weight"].T
        x = _rms(h, sd[p + "post_attention_layernorm.weight"], eps)
        if _is_moe(cfg, i):
            flat = x.reshape(-1, H)
            scores = torch.softmax(flat @ sd[p + "mlp.gate.weight"].T, dim=-1)
            topw, topi = torch.topk(scores, k, dim=-1)
            if k > 1 and cfg["norm_topk_prob"]:
                topw = topw / (topw.sum(-1, keepdim=True) + 1e-20)
            # every expert on every token, weighted by the (zero outside the top-k) gate
            combine = torch.zeros_like(scores).scatter(1, topi, topw)           # [T, E]
            outs = torch.stack([_mlp(flat, sd, p + f"mlp.experts.{e}.")
                                for e in range(cfg["n_routed_experts"])], 1)   # [T, E, H]
            y = (combine[..., None] * outs).sum(1)
            y = y + _mlp(flat, sd, p + "mlp.shared_experts.")
            h = h + y.view(B, S, H)
        else:
            h = h + _mlp(x, sd, p + "mlp.")
    h = _rms(h, sd["model.norm.weight"], eps)
    return (h @ sd["lm_head.weight"].T).numpy()


def reference_greedy(sd, cfg, prompt, steps):
    seq = np.asarray(prompt)
    for _ in range(steps):
        nxt = reference_logits(sd, cfg, seq)[:, -1].argmax(-1)
        seq = np.concatenate([seq, nxt[:, None]], 1)
    return seq[:, prompt.shape[1]:]


def _write(tmp_path, cfg, sd):
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return str(tmp_path)


@pytest.mark.parametrize("over", [
    dict(),                                                   # deepseek-moe-16b layout
    dict(moe_layer_freq=2, norm_topk_prob=True, num_experts_per_tok=2, n_shared_experts=1),
], ids=["moe16b_layout", "freq2_norm"])
def test_deepseek_v1_parity(tmp_path, over):
    cfg = _config(**over)
    sd = _random_weights(cfg)
    model = load_hf(_write(tmp_path, cfg, sd), progress=False)
    kinds = tuple("moe" if _is_moe(cfg, i) else "dense" for i in range(cfg["num_hidden_layers"]))
    assert model.config.mlp_kinds == kinds and model.config.attention_kind == "gqa"

    tokens = np.random.default_rng(3).integers(0, VOCAB, size=(3, 9))
    ref = reference_logits(sd, cfg, tokens)
    got = jax_logits(model, tokens)
    err = np.abs(got - ref).max()
    assert err <= 1e-4, f"logits differ by {err} (scale {np.abs(ref).max()})"

    prompt = tokens[:, :5]
    np.testing.assert_array_equal(jax_greedy(model, prompt, 20), reference_greedy(sd, cfg, prompt, 20))


def test_deepseek_v1_quantized_experts_run(tmp_path):
    """A QuantizedTensor in the stacked experts goes through linear.py: the output moves by the
    quantization error only (3-bit HQQ of random weights: not exact, but close)."""
    cfg = _config()
    sd = _random_weights(cfg)
    model = load_hf(_write(tmp_path, cfg, sd), progress=False)
    tokens = np.random.default_rng(4).integers(0, VOCAB, size=(2, 6))
    before = jax_logits(model, tokens)
    experts = model.layers[1].mlp.experts
    w = experts.up_proj.get_value()
    experts.up_proj.set_value(milo_jax.quantize_tensor(w, bits=4, group_size=None))
    assert isinstance(experts.up_proj.get_value(), QuantizedTensor)
    after = jax_logits(model, tokens)
    rel = np.abs(after - before).max() / np.abs(before).max()
    assert 0 < rel < 0.3


@pytest.mark.parametrize("over, match", [
    (dict(scoring_func="sigmoid"), "scoring_func"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(moe_layer_freq=0), "moe_layer_freq"),
    (dict(kv_lora_rank=16), "kv_lora_rank"),
], ids=["scoring", "rope_scaling", "act", "freq0", "mla_field"])
def test_deepseek_v1_config_refused(tmp_path, over, match):
    cfg = _config(**over)
    sd = _random_weights(_config())
    with pytest.raises(CheckpointError, match=match):
        load_hf(_write(tmp_path, cfg, sd), progress=False)


def test_deepseek_v1_missing_expert_refused(tmp_path):
    cfg = _config()
    sd = _random_weights(cfg)
    del sd["model.layers.2.mlp.experts.5.down_proj.weight"]
    with pytest.raises(CheckpointError, match="experts"):
        load_hf(_write(tmp_path, cfg, sd), progress=False)
