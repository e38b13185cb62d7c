"""Parity of milo_jax models loaded by converters.hf against transformers (PyTorch, CPU, float32):
logits over a batch of several sequences, and 20 greedy tokens through the cached decode path
with right-padded prompts of different lengths."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from milo_jax import export_hf, load_hf  # noqa: E402

LENGTHS = (5, 9, 7)
NEW_TOKENS = 20


def _torch_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()


def _torch_greedy(model, prompt: np.ndarray, n: int) -> list:
    ids = torch.tensor(prompt[None], dtype=torch.long)
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(ids).logits[0, -1].argmax())
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


def jax_greedy(model, prompts: np.ndarray, lengths, n: int) -> np.ndarray:
    """Greedy decoding through the KV cache: one prefill of the right-padded batch, then n - 1
    single-token steps; row b writes its new token at position lengths[b] + step."""
    b, s = prompts.shape
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, tokens, positions, cache):
        return nnx.merge(graphdef, state)(tokens, positions=positions, cache=cache)

    cache = model.init_cache(b, s + n)
    pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    logits, cache = step(state, jnp.asarray(prompts, jnp.int32), pos, cache)
    lengths = jnp.asarray(lengths, jnp.int32)
    nxt = jnp.argmax(logits[jnp.arange(b), lengths - 1], axis=-1).astype(jnp.int32)
    out = [nxt]
    for t in range(n - 1):
        logits, cache = step(state, nxt[:, None], (lengths + t)[:, None], cache)
        nxt = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
        out.append(nxt)
    return np.asarray(jnp.stack(out, axis=1))


def check_parity(hf_model, path, vocab: int, seed: int = 1, export_dir=None):
    model = load_hf(path, progress=False)
    rng = np.random.RandomState(seed)
    tokens = rng.randint(0, vocab, (len(LENGTHS), max(LENGTHS)))
    ref = _torch_logits(hf_model, tokens)
    got = np.asarray(nnx.jit(lambda m, t: m(t))(model, jnp.asarray(tokens, jnp.int32)))
    assert got.shape == ref.shape and got.dtype == np.float32
    err = np.abs(got - ref).max()
    assert err < 1e-4, f"logits differ from transformers by {err}"

    prompts = tokens.copy()
    for b, n in enumerate(LENGTHS):
        prompts[b, n:] = 0          # right padding (masked until overwritten)
    got_tokens = jax_greedy(model, prompts, LENGTHS, NEW_TOKENS)
    for b, n in enumerate(LENGTHS):
        want = _torch_greedy(hf_model, prompts[b, :n], NEW_TOKENS)
        assert got_tokens[b].tolist() == want, f"row {b}: greedy tokens differ"
    if export_dir is not None:
        # export with the published (per-expert) names; transformers must load it and agree
        export_hf(model, export_dir, max_shard_size=80_000)
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(export_dir).eval()
        err = np.abs(_torch_logits(reloaded, tokens) - ref).max()
        assert err < 1e-5, f"exported checkpoint differs in transformers by {err}"
    return model


def test_mixtral_parity_sharded_safetensors(hf_model_factory, tmp_path):
    hf = hf_model_factory("mixtral")
    hf.save_pretrained(tmp_path, max_shard_size="60KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    check_parity(hf, tmp_path, hf.config.vocab_size, export_dir=tmp_path / "export")


def test_mixtral_sliding_window_parity(hf_model_factory, tmp_path):
    hf = hf_model_factory("mixtral", seed=3, sliding_window=4)
    hf.save_pretrained(tmp_path)
    check_parity(hf, tmp_path, hf.config.vocab_size)


def test_qwen2_moe_parity_shared_expert_and_dense_layer(hf_model_factory, tmp_path):
    # layer 1 is a dense MLP (mlp_only_layers), layer 0 MoE with the sigmoid-gated shared expert
    hf = hf_model_factory("qwen2_moe", seed=4, mlp_only_layers=[1])
    hf.save_pretrained(tmp_path / "in")
    model = check_parity(hf, tmp_path / "in", hf.config.vocab_size, export_dir=tmp_path / "out")
    assert model.config.mlp_kinds == ("moe", "dense")


def test_qwen3_moe_parity_bin_checkpoint(hf_model_factory, tmp_path):
    # transformers 5 no longer writes .bin (safe_serialization=False is gone): convert the
    # safetensors it wrote (published per-expert names) into a torch pickle ourselves
    from safetensors.torch import load_file

    hf = hf_model_factory("qwen3_moe", seed=5)
    hf.save_pretrained(tmp_path)
    torch.save(load_file(tmp_path / "model.safetensors"), tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors").unlink()
    check_parity(hf, tmp_path, hf.config.vocab_size, export_dir=tmp_path / "export")


def test_mixtral_parity_fused_expert_layout_bin(hf_model_factory, tmp_path):
    # transformers 5's in-memory names: mlp.gate, mlp.experts.gate_up_proj [E, 2I, H], down_proj
    hf = hf_model_factory("mixtral", seed=7)
    hf.config.save_pretrained(tmp_path)
    sd = hf.state_dict()
    assert any(k.endswith("experts.gate_up_proj") for k in sd)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    check_parity(hf, tmp_path, hf.config.vocab_size)


def test_olmoe_parity_clip_qkv(hf_model_factory, tmp_path):
    hf = hf_model_factory("olmoe", seed=6, clip_qkv=1.5)
    hf.save_pretrained(tmp_path / "in")
    check_parity(hf, tmp_path / "in", hf.config.vocab_size, export_dir=tmp_path / "out")


def test_bf16_checkpoint(hf_model_factory, tmp_path):
    """A bfloat16 checkpoint: read exactly (float32 load == transformers float32 on the same
    weights), and run in bfloat16 close to it; exported in bf16, transformers reads it back."""
    hf = hf_model_factory("qwen2_moe", seed=8)
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "in")
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "in",
                                                                  dtype=torch.float32).eval()
    tokens = np.random.RandomState(2).randint(0, hf.config.vocab_size, (2, 8))
    ref = _torch_logits(ref_model, tokens)
    m32 = load_hf(tmp_path / "in", dtype=jnp.float32, progress=False)
    assert np.abs(np.asarray(m32(jnp.asarray(tokens))) - ref).max() < 1e-4
    m16 = load_hf(tmp_path / "in", dtype=jnp.bfloat16, progress=False)
    assert m16.layers[0].mlp.experts.gate_proj.get_value().dtype == jnp.bfloat16
    got = np.asarray(m16(jnp.asarray(tokens)))
    assert got.dtype == np.float32
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()
    export_hf(m16, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert back.dtype == torch.bfloat16
    for k, v in ref_model.state_dict().items():
        assert torch.equal(back.state_dict()[k].float(), v), k
