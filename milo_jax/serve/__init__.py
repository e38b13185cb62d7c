"""Serving: batched generation with a preallocated KV cache, sampling, tokenizers."""

from milo_jax.serve.generation import GenerationResult, generate
from milo_jax.serve.sampling import select_next_token, top_p_mask
from milo_jax.serve.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = [
    "ByteTokenizer",
    "GenerationResult",
    "HFTokenizer",
    "generate",
    "load_tokenizer",
    "select_next_token",
    "top_p_mask",
]
