"""perplexity() on a tiny random Mixtral against transformers scoring the same windows."""

from __future__ import annotations

import math

import numpy as np
import pytest

from milo_jax.eval import perplexity, split_windows
from tests.test_serve_mixtral import mixtral, mixtral_dir  # noqa: F401  (fixtures)


def test_perplexity_matches_transformers(mixtral, mixtral_dir):  # noqa: F811
    import torch
    from transformers import MixtralForCausalLM

    hf = MixtralForCausalLM.from_pretrained(mixtral_dir).eval()
    tokens = np.random.default_rng(4).integers(0, 128, size=3 * 40 + 13)
    total, count = 0.0, 0
    with torch.no_grad():
        for win in split_windows(tokens, 40):
            ids = torch.tensor(win[None], dtype=torch.long)
            loss = hf(ids, labels=ids).loss  # mean NLL over the window's 39 shifted targets
            total += float(loss) * 39
            count += 39
    expected = total / count
    result = perplexity(mixtral, tokens, window=40, batch_size=2)
    assert result.num_tokens == count and result.dropped_tokens == 13
    assert result.nll == pytest.approx(expected, rel=1e-4)
    assert result.ppl == pytest.approx(math.exp(expected), rel=1e-4)
    assert abs(result.nll - math.log(128)) < 1.0  # a random model is close to uniform, but not exactly
