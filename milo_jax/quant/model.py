"""`quantize(model_or_params, config) -> (quantized, report)`: a whole model under a QuantConfig.

    qmodel, report = milo_jax.quantize(model, "milo-3bit-s1")
    qparams, report = milo_jax.quantize({"layers": {"0": {...}}}, QuantConfig((Rule(...),)))

Input: an nnx model of milo_jax.models (a NEW model is returned; the input is not modified) or a
params pytree of nested dicts with string keys and array leaves (the same structure comes back,
quantized leaves replaced by QuantizedTensors). Paths are the dot-joined keys ("layers.0.attn.
q_proj.kernel"); milo_jax.quant.config explains rules, rank policies, presets and the whole-model
bits-per-weight measure.

Steps: (1) every parameter is assigned its first matching rule; (2) budget configs run
quant.ranks.budget_ranks over the "milo" tensors (their bits and ranks), with the bytes of the
other tensors taken off the whole-model budget first; (3) each tensor is quantized with
quantize_tensor ("rtn" / "hqq") or quantize_lowrank ("milo"), its rank from the rule's policy;
(4) the report records every tensor's bytes and reconstruction error.

FrequencyRank needs routing counts: for a model they come from `model_routing_counts(model)`, random
tokens through the UNQUANTIZED model (calibration-free, as quant.ranks.collect_routing_counts
expects: one call per batch returning each MoE layer's top-k ids); for a params pytree pass
`routing_counts={layer: counts [E]}`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable, Dict, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from milo_jax.quant import ranks as rank_policies
from milo_jax.quant.api import quantize_tensor, resolve_group_size
from milo_jax.quant.config import (FrequencyRank, HiddenFractionRank, KurtosisRank, QuantConfig,
                                   TENSOR_CLASSES, Rule, as_config)
from milo_jax.quant.lowrank import quantize_lowrank
from milo_jax.quant.tensor import QuantizedTensor

_LAYER = re.compile(r"^layers\.(\d+)\.")
CALIBRATION = dict(batch=8, seq_len=64, seed=0)    # random tokens for routing counts


# ------------------------------------------------------------------------------------ recipes
@dataclasses.dataclass(frozen=True)
class Recipe:
    """How one tensor is quantized (a rule resolved for that tensor)."""
    method: str
    bits: int
    group_size: int
    ranks: Optional[np.ndarray]      # [...] per matrix ("milo"), else None
    compensator_dtype: str
    rounds: int
    tol: float
    rule_index: int


def layer_of(path: str) -> Optional[int]:
    m = _LAYER.match(path)
    return int(m.group(1)) if m else None


def resolve_ranks(path: str, w, rule: Rule, *, hidden_size: Optional[int] = None,
                  routing_counts: Optional[Mapping[int, np.ndarray]] = None) -> np.ndarray:
    """The rule's rank policy applied to W [..., K, N] -> int ranks [...] (capped at min(K, N))."""
    shape = tuple(w.shape)
    lead, cap = shape[:-2], min(shape[-2:])
    pol = rule.rank
    if isinstance(pol, int):
        r = np.full(lead, pol)
    elif isinstance(pol, KurtosisRank):
        r = rank_policies.kurtosis_rank(rank_policies.excess_kurtosis(w), c=pol.c, cap=pol.cap)
    elif isinstance(pol, HiddenFractionRank):
        if hidden_size is None:
            raise ValueError(f"{path}: HiddenFractionRank needs the hidden size (pass hidden_size= "
                             "for a params pytree without embed_tokens.embedding)")
        r = np.full(lead, int(round(pol.fraction * hidden_size)))
    elif isinstance(pol, FrequencyRank):
        layer = layer_of(path)
        if len(shape) != 3:
            raise ValueError(f"{path}: FrequencyRank applies to stacked experts [E, K, N], got "
                             f"shape {shape}")
        if routing_counts is None or layer not in routing_counts:
            raise ValueError(f"{path}: FrequencyRank needs routing counts for layer {layer} "
                             "(pass routing_counts={layer: counts [E]} for a params pytree)")
        counts = np.asarray(routing_counts[layer]).reshape(1, -1)
        if counts.shape[1] != shape[0]:
            raise ValueError(f"{path}: routing counts for {counts.shape[1]} experts, tensor has "
                             f"{shape[0]}")
        top = cap if pol.max_rank is None else min(cap, pol.max_rank)
        r = rank_policies.frequency_ranks(counts, pol.mean_rank, step=pol.step, max_rank=top)[0]
    else:  # Rule validates the policy type
        raise ValueError(f"{path}: unknown rank policy {pol!r}")
    return np.minimum(np.asarray(r, np.int64).reshape(lead), cap)


