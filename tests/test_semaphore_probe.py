"""benchmarks/semaphore_probe.py lowers for sm90 from the CPU (it runs only natively: no semaphores in interpret mode)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from tests.conftest import cuda_lowering_unavailable


@pytest.mark.parametrize("sync", [True, False])
def test_semaphore_probe_lowers_for_sm90_on_cpu(sync):
    reason = cuda_lowering_unavailable()
    if reason:
        pytest.skip(reason)
    from benchmarks import semaphore_probe as sp
    f = jax.jit(sp.build(8, 2, sync))
    text = f.trace(jax.ShapeDtypeStruct((2, *sp.TILE), jnp.float32)).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text
