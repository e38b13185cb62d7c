"""Benchmark: quantized matmul y = x @ deq(Q) (+ (x @ U) @ V) on the GPU, against the copy ceiling,
bf16 jnp.dot, torch's bf16 matmul and peers (torch int4 tinygemm, gemlite 4/2-bit), all measured
in the same run.

    python -m benchmarks.quant_matmul --out benchmarks/results/quant_matmul.json      # issue plan
    python -m benchmarks.quant_matmul --shapes 2048x1408 --append --out ...            # add to a JSON
    python -m benchmarks.quant_matmul --tune --out /tmp/tune.json     # kernel config sweep
    JAX_PLATFORMS=cpu python -m benchmarks.quant_matmul --smoke --out /tmp/qm.json     # CPU dry run

Timing: CUPTI kernel time (jax.experimental.mosaic.gpu.profiler.measure) of one jit that runs the
op over R separate weight buffers (a static Python loop, R buffers > 120 MB so L2 cannot serve
them), each with its own x (as the layers of a decode step; since stop 18), median over iterations,
divided by R. Torch and its peers: CUDA graph of the same rotation,
CUDA events (quant_matmul_peers.py).
Bytes that must move: codes + scales + zeros (+ u + v) at their logical (unpadded) size, x and y.
Table and roofline: benchmarks/plot_quant_matmul.py (the table is rewritten after every shape).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp

from benchmarks import plot_quant_matmul, quant_matmul_peers as peers
from benchmarks.overrides import apply_overrides
from milo_jax.quant import packing
from pallas_kernels.quant_matmul import api, layout, mgpu_sm90

SHAPES = [(4096, 14336), (14336, 4096), (2048, 1408), (1408, 2048), (4096, 4096)]
MS = [1, 4, 16, 64, 256, 4096]
ROTATE_BYTES = 160e6
RESULTS = []


def log(*a):
    print(*a, flush=True)


# ---------------------------------------------------------------------------------------- data
def random_kernel_weights(key, k, n, bits, group_size, rank):
    """Random codes (uniform), scales ~ U(0.005, 0.02), zeros ~ U(0, 2^bits - 1) in the kernel layout
    that api.matmul picks for a QuantizedTensor of this width ("planar_pairs" for 2/3/4-bit: the magic
    unpack with A in registers; random words are valid codes in either layout)."""
    slab = layout.kernel_slab(bits)
    tile = packing.slots_per_tile(bits) * slab
    k_pad = -(-k // tile) * tile
    g = group_size or k
    rows = k_pad if g >= k else g
    kc, ks, kz, ku, kv = jax.random.split(key, 5)
    codes = jax.random.bits(kc, (n, k_pad * bits // 32), jnp.uint32)
    # Padded K rows (k_pad > k) keep random codes: x is zero there, so they add exactly 0.
    gp = k_pad // rows
    scales = jax.random.uniform(ks, (gp, n), jnp.float32, 0.005, 0.02).astype(jnp.float16)
    zeros = jax.random.uniform(kz, (gp, n), jnp.float32, 0, 2**bits - 1).astype(jnp.float16)
    if g < k and k_pad != k:
        valid = k // g
        scales = scales.at[valid:].set(0)
        zeros = zeros.at[valid:].set(0)
    u = v_t = None
    if rank:
        u = (jax.random.normal(ku, (k, rank), jnp.float32) * 0.02).astype(jnp.bfloat16)
        rp = layout.rank_pad(rank)   # as layout.prepare pads v^T
        v_t = jnp.pad((jax.random.normal(kv, (n, rank), jnp.float32) * 0.02).astype(jnp.bfloat16),
                      ((0, 0), (0, rp - rank)))
    return layout.KernelWeights(codes=codes, scales=scales, zeros=zeros, u=u, v_t=v_t, bits=bits,
                                group_size=group_size or k, k=k, n=n, k_pad=k_pad, slab=slab,
                                layout=layout.decode_layout(bits))


def logical_weight_bytes(k, n, bits, group_size, rank):
    g = group_size or k
    return k * n * bits / 8 + 2 * 2 * n * math.ceil(k / g) + rank * (k + n) * 2


# -------------------------------------------------------------------------------------- timing
BREAKDOWN = False   # --breakdown
ON_CPU = jax.devices()[0].platform == "cpu"   # dry run of this script: interpret mode, wall clock


def cupti_us(fn, args, reps, iterations=10):
    jax.block_until_ready(fn(*args))
    if ON_CPU:
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        return (time.perf_counter() - t) * 1e6 / reps
    from jax.experimental.mosaic.gpu import profiler
    _, ts = profiler.measure(fn, iterations=iterations)(*args)
    return statistics.median(ts) * 1e3 / reps


def record(**kw):
    RESULTS.append(kw)
    keys = ("impl", "shape", "m", "bits", "group_size", "rank", "time_us", "tbps", "frac_copy", "speedup_vs_bf16", "relerr")
    log("RESULT", json.dumps({k: kw[k] for k in keys if k in kw}))


def torch_ceilings():
    out = {}
    try:
        import torch
        dev = torch.device("cuda")
        src = torch.randn(1 << 28, device=dev)
        dst = torch.empty_like(src)
        for _ in range(3):
            dst.copy_(src)
        torch.cuda.synchronize()
        ts = []
        for _ in range(5):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            for _ in range(10):
                dst.copy_(src)
            e1.record()
            torch.cuda.synchronize()
            ts.append(e0.elapsed_time(e1) / 10 * 1e-3)
        out["copy_tbps_torch"] = 2 * src.numel() * 4 / statistics.median(ts) / 1e12
        del src, dst
        torch.cuda.empty_cache()
    except Exception as e:  # torch missing or no GPU
        log("torch copy failed:", e)
    return out


def jax_copy_tbps():
    a = jax.random.normal(jax.random.key(0), (1 << (20 if ON_CPU else 28),), jnp.float32)
    f = jax.jit(lambda a: a * 1.0001)
    us = cupti_us(f, (a,), 1)
    return 2 * a.size * 4 / (us * 1e-6) / 1e12


# ----------------------------------------------------------------------------------- the cases
def activations(m, k, reps):
    """One x [m, K] bf16 per rotated weight, as in decoding, where each layer multiplies its own input.
    (One x shared by every weight let XLA merge the rank-r x @ u dots of all the calls into one GEMM
    over concatenated u's, whose concatenation alone was 0.55 us a call; H200, 2026-12-03, s18b.)"""
    keys = jax.random.split(jax.random.key(m), reps)
    return [jax.random.normal(kk, (m, k), jnp.float32).astype(jnp.bfloat16) for kk in keys]



def check_kernel(kw, x, y):
    """Relative error of y against dequantize -> float32 HIGHEST dot (on the GPU)."""
    w = api.dequantize_kernel_weights(kw).astype(jnp.float32)
    ref = jnp.dot(x.astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST)
    if kw.u is not None:
        xu = jnp.dot(x.astype(jnp.float32), kw.u.astype(jnp.float32), precision="highest")
        ref = ref + jnp.dot(xu, kw.v_t[:, :kw.rank].T.astype(jnp.float32), precision="highest")
    y = y.astype(jnp.float32)
    return float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref)), bool(jnp.all(jnp.isfinite(y)))


