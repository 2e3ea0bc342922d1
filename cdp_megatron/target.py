"""Resolution of a spec at a target shape: every (type, layer, weight|bias) group's
lr, min lr, weight decay, AdamW eps and betas and init std, plus per-layer residual
multipliers (paper eq. 3, method.md sections 3-5).

    log theta_{g,l} = log theta_0(T, B)   SDE factor      (rules.sde_factors)
                    + log s_g(N, L)       Complete(d)P    (rules.width_depth_factor)
                    + log a_g             type multiplier (spec.multipliers.type)
                    + log d_l             depth multiplier (spec.multipliers.depth,
                                          times the uncoupled spec.multipliers.layer)

For betas the product acts on (1 - beta). The per-depth multipliers are interpolated to the
target depth (rules.interpolate_depth). Pure standard library.
"""

from __future__ import annotations

import math
import shlex
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from . import rules
from .spec import (
    ARCHITECTURE_FIELDS,
    BLOCKS,
    LIMITS,
    ROTARY_DEFAULTS,
    SCHEMA_VERSION,
    TARGET_KIND,
    Globals,
    Multipliers,
    Shape,
    Spec,
    SpecError,
    is_random_init,
    param_class,
    read_json,
    shape_from_dict,
)

__all__ = ["Group", "Target", "resolve", "scaled_shape", "load_target", "layer_range", "TARGET_KIND", "RANGE_LEGEND"]

_HPS = ("lr", "weight_decay", "eps", "beta1", "beta2", "init_std")


@dataclass(frozen=True)
class Group:
    """Resolved hyperparameters of one (type, layer, param) group."""

    type: str
    layer: int | None
    param: str
    lr: float
    min_lr: float
    weight_decay: float
    eps: float
    beta1: float
    beta2: float
    init_std: float | None
    factors: dict[str, dict[str, float]] | None = field(default=None, compare=False)
    """Per hyperparameter: base, sde, cdp, type, depth (eq. 3 decomposition; --explain)."""

    @property
    def key(self) -> tuple[str, int | None, str]:
        return (self.type, self.layer, self.param)

    def hyperparameters(self) -> dict[str, float | None]:
        return {k: getattr(self, k) for k in ("lr", "min_lr", "weight_decay", "eps", "beta1", "beta2", "init_std")}


