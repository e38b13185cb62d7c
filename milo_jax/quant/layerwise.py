"""Quantize a large HF checkpoint layer by layer, resumably (`milo-jax quantize`).

    report = quantize_checkpoint(model_dir, out_dir, "milo-3bit-s1", dtype="bfloat16")
    model = milo_jax.load(out_dir)

Memory: the checkpoint is read through converters' streaming reader (safetensors memory maps;
torch .bin files are loaded whole, one file at a time), ONE decoder layer's weights at a time,
plus the non-layer parameters (embeddings, final norm, lm_head) once. Each decoder layer is
quantized under the config (milo_jax.quant.model: the same recipes as the in-memory `quantize`)
and saved at once as its own small checkpoint (milo_jax.checkpoint, atomic rename):

    OUT/manifest.json       the run's identity (source, config, dtype, calibration), the model
                            config, per-layer completion records and a log of runs; atomic rewrite
    OUT/plan.json           budget configs only: bits / group size / ranks per tensor
    OUT/base/               the non-layer parameters (quantized if a rule matches them)
    OUT/layers/NNNN/        layer NNNN's parameters, its tensor reports, and for FrequencyRank the
                            calibration hidden state after that layer (calib_hidden.npy)
    OUT/report.json         the whole-model QuantizationReport, written when all layers are done
    OUT/tokenizer*          copied from the source so `milo-jax eval --model OUT` works

Resuming: a layer whose directory exists is finished (directories appear by rename only) and is
never recomputed; rerunning after a kill continues with the first missing layer. A rerun with a
different source, config, dtype or calibration is refused. Quantization is deterministic, so an
interrupted-and-resumed run equals an uninterrupted one bit for bit.

Budget configs ("milo-<X>bpw") need every tensor's residual spectrum before the first layer is
quantized: a first pass reads the layers one at a time (quant.ranks.budget_ranks over a lazy
mapping holding one layer), the plan is saved to plan.json and reused on resume. (The budget thus
reads the checkpoint twice in all: once for the plan, once to quantize.)

FrequencyRank (routing counts, calibration-free): random tokens (model.CALIBRATION) are embedded
and carried through the UNQUANTIZED layers one at a time; each MoE layer's router top-k ids on that
hidden state are counted (quant.ranks.collect_routing_counts). The hidden state after each layer is
stored with the layer, so a resumed run continues from it.

Testing hook: the environment variable MILO_JAX_QUANTIZE_FAIL_AFTER=n makes the run raise
RuntimeError right after it has finished (and saved) n layers, to simulate a kill.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Mapping
from typing import Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from milo_jax import checkpoint as ckpt
from milo_jax.quant import ranks as rank_policies
from milo_jax.quant.config import FrequencyRank, QuantConfig, as_config
from milo_jax.quant.model import (CALIBRATION, QuantizationReport, TensorReport, UntouchedReport,
                                  _layer_step_jit, budget_plan, calibration_tokens, layer_of,
                                  logical_size, other_budget_nbytes, quantize_with, recipe_for,
                                  tensor_report, untouched_report)

MANIFEST = "manifest.json"
PLAN = "plan.json"
REPORT = "report.json"
CARRY = "calib_hidden.npy"
FAIL_ENV = "MILO_JAX_QUANTIZE_FAIL_AFTER"
LAYOUT_VERSION = 1
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "tokenizer.model", "vocab.json", "merges.txt", "generation_config.json")


def _name(path: Tuple) -> str:
    return ".".join(str(p) for p in path)


def layer_dir(out: str, layer: int) -> str:
    return os.path.join(out, "layers", f"{layer:04d}")


def _done(d: str) -> bool:
    return os.path.isfile(os.path.join(d, ckpt.META_FILE))


# ------------------------------------------------------------------------------------ reader
class LayerReader:
    """Streams a HF checkpoint directory one parameter group at a time ("base" or a layer index),
    with converters.hf's key map, layout transforms and checks."""

    def __init__(self, model_dir: str, dtype):
        from converters import hf

        self.hf = hf
        self.root = os.fspath(model_dir)
        if not os.path.isdir(self.root):
            raise ValueError(f"{self.root}: checkpoint directory not found")
        self.config, self.spec = hf.read_config(self.root)
        self.kind, files = hf.find_weight_files(self.root)
        self.dtype = jnp.dtype(dtype)
        _, expected = hf.expected_params(self.config, self.dtype)
        self.expected = expected                  # path tuple -> (shape, dtype), model order
        self.groups: Dict[object, List[Tuple[str, str]]] = {}    # group -> [(file, key)]
        skip_key = getattr(self.spec, "skip_key", None)
        for file, index_keys in files.items():
            shard = hf._Shard(self.kind, file)
            try:
                keys = shard.keys() if index_keys is None else index_keys
                for key in keys:
                    if skip_key is not None and skip_key(key, self.config):
                        continue
                    hit = self.spec.match(key)
                    if hit is None:
                        if self.spec.ignored(key) or (self.config.tie_word_embeddings
                                                      and key == "lm_head.weight"):
                            continue
                        raise ValueError(f"{file}: key {key!r} is not a known "
                                         f"{self.spec.model_type} weight name")
                    rule, groups = hit
                    target = hf._path_of(rule.target, groups)
                    self.groups.setdefault(self.group_of(target), []).append((file, key))
            finally:
                shard.close()

    @staticmethod
    def group_of(path: Tuple):
        return int(path[1]) if path[0] == "layers" else "base"

    def names(self, group) -> List[str]:
        return [_name(p) for p in self.expected if self.group_of(p) == group]

    def shapes(self) -> Dict[str, jax.ShapeDtypeStruct]:
        return {_name(p): jax.ShapeDtypeStruct(s, d) for p, (s, d) in self.expected.items()}

    def read(self, group) -> Dict[str, jax.Array]:
        """{dotted path: array in our layout} of one group, in model parameter order."""
        hf = self.hf
        expected = {p: v for p, v in self.expected.items() if self.group_of(p) == group}
        asm = hf._Assembler(expected, self.dtype)
        by_file: Dict[str, List[str]] = {}
        for file, key in self.groups.get(group, []):
            by_file.setdefault(file, []).append(key)
        for file, keys in by_file.items():
            shard = hf._Shard(self.kind, file)
            try:
                for key in keys:
                    rule, groups = self.spec.match(key)
                    for suffix, arr in hf._transform(rule, shard.get(key), file, key):
                        target = hf._path_of(rule.target, groups) + suffix
                        asm.put(target, arr, groups.get("e") if rule.kind == "expert" else None,
                                file, key)
            finally:
                shard.close()
        done = asm.finish(self.root)
        return {_name(p): done[p] for p in expected}


