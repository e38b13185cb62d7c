"""Stream-K decode kernel (quant_matmul/stream_k_sm90.py) against the float64 reference.

The schedules are chosen so that ranges cross column tiles, a column tile is split over two or three
CTAs, the last CTA has steps past the end, and M spans two token blocks; CPU runs the kernel body in
GPU interpret mode, `gpu` tests run it natively on sm90.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import milo_jax  # noqa: F401  (import order: milo_jax before pallas_kernels)
from pallas_kernels.quant_matmul import api, layout, mgpu_sm90, stream_k_sm90 as sk
from tests.conftest import cuda_lowering_unavailable
from tests.test_quant_matmul import TOL, _rng, make_weight, make_x, ref64, rel_err


def test_schedule_covers_every_step_once():
    for total, kt, ctas in [(896, 8, 264), (12, 3, 5), (10, 5, 4), (7, 7, 3), (1792, 8, 132)]:
        s = sk.schedule(total, kt, ctas)
        assert s.ctas <= ctas and s.per_cta * s.ctas >= total > s.per_cta * (s.ctas - 1)
        seen = np.zeros((s.slots, total // kt), int)
        for j in range(s.ctas):
            for g in range(j * s.per_cta, min((j + 1) * s.per_cta, total)):
                tile = g // kt
                seen[j - (tile * kt) // s.per_cta, tile] = 1
        np.testing.assert_array_equal(seen.astype(bool), s.written())


# (K, N, M, rank, max_ctas): K tiles of 512 rows
CASES = [
    (2560, 64, 1, 0, 4),       # 5 K tiles, ranges of 2: tiles split 3 ways, last CTA half empty
    (1536, 256, 70, 0, 7),     # two token blocks of 64, ranges of 4 over 3-step tiles
    (1536, 128, 5, 16, 4),     # compensator added by the range holding K tile 0 only
    (1024, 128, 3, 32, 8),     # one step per CTA: every range starts and ends its tile
]


def _outputs_under(monkeypatch, name: str, values, x, kw, **kwargs) -> list:
    """matmul_stream_k's output (float32 numpy) with stream_k_sm90.<name> set to each of `values`."""
    outs = []
    for value in values:
        monkeypatch.setattr(sk, name, value)
        outs.append(np.asarray(sk.matmul_stream_k(x, kw, **kwargs), np.float32))
    return outs


@pytest.mark.parametrize("k,n,m,rank,ctas", CASES)
def test_stream_k_interpret(k, n, m, rank, ctas):
    rng = _rng()
    qt = make_weight(k, n, 3, 64, rank, rng)
    kw = layout.prepare(qt, layout=layout.PAIRS_LAYOUT)
    x = make_x(m, k, rng)
    y = sk.matmul_stream_k(x, kw, max_ctas=ctas, interpret=True)
    assert y.shape == (m, n) and y.dtype == jnp.bfloat16
    err = rel_err(y, ref64(x, qt))
    assert err < TOL, err
    if rank:
        assert rel_err(y, ref64(x, qt, compensator=False)) > 5 * err


@pytest.mark.parametrize("k,n,m,rank,ctas", [CASES[1], CASES[2]])
def test_stream_k_rows_and_columns_out_agree(monkeypatch, k, n, m, rank, ctas):
    """ROWS_OUT (partials [slots, M_pad, N], only the M real rows summed) and the column layout ([slots, N,
    M_pad]) hold the same partials: the same sums in the same slot order, so equal outputs; two token blocks
    (M = 70) and a compensated M = 5 inside one block."""
    rng = _rng()
    qt = make_weight(k, n, 3, 64, rank, rng)
    kw = layout.prepare(qt, layout=layout.PAIRS_LAYOUT)
    x = make_x(m, k, rng)
    outs = _outputs_under(monkeypatch, "ROWS_OUT", (True, False), x, kw, max_ctas=ctas, interpret=True)
    np.testing.assert_array_equal(outs[0], outs[1])
    assert rel_err(jnp.asarray(outs[0]), ref64(x, qt)) < TOL


def test_stream_k_interpret_f32_unpack_per_channel():
    """The planar f32 unpack (other bit widths) and per-channel scales through the same schedule."""
    rng = _rng()
    qt = make_weight(1024, 128, 4, None, 0, rng)
    x = make_x(2, 1024, rng)
    cfg = mgpu_sm90.Config(block_m=8, chunk_slots=8, unpack="f32")
    y = sk.matmul_stream_k(x, layout.prepare(qt), config=cfg, max_ctas=3, interpret=True)
    assert rel_err(y, ref64(x, qt)) < TOL