def bench_quant(k, n, ms, bits, group_size, rank, impls, ceil, bf16_us, configs=None):
    """Time each impl (and kernel config) at every M; records carry the relative error too."""
    wbytes = logical_weight_bytes(k, n, bits, group_size, rank)
    reps = 2 if ON_CPU else max(2, min(64, math.ceil(ROTATE_BYTES / wbytes)))
    keys = jax.random.split(jax.random.key(k * 7 + n + bits), reps)
    kws = [random_kernel_weights(kk, k, n, bits, group_size, rank) for kk in keys]
    jax.block_until_ready(kws)
    for m in ms:
        xs = activations(m, k, reps)
        x = xs[0]
        byts = wbytes + m * k * 2 + m * n * 2
        for impl in impls:
            cfg_list = configs if (impl == "mgpu" and configs) else [None]
            for cfg in cfg_list:
                name = (("milo" if bits == 3 and group_size == 64 else f"milo_w{bits}g{group_size or 'ch'}")
                        if impl == "auto" else impl) if cfg is None else (
                    f"mgpu bn{cfg.block_n} c{cfg.chunk_slots} s{cfg.stages} split{cfg.k_splits}"
                    + ("" if cfg.overlap else " no-overlap"))
                if impl == "mgpu" and m > 512:
                    continue
                if "dequant_dot" in impl and m < 64:
                    continue
                if impl == "auto":
                    # api.matmul's own choice on sm90 (kernel up to prefill_threshold(K, N)); on CPU the
                    # same choice forced, the kernel interpreted
                    path = "kernel" if m <= api.prefill_threshold(k, n) else "mgpu_dequant_dot"
                    call_impl, interp = ((path, path in ("kernel", "mgpu_dequant_dot")) if ON_CPU
                                         else (None, None))
                else:
                    path = call_impl = "kernel" if impl == "mgpu" else impl
                    interp = ON_CPU and "mgpu" in impl
                try:
                    # nested jit: the kernel is lowered once and called on every rotated buffer
                    one = jax.jit(lambda x, kw, call_impl=call_impl, interp=interp, cfg=cfg:
                                  api.matmul(x, kw, impl=call_impl, config=cfg, interpret=interp))
                    fn = jax.jit(lambda xs, *ws: [one(xi, w) for xi, w in zip(xs, ws)])
                    ys = jax.block_until_ready(fn(xs, *kws))
                    err, fin = check_kernel(kws[0], x, ys[0])
                    us = cupti_us(fn, (xs, *kws), reps)
                    extra = {}
                    if BREAKDOWN and not ON_CPU:   # which kernels the call's time is made of
                        from benchmarks.quant_matmul_variants import kernel_breakdown
                        extra["kernels_us"] = kernel_breakdown(fn, (xs, *kws), reps)
                        log(f"KERNELS {name} m={m} rank={rank}: {extra['kernels_us']}")
                    bf = bf16_us.get(m)
                    record(op="quant_matmul", impl=name, shape=[k, n], m=m, bits=bits,
                           group_size=group_size or "channel", rank=rank, time_us=us, bytes=byts,
                           tbps=byts / (us * 1e-6) / 1e12, frac_copy=byts / (us * 1e-6) / 1e12 / ceil,
                           tflops=2 * m * k * n / (us * 1e-6) / 1e12,
                           speedup_vs_bf16=(bf / us) if bf else None, relerr=err, finite=fin,
                           config=None if cfg is None else str(cfg), path=path, rotated=reps,
                           timing="cupti" if not ON_CPU else "wall_cpu", **extra)
                except Exception as e:
                    msg = " | ".join(str(e).strip().split("\n")[:3])[:500]
                    record(op="quant_matmul", impl=name, shape=[k, n], m=m, bits=bits,
                           group_size=group_size or "channel", rank=rank, error=f"{type(e).__name__}: {msg}")
                    traceback.print_exc(limit=2)
    del kws


