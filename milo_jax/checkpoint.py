"""Save / restore quantized (or plain) models and params pytrees: orbax arrays + JSON metadata.

    milo_jax.save(model_or_params, path, report=None)
    model_or_params = milo_jax.load(path)

Layout of `path` (a directory, written into a temporary sibling and renamed at the end, so a
crash never leaves a half-written checkpoint under `path`):
    milo_checkpoint.json   format/version, kind ("model" | "params"), for models the ModelConfig
                           and dtype, and one entry per parameter: its path and how to rebuild it
                           (a plain array, or a QuantizedTensor's static bits / group_size / shape /
                           layout / slab / dtype and its compensator factors' metadata, recursively:
                           plain array, QuantizedFactor, RaggedFactor); optionally a report dict
    arrays/                orbax-checkpoint PyTree of every array leaf as numpy, keyed a000000...
Arrays are stored with their exact dtype and bits (uint32 codes, float16 / bfloat16 scales, ...),
so a load returns bit-identical leaves. Zero-size arrays (orbax refuses them) live in the JSON.

A directory written by `milo-jax quantize` (milo_jax.quant.layerwise: OUT/manifest.json, OUT/base,
OUT/layers/NNNN) loads through the same `load`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Callable, Optional

import jax.numpy as jnp
import numpy as np
from flax import nnx

from milo_jax.quant.compensator import QuantizedFactor, RaggedFactor
from milo_jax.quant.tensor import QuantizedTensor

FORMAT = "milo-jax-checkpoint"
VERSION = 1
META_FILE = "milo_checkpoint.json"
ARRAYS_DIR = "arrays"


# ------------------------------------------------------------------------------------ encoding
def _static_fields(obj) -> dict:
    """Every static (pytree aux data) field of a QuantizedTensor / QuantizedFactor / RaggedFactor,
    JSON-ready; read from the dataclass so fields added later are saved too."""
    return {f.name: (list(v) if isinstance(v, tuple) else v)
            for f in dataclasses.fields(obj) if f.metadata.get("static")
            for v in [getattr(obj, f.name)]}


def _static_kwargs(cls, meta: dict) -> dict:
    """The static fields of `cls` present in `meta` (lists back to tuples: aux data is hashed)."""
    return {f.name: (tuple(meta[f.name]) if isinstance(meta[f.name], list) else meta[f.name])
            for f in dataclasses.fields(cls) if f.metadata.get("static") and f.name in meta}


def _encode_array(x, arrays: dict) -> dict:
    a = np.asarray(x)
    meta = {"kind": "array", "dtype": jnp.dtype(a.dtype).name, "shape": list(a.shape)}
    if a.size == 0:
        meta["id"] = None
    else:
        meta["id"] = f"a{len(arrays):06d}"
        arrays[meta["id"]] = a
    return meta


def _encode_factor(f, arrays: dict):
    if f is None:
        return None
    if isinstance(f, QuantizedFactor):
        return {"kind": "quantized_factor", "static": _static_fields(f),
                "codes": _encode_array(f.codes, arrays), "scales": _encode_array(f.scales, arrays)}
    if isinstance(f, RaggedFactor):
        return {"kind": "ragged", "static": _static_fields(f),
                "data": _encode_factor(f.data, arrays)}
    return _encode_array(f, arrays)


def encode_value(value, arrays: dict) -> dict:
    """A parameter value (array or QuantizedTensor) -> JSON metadata; arrays go into `arrays`."""
    from pallas_kernels.grouped_matmul.mgpu_sm90 import GroupedKernelWeights   # here: pallas_kernels
    from pallas_kernels.quant_matmul.layout import KernelWeights               # imports milo_jax

    if isinstance(value, (KernelWeights, GroupedKernelWeights)):
        raise ValueError(f"cannot save a model prepared for the GPU kernels ({type(value).__name__} leaves, "
                         "milo_jax.prepare_for_kernels): save the model before preparing it")
    if isinstance(value, QuantizedTensor):
        return {"kind": "quantized", "static": _static_fields(value),
                "codes": _encode_array(value.codes, arrays),
                "scales": _encode_array(value.scales, arrays),
                "zeros": _encode_array(value.zeros, arrays),
                "u": _encode_factor(value.u, arrays), "v": _encode_factor(value.v, arrays)}
    return _encode_array(value, arrays)


def _decode_array(meta: dict, arrays: dict, where: str):
    if meta["id"] is None:
        return jnp.zeros(tuple(meta["shape"]), jnp.dtype(meta["dtype"]))
    if meta["id"] not in arrays:
        raise ValueError(f"{where}: array {meta['id']} is missing from the checkpoint")
    a = arrays[meta["id"]]
    if list(a.shape) != meta["shape"] or jnp.dtype(a.dtype).name != meta["dtype"]:
        raise ValueError(f"{where}: stored array {meta['id']} is {a.dtype}{list(a.shape)}, metadata "
                         f"says {meta['dtype']}{meta['shape']}")
    return jnp.asarray(a)


def _decode_factor(meta, arrays: dict, where: str):
    if meta is None:
        return None
    kind = meta["kind"]
    if kind == "quantized_factor":
        return QuantizedFactor(codes=_decode_array(meta["codes"], arrays, where),
                               scales=_decode_array(meta["scales"], arrays, where),
                               **_static_kwargs(QuantizedFactor, meta["static"]))
    if kind == "ragged":
        return RaggedFactor(_decode_factor(meta["data"], arrays, where),
                            **_static_kwargs(RaggedFactor, meta["static"]))
    if kind == "array":
        return _decode_array(meta, arrays, where)
    raise ValueError(f"{where}: unknown factor kind {kind!r}")


def decode_value(meta: dict, arrays: dict, where: str = "checkpoint"):
    kind = meta.get("kind")
    if kind == "quantized":
        return QuantizedTensor(codes=_decode_array(meta["codes"], arrays, where),
                               scales=_decode_array(meta["scales"], arrays, where),
                               zeros=_decode_array(meta["zeros"], arrays, where),
                               u=_decode_factor(meta["u"], arrays, where),
                               v=_decode_factor(meta["v"], arrays, where),
                               **_static_kwargs(QuantizedTensor, meta["static"]))
    if kind == "array":
        return _decode_array(meta, arrays, where)
    raise ValueError(f"{where}: unknown entry kind {kind!r}")


# ------------------------------------------------------------------------------------ config
def config_to_json(config) -> dict:
    d = {}
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        d[f.name] = json.loads(json.dumps(v, default=_jsonable))
    return d


def _jsonable(v):
    if isinstance(v, (tuple, set)):
        return list(v)
    if isinstance(v, (np.integer, np.floating)):
        return v.item()
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")


def config_from_json(d: dict):
    from milo_jax.models.config import ModelConfig

    d = dict(d)
    for name in ("sliding_windows", "mlp_kinds"):
        d[name] = tuple(d.get(name) or ())
    if isinstance(d.get("eos_token_id"), list):
        d["eos_token_id"] = tuple(d["eos_token_id"])
    return ModelConfig(**d)


# ------------------------------------------------------------------------------------ files
def _atomic_dir(path: str, write: Callable[[str], None], overwrite: bool) -> str:
    """Run write(tmpdir) in a temporary sibling of `path`, then rename it to `path`."""
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not overwrite and (not os.path.isdir(path) or os.listdir(path)):
        raise ValueError(f"{path}: checkpoint target exists and is not an empty directory "
                         "(pass overwrite=True to replace it)")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        write(tmp)
        old = None
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
            os.rmdir(old)
            os.rename(path, old)
        os.rename(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def write_json_atomic(path: str, obj) -> None:
    """Write JSON to a temporary file next to `path` and os.replace it (atomic on POSIX)."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=d)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_entries(path: str, entries, header: dict, *, overwrite: bool = False,
                  extra_files: Optional[Callable[[str], None]] = None) -> str:
    """Low level: entries [(name, value)] and a JSON header dict -> checkpoint directory `path`.
    extra_files(tmpdir) may add files that then appear atomically with the checkpoint."""
    def write(tmp):
        import orbax.checkpoint as ocp

        arrays: dict = {}
        meta = [{"path": name, "value": encode_value(value, arrays)} for name, value in entries]
        if arrays:
            with ocp.PyTreeCheckpointer() as ckpt:
                ckpt.save(os.path.join(tmp, ARRAYS_DIR), arrays)
        if extra_files is not None:
            extra_files(tmp)
        with open(os.path.join(tmp, META_FILE), "w") as f:
            json.dump({"format": FORMAT, "version": VERSION, **header, "entries": meta}, f)

    return _atomic_dir(path, write, overwrite)


