"""The hyperparameter spec: the versioned ``base.json`` that holds searched hyperparameters
at a base (proxy) shape.

A spec has four sections (README, "The spec file format"):

- ``base``: the base shape and training configuration, the parameterisation and alpha;
- ``global``: the global hyperparameters (lr, min lr, weight decay, AdamW eps and betas,
  init std, warmup, schedule);
- ``multipliers``: dimensionless per-type (``type``), per-depth (``depth``) and per-(type,
  layer) (``layer``) multipliers (method.md section 5, paper eq. 3); a missing section or
  entry means 1;
- optional free-form ``description`` (a string) and ``provenance`` (an object).

Loading validates everything and raises :class:`SpecError` with one line naming the field
and the fix. Pure standard library.
"""

from __future__ import annotations

import json
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from . import rules

__all__ = [
    "SCHEMA_VERSION",
    "TYPES",
    "LAYER_TYPES",
    "BLOCKS",
    "HYPERPARAMETERS",
    "SpecError",
    "Shape",
    "Base",
    "Globals",
    "Multipliers",
    "Spec",
    "param_class",
    "load_spec",
    "read_json",
    "shape_from_dict",
    "LIMITS",
]

SCHEMA_VERSION = 1
TARGET_KIND = "cdp-megatron target"
"""The ``kind`` of a resolved target file (cdp-convert -o), which is not a base spec."""

# Upper bounds on shape fields, base and target alike: generous for any real run (the
# largest published models are far inside them), and low enough that a typo such as
# --num-layers 1e20 or --width 1e300 is an error, not a hang or a hundred-digit size.
LIMITS: dict[str, int | float] = {
    "hidden_size": 2**20,
    "ffn_hidden_size": 2**20,
    "num_layers": 10_000,
    "num_attention_heads": 2**20,
    "num_query_groups": 2**20,
    "head_dim": 2**20,
    "seq_length": 2**24,
    "global_batch_size": 2**24,
    "vocab_size": 2**24,
    "train_iters": 10**9,
    "train_tokens": 1e15,
    "rotary_base": 2**40,
}

# One vocabulary everywhere: spec keys, target groups, parameter classification.
TYPES: tuple[str, ...] = (
    "embedding",
    "position_embedding",
    "q",
    "k",
    "v",
    "attn_out",
    "mlp_gate",
    "mlp_up",
    "mlp_down",
    "attn_norm",
    "mlp_norm",
    "q_norm",
    "k_norm",
    "final_norm",
    "output",
)
# Types that live inside a transformer layer (and so have a layer number).
LAYER_TYPES: tuple[str, ...] = TYPES[2:13]
_QKV = ("q", "k", "v")  # one fused tensor, linear_qkv: add_qkv_bias gives it a bias alone
_LINEARS = (*_QKV, "attn_out", "mlp_gate", "mlp_up", "mlp_down")
_NORMS = ("attn_norm", "mlp_norm", "q_norm", "k_norm", "final_norm")
# Residual blocks: they take only the ``residual`` multiplier.
BLOCKS: tuple[str, ...] = ("attention", "mlp")
# Searched hyperparameters (multiplier names). beta1/beta2 multipliers act on (1 - beta);
# ``residual`` scales the attention / MLP branch before the residual add.
HYPERPARAMETERS: tuple[str, ...] = ("lr", "weight_decay", "eps", "beta1", "beta2", "init_std", "residual")
PARAM_HYPERPARAMETERS = HYPERPARAMETERS[:-1]


class SpecError(ValueError):
    """A spec (or target request) that cannot be used; the message names field and fix."""


def param_class(type_: str, param: str) -> str:
    """The Table 1 class (rules.PARAM_CLASSES) of a (type, weight|bias) pair."""
    if type_ in ("embedding", "position_embedding"):
        if param != "weight":
            raise SpecError(f"{type_} has no bias")
        return "input_embedding"
    if type_ in _LINEARS:
        return "hidden_weight" if param == "weight" else "hidden_bias"
    if type_ in ("attn_norm", "mlp_norm"):
        return "hidden_norm"
    if type_ in ("q_norm", "k_norm"):
        return "qk_norm"
    if type_ == "final_norm":
        return "unembedding_ln"
    if type_ == "output":
        return "unembedding_weight" if param == "weight" else "output_bias"
    raise SpecError(f"unknown type {type_!r}: use one of {', '.join(TYPES)}")


def is_random_init(type_: str, param: str) -> bool:
    """Weights drawn from N(0, std^2); norm gains start at 1 and biases at 0."""
    return param == "weight" and type_ not in _NORMS


# --------------------------------------------------------------------------- helpers


