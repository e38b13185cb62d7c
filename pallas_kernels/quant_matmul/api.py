"""`matmul(x, qt)`: y = x @ W_hat (+ (x @ u) @ v) for a quantized weight, picking the backend.

- On an sm90 (Hopper) GPU: the Mosaic GPU decode kernel (mgpu_sm90.py) for M <= prefill_threshold
  (128 tokens, 256 for small weights); above it the Mosaic dequantize kernel writes W_hat^T in bf16 once and a bf16 dot runs
  (the product is compute-bound there: re-dequantizing every tile per token block loses).
- Elsewhere (CPU, other GPUs): the plain-jnp reference (reference.py).
- interpret=True runs the Mosaic GPU kernel in GPU interpret mode on CPU (tests, tiny shapes).

`qt` is a planar QuantizedTensor [K, N] or, better, a `KernelWeights` from `prepare(qt)` (repack
once at load time: an unprepared tensor is repacked inside every call).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from milo_jax.quant.tensor import QuantizedTensor
from pallas_kernels.quant_matmul import layout, mgpu_sm90, reference

# Measured on H100, 4096 x 14336 3-bit g64 (2026-11-23): the decode kernel 55.8 us at M=64 and
# 167 us at M=256 (benchmarks/results/quant_matmul.md); the Mosaic dequantize kernel 56.7 us
# (2.53 TB/s on codes read + bf16 written) and at M=4096 dequantize + dot 762 us (631 TFLOP/s,
# 96% of the bf16 dot's 728 us; XLA's dequantize + dot: 1196 us; benchmarks/results/prefill_probe.json).
# Decode kernel at M=128 / 256: 95.7 / 162 us; dequantize (56.7) + bf16 dot (47 / 53 us) = ~104 / ~110 us
# (sum of the two measured parts, 2026-11-23, benchmarks/results/quant_matmul_s11c.md): the kernel up
# to M=128, the prefill path above. Small matrices (DeepSeek-V2-Lite's 2048 x 1408 experts) keep the
# kernel to M=256: 13.0 us there against 16.8 us for dequantize + dot (fixed costs of two launches);
# 4096 x 4096 at M=256: kernel 57.5 us, dequantize + dot 47.8 us (benchmarks/results/quant_matmul_s11g.md).
PREFILL_THRESHOLD = 128
SMALL_WEIGHT = 4 * 1024 * 1024      # K * N at or below which the kernel runs up to 2 * PREFILL_THRESHOLD


def prefill_threshold(k: int, n: int) -> int:
    """Largest M that api.matmul sends to the decode kernel on sm90 for a K x N weight."""
    return 2 * PREFILL_THRESHOLD if k * n <= SMALL_WEIGHT else PREFILL_THRESHOLD


def _on_sm90() -> bool:
    try:
        dev = jax.devices()[0]
    except RuntimeError:
        return False
    if dev.platform != "gpu":
        return False
    cc = getattr(dev, "compute_capability", None)
    return cc is not None and str(cc).startswith("9")


def dequantize_kernel_weights(kw: layout.KernelWeights) -> jax.Array:
    """W_hat [K, N] bf16 (no compensator) from the kernel layout."""
    codes = layout.unpack_codes(kw).astype(jnp.float32)           # either kernel layout
    rows = kw.group_rows
    s = kw.scales.astype(jnp.float32)
    z = kw.zeros.astype(jnp.float32)
    g = codes.reshape(kw.k_pad // rows, rows, kw.n)
    w = (s[:, None, :] * (g - z[:, None, :])).reshape(kw.k_pad, kw.n)[:kw.k]
    return w.astype(jnp.bfloat16)


def _dequant_dot(x, kw: layout.KernelWeights):
    xb = x.astype(jnp.bfloat16)
    y = jnp.dot(xb, dequantize_kernel_weights(kw), preferred_element_type=jnp.float32)
    if kw.u is not None:
        xu = jnp.dot(xb, kw.u.astype(jnp.bfloat16), preferred_element_type=jnp.float32)
        y = y + jnp.dot(xu.astype(jnp.bfloat16), kw.v_t[:, :kw.rank].T, preferred_element_type=jnp.float32)
    return y.astype(jnp.bfloat16)


def _kernel_layout(qt, impl: str, config) -> str:
    """2/3/4-bit weights go to the decode kernel in the "planar_pairs" layout, whose magic-number
    unpack (Config.unpack="magic_bf16" with A in registers; "magic_fold" up to 16 tokens, both picked
    by default_config for that layout) measured 17.45 us against 31.4 us for the planar f32 unpack
    (3-bit, 4096 x 14336, M=1, H100, 2026-11-23, benchmarks/results/quant_matmul_variants.md; magic_fold:
    quant_matmul NOTES stop 17); the Mosaic dequantize kernel
    (prefill) reads it with the same magic unpack. 8-bit keeps "planar_nmajor" (layout.decode_layout).
    KernelWeights already prepared keep their own layout; an explicit config gets the layout its
    unpack reads."""
    if isinstance(qt, layout.KernelWeights):
        return qt.layout
    if impl == "kernel" and config is not None:
        return layout.PAIRS_LAYOUT if config.unpack.startswith("magic") else layout.LAYOUT
    if impl in ("kernel", "mgpu_dequant_dot"):
        return layout.decode_layout(qt.bits)
    return layout.LAYOUT


def matmul(x: jax.Array, qt, *, interpret: bool | None = None, impl: str | None = None,
           config: mgpu_sm90.Config | None = None) -> jax.Array:
    """x [..., M, K] @ W_hat [K, N] (+ compensator) -> bf16 [..., M, N], float32 accumulation.

    impl: None (auto), "kernel" (Mosaic GPU, native or interpreted), "dequant_dot" (XLA dequantize
    + bf16 dot), "mgpu_dequant_dot" (Mosaic GPU dequantize kernel + bf16 dot: auto's choice above
    PREFILL_THRESHOLD rows on sm90), "reference".
    Raises ValueError for weights the kernel cannot take (N not a multiple of 64, rank > 128,
    non-planar layout) when impl="kernel" is forced; auto mode falls back to the reference.
    """
    if not isinstance(qt, (QuantizedTensor, layout.KernelWeights)):
        raise ValueError(f"quant_matmul.matmul: expected a QuantizedTensor or KernelWeights, got {type(qt)}")
    k = qt.k
    if x.shape[-1] != k:
        raise ValueError(f"quant_matmul.matmul: x {tuple(x.shape)} does not match weight K={k}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if impl is None:
        if interpret:
            impl = "kernel"
        elif _on_sm90():
            impl = "kernel" if m <= prefill_threshold(k, qt.n) else "mgpu_dequant_dot"
        else:
            impl = "reference"
    if impl == "reference":
        if isinstance(qt, layout.KernelWeights):
            y = _dequant_dot(x2, qt)
        else:
            y = reference.matmul_reference(x2, qt)
    elif impl in ("kernel", "dequant_dot", "mgpu_dequant_dot"):
        try:
            kw = layout.prepare(qt, layout=_kernel_layout(qt, impl, config))
        except ValueError:
            if impl == "kernel" or isinstance(qt, layout.KernelWeights):
                raise
            return reference.matmul_reference(x2, qt).reshape(*lead, qt.n)
        if impl == "kernel":
            y = mgpu_sm90.matmul_mgpu(x2, kw, config=config, interpret=bool(interpret))
        elif impl == "mgpu_dequant_dot":
            y = mgpu_sm90.dequant_dot_mgpu(x2, kw, interpret=bool(interpret))
        else:
            y = _dequant_dot(x2, kw)
    else:
        raise ValueError(f"quant_matmul.matmul: unknown impl {impl!r}")
    return y.reshape(*lead, y.shape[-1])
