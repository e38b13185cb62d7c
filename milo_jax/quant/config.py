r"""Quantization configs: ordered rules on parameter paths, rank policies and presets.

    config = QuantConfig((Rule("attention", method="milo", rank=HiddenFractionRank(1 / 8)),
                          Rule("routed_experts", method="milo", rank=KurtosisRank(c=2)),
                          Rule(r"layers\.0\.", skip=True)))          # any regex works too
    config = QuantConfig.preset("milo-3bit-s1")  # or "rtn-3bit", "hqq-3bit", "milo-3.75bpw", ...

Matching (like google/qwix): every parameter's dotted path (e.g. "layers.0.attn.q_proj.kernel",
"layers.3.mlp.experts.down_proj"; milo_jax/models/__init__.py lists them) is tested against the
rules IN ORDER with `re.search`; the first rule that matches decides (quantize as it says, or leave
the parameter alone when `skip=True`). No match: the parameter stays as it is. A rule's `pattern`
is a regex, or one of the named tensor classes in TENSOR_CLASSES (so users need not write regexes):
    attention       GQA q/k/v/o projections and MLA q/q_a/q_b/kv_a/kv_b/o projections (kernels)
    routed_experts  stacked experts  layers.{i}.mlp.experts.{gate,up,down}_proj  [E, K, N]
    shared_experts  layers.{i}.mlp.shared_expert.{gate,up,down}_proj.kernel
    dense_mlp       layers.{i}.mlp.{gate,up,down}_proj.kernel (dense layers)
None of them matches the router (mlp.router.gate.kernel), the shared-expert gate, biases, norms,
embeddings or the lm_head, so those stay untouched unless a user rule names them.

Rank policies (`Rule.rank`, only for method "milo"): an int (that rank for every matrix) or
    KurtosisRank(c, cap)          MiLo's kurtosis mapping per matrix (quant.ranks.kurtosis_rank)
    FrequencyRank(mean_rank)      stacked experts by routing frequency, layer mean kept
                                  (quant.ranks.frequency_ranks); counts from random tokens
    HiddenFractionRank(fraction)  round(fraction * hidden_size), capped at min(K, N)
Every rank is capped at min(K, N).

Presets (QuantConfig.preset(name)); all use a 3-bit, group-64 base (HQQ unless said otherwise) and
quantize the four tensor classes above:
    rtn-3bit       round-to-nearest min-max, g64
    hqq-3bit       HQQ, g64
    milo-3bit-s1   MiLo: experts KurtosisRank(c=2) ("s1", mean rank 16 on Mixtral),
                   attention / shared experts / dense MLPs HiddenFractionRank(1/8), bf16 factors
    milo-3bit-s2   the same with c=3 ("s2", mean rank 32)
    milo-<X>bpw    MiLo with ranks and base bits (3 or 4, g64) chosen by quant.ranks.budget_ranks so
                   that the WHOLE-MODEL bits per weight is at most X (e.g. "milo-3.75bpw").
Dense rank: the MiLo paper uses rank 512 for Mixtral-8x7B's attention (hidden 4096); we keep that
ratio, rank = hidden_size / 8 (Mixtral: 512, DeepSeek-V3's 7168: 896, a 64-wide test model: 8),
capped at each matrix's min(K, N) (Mixtral's k/v projections [4096, 1024] keep 512). The paper's
DeepSeek setup also gives this "dense" rank to shared experts and the dense first-layer MLP.

Whole-model bits per weight (the budget's measure, and QuantizationReport.bits_per_weight):
    8 * (bytes of every parameter as stored) / (number of logical weights of every parameter)
where a quantized tensor's bytes are all its leaves (codes, scales, zeros, compensator factors and
their scales) and an untouched parameter's bytes are its array's (its stored dtype: 2 bytes per
weight in bf16, 4 in float32).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional, Tuple, Union

from milo_jax.quant import compensator, packing

METHODS = ("rtn", "hqq", "milo")
SUPPORTED_GROUP_SIZES = (32, 64, 128)

TENSOR_CLASSES = {
    "attention": r"^layers\.\d+\.attn\.(q|k|v|o|q_a|q_b|kv_a|kv_b)_proj\.kernel$",
    "routed_experts": r"^layers\.\d+\.mlp\.experts\.(gate|up|down)_proj$",
    "shared_experts": r"^layers\.\d+\.mlp\.shared_experts?\.(gate|up|down)_proj\.kernel$",
    "dense_mlp": r"^layers\.\d+\.mlp\.(gate|up|down)_proj\.kernel$",
}

DENSE_RANK_FRACTION = 1 / 8        # MiLo's rank 512 at Mixtral's hidden size 4096
BUDGET_CANDIDATES = ((3, 64), (4, 64))
BUDGET_WEIGHTINGS = ("routing", "uniform")


# ------------------------------------------------------------------------------------ policies
@dataclasses.dataclass(frozen=True)
class KurtosisRank:
    """rank = 0 if round(k) < 1 else min(2^(round(k) + c), cap), k = excess kurtosis per matrix."""
    c: int = 2
    cap: int = 1024


@dataclasses.dataclass(frozen=True)
class FrequencyRank:
    """Stacked experts: ranks proportional to routing counts, each layer's mean rank = mean_rank
    (multiples of `step`, at most max_rank). Counts: random tokens through the model (no data)."""
    mean_rank: float = 16
    step: int = 1
    max_rank: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class HiddenFractionRank:
    """rank = round(fraction * hidden_size) for every matrix (capped at min(K, N))."""
    fraction: float = DENSE_RANK_FRACTION


RankPolicy = Union[int, KurtosisRank, FrequencyRank, HiddenFractionRank]
_POLICIES = (KurtosisRank, FrequencyRank, HiddenFractionRank)


# ------------------------------------------------------------------------------------ rules
@dataclasses.dataclass(frozen=True)
class Rule:
    """One rule: parameters whose path matches `pattern` (regex or TENSOR_CLASSES name) get
    method ("rtn" | "hqq" | "milo") at `bits` with groups of `group_size` along K, and for "milo"
    a rank policy and compensator storage dtype; `skip=True` leaves them untouched.
    rounds / tol: MiLo's alternation limits (quant.lowrank.quantize_lowrank)."""
    pattern: str
    method: str = "hqq"
    bits: int = 3
    group_size: Optional[int] = 64
    rank: RankPolicy = 0
    compensator_dtype: str = "bfloat16"
    skip: bool = False
    rounds: int = 20
    tol: float = 1e-4

    def __post_init__(self):
        where = f"Rule({self.pattern!r})"
        if not isinstance(self.pattern, str) or not self.pattern:
            raise ValueError(f"{where}: pattern must be a non-empty string")
        try:
            re.compile(self.regex)
        except re.error as e:
            raise ValueError(f"{where}: invalid regex: {e}") from None
        if self.skip:
            return
        if self.method not in METHODS:
            raise ValueError(f"{where}: unknown method {self.method!r}; expected one of {METHODS}")
        if self.bits not in packing.SUPPORTED_BITS:
            raise ValueError(f"{where}: bits={self.bits} is not supported; supported: "
                             f"{packing.SUPPORTED_BITS}")
        if self.group_size not in (None, -1) and self.group_size not in SUPPORTED_GROUP_SIZES:
            raise ValueError(f"{where}: group_size={self.group_size} is not supported; supported: "
                             f"{SUPPORTED_GROUP_SIZES} or None (per channel)")
        if self.compensator_dtype not in compensator.COMPENSATOR_DTYPES:
            raise ValueError(f"{where}: compensator_dtype={self.compensator_dtype!r} is not "
                             f"supported; expected one of {compensator.COMPENSATOR_DTYPES}")
        r = self.rank
        if isinstance(r, bool) or not (isinstance(r, int) or isinstance(r, _POLICIES)):
            raise ValueError(f"{where}: rank must be an int or one of "
                             f"{[p.__name__ for p in _POLICIES]}, got {r!r}")
        if isinstance(r, int) and r < 0:
            raise ValueError(f"{where}: rank must be >= 0, got {r}")
        if self.method != "milo" and r != 0:
            raise ValueError(f"{where}: a rank ({r!r}) needs method='milo', got {self.method!r}")
        if self.rounds < 1 or not self.tol >= 0:
            raise ValueError(f"{where}: need rounds >= 1 and tol >= 0, got {self.rounds}, {self.tol}")

    @property
    def regex(self) -> str:
        return TENSOR_CLASSES.get(self.pattern, self.pattern)

    def matches(self, path: str) -> bool:
        return re.search(self.regex, path) is not None


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """An ordered tuple of rules (first match wins) and, optionally, a whole-model budget.

    budget_bits_per_weight: when set, every tensor of a "milo" rule gets its base bits / group
    size from `budget_candidates` and its ranks from quant.ranks.budget_ranks (the rules' own
    bits and rank are ignored for those tensors) so that the whole-model bits per weight (module
    docstring) is at most the budget. budget_weighting: "routing" (default) weighs a routed
    expert's squared error by quant.ranks.routing_importance (1 / (top_k * num_experts): the share
    of the output an expert's error reaches) against the dense tensors'; "uniform": plain sum of
    squared weight errors. name: for reports ("custom" unless a preset)."""
    rules: Tuple[Rule, ...]
    budget_bits_per_weight: Optional[float] = None
    budget_candidates: Tuple[Tuple[int, int], ...] = BUDGET_CANDIDATES
    budget_rank_step: int = 8
    budget_weighting: str = "routing"
    name: str = "custom"

    def __post_init__(self):
        rules = tuple(self.rules)
        if not rules or not all(isinstance(r, Rule) for r in rules):
            raise ValueError(f"QuantConfig needs a non-empty sequence of Rule, got {self.rules!r}")
        object.__setattr__(self, "rules", rules)
        b = self.budget_bits_per_weight
        if b is not None and not (b > 0):
            raise ValueError(f"QuantConfig: budget_bits_per_weight must be > 0, got {b}")
        if self.budget_weighting not in BUDGET_WEIGHTINGS:
            raise ValueError(f"QuantConfig: budget_weighting must be one of {BUDGET_WEIGHTINGS}, "
                             f"got {self.budget_weighting!r}")
        for bits, g in self.budget_candidates:
            if bits not in packing.SUPPORTED_BITS or g not in SUPPORTED_GROUP_SIZES:
                raise ValueError(f"QuantConfig: budget candidate (bits={bits}, group_size={g}) "
                                 "is not supported")

    def rule_for(self, path: str) -> Optional[Rule]:
        """The first matching rule, or None (also None for a matching skip rule)."""
        for rule in self.rules:
            if rule.matches(path):
                return None if rule.skip else rule
        return None

    def first_match(self, path: str) -> Optional[int]:
        for i, rule in enumerate(self.rules):
            if rule.matches(path):
                return i
        return None

    @staticmethod
    def preset(name: str) -> "QuantConfig":
        return preset(name)

    def to_dict(self) -> dict:
        def rule_dict(r: Rule):
            d = dataclasses.asdict(r)
            d["rank"] = (r.rank if isinstance(r.rank, int)
                         else {"policy": type(r.rank).__name__, **dataclasses.asdict(r.rank)})
            return d
        return {"name": self.name, "rules": [rule_dict(r) for r in self.rules],
                "budget_bits_per_weight": self.budget_bits_per_weight,
                "budget_candidates": [list(c) for c in self.budget_candidates],
                "budget_rank_step": self.budget_rank_step,
                "budget_weighting": self.budget_weighting}


