"""Golden and property tests of the pure rules (cdp_megatron.rules).

The expected values are a hand transcription of Table 1 (method.md section 3,
/work/shared/docs/table1.png) and of the SDE rules (method.md section 4), written as
formulas next to the table row they come from. They are never copied from the code's
output: a disagreement is a bug in one of the two transcriptions, to be settled against
the table.
"""

from __future__ import annotations

import itertools
import math

import pytest

from cdp_megatron import rules

CLASSES = (
    "input_embedding",
    "hidden_weight",
    "hidden_bias",
    "hidden_norm",
    "qk_norm",
    "unembedding_ln",
    "unembedding_weight",
    "output_bias",
)
PARAMETERISATIONS = ("sp", "mup", "completep", "completedp")
QUANTITIES = ("init_var", "lr", "eps", "weight_decay")

# (m_N, m_L, alpha, m_B, m_D): alpha = 1/2 and 1 (both ends of the range) and one in between;
# ratios above and below 1, batch and duration moving apart and together.
POINTS = [
    (4.0, 4.0, 0.5, 1.0, 1.0),
    (2.0, 8.0, 1.0, 2.0, 10.0),
    (0.5, 0.5, 0.5, 4.0, 1.0),
    (8.0, 2.0, 0.75, 0.5, 2.0),
    (3.0, 5.0, 1.0, 3.0, 3.0),
    (1.0, 1.0, 0.5, 1.0, 1.0),
]


# --------------------------------------------------------------------------- Table 1 by hand
#
# One function per column. Each returns, per class, the factors that multiply the base value:
# (init VARIANCE, learning rate, AdamW eps, weight decay). Blank cells of the table are 1.


def sp_cells(mN: float, mL: float, a: float) -> dict[str, tuple[float, float, float, float]]:
    # Standard parameterisation: nothing scales (Megatron's defaults).
    return {c: (1, 1, 1, 1) for c in CLASSES}


def mup_cells(mN: float, mL: float, a: float) -> dict[str, tuple[float, float, float, float]]:
    # Table 1, "muP (Table 3)" column (no output multiplier). QK norms are "NA" in the eps
    # row; the project's decision is to apply the hidden-norm row (and for lr / init the
    # hidden-norm rows, which are blank under muP).
    return {
        #                      init variance  learning rate  AdamW eps  weight decay
        "input_embedding":    (1,             1,             mN**-1,    1),
        "hidden_weight":      (mN**-1,        mN**-1,        mN**-1,    mN),
        "hidden_bias":        (1,             1,             mN**-1,    1),
        "hidden_norm":        (1,             1,             mN**-1,    1),
        "qk_norm":            (1,             1,             mN**-1,    1),
        "unembedding_ln":     (1,             1,             1,         1),
        "unembedding_weight": (mN**-2,        mN**-1,        1,         mN),
        "output_bias":        (1,             1,             1,         1),
    }  # fmt: skip


def completedp_cells(mN: float, mL: float, a: float) -> dict[str, tuple[float, float, float, float]]:
    # Table 1, "Complete(d)P" column (black entries).
    return {
        #                      init variance  learning rate          AdamW eps          weight decay
        "input_embedding":    (1,             1,                     mN**-1,            1),
        "hidden_weight":      (mN**-1,        mN**-1 * mL**(a - 1),  mN**-1 * mL**-a,   mN),
        "hidden_bias":        (1,             mL**(a - 1),           mN**-1 * mL**-a,   1),
        "hidden_norm":        (1,             mL**(a - 1),           mN**-1 * mL**-a,   1),
        "qk_norm":            (1,             mL**(a - 1),           mL**-a,            1),
        "unembedding_ln":     (1,             1,                     1,                 1),
        "unembedding_weight": (mN**-2,        mN**-1,                1,                 mN),
        "output_bias":        (1,             1,                     1,                 1),
    }  # fmt: skip