@dataclass(frozen=True)
class Target:
    """A spec resolved at a target shape (docs/target-format.md)."""

    spec: Spec
    shape: Shape
    groups: tuple[Group, ...]
    residual_mult: dict[str, list[float]]
    output_mult: float
    ratios: dict[str, float]
    warnings: tuple[str, ...] = ()

    schema_version = SCHEMA_VERSION

    @property
    def parameterisation(self) -> str:
        return self.spec.base.parameterisation

    @property
    def alpha(self) -> float:
        return self.spec.base.alpha

    @property
    def rule_notes(self) -> str:
        """The spec's batch/duration rule choices that are not the defaults, for the header
        lines (e.g. ", beta_rule fixed"); "" for the method's own."""
        base = self.spec.base
        return "".join(f", {name} {value}" for name, value, default in (
            ("weight_decay_rule", base.weight_decay_rule, "adamw"), ("beta_rule", base.beta_rule, "sde"))
            if value != default)

    @property
    def train_iters(self) -> int:
        return self.shape.train_iters

    @property
    def lr_warmup_iters(self) -> int:
        return round(self.spec.globals.lr_warmup_fraction * self.train_iters)

    @property
    def lr_decay_style(self) -> str:
        return self.spec.globals.lr_decay_style

    @property
    def decay_norms_and_biases(self) -> bool:
        return self.spec.globals.decay_norms_and_biases

    def group(self, type_: str, layer: int | None, param: str = "weight") -> Group:
        try:
            return self._index[(type_, layer, param)]
        except KeyError:
            raise KeyError(f"the target has no group (type={type_!r}, layer={layer}, param={param!r})") from None

    @property
    def _index(self) -> dict:
        idx = self.__dict__.get("_idx")
        if idx is None:
            idx = {g.key: g for g in self.groups}
            object.__setattr__(self, "_idx", idx)
        return idx

    @property
    def global_hyperparameters(self) -> dict[str, float]:
        """The values a class with factor 1 and multipliers 1 gets (Megatron's global flags)."""
        g = self.spec.globals
        sde = _sde(self.spec, self.ratios)
        lr = g.lr * sde.lr
        return {
            "lr": lr,
            "min_lr": lr * g.min_lr_ratio,
            "weight_decay": g.weight_decay * sde.weight_decay,
            "adam_eps": g.adam_eps * sde.eps,
            "adam_beta1": 1 - (1 - g.adam_beta1) * sde.one_minus_beta,
            "adam_beta2": 1 - (1 - g.adam_beta2) * sde.one_minus_beta,
            "init_method_std": g.init_std,
        }

    def megatron_args(self, cdp_config: str = "target.json") -> list[str]:
        """Megatron-LM flags for the target (global values) plus --cdp-config, as words of
        a shell command line: the path is shell-quoted (``' '.join`` gives a line to paste)."""
        s = self.shape
        glob = self.global_hyperparameters
        args = [
            "--num-layers", str(s.num_layers),
            "--hidden-size", str(s.hidden_size),
            "--num-attention-heads", str(s.num_attention_heads),
        ]
        if s.num_query_groups != s.num_attention_heads:
            args += ["--group-query-attention", "--num-query-groups", str(s.num_query_groups)]
        args += [
            "--ffn-hidden-size", str(s.ffn_hidden_size),
            "--seq-length", str(s.seq_length),
            "--max-position-embeddings", str(s.seq_length),
            "--global-batch-size", str(s.global_batch_size),
            "--train-iters", str(s.train_iters),
            "--lr", f"{glob['lr']:.6g}",
            "--min-lr", f"{glob['min_lr']:.6g}",
            "--lr-decay-style", self.lr_decay_style,
            "--lr-warmup-iters", str(self.lr_warmup_iters),
            "--weight-decay", f"{glob['weight_decay']:.6g}",
            "--adam-beta1", f"{glob['adam_beta1']:.6g}",
            "--adam-beta2", f"{glob['adam_beta2']:.6g}",
            "--adam-eps", f"{glob['adam_eps']:.6g}",
            "--init-method-std", f"{glob['init_method_std']:.6g}",
            "--normalization", s.normalization,
        ]
        if s.swiglu:
            args.append("--swiglu")
        if s.qk_layernorm:
            args.append("--qk-layernorm")
        args += ["--position-embedding-type", s.position_embedding_type]
        if s.untie_embeddings_and_output_weights:
            args.append("--untie-embeddings-and-output-weights")
        if not s.add_bias_linear:
            args.append("--disable-bias-linear")
            if s.add_qkv_bias:
                args.append("--add-qkv-bias")
        if s.apply_layernorm_1p:
            args.append("--apply-layernorm-1p")
        if s.squared_relu:
            args.append("--squared-relu")
        for name, default in ROTARY_DEFAULTS.items():  # the rotary positions where they are not Megatron's defaults
            value = getattr(s, name)
            if value != default:
                flag = "--" + name.replace("_", "-")
                args += [flag] if value is True else [flag, repr(value)]  # repr: the float's exact digits
        args += ["--cdp-config", shlex.quote(cdp_config)]
        return args

    def to_dict(self, explain: bool = False) -> dict:
        shape = asdict(self.shape)
        shape["train_iters"] = self.train_iters
        groups = []
        for g in self.groups:
            d = asdict(g)
            if not explain:
                d.pop("factors")
            groups.append(d)
        return {
            "schema_version": SCHEMA_VERSION,
            "kind": TARGET_KIND,
            "parameterisation": self.parameterisation,
            "alpha": self.alpha,
            "shape": shape,
            "ratios": dict(self.ratios),
            "train_iters": self.train_iters,
            "lr_warmup_iters": self.lr_warmup_iters,
            "lr_decay_style": self.lr_decay_style,
            "decay_norms_and_biases": self.decay_norms_and_biases,
            "output_mult": self.output_mult,
            "residual_mult": {k: list(v) for k, v in self.residual_mult.items()},
            "global": self.global_hyperparameters,
            "groups": groups,
            "warnings": list(self.warnings),
            "source_spec": self.spec.to_dict(),
        }