def bench_bf16(k, n, ms, ceil, use_torch):
    wbytes = k * n * 2
    reps = 2 if ON_CPU else max(2, min(16, math.ceil(ROTATE_BYTES / wbytes)))
    ws = [jax.random.normal(kk, (k, n), jnp.float32).astype(jnp.bfloat16)
          for kk in jax.random.split(jax.random.key(n), reps)]
    out = {}
    for m in ms:
        xs = activations(m, k, reps)
        byts = wbytes + m * k * 2 + m * n * 2
        fn = jax.jit(lambda xs, *ws: [jnp.dot(xi, w, preferred_element_type=jnp.float32).astype(jnp.bfloat16)
                                      for xi, w in zip(xs, ws)])
        us = cupti_us(fn, (xs, *ws), reps)
        out[m] = us
        record(op="matmul", impl="bf16_jnp_dot", shape=[k, n], m=m, bits=16, group_size=None, rank=0,
               time_us=us, bytes=byts, tbps=byts / (us * 1e-6) / 1e12, frac_copy=byts / (us * 1e-6) / 1e12 / ceil,
               tflops=2 * m * k * n / (us * 1e-6) / 1e12, speedup_vs_bf16=1.0, rotated=reps,
               timing="cupti" if not ON_CPU else "wall_cpu")
        if use_torch:
            try:
                r = peers.torch_bf16(k, n, m, reps)
                tus = r["time_us"]
                record(op="matmul", impl="torch_bf16", shape=[k, n], m=m, bits=16, group_size=None, rank=0,
                       time_us=tus, bytes=byts, tbps=byts / (tus * 1e-6) / 1e12,
                       frac_copy=byts / (tus * 1e-6) / 1e12 / ceil, tflops=2 * m * k * n / (tus * 1e-6) / 1e12,
                       speedup_vs_bf16=us / tus, rotated=reps, timing=r["timing"])
            except Exception as e:  # noqa: BLE001 - a failing peer is recorded, the run goes on
                peer_error("torch_bf16", k, n, m, 16, None, e)
    del ws
    return out


