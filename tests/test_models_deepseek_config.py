"""DeepSeek config parsing on the published config.json layouts, and YaRN frequencies vs transformers."""

from __future__ import annotations

import numpy as np
import pytest

import milo_jax  # noqa: F401  (import order: milo_jax imports converters.hf)
from converters.arch_deepseek import parse_config, skip_key
from converters.errors import CheckpointError
from milo_jax.models import rope, rope_yarn
from milo_jax.models.config import ModelConfig

# Field sets as published on the Hub (values abridged where they do not matter).
DEEPSEEK_MOE_16B = {
    "architectures": ["DeepseekForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekConfig"}, "aux_loss_alpha": 0.001,
    "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 10944, "max_position_embeddings": 4096, "model_type": "deepseek",
    "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_routed_experts": 64,
    "n_shared_experts": 2, "norm_topk_prob": False, "num_attention_heads": 16,
    "num_experts_per_tok": 6, "num_hidden_layers": 28, "num_key_value_heads": 16,
    "pretraining_tp": 1, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 10000,
    "scoring_func": "softmax", "seq_aux": True, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.36.0", "use_cache": True,
    "vocab_size": 102400,
}
DEEPSEEK_V2_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": {}, "aux_loss_alpha": 0.001, "bos_token_id": 100000, "eos_token_id": 100001,
    "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": 2048,
    "initializer_range": 0.02, "intermediate_size": 10944, "kv_lora_rank": 512,
    "max_position_embeddings": 163840, "model_type": "deepseek_v2", "moe_intermediate_size": 1408,
    "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64, "n_shared_experts": 2,
    "norm_topk_prob": False, "num_attention_heads": 16, "num_experts_per_tok": 6,
    "num_hidden_layers": 27, "num_key_value_heads": 16, "pretraining_tp": 1, "q_lora_rank": None,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707,
                     "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096,
                     "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 1, "topk_method": "greedy",
    "torch_dtype": "bfloat16", "transformers_version": "4.39.3", "use_cache": True,
    "v_head_dim": 128, "vocab_size": 102400, "ep_size": 1,
}
DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": {}, "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1,
    "first_k_dense_replace": 3, "hidden_act": "silu", "hidden_size": 7168,
    "initializer_range": 0.02, "intermediate_size": 18432, "kv_lora_rank": 512,
    "max_position_embeddings": 163840, "model_type": "deepseek_v3", "moe_intermediate_size": 2048,
    "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1,
    "norm_topk_prob": True, "num_attention_heads": 128, "num_experts_per_tok": 8,
    "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1,
    "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                     "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                     "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16", "transformers_version": "4.46.3", "use_cache": True,
    "v_head_dim": 128, "vocab_size": 129280,
}


def test_deepseek_moe_16b_config():
    c = parse_config(dict(DEEPSEEK_MOE_16B))
    assert c.attention_kind == "gqa" and c.router_kind == "deepseek_moe"
    assert c.mlp_kinds == ("dense",) + ("moe",) * 27
    assert c.head_dim == 128 and c.num_experts == 64 and c.num_experts_per_tok == 6
    assert c.shared_expert_intermediate_size == 2 * 1408 and not c.norm_topk_prob
    assert c.rope_scaling is None and c.rope_theta == 10000.0


def test_deepseek_v2_lite_config():
    c = parse_config(dict(DEEPSEEK_V2_LITE))
    assert c.attention_kind == "mla" and c.router_kind == "deepseek_v2"
    assert c.extra_get("q_lora_rank") is None and c.extra_get("kv_lora_rank") == 512
    assert c.extra_get("topk_method") == "greedy" and c.extra_get("rope_interleave") is True
    assert c.rope_scaling["factor"] == 40 and c.mlp_kinds[0] == "dense"
    spec = rope_yarn.rope_spec_from_config(c.rope_scaling, dim=64, theta=c.rope_theta,
                                           max_position_embeddings=c.max_position_embeddings)
    # mscale == mscale_all_dim: cos/sin unscaled; the softmax scale gets mscale(40, 0.707)^2
    assert rope_yarn.inv_freq_and_attention_factor(spec)[1] == pytest.approx(1.0)
    m = 0.1 * 0.707 * np.log(40) + 1
    assert rope_yarn.yarn_softmax_scale(spec, 192) == pytest.approx(192 ** -0.5 * m * m)


