"""Search spaces: parameter names and bounds per space, which (type, hp) pairs are searched,
parameters -> spec (valid, on top of the base), and moving results between spaces."""

from __future__ import annotations

import copy
import json
import math
import random
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

from cdp_megatron import convert  # noqa: E402
from cdp_megatron.search.spaces import (  # noqa: E402
    DEFAULT_BOUNDS,
    GRID_SPACE,
    PAPER_GRID,
    SPACES,
    SearchSpace,
    SpaceError,
    multipliers,
    parse_search,
    project,
    to_spec,
)
from cdp_megatron.spec import LAYER_TYPES, Spec, load_spec  # noqa: E402
from cdp_megatron.target import resolve  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "base.json"
ALL_TYPES = ("embedding", "q", "k", "v", "attn_out", "mlp_gate", "mlp_up", "mlp_down",
             "attn_norm", "mlp_norm", "q_norm", "k_norm", "final_norm", "output")
LAYERED = tuple(t for t in ALL_TYPES if t in LAYER_TYPES)

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope="module")
def base() -> Spec:
    return load_spec(EXAMPLE)


def _variant(**changes) -> Spec:
    raw = json.loads(EXAMPLE.read_text())
    for section, values in changes.items():
        raw[section].update(values)
    raw.pop("multipliers", None)
    return Spec.from_dict(raw)


def _random_params(space: SearchSpace, rng: random.Random, spread: float = 1.0) -> dict[str, float]:
    out = {}
    for d in space.dimensions:
        if d.choices is not None:
            out[d.name] = rng.choice(d.choices)
        else:
            lo, hi = max(math.log2(d.low), -spread), min(math.log2(d.high), spread)
            out[d.name] = 2.0 ** rng.uniform(lo, hi)
    return out


# ------------------------------------------------------------------------ names and bounds


def test_parameter_names_per_space(base):
    L = base.base.shape.num_layers
    assert SearchSpace(base, "global", ["lr"]).names == ("global/lr",)
    assert SearchSpace(base, "type", ["lr"]).names == tuple(f"type/{t}/lr" for t in ALL_TYPES)
    kron = SearchSpace(base, "kronecker", ["lr"])
    assert kron.names == tuple(f"type/{t}/lr" for t in ALL_TYPES) + tuple(f"depth/lr/{l}" for l in range(1, L + 1))
    unc = SearchSpace(base, "uncoupled", ["lr"])
    expected = [f"type/{t}/lr" if t not in LAYERED else None for t in ALL_TYPES]
    names = set(unc.names)
    assert {f"layer/{t}/lr/{l}" for t in LAYERED for l in range(1, L + 1)} <= names
    assert {n for n in expected if n} <= names
    assert len(unc.names) == len(LAYERED) * L + 3  # embedding, final_norm, output
    assert all(not n.startswith("depth/") for n in unc.names)


def test_kronecker_is_the_default_with_type_plus_depth_dimensions(base):
    space = SearchSpace(base)
    assert space.kind == "kronecker" and space.search == ("lr",)
    assert len(space.dimensions) == len(ALL_TYPES) + base.base.shape.num_layers  # |M| + L


def test_residual_searches_the_two_blocks_only(base):
    L = base.base.shape.num_layers
    assert SearchSpace(base, "type", ["residual"]).names == ("type/attention/residual", "type/mlp/residual")
    kron = SearchSpace(base, "kronecker", ["residual"])
    assert kron.names[-L:] == tuple(f"depth/residual/{l}" for l in range(1, L + 1))
    unc = SearchSpace(base, "uncoupled", ["residual"])
    assert len(unc.names) == 2 * L and "layer/attention/residual/1" in unc.names


def test_default_bounds_and_configurable_bounds(base):
    space = SearchSpace(base, "kronecker", ["lr", "eps"])
    assert DEFAULT_BOUNDS == (2.0**-6, 2.0**6)
    assert all((d.low, d.high) == DEFAULT_BOUNDS for d in space.dimensions)
    dists = space.distributions()
    assert all(d.log for d in dists.values())
    narrow = SearchSpace(base, "type", ["lr"], bounds=(0.25, 8.0))
    assert {(d.low, d.high) for d in narrow.dimensions} == {(0.25, 8.0)}
    with pytest.raises(SpaceError, match="bounds"):
        SearchSpace(base, "type", ["lr"], bounds=(2.0, 8.0))  # 1 (the base) must be inside