@pytest.mark.parametrize("ws,rank", [(False, 32), (True, 0)], ids=["rank32", "warp_specialized"])
def test_stream_k_lowers_for_sm90_on_cpu(monkeypatch, ws, rank):
    """The kernel lowers for CUDA from the CPU: with a compensator, and WARP_SPECIALIZED (its scope: rank 0)."""
    reason = cuda_lowering_unavailable()
    if reason:
        pytest.skip(reason)
    monkeypatch.setattr(sk, "WARP_SPECIALIZED", ws)
    rng = _rng()
    kw = layout.prepare(make_weight(1024, 128, 3, 64, rank, rng), layout=layout.PAIRS_LAYOUT)
    f = jax.jit(lambda x, kw: sk.matmul_stream_k(x, kw, max_ctas=264))
    text = f.trace(jax.ShapeDtypeStruct((1, 1024), jnp.bfloat16), kw).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


@pytest.mark.gpu
@pytest.mark.skipif(not api._on_sm90(), reason="needs an sm90 (Hopper) GPU")
@pytest.mark.parametrize("ctas", [None, 7, 132])
def test_stream_k_native_gpu(ctas):
    rng = _rng()
    k, n = 2048, 1408
    for rank, ms in ((0, (1, 16, 64)), (32, (1, 3, 100))):
        qt = make_weight(k, n, 3, 64, rank, rng)
        kw = layout.prepare(qt, layout=layout.PAIRS_LAYOUT)
        for m in ms:
            x = make_x(m, k, rng)
            y = sk.matmul_stream_k(x, kw, max_ctas=ctas)
            assert rel_err(y, ref64(x, qt)) < TOL, (m, rank, ctas)


def test_stream_k_scales_up_front_match_lazy_scales(monkeypatch):
    """Scales computed up front (stream-K's default) and at each group's first pair-slot are the same
    arithmetic: identical outputs; the grouped kernels keep the lazy order (plan flag off)."""
    rng = _rng()
    qt = make_weight(1024, 64, 3, 64, 0, rng)
    kw = layout.prepare(qt, layout=layout.PAIRS_LAYOUT)
    x = make_x(2, 1024, rng)
    outs = []
    for upfront in (True, False):
        monkeypatch.setattr(mgpu_sm90, "SCALES_UPFRONT", upfront)
        sk._build_cached.cache_clear()
        outs.append(np.asarray(sk.matmul_stream_k(x, kw, config=_fold_config(2, kw, "magic_bf16"), max_ctas=3,
                                                  interpret=True), np.float32))
    sk._build_cached.cache_clear()
    np.testing.assert_array_equal(outs[0], outs[1])
    assert rel_err(outs[0], ref64(x, qt)) < TOL
    plan = lambda **kw: mgpu_sm90._unpack_plan("magic_bf16", True, True, 3, 8, 4, 16, **kw)
    assert not plan(scales_upfront=True).scales_upfront              # the switch (still off) wins
    monkeypatch.setattr(mgpu_sm90, "SCALES_UPFRONT", True)
    assert not plan().scales_upfront and plan(scales_upfront=True).scales_upfront


# (bits, group, K, N, M, rank): magic_fold's fold blocks are one group (64, 128 rows) or, per channel,
# the whole 512-row tile (four MMAs per block); 2/4-bit pair-slots are 64 rows
FOLD_CASES = [(3, 64, 1536, 128, 5, 16), (3, 128, 1024, 64, 3, 0), (3, None, 1536, 64, 1, 0),
              (4, 64, 1024, 64, 2, 0), (2, 128, 1024, 64, 9, 32)]


def _fold_config(m, kw, unpack="magic_fold"):
    import dataclasses
    return dataclasses.replace(mgpu_sm90.default_config(m, kw), unpack=unpack)


@pytest.mark.parametrize("bits,group,k,n,m,rank", FOLD_CASES)
def test_stream_k_magic_fold_interpret(bits, group, k, n, m, rank):
    """magic_fold (unscaled 128 + code A, scale and zero folded in float32) against float64: it rounds
    no weight to bf16, so it is at least as close as magic_bf16 on the same inputs."""
    rng = _rng()
    qt = make_weight(k, n, bits, group, rank, rng)
    kw = layout.prepare(qt, layout=layout.PAIRS_LAYOUT)
    x = make_x(m, k, rng)
    ref = ref64(x, qt)
    y = sk.matmul_stream_k(x, kw, config=_fold_config(m, kw), max_ctas=4, interpret=True)
    err = rel_err(y, ref)
    assert y.shape == (m, n) and err < TOL, err
    bf16 = sk.matmul_stream_k(x, kw, config=_fold_config(m, kw, "magic_bf16"), max_ctas=4, interpret=True)
    assert err <= rel_err(bf16, ref) * 1.05
    if rank:
        assert rel_err(y, ref64(x, qt, compensator=False)) > 5 * err


