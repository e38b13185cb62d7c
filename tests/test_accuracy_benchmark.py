"""Smoke test of benchmarks/accuracy.py: a handful of configurations on a tiny slice of the testbed."""

import json
import math

import pytest

from benchmarks import accuracy


def test_pareto_front_keeps_only_improving_points():
    pts = [(3.5, 5.0, "a"), (2.5, 6.0, "b"), (4.5, 5.1, "c"), (4.0, 4.9, "d")]
    assert [p[2] for p in accuracy.pareto(pts)] == ["b", "a", "d"]


def test_budget_names_mark_the_two_bit_candidate():
    assert accuracy.budget_name(3.25) == "milo-3.25bpw-q+2bit"
    assert accuracy.budget_name(3.75) == "milo-3.75bpw-q"


def test_main_on_a_tiny_slice(tmp_path):
    out = tmp_path / "acc.json"
    configs = "bf16,rtn-2bit-g64,hqq-3bit-g64,hqqpkg-4bit-g64,milo-3.75bpw-q"
    result = accuracy.main(["--out", str(out), "--tokens", "512", "--window", "128",
                            "--configs", configs, "--no-plot"])
    on_disk = json.loads(out.read_text())
    assert (tmp_path / "acc.md").exists()
    for key in ("device", "date", "command", "records", "goals", "num_tokens", "window"):
        assert key in on_disk, key
    assert on_disk["device"] == "cpu" and on_disk["num_tokens"] == 512
    recs = {r["config"]: r for r in result["records"]}
    assert list(recs) == configs.split(",")
    assert recs["bf16"]["delta_vs_bf16"] == 0.0 and recs["bf16"]["bits_per_weight"] == 16.0
    assert recs["bf16"]["delta_stderr"] == 0.0 and recs["rtn-2bit-g64"]["delta_stderr"] > 0
    for r in recs.values():
        assert math.isfinite(r["ppl"]) and r["ppl"] > 1.0, r
        for key in ("method", "bits", "bits_per_weight", "whole_model_bits_per_weight",
                    "delta_vs_bf16", "gap_recovered"):
            assert key in r, (r["config"], key)
    # counted formats: codes + 16-bit scale and zero per 64 weights
    assert recs["rtn-2bit-g64"]["bits_per_weight"] == pytest.approx(2.5)
    assert recs["hqqpkg-4bit-g64"]["bits_per_weight"] == pytest.approx(4.5)
    # the budget is over the quantized tensors, met and nearly used up
    assert 3.6 < recs["milo-3.75bpw-q"]["bits_per_weight"] <= 3.75 + 1e-9
    assert recs["milo-3.75bpw-q"]["gap_recovered"] is not None
    # quantization costs perplexity; the 2-bit loss is far above the slice's float noise
    assert recs["rtn-2bit-g64"]["ppl"] > recs["bf16"]["ppl"]