PEERS = {
    # name: (bits, group, runner(k, n, m, opts) -> dict)
    "torch_int4_g64": (4, 64, lambda k, n, m, o: peers.torch_int4(k, n, m, 64)),
    "torch_int4_g128": (4, 128, lambda k, n, m, o: peers.torch_int4(k, n, m, 128)),
    "gemlite_w4_g64": (4, 64, lambda k, n, m, o: peers.gemlite_w(k, n, m, 4, 64, o.gemlite_autotune)),
    "gemlite_w2_g64": (2, 64, lambda k, n, m, o: peers.gemlite_w(k, n, m, 2, 64, o.gemlite_autotune)),
}


def peer_error(name, k, n, m, bits, group, e):
    msg = " | ".join(str(e).strip().split("\n")[:3])[:500]
    record(op="peer", impl=name, shape=[k, n], m=m, bits=bits, group_size=group, rank=0,
           error=f"{type(e).__name__}: {msg}")
    traceback.print_exc(limit=3)


def bench_peers(k, n, ms, names, ceil, bf16_us, opts):
    """Torch-side peers at every M; each in try/except (a failure is recorded, the run goes on)."""
    for name in names:
        bits, group, run = PEERS[name]
        for m in ms:
            try:
                r = run(k, n, m, opts)
                byts = r["weight_bytes"] + m * k * 2 + m * n * 2
                us = r["time_us"]
                bf = bf16_us.get(m)
                record(op="peer", impl=name, shape=[k, n], m=m, bits=bits, group_size=group, rank=0,
                       time_us=us, bytes=byts, tbps=byts / (us * 1e-6) / 1e12,
                       frac_copy=byts / (us * 1e-6) / 1e12 / ceil, tflops=2 * m * k * n / (us * 1e-6) / 1e12,
                       speedup_vs_bf16=(bf / us) if bf else None, relerr=r.get("relerr"),
                       rotated=r.get("rotated"), timing=r["timing"], config=r.get("config"))
            except Exception as e:  # noqa: BLE001
                peer_error(name, k, n, m, bits, group, e)


def native_checks():
    """Kernel vs f32 dequant reference, per-channel scales, every bit width (1408 x 512: K padded).

    (Groups 64 and 128 of every bit width are covered by tests/test_quant_matmul.py -m gpu.)
    """
    for bits in (2, 3, 4, 8):
        for g in (None,):
            for m, rank in ((3, 32),):
                kw = random_kernel_weights(jax.random.key(bits * 100 + (g or 1)), 1408, 512, bits, g, rank)
                x = jax.random.normal(jax.random.key(m), (m, 1408), jnp.float32).astype(jnp.bfloat16)
                try:
                    y = jax.jit(lambda x, kw: api.matmul(x, kw, impl="kernel", interpret=ON_CPU))(x, kw)
                    err, fin = check_kernel(kw, x, y)
                    log(f"CHECK bits={bits} g={g} m={m} rank={rank} relerr={err:.2e} finite={fin} {'OK' if err < 1e-2 and fin else 'BAD'}")
                    RESULTS.append(dict(op="check", impl="mgpu", shape=[1408, 512], m=m, bits=bits,
                                        group_size=g or "channel", rank=rank, relerr=err, finite=fin))
                except Exception as e:
                    log(f"CHECK bits={bits} g={g} FAILED {type(e).__name__}: {str(e)[:300]}")


