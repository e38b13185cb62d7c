"""How long the grouped decode kernel takes to compile for 8 vs 64 experts (DeepSeek / Qwen layers
compiled in 105-127 s per token count in benchmarks/moe_layer.py on the H100). Prints the seconds of
trace + lower and of XLA compile (Mosaic -> PTX -> SASS included) for one 3-bit g64 2048 x 1408
class at 6 rows, and the same for quant_matmul's dense kernel.

    python3 -m benchmarks.compile_probe
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

import milo_jax  # noqa: F401
from benchmarks.quant_matmul_variants import random_weights
from pallas_kernels.grouped_matmul import mgpu_sm90 as grouped
from pallas_kernels.quant_matmul import layout, mgpu_sm90


def timed(name, f, *args):
    t0 = time.time()
    lowered = f.trace(*args).lower()
    t1 = time.time()
    lowered.compile()
    print(f"{name}: lower {t1 - t0:.1f} s, compile {time.time() - t1:.1f} s", flush=True)


def main():
    k, n = 2048, 1408
    w = random_weights(jax.random.key(0), k, n, 64, True)
    x = jnp.ones((6, k), jnp.bfloat16)
    timed("dense kernel", jax.jit(lambda x, w: mgpu_sm90.matmul_mgpu(x, w)), x, w)
    for e in (8, 64):
        c = grouped.ExpertClass(codes=jnp.tile(w.codes, (e, 1)), scales=jnp.tile(w.scales, (e, 1)),
                                zeros=jnp.tile(w.zeros, (e, 1)), experts=tuple(range(e)), bits=3, group_size=64,
                                k=k, n=n, k_pad=w.k_pad, slab=w.slab, group_rows=64, layout=layout.PAIRS_LAYOUT)
        gkw = grouped.GroupedKernelWeights(classes=(c,), num_experts=e, k=k, n=n)
        gs = jnp.zeros((e,), jnp.int32).at[:6].set(1)
        timed(f"grouped kernel, {e} experts", jax.jit(lambda x, w, gs: grouped.grouped_matmul_mgpu(x, w, gs)),
              x, gkw, gs)


if __name__ == "__main__":
    main()
