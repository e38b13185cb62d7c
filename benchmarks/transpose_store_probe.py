"""Probe (H200): can a decode kernel's [BN, MB] float32 wgmma accumulator (N-major: the weight tile is
wgmma's A) be stored token-major, as an [MB, BN] tile, in Mosaic GPU's Warpgroup semantics?

Token-major partials would let routed_ffn read only the real rows of the split-K partials (contiguous
N-wide rows) instead of gathering along the minor row axis, and drop the gate/up transpose.
Variants of the epilogue (each its own kernel; a failure is printed, the rest go on):
  ref_T    o_smem [MB, BN] viewed through transpose_ref(o_smem, (1, 0)), acc stored into the view
  value_T  acc.T stored into o_smem [MB, BN]
  reload   acc stored N-major into SMEM, read back through a transposed view, stored into o2 [MB, BN]
Each: out [MB, BN] against x @ w (float32), on fresh random inputs.

    python3 -m benchmarks.transpose_store_probe

Result (2026-12-04): none lowers. jax 0.10 on CPU (lowering for cuda): ref_T fails layout inference,
value_T has no Warpgroup lowering for transpose, reload needs a non-contiguous memref.collapse_shape;
on the H200 (jax 0.11.2) transpose_ref of a scratch ref already fails while tracing (s21a).
"""

from __future__ import annotations

import traceback

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

BN, MB, K = 64, 8, 64


def tr():
    return (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


def build(variant: str):
    wg = plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup)

    def kernel(w_t, x, out, w_smem, x_smem, o_smem, o2_smem, bar):
        plgpu.copy_gmem_to_smem(w_t, w_smem, bar)
        plgpu.copy_gmem_to_smem(x, x_smem, bar)
        plgpu.barrier_wait(bar)

        def compute(acc_ref):
            plgpu.wgmma(acc_ref, w_smem, plgpu.transpose_ref(x_smem, (1, 0)))
            plgpu.wgmma_wait(0)
            return acc_ref[...]

        acc = pl.run_scoped(compute, plgpu.ACC((BN, MB), jnp.float32))    # [BN, MB]
        if variant == "ref_T":
            plgpu.transpose_ref(o_smem, (1, 0))[...] = acc
            src = o_smem
        elif variant == "value_T":
            o_smem[...] = acc.T
            src = o_smem
        elif variant == "reload":
            o2_smem[...] = acc                                             # [BN, MB]
            o_smem[...] = plgpu.transpose_ref(o2_smem, (1, 0))[...]
            src = o_smem
        else:
            raise ValueError(variant)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(src, out)
        plgpu.wait_smem_to_gmem(0)

    return plgpu.kernel(kernel, out_type=jax.ShapeDtypeStruct((MB, BN), jnp.float32), compiler_params=wg,
                        scratch_types=[plgpu.SMEM((BN, K), jnp.bfloat16, transforms=tr()),
                                       plgpu.SMEM((MB, K), jnp.bfloat16, transforms=tr()),
                                       plgpu.SMEM((MB, BN), jnp.float32),
                                       plgpu.SMEM((BN, MB), jnp.float32),
                                       plgpu.Barrier(num_arrivals=2)])


def main():
    print(jax.__version__, jax.devices()[0].device_kind, flush=True)
    k1, k2 = jax.random.split(jax.random.key(21))
    w_t = jax.random.normal(k1, (BN, K), jnp.float32).astype(jnp.bfloat16)
    x = jax.random.normal(k2, (MB, K), jnp.float32).astype(jnp.bfloat16)
    want = np.asarray(x, np.float32) @ np.asarray(w_t, np.float32).T      # [MB, BN]
    for variant in ("ref_T", "value_T", "reload"):
        try:
            got = np.asarray(jax.jit(build(variant))(w_t, x))
            err = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
            print(f"PROBE {variant}: ok={err < 1e-3} max rel err {err:.2e}", flush=True)
        except Exception as ex:   # noqa: BLE001 -- report every variant
            print(f"PROBE {variant}: FAILED {type(ex).__name__}: {str(ex)[:400]}", flush=True)
            traceback.print_exc(limit=3)


if __name__ == "__main__":
    main()
