"""Trust-region random search as an Optuna sampler (method.md section 6, paper Appendix B.4).

The per-module loss landscape is close to invex but cut by divergence "cliffs" at thresholds
that differ by orders of magnitude between modules, so plain random search over a wide box
wastes almost every trial. The recipe:

- every multiplier is searched in log2 space;
- keep the best completed, non-diverged trial x* (the incumbent);
- sample each new trial uniformly in the box {x : ||log2 x - log2 x*||_inf <= r}, clipped
  to the parameter bounds (before any trial completed, the centre is 1, or the parameters of
  a trial the user enqueued with ``study.enqueue_trial``);
- r starts at ``radius`` (1: each multiplier x 2^U[-1, 1]) and is multiplied by ``shrink``
  (0.7) each time ``patience`` (100) consecutive finished trials have not improved x*.

Everything is a function of the trials in the study's storage (``trust_region_state``), not
of in-process memory: workers in different processes, on different machines, sharing one RDB
storage agree on the incumbent and on r, and an interrupted study resumes where it stopped.
Each trial draws from its own random stream, seeded by (seed, trial.number, parameter name),
so concurrent workers never collide and the same seed with the same sequential history
gives the same trials.

Diverged trials are first-class: the objective marks them with
``trial.set_user_attr("diverged", True)`` and returns its last finite loss (a trial that
raises or is pruned is treated alike). They count as evaluated, so they count toward
"no improvement", and they never become the incumbent, whatever value they report.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import threading
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from optuna.distributions import BaseDistribution, FloatDistribution
from optuna.samplers import BaseSampler, RandomSampler
from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial, TrialState

__all__ = [
    "DIVERGED_ATTR",
    "TrustRegionSampler",
    "TrustRegionState",
    "baseline_sampler",
    "best_trial",
    "is_stable",
    "trust_region_state",
]

DIVERGED_ATTR = "diverged"
"""User attribute an objective sets (``trial.set_user_attr(DIVERGED_ATTR, True)``) on a
trial whose training diverged; the trial's value is then its last finite loss."""

_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)

# Optuna keeps the parameters given to ``study.enqueue_trial`` in this system attribute of the
# waiting trial (optuna/study/study.py, ``enqueue_trial``; read back by ``Trial.__init__``).
_ENQUEUED_PARAMS_ATTR = "fixed_params"


def is_stable(trial: FrozenTrial) -> bool:
    """True for a COMPLETE trial with one finite value that the objective did not mark
    ``diverged``: the only trials that can be the incumbent."""
    if trial.state != TrialState.COMPLETE or trial.values is None or len(trial.values) != 1:
        return False
    if not math.isfinite(trial.values[0]):
        return False
    return not trial.user_attrs.get(DIVERGED_ATTR, False)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrustRegionState:
    """The search state, derived from the finished trials in completion order."""

    incumbent: FrozenTrial | None
    """Best COMPLETE, non-diverged trial (earliest wins ties); None before there is one."""
    radius: float
    """Current half-width r of the box, in log2 units: radius * shrink^n_shrinks."""
    n_shrinks: int
    """How many times r has been multiplied by ``shrink``."""
    stale: int
    """Finished trials since the last improvement or shrink (0 <= stale < patience)."""
    n_finished: int
    """Finished trials (COMPLETE, PRUNED or FAIL) counted."""
    n_diverged: int
    """Finished trials that can never be the incumbent (diverged, failed or pruned)."""


