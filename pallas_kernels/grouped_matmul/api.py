"""`grouped_matmul(x, w, group_sizes)`: the MoE grouped matmul, picking the backend.

x [M, K] holds token rows sorted by expert; expert e owns rows offsets[e] .. offsets[e] +
group_sizes[e] (offsets = exclusive cumsum); rows past sum(group_sizes) come back as 0.
w: stacked experts [E, K, N] (bf16 / float32 array, or a QuantizedTensor with lead shape (E,)), or a
list / tuple of E per-expert weights [K, N] (arrays or QuantizedTensors of any bits / group / rank:
mixed precision per expert). Compensators (u, v) are applied as in quant_matmul:
y = x @ W_hat + (x @ u) @ v.

Backends (impl):
- "reference": dequantize every expert (bf16, or float32 for float32 x) + jax.lax.ragged_dot.
  The bf16 float-weight case IS jax.lax.ragged_dot.
- "masked": every expert on every row, keep each row's own expert (no ragged_dot; cross-check).
- "kernel": the Mosaic GPU kernel (mgpu_sm90.py) over a flat list of (expert, row-block) tiles,
  skipping experts without rows: one launch for a 2/3/4-bit planar_pairs layer without compensators
  (multi_class_sm90.py), else one launch per bit-width class (bf16 experts are a class of their
  own: the kernel's bf16 path is milo-jax's replacement for ragged_dot, which reads every expert);
  interpret=True runs it in GPU interpret mode on CPU. Pass `mgpu_sm90.prepare_grouped(w)` (repack
  once at load time); raw weights are repacked inside every call.
- None (auto): "kernel" on an sm90 GPU when any expert is quantized (QuantizedTensor, a list holding
  one, or prepared GroupedKernelWeights), "reference" otherwise. Measured (H100, 2026-11-23,
  benchmarks/results/moe_layer_table.md, Mixtral FFN 3-bit g64): the kernel beats the quantized
  reference (dequantize every expert + ragged_dot) at every token count, 110 us vs 7658 us at 1
  token and 6.4 ms (its prefill path) vs 34.7 ms at 4096. Plain bf16 experts stay on ragged_dot: the kernel's bf16 path won at
  1, 512 and 4096 tokens but lost at 16 and 64 (0.87-0.89x) on Mixtral. Weights the kernel cannot
  take (N not a multiple of 64, tiles it cannot form) fall back to the reference in auto mode.
"""

from __future__ import annotations

import jax

from pallas_kernels.grouped_matmul import reference

# Auto mode sends quantized experts to the kernel on sm90 (measured ahead: see the docstring).
AUTO_KERNEL = True


def _on_sm90() -> bool:
    try:
        dev = jax.devices()[0]
    except RuntimeError:
        return False
    cc = getattr(dev, "compute_capability", None)
    return dev.platform == "gpu" and cc is not None and str(cc).startswith("9")


def holds_quantized(w) -> bool:
    """Whether any expert of w is quantized: a QuantizedTensor, a list / tuple holding one, or
    GroupedKernelWeights with a quantized (non-bf16) class."""
    from milo_jax.quant.tensor import QuantizedTensor
    from pallas_kernels.grouped_matmul.mgpu_sm90 import ExpertClass, GroupedKernelWeights
    if isinstance(w, QuantizedTensor):
        return True
    if isinstance(w, (list, tuple)):
        return any(isinstance(p, QuantizedTensor) for p in w)
    return isinstance(w, GroupedKernelWeights) and any(isinstance(c, ExpertClass) for c in w.classes)


def grouped_matmul(x: jax.Array, w, group_sizes: jax.Array, *, interpret: bool | None = None,
                   impl: str | None = None, config=None) -> jax.Array:
    """x [M, K] (rows sorted by expert) -> [M, N] in x.dtype; see the module docstring."""
    reference.check_args(x, w, group_sizes)
    if impl is None:
        if interpret:
            impl = "kernel"
        elif AUTO_KERNEL and holds_quantized(w) and _on_sm90():
            from pallas_kernels.grouped_matmul import mgpu_sm90
            try:   # shape checks run while tracing: weights the kernel cannot tile take the reference
                return mgpu_sm90.grouped_matmul_mgpu(x, w, group_sizes, config=config)
            except ValueError:
                impl = "reference"
        else:
            impl = "reference"
    if impl == "reference":
        return reference.grouped_matmul_reference(x, w, group_sizes)
    if impl == "masked":
        return reference.grouped_matmul_masked(x, w, group_sizes)
    if impl == "kernel":
        from pallas_kernels.grouped_matmul import mgpu_sm90
        return mgpu_sm90.grouped_matmul_mgpu(x, w, group_sizes, config=config, interpret=bool(interpret))
    raise ValueError(f"grouped_matmul: unknown impl {impl!r} (reference, masked, kernel)")


# The models run their fused gate/up + down experts through routed_ffn.routed_ffn on sm90 (see that
# module for why); False sends them through grouped_matmul per projection (benchmarks/moe_layer.py
# --sorted-ffn measures both).
ROUTED_FFN = True


def routed_ffn_applies(num_pairs: int, gate_up, down, *, interpret: bool = False) -> bool:
    """Whether `routed_ffn` runs these projections for num_pairs = T * k (token, slot) pairs: on sm90
    (or interpret=True), kernel-prepared weights, each projection one padded launch."""
    from pallas_kernels.grouped_matmul import routed_ffn as rf
    if not ROUTED_FFN or not (interpret or (AUTO_KERNEL and _on_sm90())):
        return False
    return holds_quantized(gate_up) and holds_quantized(down) and rf.applies(num_pairs, gate_up, down)


def routed_ffn(x: jax.Array, weights: jax.Array, ids: jax.Array, gate_up, down, *, act=jax.nn.silu,
               interpret: bool = False) -> jax.Array:
    """x [T, H], weights / ids [T, k] -> [T, H]: the routed experts' SiLU FFN with gate and up fused
    into one [E, H, 2I] GroupedKernelWeights, in the padded row domain (routed_ffn.py)."""
    from pallas_kernels.grouped_matmul import routed_ffn as rf
    return rf.routed_ffn(x, weights, ids, gate_up, down, act=act, interpret=interpret)
