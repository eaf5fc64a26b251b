"""``cem``: the cross-entropy method in pre-tanh space (Rubinstein, 1999; as in PETS/TD-MPC)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from mbplan.distributions import TanhNormal
from mbplan.objective import Objective
from mbplan.planners.base import Planner, StepOutput, worst_if_nonfinite


@dataclass(frozen=True)
class CEMPlanner(Planner):
    """Sample a population from λ_k, keep the elites by per-sample Q, refit the Gaussian.

    new = (1 − lr)·old + lr·fit for the pre-tanh mean and std of the elites. Samples are ranked by
    Q̂ alone: the KL term does not change the order (DESIGN.md §4). NaN Q ranks last.

    Attributes:
        population: Samples per state per iteration (P).
        n_elites: Elites kept.
        lr: Weight on the new fit (0.9 common; the reference analysis used 0.01).
        log_scale_bounds: log σ is clipped into this range.
        n_iters: Default iterations.
    """

    population: int = 100
    n_elites: int = 10
    lr: float = 0.9
    log_scale_bounds: tuple[float, float] = (-10.0, 2.0)
    n_iters: int = 10

    name: ClassVar[str] = "cem"

    def __post_init__(self) -> None:
        if not 1 <= self.n_elites <= self.population:
            raise ValueError(
                f"need 1 <= n_elites <= population, got {self.n_elites}, {self.population}"
            )

    @property
    def default_iters(self) -> int:  # type: ignore[override]
        """I when the caller gives none."""
        return self.n_iters

    def step(
        self,
        objective: Objective,
        states: Tensor,
        dist: TanhNormal,
        carry: Any,
        generator: torch.Generator | None,
        differentiable: bool,
    ) -> StepOutput:
        """One CEM update; Ĵ(λ_k) is estimated from the same population."""
        with torch.no_grad():
            # Sample and score the population
            out = objective(states, dist, n_samples=self.population, generator=generator)
            q = worst_if_nonfinite(out.sample_values)  # (P, B)

            # Fit the elites
            idx = q.topk(self.n_elites, dim=0).indices  # (N_elite, B)
            A = out.pre_tanh.shape[-1]
            elites = out.pre_tanh.gather(0, idx.unsqueeze(-1).expand(-1, -1, A))  # (N_elite, B, A)
            fit_loc = elites.mean(0)
            fit_scale = (
                elites.std(0, unbiased=False) if self.n_elites > 1 else torch.zeros_like(fit_loc)
            )

            # Update parameters (smoothed)
            loc = (1 - self.lr) * dist.loc + self.lr * fit_loc
            scale = (1 - self.lr) * dist.log_scale.exp() + self.lr * fit_scale
            low, high = self.log_scale_bounds
            log_scale = scale.clamp_min(torch.finfo(scale.dtype).tiny).log().clamp(low, high)
        return StepOutput(
            TanhNormal(loc, log_scale), out.value, self.population / objective.n_samples
        )