def completep_cells(mN: float, mL: float, a: float) -> dict[str, tuple[float, float, float, float]]:
    # Table 1, CompleteP = the grey entries beside the Complete(d)P column: unembedding
    # init variance [x1] and lr [x1] (its m_N^-1 is a forward multiplier instead), input
    # embedding eps [x1], QK-norm eps [NA] -> hidden-norm row (project decision).
    return {
        #                      init variance  learning rate          AdamW eps          weight decay
        "input_embedding":    (1,             1,                     1,                 1),
        "hidden_weight":      (mN**-1,        mN**-1 * mL**(a - 1),  mN**-1 * mL**-a,   mN),
        "hidden_bias":        (1,             mL**(a - 1),           mN**-1 * mL**-a,   1),
        "hidden_norm":        (1,             mL**(a - 1),           mN**-1 * mL**-a,   1),
        "qk_norm":            (1,             mL**(a - 1),           mN**-1 * mL**-a,   1),
        "unembedding_ln":     (1,             1,                     1,                 1),
        "unembedding_weight": (1,             1,                     1,                 mN),
        "output_bias":        (1,             1,                     1,                 1),
    }  # fmt: skip


CELLS = {"sp": sp_cells, "mup": mup_cells, "completep": completep_cells, "completedp": completedp_cells}


def residual_by_hand(p: str, mL: float, a: float) -> float:
    # Table 1, "MHA Residual" / "MLP Residual": x + m_L^-alpha Block(x) for CompleteP and
    # Complete(d)P; x + Block(x) for muP (and SP).
    return mL**-a if p in ("completep", "completedp") else 1.0


def forward_by_hand(p: str, mN: float) -> float:
    # Table 1, "Unemb. Fwd": unaugmented, except CompleteP's grey [x m_N^-1].
    return mN**-1 if p == "completep" else 1.0


def sde_by_hand(mB: float, mD: float, adamlh: bool = False) -> dict[str, float]:
    # method.md section 4 / Table 1 right-hand column.
    lr = (mB / mD) ** 0.5
    return {
        "lr": lr,
        "weight_decay": lr**2 if adamlh else (mB / mD) ** 0.5,  # AdamLH: m_eta^2
        "eps": (mD / mB) ** 0.5,
        "one_minus_beta": mB / mD,
        "iterations": mD / mB,
    }


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-300)


# --------------------------------------------------------------------------- golden: Table 1


@pytest.mark.parametrize("p", PARAMETERISATIONS)
@pytest.mark.parametrize("point", POINTS, ids=lambda pt: "mN{}_mL{}_a{}_mB{}_mD{}".format(*pt))
def test_width_depth_factor_golden(p, point):
    mN, mL, a, _, _ = point
    cells = CELLS[p](mN, mL, a)
    for cls in CLASSES:
        for q, expected in zip(QUANTITIES, cells[cls]):
            got = rules.width_depth_factor(p, q, cls, mN, mL, a)
            assert close(got, expected), (p, q, cls, point, got, expected)


@pytest.mark.parametrize("p", PARAMETERISATIONS)
@pytest.mark.parametrize("point", POINTS)
def test_init_std_is_sqrt_of_variance_row(p, point):
    mN, mL, a, _, _ = point
    cells = CELLS[p](mN, mL, a)
    for cls in CLASSES:
        assert close(rules.init_std_factor(p, cls, mN, mL, a), cells[cls][0] ** 0.5), (p, cls)


def test_init_std_explicit_values():
    # hidden weights: sigma^2 x m_N^-1 -> std x m_N^-1/2; unembedding: sigma^2 x m_N^-2 -> std x m_N^-1
    assert close(rules.init_std_factor("completedp", "hidden_weight", 4, 7, 0.5), 0.5)
    assert close(rules.init_std_factor("completedp", "unembedding_weight", 4, 7, 0.5), 0.25)
    assert close(rules.init_std_factor("mup", "unembedding_weight", 4, 7, 0.5), 0.25)
    assert close(rules.init_std_factor("completep", "unembedding_weight", 4, 7, 0.5), 1.0)
    # no depth factor on any init variance
    for p, cls in itertools.product(PARAMETERISATIONS, CLASSES):
        assert rules.init_std_factor(p, cls, 2.0, 16.0, 1.0) == rules.init_std_factor(p, cls, 2.0, 1.0, 1.0)


