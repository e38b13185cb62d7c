"""Grouped (MoE) matmul: token rows sorted by expert times their expert's (quantized) weights."""

from pallas_kernels.grouped_matmul.api import grouped_matmul
from pallas_kernels.grouped_matmul.reference import grouped_matmul_reference

__all__ = ["grouped_matmul", "grouped_matmul_reference"]