class _LazyWeights(Mapping):
    """{path: W} for the budget allocator, reading one group at a time (the last one cached).

    quant.ranks.budget_ranks reads each tensor twice: once for its residual spectrum, then only
    for its shape when it builds the plan. The second access returns a jax.ShapeDtypeStruct, so
    the checkpoint is read once (code that used it as an array would fail loudly)."""

    def __init__(self, reader: LayerReader, names: List[str]):
        self.reader, self._names = reader, names
        all_shapes = reader.shapes()
        self.shapes = {n: all_shapes[n].shape for n in names}
        self._structs = {n: all_shapes[n] for n in names}
        self._seen: set = set()
        self._group, self._cache = None, {}

    def __getitem__(self, name):
        if name in self._seen:
            return self._structs[name]
        self._seen.add(name)
        group = "base" if layer_of(name) is None else layer_of(name)
        if group != self._group:
            self._group, self._cache = None, {}
            self._cache = self.reader.read(group)
            self._group = group
        return self._cache[name]

    def __iter__(self):
        return iter(self._names)

    def __len__(self):
        return len(self._names)


# ------------------------------------------------------------------------------------ run
def _run_identity(model_dir: str, config: QuantConfig, dtype, calibration: dict) -> dict:
    return {"layout_version": LAYOUT_VERSION, "source": os.path.abspath(model_dir),
            "config": config.to_dict(), "dtype": jnp.dtype(dtype).name,
            "calibration": dict(calibration)}


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


