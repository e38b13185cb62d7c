"""Mixtral, Qwen2-MoE (and Qwen1.5-MoE), Qwen3-MoE and OLMoE: config parsing and key maps.

Semantics follow transformers' modeling_{mixtral,qwen2_moe,qwen3_moe,olmoe}.py (v5):
  Mixtral    softmax top-k, always renormalised; optional sliding window on every layer.
  Qwen2-MoE  softmax top-k (renormalised iff norm_topk_prob), shared expert scaled by
             sigmoid(x @ shared_expert_gate), qkv bias, dense layers via mlp_only_layers /
             decoder_sparse_step.
  Qwen3-MoE  like Qwen2-MoE without shared expert; q/k RMSNorm over head_dim; attention_bias on
             q, k, v and o.
  OLMoE      q/k RMSNorm over the whole projection (before the head split), optional clip_qkv,
             attention_bias on q, k, v and o.
"""

from __future__ import annotations

from converters.registry import (HF_LAYER, OUR_LAYER, ArchSpec, ConfigReader, KeyRule,
                                 decoder_rules, parse_rope, register_arch)
from milo_jax.models.config import ModelConfig

L, T = HF_LAYER, OUR_LAYER


def _common_rules(qkv_bias: bool, o_bias: bool, qk_norm: bool):
    rules = decoder_rules()
    for p in ("q", "k", "v", "o"):
        rules.append(KeyRule(L + f"self_attn.{p}_proj.weight", T + f"attn.{p}_proj.kernel", "linear"))
    # biases are mapped whenever present; a bias the config did not ask for has no target and is
    # reported as unexpected
    for p in ("q", "k", "v", "o"):
        rules.append(KeyRule(L + f"self_attn.{p}_proj.bias", T + f"attn.{p}_proj.bias", "copy"))
    for p in ("q", "k"):
        rules.append(KeyRule(L + f"self_attn.{p}_norm.weight", T + f"attn.{p}_norm.scale", "copy"))
    return rules


def _dense_mlp_rules():
    return [KeyRule(L + f"mlp.{p}.weight", T + f"mlp.{p}.kernel", "linear")
            for p in ("gate_proj", "up_proj", "down_proj")]


def _expert_rules(block: str, names: dict):
    """names: our expert param -> HF per-expert linear name (w1/w3/w2 or gate_proj/...)."""
    rules = [KeyRule(L + f"{block}.gate.weight", T + "mlp.router.gate.kernel", "linear")]
    for ours, theirs in names.items():
        rules.append(KeyRule(L + f"{block}.experts.{{e}}.{theirs}.weight", T + f"mlp.experts.{ours}",
                             "expert"))
    # transformers >= 5 in-memory layout (fused, stacked), accepted when loading
    rules += [
        KeyRule(L + "mlp.gate.weight", T + "mlp.router.gate.kernel", "linear", export=False),
        KeyRule(L + "mlp.experts.gate_up_proj", T + "mlp.experts", "experts_gate_up", export=False),
        KeyRule(L + "mlp.experts.down_proj", T + "mlp.experts.down_proj", "experts", export=False),
    ]
    return rules


