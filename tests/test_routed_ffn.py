"""grouped_matmul.routed_ffn (the routed experts' FFN in the padded row domain) against a float64
per-pair reference and against the sorted path (grouped_matmul per projection), in GPU interpret
mode: uniform 3-bit, a compensator, mixed bit widths with the same and with a different expert
order in the down projection, empty experts, every pair on one expert."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from milo_jax.models.moe import sort_by_expert
from pallas_kernels.grouped_matmul import api, mgpu_sm90, routed_ffn as rf
from tests.conftest import cuda_lowering_unavailable
from tests.test_grouped_matmul import dense64, quantized_expert

H, I, E, K_TOP = 256, 128, 4, 2
TOL = 1.5e-2   # bf16 x, bf16 SiLU(gate) * up, bf16 codes' products, f32 accumulation


def _rng(seed):
    return np.random.default_rng(7100 + seed)


def _stack(parts, k, n):
    return dataclasses.replace(jax.tree_util.tree_map(lambda *a: jnp.stack(a), *parts), shape=(len(parts), k, n))


def _layer(rng, gate_bits, down_bits, rank=0, inter=I):
    """(gate_up GroupedKernelWeights, down GroupedKernelWeights, float64 experts (G, U, D) per expert)."""
    def proj(bits, k, n):
        parts = [quantized_expert(k, n, b, 64, rank, rng) for b in bits]
        uniform = len(set(bits)) == 1
        return parts, mgpu_sm90.prepare_grouped(_stack(parts, k, n) if uniform else parts)
    g_parts, g = proj(gate_bits, H, inter)
    u_parts, u = proj(gate_bits, H, inter)
    d_parts, d = proj(down_bits, inter, H)
    experts64 = [tuple(dense64(p) for p in ps) for ps in zip(g_parts, u_parts, d_parts)]
    return mgpu_sm90.fuse_columns(g, u), d, experts64


def _apply64(wu):
    w, u, v = wu
    return (lambda a: a @ w + ((a @ u) @ v if u is not None else 0.0))


def ffn64(x, weights, ids, experts64):
    x64 = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    y = np.zeros((x64.shape[0], experts64[0][2][0].shape[1]))
    for t in range(x64.shape[0]):
        for j in range(ids.shape[1]):
            g, u, d = (_apply64(p) for p in experts64[int(ids[t, j])])
            a = x64[t:t + 1]
            gv = g(a)
            h = gv / (1 + np.exp(-gv)) * u(a)
            y[t] += float(weights[t, j]) * d(h)[0]
    return y


def _ffn_under(monkeypatch, settings: dict, x, w, ids, gate_up, down):
    """The interpret-mode routed FFN as float32 numpy with routed_ffn's module constants set to `settings`."""
    for name, value in settings.items():
        monkeypatch.setattr(rf, name, value)
    return np.asarray(rf.routed_ffn(x, w, ids, gate_up, down, interpret=True), np.float32)


def rel_err(y, y64):
    y = np.asarray(jnp.asarray(y, jnp.float32), np.float64)
    assert np.all(np.isfinite(y))
    return float(np.linalg.norm(y - y64) / np.linalg.norm(y64))


def routings(t, rng):
    """(ids [T, k], weights [T, k]): random distinct experts per token; every token on experts 0 and
    3 (1 and 2 empty)."""
    ids = np.stack([rng.choice(E, K_TOP, replace=False) for _ in range(t)]).astype(np.int32)
    two = np.tile(np.asarray([[3, 0]], np.int32), (t, 1))
    w = rng.random((t, K_TOP)).astype(np.float32) + 0.1
    w /= w.sum(1, keepdims=True)
    return [(jnp.asarray(ids), jnp.asarray(w)), (jnp.asarray(two), jnp.asarray(w))]


