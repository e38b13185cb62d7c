"""converters: HF export round trip (transformers loads what we write) and bad-input handling."""

from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from converters.arch_moe import parse_mixtral
from converters.errors import CheckpointError, CheckpointFileNotFound
from converters.hf import load_hf
from converters.export import export_hf
from converters.safetensors_io import SafetensorsFile, write_safetensors
from milo_jax.models import MoECausalLM

MIXTRAL_JSON = {
    "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": 96,
    "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2,
    "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 1e6, "bos_token_id": 1,
    "eos_token_id": 2, "tie_word_embeddings": False, "torch_dtype": "float32", "use_cache": True,
    "output_router_logits": False, "router_aux_loss_coef": 0.001, "initializer_range": 0.02,
}
TOKENS = np.random.RandomState(0).randint(0, 96, (2, 6))
# one compiled forward shared by every model of the same structure (nnx.jit caches on the graphdef)
_FORWARD = nnx.jit(lambda m, t: m(t))


def _logits(model):
    return np.asarray(_FORWARD(model, jnp.asarray(TOKENS)))


def _random_model(hf_json=MIXTRAL_JSON, seed=0):
    return MoECausalLM(parse_mixtral(dict(hf_json), "test"), rngs=nnx.Rngs(seed))


@pytest.fixture(scope="module")
def sharded_ckpt(tmp_path_factory):
    """A 2-layer Mixtral written by export_hf in several shards; returns (dir, logits)."""
    model = _random_model()
    out = tmp_path_factory.mktemp("ckpt") / "mixtral"
    export_hf(model, out, max_shard_size=40_000)
    return out, _logits(model)


