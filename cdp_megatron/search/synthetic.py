"""A synthetic per-module multiplier objective with divergence cliffs (method.md section 6).

It stands in for "train the proxy with these multipliers, return the final validation loss"
so that samplers can be compared in seconds. With u_i = log2 x_i and delta_i = u_i - c_i:

    q(x)    = sum_i w_i delta_i^2 + coupling * mean(w) * (sum_i delta_i)^2
    loss(x) = floor + S * (1 - exp(-q / S)),   S = untrained_loss - floor

a smooth, non-separable bowl in log2 space (the coupling term makes a common shift of every
multiplier, like a global LR change, costlier than independent ones) that flattens out at
the untrained loss far from the optimum. Training diverges
when any delta_i > t_i: module i's cliff sits t_i log2 units (a factor 2^t_i) above its
optimum, and the t_i differ by orders of magnitude between modules, from 2^0.25 (an optimum
just below its edge of stability, as for learning rates) to 2^7. A diverged run reports its
last finite loss: the loss it had reached at the cliff plus the missed annealing, moved
towards the untrained loss the further past the cliff it is (the earlier it blew up).
The default point x = 1 (the tuned global hyperparameters) is always stable.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

__all__ = ["CliffBowl", "Evaluation", "make_objective"]


@dataclasses.dataclass(frozen=True)
class Evaluation:
    value: float
    """Final loss, or the last finite loss of a diverged run."""
    diverged: bool


@dataclasses.dataclass(frozen=True, kw_only=True)
class CliffBowl:
    """Smooth bowl in log2 multiplier space with per-module divergence cliffs."""

    names: tuple[str, ...]
    """Parameter name of each multiplier."""
    optimum: tuple[float, ...]
    """c_i: log2 of the optimal multiplier of module i."""
    weights: tuple[float, ...]
    """w_i: curvature of the loss along log2 x_i (loss per log2-unit squared)."""
    cliffs: tuple[float, ...]
    """t_i > 0: log2 distance of module i's divergence threshold above its optimum."""
    coupling: float = 1.0
    """Extra curvature of a common shift of all multipliers, relative to mean(w)."""
    floor: float = 3.0
    """Loss at the optimum (the best value any sampler can find)."""
    untrained_loss: float = 10.0
    """Loss of a run that diverged at its first step (about ln(vocabulary size))."""
    anneal_gap: float = 0.1
    """Loss a run that diverged just before the end still lacks (the missed LR decay)."""

    def __post_init__(self) -> None:
        d = len(self.names)
        if not (len(self.optimum) == len(self.weights) == len(self.cliffs) == d):
            raise ValueError("names, optimum, weights and cliffs must have the same length")
        if len(set(self.names)) != d:
            raise ValueError(f"duplicate names in {self.names}")
        if min(self.cliffs, default=1.0) <= 0 or min(self.weights, default=1.0) <= 0:
            raise ValueError("cliffs and weights must be > 0")

    @classmethod
    def random(cls, dim: int, seed: int, **kwargs: float) -> CliffBowl:
        """A random instance: t_i log-uniform in [2^-2, 7] log2 units, w_i log-uniform in
        [0.003, 0.03], c_i uniform in [-3, 3] but with the cliff at least 0.5 above x = 1."""
        rng = np.random.default_rng(seed)
        cliffs = 2.0 ** rng.uniform(-2.0, math.log2(7.0), dim)
        weights = np.exp(rng.uniform(math.log(0.003), math.log(0.03), dim))
        optimum = rng.uniform(np.maximum(-3.0, 0.5 - cliffs), 3.0)
        return cls(
            names=tuple(f"m{i:02d}" for i in range(dim)),
            optimum=tuple(float(v) for v in optimum),
            weights=tuple(float(v) for v in weights),
            cliffs=tuple(float(v) for v in cliffs),
            **kwargs,
        )

    @property
    def dim(self) -> int:
        return len(self.names)

    def _bowl(self, delta: np.ndarray) -> float:
        w = np.asarray(self.weights)
        q = float(w @ delta**2) + self.coupling * float(w.mean()) * float(delta.sum()) ** 2
        # Saturate smoothly at the untrained loss (q near 0: loss = floor + q).
        span = self.untrained_loss - self.floor
        return self.floor + span * -math.expm1(-q / span)

    def evaluate(self, multipliers: Mapping[str, float] | Sequence[float]) -> Evaluation:
        """Loss at the given multipliers (by name, or in ``names`` order)."""
        if isinstance(multipliers, Mapping):
            unknown = set(multipliers) - set(self.names)
            missing = set(self.names) - set(multipliers)
            if unknown or missing:
                raise KeyError(f"unknown {sorted(unknown)}, missing {sorted(missing)}")
            x = np.array([multipliers[n] for n in self.names], dtype=float)
        else:
            x = np.asarray(multipliers, dtype=float)
            if x.shape != (self.dim,):
                raise ValueError(f"expected {self.dim} multipliers, got shape {x.shape}")
        if np.any(x <= 0):
            raise ValueError("multipliers must be > 0")
        delta = np.log2(x) - np.asarray(self.optimum)
        excess = float(np.max(delta - np.asarray(self.cliffs)))
        if excess <= 0:
            return Evaluation(self._bowl(delta), diverged=False)
        # Last finite loss: what the run had reached when it blew up; further past the cliff
        # it blows up earlier (fraction of training completed 2^-excess).
        at_cliff = self._bowl(np.minimum(delta, np.asarray(self.cliffs))) + self.anneal_gap
        completed = 2.0**-excess
        return Evaluation(at_cliff + (self.untrained_loss - at_cliff) * (1.0 - completed), True)


def make_objective(
    problem: CliffBowl, *, low: float = 2.0**-6, high: float = 2.0**6
) -> Callable[[object], float]:
    """Optuna objective: suggest each multiplier in [low, high] (log scale), mark divergence
    with ``trial.set_user_attr("diverged", ...)`` and return the (last finite) loss."""
    from cdp_megatron.search.sampler import DIVERGED_ATTR

    def objective(trial) -> float:  # optuna.Trial; untyped to keep optuna out of this import
        x = {name: trial.suggest_float(name, low, high, log=True) for name in problem.names}
        result = problem.evaluate(x)
        trial.set_user_attr(DIVERGED_ATTR, result.diverged)
        return result.value

    return objective
