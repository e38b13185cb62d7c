"""`ModelConfig`: the parsed, frozen, hashable description of a decoder-only MoE model.

Every field changes the math (or the shapes). Architecture-specific hyper-parameters that only one
attention/router kind reads (e.g. MLA's `kv_lora_rank`, DeepSeek's `n_group`) go into `extra`, a
hashable mapping read with `config.extra_get(name, default)`. The raw HF config.json dict is kept in
`hf_config` (excluded from hashing and equality so the config can be static metadata under jit).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, Optional, Tuple, Union


class FrozenDict(dict):
    """A dict that is hashable (by its JSON text) and refuses mutation; values must be JSON-able."""

    def __hash__(self):  # type: ignore[override]
        return hash(json.dumps(self, sort_keys=True, default=str))

    def _readonly(self, *a, **k):
        raise TypeError("FrozenDict is read-only")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _readonly  # type: ignore


def freeze(value: Any) -> Any:
    """Recursively turn dicts into FrozenDict and lists into tuples (hashable config values)."""
    if isinstance(value, Mapping):
        return FrozenDict({k: freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    return value


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    # ---- identity and sizes ----
    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    bos_token_id: Optional[int] = None
    eos_token_id: Union[int, Tuple[int, ...], None] = None
    pad_token_id: Optional[int] = None
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False

    # ---- attention (pluggable: models.registry.ATTENTION[attention_kind]) ----
    attention_kind: str = "gqa"
    qkv_bias: bool = False             # bias on q/k/v projections
    o_bias: bool = False               # bias on the output projection
    qk_norm: Optional[str] = None      # None | "head" (RMSNorm over head_dim, Qwen3) | "full" (over the projection, OLMoE)
    clip_qkv: Optional[float] = None   # clamp q, k, v to [-clip, clip] after projection (OLMoE)
    # per layer: None (full causal) or window w (a query at p sees keys at j with p - w < j <= p)
    sliding_windows: Tuple[Optional[int], ...] = ()
    rope_theta: float = 10000.0
    rope_scaling: Optional[FrozenDict] = None   # HF rope_scaling / rope_parameters minus rope_theta; None = default

    # ---- MLP per layer: "dense" or "moe" ----
    mlp_kinds: Tuple[str, ...] = ()
    intermediate_size: int = 0         # dense MLP width
    moe_intermediate_size: int = 0     # routed expert width
    num_experts: int = 0
    num_experts_per_tok: int = 0
    router_kind: str = "softmax_topk"  # pluggable: models.registry.ROUTERS[router_kind]
    norm_topk_prob: bool = False       # renormalise the top-k softmax weights to sum to 1
    shared_expert_intermediate_size: int = 0   # 0 = no shared expert
    shared_expert_gate: bool = False   # sigmoid(x @ w_gate [H, 1]) scales the shared expert (Qwen2-MoE)

    # ---- kind-specific hyper-parameters (hashable) and the raw HF config ----
    extra: FrozenDict = dataclasses.field(default_factory=FrozenDict)
    hf_config: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False,
                                                     repr=False)

    def __post_init__(self):
        n = self.num_hidden_layers
        if not self.sliding_windows:
            object.__setattr__(self, "sliding_windows", (None,) * n)
        if not self.mlp_kinds:
            object.__setattr__(self, "mlp_kinds", ("moe",) * n)
        object.__setattr__(self, "extra", freeze(dict(self.extra)))
        if self.rope_scaling is not None:
            object.__setattr__(self, "rope_scaling", freeze(dict(self.rope_scaling)))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if len(self.sliding_windows) != n or len(self.mlp_kinds) != n:
            raise ValueError(f"sliding_windows ({len(self.sliding_windows)}) and mlp_kinds "
                             f"({len(self.mlp_kinds)}) must have num_hidden_layers={n} entries")
        bad = [k for k in self.mlp_kinds if k not in ("dense", "moe")]
        if bad:
            raise ValueError(f"mlp_kinds entries must be 'dense' or 'moe', got {bad}")
        if self.num_attention_heads % max(self.num_key_value_heads, 1):
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")

    def extra_get(self, name: str, default: Any = None) -> Any:
        return self.extra.get(name, default)

    @property
    def eos_token_ids(self) -> Tuple[int, ...]:
        """eos_token_id as a tuple (empty when None)."""
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)
