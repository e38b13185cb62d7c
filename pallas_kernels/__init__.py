"""Pallas kernels for milo-jax (Mosaic GPU, Hopper). Submodules import jax's Pallas lazily."""
