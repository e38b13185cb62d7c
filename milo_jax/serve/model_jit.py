"""jit-compiled pure functions of a model's state, compiled once per model structure.

`model_jit(model, name, fn, ...)` splits the model (`nnx.split`) and returns
(jax.jit(partial(fn, graphdef)), state). The graphdef is closed over, not passed as a static
argument, so models whose graphdef is unhashable (a config holding a plain dict) work too. The
jitted function is cached per (model, name) while the model's graphdef compares equal, so repeated
calls (every decode step, every generate/perplexity call) reuse one executable per input shape.
"""

from __future__ import annotations

import weakref
from functools import partial
from typing import Callable

import jax
from flax import nnx

# model -> {name: (graphdef, jitted fn)}; weak keys so a deleted model frees its executables.
_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _same_graph(a, b) -> bool:
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - an uncomparable graphdef just means "recompile"
        return False


def model_jit(model, name: str, fn: Callable, **jit_kwargs):
    """(jitted `fn(graphdef, state, *args)` with graphdef bound, state) for `model`.

    fn: pure function whose first two arguments are (graphdef, state); jit_kwargs go to jax.jit
    (static_argnames, donate_argnames, ...). name: cache key; one name per distinct fn.
    """
    graphdef, state = nnx.split(model)
    per_model = _CACHE.setdefault(model, {})
    hit = per_model.get(name)
    if hit is not None and _same_graph(hit[0], graphdef):
        return hit[1], state
    jitted = jax.jit(partial(fn, graphdef), **jit_kwargs)
    per_model[name] = (graphdef, jitted)
    return jitted, state


def forget(model) -> None:
    """Drop every cached executable of `model` (tests use it after patching step functions)."""
    _CACHE.pop(model, None)
