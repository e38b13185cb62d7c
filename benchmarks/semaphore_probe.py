"""Probe (native sm90 only): cross-CTA GMEM semaphores in one Mosaic GPU launch, self-resetting across calls.

Why: work shared between CTAs of one launch (producer CTAs whose results others wait for, a stream-K
fix-up) needs them. It was written for x @ u inside the stream-K decode launch, which passed natively but
was slower than the pre-pass and was removed (quant_matmul NOTES, stop 26); the probe stays as the checked
protocol. `pl.get_global` semaphores persist across launches, so the protocol must return them to zero
itself. Interpret mode (jax 0.10) has no semaphores,
so this can only run on the GPU:

    python -m benchmarks.semaphore_probe            # correctness over several calls, then times

Protocol (grid of `ctas` CTAs, the first `producers` of them produce):
  producer p:  writes its tile (x[p] * 2) to parts[p], waits for the store, signals `done` (+1)
  every CTA:   waits until done >= producers (no decrement), reads all parts, writes their sum to out[j],
               signals `read` (+1)
  CTA 0, last: waits until read >= ctas and takes it back to 0 (decrement), then takes `producers` off done
A second call that found either semaphore non-zero would pass its wait early and read stale parts: the
check compares every call against fresh inputs.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

TILE = (64, 64)


def build(ctas: int, producers: int, sync: bool = True):
    def kernel(x_ref, parts_ref, out_ref, smem, acc_smem, bar):
        j = lax.axis_index("cta")
        done = pl.get_global(plgpu.SemaphoreType.REGULAR)
        read = pl.get_global(plgpu.SemaphoreType.REGULAR)

        @pl.when(j < producers)
        def _produce():
            plgpu.copy_gmem_to_smem(x_ref.at[j], smem, bar)
            plgpu.barrier_wait(bar)
            smem[...] = smem[...] * 2.0
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(smem, parts_ref.at[j])
            plgpu.wait_smem_to_gmem(0)                     # the store is complete, not only read
            if sync:
                pl.semaphore_signal(done, 1)

        if sync:
            pl.semaphore_wait(done, producers, decrement=False)
        acc_smem[...] = jnp.zeros(TILE, jnp.float32)
        for p in range(producers):
            plgpu.copy_gmem_to_smem(parts_ref.at[p], smem, bar)
            plgpu.barrier_wait(bar)
            acc_smem[...] = acc_smem[...] + smem[...]
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(acc_smem, out_ref.at[j])
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        if sync:
            pl.semaphore_signal(read, 1)

            @pl.when(j == 0)
            def _reset():
                pl.semaphore_wait(read, ctas, decrement=True)
                pl.semaphore_wait(done, producers, decrement=True)

    return plgpu.kernel(
        kernel,
        out_type=(jax.ShapeDtypeStruct((producers, *TILE), jnp.float32),
                  jax.ShapeDtypeStruct((ctas, *TILE), jnp.float32)),
        grid=(ctas,), grid_names=("cta",),
        scratch_types=[plgpu.SMEM(TILE, jnp.float32), plgpu.SMEM(TILE, jnp.float32), plgpu.Barrier(num_arrivals=1)],
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup))


def check(ctas: int, producers: int, calls: int = 5) -> float:
    """Largest error over `calls` launches with fresh inputs (each against its own expected sum)."""
    f = jax.jit(build(ctas, producers))
    worst = 0.0
    for i in range(calls):
        x = jax.random.normal(jax.random.key(i), (producers, *TILE), jnp.float32)
        _, out = f(x)
        want = 2.0 * np.asarray(x).sum(0)
        worst = max(worst, float(np.abs(np.asarray(out) - want[None]).max()))
    return worst


def time_us(ctas: int, producers: int, sync: bool, iters: int = 200) -> float:
    f = jax.jit(build(ctas, producers, sync))
    x = jax.random.normal(jax.random.key(0), (producers, *TILE), jnp.float32)
    jax.block_until_ready(f(x))
    t0 = time.perf_counter()
    for _ in range(iters):
        out = f(x)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / iters * 1e6


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="8:2,132:8,264:8,264:28")
    args = ap.parse_args(argv)
    for case in args.cases.split(","):
        ctas, producers = (int(v) for v in case.split(":"))
        err = check(ctas, producers)
        print(f"SEM ctas={ctas} producers={producers} max_err={err:.2e} "
              f"sync {time_us(ctas, producers, True):.1f} us / no sync {time_us(ctas, producers, False):.1f} us "
              f"(host loop, per call)", flush=True)


if __name__ == "__main__":
    main()
