"""Weight quantization: group quantizers (RTN, HQQ), bit packing and the QuantizedTensor pytree."""

from milo_jax.quant.api import (METHODS, SUPPORTED_BITS, SUPPORTED_GROUP_SIZES,
                                dequantization_error, quantize_tensor)
from milo_jax.quant.tensor import QuantizedTensor

__all__ = ["QuantizedTensor", "quantize_tensor", "dequantization_error", "METHODS",
           "SUPPORTED_BITS", "SUPPORTED_GROUP_SIZES"]
