"""Each package imports as a program's first import (a fresh interpreter): milo_jax, the kernels and the
converters import one another, and `import pallas_kernels.quant_matmul` or `import converters.hf` first
used to stop on a partly initialized module (ImportError)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("module", ["milo_jax", "pallas_kernels.quant_matmul", "pallas_kernels.grouped_matmul",
                                    "converters.hf"])
def test_first_import(module):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
