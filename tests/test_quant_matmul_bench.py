"""CPU checks of the quant_matmul benchmark's pieces: the torch int4 (tinygemm) convention its peer
relies on, the table/roofline writer, and --append on a tiny run."""

import json
import os

import pytest

torch = pytest.importorskip("torch")

from benchmarks import plot_quant_matmul
from benchmarks import quant_matmul_peers as peers


def test_tinygemm_convention_matches_cpu_kernel():
    """(q - 8) * scale + zero, qScaleAndZeros [K/g, N, 2]: what the CUDA peer's relerr assumes."""
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        pytest.skip("no CPU int4pack kernel in this torch")
    gen = torch.Generator().manual_seed(1)
    k, n, g, m = 256, 64, 64, 3
    q, sz = peers.random_int4_weight(k, n, g, "cpu", gen)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, w, g, sz).float()
    ref = x.float() @ peers.tinygemm_dequant_reference(q, sz, g)
    assert float((y - ref).norm() / ref.norm()) < 1e-2
    wrong = x.float() @ peers.tinygemm_dequant_reference(15 - q, sz, g)  # a convention that must fail
    assert float((y - wrong).norm() / ref.norm()) > 0.1


def test_pack_int4_uint8_even_index_high_nibble():
    q = torch.randint(0, 16, (8, 32), dtype=torch.int32, generator=torch.Generator().manual_seed(2))
    p = peers.pack_int4_uint8(q).to(torch.int32)
    assert p.shape == (8, 16)
    assert torch.equal(p >> 4, q[:, ::2]) and torch.equal(p & 15, q[:, 1::2])


def test_rotation_count_exceeds_l2():
    for wbytes in (1.26e6, 25.7e6, 117e6):
        r = peers.rotation_count(wbytes)
        assert r >= 2 and (r * wbytes > 60e6 or r == peers.MAX_ROTATE)


def _fake_meta():
    recs = []
    for (k, n) in ((4096, 14336), (2048, 1408)):
        for m in (1, 4096):
            for impl, us in (("bf16_jnp_dot", 50.0), ("torch_bf16", 48.0), ("milo", 12.5),
                             ("torch_int4_g64", 20.0), ("gemlite_w4_g64", 25.0), ("gemlite_w2_g64", 30.0)):
                t = us * (40 if m == 4096 else 1)
                byts = k * n * 2 + m * (k + n) * 2
                recs.append(dict(op="x", impl=impl, shape=[k, n], m=m, bits=3, group_size=64, rank=0,
                                 time_us=t, bytes=byts, tbps=byts / t / 1e6, frac_copy=byts / t / 1e6 / 3.0,
                                 tflops=2 * m * k * n / t / 1e6, speedup_vs_bf16=50.0 / us, relerr=1e-3,
                                 path="kernel" if m == 1 else "dequant_dot", timing="cupti"))
    recs.append(dict(op="quant_matmul", impl="milo", shape=[4096, 14336], m=1, bits=3, group_size=64, rank=32,
                     time_us=13.5, bytes=3e7, tbps=2.2, frac_copy=0.7, tflops=8.0, relerr=1e-3))
    recs.append(dict(op="peer", impl="torch_int4_g128", shape=[2048, 1408], m=1, bits=4, group_size=128,
                     rank=0, error="RuntimeError: boom | with a | pipe"))
    return dict(device="NVIDIA H100 80GB HBM3", date="2026-11-23", jax="0.11.2",
                ceilings=dict(copy_tbps=3.0, bf16_tflops=650.0),
                runs=[dict(command="cmd A", ceilings=dict(copy_tbps=3.0)), dict(command="cmd B", ceilings=dict(copy_tbps=2.9))],
                records=recs)


def test_markdown_table_rows_and_speedups(tmp_path):
    md = plot_quant_matmul.markdown(_fake_meta())
    rows = [line for line in md.splitlines() if line.startswith("| 4096x14336 | 1 |")]
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[2] == "12.5" and cells[6] == "4.00"        # us, vs bf16 = 50 / 12.5
    assert cells[7] == "3.84" and cells[8] == "1.60"        # vs torch bf16 48/12.5, vs int4 g64 20/12.5
    assert cells[-1] == "kernel"
    assert "cmd A" in md and "cmd B" in md
    assert "FAILED: RuntimeError: boom / with a / pipe" in md
    assert "| 4096x14336 | 1 | 32 | 13.5 | 12.5 | +8% |" in md


def test_roofline_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = plot_quant_matmul.roofline(_fake_meta(), str(tmp_path / "r.png"))
    with open(path, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(path) > 10_000


def test_append_keeps_earlier_records(tmp_path, monkeypatch):
    """Two tiny CPU runs (M above the prefill threshold: the dequantize kernel, interpreted) into one JSON."""
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    from benchmarks import quant_matmul as qm
    out = str(tmp_path / "qm.json")
    qm.RESULTS.clear()
    qm.main(["--shapes", "128x64", "--ms", "300", "--ranks", "0", "--out", out])
    with open(out) as fh:
        first = json.load(fh)
    n_first = len(first["records"])
    assert n_first == 2 and {r["impl"] for r in first["records"]} == {"bf16_jnp_dot", "milo"}
    milo = next(r for r in first["records"] if r["impl"] == "milo")
    assert milo["path"] == "mgpu_dequant_dot" and milo["relerr"] < 1e-2
    qm.RESULTS.clear()
    qm.main(["--shapes", "64x128", "--ms", "300", "--ranks", "0", "--append", "--out", out])
    with open(out) as fh:
        both = json.load(fh)
    assert len(both["records"]) == 2 * n_first and len(both["runs"]) == 2
    assert {tuple(r["shape"]) for r in both["records"]} == {(128, 64), (64, 128)}
    assert os.path.exists(str(tmp_path / "qm.md"))
    qm.RESULTS.clear()


def test_merge_two_commands(tmp_path):
    pytest.importorskip("matplotlib")
    a, b = _fake_meta(), _fake_meta()
    b["records"] = b["records"][:3]
    b["ceilings"] = dict(copy_tbps=2.8, bf16_tflops=700.0)
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(json.dumps(a))
    pb.write_text(json.dumps(b))
    plot_quant_matmul.main([str(pa), "--merge", str(pb), "--png", str(tmp_path / "a.png")])
    merged = json.loads(pa.read_text())
    assert len(merged["records"]) == len(a["records"]) + 3 and len(merged["runs"]) == 4
    assert merged["ceilings"] == dict(copy_tbps=3.0, bf16_tflops=700.0)
    assert (tmp_path / "a.md").exists() and (tmp_path / "a.png").exists()
