"""What a checkpoint records for a resume (the model's shape, every optimizer group's
hyperparameters and their schedule), and the one line cdp-pretrain --load prints when the run differs
(cdp_megatron.pretrain.resume_record / resume_mismatch; no torch needed)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from cdp_megatron.pretrain import resume_mismatch, resume_record
from cdp_megatron.pretrain_args import parse_args

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "examples" / "base.json"
TINY = ("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --ffn-hidden-size 176 --seq-length 32 "
        "--micro-batch-size 4 --global-batch-size 8 --mock-data --normalization RMSNorm --swiglu --qk-layernorm "
        "--position-embedding-type rope --untie-embeddings-and-output-weights --disable-bias-linear")
HP_HINT = ("resume with the spec and flags it was saved with (through the duration rule a changed --train-iters "
           "moves every hyperparameter of --cdp-base), or --save to a new folder")
HINT = "resume with the flags it was saved with, or --save to a new folder"


def record(cmd: str, world_size: int = 1) -> dict:
    return json.loads(json.dumps(resume_record(parse_args(shlex.split(cmd), world_size=world_size))))  # as saved


def spec_with(tmp_path: Path, name: str, edit) -> Path:
    raw = json.loads(BASE.read_text())
    edit(raw)
    path = tmp_path / name
    path.write_text(json.dumps(raw))
    return path


def test_record_is_the_targets_groups_and_the_shape():
    rec = record(f"{TINY} --train-iters 20 --cdp-base {BASE}")
    assert rec["model"]["num_layers"] == 2 and rec["model"]["hidden_size"] == 64 and rec["model"]["swiglu"] is True
    args = parse_args(shlex.split(f"{TINY} --train-iters 20 --cdp-base {BASE}"), world_size=1)
    v1 = args.target.group("v", 1, "weight")
    assert rec["hyperparameters"]["v weight 1"] == [v1.lr, v1.min_lr, v1.weight_decay, v1.eps, v1.beta1, v1.beta2]
    assert "embedding weight -" in rec["hyperparameters"] and len(rec["hyperparameters"]) == len(args.target.groups)
    plain = record(f"{TINY} --train-iters 20 --lr 1e-3")
    assert plain["hyperparameters"] == {"global": [1e-3, 0.0, 0.01, 1e-8, 0.9, 0.999]}


def test_the_same_run_matches_and_old_checkpoints_are_not_judged(tmp_path):
    cmd = f"{TINY} --train-iters 20 --cdp-base {BASE}"
    assert resume_mismatch(record(cmd), record(cmd)) is None
    # a resume on another layout is the same record (nothing in it depends on TP/PP/DP) ...
    cmd = f"{TINY} --vocab-size 255 --train-iters 20 --cdp-base {BASE}"  # 256 ids: padded alike on TP 1 and 2
    assert record(cmd + " --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2", world_size=8) == record(cmd)
    # ... unless the vocabulary pads to another size there (Megatron pads to a multiple of 128 x TP)
    cmd = f"{TINY} --vocab-size 300 --train-iters 20 --cdp-base {BASE}"
    padded = ("the checkpoint is of another model (the padded vocabulary (the tokenizer's or --vocab-size, rounded up "
              "to a multiple of --make-vocab-size-divisible-by x TP) 384 there, 512 here)")
    tp2 = record(cmd + " --tensor-model-parallel-size 2", world_size=2)
    assert resume_mismatch(record(cmd), tp2, 2) == (
        f"{padded}; give --make-vocab-size-divisible-by 64: on TP 2 it pads the vocabulary to the checkpoint's 384")
    # ... and the flag it names does make the record match
    fixed = record(cmd + " --tensor-model-parallel-size 2 --make-vocab-size-divisible-by 64", world_size=2)
    assert resume_mismatch(record(cmd), fixed, 2) is None
    # GPT-2's 50257 ids (50256 and the end of document): 50304 on TP 1 (128 x 393); on TP 4 only a divisor of 32 or less pads alike
    gpt2 = f"{TINY} --vocab-size 50256 --train-iters 20 --cdp-base {BASE}"
    tp4 = record(gpt2 + " --tensor-model-parallel-size 4", world_size=4)
    assert resume_mismatch(record(gpt2), tp4, 4).endswith(
        "give --make-vocab-size-divisible-by 32: on TP 4 it pads the vocabulary to the checkpoint's 50304")
    assert resume_mismatch(record(gpt2), record(gpt2 + " --tensor-model-parallel-size 4 --make-vocab-size-divisible-by "
                                                       "32", world_size=4), 4) is None
    # no power of two pads 50257 to 50304 on 5 ranks (50304 is not a multiple of 5): the general fix
    assert resume_mismatch(record(gpt2), tp4, 5) == (
        "the checkpoint is of another model (the padded vocabulary (the tokenizer's or --vocab-size, rounded up to a "
        f"multiple of --make-vocab-size-divisible-by x TP) 50304 there, 50688 here); {HINT}")
    # another tokenizer is another model, even where both pad to the same size
    assert resume_mismatch(record(cmd), record(cmd.replace("--vocab-size 300", "--vocab-size 310"))) == (
        f"the checkpoint is of another model (the vocabulary (the tokenizer's ids, or --vocab-size plus the end-of-document "
        f"id) 301 there, 311 here); "
        f"{HINT}")
    for old in (None, {}, {"iteration": 10}):  # saved before the record existed
        assert resume_mismatch(old, record(cmd)) is None


def test_a_changed_multiplier_is_named_with_its_layers_and_values(tmp_path):
    def double_v(raw):
        raw["multipliers"]["type"]["v"]["lr"] *= 2

    saved = record(f"{TINY} --train-iters 20 --cdp-base {BASE}")
    other = spec_with(tmp_path, "v.json", double_v)
    now = record(f"{TINY} --train-iters 20 --cdp-base {other}")
    there = [saved["hyperparameters"][f"v weight {i}"][0] for i in (1, 2)]
    here = [now["hyperparameters"][f"v weight {i}"][0] for i in (1, 2)]
    assert here == [2 * x for x in there]
    assert resume_mismatch(saved, now) == (
        f"the checkpoint was trained with other hyperparameters (v weight layers 1-2 lr {min(there):.6g}..{max(there):.6g}"
        f" there, {min(here):.6g}..{max(here):.6g} here (and min_lr)); {HP_HINT}")


def test_a_longer_run_moves_every_group():
    saved = record(f"{TINY} --train-iters 20 --cdp-base {BASE}")
    now = record(f"{TINY} --train-iters 40 --cdp-base {BASE}")
    message = resume_mismatch(saved, now)
    there, here = saved["hyperparameters"]["embedding weight -"][0], now["hyperparameters"]["embedding weight -"][0]
    assert message == (f"the checkpoint was trained with other hyperparameters in every group (e.g. embedding weight "
                       f"lr {there:.6g} there, {here:.6g} here (and min_lr, weight_decay, eps, beta1, beta2)); {HP_HINT}")


def test_another_shape_or_kind_of_run():
    saved = record(f"{TINY} --train-iters 20 --cdp-base {BASE}")
    deeper = record(f"{TINY.replace('--num-layers 2', '--num-layers 4')} --train-iters 20 --cdp-base {BASE}")
    assert resume_mismatch(saved, deeper) == f"the checkpoint is of another model (--num-layers 2 there, 4 here); {HINT}"
    gqa = record(f"{TINY} --num-query-groups 2 --group-query-attention --train-iters 20 --cdp-base {BASE}")
    assert resume_mismatch(saved, gqa).startswith("the checkpoint is of another model (--num-query-groups 4 there, 2 here)")
    plain = record(f"{TINY} --train-iters 20 --lr 1e-3")
    assert resume_mismatch(saved, plain) == (
        "the checkpoint was saved by a Complete(d)P run (--cdp-base or --cdp-config), this is a plain run (global "
        f"hyperparameters); {HINT}")
    assert resume_mismatch(plain, saved).startswith("the checkpoint was saved by a plain run (global hyperparameters), "
                                                    "this is a Complete(d)P run")
    assert resume_mismatch(plain, record(f"{TINY} --train-iters 20 --lr 2e-3")) == (
        f"the checkpoint was trained with other hyperparameters (lr 0.001 there, 0.002 here); {HINT}")


def test_finetune_compares_the_model_only():
    saved = record(f"{TINY} --train-iters 20 --cdp-base {BASE}")
    other = record(f"{TINY} --train-iters 40 --lr 1e-3")  # a plain run, another schedule
    assert resume_mismatch(saved, other) is not None and resume_mismatch(saved, other, weights_only=True) is None
    deeper = record(f"{TINY.replace('--num-layers 2', '--num-layers 4')} --train-iters 20 --lr 1e-3")
    assert resume_mismatch(saved, deeper, weights_only=True) == (
        f"the checkpoint is of another model (--num-layers 2 there, 4 here); {HINT}")


def test_the_schedule_is_recorded_and_a_changed_one_is_named(tmp_path):
    plain = f"{TINY} --lr 1e-3 --lr-decay-style cosine"
    saved = record(f"{plain} --train-iters 20 --lr-warmup-iters 2")
    assert saved["schedule"] == {"lr_warmup_iters": 2, "lr_decay_iters": 20, "lr_decay_style": "cosine",
                                 "lr_warmup_init": 0.0, "lr_wsd_decay_style": None, "lr_wsd_decay_iters": None,
                                 "decoupled_lr": None, "decoupled_min_lr": None}
    # a record saved before the WSD (or the decoupled lr) fields matches a run without them
    before_wsd = {**saved, "schedule": {k: v for k, v in saved["schedule"].items()
                                        if not k.startswith(("lr_wsd", "decoupled"))}}
    assert resume_mismatch(before_wsd, record(f"{plain} --train-iters 20 --lr-warmup-iters 2")) is None
    assert resume_mismatch(before_wsd, record(f"{plain} --train-iters 20 --lr-warmup-iters 2 --decoupled-lr 5e-4")) == (
        f"the checkpoint was trained on another lr schedule (--decoupled-lr None there, 0.0005 here); {HINT}")
    assert resume_mismatch(saved, record(f"{plain} --train-iters 20 --lr-warmup-fraction 0.1")) is None  # 2 iterations
    assert resume_mismatch(saved, record(f"{plain} --train-iters 20 --lr-warmup-iters 4 --lr-warmup-init 1e-4")) == (
        "the checkpoint was trained on another lr schedule (--lr-warmup-iters 2 there, 4 here; --lr-warmup-init 0 "
        f"there, 0.0001 here); {HINT}")
    longer = f"the checkpoint was trained on another lr schedule (--lr-decay-iters 20 there, 40 here); resume with"
    assert resume_mismatch(saved, record(f"{plain} --train-iters 40 --lr-warmup-iters 2")) == (
        f"{longer} the flags it was saved with (--lr-decay-iters defaults to --train-iters: give the checkpoint's to "
        "train longer on its schedule), or --save to a new folder")
    # ... and giving it resumes the checkpoint's schedule on a longer run
    assert resume_mismatch(saved, record(f"{plain} --train-iters 40 --lr-decay-iters 20 --lr-warmup-iters 2")) is None
    # A Complete(d)P run's schedule comes from the spec and --train-iters (sp: no duration rule moves the groups)
    sp = spec_with(tmp_path, "sp.json", lambda raw: raw["base"].update(parameterisation="sp"))
    message = resume_mismatch(record(f"{TINY} --train-iters 20 --cdp-base {sp}"),
                              record(f"{TINY} --train-iters 40 --cdp-base {sp}"))
    assert message == ("the checkpoint was trained on another lr schedule (--lr-warmup-iters 1 there, 2 here; "
                       f"--lr-decay-iters 20 there, 40 here); {HP_HINT}")
    # records saved before the schedule was in them are not judged on it
    old = {k: v for k, v in saved.items() if k != "schedule"}
    assert resume_mismatch(old, record(f"{plain} --train-iters 20 --lr-warmup-iters 4")) is None


def test_rotary_positions_are_recorded_and_a_change_is_refused_except_for_finetune():
    # No tensor holds the rope base: Megatron would load the weights and train another function.
    plain = f"{TINY} --lr 1e-3 --train-iters 20"
    saved = record(f"{plain} --rotary-base 500000")
    assert saved["positions"] == {"rotary_base": 500000, "rotary_percent": 1.0, "use_rope_scaling": False,
                                  "rope_scaling_factor": 8.0, "rotary_seq_len_interpolation_factor": None,
                                  "rotary_interleaved": False}
    assert resume_mismatch(saved, record(f"{plain} --rotary-base 500000")) is None
    message = ("the checkpoint was trained with other rotary positions (--rotary-base 500000 there, 10000 here; "
               "--rotary-percent 1 there, 0.5 here); resume with the flags it was saved with, or start from its "
               "weights with --finetune")
    now = record(f"{plain} --rotary-percent 0.5")
    assert resume_mismatch(saved, now) == message
    assert resume_mismatch(saved, now, weights_only=True) is None  # a new rope base for a longer context
    # records saved before the positions were in them had Megatron's defaults
    old = {k: v for k, v in saved.items() if k != "positions"}
    assert resume_mismatch(old, record(plain)) is None
    assert resume_mismatch(old, record(f"{plain} --rotary-base 500000")) == (
        "the checkpoint was trained with other rotary positions (--rotary-base 10000 there, 500000 here); resume "
        "with the flags it was saved with, or start from its weights with --finetune")
    # records saved before the rope scaling and interpolation fields: without either
    older = json.loads(json.dumps(saved))
    for name in ("use_rope_scaling", "rope_scaling_factor", "rotary_seq_len_interpolation_factor",
                 "rotary_interleaved"):
        del older["positions"][name]
    assert resume_mismatch(older, record(f"{plain} --rotary-base 500000")) is None
    assert resume_mismatch(older, record(f"{plain} --rotary-base 500000 --use-rope-scaling --rope-scaling-factor 32 "
                                         "--rotary-seq-len-interpolation-factor 4")) == (
        "the checkpoint was trained with other rotary positions (--use-rope-scaling False there, True here; "
        "--rope-scaling-factor 8 there, 32 here; --rotary-seq-len-interpolation-factor None there, 4 here); resume "
        "with the flags it was saved with, or start from its weights with --finetune")
    assert resume_mismatch(older, record(f"{plain} --rotary-base 500000 --rotary-interleaved")) == (
        "the checkpoint was trained with other rotary positions (--rotary-interleaved False there, True here); resume "
        "with the flags it was saved with, or start from its weights with --finetune")


def test_layers_that_differ_are_named_as_runs():
    saved = record(f"{TINY.replace('--num-layers 2', '--num-layers 4')} --train-iters 20 --cdp-base {BASE}")
    now = json.loads(json.dumps(saved))
    for layer in (1, 2, 4):  # not 3: "1-4" would name it too
        now["hyperparameters"][f"q weight {layer}"][3] *= 2  # eps
    (there,) = {saved["hyperparameters"][f"q weight {i}"][3] for i in (1, 2, 4)}  # one eps at every depth
    assert resume_mismatch(saved, now) == (
        f"the checkpoint was trained with other hyperparameters (q weight layers 1-2,4 eps {there:.6g} there, "
        f"{2 * there:.6g} here); {HP_HINT}")


@pytest.mark.parametrize("flag", ["--add-qkv-bias", "--apply-layernorm-1p", "--squared-relu"])
def test_model_switches_added_later_are_part_of_the_model_and_older_records_had_them_off(flag):
    # --add-qkv-bias: tensors the checkpoint lacks; --apply-layernorm-1p: norm weights that hold
    # gain - 1, which a model without it would read as gains 1 lower (and with --finetune too);
    # --squared-relu: the same tensors in another function
    cmd = f"{TINY} --train-iters 20 --lr 1e-3"
    if flag == "--squared-relu":
        cmd = cmd.replace(" --swiglu", "")
    on = record(f"{cmd} {flag}")
    assert resume_mismatch(record(cmd), on) == f"the checkpoint is of another model ({flag} False there, True here); {HINT}"
    assert resume_mismatch(on, record(cmd), weights_only=True) == (
        f"the checkpoint is of another model ({flag} True there, False here); {HINT}")
    # records written before the field: the switch off
    older = record(cmd)
    del older["model"][flag[2:].replace("-", "_")]
    assert resume_mismatch(older, record(cmd)) is None
    assert resume_mismatch(older, on).startswith(f"the checkpoint is of another model ({flag} False there")
