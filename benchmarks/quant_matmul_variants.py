"""Issue 6 experiment: time the decode kernel's unpack variants (mgpu_sm90.Config.unpack) and a few
tile/split configurations on the GPU, each checked against a float32 reference first.

    export PYTHONPATH=$PWD; python -m benchmarks.quant_matmul_variants            # H100, <= ~240 s
    JAX_PLATFORMS=cpu python -m benchmarks.quant_matmul_variants --cpu-smoke      # CPU dry run

Shapes 4096x14336 and 14336x4096 (K x N), 3-bit g64, M in {1, 16}. Variants:
  f32 (today's default), bf16 (jnp-level bf16 arithmetic), magic_bf16 / magic_f16 (planar_pairs
  layout + inline-PTX magic-number conversion), and magic_bf16 with other split/chunk/stage/BN
  settings (the cheaper unpack may move the best configuration).
Timing as benchmarks/quant_matmul.py: CUPTI kernel time (jax.experimental.mosaic.gpu.profiler)
of one jit over R rotated weight buffers (> 160 MB, past L2), median / R. Bytes that must move:
codes + scales + zeros at logical size, x and y. Every variant is wrapped in try/except (the
traceback is printed) so a variant that fails to lower does not stop the others. Output: a
table on stdout and JSON at $OUT/quant_matmul_variants.json (or --out).
On CPU (--cpu-smoke) the kernels run in GPU interpret mode at tiny shapes, timings meaningless.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import time
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp

import milo_jax  # noqa: F401  (import first: importing pallas_kernels first hits a circular import)
from milo_jax.quant import packing
from pallas_kernels.quant_matmul import api, layout, mgpu_sm90

ON_CPU = jax.devices()[0].platform == "cpu"

# the timing method of benchmarks/quant_matmul.py (CUPTI, rotated weights, copy ceiling)
from benchmarks.quant_matmul import ROTATE_BYTES, cupti_us, jax_copy_tbps, logical_weight_bytes  # noqa: E402


def log(*a):
    print(*a, flush=True)


# (name, unpack, overrides of default_config, core). Core variants run first on every shape, then
# the configuration sweep; a time budget (--budget-s) cuts the tail. default_config has A in
# registers for the magic unpacks (a_regs); "smem" rows store the A tile to shared memory instead.
SMEM = {"a_regs": False}
VARIANTS = [
    ("f32", "f32", {}, True),
    ("magic_bf16 smem", "magic_bf16", SMEM, True),
    ("regs", "magic_bf16", {}, True),
    ("regs f16", "magic_f16", {}, True),
    ("bf16 (jnp)", "bf16", {}, True),
    ("magic_f16 smem", "magic_f16", SMEM, False),
    ("magic_bf16 smem split1", "magic_bf16", dict(SMEM, k_splits=1), False),
    ("magic_bf16 smem split2", "magic_bf16", dict(SMEM, k_splits=2), False),
    ("magic_bf16 smem chunk8", "magic_bf16", dict(SMEM, chunk_slots=8), False),
    ("magic_bf16 smem stages3", "magic_bf16", dict(SMEM, stages=3), False),
    ("magic_bf16 smem bn128", "magic_bf16", dict(SMEM, block_n=128), False),
    ("magic_bf16 smem chunk2", "magic_bf16", dict(SMEM, chunk_slots=2), False),
    # A from registers: chunk_slots // 2 pair-slots per wgmma (chunk 2 = one per MMA)
    ("regs c2", "magic_bf16", dict(chunk_slots=2), False),
    ("regs c8", "magic_bf16", dict(chunk_slots=8), False),
    ("regs c16", "magic_bf16", dict(chunk_slots=16), False),
    ("regs split1", "magic_bf16", dict(k_splits=1), False),
    ("regs split2", "magic_bf16", dict(k_splits=2), False),
    ("regs split8", "magic_bf16", dict(k_splits=8), False),
    ("regs split8 c8", "magic_bf16", dict(k_splits=8, chunk_slots=8), False),
    ("regs split2 c8", "magic_bf16", dict(k_splits=2, chunk_slots=8), False),
    ("regs stages3", "magic_bf16", dict(stages=3), False),
    ("regs bn128", "magic_bf16", dict(block_n=128), False),
    ("regs f16 c8", "magic_f16", dict(chunk_slots=8), False),
]


def random_weights(key, k, n, group_size, pairs: bool):
    """Random 3-bit kernel weights: random words (any word is valid in both layouts), scales
    ~ U(0.005, 0.02) and zeros ~ U(0, 7) as float16, as benchmarks/quant_matmul.py."""
    bits = 3
    slab = layout.kernel_slab(bits)
    tile = packing.slots_per_tile(bits) * slab
    k_pad = -(-k // tile) * tile
    kc, ks, kz = jax.random.split(key, 3)
    gp = k_pad // group_size
    codes = jax.random.bits(kc, (n, k_pad * bits // 32), jnp.uint32)
    scales = jax.random.uniform(ks, (gp, n), jnp.float32, 0.005, 0.02).astype(jnp.float16)
    zeros = jax.random.uniform(kz, (gp, n), jnp.float32, 0, 7).astype(jnp.float16)
    if k_pad != k:  # padded groups: scale 0 (x is zero there too)
        scales = scales.at[k // group_size:].set(0)
        zeros = zeros.at[k // group_size:].set(0)
    return layout.KernelWeights(codes=codes, scales=scales, zeros=zeros, bits=bits, group_size=group_size,
                                k=k, n=n, k_pad=k_pad, slab=slab,
                                layout=layout.PAIRS_LAYOUT if pairs else layout.LAYOUT)


def relerr(kw, x, y):
    """||y - ref|| / ||ref||, ref = f32 HIGHEST dot of x with the dequantized (bf16) weights."""
    w = api.dequantize_kernel_weights(kw).astype(jnp.float32)
    ref = jnp.dot(x.astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST)
    y = y.astype(jnp.float32)
    return float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref)), bool(jnp.all(jnp.isfinite(y)))


def kernel_breakdown(fn, args, reps) -> dict:
    """Per-kernel CUPTI time of one call of fn, summed by kernel name and divided by reps: how much of
    the total is the Mosaic kernel and how much the XLA fusions around it (x padding, split-K sum,
    transpose)."""
    from jax.experimental.mosaic.gpu import profiler
    _, per = profiler.measure(fn, aggregate=False)(*args)
    out = {}
    for name, ms in per or []:
        key = name if len(name) < 60 else name[:57] + "..."
        out[key] = out.get(key, 0.0) + ms * 1e3 / reps
    return {k: round(v, 2) for k, v in out.items()}


def run_shape(k, n, ms, group_size, variants, ceil, results, t0, budget_s):
    wbytes = logical_weight_bytes(k, n, 3, group_size, 0)
    reps = 2 if ON_CPU else max(2, min(64, math.ceil(ROTATE_BYTES / wbytes)))
    keys = jax.random.split(jax.random.key(k * 7 + n), reps)
    planar = [random_weights(kk, k, n, group_size, False) for kk in keys]
    pairs = [dataclasses.replace(w, layout=layout.PAIRS_LAYOUT) for w in planar]  # same words
    jax.block_until_ready(planar)
    for m in ms:
        x = jax.random.normal(jax.random.key(m), (m, k), jnp.float32).astype(jnp.bfloat16)
        byts = wbytes + m * k * 2 + m * n * 2
        for name, unpack, over, _ in variants:
            rec = dict(variant=name, unpack=unpack, shape=[k, n], m=m, bits=3, group_size=group_size)
            if time.time() - t0 > budget_s:
                rec["skipped"] = f"time budget {budget_s:.0f} s spent"
                results.append(rec)
                log(f"SKIP {name} {k}x{n} m={m}: budget")
                continue
            ws = pairs if unpack.startswith("magic") else planar
            t1 = time.time()
            try:
                cfg = dataclasses.replace(mgpu_sm90.default_config(m, ws[0]), unpack=unpack, **over)
                rec["config"] = str(cfg)
                rec["cfg"] = (f"bn{cfg.block_n} mb{cfg.block_m} c{cfg.chunk_slots} s{cfg.stages} "
                              f"split{cfg.k_splits}" + (" regs" if cfg.a_regs else ""))
                one = jax.jit(lambda x, kw, cfg=cfg: api.matmul(x, kw, impl="kernel", config=cfg, interpret=ON_CPU))
                fn = jax.jit(lambda x, *w: [one(x, wi) for wi in w])
                ys = jax.block_until_ready(fn(x, *ws))
                rec["compile_run_s"] = round(time.time() - t1, 1)
                rec["relerr"], rec["finite"] = relerr(ws[0], x, ys[0])
                rec["relerr_last"] = relerr(ws[-1], x, ys[-1])[0]
                if ON_CPU:  # also build the native kernel for sm90 (Mosaic lowering up to ptxas)
                    nat = jax.jit(lambda x, kw, cfg=cfg: api.matmul(x, kw, impl="kernel", config=cfg))
                    nat.trace(x, ws[0]).lower(lowering_platforms=("cuda",))
                    rec["native_lowering_on_cpu"] = "ok"
                us = cupti_us(fn, (x, *ws), reps)
                if not ON_CPU:
                    rec["kernels_us"] = kernel_breakdown(fn, (x, *ws), reps)
                tb = byts / (us * 1e-6) / 1e12
                rec.update(time_us=us, tbps=tb, frac_copy=tb / ceil if ceil else None, rotated=reps)
                log(f"RESULT {name:22s} {k}x{n} m={m:3d} {us:8.2f} us {tb:5.2f} TB/s "
                    f"{(tb / ceil if ceil else 0):5.1%} of copy relerr={rec['relerr']:.2e} ({rec['compile_run_s']} s)"
                    f" kernels: {rec.get('kernels_us')}")
            except Exception as e:
                traceback.print_exc(limit=-10)   # last frames (full error text in the JSON)
                msg = " | ".join(str(e).strip().split("\n")[:12])[:3000]
                rec["error"] = f"{type(e).__name__}: {msg}"
                log(f"FAILED {name} {k}x{n} m={m}: {rec['error'][:300]}")
            results.append(rec)
    del planar, pairs


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "quant_matmul_variants.json"))
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes in GPU interpret mode on CPU")
    ap.add_argument("--shapes", default=None, help="KxN list, default 4096x14336,14336x4096")
    ap.add_argument("--ms", default="1,16")
    ap.add_argument("--variants", default=None, help="comma list of variant names (default: all)")
    ap.add_argument("--budget-s", type=float, default=170.0, help="start no new variant after this")
    args = ap.parse_args(argv)
    if args.cpu_smoke and not ON_CPU:
        raise SystemExit("--cpu-smoke runs on CPU only (JAX_PLATFORMS=cpu)")
    if ON_CPU and not args.cpu_smoke:
        raise SystemExit("no GPU: pass --cpu-smoke for the interpret-mode dry run")
    shapes = ([(1024, 128)] if args.cpu_smoke else [(4096, 14336), (14336, 4096)])
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    ms = [int(v) for v in args.ms.split(",")]
    variants = VARIANTS
    if args.variants:
        names = args.variants.split(",")
        variants = [v for v in VARIANTS if v[0] in names]
    if args.cpu_smoke:  # interpret mode is slow: one row of each kind of variant
        args.budget_s = 1e9
        variants = [v for v in variants if v[0] in ("f32", "magic_bf16 smem", "regs", "regs f16", "bf16 (jnp)",
                                                    "regs split2", "regs c8")]
    dev = jax.devices()[0]
    log("jax", jax.__version__, dev.device_kind, "inline_mgpu:", hasattr(__import__(
        "jax.experimental.pallas.mosaic_gpu", fromlist=["x"]), "inline_mgpu"))
    t0 = time.time()
    ceil = jax_copy_tbps()
    log(f"copy ceiling (jnp elementwise, 1 GiB r+w): {ceil:.2f} TB/s")
    results = []
    meta = dict(device=dev.device_kind, jax=jax.__version__, date=datetime.date.today().isoformat(),
                copy_tbps=ceil, cpu_smoke=args.cpu_smoke, records=results)

    def save():
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump(meta, fh, indent=1)

    # phase 1: the unpack variants on every shape; phase 2: the configuration sweep (cut first)
    core = [v for v in variants if v[3]]
    sweep = [v for v in variants if not v[3]]
    for phase in (core, sweep):
        for k, n in shapes:
            if phase:
                run_shape(k, n, ms, 64, phase, ceil, results, t0, args.budget_s)
                save()
                log(f"  shape {k}x{n} done at {time.time() - t0:.0f} s")
    meta["total_s"] = time.time() - t0
    save()
    log("\n| variant | K x N | M | us | TB/s | % copy | relerr | config |")
    log("|---|---|---|---|---|---|---|---|")
    for r in results:
        head = f"| {r['variant']} | {r['shape'][0]}x{r['shape'][1]} | {r['m']} |"
        if "time_us" in r:
            log(f"{head} {r['time_us']:.2f} | {r['tbps']:.2f} | {100 * (r['frac_copy'] or 0):.1f} | "
                f"{r['relerr']:.1e} | {r['cfg']} |")
        else:
            log(f"{head} {'FAILED: ' + r['error'][:100] if 'error' in r else r.get('skipped')} ||||")
    log(f"wrote {args.out} ({meta['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