def _copy(src, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def _index(d):
    return json.loads((d / "model.safetensors.index.json").read_text())


def test_export_then_load_round_trip_sharded(sharded_ckpt):
    d, want = sharded_ckpt
    assert len(set(_index(d)["weight_map"].values())) > 1
    assert not [p for p in d.parent.iterdir() if p.name.startswith(".export-")]
    model = load_hf(d, progress=False)
    np.testing.assert_array_equal(_logits(model), want)


def test_load_bf16(sharded_ckpt):
    d, want = sharded_ckpt
    model = load_hf(d, dtype=jnp.bfloat16, progress=False)
    assert model.layers[0].mlp.experts.gate_proj.get_value().dtype == jnp.bfloat16
    got = _logits(model)
    assert got.dtype == np.float32
    assert np.abs(got - want).max() < 0.1 * np.abs(want).max()


def test_missing_shard(sharded_ckpt, tmp_path):
    d = _copy(sharded_ckpt[0], tmp_path)
    victim = sorted(set(_index(d)["weight_map"].values()))[1]
    (d / victim).unlink()
    with pytest.raises(CheckpointFileNotFound, match=victim):
        load_hf(d, progress=False)


def test_index_naming_file_outside_directory(sharded_ckpt, tmp_path):
    d = _copy(sharded_ckpt[0], tmp_path)
    idx = _index(d)
    key = next(iter(idx["weight_map"]))
    idx["weight_map"][key] = "../outside.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match="outside") as e:
        load_hf(d, progress=False)
    assert key in str(e.value) and "index" in str(e.value)


@pytest.mark.parametrize("damage", ["short", "header_length", "not_json", "data_truncated"])
def test_truncated_or_corrupt_safetensors(sharded_ckpt, tmp_path, damage):
    d = _copy(sharded_ckpt[0], tmp_path)
    name = sorted(set(_index(d)["weight_map"].values()))[0]
    f = d / name
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    if damage == "short":
        f.write_bytes(raw[:5])
    elif damage == "header_length":
        f.write_bytes((10**9).to_bytes(8, "little") + raw[8:])
    elif damage == "not_json":
        f.write_bytes(raw[:8] + b"{" * n + raw[8 + n:])
    else:
        f.write_bytes(raw[:-16])
    with pytest.raises(CheckpointError, match=name):
        load_hf(d, progress=False)


def test_unknown_architecture(sharded_ckpt, tmp_path):
    d = _copy(sharded_ckpt[0], tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt_moe_9000"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="gpt_moe_9000"):
        load_hf(d, progress=False)


@pytest.mark.parametrize("field,value", [("attn_logit_softcapping", 30.0),
                                         ("hidden_act", "gelu"),
                                         ("rope_scaling", {"rope_type": "linear", "factor": 2.0})])
def test_unhandled_config_field(sharded_ckpt, tmp_path, field, value):
    d = _copy(sharded_ckpt[0], tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg[field] = value
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config.json"):
        load_hf(d, progress=False)


def test_qwen2_sliding_window_refused():
    from converters.arch_moe import parse_qwen2_moe

    hf = {"model_type": "qwen2_moe", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 1,
          "num_attention_heads": 4, "max_position_embeddings": 64, "use_sliding_window": True}
    with pytest.raises(CheckpointError, match="use_sliding_window"):
        parse_qwen2_moe(hf, "config.json")


def _rewrite_tensor(d, key, fn):
    shard = _index(d)["weight_map"][key]
    st = SafetensorsFile(d / shard)
    tensors = {k: np.array(st.get(k)) for k in st.keys()}
    st.close()
    tensors[key] = fn(tensors[key])
    write_safetensors(d / shard, tensors)
    return shard


@pytest.mark.parametrize("key,fn", [
    ("model.layers.1.self_attn.q_proj.weight", lambda w: w[:, :-1]),
    ("model.layers.0.block_sparse_moe.experts.2.w2.weight", lambda w: w.T),
    ("model.norm.weight", lambda w: w.astype(np.int32)),
    ("model.layers.0.self_attn.k_proj.weight", lambda w: w.astype(ml_dtypes.float8_e4m3fn)),
])
def test_wrong_shape_or_dtype(sharded_ckpt, tmp_path, key, fn):
    d = _copy(sharded_ckpt[0], tmp_path)
    shard = _rewrite_tensor(d, key, fn)
    with pytest.raises(CheckpointError) as e:
        load_hf(d, progress=False)
    assert key in str(e.value) and shard in str(e.value)


def test_missing_and_unknown_keys(sharded_ckpt, tmp_path):
    d = _copy(sharded_ckpt[0], tmp_path)
    key = "model.layers.1.block_sparse_moe.experts.3.w1.weight"
    shard = _index(d)["weight_map"][key]
    st = SafetensorsFile(d / shard)
    tensors = {k: np.array(st.get(k)) for k in st.keys() if k != key}
    st.close()
    write_safetensors(d / shard, tensors)
    idx = _index(d)
    del idx["weight_map"][key]
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match=r"experts \[3\] missing"):
        load_hf(d, progress=False)
    tensors["model.layers.0.mlp.bogus.weight"] = np.zeros((2, 2), np.float32)
    write_safetensors(d / shard, tensors)
    idx["weight_map"]["model.layers.0.mlp.bogus.weight"] = shard
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match="bogus"):
        load_hf(d, progress=False)


def test_export_refuses_non_empty_target(sharded_ckpt):
    with pytest.raises(CheckpointError, match="not an empty directory"):
        export_hf(_random_model(), sharded_ckpt[0])


def test_export_loads_in_transformers_with_quantized_weights(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from milo_jax import quantize_tensor

    model = _random_model(seed=1)
    experts = model.layers[0].mlp.experts
    experts.up_proj.set_value(quantize_tensor(experts.up_proj.get_value(), bits=3, group_size=32,
                                              method="rtn"))
    attn = model.layers[1].attn
    attn.o_proj.kernel.set_value(quantize_tensor(attn.o_proj.kernel.get_value(), bits=3,
                                                 group_size=32, method="rtn"))
    want = _logits(model)
    export_hf(model, tmp_path / "out", max_shard_size=50_000)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        got = hf(torch.tensor(TOKENS)).logits.float().numpy()
    assert np.abs(got - want).max() < 1e-4


# Field sets of published config.json files (values shortened); loading must accept them.
PUBLISHED_CONFIGS = {
    "mixtral": {  # mistralai/Mixtral-8x7B-v0.1
        "architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1,
        "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
        "intermediate_size": 14336, "max_position_embeddings": 32768, "model_type": "mixtral",
        "num_attention_heads": 32, "num_experts_per_tok": 2, "num_hidden_layers": 32,
        "num_key_value_heads": 8, "num_local_experts": 8, "output_router_logits": False,
        "rms_norm_eps": 1e-05, "rope_theta": 1e6, "router_aux_loss_coef": 0.02,
        "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.36.0.dev0", "use_cache": True, "vocab_size": 32000},
    "qwen2_moe": {  # Qwen/Qwen1.5-MoE-A2.7B
        "architectures": ["Qwen2MoeForCausalLM"], "attention_dropout": 0.0,
        "bos_token_id": 151643, "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 2048,
        "initializer_range": 0.02, "intermediate_size": 5632, "max_position_embeddings": 8192,
        "max_window_layers": 21, "model_type": "qwen2_moe", "num_attention_heads": 16,
        "num_hidden_layers": 24, "num_key_value_heads": 16, "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "transformers_version": "4.39.0.dev0", "use_cache": True,
        "use_sliding_window": False, "vocab_size": 151936, "decoder_sparse_step": 1,
        "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632,
        "num_experts_per_tok": 4, "num_experts": 60, "norm_topk_prob": False,
        "output_router_logits": False, "router_aux_loss_coef": 0.001},
    "qwen3_moe": {  # Qwen/Qwen3-30B-A3B
        "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128,
        "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
        "intermediate_size": 6144, "max_position_embeddings": 40960, "max_window_layers": 48,
        "mlp_only_layers": [], "model_type": "qwen3_moe", "moe_intermediate_size": 768,
        "norm_topk_prob": True, "num_attention_heads": 32, "num_experts": 128,
        "num_experts_per_tok": 8, "num_hidden_layers": 48, "num_key_value_heads": 4,
        "output_router_logits": False, "rms_norm_eps": 1e-06, "rope_scaling": None,
        "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001, "sliding_window": None,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False,
        "vocab_size": 151936},
    "olmoe": {  # allenai/OLMoE-1B-7B-0924
        "architectures": ["OlmoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "clip_qkv": None, "eos_token_id": 50279, "hidden_act": "silu", "hidden_size": 2048,
        "initializer_range": 0.02, "intermediate_size": 1024, "max_position_embeddings": 4096,
        "model_type": "olmoe", "norm_topk_prob": False, "num_attention_heads": 16,
        "num_experts": 64, "num_experts_per_tok": 8, "num_hidden_layers": 16,
        "num_key_value_heads": 16, "output_router_logits": False, "pad_token_id": 1,
        "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 10000.0,
        "router_aux_loss_coef": 0.01, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 50304},
}


@pytest.mark.parametrize("arch", sorted(PUBLISHED_CONFIGS))
def test_published_configs_parse(arch):
    from converters.registry import get_arch
    from converters.hf import expected_params

    hf = PUBLISHED_CONFIGS[arch]
    cfg = get_arch(arch).parse_config(dict(hf), f"{arch}/config.json")
    assert cfg.vocab_size == hf["vocab_size"] and cfg.num_experts in (8, 60, 128, 64)
    assert cfg.head_dim == hf.get("head_dim", hf["hidden_size"] // hf["num_attention_heads"])
    assert cfg.hf_config == hf
    # the abstract model builds with the published sizes (no memory allocated)
    _, shapes = expected_params(cfg, jnp.bfloat16)
    assert shapes[("layers", 0, "mlp", "experts", "gate_proj")][0] == (
        cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size)


def test_sharded_torch_bin_with_index(sharded_ckpt, tmp_path):
    torch = pytest.importorskip("torch")
    src, want = sharded_ckpt
    d = tmp_path / "bin"
    d.mkdir()
    shutil.copy(src / "config.json", d / "config.json")
    weight_map = {}
    for shard in sorted(set(_index(src)["weight_map"].values())):
        st = SafetensorsFile(src / shard)
        name = shard.replace("model-", "pytorch_model-").replace(".safetensors", ".bin")
        torch.save({k: torch.from_numpy(np.array(st.get(k))) for k in st.keys()}, d / name)
        weight_map.update({k: name for k in st.keys()})
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model = load_hf(d, progress=False)
    np.testing.assert_array_equal(_logits(model), want)


def test_tied_embeddings_round_trip(tmp_path):
    hf = dict(MIXTRAL_JSON, tie_word_embeddings=True)
    model = _random_model(hf, seed=2)
    assert model.lm_head is None
    export_hf(model, tmp_path / "tied")
    assert "lm_head.weight" not in SafetensorsFile(tmp_path / "tied" / "model.safetensors").keys()
    back = load_hf(tmp_path / "tied", progress=False)
    np.testing.assert_array_equal(_logits(back),
                                  _logits(model))