def sorted_ffn(x, weights, ids, gate_up, down):
    """The per-projection path StackedExperts takes otherwise (sort, grouped_matmul, inverse)."""
    t, k = ids.shape
    order, inverse, gs = sort_by_expert(ids, E)
    xs = jnp.take(x, order // k, axis=0)
    gu = api.grouped_matmul(xs, gate_up, gs, impl="kernel", interpret=True)
    inter = gate_up.n // 2
    h = jax.nn.silu(gu[:, :inter]) * gu[:, inter:]
    ys = api.grouped_matmul(h, down, gs, impl="kernel", interpret=True)
    y = jnp.take(ys, inverse, axis=0).reshape(t, k, -1)
    return jnp.sum(y.astype(jnp.float32) * weights[..., None], axis=1)


def test_padded_rows_are_each_experts_segment_in_pair_order():
    ids = jnp.asarray([[2, 0], [0, 3], [2, 0]], jnp.int32)
    order = (3, 0, 1, 2)                       # positions: expert 3 first
    dest, counts = rf.padded_rows(ids, order, 8)
    # expert 3: 1 pair -> 1 block at rows 0..7; expert 0: 3 pairs at 8..; 1: none; 2: 2 pairs at 16..
    np.testing.assert_array_equal(np.asarray(counts), [1, 1, 0, 1])
    np.testing.assert_array_equal(np.asarray(dest), [16, 8, 9, 0, 17, 10])


@pytest.mark.parametrize("unroll", [0, 64])
def test_padded_rows_unrolled_and_cumsum_forms_agree(monkeypatch, unroll):
    """The unrolled compares (decode) and the cumulative sums give the same rows and blocks on random
    routings, 8 / 16 / 64 experts, an expert holding more pairs than MB, and each padded row's source
    pair (padded_sources) is the inverse of dest with -1 on every padding row."""
    rng = np.random.default_rng(7150 + unroll)
    for e, t, k, mb in ((8, 1, 2, 8), (8, 3, 2, 8), (16, 5, 4, 8), (64, 2, 6, 8), (4, 12, 2, 8), (8, 6, 2, 16)):
        order = tuple(int(i) for i in rng.permutation(e))
        skew = rng.random() < 0.5
        ids = np.stack([rng.choice(min(e, k + 1) if skew else e, k, replace=False) for _ in range(t)]).astype(np.int32)
        monkeypatch.setattr(rf, "UNROLL_PAIRS", 0)
        want_dest, want_counts = (np.asarray(a) for a in rf.padded_rows(jnp.asarray(ids), order, mb))
        monkeypatch.setattr(rf, "UNROLL_PAIRS", unroll)
        dest, counts = (np.asarray(a) for a in jax.jit(rf.padded_rows, static_argnums=(1, 2))(jnp.asarray(ids), order, mb))
        np.testing.assert_array_equal(counts, want_counts, err_msg=str((e, t, k, ids)))
        np.testing.assert_array_equal(dest, want_dest, err_msg=str((e, t, k, ids)))
        rows_pad = int(counts.sum()) * mb + mb
        src = np.asarray(rf.padded_sources(jnp.asarray(dest), rows_pad))
        np.testing.assert_array_equal(src[dest], np.arange(t * k))
        assert (src >= 0).sum() == t * k and set(src[src < 0]) <= {-1}


def test_row_gather_row_scatter_and_split_sum_forms_agree(monkeypatch):
    """The padded buffers built by gathering rows or scattering them (the mixed re-pad takes the gather up
    to UNROLL_PAIRS pairs, the scatter above) give the same FFN, also for a down projection with its own
    expert order (the re-pad between the launches, its gather with and without REPAD_BARRIER)."""
    rng = _rng(5)
    gate_up, down, _ = _layer(rng, (2, 3, 4, 3), (4, 4, 2, 3))
    x = jnp.asarray(rng.standard_normal((2, H)), jnp.bfloat16)   # 4 pairs: the unrolled re-pad gather
    ids, w = routings(2, rng)[0]
    dest, _ = rf.padded_rows(ids, gate_up.order, 8)
    src = rf.padded_sources(dest, 32)
    np.testing.assert_array_equal(np.asarray(rf.gather_rows(x, jnp.where(src >= 0, src // K_TOP, -1))),
                                  np.asarray(rf.scatter_rows(jnp.take(x, jnp.arange(4) // K_TOP, axis=0), dest, 32)))
    outs = [_ffn_under(monkeypatch, dict(UNROLL_PAIRS=unroll, REPAD_BARRIER=barrier), x, w, ids, gate_up, down)
            for unroll, barrier in ((8, True), (0, True), (8, False))]
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_allclose(outs[0], outs[2], rtol=1e-2, atol=1e-3)   # the re-pad gather without the barrier


def test_rows_out_and_columns_out_give_the_same_ffn(monkeypatch):
    """ROWS_OUT (fold launches store [rows, splits * N], the one-class and the multi-class kernel) and the
    column layout ([splits * N, rows]) hold the same numbers, transposed; the FFN and the sorted path
    (grouped_matmul's read-back) agree across them and with float64, split-K included. (The other tests
    run the multi-class kernel by rows, the default.)"""
    rng = _rng(9)
    gate_up, down, experts64 = _layer(rng, (3,) * E, (3,) * E, inter=1024)   # the down launch splits K
    x = jnp.asarray(rng.standard_normal((2, H)), jnp.bfloat16)
    ids, w = routings(2, rng)[0]
    m = 2 * K_TOP
    second = rf.launch_for(m, down, interpret=True)
    assert second.splits > 1
    dest, counts = rf.padded_rows(ids, second.order, second.mb)
    h = jnp.asarray(rng.standard_normal((second.rows_pad, down.k)), jnp.bfloat16)
    outs, ffns, sorted_ys = {}, {}, {}
    for rows in (True, False):
        monkeypatch.setattr(mgpu_sm90, "ROWS_OUT", rows)
        launch = rf.launch_for(m, down, interpret=True)
        assert launch.rows == rows
        out = np.asarray(launch.run(h, counts), np.float32)
        assert out.shape == ((launch.rows_pad, launch.splits * down.n) if rows else
                             (launch.splits * down.n, launch.rows_pad))
        outs[rows] = out
        ffns[rows] = np.asarray(rf.routed_ffn(x, w, ids, gate_up, down, interpret=True), np.float32)
        sorted_ys[rows] = np.asarray(sorted_ffn(x, w, ids, gate_up, down), np.float32)
    # blocks past the last real one are written by neither layout: compare the real blocks
    real = int(np.asarray(counts).sum()) * second.mb
    np.testing.assert_array_equal(outs[True][:real], outs[False][:, :real].T)
    y64 = ffn64(x, np.asarray(w), np.asarray(ids), experts64)
    for rows in (True, False):
        assert rel_err(ffns[rows], y64) < TOL and rel_err(sorted_ys[rows], y64) < TOL
    np.testing.assert_allclose(ffns[True], ffns[False], rtol=1e-2, atol=1e-3)   # split sums in another order


def test_min_split_rows_floors_the_split_k(monkeypatch):
    """MIN_SPLIT_ROWS leaves no split fewer K rows (the deep-K down projection takes fewer splits), and the
    FFN with fewer down splits still matches float64."""
    rng = _rng(6)
    gate_up, down, experts64 = _layer(rng, (3,) * E, (3,) * E, inter=1024)   # two 512-row K tiles in down
    c = down.classes[0]
    assert mgpu_sm90.default_config(2, c).k_splits == 2
    monkeypatch.setattr(mgpu_sm90, "MIN_SPLIT_ROWS", 1024)
    assert mgpu_sm90.default_config(2, c).k_splits == 1
    assert rf.launch_for(2, down).splits == 1
    x = jnp.asarray(rng.standard_normal((1, H)), jnp.bfloat16)
    ids, w = routings(1, rng)[0]
    y = rf.routed_ffn(x, w, ids, gate_up, down, interpret=True)
    assert rel_err(y, ffn64(x, np.asarray(w), np.asarray(ids), experts64)) < TOL


@pytest.mark.parametrize("case", ["uniform3", "rank8", "mixed_same_order", "mixed_other_order"])
def test_routed_ffn_matches_float64_and_the_sorted_path(case):
    rng = _rng(hash(case) % 97)
    gate_bits, down_bits, rank = {
        "uniform3": ((3,) * E, (3,) * E, 0),
        "rank8": ((3,) * E, (3,) * E, 8),
        "mixed_same_order": ((2, 3, 4, 3), (2, 3, 4, 3), 0),
        "mixed_other_order": ((2, 3, 4, 3), (4, 4, 2, 3), 0),
    }[case]
    gate_up, down, experts64 = _layer(rng, gate_bits, down_bits, rank)
    f = jax.jit(lambda x, w, i, a, b: api.routed_ffn(x, w, i, a, b, interpret=True))
    for t in (1, 5):
        assert rf.applies(t * K_TOP, gate_up, down)
        x = jnp.asarray(rng.standard_normal((t, H)), jnp.bfloat16)
        for ids, w in routings(t, rng):
            y = f(x, w, ids, gate_up, down)
            assert y.shape == (t, H) and y.dtype == jnp.bfloat16
            y64 = ffn64(x, np.asarray(w), np.asarray(ids), experts64)
            assert rel_err(y, y64) < TOL, (case, t, np.asarray(ids))
            ys = sorted_ffn(x, w, ids, gate_up, down)
            assert rel_err(y, np.asarray(ys, np.float64)) < TOL, (case, t)


def test_applies_and_refuses():
    rng = _rng(1)
    gate_up, down, _ = _layer(rng, (3,) * E, (3,) * E)
    assert rf.applies(2, gate_up, down)
    assert not rf.applies(2, gate_up, gate_up)                 # gate_up.n must be 2 * down.k
    assert not rf.applies(mgpu_sm90.PREFILL_ROWS, gate_up, down)   # the prefill path's rows
    # several launches per projection (a compensator in a mixed layer): the sorted path
    mixed_rank = mgpu_sm90.prepare_grouped([quantized_expert(I, H, b, 64, 8, rng) for b in (2, 3, 3, 3)])
    assert not rf.applies(2, gate_up, mixed_rank)
    assert not api.routed_ffn_applies(2, gate_up, down)        # CPU, not interpret: the sorted path
    assert api.routed_ffn_applies(2, gate_up, down, interpret=True)
    with pytest.raises(ValueError, match="one padded launch each"):
        rf.routed_ffn(jnp.ones((1, H), jnp.bfloat16), jnp.ones((1, 2)), jnp.zeros((1, 2), jnp.int32),
                      gate_up, mixed_rank, interpret=True)


def test_routed_ffn_lowers_natively_on_cpu():
    """Two Mosaic GPU launches and no sort in the lowered FFN (1 token, top-2)."""
    reason = cuda_lowering_unavailable()
    if reason:
        pytest.skip(reason)
    rng = _rng(2)
    gate_up, down, _ = _layer(rng, (3,) * E, (3,) * E)
    f = jax.jit(lambda x, w, i: rf.routed_ffn(x, w, i, gate_up, down))
    text = f.trace(jax.ShapeDtypeStruct((1, H), jnp.bfloat16), jax.ShapeDtypeStruct((1, 2), jnp.float32),
                   jax.ShapeDtypeStruct((1, 2), jnp.int32)).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu") == 2
    assert "stablehlo.sort" not in text


@pytest.mark.gpu
@pytest.mark.skipif(not api._on_sm90(), reason="needs an sm90 (Hopper) GPU")
@pytest.mark.parametrize("case", ["uniform3", "mixed_other_order", "mixed_split_k"])
def test_sm90_native_routed_ffn(case):
    """mixed_split_k: the multi-class down launch splits K (Mixtral's does: 14 splits), which the E = 4,
    I = 128 layers do not; a change that passed the other cases natively failed there (grouped NOTES, stop 27)."""
    rng = _rng(3)
    gate_bits, down_bits = {"uniform3": ((3,) * E, (3,) * E), "mixed_other_order": ((2, 3, 4, 3), (4, 4, 2, 3)),
                            "mixed_split_k": ((2, 3, 4, 3), (4, 4, 2, 3))}[case]
    gate_up, down, experts64 = _layer(rng, gate_bits, down_bits, inter=1024 if case == "mixed_split_k" else I)
    assert api.routed_ffn_applies(2, gate_up, down)
    if case == "mixed_split_k":
        assert rf.launch_for(2, down).splits > 1
    f = jax.jit(lambda x, w, i, a, b: api.routed_ffn(x, w, i, a, b))
    for t in (1, 3, 40):
        x = jnp.asarray(rng.standard_normal((t, H)), jnp.bfloat16)
        for ids, w in routings(t, rng):
            y = f(x, w, ids, gate_up, down)
            assert rel_err(y, ffn64(x, np.asarray(w), np.asarray(ids), experts64)) < TOL, (case, t)


def test_position_sorted_prefill_is_the_same_ffn(monkeypatch):
    """POSITION_SORTED_PREFILL (experts renamed by gate/up's class positions before the sort, so the
    prefill GEMMs permute no rows) gives the sorted path's FFN at prefill rows, for a down projection
    ordered like gate/up and one ordered otherwise; the renamed weights are the same arrays."""
    from milo_jax.models import moe
    from milo_jax.models.kernel_weights import FusedIntoGate
    rng = _rng(7)
    t = mgpu_sm90.PREFILL_ROWS // K_TOP
    for down_bits in ((2, 3, 4, 3), (4, 4, 2, 3)):
        gate_up, down, experts64 = _layer(rng, (2, 3, 4, 3), down_bits)
        new_up, new_down, new_ids = moe._by_position(gate_up, down, jnp.asarray([[0, 1]], jnp.int32), t * K_TOP)
        pos = mgpu_sm90.positions(gate_up.order)
        assert not np.array_equal(pos, np.arange(E))
        assert [c.experts for c in new_up.classes] == [tuple(int(pos[e]) for e in c.experts) for c in gate_up.classes]
        assert new_up.classes[0].codes is gate_up.classes[0].codes
        np.testing.assert_array_equal(np.asarray(new_ids), pos[[[0, 1]]])
        layer = moe.StackedExperts(E, H, I)
        layer.gate_proj.set_value(gate_up)
        layer.up_proj.set_value(FusedIntoGate(split=I))
        layer.down_proj.set_value(down)
        x = jnp.asarray(rng.standard_normal((t, H)), jnp.bfloat16)
        ids = jnp.asarray(np.stack([rng.choice(E, K_TOP, replace=False) for _ in range(t)]), jnp.int32)
        w = jnp.asarray(rng.random((t, K_TOP)) + 0.1, jnp.float32)
        outs = []
        for on in (False, True):
            monkeypatch.setattr(moe, "POSITION_SORTED_PREFILL", on)
            outs.append(np.asarray(jax.jit(lambda a, b, c: layer(a, b, c))(x, w, ids), np.float32))
        np.testing.assert_allclose(outs[1], outs[0], rtol=2e-2, atol=2e-3)
        sub = slice(0, 6)
        y64 = ffn64(x[sub], np.asarray(w)[sub], np.asarray(ids)[sub], experts64)
        assert rel_err(outs[1][sub], y64) < TOL


def test_decode_stages_follow_the_unpack(monkeypatch):
    """The fold launches (decode rows) take DECODE_STAGES, the others 2; the FFN is the same either way."""
    rng = _rng(6)
    gate_up, down, experts64 = _layer(rng, (3,) * E, (3,) * E)
    c = gate_up.classes[0]
    fold_cfg = mgpu_sm90.default_config(2, c)
    assert fold_cfg.unpack == "magic_fold" and fold_cfg.stages == mgpu_sm90.DECODE_STAGES
    wide = mgpu_sm90.default_config(512, c)                 # MB 64: magic_bf16
    assert wide.unpack != "magic_fold" and wide.stages == 2
    x = jnp.asarray(rng.standard_normal((1, H)), jnp.bfloat16)
    ids, w = routings(1, rng)[0]
    ys = {}
    for stages in (2, 3):
        monkeypatch.setattr(mgpu_sm90, "DECODE_STAGES", stages)
        ys[stages] = np.asarray(rf.routed_ffn(x, w, ids, gate_up, down, interpret=True), np.float32)
    np.testing.assert_array_equal(ys[2], ys[3])
    assert rel_err(ys[3], ffn64(x, np.asarray(w), np.asarray(ids), experts64)) < TOL


def test_reduce_splits_lowers_on_cpu_and_stays_off_in_interpret_mode(monkeypatch):
    """REDUCE_SPLITS (TMA reduce-add into a zeroed Ref, native only): the FFN lowers for CUDA with the
    split-K launch adding its partials in place (a Ref in, no partials out), and interpret runs keep the
    partials (GPU interpret mode has no reduce-add) and the same result."""
    reason = cuda_lowering_unavailable()
    rng = _rng(7)
    gate_up, down, experts64 = _layer(rng, (3,) * E, (3,) * E, inter=1024)    # the down launch splits K
    assert rf.launch_for(2, down).splits > 1
    monkeypatch.setattr(mgpu_sm90, "REDUCE_SPLITS", True)
    assert rf.launch_for(2, down, interpret=True).splits > 1            # interpret: partials as before
    x = jnp.asarray(rng.standard_normal((1, H)), jnp.bfloat16)
    ids, w = routings(1, rng)[0]
    y = rf.routed_ffn(x, w, ids, gate_up, down, interpret=True)
    assert rel_err(y, ffn64(x, np.asarray(w), np.asarray(ids), experts64)) < TOL
    if reason:
        pytest.skip(reason)
    assert rf.launch_for(2, down).splits == 1
    f = jax.jit(lambda x, w, i: rf.routed_ffn(x, w, i, gate_up, down))
    text = f.trace(jax.ShapeDtypeStruct((1, H), jnp.bfloat16), jax.ShapeDtypeStruct((1, 2), jnp.float32),
                   jax.ShapeDtypeStruct((1, 2), jnp.int32)).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu") == 2 and text.count("output_operand_aliases") == 1   # the Ref
    with pytest.raises(ValueError, match="native run"):
        c = down.classes[0]
        cfg, nb = mgpu_sm90.class_config(2, c, None)
        mgpu_sm90.build(c.bits, c.slab, c.group_rows, c.k_pad, c.n, len(c.experts), nb, 0, cfg, True,
                        reduce_splits=True)


@pytest.mark.gpu
@pytest.mark.skipif(not api._on_sm90(), reason="needs an sm90 (Hopper) GPU")
@pytest.mark.parametrize("rank", [0, 8])
def test_sm90_native_routed_ffn_reduce_splits(rank, monkeypatch):
    rng = _rng(8)
    gate_up, down, experts64 = _layer(rng, (3,) * E, (3,) * E, rank, inter=1024)
    assert rf.launch_for(2, down).splits > 1
    f = jax.jit(lambda x, w, i, a, b: api.routed_ffn(x, w, i, a, b))
    for t in (1, 3, 8):
        x = jnp.asarray(rng.standard_normal((t, H)), jnp.bfloat16)
        for ids, w in routings(t, rng):
            monkeypatch.setattr(mgpu_sm90, "REDUCE_SPLITS", True)
            y = f(x, w, ids, gate_up, down)
            monkeypatch.setattr(mgpu_sm90, "REDUCE_SPLITS", False)
            y_parts = jax.jit(lambda x, w, i, a, b: api.routed_ffn(x, w, i, a, b))(x, w, ids, gate_up, down)
            ref = ffn64(x, np.asarray(w), np.asarray(ids), experts64)
            assert rel_err(y, ref) < TOL, (rank, t)
            assert rel_err(y, np.asarray(y_parts, np.float64)) < TOL / 4, (rank, t)
