"""milo-jax: 3-bit (and mixed-precision) Mixture-of-Experts models in JAX."""

from milo_jax.quant import QuantizedTensor, quantize_tensor

__version__ = "0.1.0"
__all__ = ["QuantizedTensor", "quantize_tensor", "__version__"]
