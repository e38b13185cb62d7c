"""generate(): batched prefill + cached decode against a naive no-cache loop, stop tokens, sampling."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from milo_jax.serve import ByteTokenizer, generate, load_tokenizer, select_next_token, top_p_mask
import milo_jax.serve.generation as gen_mod
import milo_jax.serve.model_jit as model_jit
from tests.test_serve_standin_model import make_standin

VOCAB = 64


@pytest.fixture(scope="module")
def model():
    return make_standin(VOCAB, seed=3)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(3, VOCAB, size=n).tolist() for n in (5, 11, 1, 8)]


def naive_greedy(model, prompt, max_new_tokens, stop_tokens=(), buffer_len=32):
    """Recompute model(tokens) on the whole sequence for every new token (no cache). The sequence
    sits right-padded in a fixed buffer (causal model: logits at i see tokens <= i only), so one
    jit executable serves every step."""
    seq = np.zeros((1, buffer_len), np.int32)
    seq[0, : len(prompt)] = prompt
    n = len(prompt)
    for _ in range(max_new_tokens):
        token = int(jnp.argmax(_forward(model, jnp.asarray(seq))[0, n - 1]))
        seq[0, n] = token
        n += 1
        if token in stop_tokens:
            break
    return seq[0, len(prompt) : n].tolist()


@nnx.jit
def _forward(model, tokens):
    return model(tokens)


def test_greedy_matches_naive_loop_for_ragged_batch(model, prompts):
    result = generate(model, prompts, max_new_tokens=7, stop_tokens=[])
    expected = [naive_greedy(model, p, 7) for p in prompts]
    assert result.tokens == expected
    assert result.finish_reasons == ["length"] * len(prompts)
    assert result.prompt_tokens == prompts
    assert len({tuple(t) for t in expected}) > 1  # rows really differ
    # A row alone gives the same tokens as inside the ragged batch (padding does not leak).
    alone = generate(model, [prompts[1]], max_new_tokens=7, stop_tokens=[])
    assert alone.tokens[0] == expected[1]


def test_decode_step_compiles_once(model, prompts):
    generate(model, prompts, max_new_tokens=5, stop_tokens=[])
    step, _ = model_jit._CACHE[model]["serve.decode_step"][1], None
    compiled = step._cache_size()
    generate(model, prompts[::-1], max_new_tokens=9, stop_tokens=[3])
    assert model_jit._CACHE[model]["serve.decode_step"][1] is step
    assert step._cache_size() == compiled


def test_stop_tokens_end_rows_and_exclude_what_follows(model, prompts):
    free = generate(model, prompts, max_new_tokens=8, stop_tokens=[]).tokens
    stop = free[0][2]  # row 0 emits this at step 2 (or earlier)
    first = free[0].index(stop)
    result = generate(model, prompts, max_new_tokens=8, stop_tokens=[stop])
    assert result.tokens[0] == free[0][: first + 1]
    assert result.finish_reasons[0] == "stop"
    for row_free, row, reason in zip(free, result.tokens, result.finish_reasons):
        if stop in row_free:
            assert row == row_free[: row_free.index(stop) + 1] and reason == "stop"
        else:
            assert row == row_free and reason == "length"


def test_loop_ends_early_when_all_rows_stop(model, prompts, monkeypatch):
    calls = []
    real_step = gen_mod._decode_step

    def counting_step(*args, **kw):
        calls.append(1)
        return real_step(*args, **kw)

    monkeypatch.setattr(gen_mod, "_decode_step", counting_step)
    model_jit.forget(model)  # recompile with the counting step
    result = generate(model, prompts, max_new_tokens=6, stop_tokens=list(range(VOCAB)))
    assert all(len(t) == 1 for t in result.tokens)
    assert result.finish_reasons == ["stop"] * len(prompts)
    assert calls == []
    assert generate(model, prompts, max_new_tokens=3, stop_tokens=[]).tokens  # decode runs here
    assert calls  # the counter does see decode steps
    model_jit.forget(model)
    # Config eos is the default stop token.
    assert generate(model, prompts, max_new_tokens=6).tokens == generate(
        model, prompts, max_new_tokens=6, stop_tokens=[model.config.eos_token_id]
    ).tokens


def test_tiny_top_p_equals_greedy(model, prompts):
    greedy = generate(model, prompts, max_new_tokens=6, stop_tokens=[])
    nucleus = generate(model, prompts, max_new_tokens=6, stop_tokens=[], temperature=1.5, top_p=1e-6, seed=7)
    assert nucleus.tokens == greedy.tokens


def test_sampling_reproducible_per_seed_and_varies_across_seeds(model, prompts):
    kw = dict(max_new_tokens=8, stop_tokens=[], temperature=1.0, top_p=0.95)
    a = generate(model, prompts, seed=11, **kw).tokens
    assert generate(model, prompts, seed=11, **kw).tokens == a
    others = [generate(model, prompts, seed=s, **kw).tokens for s in (12, 13)]
    assert all(o != a for o in others)


def test_string_prompts_with_byte_tokenizer():
    model = make_standin(260, seed=1)  # bytes + 4 specials
    tok = ByteTokenizer(260)
    result = generate(model, ["héllo", "a"], max_new_tokens=5, stop_tokens=[], tokenizer=tok)
    assert result.prompt_tokens == [list("héllo".encode()), [97]]
    assert result.tokens == [naive_greedy(model, p, 5) for p in result.prompt_tokens]
    assert result.text == [tok.decode(t) for t in result.tokens]
    # A single string is a batch of one.
    assert generate(model, "a", max_new_tokens=5, stop_tokens=[], tokenizer=tok).tokens == [result.tokens[1]]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompts=[[]]), "empty"),
        (dict(prompts=[]), "non-empty"),
        (dict(prompts=["text"]), "tokenizer"),
        (dict(prompts=[[1, 2, 3, 4, 5]], max_len=4), "longer than max_len"),
        (dict(prompts=[[1, 2, 3]], max_len=5, max_new_tokens=3), "exceeds max_len"),
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(prompts=[[1, VOCAB]]), "outside"),
        (dict(max_len=1000), "max_position_embeddings"),
    ],
)
def test_bad_input_raises(model, kwargs, match):
    args = dict(prompts=[[1, 2, 3]], max_new_tokens=2)
    args.update(kwargs)
    prompts = args.pop("prompts")
    with pytest.raises(ValueError, match=match):
        generate(model, prompts, **args)


def test_top_p_mask_matches_numpy():
    logits = jax.random.normal(jax.random.key(0), (5, 40)) * 2.0
    for top_p in (0.3, 0.8, 0.999):
        got = np.isfinite(np.asarray(top_p_mask(logits, jnp.float32(top_p))))
        for row, kept in zip(np.asarray(logits, np.float64), got):
            probs = np.exp(row - row.max())
            probs /= probs.sum()
            order = np.argsort(-probs)
            n_keep = int(np.searchsorted(np.cumsum(probs[order]), top_p) + 1)  # smallest prefix >= top_p
            expected = np.zeros_like(kept)
            expected[order[:n_keep]] = True
            np.testing.assert_array_equal(kept, expected)
    assert np.isfinite(np.asarray(top_p_mask(logits, jnp.float32(1.0)))).all()


def test_temperature_sampling_follows_softmax():
    logits = jnp.asarray([[1.0, 0.0, -1.0, 0.5]])
    batch = jnp.broadcast_to(logits, (20000, 4))
    tokens = select_next_token(batch, jax.random.key(5), jnp.float32(2.0), jnp.float32(1.0), greedy=False)
    freq = np.bincount(np.asarray(tokens), minlength=4) / 20000
    expected = np.asarray(jax.nn.softmax(logits[0] / 2.0))
    np.testing.assert_allclose(freq, expected, atol=0.015)


def test_byte_tokenizer_and_load_rule(tmp_path):
    tok = ByteTokenizer()
    text = "naïve ✓"
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text) + [256, 300]) == text  # specials dropped
    with pytest.raises(ValueError):
        ByteTokenizer(100)
    (tmp_path / "config.json").write_text('{"vocab_size": 259}')
    assert isinstance(load_tokenizer(str(tmp_path)), ByteTokenizer)
    (tmp_path / "config.json").write_text('{"vocab_size": 32000}')
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(str(tmp_path))
