"""2/4-bit decode kernel: the magic-number unpack ("planar_pairs", A in registers) against the f32
unpack ("planar_nmajor", the layout these widths had before 2026-12-02), same words, same grid.

    python -m benchmarks.pairs_vs_nmajor --out benchmarks/results/pairs_vs_nmajor.json

Random words are valid codes in either layout (they only map to other K rows), so one set of
rotated weights serves both; each timing is checked against the f32 dequantization of its own
layout (relerr). CUPTI kernel time of api.matmul (decode kernel, default config per layout).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time

import jax
import jax.numpy as jnp

from benchmarks.quant_matmul import (ON_CPU, ROTATE_BYTES, check_kernel, cupti_us, logical_weight_bytes,
                                     random_kernel_weights)
from pallas_kernels.quant_matmul import api, layout


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="4096x14336,2048x1408")
    ap.add_argument("--bits", default="2,4")
    ap.add_argument("--ms", default="1,16")
    ap.add_argument("--out", default="benchmarks/results/pairs_vs_nmajor.json")
    opts = ap.parse_args()
    records = []
    for shape in opts.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        for bits in (int(b) for b in opts.bits.split(",")):
            wbytes = logical_weight_bytes(k, n, bits, 64, 0)
            reps = 2 if ON_CPU else max(2, min(64, math.ceil(ROTATE_BYTES / wbytes)))
            pairs = [random_kernel_weights(kk, k, n, bits, 64, 0)
                     for kk in jax.random.split(jax.random.key(bits * 31 + k), reps)]
            by_layout = {layout.PAIRS_LAYOUT: pairs,
                         layout.LAYOUT: [dataclasses.replace(w, layout=layout.LAYOUT) for w in pairs]}
            for m in (int(v) for v in opts.ms.split(",")):
                x = jax.random.normal(jax.random.key(m), (m, k), jnp.float32).astype(jnp.bfloat16)
                for lay, kws in by_layout.items():
                    one = jax.jit(lambda x, w: api.matmul(x, w, impl="kernel", interpret=ON_CPU))
                    fn = jax.jit(lambda x, *ws: [one(x, w) for w in ws])
                    ys = jax.block_until_ready(fn(x, *kws))
                    err, finite = check_kernel(kws[0], x, ys[0])
                    us = cupti_us(fn, (x, *kws), reps)
                    rec = dict(shape=[k, n], bits=bits, group_size=64, m=m, layout=lay, time_us=us,
                               tbps=(wbytes + 2 * m * (k + n)) / (us * 1e-6) / 1e12, relerr=err, finite=finite)
                    records.append(rec)
                    print("RESULT", json.dumps(rec), flush=True)
    dev = jax.devices()[0]
    with open(opts.out, "w") as fh:
        json.dump(dict(device=getattr(dev, "device_kind", str(dev)), jax=jax.__version__,
                       date=time.strftime("%Y-%m-%d"), records=records), fh, indent=1)
    print("| K x N | bits | M | planar_nmajor (f32 unpack) us | planar_pairs (magic) us | speedup |")
    print("|---|---|---|---|---|---|")
    for r in records:
        if r["layout"] == layout.PAIRS_LAYOUT:
            old = next(o for o in records if o["layout"] == layout.LAYOUT and
                       (o["shape"], o["bits"], o["m"]) == (r["shape"], r["bits"], r["m"]))
            print(f"| {r['shape'][0]}x{r['shape'][1]} | {r['bits']} | {r['m']} | {old['time_us']:.1f} | "
                  f"{r['time_us']:.1f} | {old['time_us'] / r['time_us']:.2f}x |")


if __name__ == "__main__":
    main()
