"""Issue 6 diagnosis: run the 3-bit decode kernel once per variant so Nsight Compute can read its
hardware counters (where the time goes: DRAM throughput, occupancy, stall reasons).

    ncu --clock-control none -k regex:mosaic --set detailed \
        python3 -m benchmarks.profile_decode --variants default,stream,split8

Variants (4096 x 14336 3-bit g64 planar_pairs, M=1 unless --m):
  default   api's decode config (magic_bf16, A in registers, stream-K since 2026-11-24)
  splitk    the split-K config (split-K 4 at M=1 on 4096 x 14336), the default until 2026-11-24
  stream    the split-K grid and pipeline with the unpack + MMA removed: the loads alone (a probe of the
            pipeline's own ceiling; the output is meaningless)
  splitN    split-K with k_splits=N
  sk        the stream-K kernel (stream_k_sm90.py) with default_config's unpack; +ctas=N caps its CTAs
            (default 2 per SM); skstream: its loads alone (unpack + MMA (+ fold) removed); skcompute: its unpack
            and MMA without the weight traffic (codes, scales and zeros cut to one TMA box: every other
            box reads out of bounds, which TMA fills with zeros without touching memory); skhot: the
            stream-K kernel timed on one weight, not rotated (25.7 MB: it stays in the 50 MB L2, so the
            loads come from L2: the compute-bound time with the same instruction stream)
  sknomma   stream-K with one wgmma per step instead of one per chunk (the chunks' converted A tiles
            are summed in registers first): the conversion's cost with few MMAs
  sknoconv  stream-K with a constant A tile (no unpack, no scales): the MMAs' and loads' cost
  sk1fma    stream-K whose conversion drops its second bf16x2 op (the + lo of the split offset):
            wrong numbers, the time of one op per pair register less
  sknoscale stream-K with constant scale/offset registers (no per-group scale loads and math)
  sklazy    stream-K with each group's scales computed at its first pair-slot (SCALES_UPFRONT off)
  +field=value after any of them overrides that Config field (e.g. stream+k_splits=8+stages=3)
  grouped   the grouped kernel on Mixtral's gate projection (8 experts), 1 token, top-2
Without ncu it prints CUPTI times (rotated weights) for the same variants.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp

import milo_jax  # noqa: F401
from pallas_kernels.quant_matmul import layout, mgpu_sm90
from benchmarks.quant_matmul import ROTATE_BYTES, cupti_us, logical_weight_bytes
from benchmarks.quant_matmul_variants import kernel_breakdown, random_weights


def _no_unpack(acc, a_buf, planes, s_ref, z_ref, x_ref, **kw):
    del acc, a_buf, planes, s_ref, z_ref, x_ref, kw


def _no_fold(acc, *args, **kw):
    """skstream under magic_fold: the step returns its carry unchanged (loads alone)."""
    del args, kw
    return acc


def _conv_then_one_mma(acc, a_buf, planes, s_ref, z_ref, x_ref, *, bits, slab, bn, chunk, nchunks,
                       group_rows, g_block, plan, interpret):
    """sknomma: every chunk converted as in _unpack_and_multiply, summed (one bf16x2 add per
    register), and a single wgmma per step."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu
    scales_of = mgpu_sm90._pair_scales_by_slot(s_ref, z_ref, bn=bn, slab=slab, group_rows=group_rows,
                                               g_block=g_block, unpack=plan.unpack)
    npc, total = chunk // 2, None
    for c in range(nchunks):
        jps = list(range(c * npc, (c + 1) * npc))
        a = mgpu_sm90._dequant_pairs(planes, jps, [scales_of(jp) for jp in jps], bn, slab, plan.unpack,
                                     interpret, bits)
        total = a if total is None else total + a
    mgpu_sm90._mma_xt(acc, total, x_ref.at[:, pl.ds(0, chunk * slab)], interpret, a_value=True)
    plgpu.wgmma_wait(1)


def _constant_a(planes, jps, scale_list, bn, slab, unpack, interpret, bits=3):
    """sknoconv: a constant A tile in the WGMMA layout instead of the unpack."""
    from jax.experimental.pallas import mosaic_gpu as plgpu
    a = jnp.full((bn, 2 * slab * len(jps)), 0.5, jnp.bfloat16)
    return a if interpret else plgpu.layout_cast(a, plgpu.Layout.WGMMA)


