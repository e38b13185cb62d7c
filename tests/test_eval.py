"""perplexity(): the non-overlapping-window protocol against a direct numpy computation."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from milo_jax.eval import perplexity, split_windows
from tests.test_serve_standin_model import make_standin

VOCAB = 64


@pytest.fixture(scope="module")
def model():
    return make_standin(VOCAB, seed=5)


def reference_nll(model, tokens, window):
    """Direct float64 numpy version of the protocol: each full window alone, skip its first token."""
    total, count = 0.0, 0
    for start in range(0, len(tokens) - window + 1, window):
        win = np.asarray(tokens[start : start + window], dtype=np.int32)
        logits = np.asarray(model(jnp.asarray(win[None])), dtype=np.float64)[0]  # [W, V]
        logits -= logits.max(-1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        total -= log_probs[np.arange(window - 1), win[1:]].sum()
        count += window - 1
    return total / count, count


@pytest.mark.parametrize("batch_size", [1, 2, 4])
def test_matches_numpy_protocol(model, batch_size):
    tokens = np.random.default_rng(1).integers(0, VOCAB, size=5 * 24 + 7)  # 5 windows + 7 dropped
    result = perplexity(model, tokens, window=24, batch_size=batch_size)
    nll, count = reference_nll(model, tokens, 24)
    assert result.num_windows == 5 and result.num_tokens == count == 5 * 23 and result.dropped_tokens == 7
    assert result.nll == pytest.approx(nll, rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(nll), rel=1e-5)
    assert 1.0 < result.ppl < 10 * VOCAB


def test_windows_are_scored_independently(model):
    """Summed NLL is additive over windows: window 0 alone + windows 1..2 alone == all three."""
    tokens = np.random.default_rng(2).integers(0, VOCAB, size=48)
    full = perplexity(model, tokens, window=16, batch_size=3)
    head = perplexity(model, tokens[:16], window=16)
    tail = perplexity(model, tokens[16:], window=16, batch_size=2)
    assert full.nll * 45 == pytest.approx(head.nll * 15 + tail.nll * 30, rel=1e-6)
    assert head.nll != pytest.approx(tail.nll, rel=1e-3)  # the parts differ, so the check can fail


def test_split_windows_drops_tail():
    w = split_windows(np.arange(10), 4)
    np.testing.assert_array_equal(w, [[0, 1, 2, 3], [4, 5, 6, 7]])


@pytest.mark.parametrize(
    "tokens, kwargs, match",
    [
        (np.arange(10), dict(window=16), "less than one window"),
        (np.arange(20).reshape(2, 10), dict(window=4), "1-D"),
        (np.linspace(0, 1, 20), dict(window=4), "integers"),
        (np.arange(20) + VOCAB, dict(window=4), r"\[0, 64\)"),
        (np.arange(20), dict(window=1), "window"),
        (np.arange(20), dict(window=4, batch_size=0), "batch_size"),
        (np.arange(20), dict(window=1024), "max_position_embeddings"),
    ],
)
def test_bad_input_raises(model, tokens, kwargs, match):
    with pytest.raises(ValueError, match=match):
        perplexity(model, tokens, **kwargs)