def _fail(path: str, problem: str, fix: str) -> SpecError:
    return SpecError(f"{path}: {problem}; {fix}")


def _show(value: Any) -> str:
    """repr() for messages; a huge integer is described (repr of a 5000-digit int raises)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**15:
        return f"an integer of about {round(value.bit_length() * math.log10(2))} digits"
    return repr(value)


def _is_number(value: Any) -> bool:
    """A JSON number that is finite as a float (bool is not a number here; a 400-digit
    integer is not finite: float() of it overflows)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _known_keys(obj: dict, allowed: tuple[str, ...], path: str) -> None:
    for key in obj:
        if key not in allowed:
            raise _fail(f"{path}.{key}" if path else key, "unknown key", f"allowed keys are {', '.join(allowed)}")


def _obj(value: Any, path: str) -> dict:
    if not isinstance(value, dict):
        raise _fail(path, f"expected a JSON object, got {type(value).__name__}", "write it as {...}")
    return value


def _pos_int(value: Any, path: str, limit: int | float | None = None) -> int:
    # int(nan) / int(inf) would raise a bare ValueError / OverflowError: _is_number first
    if not _is_number(value) or value != int(value) or value < 1:
        raise _fail(path, f"expected a positive integer, got {_show(value)}", "give a whole number >= 1")
    _at_most(value, limit, path)
    return int(value)


def _at_most(value: int | float, limit: int | float | None, path: str) -> None:
    if limit is not None and value > limit:
        raise _fail(path, f"{_show(value)} is above the limit {_show(limit)}", "give a realistic value (spec.LIMITS)")


def _pos_float(value: Any, path: str, allow_zero: bool = False) -> float:
    if not _is_number(value) or value < 0 or (value == 0 and not allow_zero):
        what = "non-negative" if allow_zero else "positive"
        raise _fail(path, f"expected a {what} finite number, got {_show(value)}", f"give a {what} number")
    return float(value)


def _choice(value: Any, choices: tuple[str, ...], path: str) -> str:
    if value not in choices:
        raise _fail(path, f"unknown value {value!r}", f"use one of {', '.join(choices)}")
    return value


