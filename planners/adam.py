"""``adam``: gradient ascent on λ = (μ, log σ) per state with Adam (Kingma & Ba, 2015)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from mbplan.distributions import TanhNormal
from mbplan.objective import Objective
from mbplan.planners.base import Planner, StepOutput


@dataclass(frozen=True)
class AdamPlanner(Planner):
    """Adam on (μ, log σ) with K fresh samples per step; moments live only inside one ``plan`` call.

    Attributes:
        lr: Step size (reference 1e-2).
        betas: Adam's moment decay rates.
        eps: Adam's denominator epsilon.
        log_scale_bounds: log σ is clipped into this range after every step.
        n_iters: Default iterations (reference analysis: 250).
    """

    lr: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    log_scale_bounds: tuple[float, float] = (-10.0, 2.0)
    n_iters: int = 250

    name: ClassVar[str] = "adam"

    @property
    def default_iters(self) -> int:  # type: ignore[override]
        """I when the caller gives none."""
        return self.n_iters

    def init_carry(
        self, objective: Objective, states: Tensor, dist: TanhNormal, warm: Any = None
    ) -> Any:
        """Zero first and second moments for (μ, log σ) and step count 0."""
        params = torch.cat([dist.loc, dist.log_scale], -1)  # (B, 2A)
        return torch.zeros_like(params), torch.zeros_like(params), 0

    def step(
        self,
        objective: Objective,
        states: Tensor,
        dist: TanhNormal,
        carry: Any,
        generator: torch.Generator | None,
        differentiable: bool,
    ) -> StepOutput:
        """One Adam step on −Ĵ; a non-finite gradient leaves that state's λ where it is."""
        m, v, t = carry
        # Gradient of −Ĵ at λ_k
        with torch.enable_grad():
            params = torch.cat([dist.loc, dist.log_scale], -1).detach().requires_grad_()  # (B, 2A)
            loc, log_scale = params.chunk(2, -1)
            out = objective(states, TanhNormal(loc, log_scale), generator=generator)
            (grad,) = torch.autograd.grad(-out.value.sum(), [params])
        grad = torch.where(torch.isfinite(grad), grad, torch.zeros_like(grad))

        # Update parameters
        beta1, beta2 = self.betas
        t = t + 1
        m = beta1 * m + (1 - beta1) * grad
        v = beta2 * v + (1 - beta2) * grad.square()
        m_hat, v_hat = m / (1 - beta1**t), v / (1 - beta2**t)
        params = params.detach() - self.lr * m_hat / (v_hat.sqrt() + self.eps)
        loc, log_scale = params.chunk(2, -1)
        log_scale = log_scale.clamp(*self.log_scale_bounds)
        return StepOutput(TanhNormal(loc, log_scale), out.value.detach(), 1.0, (m, v, t))
