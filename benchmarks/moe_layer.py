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
- q3_model          the same weights through StackedExperts as the model runs them after loading:
                    on the GPU prepared once as milo_jax.prepare_for_kernels does (experts -> grouped
                    kernel layout with gate and up fused into one launch, so the grouped kernel at
                    every token count; shared expert -> quant_matmul's layout); on CPU unprepared
- q3_kernel         the same through the grouped Mosaic GPU kernel (impl="kernel")
- mixed234_grouped  per-expert 2/3/4-bit lists (gate/up and down with different assignments)
- mixed234_kernel   the same through the kernel (one launch per bit-width class)
- mixed234_model    the same weights as the loader prepares them (prepare_for_kernels: gate and up
                    fused per class) through the model's StackedExperts, as q3_model
- q3_model_sorted / mixed234_model_sorted: the _model impls with routed_ffn off (api.ROUTED_FFN):
                    sorted rows through grouped_matmul per projection, as before routed_ffn
- tokamax_int4      tokamax.ragged_dot (implementation="mosaic": its sm90 int4 Mosaic kernel) on int4
                    weights quantized by qwix (per output column, K tiles of 128, bf16 scales), shared
                    expert int4 through the same call with one group; needs the carried wheels
                    (tokamax, qwix, ...); recorded as an error where it cannot import or run
Timing: CUPTI kernel time of one jit that runs the FFN over R separate weight sets (a static Python
loop; R sets of the ACTIVE experts' bytes exceed 160 MB so L2 cannot serve them), median over
iterations, divided by R (benchmarks.quant_matmul.cupti_us). On CPU: wall clock, interpret mode.
Robust for blind runs: every (model, tokens, impl) case runs in its own try (a failure prints its
traceback, is recorded with the stage that failed, and the run goes on); the JSON is rewritten after
every case; `--budget-s` stops starting cases in time; `--append --resume` skips cases already in
the JSON without an error, so a command cut off at its limit can simply be run again.
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

from benchmarks.overrides import apply_overrides
from benchmarks.quant_matmul import ON_CPU, cupti_us, jax_copy_tbps, torch_ceilings
from milo_jax.models.kernel_weights import FusedIntoGate
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
         "mixed234_grouped", "mixed234_kernel", "mixed234_model", "tokamax_int4", "q3_model_sorted",
         "mixed234_model_sorted"]
TOKAMAX_TILE_K = 128      # int4 scale tile along K for tokamax (its sm90 kernel's block_k divides it)
# tokamax's sm90 Mosaic kernel on the GPU; its XLA path for the CPU smoke run (there is no interpret mode)
TOKAMAX_IMPL = "xla" if ON_CPU else "mosaic"
ROTATE_BYTES = 160e6
MAX_SET_BYTES = 24e9          # cap on the rotated copies held at once
GROUP = 64
RESULTS = []


T_START = time.time()


def log(*a):
    print(time.strftime("%H:%M:%S"), f"+{time.time() - T_START:.0f}s", *a, flush=True)


def import_tokamax():
    """(tokamax, qwix). tokamax imports xprof (for its own profiler timer only) at import time; xprof
    and its dependencies are ~40 MB of wheels, so where it is missing an empty stand-in module is
    installed (this benchmark times with CUPTI, never through tokamax's xprof timer)."""
    import importlib.util
    import types
    import qwix   # a missing dependency fails here, before any stand-in is installed
    if "xprof" not in sys.modules and importlib.util.find_spec("xprof") is None:
        names = ["xprof", "xprof.cli", "xprof.cli.tools", "xprof.cli.tools.get_kernel_stats_tool"]
        mods = {n: types.ModuleType(n) for n in names}
        for parent, child in zip(names, names[1:]):
            setattr(mods[parent], child.rsplit(".", 1)[1], mods[child])
        for n, mod in mods.items():
            sys.modules.setdefault(n, mod)
    import tokamax
    return tokamax, qwix


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
    elif kind == "int4":   # tokamax peer: bf16 weights quantized by qwix (int4, K tiles, per column)
        _, qwix = import_tokamax()
        q = lambda w: qwix.quantize(w, jnp.int4, tiled_axes={0: 1, 1: TOKAMAX_TILE_K, 2: 1})
        gate, up, down = (q(random_bf16(next(keys), (e, h, i))), q(random_bf16(next(keys), (e, h, i))),
                          q(random_bf16(next(keys), (e, i, h))))
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
        elif kind == "int4":  # one group of the same ragged_dot
            shared = tuple(q(random_bf16(next(keys), (1, a, b))) for a, b in ((h, s), (h, s), (s, h)))
        else:   # the shared expert at 3 bits for every quantized variant, repacked once for quant_matmul
            shared = tuple(prepare_dense(random_qt(next(keys), (), a, b, 3)) for a, b in ((h, s), (h, s), (s, h)))
    sg = random_bf16(next(keys), (h, 1)) if m["shared_gate"] else None
    return dict(gate=gate, up=up, down=down, shared=shared, shared_gate=sg)


def prepare_dense(qt):
    """quant_matmul's kernel layout, as milo_jax.prepare_for_kernels gives the models (planar_pairs
    for 3-bit); the plain tensor where the kernel cannot take it."""
    from milo_jax.models.kernel_weights import kernel_layout_for

    try:
        return quant_matmul_prepare(qt, layout=kernel_layout_for(qt))
    except ValueError:
        return qt


def int4_bytes(k, n):
    return k * n / 2 + 2 * n * (k // TOKAMAX_TILE_K)


def expert_bytes(m, kind, expert):
    """Bytes of one routed expert's three matrices."""
    h, i = m["h"], m["i"]
    if kind == "bf16":
        return 3 * h * i * 2
    if kind == "int4":
        return 2 * int4_bytes(h, i) + int4_bytes(i, h)
    if kind == "q3":
        return 2 * qt_bytes(h, i, 3) + qt_bytes(i, h, 3)
    gu, dn = mixed_bits(m["e"], "gate_up")[expert], mixed_bits(m["e"], "down")[expert]
    return 2 * qt_bytes(h, i, gu) + qt_bytes(i, h, dn)


def shared_bytes(m, kind):
    h, s = m["h"], m["shared"]
    if not s:
        return 0
    if kind == "int4":
        return 2 * int4_bytes(h, s) + int4_bytes(s, h)
    return 3 * h * s * 2 if kind == "bf16" else 2 * qt_bytes(h, s, 3) + qt_bytes(s, h, 3)


BREAKDOWN = False   # --breakdown
HLO_DIR = None      # --hlo-dir


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
    if isinstance(layer["up"], FusedIntoGate):    # gate and up fused at load (prepare_for_kernels)
        gu = matmul(xs, layer["gate"], gs)
        hmid = jax.nn.silu(gu[:, :layer["up"].split]) * gu[:, layer["up"].split:]
    else:
        hmid = jax.nn.silu(matmul(xs, layer["gate"], gs)) * matmul(xs, layer["up"], gs)
    ys = matmul(hmid, layer["down"], gs)
    y = jnp.take(ys, inverse, axis=0).reshape(t, k, -1)
    out = jnp.sum(y * weights[..., None].astype(y.dtype), axis=1)
    return out + shared_ffn(x, layer)


def shared_ffn(x, layer, lin=None):
    if layer["shared"] is None:
        return jnp.zeros_like(x)
    lin = lin or linear
    g, u, d = layer["shared"]
    s = lin(jax.nn.silu(lin(x, g)) * lin(x, u), d)
    if layer["shared_gate"] is not None:
        s = jax.nn.sigmoid(linear(x, layer["shared_gate"])) * s
    return s


def tokamax_ffn(x, weights, ids, layer, num_experts, reference=False):
    """Routed + shared experts through tokamax.ragged_dot (int4 qwix weights). reference=True: the
    same weights dequantized to float32 through jax.lax.ragged_dot (HIGHEST): the relerr baseline."""
    tokamax, qwix = import_tokamax()
    if reference:
        def mm(xs, w, gs):
            wd = qwix.dequantize(w).astype(jnp.float32)
            return jax.lax.ragged_dot(xs.astype(jnp.float32), wd, gs, precision=jax.lax.Precision.HIGHEST,
                                      preferred_element_type=jnp.float32)
    else:
        def mm(xs, w, gs):
            return tokamax.ragged_dot(xs, w, gs, preferred_element_type=jnp.bfloat16, implementation=TOKAMAX_IMPL)
    one_group = lambda a, w: mm(a, w, jnp.full((1,), a.shape[0], jnp.int32))
    routed = ffn(x, weights, ids, dict(layer, shared=None), mm, num_experts)
    return routed + shared_ffn(x, layer, lin=one_group).astype(routed.dtype)


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
    if impl == "tokamax_int4":
        import_tokamax()   # ImportError here: recorded as this case's error
        return "int4", lambda x, w, i, L: tokamax_ffn(x, w, i, L, num_experts)
    if impl in ("q3_model_sorted", "mixed234_model_sorted"):
        def sorted_model_ffn(x, w, i, L):
            old, gapi.ROUTED_FFN = gapi.ROUTED_FFN, False     # read while tracing
            try:
                return model_ffn(x, w, i, L, num_experts)
            finally:
                gapi.ROUTED_FFN = old
        return impl.split("_")[0], sorted_model_ffn
    if impl in ("model_bf16", "q3_model", "mixed234_model"):
        return impl.split("_")[0] if impl != "model_bf16" else "bf16", lambda x, w, i, L: model_ffn(x, w, i, L, num_experts)
    raise ValueError(impl)


def prepare_as_loader(layer):
    """Every quantized weight of the layer as milo_jax.prepare_for_kernels leaves it (what `milo-jax
    generate/eval` do at load time on Hopper)."""
    from milo_jax.models.kernel_weights import fuse_gate_up, prepare_weight
    # routed experts whole (stacked, or per-expert lists as the mixed layers hold them), the rest per leaf
    out = {name: (prepare_weight(v) if name in ("gate", "up", "down") else
                  jax.tree_util.tree_map(prepare_weight, v, is_leaf=lambda a: isinstance(a, QuantizedTensor)))
           for name, v in layer.items()}
    out["gate"], out["up"] = fuse_gate_up(out["gate"], out["up"])    # as prepare_for_kernels does
    return out


def prepare_for_kernel(layer):
    """Repack routed-expert weights once into the kernel layout (as a loader would)."""
    from pallas_kernels.grouped_matmul import mgpu_sm90
    return dict(layer, gate=mgpu_sm90.prepare_grouped(layer["gate"]), up=mgpu_sm90.prepare_grouped(layer["up"]),
                down=mgpu_sm90.prepare_grouped(layer["down"]))


# ----------------------------------------------------------------------------------- the cases
class Budget:
    """Stop starting new cases once `seconds` have passed since the start (a run under a command
    time limit then still writes its JSON); cases already recorded without error are skipped when
    resuming."""

    def __init__(self, seconds, done=(), case_seconds=None):
        self.seconds = seconds
        self.done = set(done)
        self.case_seconds = case_seconds

    def out_of_time(self):
        return self.seconds is not None and time.time() - T_START > self.seconds


def case_key(model, impl, t):
    return (model, impl, int(t))


def start_watchdog(seconds, common, state, on_record):
    """A native kernel that deadlocks never returns: after `seconds` record the case as timed out
    (with the stage it was in), write the JSON and exit the process (status 3), so that rerunning
    with --append --resume skips it and goes on."""
    if not seconds:
        return None
    import threading

    def fire():
        log(f"TIMEOUT {common['model']} T={common['m']} {common['impl']} after {seconds:.0f}s at stage "
            f"{state['stage']}: recording it and exiting")
        record(**common, error=f"Timeout: no result after {seconds:.0f}s (hang?)", stage=state["stage"])
        if on_record is not None:
            on_record()
        os._exit(3)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    return timer


def bench_model(name, m, tokens, impls, ceil, interpret, budget=None, on_record=None, check=True):
    e, k, h, i = m["e"], m["k"], m["h"], m["i"]
    budget = budget or Budget(None)
    layers = {}
    inputs = {}
    for t in tokens:
        weights, ids = routing(t, m, seed=t)
        active = sorted(set(np.asarray(ids).reshape(-1).tolist()))
        x = (jax.random.normal(jax.random.key(t + 1), (t, h), jnp.float32)).astype(jnp.bfloat16)
        inputs[t] = (weights, ids, active, x)
    # impl-major order: one impl's weight sets serve all token counts (regenerated only when the
    # number of rotated copies changes); ragged_dot_bf16 / grouped_bf16 come first, so speedups exist
    for impl in impls:
        for t in tokens:
            weights, ids, active, x = inputs[t]
            flops = 2 * t * k * 3 * h * i + 2 * t * 3 * h * m["shared"]
            base = {r["impl"]: r["time_us"] for r in RESULTS        # speedups against a resumed run too
                    if r.get("model") == name and r.get("m") == t and r.get("time_us")}
            if case_key(name, impl, t) in budget.done:
                log(f"skip {name} T={t} {impl}: already in the JSON")
                continue
            if budget.out_of_time():
                log(f"budget of {budget.seconds:.0f}s spent: not starting {name} T={t} {impl} "
                    "(run the same command again with --append --resume)")
                return False
            log(f"case {name} T={t} {impl} ...")
            state = dict(stage="setup")
            t_case = time.time()
            common = dict(op="moe_ffn", model=name, impl=impl, shape=[h, i], m=t, top_k=k, experts=e)
            timer = start_watchdog(budget.case_seconds, common, state, on_record)
            try:
                kind, f = impl_fn(impl, e, interpret)
                moved = (sum(expert_bytes(m, kind, a) for a in active) + shared_bytes(m, kind) + 2 * 2 * t * h)
                full = e * expert_bytes(m, kind, 0) + shared_bytes(m, kind)
                reps = max(1, min(math.ceil(ROTATE_BYTES / moved), int(MAX_SET_BYTES // max(full, 1))))
                if ON_CPU:
                    reps = 1
                state["stage"] = "weights"
                key = (kind, reps, "kernel" in impl, "_model" in impl)
                if key not in layers:
                    # free other kinds' weight sets before making new ones (keep other copy counts)
                    layers = {kk: v for kk, v in layers.items() if kk[0] == kind and kk[2] == key[2]}
                    sets = [make_layer(jax.random.key(1000 * r + 7), m, kind) for r in range(reps)]
                    if "kernel" in impl:
                        sets = [prepare_for_kernel(s) for s in sets]
                    elif impl.startswith("mixed234_model") or (impl.startswith("q3_model") and not ON_CPU):
                        sets = [prepare_as_loader(s) for s in sets]
                    layers[key] = jax.block_until_ready(sets)
                sets = layers[key]
                state["stage"] = "compile+run"
                one = jax.jit(f)
                # each rotated layer gets its own x and its own copy of the routing (as the layers of a
                # decode step), so XLA cannot compute the x- and routing-side ops once for all of them
                # (since stop 18; before, the layers shared x and ids)
                xs = [x] + [jax.random.normal(jax.random.key(7 * t + r), x.shape, jnp.float32).astype(x.dtype)
                            for r in range(1, reps)]
                ws_ = [weights] + [jnp.array(weights, copy=True) for _ in range(1, reps)]
                ids_ = [ids] + [jnp.array(ids, copy=True) for _ in range(1, reps)]
                fn = jax.jit(lambda xs, ws_, ids_, *ls: [one(*a) for a in zip(xs, ws_, ids_, ls)])
                args = (xs, ws_, ids_, *sets)
                ys = jax.block_until_ready(fn(*args))
                t_compiled = time.time() - t_case
                finite = bool(jnp.all(jnp.isfinite(ys[0].astype(jnp.float32))))
                relerr = None
                if check:   # on the device: against float32 math on the same weights
                    state["stage"] = "reference"
                    if kind == "int4":
                        ref_f = lambda x, w, i, L: tokamax_ffn(x.astype(jnp.float32), w, i, L, e, reference=True)
                    else:
                        ref_f = lambda x, w, i, L: ffn(x.astype(jnp.float32), w, i, L, gapi.grouped_matmul, e)
                    ref = jax.jit(ref_f)(x, weights, ids, sets[0])
                    y0 = ys[0].astype(jnp.float32)
                    relerr = float(jnp.linalg.norm(y0 - ref) / jnp.linalg.norm(ref))
                    del ref
                del ys
                if HLO_DIR:   # one layer's optimized HLO: which XLA fusions surround the kernels
                    os.makedirs(HLO_DIR, exist_ok=True)
                    text = one.lower(xs[0], ws_[0], ids_[0], sets[0]).compile().as_text()
                    with open(os.path.join(HLO_DIR, f"{name}_{impl}_T{t}.hlo.txt"), "w") as fh:
                        fh.write(text)
                state["stage"] = "timing"
                us = cupti_us(fn, args, reps)
                extra = {}
                if BREAKDOWN and not ON_CPU:   # per-kernel CUPTI time: the kernels vs the XLA ops around them
                    from benchmarks.quant_matmul_variants import kernel_breakdown
                    extra["kernels_us"] = kernel_breakdown(fn, args, reps)
                    log(f"KERNELS {name} T={t} {impl}: {extra['kernels_us']}")
                rd, bf = base.get("ragged_dot_bf16"), base.get("grouped_bf16")
                tbps = moved / (us * 1e-6) / 1e12
                record(**common, active_experts=len(active),
                       bits={"bf16": 16, "q3": 3, "mixed234": "2/3/4", "int4": 4}[kind],
                       group_size=(None if kind == "bf16" else TOKAMAX_TILE_K if kind == "int4" else GROUP),
                       rank=0, time_us=us, bytes_moved=moved,
                       tbps=tbps, frac_copy=tbps / ceil, tflops=flops / (us * 1e-6) / 1e12,
                       speedup_vs_ragged_dot=(rd / us) if rd else None, speedup_vs_bf16=(bf / us) if bf else None,
                       finite=finite, relerr=relerr, rotated=reps, router_included=False,
                       compile_s=round(t_compiled, 1), case_s=round(time.time() - t_case, 1), **extra)
            except Exception as ex:   # noqa: BLE001 -- a blind run must go on past any one case
                tb = traceback.format_exc()
                log(f"FAILED {name} T={t} {impl} at stage {state['stage']}:\n{tb}")
                msg = " | ".join(str(ex).strip().split("\n")[:3])[:500]
                record(**common, error=f"{type(ex).__name__}: {msg}", stage=state["stage"],
                       traceback=tb[-3000:], case_s=round(time.time() - t_case, 1))
                if "RESOURCE_EXHAUSTED" in tb or "out of memory" in tb.lower():
                    layers.clear()
            finally:
                if timer is not None:
                    timer.cancel()
            if on_record is not None:
                on_record()
    layers.clear()
    return True


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
            err = r['error'][:100].replace("|", "/").replace("\n", " ")
            lines.append(f"| {r['model']} | {r['m']} | {r['impl']} | | FAILED ({r.get('stage', '?')}): {err} ||||||")
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
    ap.add_argument("--impls", default=",".join(IMPLS), help="comma list of: " + ",".join(IMPLS))
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--breakdown", action="store_true", help="also record per-kernel CUPTI times (kernels_us)")
    ap.add_argument("--no-check", action="store_true", help="skip the float32 relerr check (saves a compile per case)")
    ap.add_argument("--append", action="store_true",
                    help="keep the records already in --out (run one model per command under a time limit)")
    ap.add_argument("--resume", action="store_true",
                    help="with --append: skip (model, impl, tokens) cases already recorded")
    ap.add_argument("--retry-failed", action="store_true",
                    help="with --resume: run cases recorded with an error again (their old records are dropped)")
    ap.add_argument("--budget-s", type=float, default=480.0,
                    help="start no new case after this many seconds (JSON is complete up to there)")
    ap.add_argument("--case-timeout-s", type=float, default=None,
                    help="record a case that runs longer as timed out and exit (status 3); 0: never "
                         "(default 150 on the GPU, never on CPU)")
    ap.add_argument("--grouped-cta-target", type=int, default=None,
                    help="override grouped_matmul.mgpu_sm90.CTA_TARGET (split-K of the quantized decode launches)")
    ap.add_argument("--grouped-upfront-rows", type=int, default=None,
                    help="override grouped_matmul.mgpu_sm90.UPFRONT_ROWS (scale pairs up front at most this many rows)")
    ap.add_argument("--grouped-fold-mb", type=int, default=None,
                    help="override grouped_matmul.mgpu_sm90.FOLD_MAX_BLOCK_M (magic_fold up to this MB; 0 = off)")
    ap.add_argument("--fold-span", type=int, default=None,
                    help="override quant_matmul.mgpu_sm90.FOLD_SPAN (fold blocks per accumulator scope)")
    ap.add_argument("--sorted-ffn", action="store_true",
                    help="model path through grouped_matmul per projection (sorted rows), not routed_ffn's padded rows")
    ap.add_argument("--hlo-dir", default=None, help="write each case's optimized HLO (one layer) into this folder")
    ap.add_argument("--set", action="append", default=[], metavar="MODULE.ATTR=VALUE",
                    help="override a module constant before timing (an int; 0/1 for a switch), e.g. "
                         "pallas_kernels.grouped_matmul.routed_ffn.UNROLL_PAIRS=0; repeatable")
    args = ap.parse_args(argv)
    apply_overrides(args.set, log)
    global HLO_DIR
    HLO_DIR = args.hlo_dir
    from pallas_kernels.grouped_matmul import mgpu_sm90 as grouped_mgpu
    if args.grouped_cta_target:
        grouped_mgpu.CTA_TARGET = args.grouped_cta_target
    if args.grouped_upfront_rows is not None:
        grouped_mgpu.UPFRONT_ROWS = args.grouped_upfront_rows
    if args.grouped_fold_mb is not None:
        grouped_mgpu.FOLD_MAX_BLOCK_M = args.grouped_fold_mb
    if args.fold_span is not None:
        from pallas_kernels.quant_matmul import mgpu_sm90 as qm_mgpu
        qm_mgpu.FOLD_SPAN = args.fold_span
    if args.sorted_ffn:
        gapi.ROUTED_FFN = False
    global BREAKDOWN
    BREAKDOWN = args.breakdown
    if args.append and os.path.exists(args.out):
        with open(args.out) as fh:
            RESULTS.extend(json.load(fh)["records"])
    models = SMALL_MODELS if args.small else MODELS
    if args.models:
        unknown = [n for n in args.models.split(",") if n not in models]
        if unknown:
            raise SystemExit(f"moe_layer: unknown model(s) {unknown}; known: {sorted(models)}")
        models = {n: models[n] for n in args.models.split(",")}
    tokens = [int(v) for v in args.tokens.split(",")] if args.tokens else (SMALL_TOKENS if args.small else TOKENS)
    impls = args.impls.split(",")
    unknown = [v for v in impls if v not in IMPLS]
    if unknown:
        raise SystemExit(f"moe_layer: unknown impl(s) {unknown}; known: {IMPLS}")
    if args.resume and args.retry_failed:
        RESULTS[:] = [r for r in RESULTS if "error" not in r]
    done = [case_key(r["model"], r["impl"], r["m"]) for r in RESULTS if "model" in r] if args.resume else []
    case_s = args.case_timeout_s if args.case_timeout_s is not None else (0 if ON_CPU else 150.0)
    budget = Budget(args.budget_s, done, case_seconds=case_s)
    dev = jax.devices()[0]
    log("jax", jax.__version__, dev.device_kind, "| models", list(models), "| tokens", tokens, "| impls", impls)
    ceil = {}
    try:
        ceil = torch_ceilings() if not (args.no_torch or ON_CPU) else {}
        ceil["copy_tbps_jax"] = jax_copy_tbps()
    except Exception:   # noqa: BLE001 -- a ceiling is context, not a reason to stop
        log("copy ceiling failed:\n" + traceback.format_exc())
    ceil["copy_tbps"] = max(ceil.get("copy_tbps_torch", 0), ceil.get("copy_tbps_jax", 0)) or float("nan")
    log("ceilings", ceil)
    argv_s = " ".join(argv if argv is not None else sys.argv[1:])

    def save():
        meta = dict(device=dev.device_kind, date=datetime.date.today().isoformat(), jax=jax.__version__,
                    command="python -m benchmarks.moe_layer " + argv_s, ceilings=ceil, records=RESULTS)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        tmp = args.out + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(meta, fh, indent=1)
        os.replace(tmp, args.out)    # never a half-written JSON if the command is killed
        return write_markdown(os.path.splitext(args.out)[0] + ".md", meta)

    finished = True
    for name, m in models.items():
        finished = bench_model(name, m, tokens, impls, ceil["copy_tbps"], interpret=ON_CPU, budget=budget,
                               on_record=save, check=not args.no_check) and finished
        log(f"{name} {'done' if finished else 'stopped by --budget-s'}")
        save()
        if not finished:
            break
    lines = save()
    log("\n".join(lines))
    failed = [r for r in RESULTS if "error" in r]
    log(f"{len(RESULTS)} records, {len(failed)} failed" + ("" if finished else "; INCOMPLETE (budget): rerun "
        "the same command with --append --resume"))


if __name__ == "__main__":
    main()