def recipe_for(path: str, w, rule: Rule, rule_index: int, *, hidden_size=None, routing_counts=None,
               budget_entry=None) -> Recipe:
    """Resolve `rule` for the tensor W at `path`. budget_entry: a quant.ranks.TensorPlan that
    overrides bits, group size and ranks (budget configs)."""
    k = w.shape[-2]
    if budget_entry is not None:
        return Recipe("milo", budget_entry.bits, budget_entry.group_size,
                      np.asarray(budget_entry.ranks, np.int64), rule.compensator_dtype, rule.rounds,
                      rule.tol, rule_index)
    ranks = (resolve_ranks(path, w, rule, hidden_size=hidden_size, routing_counts=routing_counts)
             if rule.method == "milo" else None)
    return Recipe(rule.method, rule.bits, resolve_group_size(k, rule.group_size), ranks,
                  rule.compensator_dtype, rule.rounds, rule.tol, rule_index)


def quantize_with(path: str, w, recipe: Recipe) -> QuantizedTensor:
    """Quantize W [..., K, N] as `recipe` says (ValueError names the path)."""
    try:
        if recipe.method == "milo":
            return quantize_lowrank(w, rank=recipe.ranks, bits=recipe.bits,
                                    group_size=recipe.group_size,
                                    compensator_dtype=recipe.compensator_dtype,
                                    rounds=recipe.rounds, tol=recipe.tol)
        return quantize_tensor(w, bits=recipe.bits, group_size=recipe.group_size,
                               method=recipe.method)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


# ------------------------------------------------------------------------------------ report
def leaf_nbytes(value) -> int:
    """Bytes of a parameter as stored: every array leaf (a QuantizedTensor: all of them)."""
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
               for x in jax.tree_util.tree_leaves(value))


def logical_size(value) -> int:
    return math.prod(value.shape)


@dataclasses.dataclass(frozen=True)
class TensorReport:
    """One quantized tensor: method, bits, ranks, bytes of every leaf, reconstruction error."""
    path: str
    shape: tuple
    method: str
    bits: int
    group_size: int
    ranks: tuple                 # per matrix, row-major over the expert axes (() for rtn/hqq)
    compensator_dtype: Optional[str]
    num_weights: int
    nbytes: int                  # codes + scales + zeros + compensator factors (+ their scales)
    mean_abs_err: float          # mean |W - W_hat|, float32
    rel_fro_err: float           # ||W - W_hat||_F / ||W||_F
    fro_err: float = 0.0         # ||W - W_hat||_F

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / self.num_weights

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(shape=list(self.shape), ranks=list(self.ranks), bits_per_weight=self.bits_per_weight)
        return d

    @staticmethod
    def from_dict(d: dict) -> "TensorReport":
        fields = {f.name for f in dataclasses.fields(TensorReport)}
        d = {k: v for k, v in d.items() if k in fields}
        return TensorReport(**dict(d, shape=tuple(d["shape"]), ranks=tuple(d["ranks"])))


@dataclasses.dataclass(frozen=True)
class UntouchedReport:
    path: str
    shape: tuple
    dtype: str
    num_weights: int
    nbytes: int


