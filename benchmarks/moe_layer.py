"""Benchmark: the whole MoE FFN (routed experts + shared experts; the ROUTER IS EXCLUDED: the
routing (ids, weights) is drawn once per case outside the timed region) on the GPU.

    python -m benchmarks.moe_layer --out benchmarks/results/moe_layer.json        # H100
    python -m benchmarks.moe_layer --small --out /tmp/moe_layer_small.json        # CPU smoke run
    # under a 10-minute command limit, one model per command:
    python -m benchmarks.moe_layer --models mixtral-8x7b --out benchmarks/results/moe_layer.json
    python -m benchmarks.moe_layer --models deepseek-v2-lite --append --out benchmarks/results/moe_layer.json

Timed per case: sort (token, slot) pairs by expert, gather rows, gate/up/down grouped matmuls,
SiLU(gate)*up, combine back to tokens, plus the shared expert(s). Impls:
- ragged_dot_bf16   jax.lax.ragged_dot on bf16 stacked experts (the baseline to beat)
- grouped_bf16      pallas_kernels.grouped_matmul (auto) on bf16 stacked experts
- model_bf16        milo_jax.models.moe.StackedExperts as the model runs it (gather path for
                    T*k < E, grouped path otherwise)
- bf16_kernel       the bf16 experts through the grouped Mosaic GPU kernel (reads active experts only)
- q3_grouped        uniform 3-bit g64 stacked QuantizedTensor through grouped_matmul (auto:
                    dequantize + ragged_dot); shared expert 3-bit through models.linear
- q3_model          the same weights through StackedExperts (gather path at decode)
- q3_kernel         the same through the grouped Mosaic GPU kernel (impl="kernel")
- mixed234_grouped  per-expert 2/3/4-bit lists (gate/up and down with different assignments)
- mixed234_kernel   the same through the kernel (one launch per bit-width class)
Timing: CUPTI kernel time of one jit that runs the FFN over R separate weight sets (a static Python
loop; R sets of the ACTIVE experts' bytes exceed 160 MB so L2 cannot serve them), median over
iterations, divided by R (benchmarks.quant_matmul.cupti_us). On CPU: wall clock, interpret mode.
Bytes that must move: the distinct routed experts' weights (logical: codes + scales + zeros), the
shared experts, x and y. speedup_vs_ragged_dot and speedup_vs_bf16 (grouped_bf16) are from the
same run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.quant_matmul import ON_CPU, cupti_us, jax_copy_tbps, torch_ceilings
from milo_jax.models.linear import linear
from milo_jax.models.moe import StackedExperts, sort_by_expert
from milo_jax.quant import packing
from milo_jax.quant.tensor import QuantizedTensor
from pallas_kernels.grouped_matmul import api as gapi
from pallas_kernels.quant_matmul import prepare as quant_matmul_prepare

MODELS = {
    # name: experts, top-k, hidden, expert intermediate, shared intermediate (0: none), sigmoid-gated shared
    "mixtral-8x7b": dict(e=8, k=2, h=4096, i=14336, shared=0, shared_gate=False),
    "deepseek-v2-lite": dict(e=64, k=6, h=2048, i=1408, shared=2 * 1408, shared_gate=False),
    "qwen1.5-moe-a2.7b": dict(e=60, k=4, h=2048, i=1408, shared=5632, shared_gate=True),
}
SMALL_MODELS = {
    "tiny-mixtral": dict(e=8, k=2, h=128, i=256, shared=0, shared_gate=False),
    "tiny-deepseek": dict(e=16, k=6, h=128, i=128, shared=256, shared_gate=False),
}
TOKENS = [1, 16, 64, 512, 4096]
SMALL_TOKENS = [1, 16, 64]
IMPLS = ["ragged_dot_bf16", "grouped_bf16", "model_bf16", "bf16_kernel", "q3_grouped", "q3_model", "q3_kernel",
         "mixed234_grouped", "mixed234_kernel"]
ROTATE_BYTES = 160e6
MAX_SET_BYTES = 24e9          # cap on the rotated copies held at once
GROUP = 64
RESULTS = []


def log(*a):
    print(*a, flush=True)


# ---------------------------------------------------------------------------------------- data
def random_qt(key, lead, k, n, bits, group=GROUP):
    """A random planar QuantizedTensor [*lead, K, N]: uniform codes, scales ~ U(0.005, 0.02) (f16),
    zeros ~ U(0, 2^bits - 1): realistic magnitudes without running a quantizer on GBs of weights."""
    kc, ks, kz = jax.random.split(key, 3)
    slab = packing.default_slab(k, bits)
    codes = jax.random.bits(kc, (*lead, k * bits // 32, n), jnp.uint32)
    scales = jax.random.uniform(ks, (*lead, k // group, n), jnp.float32, 0.005, 0.02).astype(jnp.float16)
    zeros = jax.random.uniform(kz, (*lead, k // group, n), jnp.float32, 0, 2**bits - 1).astype(jnp.float16)
    return QuantizedTensor(codes=codes, scales=scales, zeros=zeros, bits=bits, group_size=group,
                           shape=(*lead, k, n), slab=slab, dtype="bfloat16")


def random_bf16(key, shape):
    """Heavy-tailed (Student t, df 4) bf16 weights at the scale of trained FFN weights."""
    return (jax.random.t(key, 4.0, shape, jnp.float32) * 0.02).astype(jnp.bfloat16)


def mixed_bits(e, which):
    """Per-expert bit widths, 2/3/4 in a fixed pattern; gate/up and down get different patterns."""
    pattern = (2, 3, 4, 3) if which == "gate_up" else (3, 4, 3, 2)
    return [pattern[i % len(pattern)] for i in range(e)]


def qt_bytes(k, n, bits, group=GROUP):
    return k * n * bits / 8 + 2 * 2 * n * (k // group)


def make_layer(key, m, kind):
    """One layer's weights: dict(gate, up, down (stacked or per-expert lists), shared (tuple|None),
    shared_gate). kind: 'bf16', 'q3' or 'mixed234'."""
    e, h, i, s = m["e"], m["h"], m["i"], m["shared"]
    keys = iter(jax.random.split(key, 16 + 3 * e))
    if kind == "bf16":
        gate, up, down = (random_bf16(next(keys), (e, h, i)), random_bf16(next(keys), (e, h, i)),
                          random_bf16(next(keys), (e, i, h)))
    elif kind == "q3":
        gate, up, down = (random_qt(next(keys), (e,), h, i, 3), random_qt(next(keys), (e,), h, i, 3),
                          random_qt(next(keys), (e,), i, h, 3))
    elif kind == "mixed234":
        gu, dn = mixed_bits(e, "gate_up"), mixed_bits(e, "down")
        gate = [random_qt(next(keys), (), h, i, b) for b in gu]
        up = [random_qt(next(keys), (), h, i, b) for b in gu]
        down = [random_qt(next(keys), (), i, h, b) for b in dn]
    else:
        raise ValueError(kind)
    shared = None
    if s:
        if kind == "bf16":
            shared = (random_bf16(next(keys), (h, s)), random_bf16(next(keys), (h, s)), random_bf16(next(keys), (s, h)))
        else:   # the shared expert at 3 bits for every quantized variant, repacked once for quant_matmul
            shared = tuple(prepare_dense(random_qt(next(keys), (), a, b, 3)) for a, b in ((h, s), (h, s), (s, h)))
    sg = random_bf16(next(keys), (h, 1)) if m["shared_gate"] else None
    return dict(gate=gate, up=up, down=down, shared=shared, shared_gate=sg)


def prepare_dense(qt):
    """quant_matmul's kernel layout (what models.linear runs best); the plain tensor where it cannot."""
    try:
        return quant_matmul_prepare(qt)
    except ValueError:
        return qt