def _completion_order(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    finished = [t for t in trials if t.state in _FINISHED]
    # Trial numbers break timestamp ties, so a sequential history is ordered by number.
    return sorted(finished, key=lambda t: (t.datetime_complete or datetime.datetime.max, t.number))


def trust_region_state(
    trials: Sequence[FrozenTrial],
    direction: StudyDirection,
    *,
    radius: float = 1.0,
    shrink: float = 0.7,
    patience: int = 100,
) -> TrustRegionState:
    """Replay the finished trials in completion order and return (incumbent, r).

    A finished trial improves the incumbent when it is not diverged and its value is
    strictly better (by ``direction``); the first non-diverged trial always improves. Every
    other finished trial (worse, equal, diverged, failed, pruned) adds one to a counter; when
    the counter reaches ``patience``, r <- r * shrink and the counter restarts. An
    improvement restarts the counter but never grows r. RUNNING and WAITING trials are
    ignored. Completion order is ``datetime_complete`` (ties by trial number), as stamped by
    each worker's clock: workers on several machines should keep their clocks in sync.
    """
    if direction not in (StudyDirection.MINIMIZE, StudyDirection.MAXIMIZE):
        raise ValueError(f"study direction must be minimize or maximize, got {direction}")
    sign = 1.0 if direction == StudyDirection.MINIMIZE else -1.0
    incumbent: FrozenTrial | None = None
    stale = n_shrinks = n_finished = n_diverged = 0
    for trial in _completion_order(trials):
        n_finished += 1
        if is_stable(trial):
            improved = incumbent is None or sign * trial.values[0] < sign * incumbent.values[0]
        else:
            n_diverged += 1
            improved = False
        if improved:
            incumbent, stale = trial, 0
        else:
            stale += 1
            if stale == patience:
                n_shrinks, stale = n_shrinks + 1, 0
    return TrustRegionState(
        incumbent=incumbent,
        radius=radius * shrink**n_shrinks,
        n_shrinks=n_shrinks,
        stale=stale,
        n_finished=n_finished,
        n_diverged=n_diverged,
    )


def best_trial(study: Study) -> FrozenTrial:
    """The study's best COMPLETE trial that is not diverged (``study.best_trial`` would also
    consider diverged trials, whose last finite loss can look better than any finished run)."""
    state = trust_region_state(study.get_trials(deepcopy=False), study.direction)
    if state.incumbent is None:
        raise ValueError(
            f"study {study.study_name!r} has no completed, non-diverged trial yet "
            f"({state.n_finished} finished, {state.n_diverged} diverged/failed/pruned)"
        )
    return state.incumbent


@dataclasses.dataclass(frozen=True)
class _TrialPlan:
    """What one trial is sampled from, fixed at its first sampled parameter."""

    center: dict[str, float]  # parameter name -> value (not log2) at the centre of the box
    radius: float


def _log2_bounds(name: str, dist: FloatDistribution) -> tuple[float, float]:
    if dist.low <= 0.0:
        raise ValueError(
            f"TrustRegionSampler searches float parameters as multipliers in log2 space, but "
            f"{name!r} has low={dist.low}; declare it with a positive range, e.g. "
            f"trial.suggest_float({name!r}, 2**-6, 2**6, log=True)"
        )
    return math.log2(dist.low), math.log2(dist.high)


def baseline_sampler(name: str, seed: int):
    """One of Optuna's own samplers, the baselines we compare with: ``random``, ``cmaes`` or
    ``tpe``, seeded (ValueError for another name)."""
    import optuna

    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    raise ValueError(f"unknown baseline sampler {name!r}; use random, cmaes or tpe")


class TrustRegionSampler(BaseSampler):
    """Trust-region random search in log2 space (method.md section 6).

    Args:
        seed: Seed of the per-trial random streams; None draws one at construction.
        radius: Initial half-width r of the box in log2 units (1: x * 2^U[-1, 1]).
        shrink: Factor applied to r after ``patience`` non-improving finished trials.
        patience: Consecutive finished trials without improvement before r shrinks.
        independent_sampler: Sampler for parameters that are not positive continuous floats
            (int, categorical, stepped float). Default: a RandomSampler seeded per trial from
            ``seed``, so those parameters are also reproducible and collision-free.

    Float parameters must have low > 0 (they are multipliers); ``log=True`` is expected and
    a linear-scale float is still searched in log2 space.
    """

    def __init__(
        self,
        seed: int | None = None,
        *,
        radius: float = 1.0,
        shrink: float = 0.7,
        patience: int = 100,
        independent_sampler: BaseSampler | None = None,
    ) -> None:
        if not radius > 0:
            raise ValueError(f"radius must be > 0, got {radius}")
        if not 0 < shrink <= 1:
            raise ValueError(f"shrink must be in (0, 1], got {shrink}")
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        if seed is None:
            seed = int(np.random.SeedSequence().generate_state(1, dtype=np.uint64)[0] >> 1)
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self._seed = int(seed)
        self._radius = float(radius)
        self._shrink = float(shrink)
        self._patience = int(patience)
        self._independent_sampler = independent_sampler
        self._plans: dict[tuple[str, int], _TrialPlan] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"TrustRegionSampler(seed={self._seed}, radius={self._radius}, "
            f"shrink={self._shrink}, patience={self._patience})"
        )

    # ---- state, derived from storage -------------------------------------------------------

    def state(self, study: Study) -> TrustRegionState:
        """Incumbent, radius and counters from the study's finished trials."""
        self._raise_error_if_multi_objective(study)
        return trust_region_state(
            study.get_trials(deepcopy=False, states=_FINISHED),
            study.direction,
            radius=self._radius,
            shrink=self._shrink,
            patience=self._patience,
        )

    def radius(self, study: Study) -> float:
        """Current half-width r (log2 units) of the box new trials are drawn from."""
        return self.state(study).radius

    def _plan(self, study: Study, trial: FrozenTrial) -> _TrialPlan:
        key = (study.study_name, trial.number)
        with self._lock:
            plan = self._plans.get(key)
            if plan is None:
                trials = study.get_trials(deepcopy=False)
                state = trust_region_state(
                    trials,
                    study.direction,
                    radius=self._radius,
                    shrink=self._shrink,
                    patience=self._patience,
                )
                if state.incumbent is not None:
                    center = dict(state.incumbent.params)
                else:
                    center = _pending_enqueued_params(trials, exclude=trial.number)
                plan = _TrialPlan(center=center, radius=state.radius)
                self._plans[key] = plan
            return plan

    # ---- BaseSampler -----------------------------------------------------------------------

    def infer_relative_search_space(
        self, study: Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        # The box is a product of intervals, so each parameter is drawn on its own in
        # sample_independent; that also copes with search spaces that change between trials.
        return {}

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return {}

    def sample_independent(
        self,
        study: Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        self._raise_error_if_multi_objective(study)
        if not (
            isinstance(param_distribution, FloatDistribution) and param_distribution.step is None
        ):
            return self._sample_fallback(study, trial, param_name, param_distribution)
        lo, hi = _log2_bounds(param_name, param_distribution)
        plan = self._plan(study, trial)
        center_value = plan.center.get(param_name, 1.0)
        if not (isinstance(center_value, (int, float)) and center_value > 0):
            center_value = 1.0  # the incumbent had this name as a non-multiplier parameter
        center = min(max(math.log2(center_value), lo), hi)
        a, b = max(lo, center - plan.radius), min(hi, center + plan.radius)
        u = self._rng(trial.number, param_name).uniform(a, b)
        return min(max(2.0**u, param_distribution.low), param_distribution.high)

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        if self._independent_sampler is not None:
            self._independent_sampler.before_trial(study, trial)

    def after_trial(
        self,
        study: Study,
        trial: FrozenTrial,
        state: TrialState,
        values: Sequence[float] | None,
    ) -> None:
        with self._lock:
            self._plans.pop((study.study_name, trial.number), None)
        if self._independent_sampler is not None:
            self._independent_sampler.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        # Streams are per trial number, so threads of one process (n_jobs > 1) already draw
        # different values; keep the seed so the study stays reproducible.
        if self._independent_sampler is not None:
            self._independent_sampler.reseed_rng()

    # ---- helpers ---------------------------------------------------------------------------

    def _seed_sequence(self, number: int, param_name: str) -> np.random.SeedSequence:
        return np.random.SeedSequence([self._seed, number, zlib.crc32(param_name.encode())])

    def _rng(self, number: int, param_name: str) -> np.random.Generator:
        return np.random.default_rng(self._seed_sequence(number, param_name))

    def _sample_fallback(
        self, study: Study, trial: FrozenTrial, name: str, dist: BaseDistribution
    ) -> Any:
        sampler = self._independent_sampler
        if sampler is None:
            seed = int(self._seed_sequence(trial.number, name).generate_state(1)[0])
            sampler = RandomSampler(seed=seed)
        return sampler.sample_independent(study, trial, name, dist)


def _pending_enqueued_params(trials: Sequence[FrozenTrial], *, exclude: int) -> dict[str, Any]:
    """Parameters of the earliest enqueued trial that has not finished yet, so that workers
    sampling while it runs search around it rather than around the default centre 1."""
    for t in sorted(trials, key=lambda t: t.number):
        if t.number != exclude and t.state in (TrialState.WAITING, TrialState.RUNNING):
            params = t.system_attrs.get(_ENQUEUED_PARAMS_ATTR)
            if params:
                return dict(params)
    return {}