@pytest.mark.parametrize("p", PARAMETERISATIONS)
@pytest.mark.parametrize("point", POINTS)
def test_residual_and_forward_multipliers_golden(p, point):
    mN, mL, a, _, _ = point
    assert close(rules.residual_factor(p, mL, a), residual_by_hand(p, mL, a))
    assert close(rules.output_forward_factor(p, mN), forward_by_hand(p, mN))


def test_residual_explicit_values():
    assert close(rules.residual_factor("completedp", 4.0, 0.5), 0.5)  # 4^-1/2
    assert close(rules.residual_factor("completedp", 4.0, 1.0), 0.25)  # 4^-1
    assert close(rules.residual_factor("completep", 16.0, 0.5), 0.25)
    assert rules.residual_factor("mup", 16.0, 0.5) == 1.0
    assert rules.residual_factor("sp", 16.0, 1.0) == 1.0
    assert close(rules.output_forward_factor("completep", 8.0), 0.125)
    assert rules.output_forward_factor("completedp", 8.0) == 1.0


def test_explicit_cells_at_alpha_half_and_one():
    # A few cells spelled out as numbers, m_N = 4, m_L = 16.
    f = rules.width_depth_factor
    # alpha = 1/2: hidden lr m_N^-1 m_L^-1/2 = 1/4 * 1/4
    assert close(f("completedp", "lr", "hidden_weight", 4, 16, 0.5), 1 / 16)
    # alpha = 1 (ODE limit): hidden lr has no depth factor
    assert close(f("completedp", "lr", "hidden_weight", 4, 16, 1.0), 1 / 4)
    assert close(f("completedp", "lr", "hidden_norm", 4, 16, 1.0), 1.0)
    # eps hidden m_N^-1 m_L^-alpha: 1/4 * 1/4 (alpha 1/2), 1/4 * 1/16 (alpha 1)
    assert close(f("completedp", "eps", "hidden_bias", 4, 16, 0.5), 1 / 16)
    assert close(f("completedp", "eps", "hidden_bias", 4, 16, 1.0), 1 / 64)
    # QK norms: eps does not shrink with width under Complete(d)P
    assert close(f("completedp", "eps", "qk_norm", 4, 16, 0.5), 1 / 4)
    assert close(f("completep", "eps", "qk_norm", 4, 16, 0.5), 1 / 16)
    assert close(f("completedp", "weight_decay", "unembedding_weight", 4, 16, 0.5), 4.0)


# --------------------------------------------------------------------------- table differences


def _differing_cells(p1: str, p2: str) -> set[tuple[str, str]]:
    """Cells (quantity, class) where two parameterisations' rules differ, from the code:
    both the symbolic cells and their values at a generic point, plus the multiplier rows."""
    out = set()
    generic = (3.0, 5.0, 0.7)
    for q, cls in itertools.product(QUANTITIES, CLASSES):
        symbolic = rules.table_cell(p1, q, cls) != rules.table_cell(p2, q, cls)
        numeric = not close(rules.width_depth_factor(p1, q, cls, *generic), rules.width_depth_factor(p2, q, cls, *generic))
        assert symbolic == numeric, (p1, p2, q, cls)
        if numeric:
            out.add((q, cls))
    mN, mL, a = generic
    if not close(rules.residual_factor(p1, mL, a), rules.residual_factor(p2, mL, a)):
        out.add(("residual", "blocks"))
    if not close(rules.output_forward_factor(p1, mN), rules.output_forward_factor(p2, mN)):
        out.add(("forward", "unembedding_weight"))
    return out


