"""Repack a quantized model's dense weights into the decode kernel's layout once, at load time.

`models.linear.linear` sends bf16 activations and a 2-D QuantizedTensor to
`pallas_kernels.quant_matmul.matmul`, which on an sm90 GPU repacks the tensor into the kernel
layout (`layout.prepare`: codes transposed to N-major, K padded to a whole planar tile, 3-bit codes
re-paired for the magic-number unpack) inside EVERY call: under jit that repack runs on each
decode step and costs a full extra pass over the weight's bytes. `prepare_for_kernels` does the
repack once and stores the result (`KernelWeights`) in the model, so each step reads only the
kernel-ready words.

    model = milo_jax.prepare_for_kernels(model)   # or a params dict; returns a new one

What is replaced: every parameter whose value is a 2-D QuantizedTensor [K, N] that `prepare`
accepts, in the layout `quant_matmul.matmul`'s decode kernel reads (`api._kernel_layout`:
"planar_pairs" for 2/3/4-bit, "planar_nmajor" for 8-bit; the prefill path dequantizes either layout).
Routed experts: a stacked QuantizedTensor [E, K, N], or a per-expert tuple holding at least one
QuantizedTensor (mixed precision), becomes `GroupedKernelWeights` (`grouped_matmul.mgpu_sm90.
prepare_grouped`: one stacked class per bit width, 3-bit in "planar_pairs"). `models.moe` then
always takes the grouped path (sorted rows, one grouped matmul per projection), which on an sm90
GPU is the grouped Mosaic kernel: it reads only the experts that have tokens, so it replaces the
decode gather path too. A block's gate_proj and up_proj (same rows, same bit-width classes) are
fused into one GroupedKernelWeights in gate_proj, up_proj then holding `FusedIntoGate`: one launch
for both (Mixtral FFN, 3-bit g64, 1 token: 106 us, against 1087 us for the gather path; H100,
2026-11-23, benchmarks/results/moe_layer_table.md).
What stays as it is:
  * tensors `prepare` / `prepare_grouped` refuse (N not a multiple of 64, compensator rank > 128,
    group sizes the kernel cannot tile, non-planar layouts): the matmuls send them to their jnp
    references anyway;
  * plain arrays (bf16 experts included), and weights already in a kernel layout (so a second
    call changes nothing).

On CPU the prepared weights run the reference `_dequant_dot` (same math as for a QuantizedTensor)
but hold K padded to a whole tile, so there is nothing to gain: `prepare_for_kernels_on_gpu` prepares
only on an sm90 GPU and returns its input unchanged elsewhere. A prepared model cannot be saved
with `milo_jax.save` (save the QuantizedTensor model and prepare after `load`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
from flax import nnx

from milo_jax.quant.tensor import QuantizedTensor
from pallas_kernels.grouped_matmul import api as grouped_api
from pallas_kernels.quant_matmul import api as quant_matmul_api
from pallas_kernels.quant_matmul import layout

# one compiled repack per (shape, bits, group, rank, layout): one fused program instead of dozens
# of eager ops per tensor; ValueErrors for refused tensors are raised while tracing
_prepare_jit = jax.jit(layout.prepare, static_argnames=("slab", "layout"))


def kernel_layout_for(qt: QuantizedTensor) -> str:
    """The kernel layout `quant_matmul.matmul` picks for qt on its decode kernel."""
    return quant_matmul_api._kernel_layout(qt, "kernel", None)


@dataclasses.dataclass(frozen=True)
class FusedIntoGate:
    """up_proj's value once `prepare_for_kernels` fused it into its sibling gate_proj: the gate's
    GroupedKernelWeights then holds [E, K, split + I] (expert e: its `split` gate columns, then
    its up columns), and StackedExperts runs both projections as one grouped matmul. No arrays."""
    split: int = dataclasses.field(default=0, metadata=dict(static=True))


jax.tree_util.register_dataclass(FusedIntoGate, data_fields=[], meta_fields=["split"])


def fuse_gate_up(gate, up):
    """(gate, up) values of one expert block -> (fused gate, FusedIntoGate) when both are prepared
    routed experts (GroupedKernelWeights) with the same bit-width classes; unchanged otherwise."""
    from pallas_kernels.grouped_matmul import mgpu_sm90 as grouped
    if not (isinstance(gate, grouped.GroupedKernelWeights) and isinstance(up, grouped.GroupedKernelWeights)):
        return gate, up
    try:
        return grouped.fuse_columns(gate, up), FusedIntoGate(split=gate.n)
    except ValueError:   # different per-expert bit assignments: two launches, as before
        return gate, up


def prepare_weight(value):
    """One parameter value -> its KernelWeights (2-D QuantizedTensor) or GroupedKernelWeights
    (quantized routed experts), or the value unchanged when the kernels cannot take it (see the
    module docstring)."""
    # routed experts: a stacked [E, K, N] QuantizedTensor or a per-expert tuple holding one
    is_experts = value.ndim == 3 if isinstance(value, QuantizedTensor) else (
        isinstance(value, (tuple, list)) and grouped_api.holds_quantized(value))
    if is_experts:
        from pallas_kernels.grouped_matmul import mgpu_sm90 as grouped
        try:
            return grouped.prepare_grouped(list(value) if isinstance(value, tuple) else value)
        except ValueError:  # the grouped kernel cannot tile it: grouped_matmul's reference takes it
            return value
    if not isinstance(value, QuantizedTensor) or value.ndim != 2:
        return value
    try:
        return _prepare_jit(value, layout=kernel_layout_for(value))
    except ValueError:      # prepare refuses it: quant_matmul.matmul falls back to its reference
        return value


def prepare_for_kernels(model_or_params):
    """A new model (nnx.Module of milo_jax.models) or params dict (nested dicts with string keys)
    whose 2-D QuantizedTensor weights are in the quant_matmul kernel layout (KernelWeights).

    The input is not modified; unchanged leaves are shared with it. Idempotent. Raises ValueError
    for anything that is not a model or a params dict.
    """
    from milo_jax.quant.model import split_params

    if isinstance(model_or_params, (QuantizedTensor, layout.KernelWeights)):
        raise ValueError("prepare_for_kernels: expected a model or a params dict, got a single "
                         f"{type(model_or_params).__name__}; use "
                         "pallas_kernels.quant_matmul.prepare for one tensor")
    if isinstance(model_or_params, nnx.State):   # a Mapping whose leaves are Variables, not values
        raise ValueError("prepare_for_kernels: got an nnx.State; pass the model itself, or "
                         "nnx.to_pure_dict(state) as a params dict")
    if not isinstance(model_or_params, (nnx.Module, Mapping)):
        raise ValueError("prepare_for_kernels: expected a milo_jax model (nnx.Module) or a params "
                         f"dict of arrays / QuantizedTensors, got {type(model_or_params).__name__}")
    names, values, rebuild = split_params(model_or_params)
    new = {}
    for name, value in zip(names, values):
        prepared = prepare_weight(value)
        if prepared is not value:
            new[name] = prepared
    # routed experts' gate and up read the same rows: one grouped launch for both (measured on
    # Mixtral, H100: see FusedIntoGate and NOTES); names end in "gate_proj" / "up_proj"
    for name in list(new):
        if name.endswith("gate_proj"):
            up_name = name[:-len("gate_proj")] + "up_proj"
            if up_name in new:
                new[name], new[up_name] = fuse_gate_up(new[name], new[up_name])
    return rebuild(new)


def prepare_for_kernels_on_gpu(model_or_params):
    """`prepare_for_kernels` on an sm90 (Hopper) GPU, where the Mosaic kernel runs; the input
    unchanged elsewhere (CPU and other GPUs use the jnp reference, which gains nothing)."""
    if quant_matmul_api._on_sm90():
        return prepare_for_kernels(model_or_params)
    return model_or_params


__all__ = ["prepare_for_kernels", "prepare_for_kernels_on_gpu", "prepare_weight", "kernel_layout_for",
           "FusedIntoGate", "fuse_gate_up"]
