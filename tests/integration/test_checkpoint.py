"""Checkpoints (dist_checkpointing) with many optimizer groups that differ only in lr, eps and
betas: the upstream load mixes their hyperparameters up (or fails) without the
param_group_identity patch; with it every group is restored exactly and training continued
from the checkpoint equals uninterrupted training (same layout, bit for bit) or matches it
within 1e-5 (another layout)."""

from __future__ import annotations

import math
import os

import pytest

pytest.importorskip("megatron.core")

from . import _optim_common as oc  # noqa: E402
from ._dist import run_distributed  # noqa: E402
from ._tiny import tiny_target  # noqa: E402

pytestmark = [pytest.mark.megatron, pytest.mark.timeout(600)]

# Per-type and per-depth multipliers on lr, eps and betas only: weight decay and the Megatron
# flags (wd_mult, lr_mult) are the same in every group, so 0.16.1 cannot tell them apart; v and
# attn_out, mlp_up and mlp_down, output and embedding differ ONLY in eps or betas, which
# 0.19.2's wider identity (max_lr, min_lr, start_wd, end_wd, ...) does not include either.
LR_EPS_BETAS = {
    "type": {
        "q": {"lr": 1.5, "eps": 0.5},
        "k": {"lr": 0.75, "beta2": 0.5},
        "v": {"beta1": 0.5},
        "mlp_gate": {"lr": 2.0, "eps": 2.0},
        "mlp_up": {"beta2": 1.5},
        "output": {"eps": 3.0},
    },
    "depth": {"lr": [1.0, 1.3], "eps": [1.0, 2.0]},
}


def _target():
    target = tiny_target(multipliers=LR_EPS_BETAS, global_={"lr": 1e-3, "weight_decay": 0.1})
    assert len({(g.lr, g.min_lr, g.eps, g.beta1, g.beta2) for g in target.groups}) >= 12
    return target


def _save_then_continue(path, tp, pp, dist_opt, bf16, fmt=None, mem_efficient=False):
    """Train 3 steps, save, train 2 more: (losses after the save, final params)."""
    from cdp_megatron.integration.checkpoint import save_checkpoint

    oc.allow_child_processes()
    setup = oc.setup_model(_target(), tp, pp, dist_opt=dist_opt, bf16=bf16, lr_warmup_iters=2)
    oc.train_steps(setup, 3)
    save_checkpoint(
        path, setup.chunks, setup.optimizer, setup.scheduler, iteration=3,
        dist_opt_format=fmt, mem_efficient=mem_efficient,
    )
    return setup, oc.train_steps(setup, 2, first_step=3)


def _load_and_continue(path, tp, pp, dist_opt, bf16, init_model_parallel, apply_patches=True):
    """Fresh model and optimizer, load, check the groups, train 2 steps."""
    from cdp_megatron.integration.checkpoint import load_checkpoint

    oc.allow_child_processes()
    setup = oc.setup_model(
        _target(), tp, pp, dist_opt=dist_opt, bf16=bf16, lr_warmup_iters=2,
        init_model_parallel=init_model_parallel,
    )
    if not apply_patches:  # build_optimizer applied every patch: take the fix out again
        from cdp_megatron.patches import param_group_identity

        param_group_identity.remove()
    common = load_checkpoint(path, setup.chunks, setup.optimizer, setup.scheduler, apply_patches=apply_patches)
    assert common["iteration"] == 3
    oc.check_assignments(setup)  # every group's hyperparameters restored exactly
    assert setup.scheduler.num_steps == 3
    return setup, oc.train_steps(setup, 2, first_step=3)


# --- the bug, without the patch --------------------------------------------------------------------
def _unpatched_worker(path, dist_opt):
    from cdp_megatron import patches

    _save_then_continue(path, 1, 1, dist_opt, False)
    try:
        _load_and_continue(path, 1, 1, dist_opt, False, init_model_parallel=False, apply_patches=False)
    except (AssertionError, ValueError, KeyError) as exc:  # mixed-up values or a failed load
        return f"{type(exc).__name__}: {str(exc)[:300]}"
    finally:
        patches.apply_all()
    return None


@pytest.mark.parametrize("dp,dist_opt", [(1, False), (2, True)], ids=["plain", "distopt-dp2"])
def test_unpatched_load_mixes_up_groups(tmp_path, dp, dist_opt):
    """Demonstrates the upstream bug the patch fixes (this must keep failing to load right)."""
    results = run_distributed(_unpatched_worker, dp, str(tmp_path / "ckpt"), dist_opt)
    assert all(r is not None for r in results), "the unpatched load restored every group"