# Hand-written from Table 1.
MUP_VS_COMPLETEDP = {
    # residual: x + Block(x) vs x + m_L^-alpha Block(x)
    ("residual", "blocks"),
    # lr: hidden weights gain m_L^(alpha-1); hidden biases/norm (incl. QK norms) x m_L^(alpha-1)
    ("lr", "hidden_weight"),
    ("lr", "hidden_bias"),
    ("lr", "hidden_norm"),
    ("lr", "qk_norm"),
    # eps: hidden weights/biases/norms gain m_L^-alpha; QK norms NA(-> m_N^-1) vs m_L^-alpha
    ("eps", "hidden_weight"),
    ("eps", "hidden_bias"),
    ("eps", "hidden_norm"),
    ("eps", "qk_norm"),
}
# The grey cells.
COMPLETEP_VS_COMPLETEDP = {
    ("forward", "unembedding_weight"),  # [x m_N^-1]
    ("init_var", "unembedding_weight"),  # [x1]
    ("lr", "unembedding_weight"),  # [x1]
    ("eps", "qk_norm"),  # [NA] -> hidden-norm row m_N^-1 m_L^-alpha
    ("eps", "input_embedding"),  # [x1]
}
MUP_VS_COMPLETEP = {
    ("residual", "blocks"),
    ("forward", "unembedding_weight"),
    ("init_var", "unembedding_weight"),
    ("lr", "hidden_weight"),
    ("lr", "hidden_bias"),
    ("lr", "hidden_norm"),
    ("lr", "qk_norm"),
    ("lr", "unembedding_weight"),
    ("eps", "hidden_weight"),
    ("eps", "hidden_bias"),
    ("eps", "hidden_norm"),
    ("eps", "qk_norm"),
    ("eps", "input_embedding"),
}
# SP vs muP: every muP entry that is not blank.
SP_VS_MUP = {
    ("init_var", "hidden_weight"),
    ("init_var", "unembedding_weight"),
    ("lr", "hidden_weight"),
    ("lr", "unembedding_weight"),
    ("eps", "input_embedding"),
    ("eps", "hidden_weight"),
    ("eps", "hidden_bias"),
    ("eps", "hidden_norm"),
    ("eps", "qk_norm"),
    ("weight_decay", "hidden_weight"),
    ("weight_decay", "unembedding_weight"),
}


@pytest.mark.parametrize(
    "p1,p2,expected",
    [
        ("mup", "completedp", MUP_VS_COMPLETEDP),
        ("completep", "completedp", COMPLETEP_VS_COMPLETEDP),
        ("mup", "completep", MUP_VS_COMPLETEP),
        ("sp", "mup", SP_VS_MUP),
    ],
)
def test_parameterisations_differ_exactly_where_the_table_says(p1, p2, expected):
    assert _differing_cells(p1, p2) == expected
    assert _differing_cells(p2, p1) == expected


def test_all_ratios_one_every_factor_is_one():
    for p, q, cls in itertools.product(PARAMETERISATIONS, QUANTITIES, CLASSES):
        for a in (0.5, 0.75, 1.0):
            assert rules.width_depth_factor(p, q, cls, 1.0, 1.0, a) == 1.0
    for p in PARAMETERISATIONS:
        assert rules.residual_factor(p, 1.0, 0.5) == 1.0
        assert rules.output_forward_factor(p, 1.0) == 1.0


def test_width_depth_factors_compose():
    # Power laws: f(2) f(2) == f(4) in width and in depth.
    for p, q, cls in itertools.product(PARAMETERISATIONS, QUANTITIES, CLASSES):
        f = lambda n, l: rules.width_depth_factor(p, q, cls, n, l, 0.5)  # noqa: E731
        assert close(f(2, 1) * f(2, 1), f(4, 1))
        assert close(f(1, 2) * f(1, 2), f(1, 4))


def test_unknown_names_are_errors():
    with pytest.raises(ValueError, match="parameterisation"):
        rules.width_depth_factor("umup", "lr", "hidden_weight", 1, 1, 0.5)
    with pytest.raises(ValueError, match="quantity"):
        rules.width_depth_factor("completedp", "momentum", "hidden_weight", 1, 1, 0.5)
    with pytest.raises(ValueError, match="class"):
        rules.width_depth_factor("completedp", "lr", "attention", 1, 1, 0.5)
    with pytest.raises(ValueError, match="parameterisation"):
        rules.residual_factor("umup", 2, 0.5)


def test_vocabulary_and_defaults():
    assert rules.PARAMETERISATIONS == PARAMETERISATIONS
    assert set(rules.PARAM_CLASSES) == set(CLASSES)
    assert rules.DEFAULT_PARAMETERISATION == "completedp"
    assert 0.5 <= rules.DEFAULT_ALPHA <= 1


def test_each_rule_docstring_states_its_row():
    for fn in (rules.width_depth_factor, rules.init_std_factor, rules.residual_factor, rules.output_forward_factor):
        assert "m_N" in fn.__doc__ or "m_L" in fn.__doc__, fn.__name__
    assert "sqrt(m_B/m_D)" in rules.sde_factors.__doc__