IGNORE = (r"rotary_emb\.inv_freq$",)
QWEN_EXPERTS = {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"}


def _base(r: ConfigReader, model_type: str, *, eps_default: float, theta_default: float,
          bos=None, eos=None, pad=None):
    hidden = int(r.require("hidden_size"))
    heads = int(r.require("num_attention_heads"))
    theta, scaling = parse_rope(r, theta_default)
    r.expect("hidden_act", ["silu"], "silu")
    return dict(
        model_type=model_type,
        vocab_size=int(r.require("vocab_size")),
        hidden_size=hidden,
        num_hidden_layers=int(r.require("num_hidden_layers")),
        num_attention_heads=heads,
        num_key_value_heads=int(r.get("num_key_value_heads", heads)),
        head_dim=int(r.get("head_dim", hidden // heads)),
        max_position_embeddings=int(r.require("max_position_embeddings")),
        bos_token_id=r.get("bos_token_id", bos),
        eos_token_id=r.get("eos_token_id", eos),
        pad_token_id=r.get("pad_token_id", pad),
        rms_norm_eps=float(r.get("rms_norm_eps", eps_default)),
        hidden_act="silu",
        tie_word_embeddings=bool(r.get("tie_word_embeddings", False)),
        rope_theta=theta, rope_scaling=scaling,
    )


# ------------------------------------------------------------------------------------ Mixtral
def parse_mixtral(hf: dict, source: str) -> ModelConfig:
    r = ConfigReader(hf, source, allow={"router_jitter_noise"})   # jitter: training only
    kw = _base(r, "mixtral", eps_default=1e-5, theta_default=1e6, bos=1, eos=2)
    n = kw["num_hidden_layers"]
    window = r.get("sliding_window")
    cfg = ModelConfig(
        **kw,
        sliding_windows=(None if window is None else int(window),) * n,
        mlp_kinds=("moe",) * n,
        intermediate_size=int(r.require("intermediate_size")),
        moe_intermediate_size=int(r.require("intermediate_size")),
        num_experts=int(r.get("num_local_experts", 8)),
        num_experts_per_tok=int(r.get("num_experts_per_tok", 2)),
        norm_topk_prob=True,
        hf_config=dict(hf),
    )
    r.finish()
    return cfg


register_arch(ArchSpec(
    "mixtral", parse_mixtral,
    tuple(_common_rules(False, False, False)
          + _expert_rules("block_sparse_moe", {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"})),
    ignore=IGNORE, architectures=("MixtralForCausalLM",)))


# --------------------------------------------------------------------------------- Qwen2/3-MoE
def _qwen_mlp_kinds(r: ConfigReader, n: int, num_experts: int):
    only = set(int(i) for i in (r.get("mlp_only_layers") or []))
    step = int(r.get("decoder_sparse_step", 1))
    if step < 1:
        r.fail("decoder_sparse_step", "must be >= 1")
    return tuple("moe" if (i not in only and num_experts > 0 and (i + 1) % step == 0) else "dense"
                 for i in range(n))


def _no_sliding(r: ConfigReader, extra_fields=()):
    # sliding_window / max_window_layers / layer_types only matter when use_sliding_window is set
    if r.get("use_sliding_window", False):
        r.fail("use_sliding_window", "sliding-window attention is not supported for this architecture")
    r.get("sliding_window")
    for f in extra_fields:
        v = r.get(f)
        if f == "layer_types" and v is not None and any(t != "full_attention" for t in v):
            r.fail("layer_types", "only full_attention layers are supported")


def parse_qwen2_moe(hf: dict, source: str) -> ModelConfig:
    r = ConfigReader(hf, source)
    kw = _base(r, "qwen2_moe", eps_default=1e-6, theta_default=10000.0)
    n = kw["num_hidden_layers"]
    _no_sliding(r, ("max_window_layers", "layer_types"))
    num_experts = int(r.get("num_experts", 60))
    shared = int(r.get("shared_expert_intermediate_size", 5632))
    cfg = ModelConfig(
        **kw,
        qkv_bias=bool(r.get("qkv_bias", True)),
        mlp_kinds=_qwen_mlp_kinds(r, n, num_experts),
        intermediate_size=int(r.get("intermediate_size", 5632)),
        moe_intermediate_size=int(r.get("moe_intermediate_size", 1408)),
        num_experts=num_experts,
        num_experts_per_tok=int(r.get("num_experts_per_tok", 4)),
        norm_topk_prob=bool(r.get("norm_topk_prob", False)),
        shared_expert_intermediate_size=shared,
        shared_expert_gate=True,
        hf_config=dict(hf),
    )
    r.finish()
    return cfg


def parse_qwen3_moe(hf: dict, source: str) -> ModelConfig:
    r = ConfigReader(hf, source)
    kw = _base(r, "qwen3_moe", eps_default=1e-6, theta_default=10000.0)
    n = kw["num_hidden_layers"]
    # Qwen3-MoE's modeling ignores max_window_layers; it is still written in published configs
    _no_sliding(r, ("max_window_layers",))
    num_experts = int(r.get("num_experts", r.get("num_local_experts", 128)))
    bias = bool(r.get("attention_bias", False))
    cfg = ModelConfig(
        **kw,
        qkv_bias=bias, o_bias=bias, qk_norm="head",
        mlp_kinds=_qwen_mlp_kinds(r, n, num_experts),
        intermediate_size=int(r.get("intermediate_size", 6144)),
        moe_intermediate_size=int(r.get("moe_intermediate_size", 768)),
        num_experts=num_experts,
        num_experts_per_tok=int(r.get("num_experts_per_tok", 8)),
        norm_topk_prob=bool(r.get("norm_topk_prob", False)),
        hf_config=dict(hf),
    )
    r.finish()
    return cfg


_QWEN_RULES = _common_rules(True, True, True) + _dense_mlp_rules() + _expert_rules("mlp", QWEN_EXPERTS)
register_arch(ArchSpec(
    "qwen2_moe", parse_qwen2_moe,
    tuple(_QWEN_RULES + [
        KeyRule(L + f"mlp.shared_expert.{p}.weight", T + f"mlp.shared_expert.{p}.kernel", "linear")
        for p in ("gate_proj", "up_proj", "down_proj")
    ] + [KeyRule(L + "mlp.shared_expert_gate.weight", T + "mlp.shared_expert_gate.kernel", "linear")]),
    ignore=IGNORE, architectures=("Qwen2MoeForCausalLM",)))
register_arch(ArchSpec("qwen3_moe", parse_qwen3_moe, tuple(_QWEN_RULES), ignore=IGNORE,
                       architectures=("Qwen3MoeForCausalLM",)))


# ------------------------------------------------------------------------------------- OLMoE
def parse_olmoe(hf: dict, source: str) -> ModelConfig:
    r = ConfigReader(hf, source)
    kw = _base(r, "olmoe", eps_default=1e-5, theta_default=10000.0, eos=50279, pad=1)
    n = kw["num_hidden_layers"]
    bias = bool(r.get("attention_bias", False))
    clip = r.get("clip_qkv")
    inter = int(r.get("intermediate_size", 2048))
    cfg = ModelConfig(
        **kw,
        qkv_bias=bias, o_bias=bias, qk_norm="full",
        clip_qkv=None if clip is None else float(clip),
        mlp_kinds=("moe",) * n,
        intermediate_size=inter,
        moe_intermediate_size=inter,
        num_experts=int(r.get("num_experts", 64)),
        num_experts_per_tok=int(r.get("num_experts_per_tok", 8)),
        norm_topk_prob=bool(r.get("norm_topk_prob", False)),
        hf_config=dict(hf),
    )
    r.finish()
    return cfg


register_arch(ArchSpec(
    "olmoe", parse_olmoe,
    tuple(_common_rules(True, True, True) + _expert_rules("mlp", QWEN_EXPERTS)),
    ignore=IGNORE, architectures=("OlmoeForCausalLM",)))
