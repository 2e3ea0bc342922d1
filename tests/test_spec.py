"""The hyperparameter spec (base.json): validation, defaults, the three multiplier forms,
and the JSON Schema shipped for editors."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import jsonschema
import pytest

from cdp_megatron import rules, spec
from cdp_megatron.spec import Spec, SpecError, load_spec
from cdp_megatron.target import resolve

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "base.json"
SCHEMA_PATH = ROOT / "cdp_megatron" / "schema" / "base.schema.json"

# Only what is required; every other field takes its documented default.
MINIMAL = {
    "schema_version": 1,
    "base": {
        "hidden_size": 256,
        "num_layers": 4,
        "num_attention_heads": 4,
        "seq_length": 64,
        "global_batch_size": 8,
        "train_iters": 100,
        "vocab_size": 512,
    },
    "global": {"lr": 0.01},
}


def minimal(**sections) -> dict:
    d = copy.deepcopy(MINIMAL)
    for k, v in sections.items():
        if isinstance(v, dict) and isinstance(d.get(k), dict):
            d[k].update(v)
        else:
            d[k] = v
    return d


def load_error(raw) -> str:
    with pytest.raises(SpecError) as e:
        Spec.from_dict(raw)
    msg = str(e.value)
    assert "\n" not in msg, "one line"
    return msg


@pytest.fixture(scope="module")
def schema() -> dict:
    s = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(s)
    return s


def schema_ok(schema: dict, doc) -> bool:
    return jsonschema.Draft202012Validator(schema).is_valid(doc)


# --------------------------------------------------------------------------- defaults


def test_minimal_spec_has_the_documented_defaults():
    s = Spec.from_dict(MINIMAL)
    sh = s.base.shape
    # base
    assert sh.num_query_groups == 4  # = num_attention_heads (multi-head attention)
    assert sh.ffn_hidden_size == 4 * 256
    assert sh.train_tokens == 100 * 8 * 64  # train_iters x global_batch_size x seq_length
    assert sh.train_iters == 100
    assert sh.normalization == "RMSNorm"
    assert sh.swiglu is True
    assert sh.qk_layernorm is True
    assert sh.add_bias_linear is False
    assert sh.position_embedding_type == "rope"
    assert sh.untie_embeddings_and_output_weights is True
    assert s.base.parameterisation == "completedp"
    assert s.base.alpha == 0.5
    assert s.base.weight_decay_rule == "adamw"
    # global
    g = s.globals
    assert g.lr == 0.01
    assert g.min_lr_ratio == 0.1
    assert g.weight_decay == 0.1
    assert g.adam_eps == 1e-8
    assert g.adam_beta1 == 0.9
    assert g.adam_beta2 == 0.95
    assert g.init_std == 0.02
    assert g.lr_warmup_fraction == 0.01
    assert g.lr_decay_style == "cosine"
    assert g.decay_norms_and_biases is False
    # a missing multipliers section means all 1
    assert s.multipliers.is_empty()
    assert s.description == "" and s.provenance == {}


def test_missing_multipliers_section_means_all_one():
    s = Spec.from_dict(MINIMAL)
    for key in ("q", "attn_norm", "output", "attention"):
        for hp in spec.HYPERPARAMETERS:
            assert s.multipliers.type_mult(key, hp) == 1.0
    for hp in spec.HYPERPARAMETERS:
        for layer in (None, 1, 4):
            assert s.multipliers.depth_mult(hp, layer) == 1.0
            assert s.multipliers.layer_mult("q", hp, layer) == 1.0
    # and empty sections are the same as a missing one
    empty = Spec.from_dict(minimal(multipliers={"type": {}, "depth": {}, "layer": {}}))
    assert resolve(empty).groups == resolve(s).groups
    assert resolve(empty).residual_mult == resolve(s).residual_mult


def test_alternative_forms_of_base_and_global():
    a = Spec.from_dict(MINIMAL)
    # head_dim instead of num_attention_heads, train_tokens instead of train_iters
    b_raw = minimal()
    del b_raw["base"]["num_attention_heads"], b_raw["base"]["train_iters"]
    b_raw["base"].update(head_dim=64, train_tokens=100 * 8 * 64)
    # min_lr instead of min_lr_ratio, lr_warmup_iters instead of lr_warmup_fraction
    b_raw["global"].update(min_lr=0.001, lr_warmup_iters=1)
    b = Spec.from_dict(b_raw)
    assert b.base.shape == a.base.shape
    assert math.isclose(b.globals.min_lr_ratio, 0.1)
    assert math.isclose(b.globals.lr_warmup_fraction, 0.01)


def test_canonical_form_round_trips():
    s = load_spec(EXAMPLE)
    assert Spec.from_dict(s.to_dict()) == s
    assert Spec.from_dict(json.loads(json.dumps(s.to_dict()))).to_dict() == s.to_dict()


# --------------------------------------------------------------------------- the three forms

GLOBAL_ONLY = minimal()
KRONECKER = minimal(
    multipliers={
        "type": {"q": {"lr": 0.5, "eps": 2.0}, "mlp_down": {"init_std": 0.5}, "attention": {"residual": 1.5}},
        "depth": {"lr": [1.0, 2.0, 3.0, 4.0], "residual": [1.0, 0.9, 0.8, 0.7]},
    }
)
UNCOUPLED = minimal(
    multipliers={
        "layer": {
            "q": {"lr": [1.0, 2.0, 3.0, 4.0], "beta1": [1, 1, 2, 2]},
            "mlp_norm": {"weight_decay": [2.0, 2.0, 2.0, 2.0]},
            "mlp": {"residual": [0.5, 0.6, 0.7, 0.8]},
        }
    }
)


@pytest.mark.parametrize("raw", [GLOBAL_ONLY, KRONECKER, UNCOUPLED], ids=["global", "kronecker", "uncoupled"])
def test_three_forms_load_and_resolve(raw, schema):
    assert schema_ok(schema, raw)
    s = Spec.from_dict(raw)
    t = resolve(s)
    lr = s.globals.lr
    q = [t.group("q", l).lr for l in range(1, 5)]
    if raw is GLOBAL_ONLY:
        assert q == [lr] * 4
        assert t.residual_mult == {"attention": [1.0] * 4, "mlp": [1.0] * 4}
    elif raw is KRONECKER:
        # type x depth: q lr = lr x 0.5 x d_l; k lr = lr x d_l
        assert q == pytest.approx([lr * 0.5 * d for d in (1, 2, 3, 4)], rel=1e-12)
        assert [t.group("k", l).lr for l in range(1, 5)] == pytest.approx([lr * d for d in (1, 2, 3, 4)], rel=1e-12)
        assert t.residual_mult["attention"] == pytest.approx([1.5 * d for d in (1.0, 0.9, 0.8, 0.7)], rel=1e-12)
        assert t.residual_mult["mlp"] == pytest.approx([1.0, 0.9, 0.8, 0.7], rel=1e-12)
        assert t.group("mlp_down", 2).init_std == pytest.approx(0.02 * 0.5, rel=1e-12)
    else:
        assert q == pytest.approx([lr * d for d in (1, 2, 3, 4)], rel=1e-12)
        assert t.group("k", 3).lr == lr  # uncoupled: only q
        assert t.group("q", 3).beta1 == pytest.approx(1 - 0.1 * 2, rel=1e-12)
        assert t.group("mlp_norm", 1).weight_decay == 0.0  # norms are not decayed (x2 of 0)
        assert t.residual_mult["mlp"] == pytest.approx([0.5, 0.6, 0.7, 0.8], rel=1e-12)
        assert t.residual_mult["attention"] == [1.0] * 4


def test_bias_multipliers_are_addressed_as_type_dot_bias():
    raw = minimal(base={"add_bias_linear": True}, multipliers={"type": {"q.bias": {"lr": 3.0}}})
    t = resolve(Spec.from_dict(raw))
    assert t.group("q", 1, "bias").lr == pytest.approx(0.03)
    assert t.group("q", 1, "weight").lr == pytest.approx(0.01)


# --------------------------------------------------------------------------- bad input
#
# Each case: (a spec document, the field its message must name).


def _with(path: list, value) -> dict:
    d = minimal()
    node = d
    for k in path[:-1]:
        node = node.setdefault(k, {})
    node[path[-1]] = value
    return d


def _without(section: str, key: str) -> dict:
    d = minimal()
    del d[section][key]
    return d


BAD = {
    # unknown keys at every level
    "unknown top-level key": (minimal(hyperparameters={}), "hyperparameters"),
    "unknown base key": (_with(["base", "hidden"], 256), "base.hidden"),
    "unknown global key": (_with(["global", "learning_rate"], 0.1), "global.learning_rate"),
    "unknown multipliers key": (_with(["multipliers", "types"], {}), "multipliers.types"),
    "unknown hp in type": (_with(["multipliers", "type", "q", "momentum"], 2.0), "multipliers.type.q.momentum"),
    "unknown hp in depth": (_with(["multipliers", "depth", "momentum"], [1.0] * 4), "multipliers.depth.momentum"),
    "unknown hp in layer": (_with(["multipliers", "layer", "q", "momentum"], [1.0] * 4), "multipliers.layer.q.momentum"),
    "init_std on a norm": (_with(["multipliers", "type", "attn_norm", "init_std"], 2.0), "multipliers.type.attn_norm.init_std"),
    "init_std on a bias": (_with(["multipliers", "type", "q.bias", "init_std"], 2.0), "multipliers.type.q.bias.init_std"),
    "lr on a block": (_with(["multipliers", "type", "attention", "lr"], 2.0), "multipliers.type.attention.lr"),
    "residual on a type": (_with(["multipliers", "type", "q", "residual"], 2.0), "multipliers.type.q.residual"),
    # unknown types
    "unknown type": (_with(["multipliers", "type", "qkv", "lr"], 2.0), "multipliers.type.qkv"),
    "unknown type in layer": (_with(["multipliers", "layer", "wq", "lr"], [1.0] * 4), "multipliers.layer.wq"),
    "embedding has no bias": (_with(["multipliers", "type", "embedding.bias", "lr"], 2.0), "multipliers.type.embedding.bias"),
    "non-layer type in layer": (_with(["multipliers", "layer", "output", "lr"], [1.0] * 4), "multipliers.layer.output"),
    # per-depth lists of the wrong length
    "depth list too short": (_with(["multipliers", "depth", "lr"], [1.0] * 3), "multipliers.depth.lr"),
    "depth list too long": (_with(["multipliers", "depth", "residual"], [1.0] * 5), "multipliers.depth.residual"),
    "layer list wrong length": (_with(["multipliers", "layer", "q", "lr"], [1.0] * 8), "multipliers.layer.q.lr"),
    "depth not a list": (_with(["multipliers", "depth", "lr"], 2.0), "multipliers.depth.lr"),
    # non-positive, non-finite, non-numeric multipliers
    "zero type multiplier": (_with(["multipliers", "type", "q", "lr"], 0), "multipliers.type.q.lr"),
    "negative type multiplier": (_with(["multipliers", "type", "q", "eps"], -2.0), "multipliers.type.q.eps"),
    "nan type multiplier": (_with(["multipliers", "type", "v", "lr"], math.nan), "multipliers.type.v.lr"),
    "inf type multiplier": (_with(["multipliers", "type", "v", "lr"], math.inf), "multipliers.type.v.lr"),
    "-inf type multiplier": (_with(["multipliers", "type", "v", "lr"], -math.inf), "multipliers.type.v.lr"),
    "bool multiplier": (_with(["multipliers", "type", "v", "lr"], True), "multipliers.type.v.lr"),
    "string multiplier": (_with(["multipliers", "type", "v", "lr"], "2"), "multipliers.type.v.lr"),
    "nan in depth list": (_with(["multipliers", "depth", "lr"], [1.0, math.nan, 1.0, 1.0]), "multipliers.depth.lr[1]"),
    "inf in depth list": (_with(["multipliers", "depth", "lr"], [1.0, 1.0, 1.0, math.inf]), "multipliers.depth.lr[3]"),
    "zero in depth list": (_with(["multipliers", "depth", "eps"], [1.0, 0.0, 1.0, 1.0]), "multipliers.depth.eps[1]"),
    "negative in layer list": (_with(["multipliers", "layer", "k", "lr"], [1.0, 1.0, -1.0, 1.0]), "multipliers.layer.k.lr[2]"),
    "zero residual": (_with(["multipliers", "type", "mlp", "residual"], 0.0), "multipliers.type.mlp.residual"),
    # betas outside [0, 1)
    "beta1 = 1": (_with(["global", "adam_beta1"], 1.0), "global.adam_beta1"),
    "beta1 < 0": (_with(["global", "adam_beta1"], -0.1), "global.adam_beta1"),
    "beta2 > 1": (_with(["global", "adam_beta2"], 1.5), "global.adam_beta2"),
    "beta2 nan": (_with(["global", "adam_beta2"], math.nan), "global.adam_beta2"),
    # shape
    "hidden not divisible by heads": (_with(["base", "hidden_size"], 250), "base.hidden_size"),
    "heads not divisible by groups": (_with(["base", "num_query_groups"], 3), "base.num_query_groups"),
    "head_dim does not divide hidden": (
        {**minimal(), "base": {**{k: v for k, v in MINIMAL["base"].items() if k != "num_attention_heads"}, "head_dim": 60}},
        "base.head_dim",
    ),
    "heads and head_dim both": (_with(["base", "head_dim"], 64), "base.head_dim"),
    "no heads": (_without("base", "num_attention_heads"), "base.num_attention_heads"),
    "train_tokens and train_iters both": (_with(["base", "train_tokens"], 1e6), "base.train_tokens"),
    "neither train_tokens nor train_iters": (_without("base", "train_iters"), "base.train_tokens"),
    "missing hidden_size": (_without("base", "hidden_size"), "base.hidden_size"),
    "zero layers": (_with(["base", "num_layers"], 0), "base.num_layers"),
    "fractional layers": (_with(["base", "num_layers"], 4.5), "base.num_layers"),
    "nan hidden size": (_with(["base", "hidden_size"], math.nan), "base.hidden_size"),
    "inf hidden size": (_with(["base", "hidden_size"], math.inf), "base.hidden_size"),
    "inf train_iters": (_with(["base", "train_iters"], math.inf), "base.train_iters"),
    "string hidden size": (_with(["base", "hidden_size"], "256"), "base.hidden_size"),
    "unknown normalization": (_with(["base", "normalization"], "BatchNorm"), "base.normalization"),
    "unknown parameterisation": (_with(["base", "parameterisation"], "umup"), "base.parameterisation"),
    "alpha below 1/2": (_with(["base", "alpha"], 0.4), "base.alpha"),
    "alpha nan": (_with(["base", "alpha"], math.nan), "base.alpha"),
    "unknown weight-decay rule": (_with(["base", "weight_decay_rule"], "lion"), "base.weight_decay_rule"),
    "train tokens below one step": (
        {**minimal(), "base": {**{k: v for k, v in MINIMAL["base"].items() if k != "train_iters"}, "train_tokens": 10}},
        "base.train_tokens",
    ),
    # global values
    "missing lr": (_without("global", "lr"), "global.lr"),
    "zero lr": (_with(["global", "lr"], 0.0), "global.lr"),
    "nan lr": (_with(["global", "lr"], math.nan), "global.lr"),
    "inf lr": (_with(["global", "lr"], math.inf), "global.lr"),
    "negative weight decay": (_with(["global", "weight_decay"], -0.1), "global.weight_decay"),
    "zero eps": (_with(["global", "adam_eps"], 0.0), "global.adam_eps"),
    "min_lr above lr": (_with(["global", "min_lr"], 0.1), "global.min_lr"),
    "min_lr and min_lr_ratio both": (minimal(**{"global": {"min_lr": 0.001, "min_lr_ratio": 0.1}}), "global.min_lr"),
    "unknown schedule": (_with(["global", "lr_decay_style"], "linear"), "global.lr_decay_style"),
    # versions and sections
    "unknown schema version": (minimal(schema_version=2), "schema_version"),
    "schema version as string": (minimal(schema_version="1"), "schema_version"),
    "missing schema version": ({k: v for k, v in MINIMAL.items() if k != "schema_version"}, "schema_version"),
    "missing base": ({k: v for k, v in MINIMAL.items() if k != "base"}, "base"),
    "missing global": ({k: v for k, v in MINIMAL.items() if k != "global"}, "global"),
    "base not an object": (minimal(base=[1, 2]), "base"),
    "multipliers not an object": (minimal(multipliers=None), "multipliers"),
    "description not a string": (minimal(description=3), "description"),
    "provenance not an object": (minimal(provenance=[]), "provenance"),
    # schema_version must be the integer 1 (1.0 and true compare equal to 1 in Python)
    "schema version as float": (minimal(schema_version=1.0), "schema_version"),
    "schema version as bool": (minimal(schema_version=True), "schema_version"),
    # a resolved target where a base spec is expected
    "a target given as a spec": (minimal(kind="cdp-megatron target"), "kind"),
    # huge numbers: a 400-digit integer overflows float(); absurd sizes hit spec.LIMITS
    "400-digit hidden size": (_with(["base", "hidden_size"], 10**400), "base.hidden_size"),
    "400-digit train_tokens": (
        {**minimal(), "base": {**{k: v for k, v in MINIMAL["base"].items() if k != "train_iters"}, "train_tokens": 10**400}},
        "base.train_tokens",
    ),
    "400-digit multiplier": (_with(["multipliers", "type", "q", "lr"], 10**400), "multipliers.type.q.lr"),
    "400-digit alpha": (_with(["base", "alpha"], 10**400), "base.alpha"),
    "400-digit beta": (_with(["global", "adam_beta1"], 10**400), "global.adam_beta1"),
    "400-digit warmup iters": (_with(["global", "lr_warmup_iters"], 10**400), "global.lr_warmup_iters"),
    "hidden size above the limit": (_with(["base", "hidden_size"], 2**21), "base.hidden_size"),
    "layers above the limit": (_with(["base", "num_layers"], 10**20), "base.num_layers"),
    "vocab above the limit": (_with(["base", "vocab_size"], 2**25), "base.vocab_size"),
    "train_iters above the limit": (_with(["base", "train_iters"], 10**10), "base.train_iters"),
    # the message names the key the user wrote
    "min_lr_ratio above 1": (_with(["global", "min_lr_ratio"], 2), "global.min_lr_ratio"),
    "warmup iters longer than training": (_with(["global", "lr_warmup_iters"], 500), "global.lr_warmup_iters"),
    "warmup fraction above 1": (_with(["global", "lr_warmup_fraction"], 1.5), "global.lr_warmup_fraction"),
    # Megatron's scheduler needs warmup < decay: the whole run is not a warmup
    "warmup iters equal to training": (_with(["global", "lr_warmup_iters"], 100), "global.lr_warmup_iters"),
    "warmup fraction of 1": (_with(["global", "lr_warmup_fraction"], 1.0), "global.lr_warmup_fraction"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_spec_is_rejected_naming_the_field(case):
    raw, field = BAD[case]
    msg = load_error(raw)
    assert msg.startswith(f"{field}:"), msg
    assert ";" in msg, f"no fix given: {msg}"  # "<field>: <problem>; <fix>"


def test_json_nan_and_infinity_literals_in_a_file_are_rejected(tmp_path):
    # Python's json module accepts NaN / Infinity; the spec must not.
    text = json.dumps(MINIMAL)[:-1] + ', "multipliers": {"type": {"q": {"lr": NaN}}, "depth": {"eps": [1, Infinity, 1, 1]}}}'
    p = tmp_path / "base.json"
    p.write_text(text)
    with pytest.raises(SpecError, match=r"multipliers\.type\.q\.lr"):
        load_spec(p)


def test_malformed_json_names_the_file_and_position(tmp_path):
    p = tmp_path / "base.json"
    p.write_text('{"schema_version": 1,\n "base": {,}}')
    with pytest.raises(SpecError) as e:
        load_spec(p)
    msg = str(e.value)
    assert str(p) in msg and "malformed JSON" in msg and "line 2" in msg
    assert "\n" not in msg


def test_missing_file(tmp_path):
    with pytest.raises(SpecError, match="no such file"):
        load_spec(tmp_path / "nope.json")


GOOD_TEXT = json.dumps({**MINIMAL, "description": "Example"})
BAD_FILES = {
    "latin-1 byte": (GOOD_TEXT.replace("Example", "Exampl\u00e9").encode("latin-1"), "not UTF-8 text (byte 0xe9"),
    "UTF-16": (GOOD_TEXT.encode("utf-16"), "not UTF-8 text (it is UTF-16)"),
    "binary": (bytes(range(256)), "not UTF-8 text"),
    "duplicate key": (GOOD_TEXT.replace('"hidden_size": 256', '"hidden_size": 256, "hidden_size": 512').encode(), "duplicate key 'hidden_size'"),
    "deep nesting": (b"[" * 100000 + b"]" * 100000, "nested too deeply"),
    "5000-digit integer": (GOOD_TEXT.replace('"hidden_size": 256', '"hidden_size": ' + "9" * 5000).encode(), "thousands of digits"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
@pytest.mark.parametrize("load", ["spec", "target"])
def test_unreadable_file_is_one_line_naming_the_file(tmp_path, case, load):
    from cdp_megatron.target import load_target

    data, words = BAD_FILES[case]
    p = tmp_path / "in.json"
    p.write_bytes(data)
    with pytest.raises(SpecError) as e:
        (load_spec if load == "spec" else load_target)(p)
    msg = str(e.value)
    assert msg.startswith(str(p)) and words in msg and "\n" not in msg and ";" in msg, msg


def test_directory_and_empty_path_are_one_line(tmp_path):
    from cdp_megatron.target import load_target

    for load in (load_spec, load_target):
        with pytest.raises(SpecError, match=r"is a directory; give the JSON file"):
            load(tmp_path)
        with pytest.raises(SpecError, match=r"^'': empty path; give the JSON file$"):
            load("")


def test_utf8_byte_order_mark_is_accepted(tmp_path):
    p = tmp_path / "base.json"
    p.write_bytes(b"\xef\xbb\xbf" + GOOD_TEXT.encode())
    assert load_spec(p).description == "Example"


def test_a_target_given_as_the_base_spec_says_so(tmp_path):
    p = tmp_path / "target.json"
    p.write_text(json.dumps(resolve(Spec.from_dict(MINIMAL)).to_dict()))
    with pytest.raises(SpecError) as e:
        load_spec(p)
    assert str(e.value) == (
        f"{p} is a resolved target (cdp-convert -o output); give the base spec, or pass it with --cdp-config"
    )


def test_limits_leave_room_for_real_runs():
    # a 405B-class shape (16384 wide, 126 layers, 53248 FFN, 128k vocab, 15T tokens) loads
    raw = minimal(base={"hidden_size": 16384, "num_layers": 126, "num_attention_heads": 128, "num_query_groups": 8,
                        "ffn_hidden_size": 53248, "vocab_size": 128256, "seq_length": 8192, "global_batch_size": 2048})
    del raw["base"]["train_iters"]
    raw["base"]["train_tokens"] = 15.6e12
    s = Spec.from_dict(raw)
    assert s.base.shape.train_iters == round(15.6e12 / (2048 * 8192))


def test_spec_error_is_a_value_error():
    assert issubclass(SpecError, ValueError)


# --------------------------------------------------------------------------- example + JSON Schema


def test_example_validates_against_the_schema_and_loads(schema):
    raw = json.loads(EXAMPLE.read_text())
    jsonschema.Draft202012Validator(schema).validate(raw)
    assert raw["$schema"].endswith("base.schema.json")
    assert (EXAMPLE.parent / raw["$schema"]).resolve() == SCHEMA_PATH
    s = load_spec(EXAMPLE)
    # a small proxy with non-trivial per-type and per-depth multipliers
    assert s.base.shape.num_layers <= 8 and s.base.shape.hidden_size <= 512
    assert len(s.multipliers.type) >= 3 and len(set(s.multipliers.depth["lr"])) > 1


def test_canonical_form_validates_against_the_schema(schema):
    jsonschema.Draft202012Validator(schema).validate(load_spec(EXAMPLE).to_dict())
    jsonschema.Draft202012Validator(schema).validate(Spec.from_dict(MINIMAL).to_dict())


@pytest.mark.parametrize(
    "case",
    [
        "unknown top-level key",
        "unknown base key",
        "unknown global key",
        "unknown multipliers key",
        "unknown hp in type",
        "unknown hp in depth",
        "unknown hp in layer",
        "init_std on a norm",
        "init_std on a bias",
        "lr on a block",
        "residual on a type",
        "unknown type",
        "unknown type in layer",
        "embedding has no bias",
        "non-layer type in layer",
        "depth not a list",
        "zero type multiplier",
        "negative type multiplier",
        "bool multiplier",
        "string multiplier",
        "zero in depth list",
        "negative in layer list",
        "beta1 = 1",
        "beta1 < 0",
        "beta2 > 1",
        "heads and head_dim both",
        "no heads",
        "train_tokens and train_iters both",
        "neither train_tokens nor train_iters",
        "missing hidden_size",
        "zero layers",
        "fractional layers",
        "string hidden size",
        "unknown normalization",
        "unknown parameterisation",
        "alpha below 1/2",
        "unknown weight-decay rule",
        "missing lr",
        "zero lr",
        "negative weight decay",
        "zero eps",
        "min_lr and min_lr_ratio both",
        "unknown schedule",
        "unknown schema version",
        "schema version as string",
        "missing schema version",
        "missing base",
        "missing global",
        "base not an object",
        "description not a string",
        "provenance not an object",
    ],
)
def test_schema_rejects_bad_documents(schema, case):
    raw, _ = BAD[case]
    assert not schema_ok(schema, raw), case


def test_schema_mirrors_spec_py(schema):
    d = schema["$defs"]
    # keys
    top = {"$schema", "schema_version", "description", "provenance", "base", "global", "multipliers"}
    assert set(schema["properties"]) == top
    assert set(d["base"]["properties"]) == set(spec._BASE_KEYS)
    assert set(d["global"]["properties"]) == set(spec._GLOBAL_KEYS)
    m = d["multipliers"]["properties"]
    assert set(d["multipliers"]["properties"]) == set(spec._MULT_KEYS)
    assert set(m["type"]["properties"]) == set(spec._TYPE_KEYS)
    assert set(m["depth"]["properties"]) == set(spec.HYPERPARAMETERS)
    assert set(m["layer"]["properties"]) == {
        k for k in spec._TYPE_KEYS if k.partition(".")[0] in (*spec.LAYER_TYPES, *spec.BLOCKS)
    }
    for key, sub in m["type"]["properties"].items():
        hps = d[sub["$ref"].rsplit("/", 1)[1]]["properties"]
        assert set(hps) == set(spec._allowed_hps(key)), key
    for key, sub in m["layer"]["properties"].items():
        hps = d[sub["$ref"].rsplit("/", 1)[1]]["properties"]
        assert set(hps) == set(spec._allowed_hps(key)), key
    # enums
    base = d["base"]["properties"]
    assert base["parameterisation"]["enum"] == list(rules.PARAMETERISATIONS)
    assert base["weight_decay_rule"]["enum"] == list(rules.WEIGHT_DECAY_RULES)
    assert set(base["normalization"]["enum"]) == {"RMSNorm", "LayerNorm"}
    assert set(base["position_embedding_type"]["enum"]) == {"rope", "learned_absolute"}
    assert schema["properties"]["schema_version"]["const"] == spec.SCHEMA_VERSION
    # defaults: those stated in the schema are the ones spec.py applies
    loaded = Spec.from_dict(MINIMAL)
    for name, prop in base.items():
        if "default" in prop:
            actual = getattr(loaded.base, name) if hasattr(loaded.base, name) else getattr(loaded.base.shape, name)
            assert actual == prop["default"], name
    for name, prop in d["global"]["properties"].items():
        if "default" in prop:
            assert getattr(loaded.globals, name) == prop["default"], name
    # every field has a description (editor completion)
    for section in ("base", "global"):
        for name, prop in d[section]["properties"].items():
            assert prop.get("description"), f"{section}.{name}"
