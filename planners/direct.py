"""``direct``: the amortized SAC-style policy λ = f_φ(s) (DESIGN.md §4)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from mbplan.distributions import TanhNormal
from mbplan.models.mlp import mlp
from mbplan.objective import Objective
from mbplan.planners.amortized import AmortizedPlanner
from mbplan.planners.base import StepOutput


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