def _quantize_group(values: Dict[str, jax.Array], config: QuantConfig, *, hidden_size, counts,
                    budget) -> Tuple[list, list, list]:
    """-> (entries [(path, value)], TensorReports, UntouchedReports) for one group."""
    entries, reports, untouched = [], [], []
    for name, w in values.items():
        rule = config.rule_for(name)
        if rule is None:
            entries.append((name, w))
            untouched.append(untouched_report(name, w))
            continue
        if w.ndim < 2:
            raise ValueError(f"{name}: rule {rule.pattern!r} matches a {w.ndim}-D parameter of "
                             f"shape {tuple(w.shape)}; only [..., K, N] weights can be quantized")
        recipe = recipe_for(name, w, rule, config.rules.index(rule), hidden_size=hidden_size,
                            routing_counts=counts, budget_entry=budget.get(name))
        qt = quantize_with(name, w, recipe)
        entries.append((name, qt))
        reports.append(tensor_report(name, w, qt, recipe))
    return entries, reports, untouched


def _layer_module(model_config, layer: int, values: Dict[str, jax.Array], dtype):
    """A standalone DecoderLayer holding `values` (paths "layers.{layer}.…")."""
    from milo_jax.models.decoder import DecoderLayer

    abstract = nnx.eval_shape(lambda: DecoderLayer(model_config, layer, dtype=dtype))
    graphdef, state = nnx.split(abstract)
    prefix = f"layers.{layer}."
    items = []
    for path, var in nnx.to_flat_state(state):
        name = prefix + _name(path)
        items.append((path, var.replace(values[name]) if name in values else var))
    return nnx.merge(graphdef, nnx.from_flat_state(items))


def _plan_to_json(plan: dict) -> dict:
    return {n: {"bits": p.bits, "group_size": p.group_size,
                "ranks": np.asarray(p.ranks).tolist(), "nbytes": p.nbytes,
                "sq_error": p.sq_error} for n, p in plan.items()}


def _plan_from_json(d: dict) -> dict:
    return {n: rank_policies.TensorPlan(bits=v["bits"], group_size=v["group_size"],
                                        ranks=np.asarray(v["ranks"], np.int64), nbytes=v["nbytes"],
                                        sq_error=v["sq_error"]) for n, v in d.items()}