# --- the fix: resume on the same layout -------------------------------------------------------------
def _resume_worker(path, tp, pp, dist_opt, bf16):
    setup, expected = _save_then_continue(path, tp, pp, dist_opt, bf16)
    reference = oc.snapshot(setup.chunks)
    resumed, losses = _load_and_continue(path, tp, pp, dist_opt, bf16, init_model_parallel=False)
    got = oc.snapshot(resumed.chunks)
    different = [n for n in reference if not (reference[n] == got[n]).all()]
    assert not different, f"resumed training differs in {different}"
    assert losses == expected or all(math.isnan(x) for x in losses + expected)
    return losses


RESUME_LAYOUTS = [  # (tp, pp, dp, dist_opt, bf16)
    pytest.param(1, 1, 1, False, False, id="plain-fp32"),
    pytest.param(1, 1, 1, False, True, id="plain-bf16"),
    pytest.param(1, 1, 2, True, False, id="distopt-fp32-dp2"),
    pytest.param(1, 1, 2, True, True, id="distopt-bf16-dp2"),
    pytest.param(2, 1, 1, False, False, id="plain-tp2"),
    pytest.param(1, 2, 1, True, False, id="distopt-pp2"),
]


@pytest.mark.parametrize("tp,pp,dp,dist_opt,bf16", RESUME_LAYOUTS)
def test_resume_restores_groups_and_equals_uninterrupted(tmp_path, tp, pp, dp, dist_opt, bf16):
    run_distributed(_resume_worker, tp * pp * dp, str(tmp_path / "ckpt"), tp, pp, dist_opt, bf16)


# --- resume on another layout ----------------------------------------------------------------------
def _save_worker(path, tp, pp, dist_opt, fmt=None, mem_efficient=False):
    return _save_then_continue(path, tp, pp, dist_opt, False, fmt, mem_efficient)[1]


def _load_worker(path, tp, pp, dist_opt):
    return _load_and_continue(path, tp, pp, dist_opt, False, init_model_parallel=True)[1]


CHANGES = [  # saved (tp, pp, dp), loaded (tp, pp, dp), dist_opt, distributed optimizer's format
    pytest.param((1, 1, 1), (2, 1, 1), False, None, id="plain-tp1-to-tp2"),
    pytest.param((1, 1, 1), (1, 2, 1), False, None, id="plain-pp1-to-pp2"),
    pytest.param((1, 1, 2), (1, 1, 1), True, None, id="distopt-dp2-to-dp1"),
    pytest.param((1, 1, 2), (2, 1, 1), True, "fully_reshardable", id="distopt-full-dp2-to-tp2"),
    pytest.param((2, 1, 1), (1, 2, 1), True, "fully_reshardable", id="distopt-full-tp2-to-pp2"),
    pytest.param((1, 2, 1), (1, 1, 2), True, "mem_efficient", id="distopt-fullmem-pp2-to-dp2"),
]


@pytest.mark.parametrize("saved,loaded,dist_opt,fmt", CHANGES)
def test_resume_on_another_layout(tmp_path, saved, loaded, dist_opt, fmt):
    path = str(tmp_path / "ckpt")
    mem_efficient = fmt == "mem_efficient"
    fmt = "fully_reshardable" if mem_efficient else fmt
    expected = run_distributed(
        _save_worker, math.prod(saved), path, saved[0], saved[1], dist_opt, fmt, mem_efficient
    )
    got = run_distributed(_load_worker, math.prod(loaded), path, loaded[0], loaded[1], dist_opt)
    expected = [x for x in expected[-1]]
    got = [x for x in got[-1]]  # the last rank is on the last pipeline stage
    assert all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(expected, got)), (expected, got)
    assert os.path.isdir(path)


# --- refused loads -----------------------------------------------------------------------------------
def _refused_load_worker(path, tp, pp, dist_opt):
    from cdp_megatron.integration.checkpoint import CheckpointError

    try:
        _load_and_continue(path, tp, pp, dist_opt, False, init_model_parallel=True)
    except CheckpointError as exc:
        return str(exc)
    return None


REFUSED = [  # saved (tp, pp, dist_opt), loaded (tp, pp, dist_opt), words the error must hold
    pytest.param((1, 1, True), (2, 1, True), ["dp_reshardable", "TP=1, PP=1", "TP=2, PP=1",
                                              "--dist-ckpt-optim-fully-reshardable"], id="dp-reshardable-tp"),
    pytest.param((1, 1, True), (1, 1, False), ["distributed optimizer", "plain optimizer",
                                               "--use-distributed-optimizer"], id="distopt-to-plain"),
]


