"""Planners that optimize a tanh-Gaussian λ per state (installed as ``mbplan.planners``).

Every planner has the same call, ``planner.plan(objective, states, init=None, n_iters=None,
generator=None) -> PlanResult``. :data:`PLANNERS` is the registry; a planner added to it is under
the contract tests at once.
"""

from __future__ import annotations

from typing import Any

from mbplan.planners.adam import AdamPlanner
from mbplan.planners.amortized import AmortizedPlanner, LogScaleBounds, TrainLog, train_amortized
from mbplan.planners.base import Planner, PlanResult, PlanTrace, StepOutput
from mbplan.planners.cem import CEMPlanner
from mbplan.planners.direct import DirectPlanner
from mbplan.planners.iterative import IterativePlanner
from mbplan.planners.mppi import MPPIPlanner, shift_sequence

#: Registry: planner name → class.
PLANNERS: dict[str, type[Planner]] = {
    "direct": DirectPlanner,
    "iterative": IterativePlanner,
    "adam": AdamPlanner,
    "cem": CEMPlanner,
    "mppi": MPPIPlanner,
}


def make_planner(
    name: str,
    *,
    state_dim: int | None = None,
    action_dim: int | None = None,
    **hyperparameters: Any,
) -> Planner:
    """Build a registered planner.

    Args:
        name: One of :data:`PLANNERS` (``direct``, ``iterative``, ``adam``, ``cem``, ``mppi``).
        state_dim: S; required by the amortized planners (which have networks), ignored by others.
        action_dim: A; required by the amortized planners, ignored by others.
        **hyperparameters: The planner's own settings (e.g. ``lr=3e-2`` for adam).

    Raises:
        ValueError: Unknown name, or missing sizes for an amortized planner.
    """
    if name not in PLANNERS:
        raise ValueError(f"unknown planner {name!r}; choose from {', '.join(PLANNERS)}")
    cls = PLANNERS[name]
    if issubclass(cls, AmortizedPlanner):
        if state_dim is None or action_dim is None:
            raise ValueError(f"planner {name!r} needs state_dim and action_dim")
        return cls(state_dim, action_dim, **hyperparameters)
    return cls(**hyperparameters)


__all__ = [
    "PLANNERS",
    "AdamPlanner",
    "AmortizedPlanner",
    "CEMPlanner",
    "DirectPlanner",
    "IterativePlanner",
    "LogScaleBounds",
    "MPPIPlanner",
    "PlanResult",
    "PlanTrace",
    "Planner",
    "StepOutput",
    "TrainLog",
    "make_planner",
    "shift_sequence",
    "train_amortized",
]