def quantize_checkpoint(model_dir: str, out_dir: str, config, *, dtype="bfloat16",
                        progress: bool = True, calibration: Optional[dict] = None) -> QuantizationReport:
    """Quantize the HF checkpoint in `model_dir` into `out_dir` (module docstring); returns the
    whole-model QuantizationReport. Resumes a previous run into the same out_dir."""
    config = as_config(config)
    calibration = dict(CALIBRATION, **(calibration or {}))
    reader = LayerReader(model_dir, dtype)
    mc = reader.config
    out = os.path.abspath(os.fspath(out_dir))
    ident = _run_identity(model_dir, config, dtype, calibration)
    man_path = os.path.join(out, MANIFEST)
    if os.path.isfile(man_path):
        manifest = _read_json(man_path)
        if manifest.get("run") != ident:
            raise ValueError(f"{out}: holds a different quantization run (source, config, dtype or "
                             "calibration differ); use a new output directory")
    else:
        if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
            raise ValueError(f"{out}: output exists, is not empty and has no {MANIFEST}")
        os.makedirs(os.path.join(out, "layers"), exist_ok=True)
        manifest = {"run": ident, "model_config": ckpt.config_to_json(mc),
                    "dtype": jnp.dtype(dtype).name, "num_layers": mc.num_hidden_layers,
                    "layers": {}, "runs": [], "complete": False}
        ckpt.write_json_atomic(man_path, manifest)
    _remove_stale_temporaries(out)
    run = {"started": time.time(), "computed_layers": [], "skipped_layers": []}
    manifest["runs"].append(run)
    ckpt.write_json_atomic(man_path, manifest)

    names_all = [n for n in reader.shapes()]
    shapes = reader.shapes()
    chosen = {n: config.rule_for(n) for n in names_all}
    if not any(r is not None for r in chosen.values()):
        raise ValueError(f"{config.name}: no rule matches any parameter of {model_dir}")

    # budget plan (first pass over the layers), saved once
    budget: dict = {}
    if config.budget_bits_per_weight is not None:
        plan_path = os.path.join(out, PLAN)
        if os.path.isfile(plan_path):
            budget = _plan_from_json(_read_json(plan_path))
        else:
            milo = [n for n in names_all if chosen[n] is not None and chosen[n].method == "milo"]
            budget = budget_plan(config, _LazyWeights(reader, milo),
                                 other_nbytes=other_budget_nbytes(config, shapes),
                                 total_weights=sum(logical_size(s) for s in shapes.values()),
                                 experts_per_token=getattr(mc, "num_experts_per_tok", None))
            ckpt.write_json_atomic(plan_path, _plan_to_json(budget))
    needs_counts = (not budget) and any(r is not None and isinstance(r.rank, FrequencyRank)
                                        for r in chosen.values())

    # non-layer parameters
    base_dir = os.path.join(out, "base")
    base_values = None
    if not _done(base_dir):
        base_values = reader.read("base")
        entries, reps, unt = _quantize_group(base_values, config, hidden_size=mc.hidden_size,
                                             counts=None, budget=budget)
        _save_group(base_dir, entries, reps, unt, header={"group": "base"})
        if not needs_counts:
            base_values = None           # only the calibration embedding needs it later

    fail_after = os.environ.get(FAIL_ENV)
    fail_after = int(fail_after) if fail_after else None
    carry, positions = None, None
    n_layers = mc.num_hidden_layers
    bar = tqdm(total=n_layers, desc=f"quantizing ({config.name})", unit="layer",
               disable=not progress)
    for layer in range(n_layers):
        d = layer_dir(out, layer)
        if _done(d):
            run["skipped_layers"].append(layer)
            manifest["layers"].setdefault(str(layer), {"computed_at": None})
            bar.update(1)
            continue
        values = reader.read(layer)
        counts = None
        new_carry = None
        if needs_counts:
            if carry is None:
                carry = _carry_before(out, layer, reader, base_values, calibration, mc)
            b, s = carry.shape[:2]
            positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
            module = _layer_module(mc, layer, values, reader.dtype)
            new_carry, ids = _layer_step_jit(module, carry, positions)
            if ids is not None:
                c = rank_policies.collect_routing_counts(lambda _: [np.asarray(ids)], [None], 1,
                                                         mc.num_experts)
                counts = {layer: c[0]}
            del module
        entries, reps, unt = _quantize_group(values, config, hidden_size=mc.hidden_size,
                                             counts=counts, budget=budget)
        carry_np = None if new_carry is None else np.asarray(new_carry)
        _save_group(d, entries, reps, unt, header={"group": layer}, carry=carry_np)
        carry = new_carry
        del values, entries
        run["computed_layers"].append(layer)
        manifest["layers"][str(layer)] = {"computed_at": time.time(),
                                          "run": len(manifest["runs"]) - 1}
        ckpt.write_json_atomic(man_path, manifest)
        bar.update(1)
        if fail_after is not None and len(run["computed_layers"]) >= fail_after:
            bar.close()
            raise RuntimeError(f"{FAIL_ENV}={fail_after}: stopping after layer {layer} (testing hook)")
    bar.close()

    report = read_group_reports(out, config.name, n_layers)
    ckpt.write_json_atomic(os.path.join(out, REPORT), report.to_dict())
    _copy_tokenizer(reader.root, out)
    manifest["complete"] = True
    manifest["bits_per_weight"] = report.bits_per_weight
    ckpt.write_json_atomic(man_path, manifest)
    return report