def _bool(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise _fail(path, f"expected true or false, got {value!r}", "write true or false")
    return value


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True, kw_only=True)
class Shape:
    """A model shape and training configuration (base or target)."""

    hidden_size: int
    """Model width N (the m_N of every rule is a ratio of hidden sizes)."""
    num_layers: int
    """Transformer layers L (m_L is a ratio of layer counts)."""
    num_attention_heads: int
    """Query heads; width is scaled by adding heads at a fixed head_dim = hidden / heads."""
    num_query_groups: int
    """Key/value heads (GQA); equal to num_attention_heads for multi-head attention."""
    ffn_hidden_size: int
    """MLP inner width (per gate/up branch with SwiGLU)."""
    seq_length: int
    """Tokens per sequence."""
    global_batch_size: int
    """Sequences per optimizer step; the batch B of the SDE rules is in tokens:
    global_batch_size * seq_length."""
    train_tokens: float
    """Training tokens D (a spec may give train_iters instead: D = iters * batch tokens)."""
    vocab_size: int
    """Vocabulary size of the model (the padded size the embedding has)."""
    normalization: str = "RMSNorm"
    """"RMSNorm" or "LayerNorm" (LayerNorm norms have biases)."""
    swiglu: bool = True
    """Gated MLP: linear_fc1 holds gate and up (types mlp_gate, mlp_up)."""
    qk_layernorm: bool = True
    """Per-head norms on queries and keys (types q_norm, k_norm)."""
    add_bias_linear: bool = False
    """Biases on the linear layers (Megatron's --disable-bias-linear is false)."""
    add_qkv_bias: bool = False
    """Biases on q, k and v only (Megatron's --add-qkv-bias, as in Qwen2); implied by
    add_bias_linear."""
    position_embedding_type: str = "rope"
    """"rope" or "learned_absolute" (the latter adds type position_embedding)."""
    untie_embeddings_and_output_weights: bool = True
    """Separate output layer (type output). Tied: the embedding serves as output and the
    output rules of Table 1 cannot apply (a warning is given)."""
    apply_layernorm_1p: bool = False
    """Zero-centred norm gains: every norm multiplies by 1 + weight, its weight starting at 0
    (Megatron's --apply-layernorm-1p); weight decay then pulls a gain towards 1."""
    squared_relu: bool = False
    """The MLP's activation is relu(x)^2 (Megatron's --squared-relu, Nemotron's) instead of
    GeLU; not with swiglu."""
    # Rotary positions (Megatron's flags of the same names; rope only).
    rotary_base: int = 10000
    """Base of the rotary frequencies (--rotary-base)."""
    rotary_percent: float = 1.0
    """Fraction of each head's dimensions rotated (--rotary-percent)."""
    rotary_interleaved: bool = False
    """Rotate interleaved pairs of dimensions, GPT-J's (--rotary-interleaved)."""
    use_rope_scaling: bool = False
    """Llama 3.1's scaling of the rotary frequencies (--use-rope-scaling)."""
    rope_scaling_factor: float = 8.0
    """Its factor (--rope-scaling-factor)."""
    rotary_seq_len_interpolation_factor: float | None = None
    """Positions divided by this factor, linear position interpolation
    (--rotary-seq-len-interpolation-factor; null: none)."""

    def __post_init__(self) -> None:
        # One spelling per architecture: with biases on every linear layer, q/k/v have theirs
        # (as in megatron-core, where linear_qkv has a bias if either is set); positions / 1
        # are the positions.
        if self.add_bias_linear and self.add_qkv_bias:
            object.__setattr__(self, "add_qkv_bias", False)
        if self.rotary_seq_len_interpolation_factor == 1:
            object.__setattr__(self, "rotary_seq_len_interpolation_factor", None)

    @property
    def head_dim(self) -> float:
        return self.hidden_size / self.num_attention_heads

    @property
    def batch_tokens(self) -> int:
        return self.global_batch_size * self.seq_length

    @property
    def train_iters(self) -> int:
        return max(1, round(self.train_tokens / self.batch_tokens))

    def validate(self, path: str) -> None:
        for name, limit in LIMITS.items():
            if name in ("head_dim", "train_iters"):
                continue
            value = getattr(self, name)
            if name == "train_tokens" and not _is_number(value):
                raise _fail(f"{path}.train_tokens", f"{_show(value)} is not a finite number", "give a smaller --tokens ratio or --train-tokens")
            _at_most(value, limit, f"{path}.{name}")
        if self.squared_relu and self.swiglu:
            raise _fail(f"{path}.squared_relu", "a squared-ReLU MLP is not gated",
                        "set swiglu to false (Megatron-LM refuses --squared-relu with --swiglu)")
        if self.hidden_size % self.num_attention_heads:
            raise _fail(
                f"{path}.hidden_size",
                f"{self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}",
                "choose a hidden size that is a multiple of the number of heads",
            )
        if self.num_attention_heads % self.num_query_groups:
            raise _fail(
                f"{path}.num_query_groups",
                f"num_attention_heads {self.num_attention_heads} is not divisible by num_query_groups {self.num_query_groups}",
                "use a number of query groups that divides the number of heads",
            )
        if self.train_tokens < self.batch_tokens:
            raise _fail(
                f"{path}.train_tokens",
                f"{self.train_tokens:g} tokens is less than one step ({self.batch_tokens} tokens)",
                "train for at least global_batch_size * seq_length tokens",
            )
        if self.train_iters > LIMITS["train_iters"]:
            raise _fail(
                f"{path}.train_iters",
                f"{self.train_tokens:g} tokens make {self.train_iters} iterations, above the limit {LIMITS['train_iters']:g}",
                "train for fewer tokens or use a larger global batch",
            )
        self._validate_rotary(path)

    def _validate_rotary(self, path: str) -> None:
        changed = [name for name, default in ROTARY_DEFAULTS.items() if getattr(self, name) != default]
        if changed and self.position_embedding_type != "rope":
            raise _fail(f"{path}.{changed[0]}", "applies to rotary positions",
                        f"set position_embedding_type to rope or leave out {', '.join(changed)}")
        if self.rope_scaling_factor != ROTARY_DEFAULTS["rope_scaling_factor"] and not self.use_rope_scaling:
            raise _fail(f"{path}.rope_scaling_factor", "applies with use_rope_scaling",
                        "set use_rope_scaling to true or leave the factor out")
        if not 0 < self.rotary_percent <= 1:
            raise _fail(f"{path}.rotary_percent", f"{_show(self.rotary_percent)} is outside (0, 1]",
                        "give the fraction of each head's dimensions to rotate")
        rotated = int(self.head_dim * self.rotary_percent)  # as megatron's RotaryEmbedding cuts it
        if rotated < 2 or rotated % 2:
            raise _fail(f"{path}.rotary_percent", f"{self.rotary_percent:g} rotates {rotated} of the head's "
                        f"{self.head_dim:g} dimensions", "rotary pairs need an even number >= 2")

    def groups(self) -> list[tuple[str, int | None, str]]:
        """Every (type, layer, param) group this architecture has, in a fixed order."""
        out: list[tuple[str, int | None, str]] = [("embedding", None, "weight")]
        if self.position_embedding_type == "learned_absolute":
            out.append(("position_embedding", None, "weight"))
        norm_bias = self.normalization == "LayerNorm"
        for layer in range(1, self.num_layers + 1):
            for t in LAYER_TYPES:
                if t == "mlp_gate" and not self.swiglu:
                    continue
                if t in ("q_norm", "k_norm") and not self.qk_layernorm:
                    continue
                out.append((t, layer, "weight"))
                if t in _QKV:
                    has_bias = self.add_bias_linear or self.add_qkv_bias
                else:
                    has_bias = self.add_bias_linear if t in _LINEARS else norm_bias
                if has_bias:
                    out.append((t, layer, "bias"))
        out.append(("final_norm", None, "weight"))
        if norm_bias:
            out.append(("final_norm", None, "bias"))
        if self.untie_embeddings_and_output_weights:
            out.append(("output", None, "weight"))
        return out