def test_magic_fold_is_stream_k_only():
    rng = _rng()
    kw = layout.prepare(make_weight(1024, 64, 3, 64, 0, rng), layout=layout.PAIRS_LAYOUT)
    import dataclasses
    cfg = dataclasses.replace(_fold_config(1, kw), schedule="split_k")
    with pytest.raises(ValueError, match="stream-K"):
        mgpu_sm90.matmul_mgpu(make_x(1, 1024, rng), kw, config=cfg, interpret=True)
    with pytest.raises(ValueError, match="whole pair-slots"):
        mgpu_sm90.fold_blocks(16, 512, 16)


@pytest.mark.gpu
@pytest.mark.skipif(not api._on_sm90(), reason="needs an sm90 (Hopper) GPU")
@pytest.mark.parametrize("bits,group", [(3, 64), (3, 128), (3, None), (2, 64), (4, 64)])
def test_stream_k_magic_fold_native_gpu(bits, group):
    rng = _rng()
    k, n = 2048, 1408
    for rank, ms in ((0, (1, 16, 64)), (32, (1, 3, 100))):
        qt = make_weight(k, n, bits, group, rank, rng)
        kw = layout.prepare(qt, layout=layout.PAIRS_LAYOUT)
        for m in ms:
            x = make_x(m, k, rng)
            ref = ref64(x, qt)
            y = sk.matmul_stream_k(x, kw, config=_fold_config(m, kw))
            err = rel_err(y, ref)
            assert err < TOL, (bits, group, m, rank, err)
            bf16 = sk.matmul_stream_k(x, kw, config=_fold_config(m, kw, "magic_bf16"))
            assert err <= rel_err(bf16, ref) * 1.05, (bits, group, m, rank)


def test_default_config_folds_small_blocks_only():
    rng = _rng()
    kw = layout.prepare(make_weight(1024, 64, 3, 64, 0, rng), layout=layout.PAIRS_LAYOUT)
    assert mgpu_sm90.default_config(1, kw).unpack == "magic_fold"
    assert mgpu_sm90.default_config(16, kw).unpack == "magic_fold"
    assert mgpu_sm90.default_config(64, kw).unpack == "magic_bf16"
    assert mgpu_sm90.default_config(1, kw, schedule="split_k").unpack == "magic_bf16"


@pytest.mark.parametrize("m_pad,k_pad,r", [(8, 384, 24), (16, 256, 32), (24, 256, 40)])
def test_compensator_xu_matches_float64(m_pad, k_pad, r):
    """x @ u for the compensator: float64 values rounded once to bf16, columns past the rank zero,
    padded K columns of x ignored; Rp from layout.rank_pad (32 at rank 24 and 32, 64 at 40)."""
    rng = _rng()
    k, rp = 320 if k_pad == 384 else 256, layout.rank_pad(r)
    xp = np.zeros((m_pad, k_pad), np.float32)
    xp[:, :k] = rng.standard_normal((m_pad, k))
    xp[:, k:] = 7.0                                   # must not count: only the first K columns are x
    u = rng.standard_normal((k, r)) * 0.05
    xb, ub = jnp.asarray(xp, jnp.bfloat16), jnp.asarray(u, jnp.bfloat16)
    got = np.asarray(mgpu_sm90.compensator_xu(xb, ub, k, rp), np.float64)
    want = np.asarray(xb[:, :k], np.float64) @ np.asarray(ub, np.float64)
    assert got.shape == (m_pad, rp)
    assert np.all(got[:, r:] == 0)
    np.testing.assert_allclose(got[:, :r], want, rtol=1e-2, atol=1e-2 * np.abs(want).max())