RANGE_LEGEND = ("a..b: first layer .. last layer", "a..b*: lowest .. highest, not monotone over the layers")


def layer_range(values: list[float], fmt: str) -> str:
    """A hyperparameter over a row's layers (in layer order) as one table cell: the value when
    all are equal, ``first..last`` when they change monotonically, else ``lowest..highest*``
    (first..last would hide a bump in the middle). ``fmt``: the format spec of one value
    (``".4g"``). ``cdp-convert``'s table and ``cdp-pretrain``'s start-up table both use it,
    so the same spec reads the same in both (see ``RANGE_LEGEND``)."""
    if len(set(values)) == 1:
        return format(values[0], fmt)
    pairs = list(zip(values, values[1:]))
    if all(a <= b for a, b in pairs) or all(a >= b for a, b in pairs):
        return f"{values[0]:{fmt}}..{values[-1]:{fmt}}"
    return f"{min(values):{fmt}}..{max(values):{fmt}}*"


def range_legend(cells: list[str]) -> str | None:
    """The legend line for a table whose cells include ``layer_range`` ranges (None: no range)."""
    if not any(".." in cell for cell in cells):
        return None
    parts = [RANGE_LEGEND[0]] + ([RANGE_LEGEND[1]] if any(cell.endswith("*") for cell in cells) else [])
    return "; ".join(parts)


def _sde(spec: Spec, ratios: dict[str, float]) -> rules.SdeFactors:
    # SP is "nothing scales": no width/depth rule and no batch/duration rule.
    if spec.base.parameterisation == "sp":
        return rules.SdeFactors(lr=1.0, weight_decay=1.0, eps=1.0, one_minus_beta=1.0, iterations=ratios["tokens"] / ratios["batch"])
    try:
        return rules.sde_factors(ratios["batch"], ratios["tokens"], spec.base.weight_decay_rule, spec.base.beta_rule)
    except ValueError:  # the shape limits keep the ratios finite; this is the last guard
        raise SpecError(
            f"ratios: batch m_B = {ratios['batch']:g} and tokens m_D = {ratios['tokens']:g} must be positive and finite; "
            "give a realistic --batch / --tokens"
        ) from None


# The SDE rule scales (1 - beta) by m_B / m_D; from this factor up, say so; and from this
# factor down, where keeping the base's betas trained better at small scale (README, Figures 3
# and 5: 0.09 to 0.14 lower loss at 1/2, 0.21 to 0.24 at 1/4).
BETA_WARNING_FACTOR = 4.0
BETA_LONGER_WARNING_FACTOR = 0.5


def _beta_warning(g: Globals, factor: float) -> list[str]:
    """A warning when the batch/duration rule grows (1 - beta) 4x or more (a larger batch or a
    shorter horizon): beta1 heads for 0, where the steps are too coarse for the SDE that the
    rule keeps fixed. And one when it shrinks (1 - beta) 2x or more (a longer horizon or a
    smaller batch: the Adam averages span more steps), where the spec's base betas trained
    better in our small-scale runs; ``"beta_rule": "fixed"`` keeps them (factor 1: none)."""
    moved = ", ".join(f"beta{i} {b:g} -> {1 - (1 - b) * factor:.6g}" for i, b in ((1, g.adam_beta1), (2, g.adam_beta2)))
    head = f"the batch/duration rule scales (1 - beta1) and (1 - beta2) by m_B / m_D = {factor:g} ({moved}, before the beta multipliers)"
    if factor >= BETA_WARNING_FACTOR:
        return [f"{head}: steps this coarse are where the SDE behind the rule is least reliable; equal --batch and "
                "--tokens ratios keep every hyperparameter"]
    if factor <= BETA_LONGER_WARNING_FACTOR:
        return [f"{head}: in our small-scale runs the base's betas trained better where the rule moved them towards "
                "1 (README, Figures 3 and 5); \"beta_rule\": \"fixed\" in the spec's base keeps them"]
    return []