_SHAPE_FIELDS = tuple(f.name for f in fields(Shape))
# The rotary positions' fields and their defaults (Megatron-LM's).
ROTARY_DEFAULTS: dict[str, Any] = {
    f.name: f.default for f in fields(Shape)
    if f.name in ("rotary_base", "rotary_percent", "rotary_interleaved", "use_rope_scaling", "rope_scaling_factor",
                  "rotary_seq_len_interpolation_factor")
}
# The architecture: a transfer keeps it (a target's must equal its base's).
ARCHITECTURE_FIELDS = ("normalization", "swiglu", "qk_layernorm", "add_bias_linear", "add_qkv_bias",
                       "position_embedding_type", "untie_embeddings_and_output_weights", "apply_layernorm_1p",
                       "squared_relu", *ROTARY_DEFAULTS)
_FLOAT_FIELDS = ("rotary_percent", "rope_scaling_factor", "rotary_seq_len_interpolation_factor")
_CHOICES = {"normalization": ("RMSNorm", "LayerNorm"), "position_embedding_type": ("rope", "learned_absolute")}


def _rotary_fields(raw: dict, path: str) -> dict[str, Any]:
    """The rotary fields a section gives, type-checked (absent: their defaults)."""
    values: dict[str, Any] = {}
    for name in ROTARY_DEFAULTS:
        if name not in raw:
            continue
        where = f"{path}.{name}"
        if name == "rotary_seq_len_interpolation_factor" and raw[name] is None:
            values[name] = None  # none (the default)
        elif name in _FLOAT_FIELDS:
            values[name] = _pos_float(raw[name], where)
        elif name == "rotary_base":
            values[name] = _pos_int(raw[name], where, LIMITS[name])
        else:
            values[name] = _bool(raw[name], where)
    return values


def shape_from_dict(raw: Any, path: str) -> Shape:
    """A Shape from its field names (a target file's ``shape``), every field type- and
    range-checked like the base section; fields with a default may be absent."""
    raw = _obj(raw, path)
    _known_keys(raw, _SHAPE_FIELDS, path)
    values: dict[str, Any] = {}
    for f in fields(Shape):
        where = f"{path}.{f.name}"
        if f.name not in raw:
            if f.default is MISSING:
                raise _fail(where, "missing", "regenerate it with cdp-convert")
            continue
        v = raw[f.name]
        if f.name in ROTARY_DEFAULTS:
            continue  # _rotary_fields
        if f.name == "train_tokens":
            values[f.name] = _pos_float(v, where)
        elif f.name in _CHOICES:
            values[f.name] = _choice(v, _CHOICES[f.name], where)
        elif f.type == "bool":
            values[f.name] = _bool(v, where)
        else:
            values[f.name] = _pos_int(v, where, LIMITS[f.name])
    shape = Shape(**values, **_rotary_fields(raw, path))
    shape.validate(path)
    return shape


@dataclass(frozen=True, kw_only=True)
class Base:
    """The ``base`` section: base shape, parameterisation, alpha."""

    shape: Shape
    parameterisation: str = rules.DEFAULT_PARAMETERISATION
    """One of sp, mup, completep, completedp (default)."""
    alpha: float = rules.DEFAULT_ALPHA
    """Depth exponent in [1/2, 1] (default 1/2, see rules.DEFAULT_ALPHA)."""
    weight_decay_rule: str = "adamw"
    """"adamw" (decay step lr*wd*theta, Megatron's Adam) or "adamlh" (decoupled decay,
    weight-decay SDE factor m_B/m_D instead of sqrt(m_B/m_D))."""
    beta_rule: str = "sde"
    """"sde" ((1 - beta) x m_B/m_D, method.md section 4) or "fixed" (the base's betas at every
    batch and horizon)."""


