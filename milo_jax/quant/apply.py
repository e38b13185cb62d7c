"""Quantize a whole model: swap selected nnx.Param values for QuantizedTensors.

    new_model, report = quantize_model(model, bits=3, group_size=64, method="hqq")

Which weights: every nnx.Param whose dotted path (e.g. "layers.0.attn.q_proj.kernel",
"layers.3.mlp.experts.down_proj") matches `include` (`re.search`). The default selects the
attention projections and the routed experts of milo_jax.models decoders; the router, embeddings,
lm_head, norms, biases and shared experts stay as they are. The input model is not modified: the
returned model is a new one whose matching Params hold QuantizedTensors (milo_jax/models/linear.py
multiplies with those directly).
"""

from __future__ import annotations

import dataclasses
import re

import jax.numpy as jnp
import numpy as np
from flax import nnx

from milo_jax.quant.api import quantize_tensor
from milo_jax.quant.tensor import QuantizedTensor

# attention q/k/v/o projections (GQA) and the stacked routed experts; nothing else
DEFAULT_INCLUDE = r"^layers\.\d+\.(attn\.[qkvo]_proj\.kernel|mlp\.experts\.(gate|up|down)_proj)$"


@dataclasses.dataclass(frozen=True)
class TensorReport:
    """One quantized weight: logical shape [..., K, N], its storage cost and reconstruction error."""

    path: str
    shape: tuple
    num_weights: int
    nbytes: int                # codes + scales + zeros (+ compensator factors)
    bits_per_weight: float
    mean_abs_err: float        # mean |W - W_hat| over all weights, float32


@dataclasses.dataclass(frozen=True)
class QuantReport:
    """What quantize_model did; `bits_per_weight` is over the quantized tensors only."""

    bits: int
    group_size: int
    method: str
    tensors: tuple             # TensorReport, in parameter order
    num_weights: int
    nbytes: int

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / self.num_weights

    @property
    def mean_abs_err(self) -> float:
        """Weight-count-weighted mean |W - W_hat| over all quantized tensors."""
        return sum(t.mean_abs_err * t.num_weights for t in self.tensors) / self.num_weights

    def to_dict(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "method": self.method,
                "num_weights": self.num_weights, "nbytes": self.nbytes,
                "bits_per_weight": self.bits_per_weight, "mean_abs_err": self.mean_abs_err,
                "tensors": [dataclasses.asdict(t) for t in self.tensors]}


def _dotted(path) -> str:
    return ".".join(str(p) for p in path)


def quantize_model(model, *, bits: int = 3, group_size=64, method: str = "hqq",
                   include: str = DEFAULT_INCLUDE, **quantize_kwargs):
    """(new_model, QuantReport): `model` with every Param matching `include` quantized.

    bits, group_size, method and quantize_kwargs go to milo_jax.quantize_tensor (which raises
    ValueError naming the shape for unsupported settings). Raises ValueError when `include` matches
    no parameter or matches one that is already a QuantizedTensor.
    """
    pattern = re.compile(include)
    graphdef, state = nnx.split(model)
    flat = nnx.to_flat_state(state)
    reports, new_values = [], {}
    for path, var in flat:
        name = _dotted(path)
        if not isinstance(var, nnx.Param) or not pattern.search(name):
            continue
        w = var.get_value()
        if isinstance(w, QuantizedTensor):
            raise ValueError(f"quantize_model: {name} (shape {w.shape}) is already quantized")
        try:
            qt = quantize_tensor(w, bits=bits, group_size=group_size, method=method,
                                 **quantize_kwargs)
        except ValueError as e:
            raise ValueError(f"quantize_model: {name}: {e}") from None
        err = jnp.mean(jnp.abs(qt.dequantize(jnp.float32) - jnp.asarray(w, jnp.float32)))
        n = int(np.prod(w.shape))
        reports.append(TensorReport(name, tuple(w.shape), n, qt.nbytes, 8.0 * qt.nbytes / n,
                                    float(err)))
        new_values[tuple(path)] = qt
    if not reports:
        raise ValueError(f"quantize_model: include={include!r} matches no parameter of "
                         f"{type(model).__name__}")
    new_flat = [(p, v.replace(new_values[tuple(p)]) if tuple(p) in new_values else v)
                for p, v in flat]
    new_model = nnx.merge(graphdef, nnx.from_flat_state(new_flat))
    report = QuantReport(bits=bits, group_size=group_size if group_size is not None else -1,
                         method=method, tensors=tuple(reports),
                         num_weights=sum(r.num_weights for r in reports),
                         nbytes=sum(r.nbytes for r in reports))
    return new_model, report