def test_init_std_and_weight_decay_skip_groups_they_cannot_change(base):
    init = SearchSpace(base, "type", ["init_std"]).names
    assert "type/q/init_std" in init and "type/embedding/init_std" in init and "type/output/init_std" in init
    assert not any(n in init for n in ("type/attn_norm/init_std", "type/q_norm/init_std", "type/final_norm/init_std"))
    wd = SearchSpace(base, "type", ["weight_decay"]).names
    assert "type/q/weight_decay" in wd and "type/embedding/weight_decay" in wd
    assert not any("norm" in n for n in wd)  # Megatron: no decay on norm gains
    decay_all = _variant(**{"global": {"decay_norms_and_biases": True}})
    assert "type/attn_norm/weight_decay" in SearchSpace(decay_all, "type", ["weight_decay"]).names
    with pytest.raises(SpaceError, match="weight_decay = 0"):
        SearchSpace(_variant(**{"global": {"weight_decay": 0.0}}), "type", ["weight_decay"])


def test_types_follow_the_architecture():
    plain = _variant(base={"swiglu": False, "untie_embeddings_and_output_weights": False,
                           "qk_layernorm": False, "position_embedding_type": "learned_absolute"})
    names = SearchSpace(plain, "type", ["lr"]).names
    assert "type/mlp_gate/lr" not in names and "type/output/lr" not in names and "type/q_norm/lr" not in names
    assert "type/position_embedding/lr" in names
    biased = _variant(base={"add_bias_linear": True, "normalization": "LayerNorm"})
    names = SearchSpace(biased, "type", ["lr", "init_std"]).names
    assert "type/q.bias/lr" in names and "type/attn_norm.bias/lr" in names
    assert "type/q.bias/init_std" not in names
    unc = SearchSpace(biased, "uncoupled", ["lr"]).names
    assert "layer/q.bias/lr/2" in unc and "type/final_norm.bias/lr" in unc


def test_unknown_hyperparameter_and_space():
    with pytest.raises(SpaceError, match="unknown hyperparameter 'momentum'"):
        parse_search("lr,momentum")
    with pytest.raises(SpaceError, match="unknown space"):
        SearchSpace(load_spec(EXAMPLE), "per-head", ["lr"])
    assert parse_search(" lr , beta2 ") == ("lr", "beta2")


def test_beta_bounds_keep_every_beta_valid(base):
    # (1 - beta2) = 0.05: a multiplier above 20 would make beta2 negative.
    for kind in SPACES:
        space = SearchSpace(base, kind, ["beta1", "beta2"])
        top = {d.name: d.high for d in space.dimensions}
        spec = to_spec(base, top)  # every factor at its upper bound together
        target = resolve(spec)
        assert all(0 <= g.beta2 < 1 and 0 <= g.beta1 < 1 for g in target.groups)
    kron = {d.name: d.high for d in SearchSpace(base, "kronecker", ["beta2"]).dimensions}
    assert kron["type/q/beta2"] == pytest.approx(math.sqrt(20.0), rel=1e-6)  # type x depth share the headroom
    assert kron["type/output/beta2"] == pytest.approx(20.0, rel=1e-6)  # no depth factor outside the layers


# ---------------------------------------------------------------------- parameters -> spec


