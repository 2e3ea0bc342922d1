"""The scaling rules of Complete(d)P: Table 1 (width and depth) and the SDE rules (batch and
duration), as pure functions of scalars.

Notation (method.md section 1): ``width_mult`` m_N = N / N_b, ``depth_mult`` m_L = L / L_b,
``batch_mult`` m_B = B / B_b (tokens per optimizer step), ``tokens_mult`` m_D = D / D_b
(training tokens), ``alpha`` in [1/2, 1] the depth exponent.

Every width/depth rule is a power law  m_N^n * m_L^(l0 + la * alpha), held in a
:class:`Power`. Table 1 is transcribed cell by cell into ``_TABLE`` below; a cell that is
not listed is x1. This module imports nothing outside the standard library.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "PARAMETERISATIONS",
    "DEFAULT_PARAMETERISATION",
    "DEFAULT_ALPHA",
    "PARAM_CLASSES",
    "QUANTITIES",
    "Power",
    "width_depth_factor",
    "init_std_factor",
    "residual_factor",
    "output_forward_factor",
    "SdeFactors",
    "sde_factors",
    "interpolate_depth",
]

Parameterisation = Literal["sp", "mup", "completep", "completedp"]
PARAMETERISATIONS: tuple[str, ...] = ("sp", "mup", "completep", "completedp")
DEFAULT_PARAMETERISATION = "completedp"
# Both alpha = 1/2 and alpha = 1 transfer under Complete(d)P (paper, Figure 2); at the
# largest depth the paper reports a slightly better optimum for 1/2 (the "feature
# diversity" argument of Yang et al. 2024), and Dey et al.'s degradation at 1/2 did not
# reproduce with QK-norm. We default to 1/2 and always print the alpha used.
DEFAULT_ALPHA = 0.5

# Parameter classes of method.md section 2.
PARAM_CLASSES: tuple[str, ...] = (
    "input_embedding",  # word (and learned position) embeddings
    "hidden_weight",  # Q, K, V, attention output, MLP gate/up/down matrices
    "hidden_bias",  # biases of the hidden weights
    "hidden_norm",  # pre-attention and pre-MLP norm gains (and LayerNorm biases)
    "qk_norm",  # QK-norm gains (size head_dim, shared across heads)
    "unembedding_ln",  # final norm before the output layer
    "unembedding_weight",  # output layer weight
    "output_bias",  # output layer bias
)
# Quantities with a per-class width/depth rule. init_var is the init *variance* row of
# Table 1; init_std_factor() takes its square root.
QUANTITIES: tuple[str, ...] = ("init_var", "lr", "eps", "weight_decay")


@dataclass(frozen=True)
class Power:
    """The factor m_N^n * m_L^(l0 + la * alpha)."""

    n: float = 0.0
    l0: float = 0.0
    la: float = 0.0

    def __call__(self, width_mult: float, depth_mult: float, alpha: float) -> float:
        return width_mult**self.n * depth_mult ** (self.l0 + self.la * alpha)

    def __str__(self) -> str:
        parts = []
        if self.n:
            parts.append(f"m_N^{self.n:g}")
        if self.l0 or self.la:
            exp = " + ".join(
                p for p in (f"{self.l0:g}" if self.l0 else "", f"{self.la:g}*alpha" if self.la else "") if p
            )
            parts.append(f"m_L^({exp})")
        return " * ".join(parts) if parts else "1"


ONE = Power()
_N = Power(n=1.0)  # m_N
_INV_N = Power(n=-1.0)  # m_N^-1
_INV_N2 = Power(n=-2.0)  # m_N^-2
_L_A_MINUS_1 = Power(l0=-1.0, la=1.0)  # m_L^(alpha - 1)
_INV_N_L_A_MINUS_1 = Power(n=-1.0, l0=-1.0, la=1.0)  # m_N^-1 m_L^(alpha - 1)
_INV_L_A = Power(la=-1.0)  # m_L^-alpha
_INV_N_INV_L_A = Power(n=-1.0, la=-1.0)  # m_N^-1 m_L^-alpha

_HIDDEN = ("hidden_weight", "hidden_bias", "hidden_norm")

# Table 1, muP column ("muP (Table 3)", no output multiplier). QK norms are "NA" in the
# table for muP (muP predates them); we apply the hidden-norm row, which is what a muP
# implementation that knows nothing about QK-norm does.
_MUP: dict[tuple[str, str], Power] = {
    ("init_var", "hidden_weight"): _INV_N,
    ("init_var", "unembedding_weight"): _INV_N2,
    ("lr", "hidden_weight"): _INV_N,
    ("lr", "unembedding_weight"): _INV_N,
    **{("eps", c): _INV_N for c in (*_HIDDEN, "qk_norm", "input_embedding")},
    ("weight_decay", "hidden_weight"): _N,
    ("weight_decay", "unembedding_weight"): _N,
}

# Table 1, Complete(d)P column.
_COMPLETEDP: dict[tuple[str, str], Power] = {
    ("init_var", "hidden_weight"): _INV_N,
    ("init_var", "unembedding_weight"): _INV_N2,
    ("lr", "hidden_weight"): _INV_N_L_A_MINUS_1,
    ("lr", "hidden_bias"): _L_A_MINUS_1,
    ("lr", "hidden_norm"): _L_A_MINUS_1,
    ("lr", "qk_norm"): _L_A_MINUS_1,
    ("lr", "unembedding_weight"): _INV_N,
    **{("eps", c): _INV_N_INV_L_A for c in _HIDDEN},
    ("eps", "qk_norm"): _INV_L_A,
    ("eps", "input_embedding"): _INV_N,
    ("weight_decay", "hidden_weight"): _N,
    ("weight_decay", "unembedding_weight"): _N,
}

# CompleteP (Dey et al. 2025): the grey cells of Table 1. Unembedding init variance x1 and
# LR x1 (its m_N^-1 lives in the forward multiplier instead), input-embedding eps x1, and
# QK norms "NA": we apply the hidden-norm row (m_N^-1 m_L^-alpha).
_COMPLETEP: dict[tuple[str, str], Power] = {
    **_COMPLETEDP,
    ("init_var", "unembedding_weight"): ONE,
    ("lr", "unembedding_weight"): ONE,
    ("eps", "qk_norm"): _INV_N_INV_L_A,
    ("eps", "input_embedding"): ONE,
}

_TABLE: dict[str, dict[tuple[str, str], Power]] = {
    "sp": {},
    "mup": _MUP,
    "completep": _COMPLETEP,
    "completedp": _COMPLETEDP,
}


def _check(parameterisation: str, quantity: str, param_class: str) -> None:
    if parameterisation not in _TABLE:
        raise ValueError(
            f"unknown parameterisation {parameterisation!r}: use one of {', '.join(PARAMETERISATIONS)}"
        )
    if quantity not in QUANTITIES:
        raise ValueError(f"unknown quantity {quantity!r}: use one of {', '.join(QUANTITIES)}")
    if param_class not in PARAM_CLASSES:
        raise ValueError(f"unknown parameter class {param_class!r}: use one of {', '.join(PARAM_CLASSES)}")


def table_cell(parameterisation: str, quantity: str, param_class: str) -> Power:
    """The Table 1 cell (a :class:`Power`) for a quantity and parameter class; x1 if blank."""
    _check(parameterisation, quantity, param_class)
    return _TABLE[parameterisation].get((quantity, param_class), ONE)


def width_depth_factor(
    parameterisation: str,
    quantity: str,
    param_class: str,
    width_mult: float,
    depth_mult: float,
    alpha: float,
) -> float:
    """Table 1: the factor that multiplies the base value of ``quantity`` for ``param_class``.

    Complete(d)P rows (muP and CompleteP differ where noted in ``_TABLE``):
      init variance: hidden weights m_N^-1, unembedding weights m_N^-2, others 1
      lr:            hidden weights m_N^-1 m_L^(alpha-1); hidden biases/norms and QK norms
                     m_L^(alpha-1); unembedding weights m_N^-1; others 1
      AdamW eps:     hidden weights/biases/norms m_N^-1 m_L^-alpha; QK norms m_L^-alpha;
                     input embedding m_N^-1; output weights/biases/norms 1
      weight decay:  hidden and unembedding weights m_N; others 1
    """
    return table_cell(parameterisation, quantity, param_class)(width_mult, depth_mult, alpha)


def init_std_factor(parameterisation: str, param_class: str, width_mult: float, depth_mult: float, alpha: float) -> float:
    """Init standard deviation factor: the square root of Table 1's init-variance row
    (hidden weights m_N^-1/2, unembedding weights m_N^-1 under muP and Complete(d)P)."""
    return math.sqrt(width_depth_factor(parameterisation, "init_var", param_class, width_mult, depth_mult, alpha))


def residual_factor(parameterisation: str, depth_mult: float, alpha: float) -> float:
    """Table 1, "MHA/MLP Residual": x + m_L^-alpha Block(x) for CompleteP and Complete(d)P,
    x + Block(x) for SP and muP."""
    _check(parameterisation, "lr", "hidden_weight")
    if parameterisation in ("completep", "completedp"):
        return _INV_L_A(1.0, depth_mult, alpha)
    return 1.0


def output_forward_factor(parameterisation: str, width_mult: float) -> float:
    """Table 1, "Unemb. Fwd": logits x m_N^-1 for CompleteP only; Complete(d)P folds it into
    the unembedding's init (m_N^-2 variance) and LR (m_N^-1)."""
    _check(parameterisation, "lr", "hidden_weight")
    return 1.0 / width_mult if parameterisation == "completep" else 1.0


