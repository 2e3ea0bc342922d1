"""Search spaces of per-module multipliers, built from a base spec (method.md section 5).

A search space is a list of named, positive multipliers ("dimensions"), each searched on a
log scale between bounds (default [2^-6, 2^6]). A trial's parameters multiply **on top of**
the base spec's own multipliers, so 1 everywhere is the base spec itself and a search can
continue from a previous result (export it, pass it as the new base). Four spaces, from
coarse to fine (paper Figure 11), for each searched hyperparameter ``hp``:

=============  ============================================  ==============================
space          dimensions                                    parameter names
=============  ============================================  ==============================
``global``     one multiplier for every group                ``global/lr``
``type``       one per type a_g (and per residual block)     ``type/q/lr``,
                                                             ``type/attention/residual``
``kronecker``  per type a_g plus per depth d_l (the paper's  ``type/q/lr``, ``depth/lr/3``
(default)      |M| + L factorisation)
``uncoupled``  per (type, layer) inside the layers, per      ``layer/q/lr/2``,
               type outside them (embeddings, final norm,    ``type/output/lr``
               output)
=============  ============================================  ==============================

Layers are numbered from 1. The paper's global-HP baseline (method.md section 6, Appendix
C.2) is the space ``global-grid``: categorical grids of absolute values (:data:`PAPER_GRID`),
named ``grid/lr``, turned into multipliers of the base's global values.

Which (type, hyperparameter) pairs are searched. Types are those the architecture has
(``Shape.groups()``: no ``mlp_gate`` without SwiGLU, no ``output`` with tied embeddings,
``TYPE.bias`` keys when the model has biases, which do not inherit the weight's multipliers);
the residual blocks ``attention`` and ``mlp`` take only ``residual``. Skipped, because the
multiplier could not change anything:

- ``init_std`` on norm gains and biases (they start at 1 and 0, not from N(0, sigma^2));
- ``weight_decay`` on groups without decay: norm gains and biases unless
  ``global.decay_norms_and_biases`` (Megatron's convention, ``target.resolve``). A base with
  ``global.weight_decay = 0`` cannot search weight decay at all (0 x m = 0): an error.
- ``residual`` on anything but the two blocks.

Beta multipliers act on (1 - beta) and must keep it <= 1: their upper bounds are lowered so
that no combination of factors in the box can push a beta below 0 (in ``kronecker`` the
type and depth factors of a layer group multiply, so each gets the square root of the
headroom).

Moving between spaces (paper Figure 11 b, c): every space maps its parameters to the same
table of log2 multipliers per (type, hyperparameter, layer) (:meth:`SearchSpace.table`), and
fits a table by least squares in log space (:meth:`SearchSpace.fit`). So the best result of a
coarser space initialises a finer one exactly (``type`` -> ``kronecker``: type factors kept,
depth factors 1), and a finer result is projected onto a coarser space as its closest
representable point (``uncoupled`` -> ``kronecker``: row and column means of the log table).
:func:`project` does both; enqueue the result with ``study.enqueue_trial``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from cdp_megatron.spec import (
    BLOCKS,
    HYPERPARAMETERS,
    LAYER_TYPES,
    Multipliers,
    Spec,
    SpecError,
    is_random_init,
    param_class,
)

__all__ = [
    "SPACES",
    "GRID_SPACE",
    "DEFAULT_SPACE",
    "DEFAULT_BOUNDS",
    "PAPER_GRID",
    "SpaceError",
    "Dimension",
    "SearchSpace",
    "Projection",
    "multipliers",
    "to_spec",
    "project",
    "parse_search",
]

SPACES: tuple[str, ...] = ("global", "type", "kronecker", "uncoupled")
GRID_SPACE = "global-grid"
DEFAULT_SPACE = "kronecker"
DEFAULT_BOUNDS: tuple[float, float] = (2.0**-6, 2.0**6)

# The paper's global-HP random search (Appendix C.2) names only the ranges; these grids are
# our discretisation of them: 1-2-5 steps per decade for lr, decades for eps, the usual
# betas, and 1-3 steps per decade for weight decay up to 0.4.
PAPER_GRID: dict[str, tuple[float, ...]] = {
    "lr": (1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1),
    "eps": (1e-14, 1e-13, 1e-12, 1e-11, 1e-10, 1e-9, 1e-8, 1e-7),
    "beta1": (0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999),
    "beta2": (0.9, 0.95, 0.98, 0.99, 0.995, 0.999),
    "weight_decay": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.2, 0.4),
}
# Base global value each grid hyperparameter is relative to (beta grids act on 1 - beta).
_GLOBAL_FIELD = {"lr": "lr", "eps": "adam_eps", "beta1": "adam_beta1", "beta2": "adam_beta2",
                 "weight_decay": "weight_decay"}
_NORM_CLASSES = ("hidden_norm", "qk_norm", "unembedding_ln")


class SpaceError(ValueError):
    """A search space that cannot be built, or parameters that do not belong to one."""


def parse_search(text: str | Sequence[str]) -> tuple[str, ...]:
    """'lr,weight_decay' -> ('lr', 'weight_decay'); unknown names raise SpaceError."""
    items = [s.strip() for s in (text.split(",") if isinstance(text, str) else text)]
    items = [s for s in items if s]
    if not items:
        raise SpaceError(f"no hyperparameter to search; give some of {', '.join(HYPERPARAMETERS)}")
    for hp in items:
        if hp not in HYPERPARAMETERS:
            raise SpaceError(f"unknown hyperparameter {hp!r}; use some of {', '.join(HYPERPARAMETERS)}")
    if len(set(items)) != len(items):
        raise SpaceError(f"hyperparameter listed twice in {','.join(items)}")
    return tuple(items)


@dataclasses.dataclass(frozen=True)
class Dimension:
    """One searched multiplier."""

    name: str
    """Optuna parameter name, e.g. ``type/q/lr``, ``depth/lr/3``, ``layer/q/lr/2``."""
    scope: str
    """``global``, ``type``, ``depth``, ``layer`` or ``grid``."""
    hp: str
    key: str | None
    """Type (``q``, ``q.bias``) or residual block; None for global, depth and grid."""
    layer: int | None
    """1-based layer of ``depth`` and ``layer`` dimensions."""
    low: float
    high: float
    choices: tuple[float, ...] | None = None
    """Absolute values of a ``grid`` dimension (then low/high are unused)."""

    def distribution(self):
        from optuna.distributions import CategoricalDistribution, FloatDistribution

        if self.choices is not None:
            return CategoricalDistribution(self.choices)
        return FloatDistribution(self.low, self.high, log=True)


# --------------------------------------------------------------------------- architecture


def _keys(spec: Spec) -> list[tuple[str, bool]]:
    """(key, inside the layers) for every parameter key of the architecture, then blocks."""
    seen: dict[str, bool] = {}
    for type_, layer, param in spec.base.shape.groups():
        seen.setdefault(type_ if param == "weight" else f"{type_}.bias", layer is not None)
    return [*seen.items(), *((b, True) for b in BLOCKS)]


def _has_hp(spec: Spec, key: str, hp: str) -> bool:
    """Whether a multiplier of ``hp`` on ``key`` can change the resolved run."""
    if key in BLOCKS or hp == "residual":
        return key in BLOCKS and hp == "residual"
    type_, _, bias = key.partition(".")
    param = "bias" if bias else "weight"
    if hp == "init_std":
        return is_random_init(type_, param)
    if hp == "weight_decay":  # the decay rule of target.resolve
        return (param == "weight" and param_class(type_, param) not in _NORM_CLASSES) or spec.globals.decay_norms_and_biases
    return True


def _base_mult(spec: Spec, key: str, hp: str, layer: int | None) -> float:
    m = spec.multipliers
    return m.type_mult(key, hp) * m.depth_mult(hp, layer) * m.layer_mult(key, hp, layer)


def _beta_cap(spec: Spec, key: str, hp: str, layer: int | None) -> float:
    """Largest extra multiplier of (1 - beta) that keeps beta >= 0 for (key, layer)."""
    base = 1.0 - getattr(spec.globals, _GLOBAL_FIELD[hp])
    layers = [layer] if layer is not None or key not in _layer_keys(spec) else range(1, spec.base.shape.num_layers + 1)
    # A hair below the exact limit, so that rounding in the products never gives beta < 0.
    return min(1.0 / (base * _base_mult(spec, key, hp, l)) for l in layers) * (1 - 1e-9)


def _layer_keys(spec: Spec) -> set[str]:
    return {k for k, inside in _keys(spec) if inside}


# ------------------------------------------------------------------------------ the space


class SearchSpace:
    """The dimensions of one search over a base spec.

    Args:
        base: The base spec; its multipliers are the centre (all parameters 1).
        kind: One of :data:`SPACES` or :data:`GRID_SPACE`.
        search: Hyperparameters to search (subset of ``spec.HYPERPARAMETERS``).
        bounds: (low, high) of every multiplier, searched on a log scale.
    """

    def __init__(
        self,
        base: Spec,
        kind: str = DEFAULT_SPACE,
        search: Sequence[str] = ("lr",),
        *,
        bounds: tuple[float, float] = DEFAULT_BOUNDS,
    ) -> None:
        if kind not in (*SPACES, GRID_SPACE):
            raise SpaceError(f"unknown space {kind!r}; use one of {', '.join(SPACES)} (or {GRID_SPACE})")
        self.search = parse_search(search)
        low, high = (float(b) for b in bounds)
        if not (0 < low <= 1 <= high and math.isfinite(high)):
            raise SpaceError(f"bounds [{low:g}, {high:g}] must satisfy 0 < low <= 1 <= high (1 is the base spec)")
        if "weight_decay" in self.search and base.globals.weight_decay == 0:
            raise SpaceError(
                "weight_decay: the base has global.weight_decay = 0, which no multiplier can change; "
                "set a non-zero base weight decay or drop weight_decay from --search"
            )
        self.base, self.kind, self.bounds = base, kind, (low, high)
        self.num_layers = base.base.shape.num_layers
        self._keys = _keys(base)
        self._layer_keys = {k for k, inside in self._keys if inside}
        self.dimensions: tuple[Dimension, ...] = tuple(self._build())
        self._by_name = {d.name: d for d in self.dimensions}

    def __repr__(self) -> str:
        return f"SearchSpace({self.kind}, search={','.join(self.search)}, {len(self.dimensions)} dimensions)"

    # ---- construction -----------------------------------------------------------------------

    def keys(self, hp: str) -> list[tuple[str, bool]]:
        """(key, inside the layers) of every key whose ``hp`` is searched."""
        return [(k, inside) for k, inside in self._keys if _has_hp(self.base, k, hp)]

    def _dim(self, name: str, scope: str, hp: str, key: str | None, layer: int | None, cap: float) -> Dimension:
        low, high = self.bounds
        high = min(high, cap)
        if high < low:
            raise SpaceError(
                f"{name}: the base's (1 - {hp}) leaves no room above the lower bound {low:g}; "
                f"lower the base's {hp} multipliers or the lower bound"
            )
        return Dimension(name, scope, hp, key, layer, low, high)

    def _build(self):
        spec, L = self.base, self.num_layers
        for hp in self.search:
            keys = self.keys(hp)
            beta = hp in ("beta1", "beta2")

            def cap(key: str | None, layer: int | None, factors: int = 1) -> float:
                if not beta:
                    return math.inf
                pairs = keys if key is None else [(key, None)]
                c = min(_beta_cap(spec, k, hp, layer) for k, _ in pairs)
                return c ** (1.0 / factors)

            if self.kind == GRID_SPACE:
                if hp not in PAPER_GRID:
                    raise SpaceError(f"the {GRID_SPACE} baseline has no grid for {hp}; search some of {', '.join(PAPER_GRID)}")
                choices = self._grid_choices(hp, cap(None, None))
                yield Dimension(f"grid/{hp}", "grid", hp, None, None, min(choices), max(choices), choices)
            elif self.kind == "global":
                yield self._dim(f"global/{hp}", "global", hp, None, None, cap(None, None))
            elif self.kind == "type":
                for key, _ in keys:
                    yield self._dim(f"type/{key}/{hp}", "type", hp, key, None, cap(key, None))
            elif self.kind == "kronecker":
                for key, inside in keys:
                    yield self._dim(f"type/{key}/{hp}", "type", hp, key, None, cap(key, None, 2 if inside else 1))
                layer_keys = [(k, i) for k, i in keys if i]
                for layer in range(1, L + 1):
                    c = min((_beta_cap(spec, k, hp, None) for k, _ in layer_keys), default=math.inf) ** 0.5 if beta else math.inf
                    yield self._dim(f"depth/{hp}/{layer}", "depth", hp, None, layer, c)
            else:  # uncoupled
                for key, inside in keys:
                    if not inside:
                        yield self._dim(f"type/{key}/{hp}", "type", hp, key, None, cap(key, None))
                        continue
                    for layer in range(1, L + 1):
                        c = _beta_cap(spec, key, hp, layer) if beta else math.inf
                        yield self._dim(f"layer/{key}/{hp}/{layer}", "layer", hp, key, layer, c)

    def _grid_choices(self, hp: str, cap: float) -> tuple[float, ...]:
        base = getattr(self.base.globals, _GLOBAL_FIELD[hp])
        if hp in ("beta1", "beta2"):
            ok = tuple(v for v in PAPER_GRID[hp] if (1 - v) / (1 - base) <= cap * (1 + 1e-12))
        else:
            ok = PAPER_GRID[hp]
        if not ok:
            raise SpaceError(f"grid/{hp}: no grid value keeps beta in [0, 1) with the base's multipliers")
        return ok

    # ---- optuna -----------------------------------------------------------------------------

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.dimensions)

    def distributions(self) -> dict[str, Any]:
        """Optuna distributions by parameter name (for ``study.ask`` or ``enqueue_trial``)."""
        return {d.name: d.distribution() for d in self.dimensions}

    def sample(self, trial) -> dict[str, float]:
        """Suggest every dimension on an ``optuna.Trial``; returns the parameters."""
        out = {}
        for d in self.dimensions:
            if d.choices is not None:
                out[d.name] = trial.suggest_categorical(d.name, d.choices)
            else:
                out[d.name] = trial.suggest_float(d.name, d.low, d.high, log=True)
        return out

    def suggest(self, trial) -> Multipliers:
        """Suggest every dimension and return the multipliers of the trial (base x params)."""
        return multipliers(self.base, self.sample(trial))

    def center(self) -> dict[str, float]:
        """The base spec itself: every multiplier 1 (grid: the value nearest the base's)."""
        return self.fit({})

    def to_spec(self, params: Mapping[str, float], **kwargs: Any) -> Spec:
        self.check(params)
        return to_spec(self.base, params, **kwargs)

    def check(self, params: Mapping[str, float]) -> None:
        """Raise SpaceError unless ``params`` has exactly this space's names within bounds."""
        missing = [n for n in self.names if n not in params]
        unknown = [n for n in params if n not in self._by_name]
        if missing or unknown:
            raise SpaceError(f"parameters do not match the {self.kind} space: missing {missing[:5]}, unknown {unknown[:5]}")
        for name, value in params.items():
            d = self._by_name[name]
            if d.choices is not None:
                if value not in d.choices:
                    raise SpaceError(f"{name}: {value!r} is not one of the grid values {d.choices}")
            elif not (d.low * (1 - 1e-9) <= value <= d.high * (1 + 1e-9)):
                raise SpaceError(f"{name}: {value!r} is outside the bounds [{d.low:g}, {d.high:g}]")

    # ---- moving between spaces --------------------------------------------------------------

    def _log2_mult(self, d: Dimension, value: float) -> float:
        if d.scope == "grid":
            return math.log2(_grid_multiplier(self.base, d.hp, value))
        return math.log2(value)

    def table(self, params: Mapping[str, float]) -> dict[tuple[str, str], list[float]]:
        """log2 multipliers (relative to the base) per (key, hp): one value per layer for keys
        inside the layers, a single value for the others. Exact for every space."""
        out: dict[tuple[str, str], list[float]] = {}
        for hp in self.search:
            for key, inside in self.keys(hp):
                out[(key, hp)] = [0.0] * (self.num_layers if inside else 1)
        for name, value in params.items():
            d = self._by_name.get(name)
            if d is None:
                raise SpaceError(f"{name!r} is not a parameter of this {self.kind} space")
            x = self._log2_mult(d, value)
            for (key, hp), row in out.items():
                if hp != d.hp:
                    continue
                if d.scope in ("global", "grid") or (d.scope == "type" and key == d.key):
                    out[(key, hp)] = [v + x for v in row]
                elif d.scope == "depth" and key in self._layer_keys:
                    row[d.layer - 1] += x
                elif d.scope == "layer" and key == d.key:
                    row[d.layer - 1] += x
        return out

    def fit(self, table: Mapping[tuple[str, str], Sequence[float]]) -> dict[str, float]:
        """The parameters of this space closest to ``table`` (least squares in log2), clipped to
        the bounds; (key, hp) pairs absent from the table count as 0 (multiplier 1)."""
        return self._fit(table)[0]

    def _fit(self, table: Mapping[tuple[str, str], Sequence[float]]) -> tuple[dict[str, float], list[str]]:
        logs: dict[str, float] = {}
        for hp in self.search:
            rows = {key: list(table.get((key, hp), [0.0] * (self.num_layers if inside else 1))) for key, inside in self.keys(hp)}
            everything = [v for row in rows.values() for v in row]
            grand_all = sum(everything) / len(everything) if everything else 0.0
            layer_rows = {k: r for k, r in rows.items() if k in self._layer_keys}
            row_mean = {k: sum(r) / len(r) for k, r in rows.items()}
            grand = sum(row_mean[k] for k in layer_rows) / len(layer_rows) if layer_rows else 0.0
            col_mean = [
                sum(r[l] for r in layer_rows.values()) / len(layer_rows) if layer_rows else 0.0
                for l in range(self.num_layers)
            ]
            for d in self.dimensions:
                if d.hp != hp:
                    continue
                if d.scope in ("global", "grid"):
                    logs[d.name] = grand_all
                elif d.scope == "type":
                    logs[d.name] = row_mean[d.key]
                elif d.scope == "depth":
                    logs[d.name] = col_mean[d.layer - 1] - grand
                else:
                    logs[d.name] = rows[d.key][d.layer - 1]
        params, clipped = {}, []
        for d in self.dimensions:
            x = logs[d.name]
            if d.choices is not None:  # the grid value nearest in log2
                params[d.name] = min(d.choices, key=lambda v: abs(math.log2(_grid_multiplier(self.base, d.hp, v)) - x))
                continue
            lo, hi = math.log2(d.low), math.log2(d.high)
            if x < lo - 1e-12 or x > hi + 1e-12:
                clipped.append(d.name)
            params[d.name] = min(max(2.0 ** min(max(x, lo), hi), d.low), d.high)
        return params, clipped

    def config(self) -> dict[str, Any]:
        return {"space": self.kind, "search": list(self.search), "bounds": list(self.bounds)}


def _base_value(spec: Spec, hp: str) -> float:
    return getattr(spec.globals, _GLOBAL_FIELD[hp])


def _grid_multiplier(spec: Spec, hp: str, value: float) -> float:
    """Multiplier that turns the base's global value into the absolute grid value."""
    base = _base_value(spec, hp)
    if hp in ("beta1", "beta2"):
        return (1.0 - value) / (1.0 - base)
    return value / base


# ------------------------------------------------------------------ parameters -> spec


def multipliers(base: Spec, params: Mapping[str, float]) -> Multipliers:
    """The base spec's multipliers times the trial's parameters (names are self-describing:
    ``global/hp``, ``grid/hp``, ``type/KEY/hp``, ``depth/hp/L``, ``layer/KEY/hp/L``)."""
    L = base.base.shape.num_layers
    m = base.multipliers
    per_type = {k: dict(v) for k, v in m.type.items()}
    depth = {hp: list(v) for hp, v in m.depth.items()}
    layer = {k: {hp: list(v) for hp, v in hps.items()} for k, hps in m.layer.items()}

    def bad(name: str, why: str) -> SpaceError:
        return SpaceError(f"parameter {name!r}: {why}")

    def mult_type(key: str, hp: str, x: float) -> None:
        per_type.setdefault(key, {})[hp] = per_type.get(key, {}).get(hp, 1.0) * x

    def layer_index(name: str, text: str) -> int:
        if not text.isdigit() or not 1 <= int(text) <= L:
            raise bad(name, f"layer {text!r} is not in 1..{L}")
        return int(text) - 1

    keys = _keys(base)
    for name, value in params.items():
        parts = name.split("/")
        scope = parts[0]
        if scope == "grid":
            if len(parts) != 2 or parts[1] not in PAPER_GRID:
                raise bad(name, f"expected grid/HP with HP one of {', '.join(PAPER_GRID)}")
            value, scope = _grid_multiplier(base, parts[1], float(value)), "global"
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise bad(name, f"multiplier {value!r} is not a positive finite number")
        if scope == "global" and len(parts) == 2:
            hp = parts[1]
            if hp not in HYPERPARAMETERS:
                raise bad(name, f"unknown hyperparameter {hp!r}")
            for key, _ in keys:
                if _has_hp(base, key, hp):
                    mult_type(key, hp, value)
        elif scope == "type" and len(parts) == 3:
            _, key, hp = parts
            if key not in dict(keys) or not _has_hp(base, key, hp):
                raise bad(name, f"{key} has no searchable {hp} in this architecture")
            mult_type(key, hp, value)
        elif scope == "depth" and len(parts) == 3:
            _, hp, l = parts
            if hp not in HYPERPARAMETERS:
                raise bad(name, f"unknown hyperparameter {hp!r}")
            i = layer_index(name, l)
            depth.setdefault(hp, [1.0] * L)[i] *= value
        elif scope == "layer" and len(parts) == 4:
            _, key, hp, l = parts
            if key.partition(".")[0] not in (*LAYER_TYPES, *BLOCKS) or not dict(keys).get(key) or not _has_hp(base, key, hp):
                raise bad(name, f"{key} has no searchable per-layer {hp} in this architecture")
            i = layer_index(name, l)
            layer.setdefault(key, {}).setdefault(hp, [1.0] * L)[i] *= value
        else:
            raise bad(name, "expected global/HP, grid/HP, type/KEY/HP, depth/HP/LAYER or layer/KEY/HP/LAYER")
    # Leave out what is exactly 1 (absent means 1), so the written spec stays readable.
    per_type = {k: {hp: v for hp, v in hps.items() if v != 1.0} for k, hps in per_type.items()}
    layer = {k: {hp: v for hp, v in hps.items() if any(x != 1.0 for x in v)} for k, hps in layer.items()}
    return Multipliers(
        type={k: hps for k, hps in per_type.items() if hps},
        depth={hp: v for hp, v in depth.items() if any(x != 1.0 for x in v)},
        layer={k: hps for k, hps in layer.items() if hps},
    )


def to_spec(
    base: Spec,
    params: Mapping[str, float],
    *,
    description: str | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> Spec:
    """A valid spec (``base.json``) with the trial's multipliers on top of the base's.

    The result is checked the way ``load_spec`` and ``cdp-convert`` will check it (a JSON round
    trip through ``Spec.from_dict`` and a resolution at the base shape); ``provenance`` is
    stored as the spec's ``provenance`` (the base's own provenance goes under ``source``).
    """
    from cdp_megatron.target import resolve

    prov = dict(provenance or {})
    if base.provenance and "source" not in prov:
        prov["source"] = base.provenance
    spec = Spec(
        base=base.base,
        globals=base.globals,
        multipliers=multipliers(base, params),
        description=base.description if description is None else description,
        provenance=prov,
    )
    try:
        spec = Spec.from_dict(spec.to_dict())
        resolve(spec)
    except SpecError as e:
        raise SpaceError(f"the parameters give an invalid spec: {e}") from None
    return spec


# ------------------------------------------------------------------------------ projection


@dataclasses.dataclass(frozen=True)
class Projection:
    params: dict[str, float]
    """Parameters of the target space (within its bounds), ready for ``study.enqueue_trial``."""
    clipped: tuple[str, ...]
    """Target parameters whose least-squares value fell outside the bounds and was clipped."""
    dropped: tuple[str, ...]
    """Searched hyperparameters of the source that the target does not search (lost)."""


def project(params: Mapping[str, float], source: SearchSpace, target: SearchSpace) -> Projection:
    """Carry a result of ``source`` into ``target`` (paper Figure 11 b/c).

    Both spaces must be built on the same base spec. From a coarser space this is exact (an
    initialisation of the finer search); from a finer one it is the least-squares projection
    of the log multipliers. Hyperparameters the target searches and the source does not start
    at 1; those only the source searches are reported in ``dropped``.
    """
    if source.base.to_dict() | {"provenance": None, "description": None} != target.base.to_dict() | {
        "provenance": None,
        "description": None,
    }:
        raise SpaceError("the two spaces have different base specs; projection needs the same base")
    source.check(params)
    fitted, clipped = target._fit(source.table(params))
    dropped = tuple(hp for hp in source.search if hp not in target.search)
    return Projection(fitted, tuple(clipped), dropped)
