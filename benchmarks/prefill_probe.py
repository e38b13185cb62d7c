"""Prefill paths on the H100 (issues 6 and 7): the Mosaic dequantize kernel, quant_matmul at M=4096
through it, jax's ragged_dot_mgpu tile configurations on Mixtral's expert shapes, and the grouped
prefill path (dequantize every expert once + ragged_dot_mgpu) against the decode kernel.

    python3 -m benchmarks.prefill_probe --out $OUT/prefill_probe.json

CUPTI kernel time (benchmarks.quant_matmul.cupti_us); every case checked against a float32
reference on a row slice before it is timed. Weights: random 3-bit g64 codes in planar_pairs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp

import milo_jax  # noqa: F401
from benchmarks.quant_matmul import cupti_us
from benchmarks.quant_matmul_variants import random_weights
from pallas_kernels.grouped_matmul import mgpu_sm90 as gk
from pallas_kernels.quant_matmul import api, layout, mgpu_sm90

RESULTS = []


def log(*a):
    print(*a, flush=True)


def rec(**kw):
    RESULTS.append(kw)
    log("RESULT", json.dumps(kw))


def guarded(name, fn):
    try:
        fn()
    except Exception as e:   # noqa: BLE001 -- one failing case must not stop the others
        traceback.print_exc(limit=-6)
        rec(case=name, error=f"{type(e).__name__}: {str(e)[:400]}")


def relerr(a, b):
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def dense_cases(k, n, m):
    kw = random_weights(jax.random.key(0), k, n, 64, True)
    w_bytes = kw.codes.size * 4 + kw.scales.size * 4

    def deq():
        f = jax.jit(lambda kw: mgpu_sm90.dequantize_mgpu(kw))
        w_t = f(kw)
        err = relerr(w_t[:, :k].T, api.dequantize_kernel_weights(kw))
        us = cupti_us(f, (kw,), 1)
        moved = w_bytes + n * kw.k_pad * 2
        rec(case="dequantize_kernel", shape=[k, n], time_us=us, tbps=moved / us / 1e6, relerr=err)
    guarded("dequantize_kernel", deq)

    x = jax.random.normal(jax.random.key(1), (m, k), jnp.float32).astype(jnp.bfloat16)
    w_ref = api.dequantize_kernel_weights(kw)
    ref = jnp.dot(x[:256], w_ref, preferred_element_type=jnp.float32)
    flops = 2 * m * k * n
    for impl in ("mgpu_dequant_dot", "dequant_dot", "bf16_dot"):
        def one(impl=impl):
            if impl == "bf16_dot":
                f = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
                args = (x, w_ref)
            else:
                f = jax.jit(lambda x, kw: api.matmul(x, kw, impl=impl))
                args = (x, kw)
            y = f(*args)
            err = relerr(y[:256], ref)
            us = cupti_us(f, args, 1)
            rec(case="quant_matmul_prefill", impl=impl, shape=[k, n], m=m, time_us=us,
                tflops=flops / us / 1e6, relerr=err)
        guarded(f"quant_matmul_prefill {impl}", one)


def ragged_cases(k, n, rows, e, configs):
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu
    x = jax.random.normal(jax.random.key(2), (rows, k), jnp.float32).astype(jnp.bfloat16)
    w_t = (jax.random.normal(jax.random.key(3), (e, n, k), jnp.float32) * 0.02).astype(jnp.bfloat16)
    gs = jnp.bincount(jax.random.randint(jax.random.key(4), (rows,), 0, e), length=e).astype(jnp.int32)
    flops = 2 * rows * k * n
    w = jnp.swapaxes(w_t, 1, 2)
    ref = jax.jit(lambda x, w, gs: jax.lax.ragged_dot(x, w, gs, preferred_element_type=jnp.float32))(x, w, gs)

    def xla():
        f = jax.jit(lambda x, w, gs: jax.lax.ragged_dot(x, w, gs, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
        us = cupti_us(f, (x, w, gs), 1)
        rec(case="ragged_bf16", impl="xla_ragged_dot", shape=[k, n], rows=rows, time_us=us, tflops=flops / us / 1e6)
    guarded("xla ragged", xla)
    for cfg in configs:
        def one(cfg=cfg):
            f = jax.jit(lambda x, w_t, gs: ragged_dot_mgpu.ragged_dot(x, w_t, group_sizes=gs, transpose_rhs=True, **cfg))
            y = f(x, w_t, gs)
            err = relerr(y, ref)
            us = cupti_us(f, (x, w_t, gs), 1)
            rec(case="ragged_bf16", impl="ragged_dot_mgpu", config=cfg, shape=[k, n], rows=rows, time_us=us,
                tflops=flops / us / 1e6, relerr=err)
        guarded(f"ragged_dot_mgpu {cfg}", one)


def grouped_cases(k, n, rows, e):
    ws = [random_weights(kk, k, n, 64, True) for kk in jax.random.split(jax.random.key(5), e)]
    c = gk.ExpertClass(codes=jnp.concatenate([w.codes for w in ws]), scales=jnp.concatenate([w.scales for w in ws]),
                       zeros=jnp.concatenate([w.zeros for w in ws]), experts=tuple(range(e)), bits=3, group_size=64,
                       k=k, n=n, k_pad=ws[0].k_pad, slab=ws[0].slab, group_rows=64, layout=layout.PAIRS_LAYOUT)
    gkw = gk.GroupedKernelWeights(classes=(c,), num_experts=e, k=k, n=n)
    del ws
    x = jax.random.normal(jax.random.key(6), (rows, k), jnp.float32).astype(jnp.bfloat16)
    gs = jnp.bincount(jax.random.randint(jax.random.key(7), (rows,), 0, e), length=e).astype(jnp.int32)
    flops = 2 * rows * k * n
    y_ref = None
    for prefill in (True, False):
        def one(prefill=prefill):
            nonlocal y_ref
            f = jax.jit(lambda x, w, gs: gk.grouped_matmul_mgpu(x, w, gs, prefill=prefill))
            y = f(x, gkw, gs)
            if y_ref is None:
                y_ref = y
            err = relerr(y, y_ref)
            us = cupti_us(f, (x, gkw, gs), 1)
            rec(case="grouped_q3", impl="prefill" if prefill else "decode_kernel", shape=[k, n], rows=rows,
                time_us=us, tflops=flops / us / 1e6, relerr_vs_first=err)
        guarded(f"grouped prefill={prefill}", one)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "prefill_probe.json"))
    ap.add_argument("--parts", default="dense,ragged,grouped")
    a = ap.parse_args()
    t0 = time.time()
    parts = a.parts.split(",")
    if "dense" in parts:
        dense_cases(4096, 14336, 4096)
    if "ragged" in parts:
        base = dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=4, grid_block_n=4)
        configs = [base, dict(base, block_n=192, grid_block_n=1) if 14336 % 192 == 0 else dict(base, grid_block_n=8),
                   dict(base, max_concurrent_steps=5), dict(base, block_m=64), dict(base, grid_block_n=1),
                   dict(base, block_n=256, max_concurrent_steps=3)]
        ragged_cases(4096, 14336, 8192, 8, configs)
        ragged_cases(14336, 4096, 8192, 8, configs[:3])
    if "grouped" in parts:
        grouped_cases(4096, 14336, 8192, 8)
    out = dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__, date=str(datetime.date.today()),
               results=RESULTS, total_s=round(time.time() - t0, 1))
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
