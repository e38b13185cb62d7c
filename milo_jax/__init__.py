"""milo-jax: 3-bit (and mixed-precision) Mixture-of-Experts models in JAX."""

from milo_jax.quant import QuantizedTensor, quantize_tensor
from milo_jax.serve import generate
from milo_jax.eval import perplexity
from converters.hf import load_hf
from converters.export import export_hf
from milo_jax.quant.config import QuantConfig, Rule
from milo_jax.quant.model import quantize
from milo_jax.checkpoint import load, save
from milo_jax.models.kernel_weights import prepare_for_kernels

__version__ = "0.1.0"
__all__ = ["QuantizedTensor", "quantize_tensor", "generate", "perplexity", "load_hf", "export_hf", "quantize", "QuantConfig", "Rule", "save", "load",
           "prepare_for_kernels",
           "__version__"]
