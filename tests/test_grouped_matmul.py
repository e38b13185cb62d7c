"""grouped_matmul (MoE): reference, masked cross-check and API against a float64 per-expert numpy
reference on random routings (empty experts, every row on one expert, rows past the groups), with
float, stacked quantized and mixed-bit-width per-expert weights (with and without compensators)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import milo_jax
from milo_jax.quant import packing
from pallas_kernels.grouped_matmul import api
from tests.conftest import cuda_lowering_unavailable

_SEED = [0]


def _rng():
    _SEED[0] += 1
    return np.random.default_rng(2000 + _SEED[0])


def quantized_expert(k, n, bits, group_size, rank, rng):
    """Heavy-tailed random W [K, N], RTN-quantized, plus a random compensator of `rank`."""
    w = rng.standard_t(df=4, size=(k, n)).astype(np.float32) * 0.02
    qt = milo_jax.quantize_tensor(jnp.asarray(w), bits=bits, group_size=group_size, method="rtn")
    if rank:
        qt = dataclasses.replace(
            qt, u=jnp.asarray(rng.standard_normal((k, rank)) * 0.05, jnp.bfloat16),
            v=jnp.asarray(rng.standard_normal((rank, n)) * 0.05, jnp.bfloat16))
    return qt


def dense64(qt):
    """(W_hat [K, N], u, v) in float64 from the packed codes (numpy); a float expert as it is."""
    if isinstance(qt, jax.Array):
        return np.asarray(qt.astype(jnp.float32), np.float64), None, None
    q = np.asarray(packing.unpack(qt.codes, qt.bits, qt.k, qt.slab), np.float64)
    g = qt.group_size
    s = np.repeat(np.asarray(qt.scales, np.float64), g, axis=-2)
    z = np.repeat(np.asarray(qt.zeros, np.float64), g, axis=-2)
    w = s * (q - z)
    if qt.u is None:
        return w, None, None
    return w, np.asarray(jnp.asarray(qt.u, jnp.float32), np.float64), np.asarray(jnp.asarray(qt.v, jnp.float32), np.float64)


def ref64(x, experts64, group_sizes):
    """y [M, N] float64: a loop over experts and their row segments (rows past the groups stay 0)."""
    x64 = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    n = experts64[0][0].shape[1]
    y = np.zeros((x64.shape[0], n))
    start = 0
    for (w, u, v), g in zip(experts64, np.asarray(group_sizes)):
        rows = x64[start:start + g]
        y[start:start + g] = rows @ w + ((rows @ u) @ v if u is not None else 0.0)
        start += g
    return y


def rel_err(y, y64):
    y = np.asarray(jnp.asarray(y, jnp.float32), np.float64)
    assert np.all(np.isfinite(y))
    return float(np.linalg.norm(y - y64) / max(np.linalg.norm(y64), 1e-30))


def routings(m, e, rng):
    """Group sizes [E] for: random, some empty experts, all rows on one expert, fewer rows than M."""
    out = [np.bincount(rng.integers(0, e, m), minlength=e)]
    sparse = np.zeros(e, np.int64)
    sparse[rng.choice(e, 2, replace=False)] = [m // 3, m - m // 3]
    out.append(sparse)
    one = np.zeros(e, np.int64)
    one[e - 1] = m
    out.append(one)
    short = np.bincount(rng.integers(0, e, m - 3), minlength=e)         # 3 rows past the groups
    out.append(short)
    return [jnp.asarray(g, jnp.int32) for g in out]


masked = jax.jit(lambda x, w, gs: api.grouped_matmul(x, w, gs, impl="masked"))

TOL_BF16 = 1e-2    # bf16 weights / x / output with f32 accumulation lands near 3e-3


# ------------------------------------------------------------------------------- float weights
def test_float32_weights_match_float64():
    rng = _rng()
    e, k, n, m = 5, 48, 40, 23
    w = rng.standard_normal((e, k, n)).astype(np.float32)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    experts64 = [(w[i].astype(np.float64), None, None) for i in range(e)]
    f = jax.jit(api.grouped_matmul)
    for gs in routings(m, e, rng):
        y = f(x, jnp.asarray(w), gs)
        assert y.shape == (m, n) and y.dtype == jnp.float32
        y64 = ref64(x, experts64, gs)
        assert rel_err(y, y64) < 1e-5
        assert np.all(np.asarray(y)[int(gs.sum()):] == 0)
        ym = masked(x, jnp.asarray(w), gs)
        assert rel_err(ym, y64) < 1e-5


def test_bf16_weights_are_ragged_dot():
    rng = _rng()
    e, k, n, m = 4, 64, 32, 17
    w = jnp.asarray(rng.standard_normal((e, k, n)), jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    experts64 = [(np.asarray(w[i].astype(jnp.float32), np.float64), None, None) for i in range(e)]
    for gs in routings(m, e, rng):
        y = api.grouped_matmul(x, w, gs)
        assert y.dtype == jnp.bfloat16
        base = jax.lax.ragged_dot(x, w, gs, preferred_element_type=jnp.float32).astype(jnp.bfloat16)
        np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(base, np.float32))
        assert rel_err(y, ref64(x, experts64, gs)) < TOL_BF16


# ----------------------------------------------------------------------------- quantized weights
@pytest.mark.parametrize("bits,rank", [(3, 8), (4, 0)])
def test_stacked_quantized(bits, rank):
    rng = _rng()
    e, k, n, m = 4, 128, 64, 19
    parts = [quantized_expert(k, n, bits, 64, rank, rng) for _ in range(e)]
    stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *parts)
    stacked = dataclasses.replace(stacked, shape=(e, k, n))
    experts64 = [dense64(p) for p in parts]
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    f = jax.jit(api.grouped_matmul)
    for i, gs in enumerate(routings(m, e, rng)):
        y64 = ref64(x, experts64, gs)
        y = f(x, stacked, gs)
        assert y.shape == (m, n) and y.dtype == jnp.bfloat16
        assert rel_err(y, y64) < TOL_BF16
        if i == 0:
            assert rel_err(masked(x, stacked, gs), y64) < TOL_BF16
            # the same experts passed as a list give the same numbers
            np.testing.assert_array_equal(np.asarray(f(x, parts, gs), np.float32), np.asarray(y, np.float32))


def test_mixed_bit_widths_per_expert():
    """Experts of 2, 3, 4 and 8 bits, different group sizes and ranks, one float expert, in one call."""
    rng = _rng()
    k, n, m = 128, 64, 29
    parts = [quantized_expert(k, n, 2, 64, 8, rng), quantized_expert(k, n, 3, 64, 0, rng),
             quantized_expert(k, n, 4, 128, 16, rng), quantized_expert(k, n, 8, 64, 0, rng),
             jnp.asarray(rng.standard_normal((k, n)) * 0.02, jnp.bfloat16),
             quantized_expert(k, n, 3, 128, 4, rng)]
    e = len(parts)
    experts64 = [dense64(p) for p in parts]
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    f = jax.jit(api.grouped_matmul)
    for i, gs in enumerate(routings(m, e, rng)):
        y64 = ref64(x, experts64, gs)
        assert rel_err(f(x, parts, gs), y64) < TOL_BF16
        if i == 1:
            assert rel_err(masked(x, parts, gs), y64) < TOL_BF16
    # float32 activations: float32 dequantization, tight tolerance
    gs = routings(m, e, rng)[0]
    y32 = f(x.astype(jnp.float32), parts, gs)
    assert y32.dtype == jnp.float32 and rel_err(y32, ref64(x, experts64, gs)) < 1e-5


def test_bad_input_raises():
    w = jnp.zeros((3, 16, 8))
    x = jnp.ones((5, 16))
    with pytest.raises(ValueError, match="group_sizes"):
        api.grouped_matmul(x, w, jnp.array([1, 2], jnp.int32))
    with pytest.raises(ValueError, match="K=16"):
        api.grouped_matmul(jnp.ones((5, 12)), w, jnp.array([1, 2, 2], jnp.int32))
    with pytest.raises(ValueError, match="one shape"):
        api.grouped_matmul(x, [jnp.zeros((16, 8)), jnp.zeros((16, 4))], jnp.array([1, 4], jnp.int32))
    with pytest.raises(ValueError, match="unknown impl"):
        api.grouped_matmul(x, w, jnp.array([1, 2, 2], jnp.int32), impl="nope")


# ------------------------------------------------------------ Mosaic GPU kernel, interpret mode
# CPU CI runs the kernel body in GPU interpret mode (as tests/test_quant_matmul.py does); the only
# substitution there is the tensor-core product (quant_matmul.mgpu_sm90._mma_xt).
from pallas_kernels.grouped_matmul import mgpu_sm90  # noqa: E402
from pallas_kernels.quant_matmul import layout as qm_layout  # noqa: E402

NMAJOR, PAIRS = qm_layout.LAYOUT, qm_layout.PAIRS_LAYOUT


@pytest.mark.parametrize("low_bit_layout", [NMAJOR, PAIRS])
def test_kernel_interpret_mixed_bits_and_empty_experts(low_bit_layout):
    """2/3/4-bit experts (three launches), compensators of different ranks, a per-channel expert,
    K padded (384 -> 512), an empty expert and a whole empty class, rows past the groups; every
    class in either kernel layout (f32 unpack / magic_fold unpack, picked from the layout)."""
    rng = _rng()
    k, n, m = 384, 64, 11
    parts = [quantized_expert(k, n, 3, 64, 8, rng), quantized_expert(k, n, 2, 128, 0, rng),
             quantized_expert(k, n, 3, 64, 0, rng), quantized_expert(k, n, 4, None, 4, rng),
             quantized_expert(k, n, 3, 64, 16, rng), quantized_expert(k, n, 4, None, 0, rng)]
    experts64 = [dense64(p) for p in parts]
    gkw = mgpu_sm90.prepare_grouped(parts, low_bit_layout=low_bit_layout)
    assert sorted(len(c.experts) for c in gkw.classes) == [1, 2, 3]
    assert {c.bits: c.layout for c in gkw.classes} == {2: low_bit_layout, 3: low_bit_layout, 4: low_bit_layout}
    magic = "magic_fold" if low_bit_layout == PAIRS else "f32"     # MB 8 <= FOLD_MAX_BLOCK_M: the fold
    expect = {2: magic, 3: magic, 4: magic}
    assert {c.bits: mgpu_sm90.default_config(m, c).unpack for c in gkw.classes} == expect
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    gs = jnp.asarray([3, 0, 4, 0, 2, 0], jnp.int32)          # 2-bit and 4-bit classes empty; 2 rows past
    kernel = jax.jit(lambda x, w, g: api.grouped_matmul(x, w, g, impl="kernel", interpret=True))
    y = kernel(x, gkw, gs)
    assert y.shape == (m, n) and y.dtype == jnp.bfloat16
    y64 = ref64(x, experts64, gs)
    assert rel_err(y, y64) < TOL_BF16
    assert np.all(np.asarray(y, np.float32)[9:] == 0)
    gs2 = jnp.asarray([1, 2, 0, 3, 1, 4], jnp.int32)          # every class active
    y2 = kernel(x, gkw, gs2)
    assert rel_err(y2, ref64(x, experts64, gs2)) < TOL_BF16
    # the reference reads the kernel layout too
    assert rel_err(api.grouped_matmul(x, gkw, gs2), ref64(x, experts64, gs2)) < TOL_BF16


def test_kernel_interpret_one_expert_several_blocks_split_k():
    """Stacked 3-bit experts, every row on the last expert (3 row blocks of 8), K split in 2
    (default 3-bit layout: planar_pairs, magic_bf16 unpack with a compensator)."""
    rng = _rng()
    e, k, n, m = 3, 1024, 64, 20
    parts = [quantized_expert(k, n, 3, 64, 8, rng) for _ in range(e)]
    stacked = dataclasses.replace(jax.tree_util.tree_map(lambda *a: jnp.stack(a), *parts), shape=(e, k, n))
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    gs = jnp.asarray([0, 0, m], jnp.int32)
    cfg = mgpu_sm90.Config(block_m=8, chunk_slots=8, k_splits=2)
    assert mgpu_sm90.LOW_BIT_LAYOUT == PAIRS
    y = api.grouped_matmul(x, stacked, gs, impl="kernel", interpret=True, config=cfg)
    y64 = ref64(x, [dense64(p) for p in parts], gs)
    assert rel_err(y, y64) < TOL_BF16
    # A from registers (quant_matmul's Config.a_regs) gives the same product
    y_regs = api.grouped_matmul(x, stacked, gs, impl="kernel", interpret=True,
                                config=dataclasses.replace(cfg, a_regs=True))
    assert rel_err(y_regs, y64) < TOL_BF16


@pytest.mark.parametrize("low_bit_layout,rank", [(PAIRS, 8), pytest.param(NMAJOR, 0, marks=pytest.mark.slow)])
def test_prefill_path_interpret(low_bit_layout, rank):
    """Prefill path (dequantize every expert once with the Mosaic dequantize kernel, then a grouped
    GEMM; jax.lax.ragged_dot stands in for ragged_dot_mgpu in interpret mode) on every routing kind,
    with K padded to the planar tile and a compensator; rows past the groups are 0."""
    rng = _rng()
    e, k, n, m = 4, 640, 128, 40
    parts = [quantized_expert(k, n, 3, 64, rank, rng) for _ in range(e)]
    stacked = dataclasses.replace(jax.tree_util.tree_map(lambda *a: jnp.stack(a), *parts), shape=(e, k, n))
    gkw = mgpu_sm90.prepare_grouped(stacked, low_bit_layout=low_bit_layout)
    assert mgpu_sm90.prefill_applies(mgpu_sm90.PREFILL_ROWS, gkw) and not mgpu_sm90.prefill_applies(m, gkw)
    experts64 = [dense64(p) for p in parts]
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    for gs in routings(m, e, rng):
        y = mgpu_sm90.grouped_matmul_mgpu(x, gkw, gs, interpret=True, prefill=True)
        assert y.shape == (m, n) and y.dtype == jnp.bfloat16
        assert rel_err(y, ref64(x, experts64, gs)) < TOL_BF16, np.asarray(gs)
        assert np.all(np.asarray(y, np.float32)[int(gs.sum()):] == 0)
    w_t = np.asarray(mgpu_sm90.dequantize_class(gkw.classes[0], interpret=True), np.float32)   # [E, N, Kp]
    w_ref = np.stack([dense64(p)[0] for p in parts]).transpose(0, 2, 1)
    assert np.abs(w_t[:, :, :k] - w_ref).max() < 2e-2 * np.abs(w_ref).max()
    assert np.all(w_t[:, :, k:] == 0)


@pytest.mark.parametrize("ranks", [(0, 0), (8, 0), (4, 6)])
def test_fuse_columns_is_both_projections(ranks):
    """fuse_columns(gate, up) (one launch for MoE gate and up): the fused product's first Na
    columns are gate's and the rest up's, compensators included, on the reference and the kernel."""
    rng = _rng()
    e, k, na, nb, m = 3, 512, 64, 128, 12
    def stack(n, rank):
        parts = [quantized_expert(k, n, 3, 64, rank, rng) for _ in range(e)]
        return parts, dataclasses.replace(jax.tree_util.tree_map(lambda *a: jnp.stack(a), *parts), shape=(e, k, n))
    pa, a = stack(na, ranks[0])
    pb, b = stack(nb, ranks[1])
    fused = mgpu_sm90.fuse_columns(mgpu_sm90.prepare_grouped(a), mgpu_sm90.prepare_grouped(b))
    assert fused.shape == (e, k, na + nb)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    gs = jnp.asarray([5, 0, 7], jnp.int32)
    want = np.concatenate([ref64(x, [dense64(p) for p in pa], gs), ref64(x, [dense64(p) for p in pb], gs)], axis=1)
    assert rel_err(api.grouped_matmul(x, fused, gs, impl="reference"), want) < TOL_BF16
    assert rel_err(api.grouped_matmul(x, fused, gs, impl="kernel", interpret=True), want) < TOL_BF16
    with pytest.raises(ValueError, match="classes differ"):
        mgpu_sm90.fuse_columns(mgpu_sm90.prepare_grouped(a), mgpu_sm90.prepare_grouped(
            [quantized_expert(k, nb, 4, 64, 0, rng) for _ in range(e)]))


def test_prefill_path_mixed_classes_interpret():
    """Prefill path of a mixed layer (2/3/4-bit experts interleaved, a bf16 expert among them: four
    classes whose order is not the experts' order, K padded per class): each class dequantized, x's
    rows permuted into class order and back, on every routing kind; classes with a compensator are
    refused (they keep the decode launches)."""
    rng = _rng()
    e, k, n, m = 5, 640, 128, 40
    bits = (4, 2, 16, 3, 2)
    parts = [jnp.asarray(rng.standard_normal((k, n)) * 0.05, jnp.bfloat16) if b == 16 else
             quantized_expert(k, n, b, 64, 0, rng) for b in bits]
    gkw = mgpu_sm90.prepare_grouped(parts)
    assert len(gkw.classes) == 4 and [i for c in gkw.classes for i in c.experts] != list(range(e))
    assert mgpu_sm90.prefill_applies(mgpu_sm90.PREFILL_ROWS, gkw) and not mgpu_sm90.prefill_applies(m, gkw)
    experts64 = [dense64(p) for p in parts]
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    for gs in routings(m, e, rng):
        y = jax.jit(lambda x, g: mgpu_sm90.grouped_matmul_mgpu(x, gkw, g, interpret=True, prefill=True))(x, gs)
        assert y.shape == (m, n) and y.dtype == jnp.bfloat16
        assert rel_err(y, ref64(x, experts64, gs)) < TOL_BF16, np.asarray(gs)
        assert np.all(np.asarray(y, np.float32)[int(gs.sum()):] == 0)
    # the one-launch dequantize of every class: expert by position, K cut to the smallest quantized K_pad
    # (768: the 4-bit class's; the 2/3-bit classes' second 512-row tile is stored only up to it)
    w_t = np.asarray(mgpu_sm90.dequantize_layer(gkw, interpret=True), np.float32)
    assert w_t.shape == (e, n, min(c.k_pad for c in gkw.classes if c.bits != 16)) == (e, n, 768)
    w_ref = np.stack([dense64(parts[i])[0] for i in gkw.order]).transpose(0, 2, 1)
    assert np.abs(w_t[:, :, :k] - w_ref).max() < 2e-2 * np.abs(w_ref).max()
    assert np.all(w_t[:, :, k:] == 0)
    with_rank = mgpu_sm90.prepare_grouped([quantized_expert(512, 64, 3, 64, 4, rng), quantized_expert(512, 64, 4, 64, 0, rng)])
    assert not mgpu_sm90.prefill_applies(10 ** 6, with_rank)
    with pytest.raises(ValueError, match="without compensators"):
        mgpu_sm90.grouped_matmul_prefill(jnp.ones((4, 512), jnp.bfloat16), with_rank, jnp.asarray([2, 2], jnp.int32))


@pytest.mark.slow   # 31 s on CPU; the variants also run natively (-m gpu)
def test_kernel_interpret_unpack_variants_and_mismatch():
    """Explicit Config.unpack: magic_f16 (f16 A tile and x) on planar_pairs 3-bit experts of group
    128 and per-channel next to a 4-bit planar_pairs class and an 8-bit class (planar_nmajor only:
    keeps f32), bf16 on planar_nmajor; an unpack that does not read a class's layout raises."""
    rng = _rng()
    k, n, m = 512, 64, 9
    parts = [quantized_expert(k, n, 3, 128, 4, rng), quantized_expert(k, n, 4, 64, 0, rng),
             quantized_expert(k, n, 3, None, 0, rng), quantized_expert(k, n, 8, 64, 0, rng)]
    experts64 = [dense64(p) for p in parts]
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    gs = jnp.asarray([4, 2, 1, 2], jnp.int32)
    y64 = ref64(x, experts64, gs)
    pairs = mgpu_sm90.prepare_grouped(parts, low_bit_layout=PAIRS)
    assert {c.bits: c.layout for c in pairs.classes} == {3: PAIRS, 4: PAIRS, 8: NMAJOR}
    assert {c.bits: mgpu_sm90.class_unpack("magic_f16", c) for c in pairs.classes} == {
        3: "magic_f16", 4: "magic_f16", 8: "f32"}
    nmajor = mgpu_sm90.prepare_grouped(parts, low_bit_layout=NMAJOR)
    run = lambda w, unpack: api.grouped_matmul(x, w, gs, impl="kernel", interpret=True,
                                               config=mgpu_sm90.Config(unpack=unpack))
    assert rel_err(run(pairs, "magic_f16"), y64) < TOL_BF16
    assert rel_err(run(nmajor, "bf16"), y64) < TOL_BF16
    with pytest.raises(ValueError, match="does not read"):
        run(nmajor, "magic_bf16")
    with pytest.raises(ValueError, match="does not read"):
        run(pairs, "f32")
    with pytest.raises(ValueError, match="not one of"):
        run(pairs, "nope")
    with pytest.raises(ValueError, match="low_bit_layout"):
        mgpu_sm90.prepare_grouped(parts, low_bit_layout="planar")


def test_kernel_interpret_bf16_and_float_quantized_mix():
    """The bf16 path of the kernel (the ragged_dot replacement) equals jax.lax.ragged_dot; a list
    mixing bf16 and quantized experts runs as a float class + quantized classes."""
    rng = _rng()
    e, k, n, m = 4, 192, 128, 13
    w = jnp.asarray(rng.standard_normal((e, k, n)), jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    gs = jnp.asarray([3, 0, 8, 1], jnp.int32)                 # an empty expert, one row past the groups
    kernel = jax.jit(lambda x, w, g: api.grouped_matmul(x, w, g, impl="kernel", interpret=True))
    y = kernel(x, w, gs)
    base = jax.lax.ragged_dot(x, w, gs, preferred_element_type=jnp.float32)
    assert rel_err(y, np.asarray(base, np.float64)) < TOL_BF16
    assert np.all(np.asarray(y, np.float32)[12:] == 0)
    parts = [w[0], quantized_expert(k, n, 3, 64, 8, rng), w[2], quantized_expert(k, n, 4, 64, 0, rng)]
    e64 = [(np.asarray(p.astype(jnp.float32), np.float64), None, None) if isinstance(p, jax.Array)
           else dense64(p) for p in parts]
    assert rel_err(kernel(x, parts, gs), ref64(x, e64, gs)) < TOL_BF16


def test_kernel_bad_shapes_raise():
    with pytest.raises(ValueError, match="multiple of 64"):
        api.grouped_matmul(jnp.ones((4, 64), jnp.bfloat16), jnp.ones((2, 64, 96), jnp.bfloat16),
                           jnp.array([2, 2], jnp.int32), impl="kernel", interpret=True)


@pytest.mark.parametrize("low_bit_layout", [pytest.param(NMAJOR, marks=pytest.mark.slow), PAIRS])
def test_kernel_lowers_natively_on_cpu(low_bit_layout):
    """The native (non-interpret) kernels lower for CUDA from this CPU host: Pallas -> Mosaic GPU
    lowering (the pl.when skip inside the accumulator scope, GMEM scalar reads of the block
    counts, dynamic BlockSpec indices, the compensator epilogue, and for planar_pairs the
    inline-PTX magic conversion, whose Python body runs in this lowering) runs here; only Mosaic
    GPU's C++ passes and ptxas are left to the device. Quantized classes with and without a
    compensator, the bf16 class, split-K; magic_f16 on the planar_pairs class."""
    reason = cuda_lowering_unavailable()
    if reason:
        pytest.skip(reason)
    rng = _rng()
    k, n = 1024, 128
    parts = [quantized_expert(k, n, 3, 64, 8, rng), quantized_expert(k, n, 2, 64, 0, rng),
             jnp.asarray(rng.standard_normal((k, n)) * 0.02, jnp.bfloat16), quantized_expert(k, n, 3, 64, 0, rng)]
    gkw = mgpu_sm90.prepare_grouped(parts, low_bit_layout=low_bit_layout)
    cases = [(1, None), (40, mgpu_sm90.Config(k_splits=2))]
    if low_bit_layout == PAIRS:
        cases += [(3, mgpu_sm90.Config(unpack="magic_f16")), (20, mgpu_sm90.Config(a_regs=True)),
                  (2, mgpu_sm90.Config(unpack="magic_fold", a_regs=True))]
    for m, cfg in cases:
        f = jax.jit(lambda x, w, g: api.grouped_matmul(x, w, g, impl="kernel", interpret=False, config=cfg))
        lowered = f.trace(jax.ShapeDtypeStruct((m, k), jnp.bfloat16), gkw,
                          jax.ShapeDtypeStruct((len(parts),), jnp.int32)).lower(lowering_platforms=("cuda",))
        text = lowered.as_text()
        assert text.count("mosaic_gpu") >= 3, m      # one launch per class
        # the magic conversion's inline PTX (lop3) is in the lowered kernel iff the classes are pairs,
        # with each width's mask (3-bit and 2-bit classes here)
        assert ("lop3.b32" in text) == (low_bit_layout == PAIRS), (m, cfg)
        assert ("0x30003" in text) == (low_bit_layout == PAIRS), (m, cfg)


def test_prefill_dequantize_lowers_natively_on_cpu():
    """The prefill path of a mixed layer lowers for CUDA from this CPU host as two launches: one
    dequantize kernel for every quantized class (each class's branch under pl.when with its own
    unpack and A buffers; the 2/3-bit classes' last tile stored only up to the 4-bit class's K_pad)
    and jax's ragged_dot_mgpu; the bf16 expert is copied into its rows, nothing is concatenated."""
    reason = cuda_lowering_unavailable()
    if reason:
        pytest.skip(reason)
    rng = _rng()
    k, n, m = 640, 128, mgpu_sm90.PREFILL_ROWS
    parts = [quantized_expert(k, n, 4, 64, 0, rng), quantized_expert(k, n, 2, 64, 0, rng),
             jnp.asarray(rng.standard_normal((k, n)) * 0.05, jnp.bfloat16), quantized_expert(k, n, 3, 64, 0, rng)]
    gkw = mgpu_sm90.prepare_grouped(parts)
    f = jax.jit(lambda x, w, g: api.grouped_matmul(x, w, g, impl="kernel", interpret=False))
    text = f.trace(jax.ShapeDtypeStruct((m, k), jnp.bfloat16), gkw,
                   jax.ShapeDtypeStruct((len(parts),), jnp.int32)).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu") == 2
    for mask in ("0x30003", "0x70007", "0xf000f"):       # each class's magic mask in the one dequantize kernel
        assert mask in text, mask
    assert "concatenate" not in text


# ------------------------------------------------ mixed precision in one launch (multi_class_sm90)
from pallas_kernels.grouped_matmul import multi_class_sm90  # noqa: E402

MIXED_BITS = (2, 3, 4, 3, 2, 4)


def _mixed_layer(k, n, rng, group_sizes=None):
    parts = [quantized_expert(k, n, b, g, 0, rng)
             for b, g in zip(MIXED_BITS, group_sizes or (64, 64, 128, None, 64, 64))]
    return parts, [dense64(p) for p in parts], mgpu_sm90.prepare_grouped(parts)


@pytest.mark.slow   # 122 s on CPU; the same launch with the fold runs in test_multi_class_magic_fold_interpret
def test_multi_class_one_launch_interpret(monkeypatch):
    """A 2/3/4-bit layer without compensators runs as ONE kernel launch (every class's pipeline in
    one grid) and matches float64 on every routing kind: random, two experts only, all rows on one
    expert, rows past the groups, a whole class empty; K = 1024 gives split-K; per-channel and g128
    experts; the per-class launches (an explicit Config) give the same product."""
    rng = _rng()
    k, n = 1024, 128
    parts, experts64, gkw = _mixed_layer(k, n, rng)
    assert multi_class_sm90.applies(gkw) and len(gkw.classes) == 5      # (bits, group) classes
    builds = []
    real_build = multi_class_sm90.build
    monkeypatch.setattr(multi_class_sm90, "build", lambda *a: builds.append(a) or real_build(*a))
    for m in (2, 24):
        x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
        plans, mb, blocks, splits, _ = multi_class_sm90.plan_layer(m, gkw)
        assert splits > 1 and [p.bits for p in plans] == [c.bits for c in gkw.classes]
        cases = [jnp.asarray([0, m // 2, 0, m - m // 2, 0, 0], jnp.int32)]
        cases += routings(m, len(parts), rng) if m > 3 else [jnp.asarray([1, 0, 0, 0, 0, 0], jnp.int32)]
        for gs in cases:
            builds.clear()
            y = api.grouped_matmul(x, gkw, gs, impl="kernel", interpret=True)
            assert len(builds) == 1, "one launch for all classes"
            y64 = ref64(x, experts64, gs)
            assert rel_err(y, y64) < TOL_BF16, (m, np.asarray(gs))
            assert np.all(np.asarray(y, np.float32)[int(gs.sum()):] == 0)
        per_class = api.grouped_matmul(x, gkw, cases[0], impl="kernel", interpret=True, config=mgpu_sm90.Config())
        np.testing.assert_allclose(np.asarray(y := api.grouped_matmul(x, gkw, cases[0], impl="kernel",
                                                                       interpret=True), np.float32),
                                   np.asarray(per_class, np.float32), rtol=2e-2, atol=2e-2)
        assert y.shape == (m, n)


def test_multi_class_magic_fold_interpret(monkeypatch):
    """The one-launch mixed layer with quant_matmul's magic_fold in every class (grouped.FOLD_MAX_BLOCK_M
    on): 2/3/4-bit classes, g64 / g128 / per-channel fold blocks, split-K, empty and skewed routings."""
    monkeypatch.setattr(mgpu_sm90, "FOLD_MAX_BLOCK_M", 16)
    rng = _rng()
    k, n = 1024, 128
    parts, experts64, gkw = _mixed_layer(k, n, rng)   # the default mix: g64, g128 and per-channel classes
    for m in (2, 24):
        plans, mb, *_ = multi_class_sm90.plan_layer(m, gkw)
        assert multi_class_sm90.uses_fold(plans, mb)
        x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
        extra = routings(m, len(parts), rng)[:3] if m > 3 else [jnp.asarray([1, 0, 0, 0, 0, 0], jnp.int32)]
        for gs in [jnp.asarray([0, m // 2, 0, m - m // 2, 0, 0], jnp.int32)] + extra:
            y = api.grouped_matmul(x, gkw, gs, impl="kernel", interpret=True)
            assert rel_err(y, ref64(x, experts64, gs)) < TOL_BF16, (m, np.asarray(gs))
            assert np.all(np.asarray(y, np.float32)[int(gs.sum()):] == 0)
    monkeypatch.setattr(mgpu_sm90, "FOLD_MAX_BLOCK_M", 0)
    assert not multi_class_sm90.uses_fold(plans, mb)


def test_multi_class_applies_only_to_pairs_classes_without_compensators():
    rng = _rng()
    k, n = 512, 64
    q = lambda b, r=0: quantized_expert(k, n, b, 64, r, rng)
    assert multi_class_sm90.applies(mgpu_sm90.prepare_grouped([q(2), q(3), q(4)]))
    assert not multi_class_sm90.applies(mgpu_sm90.prepare_grouped([q(3), q(3)]))           # one class
    assert not multi_class_sm90.applies(mgpu_sm90.prepare_grouped([q(2), q(3, 8)]))        # compensator
    assert not multi_class_sm90.applies(mgpu_sm90.prepare_grouped([q(3), q(8)]))           # 8-bit: nmajor
    assert not multi_class_sm90.applies(mgpu_sm90.prepare_grouped([q(2), q(4)], low_bit_layout=NMAJOR))
    assert not multi_class_sm90.applies(mgpu_sm90.prepare_grouped(
        [q(3), jnp.asarray(rng.standard_normal((k, n)), jnp.bfloat16)]))                  # bf16 expert
    with pytest.raises(ValueError, match="several planar_pairs classes"):
        multi_class_sm90.multi_class_matmul(jnp.ones((2, k), jnp.bfloat16), mgpu_sm90.prepare_grouped([q(3)]),
                                            jnp.asarray([2], jnp.int32))


@pytest.mark.slow   # 54 s on CPU; the launch runs natively in test_magic_fold_native.py
def test_multi_class_lowers_natively_on_cpu(monkeypatch):
    """The one-launch kernel (three class pipelines under pl.when, each with its width's magic
    unpack) lowers for CUDA from this CPU host, at decode (1 row) and with split-K."""
    reason = cuda_lowering_unavailable()
    if reason:
        pytest.skip(reason)
    rng = _rng()
    k, n = 1024, 128
    _, _, gkw = _mixed_layer(k, n, rng)
    for m in (1, 40):
        f = jax.jit(lambda x, w, g: api.grouped_matmul(x, w, g, impl="kernel", interpret=False))
        text = f.trace(jax.ShapeDtypeStruct((m, k), jnp.bfloat16), gkw,
                       jax.ShapeDtypeStruct((len(MIXED_BITS),), jnp.int32)).lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("custom_call @mosaic_gpu") == 1, m       # one launch (per class: 5)
        for mask in ("0x30003", "0x70007", "0xf000f"):      # each class's magic mask in the one kernel
            assert mask in text, (m, mask)
    _, _, gkw = _mixed_layer(k, n, rng, (64, 64, 64, None, 64, 64))   # the magic_fold classes lower too
    f = jax.jit(lambda x, w, g: api.grouped_matmul(x, w, g, impl="kernel", interpret=False))
    text = f.trace(jax.ShapeDtypeStruct((1, k), jnp.bfloat16), gkw,
                   jax.ShapeDtypeStruct((len(MIXED_BITS),), jnp.int32)).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu") == 1


# ------------------------------------------------------------------ native GPU (sm90 only)
# The same kernel compiled by Mosaic GPU and run on the device (`-m gpu`; skipped without an sm90
# GPU). Shapes are Mixtral-like in miniature: several column tiles, K padding, split-K by default
# config, 1..300 rows; each m compiles once and all routings of that m reuse it.
native = pytest.mark.skipif(not api._on_sm90(), reason="needs an sm90 (Hopper) GPU")
NATIVE_MS = (1, 16, 300)
NATIVE_BF16_MS = (1, 16, 512)
NATIVE_MIXED_MS = (5, 64)


def _native_kernel(config=None):
    return jax.jit(lambda x, w, g: api.grouped_matmul(x, w, g, impl="kernel", config=config))


@pytest.mark.gpu
@native
@pytest.mark.parametrize("bits,rank,low_bit_layout,a_regs", [(3, 0, PAIRS, False), (3, 16, PAIRS, False),
                                                         (3, 16, PAIRS, True), (3, 16, NMAJOR, False),
                                                         (4, 0, NMAJOR, False), (2, 8, NMAJOR, False),
                                                         (4, 16, PAIRS, True), (2, 8, PAIRS, True)])
def test_sm90_native_stacked_routings(bits, rank, low_bit_layout, a_regs):
    """Stacked experts of one bit width: random routings, empty experts, every row on one expert,
    rows past the groups; default config (split-K at decode; magic_bf16 for planar_pairs, f32
    for planar_nmajor) for each m, or A from registers (a_regs)."""
    rng = _rng()
    e, k, n = 8, 1408, 256                    # K = 1408 pads to the planar tile
    parts = [quantized_expert(k, n, bits, 64, rank, rng) for _ in range(e)]
    stacked = dataclasses.replace(jax.tree_util.tree_map(lambda *a: jnp.stack(a), *parts), shape=(e, k, n))
    gkw = mgpu_sm90.prepare_grouped(stacked, low_bit_layout=low_bit_layout)
    experts64 = [dense64(p) for p in parts]
    f = _native_kernel(mgpu_sm90.Config(a_regs=True) if a_regs else None)
    for m in NATIVE_MS:
        x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
        for gs in routings(m, e, rng) if m > 3 else [jnp.asarray(np.bincount(rng.integers(0, e, m), minlength=e),
                                                                  jnp.int32)]:
            y = f(x, gkw, gs)
            y64 = ref64(x, experts64, gs)
            assert rel_err(y, y64) < TOL_BF16, (m, np.asarray(gs))
            assert np.all(np.asarray(y, np.float32)[int(gs.sum()):] == 0)


@pytest.mark.gpu
@native
def test_sm90_native_mixed_bits_and_bf16_expert():
    """2/3/4-bit classes with different group sizes and ranks plus a bf16 expert (four launches),
    an empty class, and split-K forced."""
    rng = _rng()
    k, n = 1024, 192
    parts = [quantized_expert(k, n, 2, 64, 8, rng), quantized_expert(k, n, 3, 64, 0, rng),
             quantized_expert(k, n, 4, 128, 16, rng), quantized_expert(k, n, 3, 64, 4, rng),
             jnp.asarray(rng.standard_normal((k, n)) * 0.02, jnp.bfloat16),
             quantized_expert(k, n, 4, 64, 0, rng)]
    e = len(parts)
    experts64 = [dense64(p) for p in parts]
    gkw = mgpu_sm90.prepare_grouped(parts)
    f = _native_kernel()
    for m in NATIVE_MIXED_MS:
        x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
        for gs in routings(m, e, rng) + [jnp.asarray([0, m // 2, 0, m - m // 2, 0, 0], jnp.int32)]:
            assert rel_err(f(x, gkw, gs), ref64(x, experts64, gs)) < TOL_BF16, (m, np.asarray(gs))
    x = jnp.asarray(rng.standard_normal((40, k)), jnp.bfloat16)
    gs = jnp.asarray([7, 3, 10, 0, 12, 8], jnp.int32)
    y = api.grouped_matmul(x, gkw, gs, impl="kernel", config=mgpu_sm90.Config(k_splits=2))
    assert rel_err(y, ref64(x, experts64, gs)) < TOL_BF16


@pytest.mark.gpu
@native
def test_sm90_native_multi_class_one_launch():
    """Mixed 2/3/4-bit layer (per-channel, g64, g128 experts) in one launch natively: every routing
    kind, decode to 300 rows (split-K at decode), and the per-class launches agree."""
    rng = _rng()
    k, n = 1408, 256
    parts, experts64, gkw = _mixed_layer(k, n, rng)
    assert multi_class_sm90.applies(gkw)
    f = _native_kernel()
    for m in (1, 2, 16, 300):
        x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
        cases = routings(m, len(parts), rng) if m > 3 else [
            jnp.asarray(np.bincount(rng.integers(0, len(parts), m), minlength=len(parts)), jnp.int32)]
        for gs in cases:
            y = f(x, gkw, gs)
            assert rel_err(y, ref64(x, experts64, gs)) < TOL_BF16, (m, np.asarray(gs))
            assert np.all(np.asarray(y, np.float32)[int(gs.sum()):] == 0)
        y_per_class = _native_kernel(mgpu_sm90.Config())(x, gkw, cases[0])
        assert rel_err(y_per_class, ref64(x, experts64, cases[0])) < TOL_BF16


@pytest.mark.gpu
@native
@pytest.mark.parametrize("rank", [0, 16, "mixed"])
def test_sm90_native_prefill_path(rank):
    """Prefill path natively: the magic dequantize kernel + jax's ragged_dot_mgpu on every routing
    kind (empty experts, one expert, rows past the groups), K padded to the planar tile; "mixed":
    2/3/4-bit experts interleaved (three classes, x's rows permuted into class order and back)."""
    rng = _rng()
    e, k, n, m = 8, 1408, 256, 1100
    if rank == "mixed":
        parts = [quantized_expert(k, n, b, 64, 0, rng) for b in (3, 2, 4, 3, 2, 3, 4, 3)]
        gkw = mgpu_sm90.prepare_grouped(parts)
        assert len(gkw.classes) == 3
    else:
        parts = [quantized_expert(k, n, 3, 64, rank, rng) for _ in range(e)]
        stacked = dataclasses.replace(jax.tree_util.tree_map(lambda *a: jnp.stack(a), *parts), shape=(e, k, n))
        gkw = mgpu_sm90.prepare_grouped(stacked)
    experts64 = [dense64(p) for p in parts]
    f = jax.jit(lambda x, w, g: api.grouped_matmul(x, w, g))     # auto: M >= PREFILL_ROWS -> prefill
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    for gs in routings(m, e, rng):
        y = f(x, gkw, gs)
        assert rel_err(y, ref64(x, experts64, gs)) < TOL_BF16, np.asarray(gs)
        assert np.all(np.asarray(y, np.float32)[int(gs.sum()):] == 0)


@pytest.mark.gpu
@native
def test_sm90_native_bf16_class_matches_ragged_dot():
    """The bf16 path (the ragged_dot replacement) on every routing kind, decode and prefill rows."""
    rng = _rng()
    e, k, n = 8, 1024, 512
    w = jnp.asarray(rng.standard_normal((e, k, n)) * 0.05, jnp.bfloat16)
    gkw = mgpu_sm90.prepare_grouped(w)
    f = _native_kernel()
    for m in NATIVE_BF16_MS:
        x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
        for gs in routings(m, e, rng) if m > 3 else [jnp.asarray(np.eye(e, dtype=np.int64)[3] * m, jnp.int32)]:
            y = f(x, gkw, gs)
            base = jax.lax.ragged_dot(x, w, gs, preferred_element_type=jnp.float32)
            assert rel_err(y, np.asarray(base, np.float64)) < TOL_BF16, (m, np.asarray(gs))
            assert np.all(np.asarray(y, np.float32)[int(gs.sum()):] == 0)


def _fold_case(rng, k=384, n=64, m=11):
    parts = [quantized_expert(k, n, 3, 64, 8, rng), quantized_expert(k, n, 2, 128, 0, rng),
             quantized_expert(k, n, 3, 64, 0, rng), quantized_expert(k, n, 4, None, 4, rng)]
    gkw = mgpu_sm90.prepare_grouped(parts, low_bit_layout=PAIRS)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    return parts, gkw, x, jnp.asarray([3, 2, 0, 4], jnp.int32)   # an empty expert, 2 rows past the groups


def test_kernel_interpret_magic_fold():
    """quant_matmul's magic_fold unpack in the grouped launch (Config.unpack="magic_fold"): 2/3/4-bit
    classes, g64 / g128 / per-channel fold blocks, compensators, an empty expert, rows past the groups."""
    rng = _rng()
    parts, gkw, x, gs = _fold_case(rng)
    cfg = mgpu_sm90.Config(unpack="magic_fold", a_regs=True)
    y = jax.jit(lambda x, w, g: mgpu_sm90.grouped_matmul_mgpu(x, w, g, config=cfg, interpret=True))(x, gkw, gs)
    y64 = ref64(x, [dense64(p) for p in parts], gs)
    assert rel_err(y, y64) < TOL_BF16
    assert np.all(np.asarray(y, np.float32)[9:] == 0)


@pytest.mark.gpu
@pytest.mark.skipif(not api._on_sm90(), reason="needs an sm90 (Hopper) GPU")
def test_kernel_native_magic_fold():
    rng = _rng()
    parts, gkw, x, gs = _fold_case(rng, k=2048, n=1408, m=40)
    gs = jnp.asarray([10, 14, 0, 12], jnp.int32)
    cfg = mgpu_sm90.Config(unpack="magic_fold", a_regs=True)
    y = mgpu_sm90.grouped_matmul_mgpu(x, gkw, gs, config=cfg)
    assert rel_err(y, ref64(x, [dense64(p) for p in parts], gs)) < TOL_BF16
