"""Hugging Face checkpoints <-> milo_jax params.

milo_jax re-exports these loaders and the loaders build milo_jax models: milo_jax is imported first
here, so `import converters.hf` as a program's first import does not meet a partly initialized module
(it raised ImportError before)."""

import milo_jax  # noqa: F401