@pytest.mark.parametrize("saved,loaded,words", REFUSED)
def test_unreshardable_load_is_refused_with_the_fix(tmp_path, saved, loaded, words):
    path = str(tmp_path / "ckpt")
    run_distributed(_save_worker, saved[0] * saved[1], path, *saved)
    errors = run_distributed(_refused_load_worker, loaded[0] * loaded[1], path, *loaded)
    for error in errors:
        assert error is not None, "the load was not refused"
        assert all(w in error for w in words), error


def _step_state_worker(path):
    from cdp_megatron.integration.checkpoint import load_checkpoint
    from cdp_megatron.patches import dist_opt_step_state

    _save_then_continue(path, 1, 1, True, False, "fully_reshardable")
    setup = oc.setup_model(_target(), dist_opt=True, lr_warmup_iters=2, init_model_parallel=False)
    dist_opt_step_state.remove()  # only this patch: the group-identity fix stays applied
    try:
        load_checkpoint(path, setup.chunks, setup.optimizer, setup.scheduler, apply_patches=False)
    except KeyError as exc:
        return f"KeyError: {exc}"
    finally:
        dist_opt_step_state.apply()
    return None


def test_fully_reshardable_load_into_torch_adam_needs_the_patch(tmp_path):
    """Without ``dist_opt_step_state`` megatron-core cannot load the format into torch's Adam
    (the resume tests above pass with it)."""
    (error,) = run_distributed(_step_state_worker, 1, str(tmp_path / "ckpt"))
    assert error is not None and "step" in error, error


def _no_metadata_worker(path):
    """A fully_reshardable checkpoint without content metadata (older saves) still loads in
    its own format: it is read from the optimizer's common state."""
    from unittest import mock

    from megatron.core import dist_checkpointing

    original = dist_checkpointing.save
    with mock.patch.object(
        dist_checkpointing, "save", lambda *a, content_metadata=None, **k: original(*a, **k)
    ):
        _save_then_continue(path, 1, 1, True, False, "fully_reshardable")
    assert dist_checkpointing.load_content_metadata(path) is None
    from cdp_megatron.integration.checkpoint import _saved_metadata

    assert _saved_metadata(path) == {"distrib_optim_sharding_type": "fully_reshardable"}
    _load_and_continue(path, 1, 1, True, False, init_model_parallel=False)


def test_checkpoint_without_content_metadata_loads_in_its_format(tmp_path):
    run_distributed(_no_metadata_worker, 1, str(tmp_path / "ckpt"))


def _other_padding_worker(path):
    """A checkpoint of 256 vocabulary rows loaded into a model of 512: refused before any
    tensor is read (Megatron marks the vocabulary tensors allow_shape_mismatch and would read
    the first 256 rows and zero the others)."""
    _save_then_continue(path, 1, 1, False, False)
    target = tiny_target(multipliers=LR_EPS_BETAS, global_={"lr": 1e-3, "weight_decay": 0.1}, vocab_size=512)
    return _refused_load(path, oc.setup_model(target, lr_warmup_iters=2, init_model_parallel=False))


def _refused_load(path, setup):
    """The CheckpointError of loading ``path`` into ``setup`` (None: it loaded), checking that
    a refused load left the model as it was."""
    from cdp_megatron.integration.checkpoint import CheckpointError, load_checkpoint

    before = oc.snapshot(setup.chunks)
    try:
        load_checkpoint(path, setup.chunks, setup.optimizer, setup.scheduler)
    except CheckpointError as exc:
        after = oc.snapshot(setup.chunks)
        assert all(bool((before[k] == after[k]).all()) for k in before), "the refused load changed the model"
        return str(exc)
    return None


def test_checkpoint_of_another_vocabulary_padding_is_refused(tmp_path):
    path = str(tmp_path / "ckpt")
    (error,) = run_distributed(_other_padding_worker, 1, path)
    assert error == (
        f"{path}: embedding.word_embeddings.weight has 256 rows there, 512 here: the vocabulary is padded to another "
        "size (a multiple of --make-vocab-size-divisible-by x TP); pad it as the checkpoint did"), error


def _other_precision_worker(path, dist_opt, saved_bf16):
    """A checkpoint saved in one precision loaded in the other: refused before any tensor is
    read (Megatron: a KeyError for the fp32 main params, or, bf16 into the plain fp32
    optimizer, a group mismatch that blames the hyperparameters)."""
    _save_then_continue(path, 1, 1, dist_opt, saved_bf16)
    return _refused_load(path, oc.setup_model(_target(), dist_opt=dist_opt, bf16=not saved_bf16, lr_warmup_iters=2,
                                              init_model_parallel=False))