@dataclass(frozen=True)
class SdeFactors:
    """Multipliers of method.md section 4 (Table 1, right-hand column)."""

    lr: float  # sqrt(m_B / m_D)
    weight_decay: float  # sqrt(m_B / m_D) (AdamW) or m_B / m_D (AdamLH)
    eps: float  # sqrt(m_D / m_B)
    one_minus_beta: float  # m_B / m_D, acting on (1 - beta1) and (1 - beta2)
    iterations: float  # m_D / m_B


WEIGHT_DECAY_RULES = ("adamw", "adamlh")
BETA_RULES = ("sde", "fixed")
"""How the batch/duration rule treats the Adam betas: "sde" scales (1 - beta) by m_B / m_D
(method.md section 4), "fixed" keeps the base's betas at every batch and horizon."""


def sde_factors(batch_mult: float, tokens_mult: float, weight_decay_rule: str = "adamw",
                beta_rule: str = "sde") -> SdeFactors:
    """Batch-size and duration rules (SDE view, Malladi et al. 2022, extended to AdamW).

    lr x sqrt(m_B/m_D); weight decay x sqrt(m_B/m_D) for PyTorch-style AdamW (decay step
    lr * wd * theta), or x m_B/m_D for AdamLH (decay not multiplied by the lr, so it takes
    the square of the lr factor); eps x sqrt(m_D/m_B); (1 - beta) x m_B/m_D (``beta_rule``
    "sde"; "fixed": x 1); iterations x m_D/m_B.
    """
    if not (batch_mult > 0 and tokens_mult > 0 and math.isfinite(batch_mult) and math.isfinite(tokens_mult)):
        raise ValueError(f"batch and token ratios must be positive and finite, got {batch_mult}, {tokens_mult}")
    if weight_decay_rule not in WEIGHT_DECAY_RULES:
        raise ValueError(f"unknown weight_decay_rule {weight_decay_rule!r}: use one of {', '.join(WEIGHT_DECAY_RULES)}")
    if beta_rule not in BETA_RULES:
        raise ValueError(f"unknown beta_rule {beta_rule!r}: use one of {', '.join(BETA_RULES)}")
    ratio = batch_mult / tokens_mult
    lr = math.sqrt(ratio)
    return SdeFactors(
        lr=lr,
        weight_decay=lr if weight_decay_rule == "adamw" else ratio,
        eps=math.sqrt(tokens_mult / batch_mult),
        one_minus_beta=ratio if beta_rule == "sde" else 1.0,
        iterations=tokens_mult / batch_mult,
    )


def interpolate_depth(values: list[float], num_layers: int) -> list[float]:
    """Per-depth multipliers at a new depth (method.md section 5).

    ``values[l-1]`` is the multiplier of layer l of L = len(values), read as a sample of a
    continuous function d(t) at the layer midpoint t_l = (l - 1/2) / L. The function is
    linear in log(d) between midpoints and constant outside the first and last midpoints;
    the result samples it at the new depth's midpoints. Same depth: the input, unchanged.
    """
    old = len(values)
    if old == 0:
        raise ValueError("per-depth multipliers must not be empty")
    if num_layers < 1:
        raise ValueError(f"num_layers must be positive, got {num_layers}")
    if num_layers == old:
        return list(values)
    logs = [math.log(v) for v in values]
    out = []
    for j in range(num_layers):
        # position of the new midpoint in units of old layers, measured from the first
        # old midpoint: s = t * L - 1/2, s in [0, L-1] between the first and last midpoints
        s = (j + 0.5) / num_layers * old - 0.5
        if s <= 0:
            out.append(values[0])
        elif s >= old - 1:
            out.append(values[-1])
        else:
            i = math.floor(s)
            w = s - i
            out.append(math.exp((1 - w) * logs[i] + w * logs[i + 1]))
    return out
