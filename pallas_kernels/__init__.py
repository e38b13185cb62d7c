"""Pallas kernels for milo-jax (Mosaic GPU, Hopper). Submodules import jax's Pallas lazily.

The kernels read milo_jax's quantized formats, and milo_jax's models call the kernels: milo_jax is
imported first here, so `import pallas_kernels.quant_matmul` (or grouped_matmul) as a program's first
import does not meet a partly initialized module on the way back (it raised ImportError before)."""

import milo_jax  # noqa: F401