def _spec_key(type_: str, param: str) -> str:
    """The spec's multiplier key of a group: its type, or "<type>.bias"."""
    return type_ if param == "weight" else f"{type_}.bias"


def _searched(mult: Any, key: str, hp: str, layer: int | None) -> tuple[float, float]:
    """The searched multipliers of ``hp`` for the group ``key`` at ``layer``: (type, depth x layer)."""
    return mult.type_mult(key, hp), mult.depth_mult(hp, layer) * mult.layer_mult(key, hp, layer)


def _shortest_horizon(shape: Shape, mult: Any, i: int, one_minus_base: float, factor: float) -> str:
    """The fix for a beta pushed below 0: (1 - beta) = (1 - base) x m_B / m_D x multipliers must
    stay <= 1 for every group, so the run needs at least the worst group's (1 - beta) times its
    iterations (at the same batch); a smaller batch or beta multiplier does the same."""
    hp = f"beta{i}"
    worst = max(one_minus_base * factor * math.prod(_searched(mult, _spec_key(t, p), hp, layer))
                for t, layer, p in shape.groups())
    iters = math.ceil(shape.train_tokens / shape.batch_tokens * worst)  # m_D counts tokens, not rounded iterations
    fixed = ', keep the base\'s betas ("beta_rule": "fixed" in the spec\'s base)' if factor != 1 else ""
    return (f"train for at least {iters} iterations at this batch (now {shape.train_iters}), "
            f"use a smaller batch{fixed}, or lower the beta{i} multiplier (m_B: tokens per step, m_D: training tokens, "
            "each over the base)")


def _where(key: str, layer: int | None) -> str:
    return key if layer is None else f"{key} layer {layer}"


def _check_value(where: str, hp: str, value: float, positive: bool) -> None:
    """A resolved value must be finite, and stay > 0 where every factor was > 0 (lr, eps,
    init std: multipliers of 1e-300 underflow to 0.0; of 1e300 overflow to inf)."""
    if not math.isfinite(value):
        raise SpecError(f"{where}: {hp} = {value} after scaling; lower the {hp} multipliers, the base value or the ratios")
    if positive and value <= 0:
        raise SpecError(f"{where}: {hp} underflows to {value} after scaling; raise the {hp} multipliers or the base value")


def _unused_multipliers(spec: Spec, shape: Shape) -> list[str]:
    """Warnings for type / layer multipliers that address a parameter this model lacks
    (they are valid spec keys, so not an error, but they change nothing)."""
    groups = {(t, p) for t, _, p in shape.groups()}
    present = {_spec_key(t, p) for t, p in groups} | set(BLOCKS)
    absent_type = {
        "position_embedding": "position_embedding_type is rope",
        "mlp_gate": "swiglu is false",
        "q_norm": "qk_layernorm is false",
        "k_norm": "qk_layernorm is false",
        "output": "the embeddings are tied (untie_embeddings_and_output_weights is false)",
    }
    absent_bias = {
        "hidden_bias": "add_bias_linear is false" + (" (add_qkv_bias gives q, k and v biases only)"
                                                     if shape.add_qkv_bias else ""),
        "output_bias": "Megatron's output layer has no bias",
    }
    out = []
    for section in ("type", "layer"):
        for key in getattr(spec.multipliers, section):
            if key in present:
                continue
            type_ = key.partition(".")[0]
            if type_ in absent_type and (type_, "weight") not in groups:
                reason = absent_type[type_]
            else:
                reason = absent_bias.get(param_class(type_, "bias"), f"normalization is {shape.normalization} (no norm biases)")
            out.append(f"multipliers.{section}.{key} has no effect: {reason}")
    return out


def _depth_multipliers(m: Multipliers, num_layers: int) -> Multipliers:
    """Per-depth and per-layer multipliers interpolated to num_layers (method.md s. 5)."""
    return Multipliers(
        type=m.type,
        depth={hp: rules.interpolate_depth(v, num_layers) for hp, v in m.depth.items()},
        layer={k: {hp: rules.interpolate_depth(v, num_layers) for hp, v in hps.items()} for k, hps in m.layer.items()},
    )