# ------------------------------------------------------------------------------------ presets
CLASSES = ("attention", "routed_experts", "shared_experts", "dense_mlp")
PRESETS = ("rtn-3bit", "hqq-3bit", "milo-3bit-s1", "milo-3bit-s2", "milo-<X>bpw")
_BUDGET = re.compile(r"^milo-(\d+(?:\.\d+)?)bpw$")


def preset(name: str) -> QuantConfig:
    """The named preset (module docstring). Raises ValueError naming an unknown preset."""
    if not isinstance(name, str):
        raise ValueError(f"preset name must be a string, got {name!r}")
    if name in ("rtn-3bit", "hqq-3bit"):
        method = name.split("-")[0]
        return QuantConfig(tuple(Rule(c, method=method, bits=3, group_size=64) for c in CLASSES),
                           name=name)
    if name in ("milo-3bit-s1", "milo-3bit-s2"):
        c = {"s1": 2, "s2": 3}[name[-2:]]
        dense = HiddenFractionRank(DENSE_RANK_FRACTION)
        rules = (Rule("attention", method="milo", rank=dense),
                 Rule("routed_experts", method="milo", rank=KurtosisRank(c=c, cap=1024)),
                 Rule("shared_experts", method="milo", rank=dense),
                 Rule("dense_mlp", method="milo", rank=dense))
        return QuantConfig(rules, name=name)
    m = _BUDGET.match(name)
    if m:
        x = float(m.group(1))
        rules = tuple(Rule(c, method="milo", bits=3, group_size=64) for c in CLASSES)
        return QuantConfig(rules, budget_bits_per_weight=x, name=name)
    raise ValueError(f"unknown preset {name!r}; known: {list(PRESETS)} (X a number, e.g. "
                     "'milo-3.75bpw')")


def as_config(config) -> QuantConfig:
    if isinstance(config, QuantConfig):
        return config
    if isinstance(config, str):
        return preset(config)
    raise ValueError(f"config must be a QuantConfig or a preset name, got {type(config).__name__}")


__all__ = ["QuantConfig", "Rule", "KurtosisRank", "FrequencyRank", "HiddenFractionRank",
           "TENSOR_CLASSES", "PRESETS", "preset", "as_config", "METHODS", "DENSE_RANK_FRACTION"]
