"""cdp_megatron.patches: the version gate, apply/remove round trips (every upstream binding
restored), the checkpoint group-identity bug and its fix on Megatron's own matching code, and
the carrier groups' scoping, and the distributed optimizer's step-state load."""

from __future__ import annotations

import pytest

pytest.importorskip("megatron.core")

from cdp_megatron import patches  # noqa: E402
from cdp_megatron.patches import (  # noqa: E402
    carrier_param_groups,
    checkpoint_without_output_fp8,
    dist_opt_step_state,
    param_group_identity,
)

pytestmark = pytest.mark.megatron


@pytest.fixture(autouse=True)
def restore_patch_state():
    """Leave the patches as the test found them."""
    before = patches.applied()
    yield
    patches.remove_all()
    if before:
        patches.apply_all(allow_untested=True)


def _bindings():
    from megatron.core import optimizer as opt_pkg
    from megatron.core.optimizer import distrib_optimizer, optimizer
    from megatron.core.tensor_parallel import random

    return {
        "checkpoint_without_output": random.CheckpointWithoutOutput.__dict__["__init__"],
        "pkg.keys": opt_pkg.param_group_identifier_keys,
        "optimizer.keys": optimizer.param_group_identifier_keys,
        "distrib.keys": distrib_optimizer.param_group_identifier_keys,
        "filter": optimizer.MegatronOptimizer.__dict__["_filter_and_reorder_param_groups"],
        "dist_load": distrib_optimizer.DistributedOptimizer.__dict__["load_state_dict"],
        "get_param_groups": opt_pkg._get_param_groups,
        "set_main_param": distrib_optimizer.DistributedOptimizer.__dict__["_set_main_param_and_optimizer_states"],
    }


# --- version gate --------------------------------------------------------------------------------
def test_installed_version_is_supported():
    assert patches.check_megatron_version() in patches.SUPPORTED_MEGATRON_CORE


def test_untested_version_is_refused_unless_allowed(monkeypatch):
    patches.remove_all()
    monkeypatch.setattr(patches, "megatron_core_version", lambda: "0.15.0")
    monkeypatch.delenv(patches.ALLOW_UNTESTED_ENV, raising=False)
    with pytest.raises(patches.UnsupportedMegatronVersion) as info:
        patches.apply_all()
    message = str(info.value)
    assert "0.15.0" in message and "0.16.1" in message and "0.19.2" in message
    assert patches.ALLOW_UNTESTED_ENV in message
    assert patches.applied() == []  # refused before applying anything
    assert patches.check_megatron_version(allow_untested=True) == "0.15.0"
    monkeypatch.setenv(patches.ALLOW_UNTESTED_ENV, "1")
    assert patches.check_megatron_version() == "0.15.0"