def read_entries(path: str):
    """-> (header dict, [(name, value)]) of a checkpoint written by write_entries."""
    path = os.fspath(path)
    meta_path = os.path.join(path, META_FILE)
    if not os.path.isfile(meta_path):
        raise ValueError(f"{path}: not a milo-jax checkpoint ({META_FILE} not found)")
    with open(meta_path) as f:
        header = json.load(f)
    if header.get("format") != FORMAT or header.get("version") != VERSION:
        raise ValueError(f"{meta_path}: unsupported format {header.get('format')!r} version "
                         f"{header.get('version')!r}")
    arrays = {}
    if os.path.isdir(os.path.join(path, ARRAYS_DIR)):
        import orbax.checkpoint as ocp

        with ocp.PyTreeCheckpointer() as ckpt:
            arrays = ckpt.restore(os.path.join(os.path.abspath(path), ARRAYS_DIR))
    entries = [(e["path"], decode_value(e["value"], arrays, f"{meta_path}: {e['path']}"))
               for e in header.pop("entries")]
    return header, entries


# ------------------------------------------------------------------------------------ public
def save(model_or_params, path: str, *, report=None, overwrite: bool = False) -> str:
    """Save an nnx model of milo_jax.models (its config, dtype and every Param) or a params
    pytree (nested dicts with string keys) whose leaves are arrays or QuantizedTensors.
    report: an optional QuantizationReport (or dict) stored in the metadata. Returns the path."""
    from milo_jax.quant.model import flatten_dict, split_params

    header = {}
    if report is not None:
        header["report"] = report if isinstance(report, dict) else report.to_dict()
    if isinstance(model_or_params, nnx.Module):
        model = model_or_params
        if not hasattr(model, "config") or not hasattr(model, "dtype"):
            raise ValueError(f"save: {type(model).__name__} is not a milo_jax.models model (no "
                             "config / dtype)")
        names, values, _ = split_params(model)
        header.update(kind="model", model_class=type(model).__name__,
                      config=config_to_json(model.config), dtype=str(model.dtype))
        entries = list(zip(names, values))
    else:
        items = flatten_dict(model_or_params)
        header.update(kind="params", keys={".".join(k): list(k) for k, _ in items})
        entries = [(".".join(k), v) for k, v in items]
    return write_entries(path, entries, header, overwrite=overwrite)


