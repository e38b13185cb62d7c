"""Load a Hugging Face checkpoint directory into a milo_jax model.

    model = load_hf(path, dtype=jnp.float32)

The directory holds config.json and the weights: model.safetensors, or shards named by
model.safetensors.index.json, or pytorch_model.bin (+ pytorch_model.bin.index.json) / a single
*.bin / *.pt read by torch with weights_only=True. The architecture comes from config.json's
model_type (converters.registry); its parser refuses unhandled config fields.

Streaming: the model's parameter shapes come from nnx.eval_shape (nothing allocated); shards are
read one at a time through a memory map, each tensor is transformed (transposed to [in, out],
expert slices put into their stacked [E, in, out] buffer) and each parameter is moved to a JAX
array as soon as it is complete, so peak host memory is about one shard plus the output (plus the
partially filled stacked-expert buffers). Everything is checked (unknown, missing, duplicated keys;
shapes; dtypes) and the model is only assembled at the end: nothing half-loaded is returned.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Tuple

import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from converters.errors import CheckpointError, CheckpointFileNotFound
from converters.registry import ArchSpec, KeyRule, get_arch
from converters.safetensors_io import SafetensorsFile
from converters.torch_bin import load_torch_state_dict
from milo_jax.models.config import ModelConfig
from milo_jax.models.decoder import MoECausalLM


SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"


# ------------------------------------------------------------------------------- config
def read_config(path: str) -> Tuple[ModelConfig, ArchSpec]:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise CheckpointFileNotFound(f"{cfg_path}: config.json not found")
    try:
        with open(cfg_path) as f:
            hf = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{cfg_path}: expected a JSON object")
    spec = get_arch(hf.get("model_type"), cfg_path)
    return spec.parse_config(hf, cfg_path), spec


# ------------------------------------------------------------------------------- shards
def _inside(root: str, name: str, index_path: str, key: str) -> str:
    if not isinstance(name, str) or not name or os.path.isabs(name) or "\\" in name:
        raise CheckpointError(f"{index_path}: key {key!r} names shard {name!r}, which is not a "
                              "file name inside the checkpoint directory")
    full = os.path.realpath(os.path.join(root, name))
    root_real = os.path.realpath(root)
    if os.path.commonpath([full, root_real]) != root_real or full == root_real:
        raise CheckpointError(f"{index_path}: key {key!r} names shard {name!r}, which is outside "
                              f"the checkpoint directory {root}")
    return full


def _read_index(root: str, index_name: str) -> Dict[str, List[str]]:
    """{shard path: [keys]} from an HF index file, validating every file name."""
    index_path = os.path.join(root, index_name)
    try:
        with open(index_path) as f:
            index = json.load(f)
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path}: malformed index ({type(e).__name__}: {e})") from None
    shards: Dict[str, List[str]] = {}
    for key, name in weight_map.items():
        full = _inside(root, name, index_path, key)
        shards.setdefault(full, []).append(key)
    for full, keys in shards.items():
        if not os.path.isfile(full):
            raise CheckpointFileNotFound(f"{full}: shard named in {index_path} (key {keys[0]!r}) "
                                         "not found")
    return shards


def find_weight_files(root: str) -> Tuple[str, Dict[str, Optional[List[str]]]]:
    """("safetensors" | "torch", {file: expected keys or None})."""
    if os.path.isfile(os.path.join(root, SAFE_INDEX)):
        return "safetensors", _read_index(root, SAFE_INDEX)
    if os.path.isfile(os.path.join(root, SAFE_SINGLE)):
        return "safetensors", {os.path.join(root, SAFE_SINGLE): None}
    if os.path.isfile(os.path.join(root, BIN_INDEX)):
        return "torch", _read_index(root, BIN_INDEX)
    for name in (BIN_SINGLE, "model.bin", "model.pt", "pytorch_model.pt"):
        if os.path.isfile(os.path.join(root, name)):
            return "torch", {os.path.join(root, name): None}
    singles = sorted(f for f in os.listdir(root) if f.endswith((".safetensors", ".bin", ".pt")))
    if len(singles) == 1:
        kind = "safetensors" if singles[0].endswith(".safetensors") else "torch"
        return kind, {os.path.join(root, singles[0]): None}
    raise CheckpointFileNotFound(f"{root}: no weights found (expected {SAFE_SINGLE}, {SAFE_INDEX}, "
                                 f"{BIN_SINGLE} or {BIN_INDEX})")


class _Shard:
    """Uniform access to one weight file: keys(), shape(k), dtype(k), get(k) -> numpy."""

    def __init__(self, kind: str, path: str):
        self.path = path
        if kind == "safetensors":
            self._st, self._sd = SafetensorsFile(path), None
        else:
            self._st, self._sd = None, load_torch_state_dict(path)

    def keys(self):
        return self._st.keys() if self._st is not None else list(self._sd)

    def get(self, key) -> np.ndarray:
        return self._st.get(key) if self._st is not None else self._sd[key]

    def close(self):
        if self._st is not None:
            self._st.close()
        self._sd = None


# ------------------------------------------------------------------------------- targets
def _path_of(template: str, groups: Dict[str, int]) -> Tuple:
    parts = template.format(**groups).split(".")
    return tuple(int(p) if p.isdigit() else p for p in parts)


def _transform(rule: KeyRule, arr: np.ndarray, file: str, key: str):
    """-> list of (suffix path to append to the target, array in our layout)."""
    if rule.kind == "copy":
        return [((), arr)]
    if rule.kind in ("linear", "expert"):
        if arr.ndim != 2:
            raise CheckpointError(f"{file}: key {key!r}: expected a 2-D [out, in] weight, got "
                                  f"shape {list(arr.shape)}")
        return [((), arr.T)]
    if arr.ndim != 3:
        raise CheckpointError(f"{file}: key {key!r}: expected a 3-D stacked-experts tensor, got "
                              f"shape {list(arr.shape)}")
    if rule.kind == "experts":
        return [((), arr.transpose(0, 2, 1))]
    # experts_gate_up: [E, 2I, H], gate rows first
    if arr.shape[1] % 2:
        raise CheckpointError(f"{file}: key {key!r}: fused gate_up_proj has an odd middle "
                              f"dimension {arr.shape[1]}")
    i = arr.shape[1] // 2
    return [(("gate_proj",), arr[:, :i].transpose(0, 2, 1)),
            (("up_proj",), arr[:, i:].transpose(0, 2, 1))]


def _path_str(path: Tuple) -> str:
    return ".".join(str(p) for p in path)


class _Assembler:
    """Collects converted tensors into the model's parameter paths, checking shapes and coverage."""

    def __init__(self, expected: Dict[Tuple, Tuple[tuple, np.dtype]], dtype):
        self.expected = expected
        self.dtype = jnp.dtype(dtype)
        self.done: Dict[Tuple, object] = {}          # path -> jax array
        self.partial: Dict[Tuple, np.ndarray] = {}   # stacked experts being filled
        self.filled: Dict[Tuple, set] = {}
        self.source: Dict[Tuple, str] = {}

    def put(self, path: Tuple, arr: np.ndarray, expert: Optional[int], file: str, key: str):
        if path not in self.expected:
            raise CheckpointError(f"{file}: key {key!r} maps to parameter {_path_str(path)!r}, "
                                  "which this model configuration does not have")
        shape, _ = self.expected[path]
        # float16/32/64 and bfloat16 (ml_dtypes types have numpy kind "V", hence issubdtype).
        # float8 weights come with block scales (quantization_config, *_scale_inv tensors) that
        # would be lost by a plain cast, so they are refused.
        if not jnp.issubdtype(arr.dtype, jnp.floating) or arr.dtype.itemsize < 2:
            raise CheckpointError(f"{file}: key {key!r}: dtype {arr.dtype} is not a supported "
                                  "weight dtype (float16, bfloat16, float32, float64)")
        if expert is None:
            if tuple(arr.shape) != tuple(shape):
                raise CheckpointError(f"{file}: key {key!r}: shape {list(arr.shape)} (after layout "
                                      f"conversion) does not match the expected {list(shape)} of "
                                      f"{_path_str(path)!r}")
            if path in self.done or path in self.partial:
                raise CheckpointError(f"{file}: key {key!r}: parameter {_path_str(path)!r} was "
                                      f"already loaded from {self.source.get(path)}")
            # a parameter the model declares float32 at every dtype (DeepSeek-V3's routing bias,
            # kept fp32 like transformers' _keep_in_fp32_modules) is not rounded to `dtype`
            keep32 = np.dtype(self.expected[path][1]) == np.float32
            self.done[path] = jnp.asarray(np.asarray(arr, dtype=np.float32 if keep32 else self.dtype))
            self.source[path] = f"{file}:{key}"
            return
        if tuple(arr.shape) != tuple(shape[1:]) or not 0 <= expert < shape[0]:
            raise CheckpointError(f"{file}: key {key!r}: expert {expert} of shape "
                                  f"{list(arr.shape)} does not fit the stacked parameter "
                                  f"{_path_str(path)!r} of shape {list(shape)}")
        if path in self.done:
            raise CheckpointError(f"{file}: key {key!r}: parameter {_path_str(path)!r} was already "
                                  f"loaded from {self.source.get(path)}")
        buf = self.partial.get(path)
        if buf is None:
            buf = self.partial[path] = np.empty(shape, self.dtype)
            self.filled[path] = set()
        if expert in self.filled[path]:
            raise CheckpointError(f"{file}: key {key!r}: expert {expert} of {_path_str(path)!r} "
                                  "appears twice")
        buf[expert] = arr
        self.filled[path].add(expert)
        self.source[path] = f"{file}:{key}"
        if len(self.filled[path]) == shape[0]:
            self.done[path] = jnp.asarray(self.partial.pop(path))
            del self.filled[path]

    def finish(self, root: str):
        missing = [p for p in self.expected if p not in self.done]
        if missing:
            desc = []
            for p in missing[:8]:
                if p in self.filled:
                    have = self.filled[p]
                    lost = [e for e in range(self.expected[p][0][0]) if e not in have]
                    desc.append(f"{_path_str(p)} (experts {lost[:8]} missing)")
                else:
                    desc.append(_path_str(p))
            raise CheckpointError(f"{root}: the checkpoint lacks {len(missing)} parameter(s) the "
                                  f"model needs: {desc}{' ...' if len(missing) > 8 else ''}")
        return self.done