# --- apply / remove round trips ------------------------------------------------------------------
@pytest.mark.parametrize("module", [param_group_identity, carrier_param_groups, dist_opt_step_state,
                                    checkpoint_without_output_fp8], ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_apply_remove_round_trip(module):
    patches.remove_all()
    original = _bindings()
    module.apply()
    assert module.is_applied()
    changed = {k for k, v in _bindings().items() if v is not original[k]}
    assert changed, "apply() changed nothing"
    with pytest.raises(patches.PatchError, match="already applied"):
        module.apply()
    module.remove()
    assert not module.is_applied()
    assert all(v is original[k] for k, v in _bindings().items())
    module.remove()  # a no-op when not applied


def test_apply_all_is_idempotent_and_remove_all_restores():
    patches.remove_all()
    original = _bindings()
    assert sorted(patches.apply_all()) == sorted(patches.PATCH_MODULES)
    assert patches.apply_all() == []
    assert sorted(patches.applied()) == sorted(patches.PATCH_MODULES)
    patches.remove_all()
    assert patches.applied() == []
    assert all(v is original[k] for k, v in _bindings().items())


def test_identity_patch_rebinds_every_module():
    from megatron.core import optimizer as opt_pkg
    from megatron.core.optimizer import distrib_optimizer, optimizer

    patches.remove_all()
    upstream = tuple(optimizer.param_group_identifier_keys)
    patches.apply_all()
    for module in (opt_pkg, optimizer, distrib_optimizer):
        keys = module.param_group_identifier_keys
        # upstream's own keys first (0.16.1: wd_mult, lr_mult, ...; 0.19.2 widened them), then ours
        assert keys[: len(upstream)] == upstream
        assert "wd_mult" in keys and "lr_mult" in keys
        assert set(param_group_identity.IDENTITY_EXTRA_KEYS) <= set(keys)


# --- the bug and the fix on Megatron's own matching code ------------------------------------------
def _groups(epss, max_lr=1e-3):
    """cdp groups that differ only in eps (the identity of 0.16.1 and of 0.19.2 omits eps)."""
    return [
        {
            "params": [i], "wd_mult": 1.0, "lr_mult": 1.0, "is_expert_parallel": False,
            "is_decoupled_lr": False, "max_lr": max_lr, "min_lr": max_lr / 10, "eps": eps,
            "betas": (0.9, 0.95), "start_wd": 0.1, "end_wd": 0.1,
        }
        for i, eps in enumerate(epss)
    ]


def _filter(current, saved):
    from megatron.core.optimizer.optimizer import MegatronOptimizer

    return MegatronOptimizer._filter_and_reorder_param_groups(current, saved)


def test_unpatched_matching_mixes_up_groups():
    """The bug: every group gets the last saved group's values."""
    patches.remove_all()
    result = _filter(_groups([1e-8, 2e-8, 3e-8]), _groups([1e-8, 2e-8, 3e-8]))
    assert [g["eps"] for g in result] == [3e-8, 3e-8, 3e-8]


def test_patched_matching_restores_every_group():
    patches.remove_all()
    param_group_identity.apply()
    saved = _groups([1e-8, 2e-8, 3e-8])
    result = _filter(_groups([1e-8, 2e-8, 3e-8]), saved)
    assert [g["eps"] for g in result] == [1e-8, 2e-8, 3e-8]
    assert [g["params"] for g in result] == [[0], [1], [2]]  # params stay in saved order
    assert all(param_group_identity.ABSENT not in g.values() for g in result + saved)


def test_patched_matching_handles_groups_without_the_new_keys():
    """Plain Megatron groups have no start_wd/end_wd (SGD: no eps/betas): still matched."""
    patches.remove_all()
    param_group_identity.apply()

    def plain(wd_mults):
        return [
            {"params": [i], "wd_mult": w, "lr_mult": 1.0, "is_expert_parallel": False,
             "is_decoupled_lr": False, "max_lr": 1e-3, "min_lr": 1e-4}
            for i, w in enumerate(wd_mults)
        ]

    current = plain([0.0, 1.0])
    result = _filter(current, plain([0.0, 1.0]))
    assert [g["wd_mult"] for g in result] == [0.0, 1.0]
    assert all("start_wd" not in g and "eps" not in g for g in result + current)


def test_patched_matching_refuses_different_hyperparameters():
    patches.remove_all()
    param_group_identity.apply()
    with pytest.raises(ValueError, match="no saved param group has the hyperparameters"):
        _filter(_groups([1e-8, 5e-8]), _groups([1e-8, 2e-8]))


# --- carrier groups ------------------------------------------------------------------------------
def test_carrier_context_needs_the_patch():
    patches.remove_all()
    with pytest.raises(patches.PatchError, match="apply_all"):
        with carrier_param_groups.extra_param_groups([{"max_lr": 1.0}]):
            pass


# --- the distributed optimizer's step state ------------------------------------------------------
class _FakeDistOpt:
    """What ``_set_main_param_and_optimizer_states`` reads: one main param in group 0, with
    torch Adam's per-parameter state (a ``step`` tensor besides the moments)."""

    def __init__(self):
        import torch
        from types import SimpleNamespace

        self.main = torch.zeros(4)
        self.step = torch.tensor(7.0)
        self.model_param_group_index_map = {"p": (0, 0)}
        self.config = SimpleNamespace(use_precision_aware_optimizer_no_fp8_or_ds_fp8=False)
        state = {self.main: {"step": self.step, "exp_avg": torch.zeros(4), "exp_avg_sq": torch.zeros(4)}}
        self.optimizer = SimpleNamespace(param_groups=[{"params": [self.main]}], state=state)


def test_step_state_patch_copies_the_moments_and_keeps_step():
    import torch
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    fake = _FakeDistOpt()
    saved = {"param": torch.ones(4), "exp_avg": torch.full((4,), 2.0), "exp_avg_sq": torch.full((4,), 3.0)}
    patches.remove_all()
    with pytest.raises(KeyError, match="step"):  # upstream: the source has no per-parameter step
        DistributedOptimizer._set_main_param_and_optimizer_states(fake, "p", saved)
    dist_opt_step_state.apply()
    try:
        DistributedOptimizer._set_main_param_and_optimizer_states(fake, "p", saved)
    finally:
        dist_opt_step_state.remove()
    state = fake.optimizer.state[fake.main]
    assert torch.equal(fake.main, saved["param"])
    assert torch.equal(state["exp_avg"], saved["exp_avg"]) and torch.equal(state["exp_avg_sq"], saved["exp_avg_sq"])
    assert state["step"] is fake.step and fake.step.item() == 7.0
    del saved["exp_avg_sq"]  # any other missing key still fails as upstream does
    dist_opt_step_state.apply()
    try:
        with pytest.raises(KeyError, match="exp_avg_sq"):
            DistributedOptimizer._set_main_param_and_optimizer_states(fake, "p", saved)
        assert state["step"] is fake.step  # put back even when the copy fails
    finally:
        dist_opt_step_state.remove()


# --- norm recomputation without Transformer Engine ------------------------------------------------
def test_norm_checkpoint_takes_the_fp8_branch_only_with_transformer_engine(monkeypatch):
    """Upstream's CheckpointWithoutOutput() sets fp8 = (False is not None) = True, the branch that
    calls Transformer Engine; patched, that stays so only where Transformer Engine is importable."""
    from megatron.core.tensor_parallel import random

    patches.remove_all()
    assert random.CheckpointWithoutOutput().fp8 is True  # the upstream bug, whatever is installed
    checkpoint_without_output_fp8.apply()
    monkeypatch.setattr(random, "HAVE_TE", False)
    assert random.CheckpointWithoutOutput().fp8 is False
    monkeypatch.setattr(random, "HAVE_TE", True)
    assert random.CheckpointWithoutOutput().fp8 is True  # upstream's value: TE says whether FP8 is on