def expert_bytes(m, kind, expert):
    """Bytes of one routed expert's three matrices."""
    h, i = m["h"], m["i"]
    if kind == "bf16":
        return 3 * h * i * 2
    if kind == "q3":
        return 2 * qt_bytes(h, i, 3) + qt_bytes(i, h, 3)
    gu, dn = mixed_bits(m["e"], "gate_up")[expert], mixed_bits(m["e"], "down")[expert]
    return 2 * qt_bytes(h, i, gu) + qt_bytes(i, h, dn)


def shared_bytes(m, kind):
    h, s = m["h"], m["shared"]
    if not s:
        return 0
    return 3 * h * s * 2 if kind == "bf16" else 2 * qt_bytes(h, s, 3) + qt_bytes(s, h, 3)


def routing(t, m, seed):
    """Router excluded: distinct top-k ids per token from random logits, softmax weights over them."""
    logits = jax.random.normal(jax.random.key(seed), (t, m["e"]), jnp.float32)
    top, ids = jax.lax.top_k(logits, m["k"])
    return jax.nn.softmax(top, axis=-1), ids.astype(jnp.int32)


# ------------------------------------------------------------------------------------ the FFN
def ffn(x, weights, ids, layer, matmul, num_experts):
    """Routed experts through `matmul(x_sorted, w, group_sizes)` + shared expert; x [T, H] bf16."""
    t, k = ids.shape
    order, inverse, gs = sort_by_expert(ids, num_experts)
    xs = jnp.take(x, order // k, axis=0)
    hmid = jax.nn.silu(matmul(xs, layer["gate"], gs)) * matmul(xs, layer["up"], gs)
    ys = matmul(hmid, layer["down"], gs)
    y = jnp.take(ys, inverse, axis=0).reshape(t, k, -1)
    out = jnp.sum(y * weights[..., None].astype(y.dtype), axis=1)
    return out + shared_ffn(x, layer)


def shared_ffn(x, layer):
    if layer["shared"] is None:
        return jnp.zeros_like(x)
    g, u, d = layer["shared"]
    s = linear(jax.nn.silu(linear(x, g)) * linear(x, u), d)
    if layer["shared_gate"] is not None:
        s = jax.nn.sigmoid(linear(x, layer["shared_gate"])) * s
    return s


def model_ffn(x, weights, ids, layer, num_experts):
    """Through StackedExperts exactly as the model runs it (picks the gather or the grouped path)."""
    h = x.shape[-1]
    i = layer["down"].shape[-2]
    mod = _experts_module(num_experts, h, i)
    mod.gate_proj.set_value(layer["gate"])
    mod.up_proj.set_value(layer["up"])
    mod.down_proj.set_value(layer["down"])
    return mod(x, weights, ids) + shared_ffn(x, layer)


def _experts_module(e, h, i):
    """A StackedExperts whose Params are replaced before use (1 x 1 init: no GBs of zeros)."""
    return StackedExperts(e, 1, 1, dtype=jnp.bfloat16, rngs=None)


def impl_fn(impl, num_experts, interpret):
    """(layer kind, f(x, weights, ids, layer) -> [T, H])."""
    if impl == "ragged_dot_bf16":
        mm = lambda xs, w, gs: jax.lax.ragged_dot(xs, w, gs, preferred_element_type=jnp.float32).astype(xs.dtype)
        return "bf16", lambda x, w, i, L: ffn(x, w, i, L, mm, num_experts)
    if impl in ("grouped_bf16", "q3_grouped", "mixed234_grouped"):
        mm = lambda xs, w, gs: gapi.grouped_matmul(xs, w, gs)
        return impl.split("_")[0] if impl != "grouped_bf16" else "bf16", lambda x, w, i, L: ffn(x, w, i, L, mm, num_experts)
    if impl in ("bf16_kernel", "q3_kernel", "mixed234_kernel"):
        mm = lambda xs, w, gs: gapi.grouped_matmul(xs, w, gs, impl="kernel", interpret=interpret)
        return impl.split("_")[0], lambda x, w, i, L: ffn(x, w, i, L, mm, num_experts)
    if impl in ("model_bf16", "q3_model"):
        return impl.split("_")[0] if impl == "q3_model" else "bf16", lambda x, w, i, L: model_ffn(x, w, i, L, num_experts)
    raise ValueError(impl)


def prepare_for_kernel(layer):
    """Repack routed-expert weights once into the kernel layout (as a loader would)."""
    from pallas_kernels.grouped_matmul import mgpu_sm90
    return dict(layer, gate=mgpu_sm90.prepare_grouped(layer["gate"]), up=mgpu_sm90.prepare_grouped(layer["up"]),
                down=mgpu_sm90.prepare_grouped(layer["down"]))


# ----------------------------------------------------------------------------------- the cases
def bench_model(name, m, tokens, impls, ceil, interpret):
    e, k, h, i = m["e"], m["k"], m["h"], m["i"]
    layers = {}
    for t in tokens:
        weights, ids = routing(t, m, seed=t)
        active = sorted(set(np.asarray(ids).reshape(-1).tolist()))
        x = (jax.random.normal(jax.random.key(t + 1), (t, h), jnp.float32)).astype(jnp.bfloat16)
        flops = 2 * t * k * 3 * h * i + 2 * t * 3 * h * m["shared"]
        base = {}
        for impl in impls:
            kind, f = impl_fn(impl, e, interpret)
            moved = (sum(expert_bytes(m, kind, a) for a in active) + shared_bytes(m, kind) + 2 * 2 * t * h)
            full = e * expert_bytes(m, kind, 0) + shared_bytes(m, kind)
            reps = max(1, min(math.ceil(ROTATE_BYTES / moved), int(MAX_SET_BYTES // max(full, 1))))
            if ON_CPU:
                reps = 1
            try:
                key = (kind, reps, "kernel" in impl)
                if key not in layers:
                    layers = {kk: v for kk, v in layers.items() if kk[0] == kind and kk[2] == key[2]}   # free others
                    sets = [make_layer(jax.random.key(1000 * r + 7), m, kind) for r in range(reps)]
                    if "kernel" in impl:
                        sets = [prepare_for_kernel(s) for s in sets]
                    layers[key] = jax.block_until_ready(sets)
                sets = layers[key]
                one = jax.jit(f)
                fn = jax.jit(lambda x, w, i, *ls: [one(x, w, i, L) for L in ls])
                ys = jax.block_until_ready(fn(x, weights, ids, *sets))
                finite = bool(jnp.all(jnp.isfinite(ys[0].astype(jnp.float32))))
                # correctness on the device: against the float32 grouped reference on the same weights
                ref = jax.jit(lambda x, w, i, L: ffn(x.astype(jnp.float32), w, i, L, gapi.grouped_matmul, e))(
                    x, weights, ids, sets[0])
                y0 = ys[0].astype(jnp.float32)
                relerr = float(jnp.linalg.norm(y0 - ref) / jnp.linalg.norm(ref))
                us = cupti_us(fn, (x, weights, ids, *sets), reps)
                base[impl] = us
                rd, bf = base.get("ragged_dot_bf16"), base.get("grouped_bf16")
                tbps = moved / (us * 1e-6) / 1e12
                record(op="moe_ffn", model=name, impl=impl, shape=[h, i], m=t, top_k=k, experts=e,
                       active_experts=len(active), bits={"bf16": 16, "q3": 3, "mixed234": "2/3/4"}[kind],
                       group_size=None if kind == "bf16" else GROUP, rank=0, time_us=us, bytes_moved=moved,
                       tbps=tbps, frac_copy=tbps / ceil, tflops=flops / (us * 1e-6) / 1e12,
                       speedup_vs_ragged_dot=(rd / us) if rd else None, speedup_vs_bf16=(bf / us) if bf else None,
                       finite=finite, relerr=relerr, rotated=reps, router_included=False)
            except Exception as ex:
                msg = " | ".join(str(ex).strip().split("\n")[:3])[:500]
                record(op="moe_ffn", model=name, impl=impl, shape=[h, i], m=t, top_k=k, experts=e,
                       error=f"{type(ex).__name__}: {msg}")
                traceback.print_exc(limit=3)
    layers.clear()


def record(**kw):
    RESULTS.append(kw)
    keys = ("model", "impl", "m", "time_us", "tbps", "frac_copy", "speedup_vs_ragged_dot", "relerr", "error")
    log("RESULT", json.dumps({k: kw[k] for k in keys if k in kw}))


def fmt(v, p=2):
    return "" if v is None else f"{v:.{p}f}"


def write_markdown(path, meta):
    lines = [f"# MoE FFN (router excluded) on {meta['device']} ({meta['date']}, jax {meta['jax']})", "",
             f"Command: `{meta['command']}`", "",
             f"Copy ceiling: {meta['ceilings'].get('copy_tbps', float('nan')):.2f} TB/s. Bytes = distinct routed "
             "experts' weights + shared experts + x + y; speedups from the same run.", "",
             "| model | tokens | impl | bits | us | TB/s | frac copy | TFLOP/s | vs ragged_dot | vs grouped bf16 | relerr |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in meta["records"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['m']} | {r['impl']} | | FAILED: {r['error'][:100]} ||||||")
            continue
        lines.append(f"| {r['model']} | {r['m']} | {r['impl']} | {r['bits']} | {fmt(r['time_us'], 1)} | {fmt(r['tbps'])} | "
                     f"{fmt(r['frac_copy'])} | {fmt(r['tflops'], 1)} | {fmt(r.get('speedup_vs_ragged_dot'))} | "
                     f"{fmt(r.get('speedup_vs_bf16'))} | {'' if r.get('relerr') is None else format(r['relerr'], '.1e')} |")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/moe_layer.json")
    ap.add_argument("--small", action="store_true", help="tiny models, few tokens (CPU smoke run)")
    ap.add_argument("--models", default=None, help="comma list of model names")
    ap.add_argument("--tokens", default=None, help="e.g. 1,16,4096")
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--append", action="store_true",
                    help="keep the records already in --out (run one model per command under a time limit)")
    args = ap.parse_args(argv)
    if args.append and os.path.exists(args.out):
        with open(args.out) as fh:
            RESULTS.extend(json.load(fh)["records"])
    models = SMALL_MODELS if args.small else MODELS
    if args.models:
        models = {n: models[n] for n in args.models.split(",")}
    tokens = [int(v) for v in args.tokens.split(",")] if args.tokens else (SMALL_TOKENS if args.small else TOKENS)
    impls = args.impls.split(",")
    dev = jax.devices()[0]
    log("jax", jax.__version__, dev.device_kind)
    ceil = torch_ceilings() if not (args.no_torch or ON_CPU) else {}
    ceil["copy_tbps_jax"] = jax_copy_tbps()
    ceil["copy_tbps"] = max(ceil.get("copy_tbps_torch", 0), ceil["copy_tbps_jax"])
    log("ceilings", ceil)
    argv_s = " ".join(argv if argv is not None else sys.argv[1:])

    def save():
        meta = dict(device=dev.device_kind, date=datetime.date.today().isoformat(), jax=jax.__version__,
                    command="python -m benchmarks.moe_layer " + argv_s, ceilings=ceil, records=RESULTS)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump(meta, fh, indent=1)
        return write_markdown(os.path.splitext(args.out)[0] + ".md", meta)

    t0 = time.time()
    for name, m in models.items():
        bench_model(name, m, tokens, impls, ceil["copy_tbps"], interpret=ON_CPU)
        log(f"  {name} done at {time.time() - t0:.0f}s")
        save()
    lines = save()
    log("\n".join(lines))


if __name__ == "__main__":
    main()
