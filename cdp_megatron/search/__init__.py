"""Per-module hyperparameter search (method.md sections 5 and 6), built on Optuna.

``TrustRegionSampler`` is the paper's trust-region random search as an Optuna sampler;
``best_trial`` and ``trust_region_state`` read a study's incumbent and radius from storage.
``SearchSpace`` builds the global / type / kronecker / uncoupled multiplier spaces of a base
spec (``to_spec`` turns a trial's parameters into a base.json, ``project`` carries a result
between spaces); ``ProxyObjective`` trains the proxy for one trial (``cdp-pretrain`` as a
subprocess). The command lines are ``cdp-search`` (``cdp_megatron.search.cli``) and
``cdp-search-report`` (``cdp_megatron.search.report``). ``cdp_megatron.search.synthetic``
holds a cliffed test objective for comparing samplers. Needs the ``search`` extra (optuna,
matplotlib).
"""

from cdp_megatron.search.objective import (
    ProxyConfigError,
    ProxyObjective,
    RunResult,
    TrialFailed,
    run_proxy,
)
from cdp_megatron.search.sampler import (
    DIVERGED_ATTR,
    TrustRegionSampler,
    TrustRegionState,
    best_trial,
    is_stable,
    trust_region_state,
)
from cdp_megatron.search.spaces import (
    SPACES,
    Projection,
    SearchSpace,
    SpaceError,
    multipliers,
    project,
    to_spec,
)

__all__ = [
    "DIVERGED_ATTR",
    "SPACES",
    "Projection",
    "ProxyConfigError",
    "ProxyObjective",
    "RunResult",
    "SearchSpace",
    "SpaceError",
    "TrialFailed",
    "TrustRegionSampler",
    "TrustRegionState",
    "best_trial",
    "is_stable",
    "multipliers",
    "project",
    "run_proxy",
    "to_spec",
    "trust_region_state",
]