def run_issue_plan(shapes, ms, ceil, opts, save, t0):
    """Issue 6's table: per shape, bf16 (jnp + torch), our kernel (api's default choice, 3-bit g64)
    and the peers at every M; on --rank-shape (the goal shape) also the nonzero --ranks at M in
    {1, 16, 4096}."""
    for k, n in shapes:
        bf = bench_bf16(k, n, ms, ceil["copy_tbps"], not opts.no_torch)
        ceil["bf16_tflops"] = max([ceil.get("bf16_tflops", 0)] + [r["tflops"] for r in RESULTS if r.get("impl") == "bf16_jnp_dot"])
        for bits in [int(b) for b in opts.ours_bits.split(",")]:
            bench_quant(k, n, ms, bits, 64, 0, ["auto"], ceil["copy_tbps"], bf)
        if f"{k}x{n}" == opts.rank_shape:
            for rank in [int(r) for r in opts.ranks.split(",") if int(r)]:
                bench_quant(k, n, [m for m in ms if m in (1, 16, 4096)], 3, 64, rank, ["auto"], ceil["copy_tbps"], bf)
        if not opts.no_torch and opts.peers:
            bench_peers(k, n, ms, opts.peers.split(","), ceil["copy_tbps"], bf, opts)
        log(f"  shape {k}x{n} done at {time.time() - t0:.0f}s")
        save()


