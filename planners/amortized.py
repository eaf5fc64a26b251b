"""What the amortized planners (``direct``, ``iterative``) share.

The learned soft clamp of log σ, the training loss of DESIGN.md §4, and :func:`train_amortized`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mbplan.objective import Objective
from mbplan.planners.base import Planner, PlanResult


class LogScaleBounds(nn.Module):
    """Soft clamp of log σ with learned per-dim bounds m (init −10) and M (init 0.5).

    ℓ' = M − softplus(M − ℓ_raw); ℓ = m + softplus(ℓ' − m). The loss adds 0.01·(ΣM − Σm).
    """

    def __init__(self, action_dim: int, min_init: float = -10.0, max_init: float = 0.5):
        super().__init__()
        self.log_scale_min = nn.Parameter(torch.full((action_dim,), min_init))
        self.log_scale_max = nn.Parameter(torch.full((action_dim,), max_init))

    def forward(self, raw: Tensor) -> Tensor:
        """Clamp raw log σ [B, A] softly into (m, M)."""
        upper = self.log_scale_max - F.softplus(self.log_scale_max - raw)
        return self.log_scale_min + F.softplus(upper - self.log_scale_min)

    def vjp(self, raw: Tensor, g: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Gradients of :meth:`forward` for ∂L/∂ℓ = g [B, A], without autograd.

        Returns:
            (∂L/∂ℓ_raw [B, A], ∂L/∂m [A], ∂L/∂M [A]), the bounds' summed over the batch.
        """
        d1 = self.log_scale_max - raw  # ℓ' = M − softplus(d1)
        d2 = self.log_scale_max - F.softplus(d1) - self.log_scale_min  # ℓ = m + softplus(d2)
        g_d2 = torch.ops.aten.softplus_backward(g, d2, 1.0, 20.0)
        g_d1 = torch.ops.aten.softplus_backward(-g_d2, d1, 1.0, 20.0)
        return -g_d1, (g - g_d2).sum(0), (g_d2 + g_d1).sum(0)

    def penalty(self) -> Tensor:
        """0.01·(ΣM − Σm), added to the loss so the bounds tighten."""
        return 0.01 * (self.log_scale_max.sum() - self.log_scale_min.sum())


class AmortizedPlanner(nn.Module, Planner):
    """A planner with weights: an nn.Module for a fixed state size S and action size A."""

    def __init__(self, state_dim: int, action_dim: int):
        nn.Module.__init__(self)
        self.state_dim, self.action_dim = state_dim, action_dim
        self.bounds = LogScaleBounds(action_dim)

    def expected_dims(self) -> tuple[int | None, int | None]:
        """(S, A) of the networks."""
        return self.state_dim, self.action_dim

    def hyperparameters(self) -> dict[str, Any]:
        """Constructor arguments (for configs and checkpoints)."""
        return {"state_dim": self.state_dim, "action_dim": self.action_dim}

    def loss(
        self,
        objective: Objective,
        states: Tensor,
        generator: torch.Generator | None = None,
        mask: Tensor | None = None,
        n_iters: int | None = None,
    ) -> tuple[Tensor, PlanResult]:
        """Training loss: mean over k = 1..I and states of −Ĵ(s, λ_k), plus the bound penalty.

        With the inputs of every iteration detached this is one-step truncated backprop; for
        ``direct`` (I = 1) it is SAC's −Ĵ(s, f_φ(s)).

        Args:
            objective: Ĵ with frozen weights inside.
            states: [B, S].
            generator: Sampling noise.
            mask: [B] weights, 0 for terminal or invalid states (applied to every term).
            n_iters: I (default the planner's own).

        Returns:
            (scalar loss, the differentiable :class:`PlanResult`).
        """
        result = self.plan(
            objective, states, n_iters=n_iters, generator=generator, differentiable=True
        )
        J = result.trace.objective[1:]  # (I, B)
        weight = torch.ones_like(J[0]) if mask is None else mask.to(J.dtype)  # (B,)
        valid = torch.isfinite(J) & (weight > 0)  # (I, B)
        J = torch.where(valid, J, torch.zeros_like(J))
        total = (J * weight).sum() / (weight * valid).sum().clamp_min(1.0)
        return -total + self.bounds.penalty(), result


@dataclass
class TrainLog:
    """Per-step record of :func:`train_amortized`: losses and mean Ĵ(λ_I) − Ĵ(λ_0)."""

    losses: list[float]
    improvements: list[float]


def train_amortized(
    planner: AmortizedPlanner,
    objective: Objective,
    sample_states: Callable[[], Tensor] | Iterable[Tensor],
    steps: int,
    lr: float = 3e-4,
    generator: torch.Generator | None = None,
    n_iters: int | None = None,
    on_step: Callable[[int, float, float], None] | None = None,
) -> TrainLog:
    """Train a ``direct`` or ``iterative`` planner's weights on any objective.

    Args:
        planner: The planner to train (in place).
        objective: Ĵ(s, λ) with frozen weights inside.
        sample_states: A callable returning a batch [B, S], or an iterable of batches.
        steps: Gradient steps.
        lr: Adam learning rate.
        generator: Sampling noise inside the objective.
        n_iters: Iterations per plan (default the planner's own).
        on_step: Called after each step with (step, loss, mean improvement), e.g. a progress bar.

    Returns:
        :class:`TrainLog` with one entry per step.
    """
    batches: Iterator[Tensor] = (
        iter(sample_states) if not callable(sample_states) else iter(sample_states, None)
    )
    optimizer = torch.optim.Adam(planner.parameters(), lr=lr)
    log = TrainLog([], [])
    for step in range(steps):
        states = next(batches)
        loss, result = planner.loss(objective, states, generator=generator, n_iters=n_iters)
        if not torch.isfinite(loss):
            raise ValueError(f"training diverged at step {step}: loss = {loss.item()}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        log.losses.append(loss.item())
        log.improvements.append(result.improvement().detach().mean().item())
        if on_step is not None:
            on_step(step, log.losses[-1], log.improvements[-1])
    return log
