"""The stream-K decode kernel's pre-pass (quant_matmul/prepass_sm90.py): x's pad, fold sums and per-tile x @ u.

Against plain jnp and float64 on fresh random inputs; CPU runs the kernel in GPU interpret mode (where
the zero padding TMA supplies natively is done by jnp), `gpu` tests run it natively on sm90, where rows
past M, columns past K and rank columns past r come from TMA's out-of-bounds fill.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import milo_jax  # noqa: F401  (import order: milo_jax before pallas_kernels)
from pallas_kernels.quant_matmul import api, layout, mgpu_sm90, prepass_sm90 as pp, stream_k_sm90 as sk
from tests.conftest import cuda_lowering_unavailable
from tests.test_quant_matmul import TOL, _rng, make_weight, make_x, ref64, rel_err


def _inputs(m, k, r, rng):
    x = make_x(m, k, rng)
    u = jnp.asarray(rng.standard_normal((k, r)) * 0.05, jnp.bfloat16) if r else None
    return x, u


def _check_prepass(m, k, r, mb, f_rows, interpret):
    rng = _rng()
    tile_rows, rank_pad = 512, layout.rank_pad(r) if r else 0
    k_pad = -(-k // tile_rows) * tile_rows
    x, u = _inputs(m, k, r, rng)
    xp, xs, parts = pp.prepass(x, u, mb=mb, k_pad=k_pad, tile_rows=tile_rows, f_rows=f_rows, rank_pad=rank_pad,
                               interpret=interpret)
    m_pad = -(-m // mb) * mb
    want_xp = jnp.pad(x.astype(jnp.bfloat16), ((0, m_pad - m), (0, k_pad - k)))
    np.testing.assert_array_equal(np.asarray(xp, np.float32), np.asarray(want_xp, np.float32))
    np.testing.assert_allclose(np.asarray(xs), np.asarray(mgpu_sm90.fold_group_sums(
        want_xp, bits=3, slab=16, group_rows=f_rows if f_rows < tile_rows else k_pad)), rtol=1e-5, atol=1e-5)
    if not r:
        assert parts is None
        return
    want_parts = pp.shares_reference(want_xp, u, tile_rows=tile_rows, rank_pad=rank_pad)
    # each share is one bf16 rounding of a float32 sum: at most an ulp (2^-8 relative) apart
    got, want = np.asarray(parts, np.float32), np.asarray(want_parts, np.float32)
    np.testing.assert_allclose(got, want, rtol=2 ** -7, atol=1e-6)
    # the shares sum to x @ u (float64) within the bf16 roundings
    xu64 = np.asarray(x, np.float64) @ np.asarray(u, np.float64)
    err = np.abs(got.sum(0)[:m, :r] - xu64).max() / np.abs(xu64).max()
    assert err < 1e-2, err
    assert np.abs(got[:, m:]).max(initial=0) == 0 and np.abs(got[:, :, r:]).max(initial=0) == 0


# (M, K, rank, MB, F): one token (the decode case), a K that ends mid-tile, rank under its pad, 64-token
# blocks over two blocks, per-channel (one fold block per tile), no compensator (pad and sums only)
CASES = [(1, 1024, 32, 8, 64), (5, 1408, 16, 8, 128), (16, 1536, 64, 16, 64), (72, 1024, 32, 64, 512),
         (3, 1408, 0, 8, 64)]


@pytest.mark.parametrize("short", [False, True])
@pytest.mark.parametrize("m,k,r,mb,f_rows", CASES)
def test_prepass_interpret(m, k, r, mb, f_rows, short, monkeypatch):
    """short: boxes of the token block's rows only; the wgmma rows past them read shared memory that
    interpret mode leaves NaN, so a leak into a stored row would fail the comparisons."""
    monkeypatch.setattr(pp, "SHORT_BOXES", short)
    _check_prepass(m, k, r, mb, f_rows, interpret=True)


def test_usable_names_the_limits():
    assert pp.usable(1, 4096, 8, 32, 32, 8)
    assert pp.usable(1, 4096, 8, 0, 0, 8)                     # no compensator: pad and sums only
    assert not pp.usable(12, 4096, 16, 32, 32, 8)             # 12 rows: not one 8-row tile, not a multiple of 8
    assert not pp.usable(1, 4100, 8, 32, 32, 9)               # K not a multiple of 64
    assert not pp.usable(1, 4096, 8, 20, 32, 8)               # rank rows of 40 bytes: not a TMA stride
    assert not pp.usable(128, 14336, 64, 32, 32, 28)          # 28 x 64 x 32 shares overflow shared memory
    assert not pp.usable(1, 1024, 8, 128, 128, 2)             # rank 128: u's 512 x 128 tile is too big
    assert pp.usable(1, 1024, 8, 128, 128, 4, tile_rows=256)  # ... with 4-bit tiles of 256 rows it fits


@pytest.mark.parametrize("k,n,m,rank", [(1536, 128, 5, 16), (1024, 64, 1, 32), (2048, 128, 16, 64)])
def test_stream_k_with_prepass_matches_xla_ops(k, n, m, rank, monkeypatch):
    """The decode kernel fed by the pre-pass (shares of x @ u) against the same kernel fed by XLA's ops,
    and both against float64."""
    rng = _rng()
    qt = make_weight(k, n, 3, 64, rank, rng)
    kw = layout.prepare(qt, layout=layout.PAIRS_LAYOUT)
    x = make_x(m, k, rng)
    ref = ref64(x, qt)
    outs = {}
    calls = []
    real = pp.prepass
    monkeypatch.setattr(pp, "prepass", lambda *a, **kw_: calls.append(1) or real(*a, **kw_))
    for on in (True, False):
        monkeypatch.setattr(sk, "PREPASS", on)
        outs[on] = sk.matmul_stream_k(x, kw, max_ctas=4, interpret=True)
    assert calls == [1]                          # the pre-pass ran once, with PREPASS on only
    for on, y in outs.items():
        assert rel_err(y, ref) < TOL, on
    assert rel_err(outs[True], ref64(x, qt, compensator=False)) > 5 * rel_err(outs[True], ref)
    assert rel_err(outs[True], outs[False]) < TOL


def test_stream_k_rank0_prepass_switch(monkeypatch):
    """Without a compensator the pre-pass runs only under PREPASS_RANK0 (magic_fold: it gives the sums)."""
    rng = _rng()
    qt = make_weight(1536, 64, 3, 64, 0, rng)
    kw = layout.prepare(qt, layout=layout.PAIRS_LAYOUT)
    x = make_x(2, 1536, rng)
    calls = []
    real = pp.prepass
    monkeypatch.setattr(pp, "prepass", lambda *a, **kw_: calls.append(1) or real(*a, **kw_))
    outs = {}
    for on in (False, True):
        monkeypatch.setattr(sk, "PREPASS_RANK0", on)
        outs[on] = np.asarray(sk.matmul_stream_k(x, kw, max_ctas=3, interpret=True), np.float32)
    assert calls == [1]
    np.testing.assert_allclose(outs[True], outs[False], rtol=1e-2, atol=1e-3)
    assert rel_err(outs[True], ref64(x, qt)) < TOL


def _lowered_rank32(k: int):
    """(stream-K call at M = 1 on a rank-32 3-bit weight lowered for CUDA from the CPU, as text; its weights),
    skipping only where this jaxlib cannot lower Mosaic GPU kernels at all (conftest's probe)."""
    reason = cuda_lowering_unavailable()
    if reason:
        pytest.skip(reason)
    kw = layout.prepare(make_weight(k, 128, 3, 64, 32, _rng()), layout=layout.PAIRS_LAYOUT)
    f = jax.jit(lambda x, kw: sk.matmul_stream_k(x, kw, max_ctas=264))
    return f.trace(jax.ShapeDtypeStruct((1, k), jnp.bfloat16), kw).lower(lowering_platforms=("cuda",)).as_text(), kw


@pytest.mark.parametrize("short", [False, True])
def test_prepass_lowers_for_sm90_on_cpu(short, monkeypatch):
    monkeypatch.setattr(pp, "SHORT_BOXES", short)
    text, _ = _lowered_rank32(1024)
    assert text.count("mosaic_gpu") >= 2          # the pre-pass and the decode kernel


@pytest.mark.gpu
@pytest.mark.skipif(not api._on_sm90(), reason="needs an sm90 (Hopper) GPU")
@pytest.mark.parametrize("short", [False, True])
@pytest.mark.parametrize("m,k,r,mb,f_rows", CASES)
def test_prepass_native_gpu(m, k, r, mb, f_rows, short, monkeypatch):
    monkeypatch.setattr(pp, "SHORT_BOXES", short)
    _check_prepass(m, k, r, mb, f_rows, interpret=False)


@pytest.mark.gpu
@pytest.mark.skipif(not api._on_sm90(), reason="needs an sm90 (Hopper) GPU")
def test_stream_k_with_prepass_native_gpu(monkeypatch):
    rng = _rng()
    monkeypatch.setattr(sk, "PREPASS_RANK0", True)
    for k, n, rank, ms in ((4096, 1408, 32, (1, 3, 8, 16, 64)), (1408, 2048, 16, (1, 5)), (2048, 1408, 64, (1, 16)),
                           (4096, 1408, 0, (1, 16))):
        qt = make_weight(k, n, 3, 64, rank, rng)
        kw = layout.prepare(qt, layout=layout.PAIRS_LAYOUT)
        for m in ms:
            x = make_x(m, k, rng)
            ref = ref64(x, qt)
            for on in (True, False):
                monkeypatch.setattr(sk, "PREPASS", on)
                monkeypatch.setattr(sk, "PREPASS_RANK0", on)
                if on:
                    y = sk.matmul_stream_k(x, kw)
                else:
                    y_xla = sk.matmul_stream_k(x, kw)
            assert rel_err(y, ref) < TOL, (k, rank, m)
            assert rel_err(y, y_xla) < TOL, (k, rank, m)