# --------------------------------------------------------------------------- SDE rules


@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("rule", ["adamw", "adamlh"])
def test_sde_factors_golden(point, rule):
    _, _, _, mB, mD = point
    got = rules.sde_factors(mB, mD, rule)
    expected = sde_by_hand(mB, mD, adamlh=rule == "adamlh")
    for k, v in expected.items():
        assert close(getattr(got, k), v), (k, point, rule)


def test_sde_default_is_adamw():
    assert rules.sde_factors(4.0, 1.0) == rules.sde_factors(4.0, 1.0, "adamw")


@pytest.mark.parametrize("kappa", [2.0, 4.0, 9.0, 0.25])
def test_square_root_rule_batch_at_fixed_tokens(kappa):
    # batch x kappa, same tokens: lr and wd x sqrt(kappa), iterations / kappa
    f = rules.sde_factors(kappa, 1.0)
    assert close(f.lr, math.sqrt(kappa))
    assert close(f.weight_decay, math.sqrt(kappa))
    assert close(f.iterations, 1 / kappa)
    assert close(f.eps, 1 / math.sqrt(kappa))
    assert close(f.one_minus_beta, kappa)
    # AdamLH: weight decay takes the square of the lr factor
    assert close(rules.sde_factors(kappa, 1.0, "adamlh").weight_decay, kappa)


@pytest.mark.parametrize("kappa", [2.0, 10.0, 0.5])
def test_tokens_at_fixed_batch(kappa):
    # tokens x kappa at fixed batch: lr / sqrt(kappa) (paper Figure 5), iterations x kappa
    f = rules.sde_factors(1.0, kappa)
    assert close(f.lr, 1 / math.sqrt(kappa))
    assert close(f.weight_decay, 1 / math.sqrt(kappa))
    assert close(f.eps, math.sqrt(kappa))
    assert close(f.one_minus_beta, 1 / kappa)
    assert close(f.iterations, kappa)
    assert close(rules.sde_factors(1.0, kappa, "adamlh").weight_decay, 1 / kappa)


@pytest.mark.parametrize("kappa", [2.0, 10.0, 0.5])
@pytest.mark.parametrize("rule", ["adamw", "adamlh"])
def test_tokens_and_batch_together_change_nothing(kappa, rule):
    f = rules.sde_factors(kappa, kappa, rule)
    for k in ("lr", "weight_decay", "eps", "one_minus_beta", "iterations"):
        assert close(getattr(f, k), 1.0), k


def test_sde_composes():
    a, b, ab = rules.sde_factors(2, 3), rules.sde_factors(2, 5), rules.sde_factors(4, 15)
    for k in ("lr", "weight_decay", "eps", "one_minus_beta", "iterations"):
        assert close(getattr(a, k) * getattr(b, k), getattr(ab, k)), k


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf])
def test_sde_rejects_bad_ratios(bad):
    with pytest.raises(ValueError, match="positive"):
        rules.sde_factors(bad, 1.0)
    with pytest.raises(ValueError, match="positive"):
        rules.sde_factors(1.0, bad)


def test_sde_rejects_unknown_weight_decay_rule():
    with pytest.raises(ValueError, match="weight_decay_rule"):
        rules.sde_factors(1.0, 1.0, "lion")


def test_fixed_beta_rule_keeps_one_minus_beta_and_nothing_else():
    # beta_rule "fixed": (1 - beta) x 1 at any m_B / m_D; the other factors are the "sde" rule's
    for mB, mD in ((1, 4), (8, 1), (2, 3)):
        sde, fixed = rules.sde_factors(mB, mD), rules.sde_factors(mB, mD, beta_rule="fixed")
        assert close(sde.one_minus_beta, mB / mD) and fixed.one_minus_beta == 1.0
        assert (fixed.lr, fixed.weight_decay, fixed.eps, fixed.iterations) == (
            sde.lr, sde.weight_decay, sde.eps, sde.iterations)
    with pytest.raises(ValueError, match="beta_rule"):
        rules.sde_factors(1.0, 1.0, beta_rule="adam")