def _inline_asm_without_lo(orig):
    """llvm.inline_asm with the magic conversion's last op (+ lo) replaced by a move (sk1fma)."""
    import re

    def patched(res_type, operands, asm, constraints, **kw):
        asm = re.sub(r"fma\.rn\.(bf16x2|f16x2) \$0, t, c1, \$\d+;", "mov.b32 $0, t;", asm)
        return orig(res_type, operands, asm, constraints, **kw)
    return patched


def _constant_pair_scales(s_ref, z_ref, g, bn, slab, unpack):
    """sknoscale: (s, hi, lo) as constants in the WGMMA layout instead of per-group loads and math."""
    from jax.experimental.pallas import mosaic_gpu as plgpu
    native = jax.devices()[0].platform == "gpu"
    full = lambda v: (plgpu.layout_cast(jnp.full((bn, 2 * slab), v, jnp.bfloat16), plgpu.Layout.WGMMA) if native
                      else jnp.full((bn, 2 * slab), v, jnp.bfloat16))
    return full(0.01), full(-1.3), full(0.001)


def _one_box(w, cfg):
    """w with codes / scales / zeros cut to the first TMA box of each (the compute-only probe)."""
    rows = w.tile_rows
    g = max(1, rows // w.group_rows)
    words = w.codes.shape[1] * rows // w.k_pad
    return dataclasses.replace(w, codes=w.codes[:cfg.block_n, :words], scales=w.scales[:g, :cfg.block_n],
                               zeros=w.zeros[:g, :cfg.block_n])


def _overrides(cfg, opts):
    over = {}
    for o in opts:   # "+field=value" overrides of a Config
        key, val = o.split("=")
        typ = type(getattr(cfg, key))
        over[key] = (val not in ("0", "False", "false")) if typ is bool else typ(val)
    return over


def run(variant: str, k: int, n: int, m: int, reps: int, interpret: bool):
    keys = jax.random.split(jax.random.key(0), reps)
    ws = [random_weights(kk, k, n, 64, True) for kk in keys]
    x = jax.random.normal(jax.random.key(1), (m, k), jnp.float32).astype(jnp.bfloat16)
    cfg = mgpu_sm90.default_config(m, ws[0])
    orig = mgpu_sm90._unpack_and_multiply
    base, *opts = variant.split("+")
    ctas = [int(o.split("=")[1]) for o in opts if o.startswith("ctas=")]
    opts = [o for o in opts if not o.startswith("ctas=")]
    patches = {}
    for o in [o for o in opts if o.split("=")[0].isupper()]:   # "+NAME=value": a mgpu_sm90 module constant
        name, val = o.split("=")
        patches[name] = val not in ("0", "False", "false") if isinstance(getattr(mgpu_sm90, name), bool) else int(val)
    opts = [o for o in opts if not o.split("=")[0].isupper()]
    if base == "skstream":   # magic_fold (the stream-K default up to 16 tokens) multiplies in its own function
        patches["_fold_unpack_and_multiply"] = _no_fold
    if base == "sknomma":
        patches["_unpack_and_multiply"] = _conv_then_one_mma
    elif base == "sknoconv":
        patches["_dequant_pairs"] = _constant_a
    elif base == "sknoscale":
        patches["_pair_scales"] = _constant_pair_scales
    elif base == "sklazy":
        patches["SCALES_UPFRONT"] = False
    llvm_patch = None
    if base == "sk1fma":
        from jax._src.lib.mlir.dialects import llvm
        llvm_patch = (llvm, llvm.inline_asm)
        llvm.inline_asm = _inline_asm_without_lo(llvm.inline_asm)
    if base in ("skhot", "sknomma", "sknoconv", "sknoscale", "sk1fma", "sklazy"):
        base = "sk"
    if base.startswith("sk"):
        cfg = mgpu_sm90.default_config(m, ws[0], schedule="stream_k")
    elif base.startswith(("split", "stream")):
        cfg = mgpu_sm90.default_config(m, ws[0], schedule="split_k")
    over = _overrides(cfg, opts)
    if base.startswith("split") and base != "splitk":
        over["k_splits"] = int(base[5:])
    elif base not in ("default", "splitk", "stream", "sk", "skstream", "skcompute"):
        raise ValueError(variant)
    cfg = dataclasses.replace(cfg, **over)
    if base in ("stream", "skstream"):
        mgpu_sm90._unpack_and_multiply = _no_unpack
    saved = {name: getattr(mgpu_sm90, name) for name in patches}
    for name, fn in patches.items():
        setattr(mgpu_sm90, name, fn)
    if base.startswith("sk"):
        # stream-K kernels are cached by shape and config: a probe and a real kernel of the same config
        # must not share one (the first runs of this script timed a cached full kernel as "skstream")
        from pallas_kernels.quant_matmul import stream_k_sm90
        stream_k_sm90._build_cached.cache_clear()
    try:
        if base.startswith("sk"):
            from pallas_kernels.quant_matmul import stream_k_sm90
            f = jax.jit(lambda x, w: stream_k_sm90.matmul_stream_k(
                x, _one_box(w, cfg) if base == "skcompute" else w, config=cfg,
                max_ctas=(ctas or [None])[0], interpret=interpret))
        else:
            f = jax.jit(lambda x, w: mgpu_sm90.matmul_mgpu(x, w, config=cfg, interpret=interpret))
        for w in ws:
            y = f(x, w)
        jax.block_until_ready(y)
    finally:
        mgpu_sm90._unpack_and_multiply = orig
        for name, fn in saved.items():
            setattr(mgpu_sm90, name, fn)
        if llvm_patch:
            llvm_patch[0].inline_asm = llvm_patch[1]
    return f, ws, x


def run_grouped(m_tokens: int, interpret: bool, k: int, n: int, experts: int = 8, top_k: int = 2,
                opts=()):
    from milo_jax.quant.tensor import QuantizedTensor  # noqa: F401
    from pallas_kernels.grouped_matmul import mgpu_sm90 as g
    ws = [random_weights(kk, k, n, 64, True) for kk in jax.random.split(jax.random.key(2), experts)]
    cls = g.ExpertClass(codes=jnp.concatenate([w.codes for w in ws]), scales=jnp.concatenate([w.scales for w in ws]),
                        zeros=jnp.concatenate([w.zeros for w in ws]), experts=tuple(range(experts)), bits=3,
                        group_size=64, k=k, n=n, k_pad=ws[0].k_pad, slab=ws[0].slab, group_rows=64,
                        layout=layout.PAIRS_LAYOUT)
    gkw = g.GroupedKernelWeights(classes=(cls,), num_experts=experts, k=k, n=n)
    rows = m_tokens * top_k
    gs = jnp.zeros((experts,), jnp.int32).at[jnp.arange(top_k)].set(rows // top_k)
    x = jax.random.normal(jax.random.key(3), (rows, k), jnp.float32).astype(jnp.bfloat16)
    cfg = None
    if opts:   # the default config with overrides (block_m / k_splits 0 = heuristic)
        cfg = g.Config(**_overrides(g.Config(), opts))
    f = jax.jit(lambda x, w, gs: g.grouped_matmul_mgpu(x, w, gs, interpret=interpret, config=cfg))
    jax.block_until_ready(f(x, gkw, gs))
    return f, gkw, x, gs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="default,stream,split8,grouped")
    ap.add_argument("--m", type=int, default=1)
    ap.add_argument("--shape", default="4096x14336")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--cpu-smoke", action="store_true")
    ap.add_argument("--time", action="store_true", help="CUPTI time per variant (rotated weights), no ncu")
    a = ap.parse_args()
    k, n = (int(v) for v in a.shape.split("x"))
    if a.cpu_smoke:
        k, n = 4096, 128
    for v in a.variants.split(","):
        if v.startswith("grouped"):
            f, gkw, x, gs = run_grouped(a.m, a.cpu_smoke, k, n, opts=v.split("+")[1:])
            if a.time:
                print(f"TIME {v}: {kernel_breakdown(f, (x, gkw, gs), 1)}", flush=True)
        else:
            reps = a.reps if not a.time or a.cpu_smoke else max(2, -(-ROTATE_BYTES // logical_weight_bytes(k, n, 3, 64, 0)))
            if v.startswith("skhot"):
                reps = 1   # one weight, L2-resident after the first call
            orig = mgpu_sm90._unpack_and_multiply
            if v.startswith(("stream", "skstream")):
                mgpu_sm90._unpack_and_multiply = _no_unpack
            try:
                f, ws, x = run(v, k, n, a.m, int(reps), a.cpu_smoke)
                if a.time:
                    fn = jax.jit(lambda x, *w: [f(x, wi) for wi in w])
                    us = cupti_us(fn, (x, *ws), len(ws))
                    print(f"TIME {v}: {us:.2f} us/call over {len(ws)} rotated; "
                          f"{kernel_breakdown(fn, (x, *ws), len(ws))}", flush=True)
            finally:
                mgpu_sm90._unpack_and_multiply = orig
        print(f"ran {v}", flush=True)


if __name__ == "__main__":
    main()