def test_deepseek_v3_config_and_mtp_keys():
    hf = dict(DEEPSEEK_V3)
    c = parse_config(hf)
    # head_dim is derived for MLA (transformers overwrites it): any saved value is accepted
    assert parse_config(dict(hf, head_dim=128)) == c
    assert c.router_kind == "deepseek_v3" and c.mlp_kinds[:4] == ("dense",) * 3 + ("moe",)
    assert c.extra_get("n_group") == 8 and c.extra_get("topk_group") == 4
    assert c.extra_get("routed_scaling_factor") == 2.5 and c.norm_topk_prob
    assert skip_key("model.layers.61.eh_proj.weight", c)
    assert skip_key("model.layers.61.self_attn.q_a_proj.weight", c)
    assert not skip_key("model.layers.60.self_attn.q_a_proj.weight", c)
    hf["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    with pytest.raises(CheckpointError, match="quantization_config"):
        parse_config(hf)


@pytest.mark.parametrize("mutate, match", [
    (lambda h: h.pop("kv_lora_rank"), "kv_lora_rank"),
    (lambda h: h.update(num_experts_per_tok=300), "num_experts_per_tok"),
    (lambda h: h.update(topk_group=9), "topk_group"),
    (lambda h: h.update(qk_head_dim=128), "qk_head_dim"),
    (lambda h: h.update(rope_scaling={"type": "dynamic", "factor": 2.0}), "dynamic"),
    (lambda h: h.update(model_type="deepseek_v4"), "model_type"),
])
def test_v3_bad_configs(mutate, match):
    hf = dict(DEEPSEEK_V3)
    mutate(hf)
    with pytest.raises(CheckpointError, match=match):
        parse_config(hf)


@pytest.mark.parametrize("params", [
    {"factor": 40.0, "original_max_position_embeddings": 4096, "mscale": 0.707,
     "mscale_all_dim": 0.707},
    {"factor": 4.0, "original_max_position_embeddings": 512, "mscale": 1.0, "mscale_all_dim": 0.5,
     "beta_fast": 16, "beta_slow": 2},
    {"factor": 8.0, "original_max_position_embeddings": 256, "truncate": False},
    {"factor": 3.0, "original_max_position_embeddings": 1024, "attention_factor": 1.3},
])
def test_yarn_frequencies_match_transformers(params):
    torch = pytest.importorskip("torch")  # noqa: F841
    from transformers import DeepseekV3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = DeepseekV3Config(hidden_size=64, num_attention_heads=4, qk_rope_head_dim=16,
                          max_position_embeddings=8192, rope_theta=50000.0,
                          rope_scaling=dict(params, rope_type="yarn"))
    ref_inv, ref_att = ROPE_INIT_FUNCTIONS["yarn"](hf)
    spec = rope_yarn.rope_spec_from_config(dict(params, type="yarn"), dim=16, theta=50000.0,
                                           max_position_embeddings=8192)
    inv, att = rope_yarn.inv_freq_and_attention_factor(spec)
    np.testing.assert_allclose(inv, ref_inv.numpy(), rtol=1e-6)
    assert att == pytest.approx(ref_att, rel=1e-7)
    # the same frequencies through the core's rope registry (GQA models asking for YaRN)
    cfg = ModelConfig(model_type="t", vocab_size=8, hidden_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                      max_position_embeddings=8192, rope_theta=50000.0,
                      rope_scaling=dict(params, rope_type="yarn"))
    inv2, att2 = rope.rope_frequencies(cfg)
    np.testing.assert_allclose(inv2, inv, rtol=0)
    assert att2 == att