@dataclasses.dataclass(frozen=True)
class QuantizationReport:
    """What quantize did, over EVERY parameter.

    bits_per_weight: whole model, 8 * (quantized tensors' bytes, every leaf, + untouched
    parameters' bytes at their stored width) / all logical weights.
    quantized_bits_per_weight: the same over the quantized tensors only.
    """
    config_name: str
    tensors: tuple               # TensorReport, parameter order
    untouched: tuple             # UntouchedReport, parameter order

    @property
    def quantized_weights(self) -> int:
        return sum(t.num_weights for t in self.tensors)

    @property
    def quantized_nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def total_weights(self) -> int:
        return self.quantized_weights + sum(u.num_weights for u in self.untouched)

    @property
    def total_nbytes(self) -> int:
        return self.quantized_nbytes + sum(u.nbytes for u in self.untouched)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.total_nbytes / self.total_weights

    @property
    def quantized_bits_per_weight(self) -> float:
        return 8.0 * self.quantized_nbytes / max(self.quantized_weights, 1)

    @property
    def mean_abs_err(self) -> float:
        """Weight-count-weighted mean |W - W_hat| over the quantized tensors."""
        return sum(t.mean_abs_err * t.num_weights for t in self.tensors) / max(self.quantized_weights, 1)

    def tensor(self, path: str) -> TensorReport:
        for t in self.tensors:
            if t.path == path:
                return t
        raise KeyError(path)

    def to_dict(self) -> dict:
        return {"config": self.config_name, "bits_per_weight": self.bits_per_weight,
                "quantized_bits_per_weight": self.quantized_bits_per_weight,
                "total_weights": self.total_weights, "total_nbytes": self.total_nbytes,
                "quantized_weights": self.quantized_weights,
                "quantized_nbytes": self.quantized_nbytes, "mean_abs_err": self.mean_abs_err,
                "tensors": [t.to_dict() for t in self.tensors],
                "untouched": [dict(dataclasses.asdict(u), shape=list(u.shape))
                              for u in self.untouched]}

    @staticmethod
    def from_dict(d: dict) -> "QuantizationReport":
        return QuantizationReport(
            d.get("config", "custom"), tuple(TensorReport.from_dict(t) for t in d["tensors"]),
            tuple(UntouchedReport(**dict(u, shape=tuple(u["shape"]))) for u in d["untouched"]))

    def summary(self) -> str:
        return (f"{self.config_name}: {len(self.tensors)} tensors quantized, "
                f"{self.bits_per_weight:.4f} bits per weight over the whole model "
                f"({self.total_weights} weights, {self.total_nbytes} bytes), "
                f"{self.quantized_bits_per_weight:.4f} over the quantized tensors only, "
                f"mean |W - W_hat| {self.mean_abs_err:.3g}")


@jax.jit
def _errors(w, w_hat):
    d = w.astype(jnp.float32) - w_hat
    fro = jnp.linalg.norm(d)
    return jnp.mean(jnp.abs(d)), fro / jnp.maximum(jnp.linalg.norm(w.astype(jnp.float32)),
                                                   jnp.finfo(jnp.float32).tiny), fro


def tensor_report(path: str, w, qt: QuantizedTensor, recipe: Recipe) -> TensorReport:
    mae, rel, fro = jax.device_get(_errors(jnp.asarray(w), qt.dequantize(jnp.float32)))
    ranks = () if recipe.ranks is None else tuple(int(r) for r in np.asarray(recipe.ranks).reshape(-1))
    return TensorReport(path, tuple(w.shape), recipe.method, recipe.bits, recipe.group_size, ranks,
                        recipe.compensator_dtype if recipe.method == "milo" else None,
                        logical_size(w), leaf_nbytes(qt), float(mae), float(rel), float(fro))


def untouched_report(path: str, value) -> UntouchedReport:
    dt = value.dtype if not isinstance(value, QuantizedTensor) else value.dtype
    return UntouchedReport(path, tuple(value.shape), jnp.dtype(dt).name, logical_size(value),
                           leaf_nbytes(value))


