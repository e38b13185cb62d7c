"""Weight quantization: group quantizers (RTN, HQQ), MiLo low-rank compensators, bit packing,
the QuantizedTensor pytree and rank policies (`milo_jax.quant.ranks`)."""

from milo_jax.quant import ranks
from milo_jax.quant.api import (METHODS, SUPPORTED_BITS, SUPPORTED_GROUP_SIZES,
                                dequantization_error, quantize_tensor)
from milo_jax.quant.compensator import QuantizedFactor, RaggedFactor
from milo_jax.quant.config import (PRESETS, FrequencyRank, HiddenFractionRank, KurtosisRank,
                                   QuantConfig, Rule, preset)
from milo_jax.quant.lowrank import frobenius_error, milo_alternation, quantize_lowrank
from milo_jax.quant.tensor import QuantizedTensor

__all__ = ["QuantizedTensor", "quantize_tensor", "quantize_lowrank", "milo_alternation",
           "dequantization_error", "frobenius_error", "QuantizedFactor", "RaggedFactor", "ranks",
           "QuantConfig", "Rule", "preset", "PRESETS", "KurtosisRank", "FrequencyRank",
           "HiddenFractionRank", "METHODS", "SUPPORTED_BITS", "SUPPORTED_GROUP_SIZES"]