# --------------------------------------------------------------------------- depth interpolation


def test_interpolation_same_depth_is_identity():
    v = [1.3, 0.2, 5.0, 0.7]
    assert rules.interpolate_depth(v, 4) == v
    assert rules.interpolate_depth(v, 4) is not v  # a copy, not an alias


@pytest.mark.parametrize("new", [1, 2, 3, 5, 8, 16, 64])
def test_interpolation_constant_stays_constant(new):
    assert all(close(x, 0.8) for x in rules.interpolate_depth([0.8] * 4, new))
    assert all(close(x, 2.5) for x in rules.interpolate_depth([2.5], new))


@pytest.mark.parametrize("new", [2, 3, 5, 8, 16, 64])
def test_interpolation_endpoints_held(new):
    v = [1.5, 0.2, 5.0, 0.7]
    out = rules.interpolate_depth(v, new)
    assert len(out) == new
    # every value lies within [min, max] of the input (no extrapolation)
    assert all(min(v) * (1 - 1e-12) <= x <= max(v) * (1 + 1e-12) for x in out)
    if new >= 4:
        # the new first/last midpoints lie outside the old ones: constant extension
        assert out[0] == v[0]
        assert out[-1] == v[-1]


@pytest.mark.parametrize("new", [1, 2, 3, 5, 7, 8, 16, 33])
def test_interpolation_monotone(new):
    inc = [0.5, 0.9, 1.0, 2.0, 3.5]
    out = rules.interpolate_depth(inc, new)
    assert all(a <= b for a, b in zip(out, out[1:]))
    dec = inc[::-1]
    out = rules.interpolate_depth(dec, new)
    assert all(a >= b for a, b in zip(out, out[1:]))


def test_interpolation_4_to_8_by_hand():
    # old midpoints t = 1/8, 3/8, 5/8, 7/8; new t = 1/16, 3/16, ..., 15/16.
    # In old-layer units (0 = first old midpoint) the new midpoints sit at s = 4 t - 1/2 =
    # -1/4, 1/4, 3/4, 5/4, 7/4, 9/4, 11/4, 13/4 -> log-linear weights 1/4 and 3/4.
    v1, v2, v3, v4 = 1.0, 4.0, 2.0, 1.0
    expected = [
        v1,  # t = 1/16 < 1/8: held
        v1**0.75 * v2**0.25,
        v1**0.25 * v2**0.75,
        v2**0.75 * v3**0.25,
        v2**0.25 * v3**0.75,
        v3**0.75 * v4**0.25,
        v3**0.25 * v4**0.75,
        v4,  # t = 15/16 > 7/8: held
    ]
    out = rules.interpolate_depth([v1, v2, v3, v4], 8)
    assert len(out) == 8
    for a, b in zip(out, expected):
        assert close(a, b)
    # a geometric sequence is linear in log: 2^(s) at s = position in old-layer units
    out = rules.interpolate_depth([1.0, 2.0, 4.0, 8.0], 8)
    expected = [1.0, 2**0.25, 2**0.75, 2**1.25, 2**1.75, 2**2.25, 2**2.75, 8.0]
    for a, b in zip(out, expected):
        assert close(a, b)


def test_interpolation_4_to_2_by_hand():
    # new midpoints t = 1/4, 3/4 sit halfway between old midpoints 1/8, 3/8 and 5/8, 7/8:
    # geometric means of neighbouring pairs.
    out = rules.interpolate_depth([1.0, 4.0, 2.0, 8.0], 2)
    assert close(out[0], math.sqrt(1.0 * 4.0))
    assert close(out[1], math.sqrt(2.0 * 8.0))


def test_interpolation_to_one_layer_and_from_one_layer():
    # t = 1/2 sits halfway between the 2nd and 3rd of four midpoints
    assert close(rules.interpolate_depth([1.0, 4.0, 9.0, 2.0], 1)[0], 6.0)
    assert rules.interpolate_depth([3.0], 5) == [3.0] * 5


def test_interpolation_rejects_bad_input():
    with pytest.raises(ValueError):
        rules.interpolate_depth([], 4)
    with pytest.raises(ValueError):
        rules.interpolate_depth([1.0, 2.0], 0)
