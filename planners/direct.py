"""``direct``: the amortized SAC-style policy λ = f_φ(s) (DESIGN.md §4)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from mbplan import fast
from mbplan.distributions import TanhNormal
from mbplan.models.mlp import mlp
from mbplan.objective import Objective
from mbplan.planners.amortized import AmortizedPlanner
from mbplan.planners.base import PlanResult, PlanTrace, StepOutput


class DirectPlanner(AmortizedPlanner):
    """λ = f_φ(s): a 2×``hidden`` ReLU trunk with zero-initialised linear μ and log σ heads.

    Ignores λ_k: every iteration returns f_φ(s), so I = 1 is all it needs (one network call).

    Args:
        state_dim: S.
        action_dim: A.
        hidden: Trunk width.
    """

    name: ClassVar[str] = "direct"
    default_iters: ClassVar[int] = 1

    def __init__(self, state_dim: int, action_dim: int, hidden: int = 256):
        super().__init__(state_dim, action_dim)
        self.hidden = hidden
        self.net = mlp(state_dim, 2 * action_dim, hidden, zero_last=True)

    def hyperparameters(self) -> dict[str, Any]:
        """Constructor arguments."""
        return {**super().hyperparameters(), "hidden": self.hidden}

    def forward(self, states: Tensor) -> TanhNormal:
        """λ = f_φ(s) for states [B, S]; loc and log_scale [B, A]."""
        loc, raw_log_scale = self.net(states).chunk(2, -1)  # (B, A) each
        return TanhNormal(loc, self.bounds(raw_log_scale))

    def loss(
        self,
        objective: Objective,
        states: Tensor,
        generator: torch.Generator | None = None,
        mask: Tensor | None = None,
        n_iters: int | None = None,
    ) -> tuple[Tensor, PlanResult]:
        """SAC's −Ĵ(s, f_φ(s)) + bound penalty, without the planning loop's bookkeeping.

        Same value as the generic loss with I = 1 (one network call, one objective evaluation);
        the returned trace (detached) holds λ_1 and Ĵ(λ_1) only (Ĵ(λ_0) is NaN: not evaluated).
        With ``MBPLAN_FAST=0`` it is the generic loss itself.
        """
        if not fast.enabled():
            return super().loss(objective, states, generator, mask, n_iters)
        dist = self(states)
        final = objective(states, dist, generator=generator)
        J = final.value  # (B,)
        if mask is None:
            total = J.mean()
        else:
            weight = mask.to(J.dtype)  # (B,)
            total = (J * weight).sum() / weight.sum().clamp_min(1.0)
        with torch.no_grad():  # the record: no graph
            zeros = torch.zeros_like(dist.loc)
            trace = PlanTrace(
                objective=torch.stack([torch.full_like(J, torch.nan), J]),  # (2, B)
                loc=torch.stack([zeros, dist.loc]),
                log_scale=torch.stack([zeros, dist.log_scale]),
                n_evals=torch.zeros(2),
                elapsed=torch.zeros(2),
            )
        return -total + self.bounds.penalty(), PlanResult(dist, trace, final)

    def step(
        self,
        objective: Objective,
        states: Tensor,
        dist: TanhNormal,
        carry: Any,
        generator: torch.Generator | None,
        differentiable: bool,
    ) -> StepOutput:
        """Return f_φ(s); evaluates nothing."""
        with torch.set_grad_enabled(differentiable):
            return StepOutput(self(states), value=None, n_evals=0.0)