_BASE_KEYS = (
    *(f for f in _SHAPE_FIELDS if f != "train_tokens"),
    "train_tokens",
    "train_iters",
    "head_dim",
    "parameterisation",
    "alpha",
    "weight_decay_rule",
    "beta_rule",
)


def _parse_base(raw: Any) -> Base:
    raw = _obj(raw, "base")
    _known_keys(raw, _BASE_KEYS, "base")
    for key in ("hidden_size", "num_layers", "seq_length", "global_batch_size", "vocab_size"):
        if key not in raw:
            raise _fail(f"base.{key}", "missing", "add it (see README, 'The spec file format')")
    hidden = _pos_int(raw["hidden_size"], "base.hidden_size", LIMITS["hidden_size"])
    if "num_attention_heads" in raw and "head_dim" in raw:
        raise _fail("base.head_dim", "given together with num_attention_heads", "give only one of them")
    if "num_attention_heads" in raw:
        heads = _pos_int(raw["num_attention_heads"], "base.num_attention_heads", LIMITS["num_attention_heads"])
    elif "head_dim" in raw:
        head_dim = _pos_int(raw["head_dim"], "base.head_dim", LIMITS["head_dim"])
        if hidden % head_dim:
            raise _fail("base.head_dim", f"{head_dim} does not divide hidden_size {hidden}", "choose a divisor")
        heads = hidden // head_dim
    else:
        raise _fail("base.num_attention_heads", "missing", "give num_attention_heads or head_dim")
    seq = _pos_int(raw["seq_length"], "base.seq_length", LIMITS["seq_length"])
    gbs = _pos_int(raw["global_batch_size"], "base.global_batch_size", LIMITS["global_batch_size"])
    if ("train_tokens" in raw) == ("train_iters" in raw):
        raise _fail("base.train_tokens", "give exactly one of train_tokens and train_iters", "remove one or add one")
    if "train_tokens" in raw:
        tokens = _pos_float(raw["train_tokens"], "base.train_tokens")
        _at_most(tokens, LIMITS["train_tokens"], "base.train_tokens")
    else:
        tokens = float(_pos_int(raw["train_iters"], "base.train_iters", LIMITS["train_iters"]) * gbs * seq)
    shape = Shape(
        hidden_size=hidden,
        num_layers=_pos_int(raw["num_layers"], "base.num_layers", LIMITS["num_layers"]),
        num_attention_heads=heads,
        num_query_groups=_pos_int(raw.get("num_query_groups", heads), "base.num_query_groups", LIMITS["num_query_groups"]),
        ffn_hidden_size=_pos_int(raw.get("ffn_hidden_size", 4 * hidden), "base.ffn_hidden_size", LIMITS["ffn_hidden_size"]),
        seq_length=seq,
        global_batch_size=gbs,
        train_tokens=tokens,
        vocab_size=_pos_int(raw["vocab_size"], "base.vocab_size", LIMITS["vocab_size"]),
        normalization=_choice(raw.get("normalization", "RMSNorm"), _CHOICES["normalization"], "base.normalization"),
        swiglu=_bool(raw.get("swiglu", True), "base.swiglu"),
        qk_layernorm=_bool(raw.get("qk_layernorm", True), "base.qk_layernorm"),
        add_bias_linear=_bool(raw.get("add_bias_linear", False), "base.add_bias_linear"),
        add_qkv_bias=_bool(raw.get("add_qkv_bias", False), "base.add_qkv_bias"),
        position_embedding_type=_choice(
            raw.get("position_embedding_type", "rope"), _CHOICES["position_embedding_type"], "base.position_embedding_type"
        ),
        untie_embeddings_and_output_weights=_bool(
            raw.get("untie_embeddings_and_output_weights", True), "base.untie_embeddings_and_output_weights"
        ),
        apply_layernorm_1p=_bool(raw.get("apply_layernorm_1p", False), "base.apply_layernorm_1p"),
        squared_relu=_bool(raw.get("squared_relu", False), "base.squared_relu"),
        **_rotary_fields(raw, "base"),
    )
    shape.validate("base")
    alpha = raw.get("alpha", rules.DEFAULT_ALPHA)
    if not _is_number(alpha) or not 0.5 <= alpha <= 1:
        raise _fail("base.alpha", f"{_show(alpha)} is outside [0.5, 1]", "use a depth exponent between 0.5 and 1")
    return Base(
        shape=shape,
        parameterisation=_choice(
            raw.get("parameterisation", rules.DEFAULT_PARAMETERISATION), rules.PARAMETERISATIONS, "base.parameterisation"
        ),
        alpha=float(alpha),
        weight_decay_rule=_choice(raw.get("weight_decay_rule", "adamw"), rules.WEIGHT_DECAY_RULES, "base.weight_decay_rule"),
        beta_rule=_choice(raw.get("beta_rule", "sde"), rules.BETA_RULES, "base.beta_rule"),
    )