def load_previous(path):
    """Records and runs of an earlier JSON (for --append); none if it does not exist."""
    if not os.path.exists(path):
        return [], []
    with open(path) as fh:
        old = json.load(fh)
    runs = old.get("runs") or [dict(command=old.get("command"), ceilings=old.get("ceilings"), date=old.get("date"))]
    return old.get("records", []), runs


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/quant_matmul.json")
    ap.add_argument("--shapes", default=None, help="K x N list, e.g. 4096x14336,2048x1408 (default: the issue's 5)")
    ap.add_argument("--ms", default=None, help="e.g. 1,16,4096 (default 1,4,16,64,256,4096)")
    ap.add_argument("--append", action="store_true", help="add to the records already in --out")
    ap.add_argument("--bits", default="3", help="grid plan only")
    ap.add_argument("--group", default="64", help="grid plan only")
    ap.add_argument("--ranks", default="0,32", help="issue plan: nonzero ranks measured on --rank-shape at M 1/16/4096")
    ap.add_argument("--rank-shape", default="4096x14336", help="issue plan: the shape that gets the compensator cases")
    ap.add_argument("--impls", default="mgpu,dequant_dot", help="grid plan only: mgpu, auto, dequant_dot, mgpu_dequant_dot")
    ap.add_argument("--peers", default=",".join(PEERS), help=f"comma list of {list(PEERS)}; empty for none")
    ap.add_argument("--ours-bits", default="3", help="issue plan: bit widths of our kernel (g64, rank 0); 3 is 'milo'")
    ap.add_argument("--gemlite-autotune", default="default", choices=["default", "fast"],
                    help="default: gemlite's shipped H100 configs where they exist, else its default config")
    ap.add_argument("--tune", action="store_true", help="sweep kernel configs (grid plan)")
    ap.add_argument("--no-torch", action="store_true", help="no torch ceiling, torch bf16 or peers")
    ap.add_argument("--breakdown", action="store_true", help="also record our calls' per-kernel CUPTI times (kernels_us)")
    ap.add_argument("--check", action="store_true", help="native correctness of every bit width first")
    ap.add_argument("--smoke", action="store_true", help="CPU dry run: 256x128 and 128x192, M 1 and 300, interpret mode")
    ap.add_argument("--plan", default="issue", choices=["issue", "grid"],
                    help="issue: the issue's table (bf16, our default, peers); grid: full product of --bits/--group/--ranks/--impls")
    ap.add_argument("--set", action="append", default=[], metavar="MODULE.ATTR=VALUE",
                    help="override a module constant before timing (an int), e.g. "
                         "pallas_kernels.grouped_matmul.mgpu_sm90.FOLD_MAX_BLOCK_M=0; repeatable")
    args = ap.parse_args(argv)
    apply_overrides(args.set, log)
    global BREAKDOWN
    BREAKDOWN = args.breakdown
    if args.smoke:
        args.shapes = args.shapes or "256x128,128x192"
        args.ms = args.ms or "1,300"
        args.rank_shape = args.shapes.split(",")[0]
    shapes = SHAPES if not args.shapes else [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    ms = MS if not args.ms else [int(v) for v in args.ms.split(",")]
    dev = jax.devices()[0]
    log("jax", jax.__version__, dev.device_kind)
    if ON_CPU and not args.no_torch:
        log("CPU: no torch ceiling, torch bf16 or peers (they need CUDA)")
        args.no_torch = True
    ceil = torch_ceilings() if not args.no_torch else {}
    ceil["copy_tbps_jax"] = jax_copy_tbps()  # one jnp elementwise pass over 1 GiB, read + write
    ceil["copy_tbps"] = max(ceil.get("copy_tbps_torch", 0), ceil["copy_tbps_jax"])
    log("ceilings", ceil)
    configs = None
    if args.tune:
        args.plan = "grid"
        configs = []
        for bn in (64, 128):
            for chunk in (4, 8, 16):
                for stages in (2, 3, 4):
                    configs.append(mgpu_sm90.Config(block_n=bn, block_m=0, chunk_slots=chunk, stages=stages))
        configs.append(mgpu_sm90.Config(block_n=64, block_m=0, chunk_slots=8, stages=2, overlap=False))
    t0 = time.time()
    command = "python -m benchmarks.quant_matmul " + " ".join(argv if argv is not None else sys.argv[1:])
    old_records, runs = load_previous(args.out) if args.append else ([], [])
    runs = runs + [dict(command=command, ceilings=ceil, date=datetime.date.today().isoformat(),
                        device=dev.device_kind, jax=jax.__version__)]

    def save():
        records = old_records + RESULTS
        bf16_tf = [r["tflops"] for r in records if r.get("impl") == "bf16_jnp_dot" and "tflops" in r]
        top = dict(ceil, bf16_tflops=max(bf16_tf)) if bf16_tf else dict(ceil)
        meta = dict(device=dev.device_kind, date=datetime.date.today().isoformat(), jax=jax.__version__,
                    command=" ; ".join(r["command"] for r in runs), ceilings=top, runs=runs, records=records)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump(meta, fh, indent=1)
        with open(os.path.splitext(args.out)[0] + ".md", "w") as fh:
            fh.write(plot_quant_matmul.markdown(meta))
        return meta

    if args.check:
        native_checks()
        save()
    if args.plan == "issue":
        run_issue_plan(shapes, ms, ceil, args, save, t0)
        shapes = []
    for k, n in shapes:
        bf = bench_bf16(k, n, ms, ceil["copy_tbps"], not args.no_torch)
        for bits in [int(b) for b in args.bits.split(",")]:
            for g in args.group.split(","):
                for rank in [int(r) for r in args.ranks.split(",")]:
                    bench_quant(k, n, ms, bits, None if g == "channel" else int(g), rank,
                                args.impls.split(","), ceil["copy_tbps"], bf, configs)
        log(f"  shape {k}x{n} done at {time.time() - t0:.0f}s")
        save()
    save()
    log(f"\n==== summary ({time.time() - t0:.0f}s) ====")
    for r in RESULTS:
        if r.get("op") == "check":
            continue
        if "error" in r:
            log(f"{r['impl'][:40]:40s} {r['shape']} m={r['m']:5d} r={r['rank']} FAILED {r['error'][:150]}")
        else:
            sp = r.get("speedup_vs_bf16")
            log(f"{r['impl'][:40]:40s} {r['shape']} m={r['m']:5d} b={r['bits']} r={r['rank']:3d} {r['time_us']:9.1f} us "
                f"{r['tbps']:5.2f} TB/s {r['frac_copy']:5.2f} {r['tflops']:6.1f} TF x{(sp or 0):5.2f} "
                f"err={r.get('relerr') or 0:.1e}")


if __name__ == "__main__":
    main()