def resolve(spec: Spec, shape: Shape | None = None) -> Target:
    """Resolve ``spec`` at ``shape`` (default: the base shape itself)."""
    base = spec.base.shape
    shape = base if shape is None else shape
    shape.validate("target")
    for name in ARCHITECTURE_FIELDS:
        if getattr(shape, name) != getattr(base, name):
            raise SpecError(f"target.{name}: differs from the base ({getattr(base, name)!r}); transfer keeps the architecture")
    ratios = {
        "width": shape.hidden_size / base.hidden_size,
        "depth": shape.num_layers / base.num_layers,
        "batch": shape.batch_tokens / base.batch_tokens,
        "tokens": shape.train_tokens / base.train_tokens,
    }
    p, alpha = spec.base.parameterisation, spec.base.alpha
    m_n, m_l = ratios["width"], ratios["depth"]
    sde = _sde(spec, ratios)
    g = spec.globals
    mult = _depth_multipliers(spec.multipliers, shape.num_layers)
    warnings = []
    if shape.head_dim != base.head_dim:
        warnings.append(
            f"head dimension changes from {base.head_dim:g} to {shape.head_dim:g}: the QK-norm rules assume width "
            "grows by adding heads at a fixed head dimension"
        )
    if shape.ffn_hidden_size * base.hidden_size != base.ffn_hidden_size * shape.hidden_size:
        warnings.append(
            f"ffn_hidden_size / hidden_size changes from {base.ffn_hidden_size / base.hidden_size:g} to "
            f"{shape.ffn_hidden_size / shape.hidden_size:g}: the width rules use one ratio m_N = {m_n:g} for every matrix, "
            f"but the MLP width grows {shape.ffn_hidden_size / base.ffn_hidden_size:g}x; keep the base's ratio "
            f"(--ffn-hidden-size {base.ffn_hidden_size * shape.hidden_size / base.hidden_size:g}) for an exact transfer"
        )
    if not shape.untie_embeddings_and_output_weights and p != "sp":
        warnings.append("tied embeddings: the embedding also serves as the output layer, so Table 1's unembedding rules are not applied")
    warnings += _unused_multipliers(spec, shape)
    warnings += _beta_warning(g, sde.one_minus_beta)

    groups = []
    for type_, layer, param in shape.groups():
        cls = param_class(type_, param)
        key = _spec_key(type_, param)

        def searched(hp: str) -> tuple[float, float]:
            return _searched(mult, key, hp, layer)

        factors: dict[str, dict[str, float]] = {}

        def combine(hp: str, base_value: float, sde_f: float, cdp_f: float) -> float:
            a, d = searched(hp)
            factors[hp] = {"base": base_value, "sde": sde_f, "cdp": cdp_f, "type": a, "depth": d}
            return base_value * sde_f * cdp_f * a * d

        lr = combine("lr", g.lr, sde.lr, rules.width_depth_factor(p, "lr", cls, m_n, m_l, alpha))
        decays = param == "weight" and cls not in ("hidden_norm", "qk_norm", "unembedding_ln") or g.decay_norms_and_biases
        wd_base = g.weight_decay if decays else 0.0
        wd = combine("weight_decay", wd_base, sde.weight_decay, rules.width_depth_factor(p, "weight_decay", cls, m_n, m_l, alpha))
        eps = combine("eps", g.adam_eps, sde.eps, rules.width_depth_factor(p, "eps", cls, m_n, m_l, alpha))
        betas = []
        for i, b in ((1, g.adam_beta1), (2, g.adam_beta2)):
            one_minus = combine(f"beta{i}", 1 - b, sde.one_minus_beta, 1.0)
            beta = 1 - one_minus
            if not 0 <= beta < 1:  # also a (1 - beta) so small that beta rounds to exactly 1.0
                head = (f"{_where(key, layer)}: beta{i} = 1 - {one_minus:g} = "
                        f"{'1.0 (rounded)' if beta == 1 else f'{beta:g}'} is outside [0, 1) after scaling 1 - beta{i} = "
                        f"{1 - b:g} by m_B / m_D = {sde.one_minus_beta:g} and the multipliers")
                if beta == 1:
                    fixed = ', keep the base\'s betas ("beta_rule": "fixed" in the spec\'s base)' \
                        if sde.one_minus_beta != 1 else ""
                    raise SpecError(f"{head}; raise the beta{i} multiplier or the batch/token ratio{fixed} (m_B: "
                                    "tokens per step, m_D: training tokens, each over the base)")
                raise SpecError(f"{head}; {_shortest_horizon(shape, mult, i, 1 - b, sde.one_minus_beta)}")
            betas.append(beta)
        init_std = None
        if is_random_init(type_, param):
            init_std = combine("init_std", g.init_std, 1.0, rules.init_std_factor(p, cls, m_n, m_l, alpha))
            _check_value(_where(key, layer), "init_std", init_std, positive=True)
        for hp, value, positive in (("lr", lr, True), ("weight_decay", wd, wd_base > 0), ("eps", eps, True)):
            _check_value(_where(key, layer), hp, value, positive)
        groups.append(Group(type_, layer, param, lr, lr * g.min_lr_ratio, wd, eps, betas[0], betas[1], init_std, factors))

    res = rules.residual_factor(p, m_l, alpha)
    residual_mult = {
        block: [
            res * mult.type_mult(block, "residual") * mult.depth_mult("residual", l) * mult.layer_mult(block, "residual", l)
            for l in range(1, shape.num_layers + 1)
        ]
        for block in BLOCKS
    }
    for block, values in residual_mult.items():
        for l, v in enumerate(values, 1):
            _check_value(_where(block, l), "residual", v, positive=True)
    target = Target(
        spec=spec,
        shape=shape,
        groups=tuple(groups),
        residual_mult=residual_mult,
        output_mult=rules.output_forward_factor(p, m_n),
        ratios=ratios,
        warnings=tuple(warnings),
    )
    if target.lr_warmup_iters >= target.train_iters:  # a fraction just below 1 can round up to the whole run
        raise SpecError(  # the spec stores lr_warmup_iters as a fraction: name both keys
            f"global.lr_warmup_fraction (or lr_warmup_iters / the base's {spec.base.shape.train_iters} iterations): "
            f"{g.lr_warmup_fraction:g} x {target.train_iters} iterations rounds to {target.lr_warmup_iters}, the "
            "whole run (Megatron's scheduler needs warmup < decay); give a shorter warmup"
        )
    for hp, v in target.global_hyperparameters.items():  # Megatron's global flags
        _check_value("global", hp, v, positive=hp in ("lr", "adam_eps", "init_method_std"))
    return target


