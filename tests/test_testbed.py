"""The shipped testbed checkpoint (milo_jax/assets/testbed): complete, small, loadable by
transformers, and scored the same by transformers (float32) and `milo-jax eval` on a CPU-sized slice
of its held-out text (the first 4 windows of 256 bytes)."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from milo_jax import demo

WINDOWS, WINDOW = 4, 256


@pytest.fixture(scope="module")
def testbed():
    return demo.testbed_dir()


def test_files_and_size(testbed):
    names = set(os.listdir(testbed))
    assert {"config.json", "heldout.txt", "README.md"} <= names
    assert any(n.endswith(".safetensors") for n in names)
    total = sum(os.path.getsize(os.path.join(testbed, n)) for n in names)
    assert total <= 40 * 2**20, f"testbed is {total / 2**20:.1f} MiB, over 40 MiB"
    with open(os.path.join(testbed, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["model_type"] == "mixtral" and cfg["vocab_size"] == 256
    assert cfg["num_local_experts"] >= 8 and cfg["num_experts_per_tok"] == 2
    assert cfg["num_hidden_layers"] >= 4 and cfg["hidden_size"] >= 256


def _transformers_nll(testbed, tokens):
    import torch
    from transformers import MixtralForCausalLM

    model = MixtralForCausalLM.from_pretrained(testbed, dtype=torch.float32).eval()
    ids = torch.tensor(np.asarray(tokens).reshape(WINDOWS, WINDOW), dtype=torch.long)
    with torch.no_grad():
        logits = model(ids).logits.float()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                            ids[:, 1:].reshape(-1), reduction="mean")
    return float(nll)


def test_transformers_matches_cli_eval(testbed, capsys):
    from milo_jax.cli import main

    text = os.path.join(testbed, "heldout.txt")
    with open(text, "rb") as f:
        tokens = list(f.read(WINDOWS * WINDOW))           # byte tokenizer: id == byte
    expected = _transformers_nll(testbed, tokens)
    assert main(["eval", "--model", testbed, "--text", text, "--window", str(WINDOW),
                 "--max-windows", str(WINDOWS), "--batch-size", "2"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["num_windows"] == WINDOWS and result["num_tokens"] == WINDOWS * (WINDOW - 1)
    assert result["nll"] == pytest.approx(expected, rel=1e-4)
    assert result["ppl"] == pytest.approx(math.exp(expected), rel=1e-4)
    # a trained model: far better than uniform over bytes (ln 256 = 5.55 nats)
    assert result["nll"] < 2.0


def test_demo_on_a_slice(capsys):
    """`python -m milo_jax.demo` end to end on two windows (the default slice is larger)."""
    rows = demo.main(["--windows", "2", "--presets", "rtn-3bit"])
    out = capsys.readouterr().out
    assert [r["weights"] for r in rows] == ["bf16", "rtn-3bit"]
    assert rows[0]["bits_per_weight"] == 16.0 and rows[1]["bits_per_weight"] == pytest.approx(3.5)
    assert 3.5 < rows[1]["whole_model_bits_per_weight"] < 16.0      # embeddings, lm_head at 16 bits
    assert rows[0]["num_tokens"] == rows[1]["num_tokens"] > 0
    assert all(1.0 < r["ppl"] < 256.0 for r in rows) and rows[1]["ppl"] != rows[0]["ppl"]
    assert "rtn-3bit" in out and "perplexity" in out
    with pytest.raises(ValueError, match="unknown preset"):
        demo.main(["--presets", "hqq-5bit"])