# ------------------------------------------------------------------------------------ budget
def budget_importance(config: QuantConfig, paths, shapes: Mapping[str, tuple],
                      experts_per_token: Optional[int]) -> dict:
    """{path: weight} for budget_ranks: routed experts' 1 / (top_k * E) under "routing" weighting
    ({} under "uniform"). Raises ValueError when routed experts are present but top_k is unknown."""
    if config.budget_weighting == "uniform":
        return {}
    routed = re.compile(TENSOR_CLASSES["routed_experts"])
    out = {}
    for p in paths:
        shape = tuple(shapes[p])
        if routed.search(p) and len(shape) >= 3:
            if not experts_per_token:
                raise ValueError(f"{config.name}: budget_weighting='routing' needs the number of "
                                 f"experts per token for {p} (pass experts_per_token=, the model "
                                 "config's num_experts_per_tok, or use budget_weighting='uniform')")
            out[p] = rank_policies.routing_importance(int(shape[0]), int(experts_per_token))
    return out


def budget_plan(config: QuantConfig, milo_weights: Mapping[str, object], *, other_nbytes: int,
                total_weights: int, experts_per_token: Optional[int] = None):
    """quant.ranks.budget_ranks over the "milo" tensors with the whole-model budget minus
    `other_nbytes` (untouched parameters and rtn/hqq tensors). milo_weights may be a lazy mapping
    (each W read on access). Returns {path: ranks.TensorPlan} ({} when there are none)."""
    if not milo_weights:
        return {}
    x = config.budget_bits_per_weight
    dtypes = {config.rule_for(p).compensator_dtype for p in milo_weights}
    if len(dtypes) != 1:
        raise ValueError(f"{config.name}: budget configs need one compensator dtype for every "
                         f"milo rule, got {sorted(dtypes)}")
    shapes = {p: _Shape(milo_weights, p).shape for p in milo_weights}
    importance = budget_importance(config, list(milo_weights), shapes, experts_per_token)
    milo_count = sum(math.prod(shape) for shape in shapes.values())
    avail = math.floor(x * total_weights / 8.0 + 1e-9) - other_nbytes
    target = 8.0 * avail / milo_count
    try:
        plan = rank_policies.budget_ranks(milo_weights, target_bits_per_weight=target,
                                          candidates=config.budget_candidates,
                                          compensator_dtype=dtypes.pop(),
                                          rank_step=config.budget_rank_step,
                                          importance=importance)
    except ValueError as e:
        raise ValueError(f"{config.name}: a whole-model budget of {x} bits per weight leaves "
                         f"{target:.4f} bits per weight for the quantized tensors after "
                         f"{other_nbytes} bytes of untouched / rtn / hqq parameters: {e}") from None
    return dict(plan.tensors)


class _Shape:
    """Shape of milo_weights[p] without keeping the array (lazy mappings may load it)."""

    def __init__(self, weights, path):
        shapes = getattr(weights, "shapes", None)
        self.shape = tuple(shapes[path]) if shapes is not None else tuple(weights[path].shape)


def other_budget_nbytes(config: QuantConfig, params: Mapping[str, object]) -> int:
    """Bytes of every parameter that the budget does not allocate: untouched ones as stored and
    rtn / hqq tensors exactly as quantize_tensor stores them. params: {path: array-like with
    .shape and .dtype} (shapes suffice)."""
    total = 0
    for path, w in params.items():
        rule = config.rule_for(path)
        if rule is None or isinstance(w, QuantizedTensor):
            total += (leaf_nbytes(w) if isinstance(w, QuantizedTensor)
                      else logical_size(w) * jnp.dtype(w.dtype).itemsize)
        elif rule.method != "milo":
            k, n = w.shape[-2:]
            g = resolve_group_size(k, rule.group_size)
            total += math.prod(w.shape[:-2]) * rank_policies.base_nbytes(k, n, rule.bits, g)
    return total


# ------------------------------------------------------------------------------------ routing
def decoder_layer_step(layer, x, positions):
    """One decoder layer (milo_jax.models.decoder.DecoderLayer) on x [B, S, H] without a cache,
    also returning the router's top-k ids [B*S, k] (None for a dense layer). Mirrors
    DecoderLayer.__call__ so the router sees exactly its input."""
    h, _ = layer.attn(layer.input_norm(x), positions, None)
    x = x + h
    y = layer.post_attn_norm(x)
    router = getattr(layer.mlp, "router", None)
    ids = None if router is None else router(y.reshape(-1, y.shape[-1]))[1]
    return x + layer.mlp(y), ids