@dataclass(frozen=True, kw_only=True)
class Globals:
    """The ``global`` section: base hyperparameters at the base shape."""

    lr: float
    """Peak learning rate eta_b (required)."""
    min_lr_ratio: float = 0.1
    """Final lr of the cosine decay as a fraction of each group's peak lr (or give min_lr:
    then min_lr_ratio = min_lr / lr)."""
    weight_decay: float = 0.1
    """lambda_b, PyTorch-style AdamW (decay step lr * wd * theta)."""
    adam_eps: float = 1e-8
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    init_std: float = 0.02
    """sigma_b: std of the normal init of weight matrices at the base shape."""
    lr_warmup_fraction: float = 0.01
    """Linear warmup (from 0) as a fraction of train_iters (or give lr_warmup_iters)."""
    lr_decay_style: str = "cosine"
    decay_norms_and_biases: bool = False
    """Megatron's convention: no weight decay on norm gains and biases (1-D tensors)."""


_GLOBAL_KEYS = (*(f.name for f in fields(Globals)), "min_lr", "lr_warmup_iters")


def _parse_globals(raw: Any, base: Base) -> Globals:
    raw = _obj(raw, "global")
    _known_keys(raw, _GLOBAL_KEYS, "global")
    if "lr" not in raw:
        raise _fail("global.lr", "missing", "give the base peak learning rate")
    lr = _pos_float(raw["lr"], "global.lr")
    if "min_lr" in raw and "min_lr_ratio" in raw:
        raise _fail("global.min_lr", "given together with min_lr_ratio", "give only one of them")
    if "min_lr" in raw:
        ratio = _pos_float(raw["min_lr"], "global.min_lr", allow_zero=True) / lr
        if ratio > 1:
            raise _fail("global.min_lr", "is larger than lr", "the cosine decays from lr down to min_lr")
    else:
        ratio = _pos_float(raw.get("min_lr_ratio", 0.1), "global.min_lr_ratio", allow_zero=True)
        if ratio > 1:
            raise _fail("global.min_lr_ratio", f"{ratio:g} is larger than 1", "give a fraction of the peak lr between 0 and 1")
    betas = {}
    for key, default in (("adam_beta1", 0.9), ("adam_beta2", 0.95)):
        b = raw.get(key, default)
        if not _is_number(b) or not 0 <= b < 1:
            raise _fail(f"global.{key}", f"{_show(b)} is outside [0, 1)", "use a value such as 0.9 or 0.95")
        betas[key] = float(b)
    if "lr_warmup_iters" in raw and "lr_warmup_fraction" in raw:
        raise _fail("global.lr_warmup_iters", "given together with lr_warmup_fraction", "give only one of them")
    if "lr_warmup_iters" in raw:
        w = raw["lr_warmup_iters"]
        if isinstance(w, bool) or not isinstance(w, int) or w < 0:
            raise _fail("global.lr_warmup_iters", f"expected a non-negative integer, got {_show(w)}", "give a whole number")
        iters = base.shape.train_iters
        if w >= iters:  # compared before dividing: a 400-digit w / iters overflows a float
            raise _fail(
                "global.lr_warmup_iters", f"{_show(w)} is not shorter than training ({iters} iterations; Megatron's "
                "scheduler needs warmup < decay)", f"give at most {iters - 1}"
            )
        warmup = w / iters
    else:
        warmup = _pos_float(raw.get("lr_warmup_fraction", 0.01), "global.lr_warmup_fraction", allow_zero=True)
        if warmup >= 1:
            raise _fail("global.lr_warmup_fraction", "warmup is not shorter than training (Megatron's scheduler needs "
                        "warmup < decay)", "use a fraction below 1")
    return Globals(
        lr=lr,
        min_lr_ratio=ratio,
        weight_decay=_pos_float(raw.get("weight_decay", 0.1), "global.weight_decay", allow_zero=True),
        adam_eps=_pos_float(raw.get("adam_eps", 1e-8), "global.adam_eps"),
        init_std=_pos_float(raw.get("init_std", 0.02), "global.init_std"),
        lr_warmup_fraction=warmup,
        lr_decay_style=_choice(raw.get("lr_decay_style", "cosine"), ("cosine",), "global.lr_decay_style"),
        decay_norms_and_biases=_bool(raw.get("decay_norms_and_biases", False), "global.decay_norms_and_biases"),
        **betas,
    )