def _scale_int(value: int, ratio: float, name: str, flag: str) -> int:
    scaled = value * ratio
    if not math.isfinite(scaled):  # round(inf) raises OverflowError
        raise SpecError(f"{name}: {value} x {ratio:g} is not a finite number; choose a smaller ratio or give {flag} directly")
    if abs(scaled - round(scaled)) > 1e-9 * max(1.0, abs(scaled)) or round(scaled) < 1:
        raise SpecError(f"{name}: {value} x {ratio:g} = {scaled:g} is not a whole number; choose a ratio that gives an integer or give {flag} directly")
    return round(scaled)


def scaled_shape(
    shape: Shape,
    *,
    width: float = 1.0,
    depth: float = 1.0,
    batch: float = 1.0,
    tokens: float = 1.0,
    **absolute: Any,
) -> Shape:
    """A target shape from ratios and/or absolute values (Megatron names).

    Width scales hidden size, heads, query groups and the FFN width together (fixed head
    dim); depth scales layers; batch scales the global batch (sequences); tokens scales the
    training tokens. Absolute values (hidden_size, num_layers, num_attention_heads,
    num_query_groups, ffn_hidden_size, global_batch_size, seq_length, train_tokens,
    train_iters, vocab_size) override what the ratios give.
    """
    for name, r in (("width", width), ("depth", depth), ("batch", batch), ("tokens", tokens)):
        if not (isinstance(r, (int, float)) and math.isfinite(r) and r > 0):
            raise SpecError(f"--{name}: ratio {r!r} must be a positive number, e.g. 4x or 0.5x")
    known = {f.name for f in fields(Shape)} | {"train_iters"}
    for k in absolute:
        if k not in known:
            raise SpecError(f"unknown target field {k!r}")
    absolute = {k: v for k, v in absolute.items() if v is not None}
    hidden = absolute.get("hidden_size")
    if hidden is not None:
        width = hidden / shape.hidden_size
    new = {
        "hidden_size": hidden if hidden is not None else _scale_int(shape.hidden_size, width, "hidden_size", "--hidden-size"),
        "num_layers": absolute.get("num_layers") or _scale_int(shape.num_layers, depth, "num_layers", "--num-layers"),
        "global_batch_size": absolute.get("global_batch_size")
        or _scale_int(shape.global_batch_size, batch, "global_batch_size", "--global-batch-size"),
        "seq_length": absolute.get("seq_length", shape.seq_length),
        "vocab_size": absolute.get("vocab_size", shape.vocab_size),
    }
    if "num_attention_heads" in absolute:
        new["num_attention_heads"] = absolute["num_attention_heads"]
    else:
        head_dim = shape.hidden_size // shape.num_attention_heads  # validated: an integer
        if isinstance(new["hidden_size"], int) and new["hidden_size"] % head_dim:
            lower = max(head_dim, new["hidden_size"] // head_dim * head_dim)
            raise SpecError(
                f"hidden_size: {new['hidden_size']} is not a multiple of the head dimension {head_dim}, so "
                f"num_attention_heads would be {new['hidden_size'] / head_dim:g} (width grows by adding heads of a fixed "
                f"size); use a multiple of {head_dim} such as {lower} or {lower + head_dim}, or give --num-attention-heads"
            )
        new["num_attention_heads"] = _scale_int(shape.num_attention_heads, width, "num_attention_heads", "--num-attention-heads")
    if "num_query_groups" in absolute:
        new["num_query_groups"] = absolute["num_query_groups"]
    else:
        per_group = shape.num_attention_heads // shape.num_query_groups
        if new["num_attention_heads"] % per_group:
            raise SpecError(
                f"num_query_groups: {new['num_attention_heads']} heads cannot keep the base's {per_group} heads per group; give --num-query-groups"
            )
        new["num_query_groups"] = new["num_attention_heads"] // per_group
    new["ffn_hidden_size"] = absolute.get("ffn_hidden_size") or _scale_int(
        shape.ffn_hidden_size, width, "ffn_hidden_size", "--ffn-hidden-size"
    )
    batch_tokens = new["global_batch_size"] * new["seq_length"]
    if "train_iters" in absolute and "train_tokens" in absolute:
        raise SpecError("give only one of --train-iters and --train-tokens")
    if "train_iters" in absolute:
        if absolute["train_iters"] > LIMITS["train_iters"]:
            raise SpecError(f"--train-iters: {absolute['train_iters']:g} is above the limit {LIMITS['train_iters']:g}; give a realistic value")
        new["train_tokens"] = float(absolute["train_iters"] * batch_tokens)
    elif "train_tokens" in absolute:
        new["train_tokens"] = float(absolute["train_tokens"])
    else:
        new["train_tokens"] = shape.train_tokens * tokens
    for k, v in new.items():
        if k != "train_tokens" and (not isinstance(v, int) or v < 1):
            raise SpecError(f"--{k.replace('_', '-')}: {v!r} must be a positive integer")
    out = replace(shape, **new)
    out.validate("target")
    return out


def load_target(path: str | Path) -> Target:
    """Read a target file written by ``cdp-convert -o`` and re-resolve it from its
    embedded source spec, checking that the stored numbers agree (a hand-edited or
    stale target is an error)."""
    return target_from_dict(read_json(path), str(path))


def target_from_dict(raw: Any, where: str = "target") -> Target:
    """Re-resolve a target dict from its ``source_spec`` and ``shape``; everything the
    re-resolve recomputes must agree with what is stored (targets are not edited)."""
    if not isinstance(raw, dict) or raw.get("kind") != TARGET_KIND:
        raise SpecError(f"{where}: not a cdp-megatron target (no \"kind\": \"{TARGET_KIND}\"); write one with cdp-convert -o")
    if type(raw.get("schema_version")) is not int or raw.get("schema_version") != SCHEMA_VERSION:
        raise SpecError(f"{where}: schema_version {raw.get('schema_version')!r} is not one this release reads ({SCHEMA_VERSION})")
    for key in ("source_spec", "shape", "groups"):
        if key not in raw:
            raise SpecError(f"{where}: {key}: missing; regenerate it with cdp-convert")
    try:
        spec = Spec.from_dict(raw["source_spec"])
    except SpecError as e:
        raise SpecError(f"{where}: source_spec: {e}") from None
    shape_raw = raw["shape"]
    if isinstance(shape_raw, dict):
        shape_raw = {k: v for k, v in shape_raw.items() if k != "train_iters"}  # derived; compared below
    shape = shape_from_dict(shape_raw, f"{where}: shape")
    stored: dict = {}
    try:
        for g in raw["groups"]:
            key = (g["type"], g["layer"], g["param"])
            if key in stored:
                raise SpecError(f"{where}: group {key} appears twice; regenerate it with cdp-convert")
            stored[key] = g
    except (KeyError, TypeError) as e:
        # a truncated or hand-edited file: a group that is not an object or lacks a key
        raise SpecError(f"{where}: incomplete or malformed groups ({type(e).__name__}: {e}); regenerate it with cdp-convert") from None
    try:
        target = resolve(spec, shape)
    except SpecError as e:
        raise SpecError(f"{where}: {e}") from None
    if set(stored) != {g.key for g in target.groups}:
        raise SpecError(f"{where}: its groups do not match its source spec and shape; regenerate it with cdp-convert")
    for g in target.groups:
        s = stored[g.key]
        for hp, v in g.hyperparameters().items():
            if not _close(s.get(hp), v):
                raise SpecError(
                    f"{where}: group {g.key} has {hp}={s.get(hp)!r} but its source spec gives {v!r}; "
                    "regenerate it with cdp-convert (targets are not edited by hand)"
                )
    expected = target.to_dict()
    for key in raw:
        if key not in expected:
            raise SpecError(f"{where}: {key}: unknown key in a target; regenerate it with cdp-convert")
    warnings = raw.get("warnings", [])
    if not isinstance(warnings, list) or not all(isinstance(w, str) for w in warnings):
        raise SpecError(f"{where}: warnings: not a list of strings; regenerate it with cdp-convert")
    for key, want in expected.items():
        # warnings are advice recomputed from the spec (a release may add or reword one): the
        # re-resolved target carries this release's, and a stored list is not compared
        if key in ("source_spec", "groups", "warnings"):
            continue
        have = raw.get(key)
        if key == "shape" and isinstance(have, dict):
            # fields added to the shape after files were first written (add_qkv_bias,
            # apply_layernorm_1p, squared_relu): absent in older files, their default there
            have = {**{f.name: f.default for f in fields(Shape) if f.default is not MISSING}, **have}
        diff = _difference(have, want, key)
        if diff is not None:
            at, have, want_at = diff
            raise SpecError(
                f"{where}: {at} is {have!r} but its source spec gives {want_at!r}; "
                "regenerate it with cdp-convert (targets are not edited by hand)"
            )
    return target


def _difference(have: Any, want: Any, path: str) -> tuple[str, Any, Any] | None:
    """The first (path, stored, recomputed) leaf where a stored JSON value disagrees."""
    if isinstance(want, dict):
        if not isinstance(have, dict) or set(have) != set(want):
            return path, have, want
        for k in want:
            d = _difference(have[k], want[k], f"{path}.{k}")
            if d:
                return d
        return None
    if isinstance(want, list):
        if not isinstance(have, list) or len(have) != len(want):
            return path, have, want
        for i, (h, w) in enumerate(zip(have, want)):
            d = _difference(h, w, f"{path}[{i}]")
            if d:
                return d
        return None
    if isinstance(want, (bool, str)) or want is None:
        return None if type(have) is type(want) and have == want else (path, have, want)
    return None if _close(have, want) else (path, have, want)


def _close(a: Any, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    if isinstance(a, bool) or not isinstance(a, (int, float)):  # "0.5" is not 0.5
        return False
    try:
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0) or a == b
    except OverflowError:  # a 400-digit integer
        return False
