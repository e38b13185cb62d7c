"""Evaluation: perplexity with the non-overlapping-window protocol."""

from milo_jax.eval.perplexity import PerplexityResult, perplexity, split_windows

__all__ = ["PerplexityResult", "perplexity", "split_windows"]
