"""``iterative``: the learned iterative amortized optimizer (Marino et al., NeurIPS 2021, §3).

Each iteration feeds the state, the current λ and ∇_λ(−Ĵ) (standardised per example) to an MLP
that proposes a new λ through learned gates (DESIGN.md §4).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from mbplan.distributions import TanhNormal
from mbplan.models.mlp import mlp
from mbplan.objective import Objective
from mbplan.planners.amortized import AmortizedPlanner
from mbplan.planners.base import StepOutput


def standardize(v: Tensor) -> Tensor:
    """(v − mean)/(std + 1e-7) across the last (action) dim, when it has more than one entry."""
    if v.shape[-1] < 2:
        return v
    return (v - v.mean(-1, keepdim=True)) / (v.std(-1, keepdim=True) + 1e-7)


class IterativePlanner(AmortizedPlanner):
    """Iterative amortized optimizer: λ_{k+1} = gate(λ_k, Δ(s, λ_k, ∇_λ −Ĵ)).

    Args:
        state_dim: S.
        action_dim: A.
        hidden: Trunk width (2 layers).
        n_iters: Default iterations N (train and act).
    """

    name: ClassVar[str] = "iterative"
    default_iters: ClassVar[int] = 5

    def __init__(self, state_dim: int, action_dim: int, hidden: int = 256, n_iters: int = 5):
        super().__init__(state_dim, action_dim)
        self.hidden = hidden
        self.default_iters = n_iters  # type: ignore[misc]
        # Outputs: Δ_μ, Δ_logσ, gate_μ, gate_logσ (A each); zero-initialised → gates 0.5, Δ 0.
        self.net = mlp(state_dim + 4 * action_dim, 4 * action_dim, hidden, zero_last=True)

    def hyperparameters(self) -> dict[str, Any]:
        """Constructor arguments."""
        return {**super().hyperparameters(), "hidden": self.hidden, "n_iters": self.default_iters}

    def step(
        self,
        objective: Objective,
        states: Tensor,
        dist: TanhNormal,
        carry: Any,
        generator: torch.Generator | None,
        differentiable: bool,
    ) -> StepOutput:
        """One gated update from Ĵ's gradient at λ_k."""
        # Evaluate Ĵ(λ_k) and its gradient (per state: the batch sum separates)
        with torch.enable_grad():
            loc = dist.loc if dist.loc.requires_grad else dist.loc.detach().requires_grad_()
            log_scale = (
                dist.log_scale
                if dist.log_scale.requires_grad
                else dist.log_scale.detach().requires_grad_()
            )
            out = objective(states, TanhNormal(loc, log_scale), generator=generator)
            grad_loc, grad_log_scale = torch.autograd.grad(
                -out.value.sum(), [loc, log_scale], retain_graph=differentiable
            )  # (B, A) each
        loc, log_scale = loc.detach(), log_scale.detach()

        # Propose and gate (inputs detached: one-step truncated backprop)
        with torch.set_grad_enabled(differentiable):
            inputs = [
                loc,
                log_scale,
                grad_loc.nan_to_num(0, 0, 0),
                grad_log_scale.nan_to_num(0, 0, 0),
            ]
            x = torch.cat([states, *map(standardize, inputs)], -1)  # (B, S + 4A)
            delta_loc, delta_log_scale, gate_loc, gate_log_scale = self.net(x).chunk(4, -1)
            gate_loc, gate_log_scale = gate_loc.sigmoid(), gate_log_scale.sigmoid()
            new_loc = gate_loc * loc + (1 - gate_loc) * delta_loc
            new_log_scale = gate_log_scale * log_scale + (1 - gate_log_scale) * delta_log_scale
            new = TanhNormal(new_loc, self.bounds(new_log_scale))
        value = out.value if differentiable else out.value.detach()
        return StepOutput(new, value=value, n_evals=1.0)