def expected_params(config: ModelConfig, dtype) -> Tuple[MoECausalLM, Dict[Tuple, Tuple]]:
    abstract = nnx.eval_shape(lambda: MoECausalLM(config, dtype=dtype))
    flat = nnx.to_flat_state(nnx.state(abstract, nnx.Param))
    return abstract, {tuple(p): (tuple(v.get_value().shape), v.get_value().dtype) for p, v in flat}


# ------------------------------------------------------------------------------- load
def load_hf(path: str, dtype=jnp.float32, *, progress: bool = True) -> MoECausalLM:
    """Load the HF checkpoint directory `path` as an nnx model with every parameter in `dtype`."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointFileNotFound(f"{path}: checkpoint directory not found")
    config, spec = read_config(path)
    kind, files = find_weight_files(path)
    abstract, expected = expected_params(config, dtype)
    asm = _Assembler(expected, dtype)
    bar = tqdm(total=len(expected), desc=f"loading {os.path.basename(os.path.normpath(path))}",
               unit="param", disable=not progress)
    for file, index_keys in files.items():
        shard = _Shard(kind, file)
        try:
            keys = shard.keys()
            if index_keys is not None:
                absent = sorted(set(index_keys) - set(keys))
                if absent:
                    raise CheckpointError(f"{file}: key {absent[0]!r} is listed for this shard in "
                                          f"the index but is not in the file")
                extra = sorted(set(keys) - set(index_keys))
                if extra:
                    raise CheckpointError(f"{file}: key {extra[0]!r} is in the file but the index "
                                          "assigns it elsewhere (or not at all)")
            skip_key = getattr(spec, "skip_key", None)   # config-dependent drops (DeepSeek-V3 MTP)
            for key in keys:
                if skip_key is not None and skip_key(key, config):
                    continue
                hit = spec.match(key)
                if hit is None:
                    if spec.ignored(key) or (config.tie_word_embeddings and key == "lm_head.weight"):
                        continue
                    raise CheckpointError(f"{file}: key {key!r} is not a known {spec.model_type} "
                                          "weight name")
                rule, groups = hit
                before = len(asm.done)
                for suffix, arr in _transform(rule, shard.get(key), file, key):
                    target = _path_of(rule.target, groups) + suffix
                    asm.put(target, arr, groups.get("e") if rule.kind == "expert" else None,
                            file, key)
                bar.update(len(asm.done) - before)
        finally:
            shard.close()
    bar.close()
    params = asm.finish(path)
    state = nnx.from_flat_state([(p, params[p]) for p in expected])
    nnx.update(abstract, state)
    return abstract