@dataclass(frozen=True)
class Multipliers:
    """Searched, dimensionless multipliers (paper eq. 3); anything absent is 1.

    type[key][hp]        per-type a_g; key is a type ("q"), the bias of a type ("q.bias")
                         or a residual block ("attention", "mlp", hp "residual" only)
    depth[hp]            per-depth d_l, a list of num_layers values shared by all layer types
    layer[key][hp]       fully uncoupled per-(type, layer) values, a list of num_layers
    """

    type: dict[str, dict[str, float]] = field(default_factory=dict)
    depth: dict[str, list[float]] = field(default_factory=dict)
    layer: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def type_mult(self, key: str, hp: str) -> float:
        return self.type.get(key, {}).get(hp, 1.0)

    def depth_mult(self, hp: str, layer: int | None) -> float:
        return 1.0 if layer is None or hp not in self.depth else self.depth[hp][layer - 1]

    def layer_mult(self, key: str, hp: str, layer: int | None) -> float:
        if layer is None:
            return 1.0
        values = self.layer.get(key, {}).get(hp)
        return 1.0 if values is None else values[layer - 1]

    def is_empty(self) -> bool:
        return not (self.type or self.depth or self.layer)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v}


_MULT_KEYS = ("type", "depth", "layer")
_TYPE_KEYS = (*TYPES, *(f"{t}.bias" for t in TYPES if t not in ("embedding", "position_embedding")), *BLOCKS)


def _allowed_hps(key: str) -> tuple[str, ...]:
    if key in BLOCKS:
        return ("residual",)
    type_, _, bias = key.partition(".")
    hps = PARAM_HYPERPARAMETERS
    if not is_random_init(type_, "bias" if bias else "weight"):
        hps = tuple(h for h in hps if h != "init_std")
    return hps


def _multiplier(value: Any, path: str) -> float:
    if not _is_number(value) or value <= 0:
        raise _fail(path, f"multiplier {_show(value)} is not a positive finite number", "multipliers are > 0 (1 = unchanged)")
    return float(value)


def _mult_list(value: Any, num_layers: int, path: str) -> list[float]:
    if not isinstance(value, list):
        raise _fail(path, f"expected a list of {num_layers} multipliers", "give one value per layer")
    if len(value) != num_layers:
        raise _fail(path, f"has {len(value)} values but the base has {num_layers} layers", f"give exactly {num_layers} values")
    return [_multiplier(v, f"{path}[{i}]") for i, v in enumerate(value)]


def _check_type_key(key: str, path: str) -> None:
    if key not in _TYPE_KEYS:
        raise _fail(
            path,
            f"unknown type {key!r}",
            f"use one of {', '.join(TYPES)}, TYPE.bias for a bias, or a block ({', '.join(BLOCKS)})",
        )


def _check_hp(hp: str, key: str, path: str) -> None:
    allowed = _allowed_hps(key)
    if hp not in allowed:
        if hp == "init_std" and hp in HYPERPARAMETERS:
            raise _fail(path, f"{key} is not randomly initialised (norm gains start at 1, biases at 0)", "remove init_std here")
        raise _fail(path, f"unknown hyperparameter {hp!r} for {key}", f"use one of {', '.join(allowed)}")


def _parse_multipliers(raw: Any, num_layers: int) -> Multipliers:
    raw = _obj(raw, "multipliers")
    _known_keys(raw, _MULT_KEYS, "multipliers")
    per_type: dict[str, dict[str, float]] = {}
    for key, hps in _obj(raw.get("type", {}), "multipliers.type").items():
        path = f"multipliers.type.{key}"
        _check_type_key(key, path)
        per_type[key] = {}
        for hp, value in _obj(hps, path).items():
            _check_hp(hp, key, f"{path}.{hp}")
            per_type[key][hp] = _multiplier(value, f"{path}.{hp}")
    depth: dict[str, list[float]] = {}
    for hp, values in _obj(raw.get("depth", {}), "multipliers.depth").items():
        path = f"multipliers.depth.{hp}"
        if hp not in HYPERPARAMETERS:
            raise _fail(path, f"unknown hyperparameter {hp!r}", f"use one of {', '.join(HYPERPARAMETERS)}")
        depth[hp] = _mult_list(values, num_layers, path)
    layer: dict[str, dict[str, list[float]]] = {}
    for key, hps in _obj(raw.get("layer", {}), "multipliers.layer").items():
        path = f"multipliers.layer.{key}"
        _check_type_key(key, path)
        if key.partition(".")[0] not in (*LAYER_TYPES, *BLOCKS):
            raise _fail(path, f"{key} is not inside a transformer layer", "give it a type multiplier instead")
        layer[key] = {}
        for hp, values in _obj(hps, path).items():
            _check_hp(hp, key, f"{path}.{hp}")
            layer[key][hp] = _mult_list(values, num_layers, f"{path}.{hp}")
    return Multipliers(type=per_type, depth=depth, layer=layer)