_layer_step_jit = nnx.jit(decoder_layer_step)


def calibration_tokens(vocab_size: int, *, batch: int = CALIBRATION["batch"],
                       seq_len: int = CALIBRATION["seq_len"], seed: int = CALIBRATION["seed"]):
    """Random tokens [batch, seq_len] int32 (quant.ranks.random_token_batches)."""
    return next(rank_policies.random_token_batches(vocab_size, batch=batch, seq_len=seq_len,
                                                   num_batches=1, seed=seed))


def model_routing_counts(model, *, batch: int = CALIBRATION["batch"], seq_len: int = CALIBRATION["seq_len"],
                   seed: int = CALIBRATION["seed"]) -> Dict[int, np.ndarray]:
    """{layer: expert selection counts [E]} of every MoE layer for random tokens through `model`."""
    moe = [i for i, layer in enumerate(model.layers) if hasattr(layer.mlp, "router")]

    def router_topk(tokens):
        b, s = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        x = model.embed_tokens(jnp.asarray(tokens)).astype(model.dtype)
        out = []
        for layer in model.layers:
            x, ids = _layer_step_jit(layer, x, positions)
            if ids is not None:
                out.append(np.asarray(ids))
        return out

    tokens = calibration_tokens(model.config.vocab_size, batch=batch, seq_len=seq_len, seed=seed)
    counts = rank_policies.collect_routing_counts(router_topk, [tokens], len(moe),
                                                  model.config.num_experts)
    return {layer: counts[j] for j, layer in enumerate(moe)}


# ------------------------------------------------------------------------------------ trees
def flatten_dict(tree, prefix=()) -> list:
    """Nested dicts (string keys) -> [(key tuple, leaf)]; leaves are arrays or QuantizedTensors."""
    if isinstance(tree, QuantizedTensor) or not isinstance(tree, Mapping):
        if not prefix:
            raise ValueError(f"params must be a nested dict of arrays, got {type(tree).__name__}")
        return [(prefix, tree)]
    out = []
    for k, v in tree.items():
        if not isinstance(k, str):
            raise ValueError(f"params: key {k!r} under {'.'.join(prefix) or '<root>'} is not a "
                             "string; expected a nested dict with string keys")
        out.extend(flatten_dict(v, prefix + (k,)))
    return out


def unflatten_dict(items) -> dict:
    root: dict = {}
    for keys, v in items:
        d = root
        for k in keys[:-1]:
            d = d.setdefault(k, {})
        d[keys[-1]] = v
    return root


def _dotted(path) -> str:
    return ".".join(str(p) for p in path)


def _is_model(obj) -> bool:
    return isinstance(obj, nnx.Module)


def split_params(model_or_params):
    """-> (names [str], values [...], rebuild(new_values_by_name) -> same kind as the input)."""
    if _is_model(model_or_params):
        graphdef, state = nnx.split(model_or_params)
        flat = list(nnx.to_flat_state(state))
        params = [(p, v) for p, v in flat if isinstance(v, nnx.Param)]

        def rebuild(new):
            items = [(p, v.replace(new[_dotted(p)]) if _dotted(p) in new else v) for p, v in flat]
            return nnx.merge(graphdef, nnx.from_flat_state(items))

        return [_dotted(p) for p, _ in params], [v.get_value() for _, v in params], rebuild
    items = flatten_dict(model_or_params)

    def rebuild(new):
        return unflatten_dict([(k, new.get(".".join(k), v)) for k, v in items])

    return [".".join(k) for k, _ in items], [v for _, v in items], rebuild