@pytest.mark.parametrize("dist_opt", [False, True], ids=["plain", "distopt"])
@pytest.mark.parametrize("saved_bf16", [True, False], ids=["bf16-to-fp32", "fp32-to-bf16"])
def test_checkpoint_of_another_precision_is_refused(tmp_path, dist_opt, saved_bf16):
    path = str(tmp_path / "ckpt")
    (error,) = run_distributed(_other_precision_worker, 1, path, dist_opt, saved_bf16)
    there, here = ("bfloat16 parameters (--bf16)", "float32 (without --bf16)") if saved_bf16 else (
        "float32 parameters (without --bf16)", "bfloat16 (--bf16)")
    assert error == f"{path} was saved with {there}, this run's are {here}: resume with the precision it was saved with"


def test_checkpoint_to_load_finds_the_latest_a_chosen_step_or_explains(tmp_path):
    """Which checkpoint a resume from a folder reads (no tensor is read here)."""
    from cdp_megatron.integration.checkpoint import CheckpointError, checkpoint_to_load, saved_iterations

    ck = tmp_path / "ck"
    assert checkpoint_to_load(str(ck)) is None  # a first launch with --load ck --save ck
    ck.mkdir()
    assert checkpoint_to_load(str(ck)) is None
    for name in ("iter_0000005", "iter_0000010", "iter_0000015.tmp"):  # .tmp: a save that did not finish
        (ck / name).mkdir()
    for name in ("iter_0000005", "iter_0000010"):
        (ck / name / "metadata.json").write_text("{}")
    assert saved_iterations(str(ck)) == [5, 10]
    with pytest.raises(CheckpointError) as e:  # checkpoints but no tracker: not a fresh start
        checkpoint_to_load(str(ck))
    assert str(e.value) == ("checkpoints of iterations 5, 10 but no latest_checkpointed_iteration.txt (a save that "
                            "stopped before publishing it); give --ckpt-step 10 to resume from the latest")
    (ck / "latest_checkpointed_iteration.txt").write_text("10\n")
    assert checkpoint_to_load(str(ck)) == str(ck / "iter_0000010")
    assert checkpoint_to_load(str(ck), 5) == str(ck / "iter_0000005")
    with pytest.raises(CheckpointError) as e:
        checkpoint_to_load(str(ck), 7)
    assert str(e.value) == "no checkpoint of iteration 7 (--ckpt-step) here; the checkpoints here: iterations 5, 10"
    with pytest.raises(CheckpointError) as e:  # one checkpoint given for the folder
        checkpoint_to_load(str(ck / "iter_0000010"))
    assert str(e.value) == ("this is one checkpoint, not a folder of them (latest_checkpointed_iteration.txt "
                            f"missing): give --load {ck} --ckpt-step 10")
    # another format than torch_dist: named before anything is read
    (ck / "iter_0000005" / "metadata.json").unlink()
    (ck / "iter_0000005" / "mp_rank_00").mkdir()
    with pytest.raises(CheckpointError) as e:
        checkpoint_to_load(str(ck), 5)
    assert str(e.value) == (
        "iter_0000005 is a Megatron-LM checkpoint in the torch format (mp_rank_*/model_optim_rng.pt); cdp-pretrain "
        "reads torch_dist checkpoints: convert it with Megatron-LM (its training command with --ckpt-format torch "
        "--ckpt-convert-format torch_dist --ckpt-convert-save DIR added) and give --load DIR/torch_dist")
    (ck / "iter_0000005" / "mp_rank_00").rmdir()
    (ck / "iter_0000005" / ".metadata").write_text("")
    with pytest.raises(CheckpointError, match=r"^iter_0000005 is a torch.distributed.checkpoint \(torch_dcp\)"):
        checkpoint_to_load(str(ck), 5)
    (ck / "iter_0000005" / ".metadata").unlink()
    with pytest.raises(CheckpointError, match=r"^iter_0000005 holds no checkpoint cdp-pretrain can read"):
        checkpoint_to_load(str(ck), 5)
    (ck / "latest_checkpointed_iteration.txt").write_text("5\n")  # the tracker's too
    with pytest.raises(CheckpointError, match=r"^iter_0000005 holds no checkpoint"):
        checkpoint_to_load(str(ck))
    (tmp_path / "renamed").mkdir()
    (tmp_path / "renamed" / "metadata.json").write_text("{}")
    with pytest.raises(CheckpointError, match="this is one checkpoint, not a folder of them .*: give the folder "
                                              "that holds it"):
        checkpoint_to_load(str(tmp_path / "renamed"))