@dataclass(frozen=True)
class Spec:
    """A validated hyperparameter spec (``base.json``)."""

    base: Base
    globals: Globals
    multipliers: Multipliers = field(default_factory=Multipliers)
    description: str = ""
    provenance: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: Any) -> "Spec":
        raw = _obj(raw, "spec")
        if raw.get("kind") == TARGET_KIND:
            raise _fail(
                "kind",
                "this is a resolved target (cdp-convert -o output), not a base spec",
                "give the base spec, or pass the target with --cdp-config",
            )
        _known_keys(raw, ("schema_version", "base", "global", "multipliers", "description", "provenance", "$schema"), "")
        version = raw.get("schema_version")
        if type(version) is not int or version != SCHEMA_VERSION:  # 1.0 and true compare equal to 1
            raise _fail(
                "schema_version",
                f"{_show(version)} is not a schema version this cdp-megatron knows",
                f"this release reads schema_version {SCHEMA_VERSION} (an integer)",
            )
        if "base" not in raw:
            raise _fail("base", "missing", "add the base shape section")
        if "global" not in raw:
            raise _fail("global", "missing", "add the global hyperparameters section (at least lr)")
        base = _parse_base(raw["base"])
        description = raw.get("description", "")
        if not isinstance(description, str):
            raise _fail("description", "expected a string", "write it as text")
        return cls(
            base=base,
            globals=_parse_globals(raw["global"], base),
            multipliers=_parse_multipliers(raw.get("multipliers", {}), base.shape.num_layers),
            description=description,
            provenance=_obj(raw.get("provenance", {}), "provenance"),
        )

    def to_dict(self) -> dict:
        """The canonical JSON form (defaults written out, train_tokens and min_lr_ratio)."""
        base = {k: v for k, v in asdict(self.base.shape).items()}
        base.update(parameterisation=self.base.parameterisation, alpha=self.base.alpha,
                    weight_decay_rule=self.base.weight_decay_rule, beta_rule=self.base.beta_rule)
        out: dict[str, Any] = {"schema_version": SCHEMA_VERSION}
        if self.description:
            out["description"] = self.description
        out.update({"base": base, "global": asdict(self.globals), "multipliers": self.multipliers.to_dict()})
        if self.provenance:
            out["provenance"] = self.provenance
        return out


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise SpecError(f"duplicate key {key!r} in one JSON object; keep only one of them")
        out[key] = value
    return out


def read_json(path: str | Path) -> Any:
    """Read a JSON file for the rules layer; every failure is a one-line SpecError naming
    the file: missing, a directory, unreadable, not UTF-8 (a UTF-8 byte-order mark is
    accepted), malformed, a duplicate key, nesting or an integer too large to parse."""
    if str(path) == "":
        raise SpecError("'': empty path; give the JSON file")
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SpecError(f"{path}: no such file; check the path") from None
    except IsADirectoryError:
        raise SpecError(f"{path} is a directory; give the JSON file") from None
    except OSError as e:
        raise SpecError(f"{path}: cannot read ({e.strerror}); check the path and permissions") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        found = "it is UTF-16" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else f"byte 0x{data[e.start]:02x} at offset {e.start}"
        raise SpecError(f"{path}: not UTF-8 text ({found}); save it as UTF-8") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as e:
        raise SpecError(f"{path}: malformed JSON at line {e.lineno} column {e.colno} ({e.msg}); fix the syntax") from None
    except SpecError as e:
        raise SpecError(f"{path}: {e}") from None
    except RecursionError:
        raise SpecError(f"{path}: JSON nested too deeply to read; a spec or target is a few levels deep, fix the file") from None
    except ValueError:  # int() refuses more than sys.get_int_max_str_digits() (4300) digits
        raise SpecError(f"{path}: a number with thousands of digits; give a realistic value") from None


def load_spec(path: str | Path) -> Spec:
    """Read and validate a spec file; SpecError names the problem and the fix."""
    raw = read_json(path)
    if isinstance(raw, dict) and raw.get("kind") == TARGET_KIND:
        raise SpecError(
            f"{path} is a resolved target (cdp-convert -o output); give the base spec, or pass it with --cdp-config"
        )
    return Spec.from_dict(raw)