# ------------------------------------------------------------------------------------ quantize
def quantize(model_or_params, config, *, strict: bool = False, hidden_size: Optional[int] = None,
             routing_counts: Optional[Mapping[int, np.ndarray]] = None,
             experts_per_token: Optional[int] = None,
             progress: Optional[Callable[[str], None]] = None):
    """(quantized, QuantizationReport): see the module docstring.

    config: a QuantConfig or a preset name (quant.config.preset). strict=True: every rule must be
    the first match of at least one parameter (ValueError naming the first that is not). Raises ValueError when
    no parameter is quantized at all, or a matching parameter is already a QuantizedTensor.
    hidden_size: for HiddenFractionRank (default: the model's, or embed_tokens.embedding's width).
    experts_per_token: top-k of the routers, for budget configs' "routing" weighting (default: the
    model's num_experts_per_tok; required for a params pytree with routed experts).
    progress: called with each path before it is quantized.
    """
    config = as_config(config)
    names, values, rebuild = split_params(model_or_params)
    is_model = _is_model(model_or_params)
    if hidden_size is None:
        if is_model:
            hidden_size = model_or_params.config.hidden_size
        elif "embed_tokens.embedding" in names:
            hidden_size = values[names.index("embed_tokens.embedding")].shape[-1]
    if strict:
        hit = {config.first_match(n) for n in names}
        for i, rule in enumerate(config.rules):
            if i not in hit:
                raise ValueError(f"{config.name}: rule {i} (pattern {rule.pattern!r}, regex "
                                 f"{rule.regex!r}) matches no parameter (strict=True; a rule "
                                 "counts only where it is the first match)")
    chosen = {}
    for name, value in zip(names, values):
        rule = config.rule_for(name)
        if rule is None:
            continue
        if isinstance(value, QuantizedTensor):
            raise ValueError(f"{name} (shape {value.shape}) is already quantized; rule "
                             f"{rule.pattern!r} matches it")
        if value.ndim < 2:
            raise ValueError(f"{name}: rule {rule.pattern!r} matches a {value.ndim}-D parameter of "
                             f"shape {tuple(value.shape)}; only [..., K, N] weights can be quantized")
        chosen[name] = rule
    if not chosen:
        raise ValueError(f"{config.name}: no rule matches any parameter of the "
                         f"{'model' if is_model else 'params'} ({len(names)} parameters, e.g. "
                         f"{names[:3]})")
    by_name = dict(zip(names, values))
    budget = {}
    if config.budget_bits_per_weight is not None:
        milo = {n: by_name[n] for n, r in chosen.items() if r.method == "milo"}
        if experts_per_token is None and is_model:
            experts_per_token = getattr(model_or_params.config, "num_experts_per_tok", None)
        budget = budget_plan(config, milo, other_nbytes=other_budget_nbytes(config, by_name),
                             total_weights=sum(logical_size(v) for v in values),
                             experts_per_token=experts_per_token)
    needs_counts = any(isinstance(r.rank, FrequencyRank) for r in chosen.values()) and not budget
    if needs_counts and routing_counts is None:
        if not is_model:
            raise ValueError(f"{config.name}: FrequencyRank needs routing_counts= for a params pytree")
        routing_counts = model_routing_counts(model_or_params)
    new, reports, untouched = {}, [], []
    for name, value in zip(names, values):
        rule = chosen.get(name)
        if rule is None:
            untouched.append(untouched_report(name, value))
            continue
        if progress is not None:
            progress(name)
        recipe = recipe_for(name, value, rule, config.rules.index(rule), hidden_size=hidden_size,
                            routing_counts=routing_counts, budget_entry=budget.get(name))
        qt = quantize_with(name, value, recipe)
        reports.append(tensor_report(name, value, qt, recipe))
        new[name] = qt
    report = QuantizationReport(config.name, tuple(reports), tuple(untouched))
    return rebuild(new), report


__all__ = ["quantize", "QuantizationReport", "TensorReport", "UntouchedReport", "Recipe",
           "recipe_for", "quantize_with", "model_routing_counts", "budget_plan", "split_params",
           "flatten_dict", "unflatten_dict", "decoder_layer_step", "calibration_tokens"]
