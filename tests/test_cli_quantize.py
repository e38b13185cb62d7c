"""`milo-jax quantize`: layer by layer from the HF checkpoint, one checkpoint per layer, resumable
after a kill (finished layers are not recomputed, the result equals an uninterrupted run and the
in-memory milo_jax.quantize bit for bit), then `milo_jax.load(OUT)` and `milo-jax eval`."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from milo_jax import QuantConfig, Rule, load, quantize
from milo_jax.cli import main
from milo_jax.quant.config import FrequencyRank
from milo_jax.quant.layerwise import FAIL_ENV, MANIFEST, layer_dir, quantize_checkpoint
from milo_jax.quant.model import split_params
from tests.test_checkpoint import assert_bit_identical
from tests.test_quantize_api import forward, tiny_model, tiny_quant_dir

pytest.importorskip("torch")


def assert_same_model(a, b):
    na, va, _ = split_params(a)
    nb, vb, _ = split_params(b)
    assert na == nb
    for name, x, y in zip(na, va, vb):
        assert type(x) is type(y), name
        assert_bit_identical(x, y)


def _meta_mtime(out, layer):
    return os.stat(os.path.join(layer_dir(out, layer), "milo_checkpoint.json")).st_mtime_ns


def test_quantize_is_resumable_and_bit_identical(tmp_path, monkeypatch, capsys):
    src = tiny_quant_dir()
    out, ref_out = str(tmp_path / "out"), str(tmp_path / "ref")
    args = ["quantize", "--model", src, "--preset", "milo-3bit-s1", "--no-progress"]

    monkeypatch.setenv(FAIL_ENV, "1")                # "killed" right after layer 0 was saved
    with pytest.raises(RuntimeError, match="stopping after layer 0"):
        main(args + ["--out", out])
    monkeypatch.delenv(FAIL_ENV)
    man = json.load(open(os.path.join(out, MANIFEST)))
    assert not man["complete"] and list(man["layers"]) == ["0"]
    assert not os.path.exists(layer_dir(out, 1))
    with pytest.raises(ValueError, match="not complete"):
        load(out)
    t0 = _meta_mtime(out, 0)
    stale = os.path.join(out, "layers", ".0001.tmp-killed")    # a save the kill interrupted
    os.makedirs(stale)

    assert main(args + ["--out", out]) == 0          # resume
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    man = json.load(open(os.path.join(out, MANIFEST)))
    assert man["complete"]
    assert [r["computed_layers"] for r in man["runs"]] == [[0], [1]]
    assert man["runs"][1]["skipped_layers"] == [0]
    assert _meta_mtime(out, 0) == t0                  # layer 0 was not rewritten
    assert not os.path.exists(stale)

    assert main(args + ["--out", ref_out]) == 0      # uninterrupted
    resumed, straight = load(out), load(ref_out)
    assert_same_model(resumed, straight)
    np.testing.assert_array_equal(forward(resumed), forward(straight))
    # ... and equal to quantizing the whole model in memory
    qmodel, report = quantize(tiny_model(), "milo-3bit-s1")
    assert_same_model(resumed, qmodel)
    assert line["bits_per_weight"] == pytest.approx(report.bits_per_weight)

    # eval reads the quantized directory (tokenizer copied from the source)
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 4, encoding="utf-8")
    capsys.readouterr()
    assert main(["eval", "--model", out, "--text", str(text), "--window", "8"]) == 0
    assert capsys.readouterr().out.startswith("perplexity ")

    # a rerun with another preset into the same directory is refused; unknown presets too
    assert main(["quantize", "--model", src, "--preset", "hqq-3bit", "--out", out]) == 2
    assert "different quantization run" in capsys.readouterr().err
    assert main(["quantize", "--model", src, "--preset", "gptq-3bit", "--out",
                 str(tmp_path / "n")]) == 2
    assert "unknown preset 'gptq-3bit'" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "n")


def test_layerwise_budget_and_frequency_match_in_memory(tmp_path):
    src = tiny_quant_dir()
    model = tiny_model()
    # budget: the plan from the streamed first pass equals the in-memory one
    rep = quantize_checkpoint(src, tmp_path / "b", "milo-5.5bpw", progress=False)
    assert rep.bits_per_weight <= 5.5 and os.path.isfile(tmp_path / "b" / "plan.json")
    qmodel, mem_rep = quantize(model, "milo-5.5bpw")
    assert_same_model(load(tmp_path / "b"), qmodel)
    def by_path(rep):
        d = rep.to_dict()
        return {k: (sorted(v, key=lambda e: e["path"]) if k in ("tensors", "untouched") else v)
                for k, v in d.items()}

    assert by_path(rep) == by_path(mem_rep)
    # frequency ranks: the calibration hidden state carried layer by layer gives the same counts
    cfg = QuantConfig((Rule("routed_experts", method="milo",
                            rank=FrequencyRank(mean_rank=8, step=8)),), name="freq")
    quantize_checkpoint(src, tmp_path / "f", cfg, progress=False)
    qf, _ = quantize(model, cfg)
    assert_same_model(load(tmp_path / "f"), qf)
    assert os.path.isfile(os.path.join(layer_dir(str(tmp_path / "f"), 1), "calib_hidden.npy"))


def test_eval_on_quantized_byte_level_model(tmp_path, capsys):
    """A byte-level checkpoint (no tokenizer.json): the quantized output has no config.json, so the
    byte tokenizer must take the vocabulary from the loaded model, not from the directory."""
    from tests.conftest import make_hf_model

    src, out = tmp_path / "src", tmp_path / "out"
    make_hf_model("mixtral", seed=3, vocab_size=256, hidden_size=64, intermediate_size=64,
                  num_key_value_heads=4).save_pretrained(src)
    text = tmp_path / "t.txt"
    text.write_text("All the world's a stage, and all the men and women merely players. " * 8)
    assert main(["quantize", "--model", str(src), "--preset", "hqq-3bit", "--out", str(out),
                 "--no-progress"]) == 0
    assert not (out / "tokenizer.json").exists()
    capsys.readouterr()
    assert main(["eval", "--model", str(out), "--text", str(text), "--window", "32"]) == 0
    quant = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["eval", "--model", str(src), "--text", str(text), "--window", "32"]) == 0
    dense = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert quant["num_tokens"] == dense["num_tokens"] > 0
    assert np.isfinite(quant["ppl"]) and quant["ppl"] != dense["ppl"]