def test_multipliers_multiply_on_top_of_the_base(base):
    params = {"type/q/lr": 1.5, "depth/lr/2": 2.0, "type/attention/residual": 0.5}
    m = multipliers(base, params)
    assert m.type["q"]["lr"] == pytest.approx(0.8 * 1.5)
    assert m.type["attention"]["residual"] == pytest.approx(1.1 * 0.5)
    assert m.depth["lr"] == pytest.approx([1.2, 2.0, 0.9, 0.8])
    assert m.type["embedding"] == base.multipliers.type["embedding"]  # untouched
    g = multipliers(base, {"global/lr": 2.0})
    assert g.type["q"]["lr"] == pytest.approx(1.6) and g.type["final_norm"]["lr"] == pytest.approx(2.0)
    lay = multipliers(base, {"layer/mlp_down/lr/3": 4.0})
    assert lay.layer["mlp_down"]["lr"] == [1.0, 1.0, 4.0, 1.0]
    with pytest.raises(SpaceError):
        multipliers(base, {"depth/lr/9": 2.0})
    with pytest.raises(SpaceError):
        multipliers(base, {"type/attn_norm/init_std": 2.0})
    with pytest.raises(SpaceError):
        multipliers(base, {"type/q/lr": -1.0})


@pytest.mark.parametrize("kind", SPACES)
def test_to_spec_round_trips_through_a_file_and_cdp_convert(base, kind, tmp_path):
    space = SearchSpace(base, kind, ["lr", "weight_decay", "eps", "beta1", "beta2", "init_std", "residual"])
    params = _random_params(space, random.Random(kind), spread=2.0)
    spec = space.to_spec(params, provenance={"tool": "test", "params": params})
    path = tmp_path / "best.json"
    path.write_text(json.dumps(spec.to_dict(), indent=1))
    again = load_spec(path)
    assert again == spec
    assert again.provenance["tool"] == "test" and again.provenance["params"] == params
    assert convert.main([str(path), "--width", "2x", "--depth", "2x", "-o", str(tmp_path / "t.json")]) == 0


def test_the_centre_is_the_base_itself(base):
    for kind in SPACES:
        space = SearchSpace(base, kind, ["lr", "residual"])
        assert set(space.center().values()) == {1.0}
        assert space.to_spec(space.center()).multipliers == base.multipliers


def test_suggest_on_an_optuna_trial(base):
    space = SearchSpace(base, "kronecker", ["lr"])
    study = optuna.create_study()
    trial = study.ask()
    m = space.suggest(trial)
    assert set(trial.params) == set(space.names)
    assert m == multipliers(base, trial.params)
    assert study.ask(space.distributions()).params.keys() == set(space.names)


def test_grid_space_takes_absolute_values(base):
    space = SearchSpace(base, GRID_SPACE, ["lr", "eps", "beta1", "beta2", "weight_decay"])
    assert space.names == ("grid/lr", "grid/eps", "grid/beta1", "grid/beta2", "grid/weight_decay")
    assert space.dimensions[0].choices == PAPER_GRID["lr"]
    params = {"grid/lr": 1e-3, "grid/eps": 1e-12, "grid/beta1": 0.95, "grid/beta2": 0.99, "grid/weight_decay": 0.01}
    target = resolve(space.to_spec(params))
    final_norm = target.group("final_norm", None)  # no multiplier on it in the example
    assert final_norm.lr == pytest.approx(1e-3) and final_norm.eps == pytest.approx(1e-12)
    assert final_norm.beta1 == pytest.approx(0.95) and final_norm.beta2 == pytest.approx(0.99)
    emb = target.group("embedding", None)
    assert emb.weight_decay == pytest.approx(0.01) and emb.lr == pytest.approx(2e-3)  # type multiplier 2 kept
    with pytest.raises(SpaceError, match="no grid for init_std"):
        SearchSpace(base, GRID_SPACE, ["init_std"])
    assert space.center()["grid/lr"] == 5e-3  # nearest to the base's 4e-3


# ---------------------------------------------------------------------------- projection


