"""Quantized matmul y = x @ deq(Q) + (x @ U) @ V: Mosaic GPU kernel for Hopper plus reference."""

from pallas_kernels.quant_matmul.api import matmul
from pallas_kernels.quant_matmul.layout import KernelWeights, prepare
from pallas_kernels.quant_matmul.reference import matmul_reference

__all__ = ["matmul", "prepare", "KernelWeights", "matmul_reference"]
