"""A tiny stand-in language model honouring the milo_jax model interface, and tests of it.

Interface (what serve/eval rely on): `model.config` (vocab_size, num_hidden_layers,
max_position_embeddings, bos_token_id, eos_token_id, model_type, hf_config); `model(tokens)` ->
logits [B, S, V] float32; `model.init_cache(batch, max_len)`; `model(tokens, positions=, cache=)` ->
(logits, cache) with keys written at slot == position and queries at p attending to slots j <= p.
The stand-in is one attention layer with learned absolute positions: cheap (compiles in well under a
second) and sensitive to every cache/position mistake, so serve tests run without the real model.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@dataclasses.dataclass(frozen=True)
class StandInConfig:
    vocab_size: int = 64
    hidden_size: int = 16
    num_hidden_layers: int = 1
    max_position_embeddings: int = 256
    bos_token_id: int = 1
    eos_token_id: int | list[int] | None = 2
    model_type: str = "standin"
    hf_config: dict = dataclasses.field(default_factory=dict)


class StandInLM(nnx.Module):
    def __init__(self, config: StandInConfig, *, seed: int = 0):
        rngs = nnx.Rngs(seed)
        d = config.hidden_size
        self.config = config
        self.embed = nnx.Embed(config.vocab_size, d, rngs=rngs)
        self.pos = nnx.Embed(config.max_position_embeddings, d, rngs=rngs)
        self.qkv = nnx.Linear(d, 3 * d, rngs=rngs)
        self.out = nnx.Linear(d, config.vocab_size, rngs=rngs)

    def init_cache(self, batch_size: int, max_len: int, dtype=None):
        dtype = dtype or jnp.float32
        shape = (batch_size, max_len, self.config.hidden_size)
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}

    def __call__(self, tokens, positions=None, cache=None):
        batch, seq = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
        x = self.embed(tokens) + self.pos(positions)
        q, k, v = jnp.split(self.qkv(x), 3, axis=-1)
        if cache is None:
            keys, values, key_pos = k, v, positions
        else:
            rows = jnp.arange(batch)[:, None]
            cache = {"k": cache["k"].at[rows, positions].set(k), "v": cache["v"].at[rows, positions].set(v)}
            keys, values = cache["k"], cache["v"]
            key_pos = jnp.broadcast_to(jnp.arange(keys.shape[1]), (batch, keys.shape[1]))
        scores = jnp.einsum("bsd,btd->bst", q, keys) / np.sqrt(q.shape[-1])
        visible = key_pos[:, None, :] <= positions[:, :, None]
        scores = jnp.where(visible, scores, -jnp.inf)
        h = x + jnp.einsum("bst,btd->bsd", jax.nn.softmax(scores, axis=-1), values)
        logits = 4.0 * self.out(jnp.tanh(h)).astype(jnp.float32)  # x4: peakier, tie-free argmax
        return logits if cache is None else (logits, cache)


def make_standin(vocab_size: int = 64, seed: int = 0, **kw) -> StandInLM:
    return StandInLM(StandInConfig(vocab_size=vocab_size, **kw), seed=seed)


def test_standin_cached_prefill_matches_uncached():
    model = make_standin()
    tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, 64, dtype=jnp.int32)
    full = model(tokens)
    cache = model.init_cache(2, 16)
    positions = jnp.broadcast_to(jnp.arange(9, dtype=jnp.int32), (2, 9))
    cached, cache = model(tokens[:, :5], positions=positions[:, :5], cache=cache)
    step, _ = model(tokens[:, 5:], positions=positions[:, 5:], cache=cache)
    np.testing.assert_allclose(np.asarray(cached), np.asarray(full[:, :5]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(step), np.asarray(full[:, 5:]), rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(full[:, 0] - full[:, 1]).max()) > 1e-3  # logits depend on the input
