"""Quantize a whole model: swap selected nnx.Param values for QuantizedTensors.

    new_model, report = quantize_model(model, bits=3, group_size=64, method="hqq")

Which weights: every nnx.Param whose dotted path (e.g. "layers.0.attn.q_proj.kernel",
"layers.3.mlp.experts.down_proj") matches `include` (`re.search`). The default selects the
attention projections and the routed experts of milo_jax.models decoders; the router, embeddings,
lm_head, norms, biases and shared experts stay as they are. The input model is not modified: the
returned model is a new one whose matching Params hold QuantizedTensors (milo_jax/models/linear.py
multiplies with those directly). This is a one-rule shorthand for `milo_jax.quantize`, which
holds the model-walking code.
"""

from __future__ import annotations

import dataclasses

# attention q/k/v/o projections (GQA) and the stacked routed experts; nothing else
DEFAULT_INCLUDE = r"^layers\.\d+\.(attn\.[qkvo]_proj\.kernel|mlp\.experts\.(gate|up|down)_proj)$"


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
                "tensors": [t.to_dict() for t in self.tensors]}


def quantize_model(model, *, bits: int = 3, group_size=64, method: str = "hqq",
                   include: str = DEFAULT_INCLUDE):
    """(new_model, QuantReport): `model` with every Param matching `include` quantized.

    A one-rule shorthand for `milo_jax.quantize` (which it calls with strict=True): raises
    ValueError naming the parameter for unsupported settings, when `include` matches no parameter,
    or when a match is already a QuantizedTensor. The report counts the quantized tensors only.
    """
    from milo_jax.quant.config import QuantConfig, Rule
    from milo_jax.quant.model import quantize

    try:
        rule = Rule(pattern=include, method=method, bits=bits, group_size=group_size)
        new_model, full = quantize(model, QuantConfig(rules=(rule,), name=f"{method}-{bits}bit"),
                                   strict=True)
    except ValueError as e:
        raise ValueError(f"quantize_model: {e}") from None
    tensors = tuple(full.tensors)
    report = QuantReport(bits=bits, group_size=group_size if group_size is not None else -1,
                         method=method, tensors=tensors,
                         num_weights=sum(t.num_weights for t in tensors),
                         nbytes=sum(t.nbytes for t in tensors))
    return new_model, report
