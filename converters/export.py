"""Write a milo_jax model as a Hugging Face checkpoint directory that transformers can load.

    export_hf(model, out_dir, max_shard_size=5 * 2**30)

config.json is the model's original HF config (model.config.hf_config) with the dtype updated;
weights go to model.safetensors, or to model-0000i-of-0000n.safetensors shards plus
model.safetensors.index.json when larger than max_shard_size. QuantizedTensor weights are
dequantized; kernels [in, out] are written in torch layout [out, in]; stacked experts are written
per expert under the architecture's published names (e.g. experts.{e}.w1.weight). Everything is
written into a temporary sibling directory that is renamed to out_dir at the end (out_dir must not
exist or be empty).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Iterator, Tuple

import jax.numpy as jnp
import numpy as np
from flax import nnx

from converters.errors import CheckpointError
from converters.registry import get_arch
from converters.safetensors_io import write_safetensors
from milo_jax.models.linear import materialize

_TORCH_DTYPE_NAMES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def _hf_tensors(model) -> Iterator[Tuple[str, np.ndarray]]:
    """(HF key, numpy array in torch layout) for every parameter of `model`."""
    config = model.config
    spec = get_arch(config.model_type, "model.config")
    rules = [r for r in spec.rules if r.export]
    dtype = jnp.dtype(model.dtype)
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    for path, var in flat:
        name = ".".join(str(p) for p in path)
        for rule in rules:
            m = rule.target_regex.match(name)
            if m:
                break
        else:
            raise CheckpointError(f"export: parameter {name!r} has no {spec.model_type} HF name")
        groups = {k: int(v) for k, v in m.groupdict().items()}
        w = np.asarray(materialize(var.get_value(), dtype))
        if rule.kind == "copy":
            yield rule.hf.format(**groups), w
        elif rule.kind == "linear":
            yield rule.hf.format(**groups), w.T
        elif rule.kind == "expert":
            for e in range(w.shape[0]):
                yield rule.hf.format(e=e, **groups), w[e].T
        else:
            raise CheckpointError(f"export: rule kind {rule.kind!r} cannot be exported")


def export_hf(model, out_dir: str, *, max_shard_size: int = 5 * 2**30) -> str:
    """Write `model` to `out_dir` in HF format; returns out_dir."""
    out_dir = os.fspath(out_dir)
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise CheckpointError(f"{out_dir}: export target exists and is not an empty directory")
    config = model.config
    if not config.hf_config:
        raise CheckpointError("export: model.config.hf_config is empty; export needs the original "
                              "HF config (load the model with load_hf)")
    spec = get_arch(config.model_type, "model.config")
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        shards, current, size = [], {}, 0
        for key, arr in _hf_tensors(model):
            if current and size + arr.nbytes > max_shard_size:
                shards.append(current)
                current, size = {}, 0
            current[key] = np.ascontiguousarray(arr)
            size += arr.nbytes
        shards.append(current)
        total = sum(a.nbytes for s in shards for a in s.values())
        if len(shards) == 1:
            write_safetensors(os.path.join(tmp, "model.safetensors"), shards[0])
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                write_safetensors(os.path.join(tmp, name), shard)
                weight_map.update({k: name for k in shard})
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        hf = dict(config.hf_config)
        dname = _TORCH_DTYPE_NAMES.get(jnp.dtype(model.dtype).name, "float32")
        for k in ("torch_dtype", "dtype"):
            if k in hf:
                hf[k] = dname
        if "dtype" not in hf and "torch_dtype" not in hf:
            hf["torch_dtype"] = dname
        hf.setdefault("architectures", list(spec.architectures))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf, f, indent=2, sort_keys=True)
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
