"""Batched autoregressive generation: one jit-compiled prefill, one jit-compiled decode step.

The model is split once (`nnx.split`) into a static graphdef and a state pytree; prefill and decode
are pure functions of (graphdef, state, cache, ...) compiled with `jax.jit` (graphdef bound by
`serve.model_jit`), so every decode step reuses one executable and a second `generate` call on the
same model and shapes compiles nothing. The KV cache is preallocated by `model.init_cache(batch, max_len)` and donated to
each step, so it is updated in place on accelerators.

Batching: prompts of different lengths are right-padded to a common length P; every row uses
positions 0..P-1 in prefill and reads its first generated token at its own last prompt position.
Decode then feeds row b its token at position len_b + t. Padding slots len_b..P-1 hold garbage keys
after prefill, but a query at position p only attends to slots j <= p and slot p is rewritten by
the decode step at position p before any query can see it, so padding never leaks into a result.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from milo_jax.serve.model_jit import model_jit
from milo_jax.serve.sampling import select_next_token
from milo_jax.serve.tokenizer import Tokenizer

Prompt = Union[str, Sequence[int]]

# Prompt padding and default cache lengths are rounded up to these multiples so that different
# prompt lengths share compiled executables (masked slots do not change any result).
PROMPT_BUCKET = 16
CACHE_BUCKET = 64
PAD_TOKEN = 0


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """Output of `generate`, one entry per prompt, in prompt order.

    tokens: generated token ids (a stop token, when one ended the row, is the last entry).
    text: decoded `tokens` without the stop token (None when no tokenizer was given).
    finish_reasons: "stop" (emitted a stop token) or "length" (reached max_new_tokens).
    prompt_tokens: the prompt ids the model saw (after tokenization).
    """

    tokens: list[list[int]]
    text: list[str] | None
    finish_reasons: list[str]
    prompt_tokens: list[list[int]]


def _model_step(graphdef, state, cache, tokens, positions):
    model = nnx.merge(graphdef, state)
    return model(tokens, positions=positions, cache=cache)


def _prefill(graphdef, state, cache, tokens, lengths, stop_ids, key, temperature, top_p, *, greedy):
    """tokens [B, P] right-padded, lengths [B] -> (first token [B], done [B], cache)."""
    batch, prompt_len = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(prompt_len, dtype=jnp.int32), (batch, prompt_len))
    logits, cache = _model_step(graphdef, state, cache, tokens, positions)
    last_logits = logits[jnp.arange(batch), lengths - 1]  # [B, V]: each row at its own last position
    next_token = select_next_token(last_logits, key, temperature, top_p, greedy=greedy)
    return next_token, jnp.isin(next_token, stop_ids), cache


def _decode_step(graphdef, state, cache, tokens, positions, done, stop_ids, key, temperature, top_p, *, greedy):
    """tokens, positions [B] (the token just generated and its position) -> (next [B], done [B], cache)."""
    logits, cache = _model_step(graphdef, state, cache, tokens[:, None], positions[:, None])
    next_token = select_next_token(logits[:, 0], key, temperature, top_p, greedy=greedy)
    return next_token, done | jnp.isin(next_token, stop_ids), cache


def _as_token_lists(prompts, tokenizer: Tokenizer | None) -> list[list[int]]:
    """Normalise prompts (a str, a token list, or a list of either) to a list of token lists."""
    if isinstance(prompts, str) or (
        isinstance(prompts, (list, tuple, np.ndarray)) and len(prompts) > 0
        and isinstance(prompts[0], (int, np.integer))
    ):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
        raise ValueError("generate: prompts must be a non-empty list of strings or token lists")
    token_lists = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            if tokenizer is None:
                raise ValueError(f"generate: prompt {i} is a string but no tokenizer was given")
            ids = tokenizer.encode(prompt)
        else:
            ids = [int(t) for t in np.asarray(prompt).reshape(-1)] if len(prompt) else []
        if len(ids) == 0:
            raise ValueError(f"generate: prompt {i} is empty (no tokens)")
        token_lists.append(ids)
    return token_lists


def _stop_token_ids(stop_tokens, config) -> list[int]:
    """stop_tokens None -> the config's eos_token_id (int, list or None); else the given ids."""
    if stop_tokens is None:
        stop_tokens = getattr(config, "eos_token_id", None)
    if stop_tokens is None:
        return []
    if isinstance(stop_tokens, (int, np.integer)):
        return [int(stop_tokens)]
    return [int(t) for t in stop_tokens]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def generate(
    model,
    prompts: Prompt | Sequence[Prompt],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop_tokens: int | Sequence[int] | None = None,
    seed: int = 0,
    tokenizer: Tokenizer | None = None,
    max_len: int | None = None,
) -> GenerationResult:
    """Generate up to `max_new_tokens` tokens for each prompt.

    model: a milo_jax model (`model(tokens, positions=, cache=)`, `model.init_cache`, `model.config`).
    prompts: a string, a token list, or a list of either (strings need `tokenizer`).
    temperature: 0 -> greedy (argmax); > 0 -> sample softmax(logits / temperature) within top_p.
    top_p: nucleus mass in (0, 1]; 1 disables the cut.
    stop_tokens: ids that end a row (kept as the row's last token); None -> config.eos_token_id;
        [] -> never stop early. Generation ends when every row has stopped.
    seed: PRNG seed for sampling (same seed, same prompts, same shapes -> same tokens).
    max_len: KV-cache length = the most tokens (prompt + generated) a row may hold; defaults to the
        longest prompt + max_new_tokens rounded up to a multiple of 64 (at most
        config.max_position_embeddings). ValueError when a prompt plus max_new_tokens does not fit.
    Returns a GenerationResult.
    """
    config = model.config
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"generate: temperature must be a finite number >= 0, got {temperature!r}")
    if not (isinstance(top_p, (int, float)) and 0.0 < top_p <= 1.0):
        raise ValueError(f"generate: top_p must be in (0, 1], got {top_p!r}")

    prompt_ids = _as_token_lists(prompts, tokenizer)
    vocab_size = int(config.vocab_size)
    for i, ids in enumerate(prompt_ids):
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"generate: prompt {i} has token ids {bad[:5]} outside [0, {vocab_size})")
    stop_ids = _stop_token_ids(stop_tokens, config)

    lengths = [len(ids) for ids in prompt_ids]
    longest = max(lengths)
    max_positions = getattr(config, "max_position_embeddings", None)
    if max_len is None:
        max_len = _round_up(longest + max_new_tokens, CACHE_BUCKET)
        if max_positions is not None:
            max_len = max(min(max_len, int(max_positions)), longest + max_new_tokens)
    if not isinstance(max_len, (int, np.integer)) or max_len < 1:
        raise ValueError(f"generate: max_len must be an int >= 1, got {max_len!r}")
    if longest > max_len:
        raise ValueError(f"generate: prompt of {longest} tokens is longer than max_len={max_len}")
    if longest + max_new_tokens > max_len:
        raise ValueError(
            f"generate: longest prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) "
            f"exceeds max_len={max_len}"
        )
    if max_positions is not None and max_len > int(max_positions):
        raise ValueError(f"generate: max_len={max_len} exceeds config.max_position_embeddings={max_positions}")

    batch = len(prompt_ids)
    padded_len = min(_round_up(longest, PROMPT_BUCKET), max_len)
    tokens = np.full((batch, padded_len), PAD_TOKEN, dtype=np.int32)
    for b, ids in enumerate(prompt_ids):
        tokens[b, : len(ids)] = ids

    prefill, state = model_jit(
        model, "serve.prefill", _prefill, static_argnames=("greedy",), donate_argnames=("cache",)
    )
    decode_step, _ = model_jit(
        model, "serve.decode_step", _decode_step, static_argnames=("greedy",), donate_argnames=("cache",)
    )
    greedy = temperature == 0.0
    temperature_arr = jnp.float32(temperature if not greedy else 1.0)
    top_p_arr = jnp.float32(top_p)
    stop_arr = jnp.asarray(stop_ids if stop_ids else [-1], dtype=jnp.int32)
    base_key = jax.random.key(seed)
    lengths_arr = jnp.asarray(lengths, dtype=jnp.int32)

    cache = model.init_cache(batch, int(max_len))
    next_token, done, cache = prefill(
        state, cache, jnp.asarray(tokens), lengths_arr, stop_arr,
        jax.random.fold_in(base_key, 0), temperature_arr, top_p_arr, greedy=greedy,
    )
    generated = [next_token]
    for step in range(1, max_new_tokens):
        # One host sync per token: lets the loop end as soon as every row has stopped.
        if bool(jnp.all(done)):
            break
        positions = lengths_arr + (step - 1)  # position of the token being fed
        next_token, done, cache = decode_step(
            state, cache, next_token, positions, done, stop_arr,
            jax.random.fold_in(base_key, step), temperature_arr, top_p_arr, greedy=greedy,
        )
        generated.append(next_token)

    all_tokens = np.asarray(jnp.stack(generated, axis=1))  # [B, steps]
    stop_set = set(stop_ids)
    out_tokens, reasons = [], []
    for row in all_tokens.tolist():
        cut = next((i for i, t in enumerate(row) if t in stop_set), None)
        if cut is None:
            out_tokens.append(row[:max_new_tokens])
            reasons.append("length")
        else:
            out_tokens.append(row[: cut + 1])
            reasons.append("stop")
    text = None
    if tokenizer is not None:
        text = [
            tokenizer.decode(row[:-1] if reason == "stop" else row)
            for row, reason in zip(out_tokens, reasons)
        ]
    return GenerationResult(tokens=out_tokens, text=text, finish_reasons=reasons, prompt_tokens=prompt_ids)
