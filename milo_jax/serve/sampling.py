"""Next-token selection from logits: greedy, temperature, and top-p (nucleus) sampling."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def top_p_mask(logits: jax.Array, top_p: jax.Array) -> jax.Array:
    """Logits with everything outside the nucleus set to -inf.

    logits: [B, V] float32 (already divided by the temperature). top_p: scalar in (0, 1].
    The nucleus is the smallest set of most likely tokens whose probability sums to >= top_p;
    the most likely token is always kept, so top_p -> 0 degenerates to greedy.
    """
    order = jnp.argsort(-logits, axis=-1)  # [B, V] token ids, most likely first
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Mass strictly before each token: keep a token while the tokens above it hold < top_p.
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    keep_sorted = mass_before < top_p
    keep_sorted = keep_sorted.at[:, 0].set(True)
    # Scatter the keep flags back from sorted order to vocabulary order.
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    # top_p == 1 keeps everything exactly (float rounding in the cumsum could cut a tail token).
    return jnp.where(keep | (top_p >= 1.0), logits, -jnp.inf)


def select_next_token(
    logits: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array, *, greedy: bool
) -> jax.Array:
    """Next token per row. logits: [B, V]; returns int32 [B].

    greedy is static (temperature == 0 is a separate compiled path, argmax); otherwise the logits
    are divided by `temperature`, cut to the top-p nucleus and sampled with `key`.
    """
    logits = logits.astype(jnp.float32)
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = top_p_mask(logits / temperature, top_p)
    return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)