def _remove_stale_temporaries(out: str) -> None:
    """Temporary directories of saves that a kill interrupted (checkpoint._atomic_dir names them
    .<name>.tmp-* / .<name>.old-*): never a finished layer, safe to delete."""
    for parent in (out, os.path.join(out, "layers")):
        if not os.path.isdir(parent):
            continue
        for name in os.listdir(parent):
            if name.startswith(".") and (".tmp-" in name or ".old-" in name):
                p = os.path.join(parent, name)
                if os.path.isdir(p):
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    os.unlink(p)


def _carry_before(out, layer, reader, base_values, calibration, mc):
    """The calibration hidden state entering `layer`: embedded random tokens for layer 0, else the
    state stored with layer - 1."""
    if layer > 0:
        return jnp.asarray(np.load(os.path.join(layer_dir(out, layer - 1), CARRY)))
    if base_values is None:
        base_values = reader.read("base")
    emb = base_values["embed_tokens.embedding"]
    tokens = calibration_tokens(mc.vocab_size, batch=calibration["batch"],
                                seq_len=calibration["seq_len"], seed=calibration["seed"])
    return jnp.take(emb, jnp.asarray(tokens), axis=0).astype(reader.dtype)


def _save_group(d, entries, reps, unt, *, header, carry=None):
    header = dict(header, kind="group", computed_at=time.time(),
                  tensors=[r.to_dict() for r in reps],
                  untouched=[dict(u.__dict__, shape=list(u.shape)) for u in unt])

    def extra(tmp):
        if carry is not None:
            np.save(os.path.join(tmp, CARRY), carry)

    ckpt.write_entries(d, entries, header, extra_files=extra)


def _group_dirs(out: str, n_layers: int) -> List[str]:
    return [os.path.join(out, "base")] + [layer_dir(out, i) for i in range(n_layers)]


def read_group_reports(out: str, config_name: str, n_layers: int) -> QuantizationReport:
    tensors, untouched = [], []
    for d in _group_dirs(out, n_layers):
        h = _read_json(os.path.join(d, ckpt.META_FILE))
        tensors += [TensorReport.from_dict(t) for t in h["tensors"]]
        untouched += [UntouchedReport(**dict(u, shape=tuple(u["shape"]))) for u in h["untouched"]]
    return QuantizationReport(config_name, tuple(tensors), tuple(untouched))


def _copy_tokenizer(src: str, out: str):
    for name in _TOKENIZER_FILES:
        p = os.path.join(src, name)
        if os.path.isfile(p):
            shutil.copyfile(p, os.path.join(out, name))


def read_report(out: str) -> QuantizationReport:
    return QuantizationReport.from_dict(_read_json(os.path.join(out, REPORT)))


def load_layerwise(out: str):
    """The quantized model of a finished `quantize_checkpoint` output directory."""
    man = _read_json(os.path.join(out, MANIFEST))
    if not man.get("complete"):
        missing = [i for i in range(man["num_layers"]) if not _done(layer_dir(out, i))]
        raise ValueError(f"{out}: quantization is not complete (layers {missing[:8]} missing); "
                         "rerun `milo-jax quantize` with the same arguments to finish it")
    entries = []
    for d in _group_dirs(out, man["num_layers"]):
        entries += ckpt.read_entries(d)[1]
    return ckpt.model_from_entries(man["model_config"], man["dtype"], entries, out)


__all__ = ["quantize_checkpoint", "load_layerwise", "read_report", "LayerReader", "MANIFEST",
           "FAIL_ENV"]
