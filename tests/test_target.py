"""End-to-end resolution of a spec at a target shape (cdp_megatron.target).

Expected values are built from the hand transcription of Table 1 in tests/test_rules.py
(CELLS, residual_by_hand, forward_by_hand, sde_by_hand) and from hand-computed depth
interpolations, never from the code under test.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import replace

import pytest

from cdp_megatron.spec import Spec, SpecError
from cdp_megatron.target import load_target, resolve, scaled_shape, target_from_dict
from tests.test_rules import CELLS, POINTS, forward_by_hand, residual_by_hand, sde_by_hand

LR, MIN_LR_RATIO, WD, EPS, BETA1, BETA2, STD = 0.01, 0.1, 0.1, 1e-8, 0.9, 0.95, 0.02

# Every class but output_bias (Megatron's output layer has no bias) appears here:
# LayerNorm gives norm biases, add_bias_linear hidden biases, learned_absolute a position
# embedding.
BASE = {
    "hidden_size": 256,
    "num_layers": 4,
    "num_attention_heads": 4,
    "ffn_hidden_size": 512,
    "seq_length": 64,
    "global_batch_size": 8,
    "train_iters": 100,
    "vocab_size": 512,
    "normalization": "LayerNorm",
    "add_bias_linear": True,
    "position_embedding_type": "learned_absolute",
}
GLOBAL = {
    "lr": LR,
    "min_lr_ratio": MIN_LR_RATIO,
    "weight_decay": WD,
    "adam_eps": EPS,
    "adam_beta1": BETA1,
    "adam_beta2": BETA2,
    "init_std": STD,
}

NORMS = ("attn_norm", "mlp_norm", "q_norm", "k_norm", "final_norm")
LINEARS = ("q", "k", "v", "attn_out", "mlp_gate", "mlp_up", "mlp_down")


def class_by_hand(type_: str, param: str) -> str:
    # method.md section 2
    if type_ in ("embedding", "position_embedding"):
        return "input_embedding"
    if type_ in LINEARS:
        return "hidden_weight" if param == "weight" else "hidden_bias"
    if type_ in ("attn_norm", "mlp_norm"):
        return "hidden_norm"  # gains and LayerNorm biases: "hidden biases / norms"
    if type_ in ("q_norm", "k_norm"):
        return "qk_norm"
    if type_ == "final_norm":
        return "unembedding_ln"
    assert type_ == "output" and param == "weight"
    return "unembedding_weight"


def make_spec(p="completedp", alpha=0.5, multipliers=None, base=None, glob=None, **extra) -> Spec:
    raw = {
        "schema_version": 1,
        "base": {**BASE, **(base or {}), "parameterisation": p, "alpha": alpha},
        "global": {**GLOBAL, **(glob or {})},
        **extra,
    }
    if multipliers is not None:
        raw["multipliers"] = multipliers
    return Spec.from_dict(raw)


def at(spec: Spec, mN=1.0, mL=1.0, mB=1.0, mD=1.0):
    return resolve(spec, scaled_shape(spec.base.shape, width=mN, depth=mL, batch=mB, tokens=mD))


def close(a, b):
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)


def expected_group(p, type_, layer, param, point, type_mult=None, depth_mult=None, adamlh=False, decay_all=False):
    """Hand formula of eq. 3: base x SDE x Table 1 x type multiplier x depth multiplier."""
    mN, mL, a, mB, mD = point
    cls = class_by_hand(type_, param)
    var_f, lr_f, eps_f, wd_f = CELLS[p](mN, mL, a)[cls]
    sde = sde_by_hand(mB, mD, adamlh) if p != "sp" else dict.fromkeys(("lr", "weight_decay", "eps", "one_minus_beta"), 1.0)
    key = type_ if param == "weight" else f"{type_}.bias"
    tm = (type_mult or {}).get(key, {})
    dm = lambda hp: 1.0 if layer is None else (depth_mult or {}).get(hp, {}).get(layer, 1.0)  # noqa: E731
    mult = lambda hp: tm.get(hp, 1.0) * dm(hp)  # noqa: E731
    decays = (param == "weight" and type_ not in NORMS) or decay_all
    lr = LR * sde["lr"] * lr_f * mult("lr")
    random_init = param == "weight" and type_ not in NORMS
    return {
        "lr": lr,
        "min_lr": lr * MIN_LR_RATIO,
        "weight_decay": (WD if decays else 0.0) * sde["weight_decay"] * wd_f * mult("weight_decay"),
        "eps": EPS * sde["eps"] * eps_f * mult("eps"),
        "beta1": 1 - (1 - BETA1) * sde["one_minus_beta"] * mult("beta1"),
        "beta2": 1 - (1 - BETA2) * sde["one_minus_beta"] * mult("beta2"),
        "init_std": STD * var_f**0.5 * mult("init_std") if random_init else None,
    }


def assert_groups(t, p, point, **kw):
    seen = set()
    for g in t.groups:
        want = expected_group(p, g.type, g.layer, g.param, point, **kw)
        got = g.hyperparameters()
        for hp, v in want.items():
            assert close(got[hp], v), (p, point, g.key, hp, got[hp], v)
        seen.add(class_by_hand(g.type, g.param))
    assert seen == {
        "input_embedding", "hidden_weight", "hidden_bias", "hidden_norm", "qk_norm", "unembedding_ln", "unembedding_weight"
    }  # fmt: skip


PARAMS = ("sp", "mup", "completep", "completedp")


# --------------------------------------------------------------------------- golden, multipliers 1


@pytest.mark.parametrize("p", PARAMS)
@pytest.mark.parametrize("point", POINTS, ids=lambda pt: "mN{}_mL{}_a{}_mB{}_mD{}".format(*pt))
def test_resolve_golden_all_multipliers_one(p, point):
    mN, mL, a, mB, mD = point
    spec = make_spec(p, a)
    t = at(spec, mN, mL, mB, mD)
    assert t.alpha == a and t.parameterisation == p
    assert t.ratios == pytest.approx({"width": mN, "depth": mL, "batch": mB, "tokens": mD}, rel=1e-12)
    assert_groups(t, p, point)
    L = round(4 * mL)
    assert t.shape.num_layers == L
    for block in ("attention", "mlp"):
        assert len(t.residual_mult[block]) == L
        assert all(close(r, residual_by_hand(p, mL, a)) for r in t.residual_mult[block])
    assert close(t.output_mult, forward_by_hand(p, mN))
    # training iterations proportional to m_D / m_B
    assert t.train_iters == round(100 * mD / mB)


def test_resolve_golden_spelled_out():
    # Complete(d)P, alpha = 1/2, width 4x and depth 4x, batch 2x at 8x tokens.
    t = at(make_spec("completedp", 0.5), 4, 4, 2, 8)
    sde = (2 / 8) ** 0.5  # sqrt(m_B / m_D) = 1/2
    expected_lr_hidden = LR * 4**-1 * 4 ** (0.5 - 1) * sde
    assert close(t.group("q", 3).lr, expected_lr_hidden)
    assert close(t.group("q", 3).lr, 0.000625)
    assert close(t.group("attn_norm", 16).lr, LR * 4 ** (0.5 - 1) * sde)
    assert close(t.group("q_norm", 1).eps, EPS * 4**-0.5 * (8 / 2) ** 0.5)  # m_L^-alpha only
    assert close(t.group("mlp_up", 1).eps, EPS * 4**-1 * 4**-0.5 * (8 / 2) ** 0.5)
    assert close(t.group("embedding", None).eps, EPS * 4**-1 * (8 / 2) ** 0.5)
    assert close(t.group("output", None).init_std, STD * (4**-2) ** 0.5)
    assert close(t.group("output", None).weight_decay, WD * 4 * sde)
    assert close(t.group("mlp_down", 2).init_std, STD * 4**-0.5)  # no 1/sqrt(2L): the residual multiplier does it
    assert close(t.group("k", 5).beta1, 1 - (1 - BETA1) * 2 / 8)
    assert close(t.group("v", 5).beta2, 1 - (1 - BETA2) * 2 / 8)
    assert t.group("final_norm", None).init_std is None and t.group("v", 1, "bias").init_std is None
    assert t.group("mlp_norm", 1, "bias").weight_decay == 0.0
    assert t.residual_mult["mlp"] == pytest.approx([0.5] * 16, rel=1e-12)
    assert t.train_iters == 100 * 8 // 2


# --------------------------------------------------------------------------- golden, with multipliers

TYPE_MULT = {
    "embedding": {"lr": 2.0, "init_std": 1.5, "weight_decay": 0.5},
    "position_embedding": {"eps": 3.0},
    "q": {"lr": 0.8, "beta1": 2.0},
    "k": {"weight_decay": 1.5},
    "v": {"eps": 0.5, "beta2": 0.5},
    "attn_out": {"init_std": 0.7},
    "mlp_up": {"lr": 1.1},
    "mlp_down": {"weight_decay": 2.0, "init_std": 0.6},
    "attn_norm": {"lr": 1.3},
    "q_norm": {"eps": 0.5},
    "k_norm.bias": {"lr": 2.0},
    "q.bias": {"lr": 3.0, "eps": 0.25},
    "final_norm": {"eps": 4.0},
    "output": {"lr": 0.5, "weight_decay": 2.0, "init_std": 1.2},
    "attention": {"residual": 1.1},
    "mlp": {"residual": 0.9},
}
DEPTH_BASE = {
    "lr": [1.0, 4.0, 2.0, 1.0],
    "residual": [1.0, 1.0, 0.9, 0.9],
    "eps": [2.0, 1.0, 1.0, 1.0],
    "beta2": [1.0, 1.0, 1.0, 2.0],
}


def to8(v):
    # 4 -> 8 layers, by hand: new midpoints at -1/4, 1/4, ..., 13/4 old-layer units
    v1, v2, v3, v4 = v
    return [v1, v1**0.75 * v2**0.25, v1**0.25 * v2**0.75, v2**0.75 * v3**0.25,
            v2**0.25 * v3**0.75, v3**0.75 * v4**0.25, v3**0.25 * v4**0.75, v4]  # fmt: skip


def to2(v):
    # 4 -> 2 layers: new midpoints halfway between old pairs: geometric means
    v1, v2, v3, v4 = v
    return [(v1 * v2) ** 0.5, (v3 * v4) ** 0.5]


DEPTH_AT = {4: lambda v: list(v), 8: to8, 2: to2}
MULT_POINTS = [
    (4.0, 1.0, 0.5, 1.0, 1.0),
    (2.0, 2.0, 1.0, 2.0, 10.0),
    (0.5, 0.5, 0.5, 4.0, 1.0),
    (8.0, 2.0, 0.75, 0.5, 2.0),
    (1.0, 1.0, 1.0, 1.0, 1.0),
]


@pytest.mark.parametrize("p", PARAMS)
@pytest.mark.parametrize("point", MULT_POINTS, ids=lambda pt: "mN{}_mL{}_a{}_mB{}_mD{}".format(*pt))
def test_resolve_golden_with_type_and_depth_multipliers(p, point):
    mN, mL, a, mB, mD = point
    spec = make_spec(p, a, {"type": TYPE_MULT, "depth": DEPTH_BASE})
    t = at(spec, mN, mL, mB, mD)
    L = round(4 * mL)
    depth = {hp: dict(enumerate(DEPTH_AT[L](v), start=1)) for hp, v in DEPTH_BASE.items()}
    assert_groups(t, p, point, type_mult=TYPE_MULT, depth_mult=depth)
    for block, a_block in (("attention", 1.1), ("mlp", 0.9)):
        want = [residual_by_hand(p, mL, a) * a_block * d for d in DEPTH_AT[L](DEPTH_BASE["residual"])]
        assert t.residual_mult[block] == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("p", PARAMS)
def test_resolve_golden_uncoupled_layer_multipliers(p):
    layer = {
        "q": {"lr": [1.0, 2.0, 4.0, 8.0]},
        "mlp_norm": {"eps": [1.0, 1.0, 4.0, 4.0]},
        "attention": {"residual": [2.0, 1.0, 1.0, 2.0]},
    }
    depth = {"lr": [2.0, 1.0, 1.0, 1.0]}
    spec = make_spec(p, 0.5, {"layer": layer, "depth": depth})
    t = at(spec, 2, 2)
    for l in range(1, 9):
        cells = CELLS[p](2.0, 2.0, 0.5)
        # the uncoupled value multiplies the Kronecker depth value, both interpolated
        lr_hidden = LR * cells["hidden_weight"][1]
        assert close(t.group("q", l).lr, lr_hidden * to8(depth["lr"])[l - 1] * to8(layer["q"]["lr"])[l - 1])
        assert close(t.group("k", l).lr, lr_hidden * to8(depth["lr"])[l - 1])
        assert close(t.group("mlp_norm", l).eps, EPS * cells["hidden_norm"][2] * to8(layer["mlp_norm"]["eps"])[l - 1])
    assert t.residual_mult["attention"] == pytest.approx(
        [residual_by_hand(p, 2.0, 0.5) * v for v in to8(layer["attention"]["residual"])], rel=1e-12
    )
    assert t.residual_mult["mlp"] == pytest.approx([residual_by_hand(p, 2.0, 0.5)] * 8, rel=1e-12)


@pytest.mark.parametrize("point", MULT_POINTS)
def test_resolve_golden_adamlh(point):
    mN, mL, a, mB, mD = point
    spec = make_spec("completedp", a, base={"weight_decay_rule": "adamlh"})
    assert_groups(at(spec, mN, mL, mB, mD), "completedp", point, adamlh=True)


@pytest.mark.parametrize("p", ["mup", "completedp"])
def test_decay_norms_and_biases(p):
    point = (2.0, 2.0, 0.5, 2.0, 1.0)
    spec = make_spec(p, 0.5, glob={"decay_norms_and_biases": True})
    t = at(spec, 2, 2, 2, 1)
    assert_groups(t, p, point, decay_all=True)
    assert t.group("attn_norm", 1).weight_decay > 0 and t.group("q", 1, "bias").weight_decay > 0
    # and the default: exactly the weight matrices (and embeddings) decay
    t = at(make_spec(p), 2, 2, 2, 1)
    for g in t.groups:
        assert (g.weight_decay > 0) == (g.param == "weight" and g.type not in NORMS), g.key


# --------------------------------------------------------------------------- properties


@pytest.mark.parametrize("p", PARAMS)
@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_identity_at_ratio_one(p, alpha):
    spec = make_spec(p, alpha, {"type": TYPE_MULT, "depth": DEPTH_BASE})
    for t in (resolve(spec), at(spec), resolve(spec, spec.base.shape)):
        assert t.ratios == {"width": 1.0, "depth": 1.0, "batch": 1.0, "tokens": 1.0}
        for g in t.groups:
            key = g.type if g.param == "weight" else f"{g.type}.bias"
            def m(hp, key=key, layer=g.layer):
                depth = 1.0 if layer is None else DEPTH_BASE.get(hp, [1.0] * 4)[layer - 1]
                return TYPE_MULT.get(key, {}).get(hp, 1.0) * depth

            decays = g.param == "weight" and g.type not in NORMS
            assert close(g.lr, LR * m("lr"))
            assert close(g.min_lr, LR * m("lr") * MIN_LR_RATIO)
            assert close(g.weight_decay, (WD if decays else 0.0) * m("weight_decay"))
            assert close(g.eps, EPS * m("eps"))
            assert close(g.beta1, 1 - (1 - BETA1) * m("beta1"))
            assert close(g.beta2, 1 - (1 - BETA2) * m("beta2"))
            assert close(g.init_std, STD * m("init_std") if decays else None)
        assert t.residual_mult["attention"] == pytest.approx([1.1 * d for d in DEPTH_BASE["residual"]], rel=1e-12)
        assert t.residual_mult["mlp"] == pytest.approx([0.9 * d for d in DEPTH_BASE["residual"]], rel=1e-12)
        assert t.output_mult == 1.0
        assert t.train_iters == 100 and t.shape == spec.base.shape and not t.warnings


def _same(t1, t2):
    assert t1.shape == t2.shape
    assert t1.ratios == pytest.approx(t2.ratios, rel=1e-12)
    assert [g.key for g in t1.groups] == [g.key for g in t2.groups]
    for g1, g2 in zip(t1.groups, t2.groups):
        for hp, v in g1.hyperparameters().items():
            assert close(v, g2.hyperparameters()[hp]), (g1.key, hp)
    for block in ("attention", "mlp"):
        assert t1.residual_mult[block] == pytest.approx(t2.residual_mult[block], rel=1e-12)
    assert close(t1.output_mult, t2.output_mult)
    assert t1.train_iters == t2.train_iters


@pytest.mark.parametrize("p", PARAMS)
@pytest.mark.parametrize("axis", ["width", "depth", "batch", "tokens", "all"])
def test_composition_2x_then_2x_is_4x(p, axis):
    spec = make_spec(p, 0.75, {"type": TYPE_MULT, "depth": DEPTH_BASE})
    kw2 = {"width": 2.0, "depth": 2.0, "batch": 2.0, "tokens": 2.0} if axis == "all" else {axis: 2.0}
    kw4 = {k: 4.0 for k in kw2}
    base = spec.base.shape
    twice = scaled_shape(scaled_shape(base, **kw2), **kw2)
    once = scaled_shape(base, **kw4)
    assert twice == once
    _same(resolve(spec, twice), resolve(spec, once))
    # the resolved values really moved (except where nothing scales)
    if p != "sp":
        assert resolve(spec, once).groups != resolve(spec).groups
    # and down again: 0.5x of 2x is the base
    _same(resolve(spec, scaled_shape(scaled_shape(base, **kw2), **{k: 0.5 for k in kw2})), resolve(spec))


@pytest.mark.parametrize("ratios", [(4, 1, 1, 1), (0.5, 1, 4, 10), (8, 1, 0.5, 3), (2, 2, 2, 2), (2, 0.5, 1, 7)])
def test_sp_leaves_everything_unchanged(ratios):
    mN, mL, mB, mD = ratios
    # global only: every group at any shape gets exactly the base values
    plain = make_spec("sp")
    t = at(plain, mN, mL, mB, mD)
    for g in t.groups:
        decays = g.param == "weight" and g.type not in NORMS
        assert g.hyperparameters() == {
            "lr": LR,
            "min_lr": LR * MIN_LR_RATIO,
            "weight_decay": WD if decays else 0.0,
            "eps": EPS,
            "beta1": BETA1,
            "beta2": BETA2,
            "init_std": STD if decays else None,
        }, g.key
    assert t.residual_mult == {"attention": [1.0] * t.shape.num_layers, "mlp": [1.0] * t.shape.num_layers}
    assert t.output_mult == 1.0
    glob = t.global_hyperparameters
    values = [glob[k] for k in ("lr", "weight_decay", "adam_eps", "adam_beta1", "adam_beta2")]
    assert values == [LR, WD, EPS, BETA1, BETA2]
    # with multipliers, at the same depth: exactly the base-shape values
    if mL == 1:
        spec = make_spec("sp", 0.5, {"type": TYPE_MULT, "depth": DEPTH_BASE})
        _same_values = [g.hyperparameters() for g in at(spec, mN, 1, mB, mD).groups]
        assert _same_values == [g.hyperparameters() for g in resolve(spec).groups]


def test_beta_multipliers_act_on_one_minus_beta():
    spec = make_spec("completedp", 0.5, {"type": {"q": {"beta1": 0.5, "beta2": 2.0}}})
    t = resolve(spec)
    assert close(t.group("q", 1).beta1, 1 - 0.1 * 0.5)  # 0.95
    assert close(t.group("q", 1).beta2, 1 - 0.05 * 2.0)  # 0.9
    # (1 - beta) grows with m_B / m_D: 8x batch at fixed tokens
    t = at(make_spec(), mB=8)
    assert close(t.group("k", 1).beta1, 1 - 0.1 * 8)


def test_fixed_beta_rule_keeps_the_base_betas():
    """base.beta_rule "fixed": every group's betas are the base's (with their multipliers) at
    any batch and horizon; every other hyperparameter is the "sde" rule's; the field is kept in
    the canonical form and the target file."""
    mult = {"type": {"q": {"beta1": 0.5, "beta2": 2.0}}}
    fixed, sde = make_spec(multipliers=mult, base={"beta_rule": "fixed"}), make_spec(multipliers=mult)
    assert fixed.base.beta_rule == "fixed" and sde.base.beta_rule == "sde"
    assert fixed.to_dict()["base"]["beta_rule"] == "fixed" and Spec.from_dict(fixed.to_dict()) == fixed
    at_base = {g.key: g.hyperparameters() for g in resolve(fixed).groups}
    for mB, mD in ((1, 4), (8, 1), (16, 1)):  # 16: the sde rule would push beta1 below 0
        t = at(fixed, mB=mB, mD=mD)
        for g in t.groups:
            assert (g.beta1, g.beta2) == (at_base[g.key]["beta1"], at_base[g.key]["beta2"]), (mB, mD, g.key)
        assert close(t.group("q", 1).beta1, 1 - 0.1 * 0.5) and close(t.group("q", 1).beta2, 1 - 0.05 * 2.0)
        if mB < 16:
            ruled = {g.key: g.hyperparameters() for g in at(sde, mB=mB, mD=mD).groups}
            for g in t.groups:
                for hp in ("lr", "min_lr", "weight_decay", "eps", "init_std"):
                    assert getattr(g, hp) == ruled[g.key][hp], (mB, mD, g.key, hp)
                assert g.beta1 != ruled[g.key]["beta1"]
        assert target_from_dict(t.to_dict()).spec.base.beta_rule == "fixed"
    with pytest.raises(SpecError, match="base.beta_rule"):
        make_spec(base={"beta_rule": "none"})


def test_beta_pushed_outside_range_is_an_error():
    with pytest.raises(SpecError, match="beta1"):
        at(make_spec(), mB=16)  # 1 - 0.1 x 16 < 0
    with pytest.raises(SpecError, match="beta2"):
        resolve(make_spec("completedp", 0.5, {"type": {"v": {"beta2": 40.0}}}))


# --------------------------------------------------------------------------- groups and the target file


def test_groups_follow_the_architecture():
    gpt = make_spec(base={"normalization": "RMSNorm", "add_bias_linear": False, "position_embedding_type": "rope"})
    keys = [g.key for g in resolve(gpt).groups]
    per_layer = ["q", "k", "v", "attn_out", "mlp_gate", "mlp_up", "mlp_down", "attn_norm", "mlp_norm", "q_norm", "k_norm"]
    assert set(keys) == {("embedding", None, "weight"), ("final_norm", None, "weight"), ("output", None, "weight")} | {
        (t, l, "weight") for t in per_layer for l in range(1, 5)
    }
    assert len(keys) == len(set(keys))
    # no SwiGLU: no gate; no QK norm: no q_norm / k_norm
    keys = {g.key[0] for g in resolve(make_spec(base={"swiglu": False, "qk_layernorm": False})).groups}
    assert "mlp_gate" not in keys and "q_norm" not in keys and "k_norm" not in keys
    # LayerNorm and add_bias_linear: biases; learned positions: position_embedding
    keys = {g.key for g in resolve(make_spec()).groups}
    assert ("attn_norm", 2, "bias") in keys and ("final_norm", None, "bias") in keys and ("q", 3, "bias") in keys
    assert ("position_embedding", None, "weight") in keys and ("output", None, "bias") not in keys
    # tied embeddings: no output group, and a warning
    tied = resolve(make_spec(base={"untie_embeddings_and_output_weights": False}))
    assert "output" not in {g.type for g in tied.groups}
    assert any("tied" in w for w in tied.warnings)


def test_group_lookup():
    t = resolve(make_spec())
    assert t.group("q", 2).key == ("q", 2, "weight")
    assert t.group("embedding", None).layer is None
    with pytest.raises(KeyError, match="q"):
        t.group("q", 5)
    with pytest.raises(KeyError):
        t.group("embedding", 1)


def test_head_dim_change_warns():
    spec = make_spec()
    ok = resolve(spec, scaled_shape(spec.base.shape, width=2))
    assert not ok.warnings
    changed = resolve(spec, scaled_shape(spec.base.shape, hidden_size=512, num_attention_heads=4))
    assert any("head dimension" in w and "64" in w and "128" in w for w in changed.warnings)


@pytest.mark.parametrize(
    "mB, mD, factor, why",
    [(4, 1, 4.0, "coarse"), (8, 1, 8.0, "coarse"), (1, 0.25, 4.0, "coarse"), (3.5, 1, None, None),
     (1, 4, 0.25, "longer"), (1, 64, 1 / 64, "longer"), (1, 2, 0.5, "longer"), (2, 3, None, None),
     (8, 8, None, None)],
)
def test_far_moved_betas_warn(mB, mD, factor, why):
    # (1 - beta) x m_B / m_D: a warning when it grows 4x or more (beta1 0.9 -> 0.6, coarse steps),
    # and when it shrinks 2x or more (betas towards 1, where the base's betas trained better at
    # small scale: README, Figures 3 and 5), naming "beta_rule": "fixed"; none in between
    t = at(make_spec(), mB=mB, mD=mD)
    beta = [w for w in t.warnings if "beta" in w]
    if factor is None:
        assert beta == []
        return
    b1, b2 = 1 - (1 - BETA1) * factor, 1 - (1 - BETA2) * factor
    assert len(beta) == 1, t.warnings
    assert f"m_B / m_D = {factor:g} (beta1 {BETA1:g} -> {b1:.6g}, beta2 {BETA2:g} -> {b2:.6g}," in beta[0], beta[0]
    if why == "coarse":
        assert "equal --batch and --tokens" in beta[0]
    else:
        assert beta[0].endswith("the base's betas trained better where the rule moved them towards 1 (README, "
                                "Figures 3 and 5); \"beta_rule\": \"fixed\" in the spec's base keeps them"), beta[0]
    assert close(t.global_hyperparameters["adam_beta1"], b1) and close(t.global_hyperparameters["adam_beta2"], b2)
    # sp has no batch/duration rule, and "fixed" keeps the betas: so no warning
    assert not [w for w in at(make_spec("sp"), mB=mB, mD=mD).warnings if "beta" in w]
    if why == "longer":
        assert not [w for w in at(make_spec(base={"beta_rule": "fixed"}), mB=mB, mD=mD).warnings if "beta" in w]


def test_betas_pushed_below_zero_name_the_ratio():
    # m_B / m_D = 16: (1 - 0.9) x 16 = 1.6, beta1 = -0.6; the base's 100 iterations x 0.5 / 8 = 6.25 now, and
    # 6.25 x 1.6 = 10 iterations make (1 - beta1) = 1
    with pytest.raises(SpecError) as e:
        at(make_spec(), mB=8, mD=0.5)
    assert str(e.value) == (
        "embedding: beta1 = 1 - 1.6 = -0.6 is outside [0, 1) after scaling 1 - beta1 = 0.1 by m_B / m_D = 16 and the "
        "multipliers; train for at least 10 iterations at this batch (now 6), use a smaller batch, keep the base's "
        "betas (\"beta_rule\": \"fixed\" in the spec's base), or lower the beta1 multiplier (m_B: tokens per step, m_D: "
        "training tokens, each over the base)"
    )


def test_betas_pushed_below_zero_name_the_shortest_run_that_fits():
    # The fix names the worst group: beta1's type multiplier 3 on q makes (1 - beta1) = 0.1 x 2 x 3 = 0.6 at
    # m_B / m_D = 2 (fine), and x 2 more on layer 2 = 1.2 (beta1 -0.2): the run needs 1.2x its iterations.
    spec = make_spec(multipliers={"type": {"q": {"beta1": 3.0}}, "layer": {"q": {"beta1": [1.0, 2.0, 1.0, 1.0]}}})
    shape = scaled_shape(spec.base.shape, batch=2, tokens=1)
    with pytest.raises(SpecError) as e:
        resolve(spec, shape)
    need = math.ceil(shape.train_iters * 1.2)
    assert f"beta1 = 1 - 1.2 = -0.2 is outside [0, 1)" in str(e.value)
    assert f"train for at least {need} iterations at this batch (now {shape.train_iters})" in str(e.value)
    # ... and that many iterations resolve (every beta1 >= 0); one fewer does not
    ok = resolve(spec, scaled_shape(spec.base.shape, batch=2, train_iters=need))
    assert min(g.beta1 for g in ok.groups) >= 0
    with pytest.raises(SpecError):
        resolve(spec, scaled_shape(spec.base.shape, batch=2, train_iters=need - 1))


def test_warmup_that_rounds_to_the_whole_run_is_an_error():
    # 0.996 x 100 rounds to 100: no decay left, which Megatron's scheduler refuses (warmup < decay)
    assert at(make_spec(glob={"lr_warmup_fraction": 0.994})).lr_warmup_iters == 99
    with pytest.raises(SpecError) as e:
        at(make_spec(glob={"lr_warmup_fraction": 0.996}))
    assert str(e.value) == (
        "global.lr_warmup_fraction (or lr_warmup_iters / the base's 100 iterations): 0.996 x 100 iterations rounds to "
        "100, the whole run (Megatron's scheduler needs warmup < decay); give a shorter warmup")
    # a spec that gave lr_warmup_iters (99 of the base's 100) at a target of 10 iterations: 9.9 -> 10
    with pytest.raises(SpecError) as e:
        at(make_spec(glob={"lr_warmup_iters": 99}), mD=0.1)
    assert str(e.value).startswith("global.lr_warmup_fraction (or lr_warmup_iters / the base's 100 iterations): 0.99 "
                                   "x 10 iterations rounds to 10"), str(e.value)
    # the same fraction at a longer horizon leaves a decay: 0.996 x 400 = 398.4 -> 398
    assert at(make_spec(glob={"lr_warmup_fraction": 0.996}), mD=4).lr_warmup_iters == 398


def test_architecture_change_is_an_error():
    spec = make_spec()
    from dataclasses import replace

    with pytest.raises(SpecError, match="target.swiglu"):
        resolve(spec, replace(spec.base.shape, swiglu=False))


def test_scaled_shape():
    base = make_spec().base.shape
    s = scaled_shape(base, width=4, depth=4, batch=2, tokens=10)
    assert (s.hidden_size, s.num_attention_heads, s.num_query_groups, s.ffn_hidden_size) == (1024, 16, 16, 2048)
    assert (s.num_layers, s.global_batch_size, s.train_tokens) == (16, 16, base.train_tokens * 10)
    assert s.head_dim == base.head_dim
    # absolute values equal the ratio form
    assert scaled_shape(base, hidden_size=1024, num_layers=16, global_batch_size=16, train_tokens=base.train_tokens * 10) == s
    assert scaled_shape(base, width=4, depth=4, batch=2, train_iters=500).train_tokens == 500 * 16 * 64
    with pytest.raises(SpecError, match="num_layers"):
        scaled_shape(base, depth=1.3)  # 5.2 layers
    with pytest.raises(SpecError, match="--width"):
        scaled_shape(base, width=0)
    with pytest.raises(SpecError, match="--depth"):
        scaled_shape(base, depth=math.nan)
    with pytest.raises(SpecError, match="only one"):
        scaled_shape(base, train_iters=10, train_tokens=1e6)


def test_target_dict_carries_everything():
    t = at(make_spec("completedp", 0.5, {"type": TYPE_MULT, "depth": DEPTH_BASE}), 2, 2)
    d = json.loads(json.dumps(t.to_dict()))
    assert d["schema_version"] == 1 and d["alpha"] == 0.5 and d["parameterisation"] == "completedp"
    assert d["train_iters"] == t.train_iters and d["shape"]["train_iters"] == t.train_iters
    assert set(d["residual_mult"]) == {"attention", "mlp"} and all(len(v) == 8 for v in d["residual_mult"].values())
    for g in d["groups"]:
        assert set(g) == {"type", "layer", "param", "lr", "min_lr", "weight_decay", "eps", "beta1", "beta2", "init_std"}
        assert (g["layer"] is None) == (g["type"] in ("embedding", "position_embedding", "final_norm", "output"))
        assert g["layer"] is None or 1 <= g["layer"] <= 8
        assert g["param"] in ("weight", "bias")


def test_explain_factors_multiply_back():
    t = at(make_spec("completedp", 0.5, {"type": TYPE_MULT, "depth": DEPTH_BASE}), 2, 2, 2, 4)
    for g in t.groups:
        for hp, f in g.factors.items():
            product = f["base"] * f["sde"] * f["cdp"] * f["type"] * f["depth"]
            value = 1 - getattr(g, hp) if hp.startswith("beta") else getattr(g, hp)
            assert close(product, value) or math.isclose(product, value, rel_tol=1e-12), (g.key, hp)


def test_load_target_round_trip(tmp_path):
    t = at(make_spec("completedp", 0.5, {"type": TYPE_MULT, "depth": DEPTH_BASE}), 2, 2, 2, 4)
    p = tmp_path / "target.json"
    p.write_text(json.dumps(t.to_dict()))
    back = load_target(p)
    _same(back, t)
    assert back.spec == t.spec


def test_load_target_rejects_edited_or_foreign_files(tmp_path):
    d = at(make_spec(), 2, 2).to_dict()
    edited = copy.deepcopy(d)
    edited["groups"][3]["lr"] *= 2
    with pytest.raises(SpecError, match="regenerate"):
        target_from_dict(edited)
    with pytest.raises(SpecError, match="not a cdp-megatron target"):
        target_from_dict(make_spec().to_dict())
    with pytest.raises(SpecError, match="schema_version"):
        target_from_dict({**d, "schema_version": 99})
    for missing in ("source_spec", "shape", "groups"):
        broken = {k: v for k, v in d.items() if k != missing}
        with pytest.raises(SpecError):
            target_from_dict(broken)
    with pytest.raises(SpecError):
        target_from_dict({**d, "shape": {**d["shape"], "colour": "blue"}})
    p = tmp_path / "bad.json"
    p.write_text("{")
    with pytest.raises(SpecError, match="malformed JSON"):
        load_target(p)
    with pytest.raises(SpecError, match="no such file"):
        load_target(tmp_path / "nope.json")


def test_global_hyperparameters_are_the_class_one_values():
    t = at(make_spec(), 4, 4, 2, 8)
    glob = t.global_hyperparameters
    assert close(glob["lr"], LR * 0.5)
    assert close(glob["min_lr"], LR * 0.5 * MIN_LR_RATIO)
    assert close(glob["weight_decay"], WD * 0.5)
    assert close(glob["adam_eps"], EPS * 2)
    assert close(glob["adam_beta1"], 1 - 0.1 / 4)
    assert close(glob["adam_beta2"], 1 - 0.05 / 4)
    # the embedding (class factor 1 for lr) gets exactly the global lr
    assert close(t.group("embedding", None).lr, glob["lr"])


def test_global_weight_decay_follows_the_adamlh_rule():
    # AdamLH: weight decay x m_B / m_D (the square of the lr factor), here 2 / 8
    t = at(make_spec(base={"weight_decay_rule": "adamlh"}), 4, 4, 2, 8)
    assert close(t.global_hyperparameters["weight_decay"], WD * 0.25)
    assert close(t.global_hyperparameters["lr"], LR * 0.5)


def test_warmup_iterations_are_rounded_to_the_nearest():
    # 0.29 * 100 is 28.999999999999996 in floats: the 29 warmup iterations given stay 29
    assert at(make_spec(glob={"lr_warmup_iters": 29})).lr_warmup_iters == 29
    # 0.046 * 100 = 4.6 -> 5; at 4x the tokens, 0.046 * 400 = 18.4 -> 18
    spec = make_spec(glob={"lr_warmup_fraction": 0.046})
    assert at(spec).lr_warmup_iters == 5
    assert at(spec, mD=4).train_iters == 400 and at(spec, mD=4).lr_warmup_iters == 18


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kw, words",
    [
        ({"depth": 1e300}, "target.num_layers"),  # used to build groups for 4e300 layers
        ({"depth": 1e308}, "num_layers"),  # 4 x 1e308 = inf: round(inf) raised OverflowError
        ({"num_layers": 10**20}, "target.num_layers"),
        ({"width": 1e300}, "target.hidden_size"),
        ({"hidden_size": 2**21}, "target.hidden_size"),
        ({"ffn_hidden_size": 2**21}, "target.ffn_hidden_size"),
        ({"vocab_size": 2**25}, "target.vocab_size"),
        ({"seq_length": 2**25}, "target.seq_length"),
        ({"batch": 1e10}, "target.global_batch_size"),
        ({"train_iters": 10**30}, "--train-iters"),
        ({"tokens": 1e305}, "target.train_tokens"),  # inf tokens: a bare ValueError from rules.sde_factors
        ({"tokens": 1e12}, "target.train_tokens"),
        ({"tokens": 1e8, "batch": 1 / 8}, "target.train_iters"),  # 5e12 tokens in steps of 64 tokens
    ],
)
def test_absurd_target_sizes_are_one_line_errors(kw, words):
    with pytest.raises(SpecError) as e:
        scaled_shape(make_spec().base.shape, **kw)
    msg = str(e.value)
    assert words in msg and "\n" not in msg and ("limit" in msg or "finite" in msg), msg


def test_non_finite_ratios_are_a_spec_error():
    from cdp_megatron.target import _sde

    with pytest.raises(SpecError, match="ratios: batch m_B"):
        _sde(make_spec(), {"width": 1, "depth": 1, "batch": 1.0, "tokens": math.inf})


def test_hidden_size_off_the_head_dim_names_the_head_dim():
    base = make_spec().base.shape  # head_dim 64
    with pytest.raises(SpecError) as e:
        scaled_shape(base, hidden_size=100)
    assert str(e.value).startswith("hidden_size: 100 is not a multiple of the head dimension 64")
    assert "64 or 128" in str(e.value)
    with pytest.raises(SpecError, match="head dimension 64.*256 or 320"):
        scaled_shape(base, width=1.125)  # 288 wide, 4.5 heads


@pytest.mark.parametrize(
    "field, value",
    [
        ("hidden_size", "512"),
        ("hidden_size", 0),
        ("hidden_size", None),
        ("hidden_size", True),
        ("hidden_size", 10**400),
        ("num_layers", -4),
        ("num_layers", 4.5),
        ("num_layers", 10**20),
        ("train_tokens", "1e6"),
        ("normalization", "BatchNorm"),
        ("swiglu", "yes"),
    ],
)
def test_target_shape_fields_are_type_checked(field, value):
    d = at(make_spec(), 2, 2).to_dict()
    d["shape"][field] = value
    with pytest.raises(SpecError) as e:
        target_from_dict(d, "t.json")
    assert str(e.value).startswith(f"t.json: shape.{field}: "), str(e.value)
    assert "\n" not in str(e.value)


def test_target_group_value_of_the_wrong_type_is_rejected():
    d = at(make_spec(), 2, 2).to_dict()
    d["groups"][0]["lr"] = "0.5"
    with pytest.raises(SpecError, match=r"has lr='0.5' but its source spec gives"):
        target_from_dict(d)
    d["groups"][0]["lr"] = 10**400
    with pytest.raises(SpecError, match="regenerate"):
        target_from_dict(d)


@pytest.mark.parametrize(
    "edit, where",
    [
        (lambda d: d["residual_mult"].update(attention=[9.0] * 8), "residual_mult.attention[0]"),
        (lambda d: d["global"].update(lr=99), "global.lr"),
        (lambda d: d.update(train_iters=9999), "train_iters"),
        (lambda d: d["shape"].update(train_iters=9999), "shape.train_iters"),
        (lambda d: d.update(lr_warmup_iters=3), "lr_warmup_iters"),
        (lambda d: d.update(output_mult=5), "output_mult"),
        (lambda d: d["ratios"].update(width=99), "ratios.width"),
        (lambda d: d.update(warnings="x"), "warnings: not a list of strings"),
        (lambda d: d.update(warnings=[1]), "warnings: not a list of strings"),
        (lambda d: d.update(alpha=1.0), "alpha"),
        (lambda d: d.update(decay_norms_and_biases=1), "decay_norms_and_biases"),  # 1 is not false
        (lambda d: d.update(lr_per_type=1), "lr_per_type"),  # an unknown key
        (lambda d: d["groups"].append(d["groups"][0]), "appears twice"),
    ],
)
def test_target_edits_of_recomputed_fields_are_rejected(edit, where):
    d = at(make_spec(), 2, 2, 2, 2).to_dict()
    edit(d)
    with pytest.raises(SpecError) as e:
        target_from_dict(d, "t.json")
    msg = str(e.value)
    assert msg.startswith(f"t.json: {where}") or where in msg, msg
    assert "regenerate it with cdp-convert" in msg and "\n" not in msg


def test_target_warnings_are_recomputed_not_compared():
    # a target written by a release with other warnings (added or reworded) still loads, and
    # carries this release's warnings, recomputed from its source spec
    t = at(make_spec(), 2, 2, 8, 1)
    assert any("m_B / m_D = 8" in w for w in t.warnings)
    for stored in ([], ["an older wording"]):
        d = t.to_dict()
        d["warnings"] = stored
        assert target_from_dict(d).warnings == t.warnings
    d = t.to_dict()
    del d["warnings"]
    assert target_from_dict(d).warnings == t.warnings


def test_target_errors_from_the_re_resolve_name_the_file():
    d = at(make_spec(), 2, 2).to_dict()
    d["source_spec"]["base"]["hidden_size"] = "256"
    with pytest.raises(SpecError, match=r"^t.json: source_spec: base.hidden_size: "):
        target_from_dict(d, "t.json")


@pytest.mark.parametrize(
    "glob, multipliers, words",
    [
        ({"lr": 1e300}, {"type": {"q": {"lr": 1e10}}}, "q layer 1: lr = inf"),  # printed inf, -o wrote Infinity
        ({"adam_eps": 1e-300}, {"type": {"k": {"eps": 1e-300}}}, "k layer 1: eps underflows to 0.0"),
        ({"init_std": 1e-300}, {"type": {"v": {"init_std": 1e-300}}}, "v layer 1: init_std underflows"),
        ({}, {"type": {"mlp_up": {"weight_decay": 1e-300}}, "depth": {"weight_decay": [1e-300] * 4}}, "mlp_up layer 1: weight_decay underflows"),
        ({}, {"type": {"attention": {"residual": 1e300}}, "depth": {"residual": [1e300] * 4}}, "attention layer 1: residual = inf"),
        ({}, {"type": {"q": {"beta2": 1e-300}}}, "q layer 1: beta2 = 1 - 5e-302 = 1.0 (rounded) is outside [0, 1)"),
        ({"adam_beta1": 0.5}, {"type": {"embedding": {"beta1": 2.0}}}, None),  # 1 - 0.5 x 2 = 0: beta1 = 0 is allowed
    ],
)
def test_non_finite_or_degenerate_resolved_values_are_errors(glob, multipliers, words):
    spec = make_spec("completedp", 0.5, multipliers, glob=glob)
    if words is None:
        assert resolve(spec).group("embedding", None).beta1 == 0.0
        return
    with pytest.raises(SpecError) as e:
        resolve(spec)
    assert str(e.value).startswith(words), str(e.value)


def test_multipliers_without_effect_are_warned_about():
    plain = {"normalization": "RMSNorm", "add_bias_linear": False, "position_embedding_type": "rope",
             "swiglu": False, "qk_layernorm": False, "untie_embeddings_and_output_weights": False}
    mult = {"type": {"q.bias": {"lr": 2.0}, "attn_norm.bias": {"lr": 2.0}, "q_norm": {"lr": 2.0}, "mlp_gate": {"lr": 2.0},
                     "mlp_up": {"lr": 2.0}, "position_embedding": {"lr": 2.0}, "output": {"lr": 2.0}},
            "layer": {"k_norm": {"lr": [1.0] * 4}}}
    t = resolve(make_spec("completedp", 0.5, mult, base=plain))
    unused = [w for w in t.warnings if "has no effect" in w]
    assert unused == [
        "multipliers.type.q.bias has no effect: add_bias_linear is false",
        "multipliers.type.attn_norm.bias has no effect: normalization is RMSNorm (no norm biases)",
        "multipliers.type.q_norm has no effect: qk_layernorm is false",
        "multipliers.type.mlp_gate has no effect: swiglu is false",
        "multipliers.type.position_embedding has no effect: position_embedding_type is rope",
        "multipliers.type.output has no effect: the embeddings are tied (untie_embeddings_and_output_weights is false)",
        "multipliers.layer.k_norm has no effect: qk_layernorm is false",
    ]  # mlp_up exists without SwiGLU (it is the whole linear_fc1), so it is not listed
    # the full architecture uses all of them (output.bias never exists in Megatron)
    full = resolve(make_spec("completedp", 0.5, {"type": {**mult["type"], "output.bias": {"lr": 2.0}}}))
    assert [w for w in full.warnings if "has no effect" in w] == [
        "multipliers.type.output.bias has no effect: Megatron's output layer has no bias"
    ]
    # the warnings travel in the target file, and a re-resolve reproduces them
    assert target_from_dict(json.loads(json.dumps(t.to_dict()))).warnings == t.warnings


def test_megatron_args_shell_quote_the_config_path():
    import shlex

    t = resolve(make_spec())
    assert t.megatron_args("target.json")[-2:] == ["--cdp-config", "target.json"]
    args = t.megatron_args("my target.json")
    assert args[-1] == "'my target.json'"
    assert shlex.split(" ".join(args))[-1] == "my target.json"


@pytest.mark.parametrize("field, flag, base", [
    ("apply_layernorm_1p", "--apply-layernorm-1p", {}),
    ("squared_relu", "--squared-relu", {"swiglu": False}),
])
def test_activation_and_norm_gains_are_architecture(field, flag, base):
    """apply_layernorm_1p and squared_relu (Megatron's --apply-layernorm-1p, --squared-relu): the
    spec carries them to the target, its file and its Megatron flags; the groups and every
    hyperparameter are those of the architecture without them; a transfer keeps them."""
    spec, plain = make_spec(base={**base, field: True}), make_spec(base=base)
    assert getattr(spec.base.shape, field) is True and getattr(plain.base.shape, field) is False
    assert spec.to_dict()["base"][field] is True and Spec.from_dict(spec.to_dict()) == spec
    t, p = resolve(spec, scaled_shape(spec.base.shape, width=2, depth=2)), resolve(plain, scaled_shape(plain.base.shape, width=2, depth=2))
    assert [g.hyperparameters() for g in t.groups] == [g.hyperparameters() for g in p.groups]
    args = t.megatron_args("t.json")
    assert flag in args and flag not in p.megatron_args("t.json")
    assert args.index(flag) < args.index("--cdp-config")
    raw = t.to_dict()
    assert raw["shape"][field] is True and getattr(target_from_dict(copy.deepcopy(raw)).shape, field) is True
    # a target file written before the field (and before add_qkv_bias): the architecture without them
    older = p.to_dict()
    for name in (field, "add_qkv_bias"):
        del older["shape"][name], older["source_spec"]["base"][name]
    assert getattr(target_from_dict(older).shape, field) is False
    with pytest.raises(SpecError, match=f"target.{field}: differs from the base"):
        resolve(spec, replace(spec.base.shape, **{field: False}))
    with pytest.raises(SpecError, match=f"base.{field}"):
        make_spec(base={**base, field: "yes"})


def test_squared_relu_is_not_gated():
    with pytest.raises(SpecError) as info:
        make_spec(base={"squared_relu": True})  # swiglu defaults to true
    assert str(info.value).startswith("base.squared_relu: a squared-ReLU MLP is not gated")
    assert "set swiglu to false" in str(info.value)


def test_qkv_bias_only_gives_q_k_v_biases_and_its_flag():
    """add_qkv_bias (Megatron's --add-qkv-bias, Qwen2): biases on q, k, v and nowhere else."""
    qkv = {"normalization": "RMSNorm", "add_bias_linear": False, "add_qkv_bias": True}
    t = resolve(make_spec("completedp", 0.5, {"type": {"k.bias": {"lr": 2.0}, "attn_out.bias": {"lr": 2.0}}}, base=qkv))
    biases = {(g.type, g.layer) for g in t.groups if g.param == "bias"}
    assert biases == {(ty, layer) for ty in ("q", "k", "v") for layer in range(1, 5)}
    assert t.group("k", 2, "bias").lr == pytest.approx(2 * t.group("q", 2, "bias").lr, rel=1e-12)
    assert [w for w in t.warnings if "has no effect" in w] == [
        "multipliers.type.attn_out.bias has no effect: add_bias_linear is false (add_qkv_bias gives q, k and v biases only)"
    ]
    args = t.megatron_args("t.json")
    assert args[args.index("--disable-bias-linear") + 1] == "--add-qkv-bias"
    assert t.to_dict()["shape"]["add_qkv_bias"] is True
    # with biases on every linear layer it is implied, and kept false (one spelling per architecture)
    both = resolve(make_spec(base={"add_bias_linear": True, "add_qkv_bias": True}))
    assert both.shape.add_qkv_bias is False and "--add-qkv-bias" not in both.megatron_args("t.json")
    assert {g.key for g in both.groups} == {g.key for g in resolve(make_spec(base={"add_bias_linear": True})).groups}
    # transfer keeps the architecture
    spec = make_spec(base=qkv)
    with pytest.raises(SpecError, match="target.add_qkv_bias: differs from the base"):
        resolve(spec, replace(spec.base.shape, add_qkv_bias=False))


ROTARY = {"rotary_base": 500000, "rotary_percent": 0.5, "rotary_interleaved": True, "use_rope_scaling": True,
          "rope_scaling_factor": 32.0, "rotary_seq_len_interpolation_factor": 2.5}


def test_rotary_positions_are_architecture():
    """The rotary positions (Megatron's --rotary-base, --rotary-percent, --rotary-interleaved,
    --use-rope-scaling, --rope-scaling-factor, --rotary-seq-len-interpolation-factor): the spec
    carries them to the target, its file and its Megatron flags (exact digits), the groups and
    hyperparameters are those without them, a transfer keeps them, and target files written
    before them load as Megatron's defaults."""
    rope = {"position_embedding_type": "rope"}
    spec, plain = make_spec(base={**ROTARY, **rope}), make_spec(base=rope)
    assert {name: getattr(spec.base.shape, name) for name in ROTARY} == ROTARY
    assert plain.base.shape.rotary_base == 10000 and plain.base.shape.rotary_seq_len_interpolation_factor is None
    assert Spec.from_dict(spec.to_dict()) == spec
    t, p = at(spec, mN=2, mL=2), at(plain, mN=2, mL=2)
    assert [g.hyperparameters() for g in t.groups] == [g.hyperparameters() for g in p.groups]
    args = t.megatron_args("t.json")
    assert args[args.index("--rotary-base"):] == ["--rotary-base", "500000", "--rotary-percent", "0.5", "--rotary-interleaved", "--use-rope-scaling",
                    "--rope-scaling-factor", "32.0", "--rotary-seq-len-interpolation-factor", "2.5",
                    "--cdp-config", "t.json"], args
    assert not any(a.startswith(("--rotary", "--rope", "--use-rope")) for a in p.megatron_args("t.json"))
    third = at(make_spec(base={**rope, "rotary_percent": 1 / 3, "num_attention_heads": 2, "hidden_size": 192}))
    assert third.megatron_args("t.json")[-3:-2] == ["0.3333333333333333"]  # the float's exact digits
    raw = t.to_dict()
    assert {name: raw["shape"][name] for name in ROTARY} == ROTARY
    assert target_from_dict(copy.deepcopy(raw)).shape == t.shape
    older = p.to_dict()
    for name in ROTARY:
        del older["shape"][name], older["source_spec"]["base"][name]
    assert target_from_dict(older).shape == p.shape
    for name in ROTARY:
        other = {name: ROTARY_DEFAULTS_OF_SPEC[name]}
        if name == "use_rope_scaling":  # its factor goes with it
            other["rope_scaling_factor"] = ROTARY_DEFAULTS_OF_SPEC["rope_scaling_factor"]
        with pytest.raises(SpecError, match=f"target.{name}: differs from the base"):
            resolve(spec, replace(spec.base.shape, **other))


# Megatron-LM's defaults of the flags (megatron/training/arguments.py)
ROTARY_DEFAULTS_OF_SPEC = {"rotary_base": 10000, "rotary_percent": 1.0, "rotary_interleaved": False,
                           "use_rope_scaling": False, "rope_scaling_factor": 8.0,
                           "rotary_seq_len_interpolation_factor": None}


def test_rotary_defaults_are_megatron_lms():
    from cdp_megatron.spec import ROTARY_DEFAULTS

    assert ROTARY_DEFAULTS == ROTARY_DEFAULTS_OF_SPEC


@pytest.mark.parametrize("base, message", [
    ({"position_embedding_type": "learned_absolute", "rotary_base": 500},
     "base.rotary_base: applies to rotary positions; set position_embedding_type to rope or leave out rotary_base"),
    ({"rope_scaling_factor": 16.0}, "base.rope_scaling_factor: applies with use_rope_scaling; set use_rope_scaling "
                                    "to true or leave the factor out"),
    ({"rotary_percent": 1.5}, "base.rotary_percent: 1.5 is outside (0, 1]"),
    ({"rotary_percent": 0}, "base.rotary_percent: expected a positive finite number, got 0"),
    ({"rotary_percent": 0.05}, "base.rotary_percent: 0.05 rotates 3 of the head's 64 dimensions; rotary pairs need "
                               "an even number >= 2"),
    ({"rotary_base": 0}, "base.rotary_base: expected a positive integer, got 0"),
    ({"rotary_base": 1.5}, "base.rotary_base: expected a positive integer, got 1.5"),
    ({"rotary_interleaved": "yes"}, "base.rotary_interleaved: expected true or false"),
    ({"rotary_seq_len_interpolation_factor": -1}, "base.rotary_seq_len_interpolation_factor: expected a positive"),
    ({"rope_scaling_factor": None, "use_rope_scaling": True}, "base.rope_scaling_factor: expected a positive"),
], ids=["learned-positions", "factor-without-scaling", "percent-above-1", "percent-0", "odd-rotated",
        "base-0", "base-float", "interleaved-not-bool", "negative-interpolation", "null-factor"])
def test_rotary_fields_are_checked(base, message):
    with pytest.raises(SpecError) as info:
        make_spec(base={"position_embedding_type": "rope", **base})
    assert str(info.value).startswith(message), str(info.value)


def test_interpolation_factor_one_is_none():
    rope = {"position_embedding_type": "rope"}
    one = make_spec(base={**rope, "rotary_seq_len_interpolation_factor": 1})
    assert one.base.shape.rotary_seq_len_interpolation_factor is None
    assert make_spec(base={**rope, "rotary_seq_len_interpolation_factor": None}) == make_spec(base=rope) == one