def _same_table(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == pytest.approx(b[k], abs=1e-9), k


def test_initialising_a_finer_space_is_exact(base):
    hps = ["lr", "residual"]
    rng = random.Random(1)
    chain = [SearchSpace(base, k, hps) for k in SPACES]
    for coarse, fine in zip(chain, chain[1:]):
        params = _random_params(coarse, rng)
        res = project(params, coarse, fine)
        assert not res.clipped and not res.dropped
        _same_table(coarse.table(params), fine.table(res.params))
        a, b = resolve(coarse.to_spec(params)), resolve(fine.to_spec(res.params))
        for ga, gb in zip(a.groups, b.groups, strict=True):
            assert ga.lr == pytest.approx(gb.lr)
        for block in ("attention", "mlp"):
            assert a.residual_mult[block] == pytest.approx(b.residual_mult[block])


def test_type_to_kronecker_keeps_type_factors_and_sets_depth_to_one(base):
    t = SearchSpace(base, "type", ["lr"])
    k = SearchSpace(base, "kronecker", ["lr"])
    params = {n: 2.0 ** (i / 10) for i, n in enumerate(t.names)}
    res = project(params, t, k)
    for n, v in params.items():
        assert res.params[n] == pytest.approx(v)
    assert all(res.params[f"depth/lr/{l}"] == pytest.approx(1.0) for l in range(1, 5))


def test_projection_onto_a_coarser_space_is_least_squares(base):
    rng = random.Random(2)
    unc = SearchSpace(base, "uncoupled", ["lr"])
    kron = SearchSpace(base, "kronecker", ["lr"])
    params = _random_params(unc, rng)
    res = project(params, unc, kron)
    full, fit = unc.table(params), kron.table(res.params)
    # Least squares of log M[g, l] ~ a_g + d_l: residuals sum to zero along every row and column.
    layer_keys = [k for k in full if len(full[k]) == 4]
    resid = {k: [x - y for x, y in zip(full[k], fit[k])] for k in layer_keys}
    for k in layer_keys:
        assert sum(resid[k]) == pytest.approx(0, abs=1e-9)
    for l in range(4):
        assert sum(resid[k][l] for k in layer_keys) == pytest.approx(0, abs=1e-9)
    for k in full:
        if len(full[k]) == 1:  # outside the layers: carried over exactly
            assert fit[k] == pytest.approx(full[k])
    # A Kronecker-representable table projects back onto itself.
    kp = _random_params(kron, rng)
    back = project(project(kp, kron, unc).params, unc, kron)
    _same_table(kron.table(kp), kron.table(back.params))
    # Type space: the mean over layers; global: the mean over all groups.
    t = project(kp, kron, SearchSpace(base, "type", ["lr"])).params
    row = kron.table(kp)[("q", "lr")]
    assert math.log2(t["type/q/lr"]) == pytest.approx(sum(row) / 4)
    g = project(t, SearchSpace(base, "type", ["lr"]), SearchSpace(base, "global", ["lr"])).params
    assert 0 < g["global/lr"]


def test_projection_clips_to_bounds_and_reports_dropped_hyperparameters(base):
    wide = SearchSpace(base, "type", ["lr", "eps"])
    narrow = SearchSpace(base, "kronecker", ["lr"], bounds=(0.5, 2.0))
    params = {n: 1.0 for n in wide.names} | {"type/q/lr": 16.0}
    res = project(params, wide, narrow)
    assert res.params["type/q/lr"] == 2.0 and "type/q/lr" in res.clipped
    assert res.dropped == ("eps",)
    narrow.check(res.params)


def test_projection_needs_the_same_base(base):
    other = _variant(**{"global": {"lr": 0.01}})
    with pytest.raises(SpaceError, match="different base"):
        project(SearchSpace(base, "type").center(), SearchSpace(base, "type"), SearchSpace(other, "kronecker"))


def test_projected_params_enqueue_into_a_study(base):
    t = SearchSpace(base, "type", ["lr"])
    k = SearchSpace(base, "kronecker", ["lr"])
    params = {n: 1.25 for n in t.names}
    res = project(params, t, k)
    study = optuna.create_study()
    study.enqueue_trial(res.params)
    trial = study.ask()
    got = k.sample(trial)
    assert got == pytest.approx(res.params)


def test_to_spec_rejects_an_invalid_result(base):
    raw = copy.deepcopy(base.to_dict())
    spec = Spec.from_dict(raw)
    with pytest.raises(SpaceError, match="invalid spec"):
        to_spec(spec, {"global/beta2": 100.0})  # (1 - 0.95) x 100 > 1: beta2 < 0
