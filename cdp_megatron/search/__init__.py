"""Per-module hyperparameter search (method.md sections 5 and 6), built on Optuna.

``TrustRegionSampler`` is the paper's trust-region random search as an Optuna sampler;
``best_trial`` and ``trust_region_state`` read a study's incumbent and radius from storage.
``cdp_megatron.search.synthetic`` holds a cliffed test objective for comparing samplers.
Needs the ``search`` extra (optuna, matplotlib).
"""

from cdp_megatron.search.sampler import (
    DIVERGED_ATTR,
    TrustRegionSampler,
    TrustRegionState,
    best_trial,
    is_stable,
    trust_region_state,
)

__all__ = [
    "DIVERGED_ATTR",
    "TrustRegionSampler",
    "TrustRegionState",
    "best_trial",
    "is_stable",
    "trust_region_state",
]
