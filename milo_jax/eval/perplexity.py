"""Perplexity with the standard non-overlapping-window protocol (as in GPTQ / HQQ / MiLo papers).

Protocol: the token stream is cut into consecutive windows of `window` tokens; each window is
scored independently from scratch (no cache, no context carried over); the loss is the mean
next-token NLL over every token of every window except each window's first (which has no
context): window_count * (window - 1) scored tokens. The trailing partial window (len(tokens) %
window tokens) is DROPPED, as GPTQ's `nsamples = numel // seqlen` does. No BOS is inserted per
window; whatever the tokenizer put in the stream (e.g. one BOS at the start) stays where it is.
ppl = exp(nll). GPTQ averages per-window mean losses; with equal-length windows that is the same
number as this token-level mean.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from milo_jax.serve.model_jit import model_jit


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    """ppl = exp(nll); nll: mean next-token negative log-likelihood (nats) over num_tokens scored
    tokens = num_windows * (window - 1); dropped_tokens: the trailing partial window, not scored."""

    ppl: float
    nll: float
    num_tokens: int
    num_windows: int
    window: int
    dropped_tokens: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _window_nll_sums(graphdef, state, windows):
    """windows int32 [b, W] -> summed next-token NLL per window, float32 [b] (W-1 tokens each)."""
    model = nnx.merge(graphdef, state)
    logits = model(windows).astype(jnp.float32)  # [b, W, V]
    log_probs = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    target_lp = jnp.take_along_axis(log_probs, windows[:, 1:, None], axis=-1)[..., 0]  # [b, W-1]
    return -jnp.sum(target_lp, axis=-1)


def split_windows(tokens, window: int) -> np.ndarray:
    """The protocol's windows: int32 [len(tokens) // window, window] (trailing partial dropped)."""
    tokens = np.asarray(tokens)
    num_windows = tokens.shape[0] // window
    return tokens[: num_windows * window].reshape(num_windows, window).astype(np.int32)


def perplexity(model, tokens: Sequence[int] | np.ndarray | jax.Array, *, window: int = 2048,
               batch_size: int = 1) -> PerplexityResult:
    """Perplexity of `model` on a 1-D token stream (protocol in the module docstring).

    model: `model(tokens [B, S]) -> logits [B, S, V]`. tokens: 1-D ints in [0, vocab_size).
    window: tokens per window (2048 is the usual number for Mixtral-class papers; must be <=
    config.max_position_embeddings). batch_size: windows per compiled forward pass; the last batch
    is padded with repeats of window 0 whose results are discarded, so one executable serves all.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"perplexity: tokens must be 1-D, got shape {tokens.shape}")
    if not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"perplexity: tokens must be integers, got dtype {tokens.dtype}")
    if not isinstance(window, (int, np.integer)) or window < 2:
        raise ValueError(f"perplexity: window must be an int >= 2, got {window!r}")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"perplexity: batch_size must be an int >= 1, got {batch_size!r}")
    config = model.config
    max_positions = getattr(config, "max_position_embeddings", None)
    if max_positions is not None and window > int(max_positions):
        raise ValueError(f"perplexity: window {window} exceeds config.max_position_embeddings={max_positions}")
    vocab_size = int(config.vocab_size)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError(
            f"perplexity: token ids must be in [0, {vocab_size}), got range [{tokens.min()}, {tokens.max()}]"
        )
    windows = split_windows(tokens, window)
    num_windows = windows.shape[0]
    if num_windows == 0:
        raise ValueError(
            f"perplexity: {tokens.shape[0]} tokens is less than one window of {window}; use a smaller window"
        )

    batch_size = min(int(batch_size), num_windows)
    score, state = model_jit(model, "eval.window_nll_sums", _window_nll_sums)
    total = 0.0  # float64 on the host: the sum over millions of tokens keeps full precision
    for start in range(0, num_windows, batch_size):
        batch = windows[start : start + batch_size]
        real = batch.shape[0]
        if real < batch_size:
            batch = np.concatenate([batch, np.repeat(windows[:1], batch_size - real, axis=0)])
        sums = np.asarray(score(state, jnp.asarray(batch)), dtype=np.float64)
        total += float(sums[:real].sum())
    num_tokens = num_windows * (window - 1)
    nll = total / num_tokens
    return PerplexityResult(
        ppl=math.exp(nll), nll=nll, num_tokens=num_tokens, num_windows=num_windows, window=int(window),
        dropped_tokens=int(tokens.shape[0] - num_windows * window),
    )
