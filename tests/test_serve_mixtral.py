"""generate() on a real (tiny, random) Mixtral checkpoint read by milo_jax.load_hf.

Also home of `save_tiny_mixtral`, the tiny checkpoint (weights + WordLevel tokenizer.json) that the
eval and CLI integration tests share.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
from flax import nnx
import numpy as np
import pytest

from milo_jax.serve import generate, load_tokenizer

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a small model reads a short text and writes a long answer",
    "experts route tokens and the router picks two of four experts",
    "low rank factors compensate the error of three bit weights",
]


def build_word_tokenizer(path: str, vocab_size: int = 128) -> None:
    """A WordLevel tokenizer.json over SENTENCES: <unk>=0, <s>=1 (prepended like Mistral's), </s>=2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    words = sorted({w for s in SENTENCES for w in s.split()})
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in words:
        vocab[w] = len(vocab)
    assert len(vocab) <= vocab_size
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>")])
    tok.save(path)


_SAVED: dict[int, str] = {}  # seed -> directory: one checkpoint per test process


def save_tiny_mixtral(seed: int = 0) -> str:
    """Tiny random Mixtral (vocab 128) saved with transformers, plus tokenizer.json; returns the
    directory (a temporary one, written once per process and seed)."""
    import tempfile

    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    if seed not in _SAVED:
        directory = tempfile.mkdtemp(prefix=f"tiny_mixtral_{seed}_")
        torch.manual_seed(seed)
        config = MixtralConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                               num_experts_per_tok=2, max_position_embeddings=256)
        MixtralForCausalLM(config).eval().save_pretrained(directory)
        build_word_tokenizer(os.path.join(directory, "tokenizer.json"))
        _SAVED[seed] = directory
    return _SAVED[seed]


@pytest.fixture(scope="module")
def mixtral_dir():
    return save_tiny_mixtral()


@pytest.fixture(scope="module")
def mixtral(mixtral_dir):
    from milo_jax import load_hf

    return load_hf(mixtral_dir, progress=False)


@pytest.fixture(scope="module")
def hf_model(mixtral_dir):
    from transformers import MixtralForCausalLM

    return MixtralForCausalLM.from_pretrained(mixtral_dir).eval()


def naive_greedy(model, prompt, max_new_tokens, buffer_len=32):
    """No cache: recompute the whole sequence every step. The sequence sits right-padded in a fixed
    buffer (causal model: logits at i see tokens <= i only) so one jit executable serves every step."""
    forward = nnx.jit(lambda m, t: m(t))
    seq = np.zeros((1, buffer_len), np.int32)
    seq[0, : len(prompt)] = prompt
    n = len(prompt)
    for _ in range(max_new_tokens):
        seq[0, n] = int(jnp.argmax(forward(model, jnp.asarray(seq))[0, n - 1]))
        n += 1
    return seq[0, len(prompt) : n].tolist()


def test_greedy_ragged_batch_matches_naive_loop_and_transformers(mixtral, hf_model):
    import torch

    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 128, size=n).tolist() for n in (4, 9, 1)]
    result = generate(mixtral, prompts, max_new_tokens=6, stop_tokens=[])
    assert result.tokens == [naive_greedy(mixtral, p, 6) for p in prompts]
    for prompt, tokens in zip(prompts, result.tokens):
        with torch.no_grad():
            hf = hf_model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                                   eos_token_id=None, pad_token_id=0)
        assert tokens == hf[0, len(prompt):].tolist()


def test_string_prompts_sampling_and_stop(mixtral, mixtral_dir):
    tok = load_tokenizer(mixtral_dir)
    prompts = ["the quick brown fox", "experts route tokens"]
    sampled = generate(mixtral, prompts, max_new_tokens=5, temperature=0.8, top_p=0.9, seed=3, tokenizer=tok,
                       stop_tokens=[])
    assert sampled.prompt_tokens[0][0] == 1  # BOS from the tokenizer's post-processor
    assert sampled.tokens == generate(mixtral, prompts, max_new_tokens=5, temperature=0.8, top_p=0.9, seed=3,
                                      tokenizer=tok, stop_tokens=[]).tokens
    assert sampled.text == [tok.decode(t) for t in sampled.tokens]
    greedy = generate(mixtral, prompts, max_new_tokens=5, tokenizer=tok, stop_tokens=[])
    stop = greedy.tokens[0][1]
    stopped = generate(mixtral, prompts, max_new_tokens=5, tokenizer=tok, stop_tokens=[stop])
    assert stopped.tokens[0] == greedy.tokens[0][: greedy.tokens[0].index(stop) + 1]
    assert stopped.text[0] == tok.decode(stopped.tokens[0][:-1])  # text excludes the stop token
    assert stopped.finish_reasons[0] == "stop"