def model_from_entries(config_json: dict, dtype: str, entries, where: str):
    """A MoECausalLM with every Param set from entries {path: value} (all must be present)."""
    from milo_jax.models.decoder import MoECausalLM

    config = config_from_json(config_json)
    abstract = nnx.eval_shape(lambda: MoECausalLM(config, dtype=jnp.dtype(dtype)))
    graphdef, state = nnx.split(abstract)
    flat = list(nnx.to_flat_state(state))
    values = dict(entries)
    names = {".".join(str(p) for p in path) for path, var in flat if isinstance(var, nnx.Param)}
    missing = sorted(names - set(values))
    unknown = sorted(set(values) - names)
    if missing or unknown:
        raise ValueError(f"{where}: checkpoint does not fit the model config: missing "
                         f"{missing[:5]}, unexpected {unknown[:5]}")
    items = []
    for path, var in flat:
        name = ".".join(str(p) for p in path)
        v = values.get(name) if isinstance(var, nnx.Param) else None
        if v is not None:
            want = tuple(var.get_value().shape)
            if tuple(v.shape) != want:
                raise ValueError(f"{where}: {name} has shape {tuple(v.shape)}, the model expects "
                                 f"{want}")
            var = var.replace(v)
        items.append((path, var))
    return nnx.merge(graphdef, nnx.from_flat_state(items))


def load(path: str):
    """Restore what `save` wrote (a model or a params pytree), or the output directory of
    `milo-jax quantize` (a model). Leaves are bit-identical to the saved ones."""
    from milo_jax.quant.model import unflatten_dict

    path = os.fspath(path)
    from milo_jax.quant import layerwise

    if os.path.isfile(os.path.join(path, layerwise.MANIFEST)):
        return layerwise.load_layerwise(path)
    header, entries = read_entries(path)
    if header.get("kind") == "model":
        return model_from_entries(header["config"], header["dtype"], entries, path)
    if header.get("kind") == "params":
        keys = header["keys"]
        return unflatten_dict([(tuple(keys[name]), v) for name, v in entries])
    raise ValueError(f"{path}: unknown checkpoint kind {header.get('kind')!r}")


def load_report(path: str):
    """The QuantizationReport stored with a checkpoint (or a `milo-jax quantize` directory), or None."""
    from milo_jax.quant import layerwise
    from milo_jax.quant.model import QuantizationReport

    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, layerwise.MANIFEST)):
        return layerwise.read_report(path)
    with open(os.path.join(path, META_FILE)) as f:
        rep = json.load(f).get("report")
    return None if rep is None else QuantizationReport.from_dict(rep)


__all__ = ["save", "load", "load_report", "write_entries", "read_entries", "write_json_atomic",
           "encode_value", "decode_value", "model_from_entries", "FORMAT", "VERSION"]
