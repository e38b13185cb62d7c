"""Print which Mosaic GPU (Pallas) APIs this jax has: run first on a new device/jax version."""
import inspect

import jax
from jax.experimental.pallas import mosaic_gpu as plgpu

print("jax", jax.__version__, jax.devices()[0].device_kind)
names = [a for a in dir(plgpu) if not a.startswith("_")]
print("plgpu:", " ".join(names))
for f in ("emit_pipeline", "emit_pipeline_warp_specialized", "wgmma", "inline_mgpu", "kernel", "BlockSpec"):
    obj = getattr(plgpu, f, None)
    try:
        print(f, inspect.signature(obj))
    except Exception as e:
        print(f, "->", obj, e)
try:
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # noqa: F401
    print("InterpretGPUParams: yes")
except Exception as e:
    print("InterpretGPUParams: no", e)
