"""DeepSeek architectures: HF config.json -> ModelConfig (strict allowlists) and HF key -> param path.

model_type      attention                         router (ModelConfig.router_kind)
"deepseek"      Llama GQA, default RoPE ("gqa")    softmax top-k ("deepseek_moe"); DeepSeek-MoE-16B,
                                                   remote code (modeling_deepseek.py), not in transformers
"deepseek_v2"   MLA ("mla"), YaRN optional         softmax greedy / group_limited_greedy ("deepseek_v2")
"deepseek_v3"   MLA ("mla"), YaRN optional         sigmoid + correction bias, group top-k ("deepseek_v3")

Layer i has a routed-expert MLP iff n_routed_experts is set, i >= first_k_dense_replace and
i % moe_layer_freq == 0 (the original modeling code; transformers' V2/V3 drop the moe_layer_freq
test, which only matters when it is not 1). Shared experts are one SwiGLU MLP of width
moe_intermediate_size * n_shared_experts added to the routed output.

Config fields are either known to have no effect on inference (IGNORED), or read and checked here;
anything else raises CheckpointError naming config.json and the field.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import numpy as np

from converters.errors import CheckpointError
from converters.registry import (HF_LAYER, NO_MATH_FIELDS, OUR_LAYER, ArchSpec, KeyRule,
                                 decoder_rules, register_arch)
from milo_jax.models import deepseek_router as _routers  # noqa: F401  (registers the routers)
from milo_jax.models import mla as _mla  # noqa: F401  (registers attention kind "mla")
from milo_jax.models.config import ModelConfig
from milo_jax.models.rope_yarn import YARN_KEYS

MODEL_TYPES = ("deepseek", "deepseek_v2", "deepseek_v3")

# No effect on the inference math (training-only, bookkeeping, parallelism, or derived values).
IGNORED = NO_MATH_FIELDS | frozenset({
    "architectures", "auto_map", "model_type", "transformers_version", "torch_dtype", "dtype",
    "use_cache", "initializer_range", "output_router_logits", "aux_loss_alpha", "seq_aux",
    "router_aux_loss_coef", "attention_dropout", "pretraining_tp", "ep_size", "_name_or_path",
    "num_nextn_predict_layers", "num_mtp_layers",  # V3 multi-token-prediction layers: not loaded
    "bos_token_id", "eos_token_id", "pad_token_id", "tokenizer_class", "output_attentions",
    "output_hidden_states", "return_dict", "id2label", "label2id", "problem_type",
})
COMMON = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "hidden_act",
    "tie_word_embeddings", "rope_theta", "rope_scaling", "rope_parameters", "attention_bias",
    "moe_intermediate_size", "n_routed_experts", "n_shared_experts", "num_experts_per_tok",
    "first_k_dense_replace", "moe_layer_freq", "norm_topk_prob", "scoring_func", "head_dim",
})
MLA_FIELDS = frozenset({"q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                        "v_head_dim", "qk_head_dim", "topk_method", "n_group", "topk_group",
                        "routed_scaling_factor"})
ALLOWED = {
    "deepseek": COMMON,
    "deepseek_v2": COMMON | MLA_FIELDS | {"mlp_bias"},
    "deepseek_v3": COMMON | MLA_FIELDS | {"rope_interleave"},
}


def _err(source: str, msg: str) -> CheckpointError:
    return CheckpointError(f"{source}: {msg}")


def _rope(hf: Mapping[str, Any], source: str):
    """(rope_theta, rope_scaling dict without rope_theta, or None for default RoPE)."""
    if hf.get("rope_scaling") and hf.get("rope_parameters") and hf["rope_scaling"] != hf["rope_parameters"]:
        raise _err(source, "both rope_scaling and rope_parameters are set and differ")
    rs = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(rs.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    unknown = set(rs) - YARN_KEYS
    if unknown:
        raise _err(source, f"rope_scaling has unsupported keys {sorted(unknown)}")
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind not in ("default", "yarn"):
        raise _err(source, f"rope_scaling type {kind!r} is not supported (default or yarn)")
    if "type" in rs and "rope_type" in rs and rs["type"] != rs["rope_type"]:
        raise _err(source, f"rope_scaling type {rs['type']!r} != rope_type {rs['rope_type']!r}")
    return theta, (rs if kind == "yarn" else None)


def parse_config(hf: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
    """HF config dict of a DeepSeek model -> ModelConfig. Raises CheckpointError on anything unsupported."""
    mt = hf.get("model_type")
    if mt not in MODEL_TYPES:
        raise _err(source, f"model_type {mt!r} is not a DeepSeek type {MODEL_TYPES}")
    if hf.get("quantization_config") is not None:
        raise _err(source, "quantization_config is set (FP8 DeepSeek-V3/R1): convert the checkpoint "
                           "first with converters.arch_deepseek.dequantize_fp8_checkpoint(src, dst)")
    unknown = sorted(set(hf) - IGNORED - ALLOWED[mt])
    if unknown:
        raise _err(source, f"fields {unknown} are not supported for model_type {mt!r} "
                           "(refused rather than ignored because they may change the math)")

    def req(name):
        if hf.get(name) is None:
            raise _err(source, f"required field {name!r} is missing")
        return hf[name]

    H, heads = int(req("hidden_size")), int(req("num_attention_heads"))
    L = int(req("num_hidden_layers"))
    if hf.get("hidden_act", "silu") != "silu":
        raise _err(source, f"hidden_act {hf['hidden_act']!r} is not supported (silu)")
    if hf.get("mlp_bias"):
        raise _err(source, "mlp_bias=true is not supported")
    theta, rope_scaling = _rope(hf, source)

    # ---- MoE layout ----
    n_routed = hf.get("n_routed_experts")
    k_dense = int(hf.get("first_k_dense_replace") or 0)
    freq = int(1 if hf.get("moe_layer_freq") is None else hf["moe_layer_freq"])
    if freq < 1:
        raise _err(source, f"moe_layer_freq must be >= 1, got {freq}")
    kinds = tuple("moe" if (n_routed and i >= k_dense and i % freq == 0) else "dense" for i in range(L))
    moe_i = int(hf.get("moe_intermediate_size") or 0)
    n_shared = int(hf.get("n_shared_experts") or 0)
    top_k = int(hf.get("num_experts_per_tok") or 0)
    if n_routed and not (0 < top_k <= n_routed):
        raise _err(source, f"num_experts_per_tok={hf.get('num_experts_per_tok')} must be in "
                           f"[1, n_routed_experts={n_routed}]")
    if n_routed and moe_i <= 0:
        raise _err(source, "moe_intermediate_size is required when n_routed_experts is set")

    extra: dict[str, Any] = {}
    default_norm = {"deepseek": False, "deepseek_v2": False, "deepseek_v3": True}[mt]
    norm_topk_prob = bool(hf.get("norm_topk_prob", default_norm))
    scoring = hf.get("scoring_func")
    if mt == "deepseek":
        router_kind, attention_kind = "deepseek_moe", "gqa"
        if scoring not in (None, "softmax"):
            raise _err(source, f"scoring_func {scoring!r} is not supported for deepseek (softmax)")
        if rope_scaling is not None:
            raise _err(source, "rope_scaling is not supported for model_type 'deepseek'")
        kv_heads = int(hf.get("num_key_value_heads") or heads)
        head_dim = H // heads
        if H % heads or (hf.get("head_dim") not in (None, head_dim)):
            raise _err(source, f"head_dim must be hidden_size/num_attention_heads = {H}/{heads}")
    else:
        attention_kind = "mla"
        kv_heads, head_dim = heads, None
        if hf.get("num_key_value_heads") not in (None, heads):
            raise _err(source, f"num_key_value_heads={hf['num_key_value_heads']} must equal "
                               f"num_attention_heads={heads} for MLA")
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            extra[name] = int(req(name))
        extra["q_lora_rank"] = None if hf.get("q_lora_rank") is None else int(hf["q_lora_rank"])
        qk_head = extra["qk_nope_head_dim"] + extra["qk_rope_head_dim"]
        if hf.get("qk_head_dim") not in (None, qk_head):
            raise _err(source, f"qk_head_dim={hf['qk_head_dim']} != qk_nope + qk_rope = {qk_head}")
        # head_dim is derived for MLA: transformers overwrites it with qk_rope_head_dim (the rotary
        # width) whatever config.json says, so its value is not read here either.
        head_dim = qk_head
        extra["routed_scaling_factor"] = float(hf.get("routed_scaling_factor") or 1.0)
        extra["n_group"] = hf.get("n_group")
        extra["topk_group"] = hf.get("topk_group")
        method = hf.get("topk_method")
        if mt == "deepseek_v2":
            router_kind = "deepseek_v2"
            method = method or "greedy"
            if method not in ("greedy", "group_limited_greedy"):
                raise _err(source, f"topk_method {method!r} is not supported for deepseek_v2")
            if scoring not in (None, "softmax"):
                raise _err(source, f"scoring_func {scoring!r} is not supported for deepseek_v2")
            if norm_topk_prob:
                # The original modeling code renormalises (and then skips routed_scaling_factor);
                # transformers ignores the flag. No released V2 checkpoint sets it: refuse.
                raise _err(source, "norm_topk_prob=true is not supported for deepseek_v2 "
                                   "(transformers and the original code disagree on it)")
            extra["topk_method"] = method
            extra["rope_interleave"] = True   # V2 always rotates interleaved pairs
        else:
            router_kind = "deepseek_v3"
            if method not in (None, "noaux_tc"):
                raise _err(source, f"topk_method {method!r} is not supported for deepseek_v3 (noaux_tc)")
            if scoring not in (None, "sigmoid"):
                raise _err(source, f"scoring_func {scoring!r} is not supported for deepseek_v3 (sigmoid)")
            extra["rope_interleave"] = bool(hf.get("rope_interleave", True))
            if n_routed:
                ng, tg = extra["n_group"], extra["topk_group"]
                if not ng or not tg or n_routed % ng or not 0 < tg <= ng or n_routed // ng < 2:
                    raise _err(source, f"n_group={ng}, topk_group={tg} invalid for "
                                       f"n_routed_experts={n_routed} (need n_group | experts, "
                                       "1 <= topk_group <= n_group, >= 2 experts per group)")
        if (mt == "deepseek_v2" and extra.get("topk_method") == "group_limited_greedy" and n_routed):
            ng, tg = extra["n_group"], extra["topk_group"]
            if not ng or not tg or n_routed % ng or not 0 < tg <= ng:
                raise _err(source, f"n_group={ng}, topk_group={tg} invalid for n_routed_experts="
                                   f"{n_routed}")

    eos = hf.get("eos_token_id")
    return ModelConfig(
        model_type=mt, vocab_size=int(req("vocab_size")), hidden_size=H, num_hidden_layers=L,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        max_position_embeddings=int(hf.get("max_position_embeddings") or 4096),
        bos_token_id=hf.get("bos_token_id"), eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        pad_token_id=hf.get("pad_token_id"), rms_norm_eps=float(hf.get("rms_norm_eps") or 1e-6),
        hidden_act="silu", tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_kind=attention_kind, qkv_bias=bool(hf.get("attention_bias", False)),
        o_bias=bool(hf.get("attention_bias", False)), rope_theta=theta, rope_scaling=rope_scaling,
        mlp_kinds=kinds, intermediate_size=int(req("intermediate_size")),
        moe_intermediate_size=moe_i, num_experts=int(n_routed or 0), num_experts_per_tok=top_k,
        router_kind=router_kind, norm_topk_prob=norm_topk_prob,
        shared_expert_intermediate_size=moe_i * n_shared, shared_expert_gate=False,
        extra=extra, hf_config=dict(hf),
    )


# ---------------------------------------------------------------------------------------------
# Key map (converters.registry KeyRule templates). Dense layers and MoE layers share the prefix;
# a rule whose target the configured model lacks is reported by the loader as unexpected.

L, T = HF_LAYER, OUR_LAYER


def _rules():
    r = decoder_rules()
    # attention: Llama GQA (deepseek v1) and MLA (V2/V3); HF name -> our attribute
    linears = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "o_proj": "o_proj",
               "q_a_proj": "q_a_proj", "q_b_proj": "q_b_proj",
               "kv_a_proj_with_mqa": "kv_a_proj", "kv_b_proj": "kv_b_proj"}
    for theirs, ours in linears.items():
        r.append(KeyRule(L + f"self_attn.{theirs}.weight", T + f"attn.{ours}.kernel", "linear"))
        r.append(KeyRule(L + f"self_attn.{theirs}.bias", T + f"attn.{ours}.bias", "copy"))
    for theirs, ours in {"q_a_layernorm": "q_a_norm", "kv_a_layernorm": "kv_a_norm"}.items():
        r.append(KeyRule(L + f"self_attn.{theirs}.weight", T + f"attn.{ours}.scale", "copy"))
    for p in ("gate_proj", "up_proj", "down_proj"):
        r.append(KeyRule(L + f"mlp.{p}.weight", T + f"mlp.{p}.kernel", "linear"))            # dense
        r.append(KeyRule(L + f"mlp.experts.{{e}}.{p}.weight", T + f"mlp.experts.{p}", "expert"))
        r.append(KeyRule(L + f"mlp.shared_experts.{p}.weight", T + f"mlp.shared_expert.{p}.kernel",
                         "linear"))
    r += [
        KeyRule(L + "mlp.gate.weight", T + "mlp.router.gate.kernel", "linear"),
        KeyRule(L + "mlp.gate.e_score_correction_bias", T + "mlp.router.e_score_correction_bias",
                "copy"),
        # transformers >= 5 in-memory layout (fused, stacked), accepted when loading
        KeyRule(L + "mlp.experts.gate_up_proj", T + "mlp.experts", "experts_gate_up", export=False),
        KeyRule(L + "mlp.experts.down_proj", T + "mlp.experts.down_proj", "experts", export=False),
    ]
    return tuple(r)


IGNORE = (r"rotary_emb\.inv_freq$",)
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


def skip_key(key: str, config: ModelConfig) -> bool:
    """True for tensors of layers >= num_hidden_layers: DeepSeek-V3's multi-token-prediction
    layer(s) (model.layers.61.* in V3), which the causal LM does not use."""
    m = _LAYER_RE.match(key)
    return bool(m) and int(m.group(1)) >= config.num_hidden_layers


@dataclasses.dataclass(frozen=True)
class DeepseekArchSpec(ArchSpec):
    """ArchSpec plus `skip_key(key, config)` (config-dependent keys to drop, see skip_key)."""

    def skip_key(self, key: str, config: ModelConfig) -> bool:
        return skip_key(key, config)


_ARCH_CLASSES = {"deepseek": ("DeepseekForCausalLM",), "deepseek_v2": ("DeepseekV2ForCausalLM",),
                 "deepseek_v3": ("DeepseekV3ForCausalLM",)}
for _mt in MODEL_TYPES:
    register_arch(DeepseekArchSpec(_mt, parse_config, _rules(), ignore=IGNORE,
                                   architectures=_ARCH_CLASSES[_mt]))


# ---------------------------------------------------------------------------------------------
# DeepSeek-V3 / R1 ship FP8 weights: `X.weight` float8_e4m3fn [out, in] with a per-block
# `X.weight_scale_inv` float32 [ceil(out/bm), ceil(in/bn)] (quantization_config.weight_block_size
# = [bm, bn]); W = fp8 * scale_inv[row // bm, col // bn]. load_hf refuses such configs; convert the
# checkpoint once with `dequantize_fp8_checkpoint`, shard by shard (peak memory ~ one shard).

FP8_SCALE_SUFFIX = "_scale_inv"


def dequantize_fp8_block(weight, scale_inv, block: tuple) -> np.ndarray:
    """float8 [out, in] * float32 per-block scales [ceil(out/bm), ceil(in/bn)] -> float32 [out, in]."""
    bm, bn = block
    out_f, in_f = weight.shape
    want = (-(-out_f // bm), -(-in_f // bn))
    if tuple(scale_inv.shape) != want:
        raise CheckpointError(f"fp8 scale of shape {list(scale_inv.shape)} does not match weight "
                              f"{list(weight.shape)} with blocks {list(block)} (expected {list(want)})")
    s = np.repeat(np.repeat(np.asarray(scale_inv, np.float32), bm, 0), bn, 1)[:out_f, :in_f]
    return np.asarray(weight).astype(np.float32) * s


def dequantize_fp8_checkpoint(src: str, dst: str, dtype: str = "bfloat16") -> str:
    """Writes a copy of the FP8 checkpoint directory `src` to `dst` with every FP8 weight
    dequantized to `dtype` ("bfloat16" or "float32"), the scales dropped, and quantization_config
    removed from config.json. Other files (tokenizer, generation config) are copied. Returns dst."""
    import json
    import os
    import shutil

    import ml_dtypes
    from converters.hf import find_weight_files
    from converters.safetensors_io import SafetensorsFile, write_safetensors

    out_dt = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float32": np.dtype(np.float32)}.get(dtype)
    if out_dt is None:
        raise ValueError(f"dequantize_fp8_checkpoint: dtype must be bfloat16 or float32, got {dtype!r}")
    cfg_path = os.path.join(src, "config.json")
    with open(cfg_path) as f:
        hf = json.load(f)
    q = hf.get("quantization_config") or {}
    if q.get("quant_method") != "fp8" or q.get("fmt", "e4m3") != "e4m3":
        raise CheckpointError(f"{cfg_path}: quantization_config {q!r} is not block FP8 (e4m3)")
    block = tuple(int(b) for b in q.get("weight_block_size") or ())
    if len(block) != 2 or min(block) < 1:
        raise CheckpointError(f"{cfg_path}: weight_block_size {q.get('weight_block_size')!r} must "
                              "be [rows, cols]")
    kind, files = find_weight_files(src)
    if kind != "safetensors":
        raise CheckpointError(f"{src}: FP8 dequantization reads safetensors checkpoints only")
    os.makedirs(dst, exist_ok=True)
    if os.listdir(dst):
        raise CheckpointError(f"{dst}: output directory is not empty")

    # where every key lives, so a scale stored in another shard than its weight is still found
    opened = {p: SafetensorsFile(p) for p in files}
    home = {k: p for p, f in opened.items() for k in f.keys()}
    weight_map, total = {}, 0
    try:
        for path, f in opened.items():
            out = {}
            for key in f.keys():
                if key.endswith(FP8_SCALE_SUFFIX):
                    if key[: -len(FP8_SCALE_SUFFIX)] not in home:
                        raise CheckpointError(f"{path}: scale {key!r} has no weight")
                    continue
                arr = f.get(key)
                if arr.dtype == np.dtype(ml_dtypes.float8_e4m3fn):
                    skey = key + FP8_SCALE_SUFFIX
                    if skey not in home:
                        raise CheckpointError(f"{path}: FP8 tensor {key!r} has no {skey!r}")
                    if arr.ndim != 2:
                        raise CheckpointError(f"{path}: FP8 tensor {key!r} is not 2-D")
                    try:
                        arr = dequantize_fp8_block(arr, opened[home[skey]].get(skey), block)
                    except CheckpointError as e:
                        raise CheckpointError(f"{path}: {key!r}: {e}") from None
                    out[key] = arr.astype(out_dt)
                elif arr.dtype.kind == "V" or arr.dtype.kind == "f":
                    # keep float32 tensors (e.g. e_score_correction_bias) as they are
                    out[key] = arr if arr.dtype == np.float32 else arr.astype(out_dt)
                else:
                    out[key] = np.array(arr)
            name = os.path.basename(path)
            write_safetensors(os.path.join(dst, name), out)
            total += sum(a.nbytes for a in out.values())
            weight_map.update({k: name for k in out})
    finally:
        for f in opened.values():
            f.close()
    if len(files) > 1 or os.path.isfile(os.path.join(src, "model.safetensors.index.json")):
        with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    hf = dict(hf)
    hf.pop("quantization_config")
    hf["torch_dtype"] = dtype
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    for name in os.listdir(src):
        full = os.path.join(src, name)
        if (os.path.isfile(full) and not name.endswith(".safetensors")
                and name not in ("config.json", "model.safetensors.index.json")):
            shutil.copy2(full, os.path.join(dst, name))
    return dst
