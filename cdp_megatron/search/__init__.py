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

from __future__ import annotations

import importlib
from typing import Any

# Re-exported lazily (PEP 562): the command lines (``cli``, which imports only ``spaces``) start,
# and name a missing optuna in one line, without importing optuna and numpy at package import.
_EXPORTS = {
    "ProxyConfigError": "objective",
    "ProxyObjective": "objective",
    "RunResult": "objective",
    "TrialFailed": "objective",
    "run_proxy": "objective",
    "DIVERGED_ATTR": "sampler",
    "TrustRegionSampler": "sampler",
    "TrustRegionState": "sampler",
    "best_trial": "sampler",
    "is_stable": "sampler",
    "trust_region_state": "sampler",
    "SPACES": "spaces",
    "Projection": "spaces",
    "SearchSpace": "spaces",
    "SpaceError": "spaces",
    "multipliers": "spaces",
    "project": "spaces",
    "to_spec": "spaces",
}

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


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