@pytest.mark.parametrize("bits,group,nf", [(3, None, 1), (4, 128, 2), (4, 64, 4), (3, 64, 8)])
def test_fold_group_sums_rows_padded_per_tile(bits, group, nf):
    """x's fold-block sums: R = 4-row multiples per K tile (128 B boxes at MB >= 8), the pad rows zero,
    the others float64 sums of x over each fold block."""
    rng = _rng()
    kw = layout.prepare(make_weight(1024, 64, bits, group, 0, rng), layout=layout.PAIRS_LAYOUT)
    xp = jnp.asarray(rng.standard_normal((8, kw.k_pad)), jnp.bfloat16)
    xs = np.asarray(mgpu_sm90.fold_group_sums(xp, bits=bits, slab=kw.slab, group_rows=kw.group_rows))
    r, tiles, f = mgpu_sm90.fold_rows_per_tile(nf), kw.k_pad // kw.tile_rows, kw.tile_rows // nf
    assert r % 4 == 0 and xs.shape == (tiles * r, 8)
    x64 = np.asarray(xp, np.float64).reshape(8, tiles, nf, f).sum(-1)          # [M, tiles, nf]
    got = xs.reshape(tiles, r, 8)
    np.testing.assert_allclose(got[:, :nf].transpose(2, 0, 1), x64, rtol=1e-5, atol=1e-4)
    assert np.all(got[:, nf:] == 0)


def test_fold_span_cap():
    """Fold blocks per run_scoped: capped (grouped launches pass their own cap), a divisor of nf, and
    within FOLD_ACC_COLS accumulator columns."""
    assert mgpu_sm90.fold_span(8, 8) == min(mgpu_sm90.FOLD_SPAN, 8)
    assert mgpu_sm90.fold_span(8, 8, 2) == 2
    assert mgpu_sm90.fold_span(6, 8, 4) == 3
    assert mgpu_sm90.fold_span(8, 64, 4) == 1


@pytest.mark.parametrize("wgs", [1, 2])
@pytest.mark.parametrize("k,n,m,ctas", [(1536, 256, 1, 4), (1536, 256, 12, 5)])
def test_stream_k_warp_specialized_matches(monkeypatch, k, n, m, ctas, wgs):
    """WARP_SPECIALIZED (a producer warpgroup issuing the loads, `wgs` compute warpgroups each running the
    step body on BN / wgs columns): the same partials as the one-warpgroup pipeline at the same BN and
    schedule, so the same output; magic_fold (its scope: up to 16 tokens, no compensator) with ranges that
    cross tiles, at M = 1 and 12; and the WS default config (BN = 64 per compute warpgroup) near float64."""
    monkeypatch.setattr(sk, "WS_COMPUTE_WGS", wgs)
    rng = _rng()
    qt = make_weight(k, n, 3, 64, 0, rng)
    kw = layout.prepare(qt, layout=layout.PAIRS_LAYOUT)
    x = make_x(m, k, rng)
    cfg = dataclasses.replace(mgpu_sm90.default_config(m, kw), block_n=64 * wgs)
    outs = _outputs_under(monkeypatch, "WARP_SPECIALIZED", (False, True), x, kw, config=cfg, max_ctas=ctas,
                          interpret=True)
    np.testing.assert_array_equal(outs[1], outs[0])
    y = sk.matmul_stream_k(x, kw, max_ctas=ctas, interpret=True)     # WARP_SPECIALIZED still set
    assert rel_err(y, ref64(x, qt)) < TOL


@pytest.mark.gpu
@pytest.mark.skipif(not api._on_sm90(), reason="needs an sm90 (Hopper) GPU")
@pytest.mark.parametrize("bits,group", [(3, 64), (2, 64), (4, 128)])
def test_stream_k_warp_specialized_native_gpu(monkeypatch, bits, group):
    """WARP_SPECIALIZED natively: against float64 and bit-equal to the one-warpgroup pipeline (the same step
    body on the same partials), M in its scope (magic_fold, up to 16 tokens), several CTA counts."""
    rng = _rng()
    k, n = 2048, 1408
    qt = make_weight(k, n, bits, group, 0, rng)
    kw = layout.prepare(qt, layout=layout.PAIRS_LAYOUT)
    for m in (1, 5, 16):
        x = make_x(m, k, rng)
        cfg = dataclasses.replace(mgpu_sm90.default_config(m, kw), block_n=64 * sk.WS_COMPUTE_WGS)
        for ctas in (7, 132):   # the same schedule for both pipelines: bit-equal
            outs = _outputs_under(monkeypatch, "WARP_SPECIALIZED", (False, True), x, kw, config=cfg, max_ctas=ctas)
            np.testing.assert_array_equal(outs[1], outs[0], err_msg=str((bits, group, m, ctas)))
            assert rel_err(jnp.asarray(outs[1]), ref64(x, qt)) < TOL, (bits, group, m, ctas)
        y = sk.matmul_stream_k(x, kw)    # WARP_SPECIALIZED's own config and CTA count
        assert rel_err(y, ref64(x, qt)) < TOL, (bits, group, m)
