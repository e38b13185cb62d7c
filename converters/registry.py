"""Architecture registry: one ArchSpec per HF `model_type`.

An ArchSpec says how to read a config.json (`parse_config(hf_dict, source) -> ModelConfig`, which
must refuse fields that change the math and are not handled: use `ConfigReader`) and how HF tensor
names map onto the model's parameters (`rules`: KeyRule templates, used in both directions: loading
and export).

KeyRule(hf, target, kind): `hf` and `target` are templates with {i} (layer) and {e} (expert)
placeholders, e.g. "model.layers.{i}.self_attn.q_proj.weight" -> "layers.{i}.attn.q_proj.kernel".
Kinds:
  copy           tensor as is (norm scales, embeddings, biases)
  linear         HF nn.Linear weight [out, in] -> kernel [in, out]
  expert         one expert's [out, in] ({e} in hf) -> slot e of the stacked kernel [E, in, out]
  experts        stacked HF [E, out, in] -> [E, in, out]
  experts_gate_up  HF fused [E, 2I, H] (gate rows first, then up) -> target.gate_proj and
                 target.up_proj, each [E, H, I]   (target names the experts module)
Rules with export=False are accepted when loading but not written by export (alternative layouts).
`ignore` lists regexes of HF keys that carry no weights we need (e.g. rotary inv_freq buffers).

Other modules register more architectures with `register_arch(spec)` (DeepSeek:
converters/arch_deepseek.py, imported by `get_arch` when present).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import re
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

from converters.errors import CheckpointError

KINDS = ("copy", "linear", "expert", "experts", "experts_gate_up")


@dataclasses.dataclass(frozen=True)
class KeyRule:
    hf: str
    target: str
    kind: str = "linear"
    export: bool = True

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"KeyRule kind must be one of {KINDS}, got {self.kind!r}")

    @property
    def hf_regex(self) -> re.Pattern:
        return _template_regex(self.hf)

    @property
    def target_regex(self) -> re.Pattern:
        return _template_regex(self.target)


def _template_regex(template: str) -> re.Pattern:
    pattern = re.escape(template)
    for name in ("i", "e"):
        pattern = pattern.replace(re.escape("{" + name + "}"), f"(?P<{name}>\\d+)")
    return re.compile(pattern + r"\Z")


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    model_type: str
    parse_config: Callable[[dict, str], Any]
    rules: Tuple[KeyRule, ...]
    ignore: Tuple[str, ...] = ()
    architectures: Tuple[str, ...] = ()     # HF class names written to config.json on export

    def match(self, hf_key: str) -> Optional[Tuple[KeyRule, Dict[str, int]]]:
        for rule in self.rules:
            m = rule.hf_regex.match(hf_key)
            if m:
                return rule, {k: int(v) for k, v in m.groupdict().items()}
        return None

    def ignored(self, hf_key: str) -> bool:
        return any(re.search(p, hf_key) for p in self.ignore)


_ARCHS: Dict[str, ArchSpec] = {}
# modules that register architectures when imported (optional ones are imported when present)
_BUILTIN_MODULES = ("converters.arch_moe",)
_OPTIONAL_MODULES = ("converters.arch_deepseek",)
_loaded = False


def register_arch(spec: ArchSpec) -> ArchSpec:
    _ARCHS[spec.model_type] = spec
    return spec


def _load_all():
    global _loaded
    if _loaded:
        return
    _loaded = True
    for name in _BUILTIN_MODULES:
        importlib.import_module(name)
    for name in _OPTIONAL_MODULES:
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name)


def get_arch(model_type: Optional[str], source: str = "config.json") -> ArchSpec:
    _load_all()
    if model_type not in _ARCHS:
        raise CheckpointError(f"{source}: model_type {model_type!r} is not a supported architecture "
                              f"(supported: {sorted(_ARCHS)})")
    return _ARCHS[model_type]


def supported_architectures() -> list:
    _load_all()
    return sorted(_ARCHS)


# ---------------------------------------------------------------------------------------------
# config allowlist

# Fields of HF's PretrainedConfig and generation settings that never change a forward pass.
NO_MATH_FIELDS = frozenset({
    "architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "_name_or_path",
    "use_cache", "output_router_logits", "router_aux_loss_coef", "initializer_range",
    "attention_dropout", "return_dict", "output_hidden_states", "output_attentions", "torchscript",
    "use_bfloat16", "tf_legacy_loss", "pruned_heads", "chunk_size_feed_forward",
    "is_encoder_decoder", "is_decoder", "add_cross_attention", "tie_encoder_decoder",
    "cross_attention_hidden_size", "max_length", "min_length", "do_sample", "early_stopping",
    "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p",
    "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id",
    "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens", "finetuning_task", "id2label", "label2id", "tokenizer_class",
    "prefix", "sep_token_id", "decoder_start_token_id", "task_specific_params", "problem_type",
    "_attn_implementation", "_attn_implementation_autoset", "_commit_hash", "gradient_checkpointing",
})


class ConfigReader:
    """Reads config.json fields, remembering which were consumed; `finish()` refuses the rest.

    `allow` names extra fields of this architecture known not to change the math.
    """

    def __init__(self, hf: dict, source: str, allow: Iterable[str] = ()):
        self.hf, self.source = hf, source
        self.allowed = set(NO_MATH_FIELDS) | set(allow)
        self.used = set()

    def get(self, name: str, default: Any = None) -> Any:
        self.used.add(name)
        v = self.hf.get(name, default)
        return default if v is None and default is not None else v

    def require(self, name: str) -> Any:
        self.used.add(name)
        if self.hf.get(name) is None:
            raise CheckpointError(f"{self.source}: required config field {name!r} is missing")
        return self.hf[name]

    def expect(self, name: str, allowed_values: Iterable[Any], default: Any = None) -> Any:
        """A field we support only at some values (e.g. hidden_act == "silu")."""
        v = self.get(name, default)
        allowed_values = list(allowed_values)
        if v not in allowed_values:
            raise CheckpointError(f"{self.source}: config field {name!r} = {v!r} is not supported "
                                  f"(supported: {allowed_values})")
        return v

    def fail(self, name: str, why: str):
        raise CheckpointError(f"{self.source}: config field {name!r} = {self.hf.get(name)!r}: {why}")

    def finish(self):
        unknown = sorted(k for k in self.hf if k not in self.used and k not in self.allowed)
        if unknown:
            raise CheckpointError(
                f"{self.source}: config field(s) {unknown} are not handled by the "
                f"{self.hf.get('model_type')!r} converter; they may change the model's math, so "
                "loading is refused rather than silently ignoring them")


def parse_rope(r: ConfigReader, default_theta: float, supported=("default",)):
    """(rope_theta, rope_scaling or None) from rope_theta / rope_scaling / rope_parameters."""
    merged = {}
    for name in ("rope_scaling", "rope_parameters"):
        v = r.get(name)
        if v is not None:
            if not isinstance(v, dict):
                r.fail(name, "expected a dict")
            merged.update(v)
    theta = merged.pop("rope_theta", None)
    if theta is None:
        theta = r.get("rope_theta", default_theta)
    else:
        r.get("rope_theta")
    kind = merged.get("rope_type", merged.get("type", "default"))
    if kind not in supported:
        raise CheckpointError(f"{r.source}: rope type {kind!r} is not supported for "
                              f"{r.hf.get('model_type')!r} (supported: {list(supported)})")
    extra = {k: v for k, v in merged.items() if k not in ("rope_type", "type")}
    if kind == "default":
        if extra:
            raise CheckpointError(f"{r.source}: rope parameters {sorted(extra)} are not handled "
                                  "for the default rope")
        return float(theta), None
    return float(theta), merged


# Prefixes of one decoder layer's keys: Hugging Face's and ours.
HF_LAYER = "model.layers.{i}."
OUR_LAYER = "layers.{i}."


def decoder_rules() -> list:
    """Key rules every supported decoder shares: embeddings, final norm, lm_head, the two norms of
    each layer. Architectures add their attention and MLP rules."""
    return [
        KeyRule("model.embed_tokens.weight", "embed_tokens.embedding", "copy"),
        KeyRule("model.norm.weight", "norm.scale", "copy"),
        KeyRule("lm_head.weight", "lm_head.kernel", "linear"),
        KeyRule(HF_LAYER + "input_layernorm.weight", OUR_LAYER + "input_norm.scale", "copy"),
        KeyRule(HF_LAYER + "post_attention_layernorm.weight", OUR_LAYER + "post_attn_norm.scale", "copy"),
    ]
