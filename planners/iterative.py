"""``iterative``: the learned iterative amortized optimizer (Marino et al., NeurIPS 2021, §3).

Each iteration feeds the state, the current λ and ∇_λ(−Ĵ) (standardised per example) to an MLP
that proposes a new λ through learned gates (DESIGN.md §4).
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, ClassVar

import torch
from torch import Tensor

from mbplan import fast
from mbplan.distributions import TanhNormal
from mbplan.models.mlp import mlp
from mbplan.objective import Objective, ObjectiveValue
from mbplan.planners.amortized import AmortizedPlanner
from mbplan.planners.base import PlanResult, PlanTrace, StepOutput, worst_if_nonfinite


def astuple_shallow(value: ObjectiveValue) -> tuple[Tensor, ...]:
    """The fields of an :class:`ObjectiveValue` in order (no deep copy, unlike dataclasses)."""
    return tuple(getattr(value, f.name) for f in fields(value))


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

    def value_and_grad(
        self,
        objective: Objective,
        states: Tensor,
        dist: TanhNormal,
        generator: torch.Generator | None,
        keep_graph: bool = False,
    ) -> tuple[ObjectiveValue, Tensor, Tensor]:
        """Ĵ(λ) and its per-state gradient ∂Ĵ/∂(μ, log σ).

        Args:
            objective: Ĵ.
            states: [B, S].
            dist: λ; detached first unless ``keep_graph``.
            generator: Sampling noise.
            keep_graph: Keep the evaluation's graph back through λ (to the weights that made it).

        Returns:
            (the evaluation, detached unless ``keep_graph``; ∂Ĵ/∂μ [B, A]; ∂Ĵ/∂log σ [B, A]),
            gradients detached with non-finite entries set to 0.
        """
        with torch.enable_grad():
            loc, log_scale = dist.loc, dist.log_scale
            if not (keep_graph and loc.requires_grad):
                loc = loc.detach().requires_grad_()
            if not (keep_graph and log_scale.requires_grad):
                log_scale = log_scale.detach().requires_grad_()
            out = objective(states, TanhNormal(loc, log_scale), generator=generator)
            # The batch sum separates: each state's gradient is its own.
            grad_loc, grad_log_scale = torch.autograd.grad(
                out.value.sum(), [loc, log_scale], retain_graph=keep_graph
            )
        if not keep_graph:
            out = ObjectiveValue(*(t.detach() for t in astuple_shallow(out)))
        return out, grad_loc.nan_to_num(0, 0, 0), grad_log_scale.nan_to_num(0, 0, 0)

    def propose(
        self, states: Tensor, dist: TanhNormal, grad_loc: Tensor, grad_log_scale: Tensor
    ) -> TanhNormal:
        """λ_{k+1} from the detached λ_k and ∂Ĵ/∂λ_k: proposals Δ, sigmoid gates, soft clamp."""
        # Encode (inputs detached: one-step truncated backprop)
        loc, log_scale = dist.loc.detach(), dist.log_scale.detach()
        # The network sees the descent direction ∇(−Ĵ), standardised per example.
        inputs = [loc, log_scale, -grad_loc, -grad_log_scale]
        x = torch.cat([states, *map(standardize, inputs)], -1)  # (B, S + 4A)

        # Propose and gate
        delta_loc, delta_log_scale, gate_loc, gate_log_scale = self.net(x).chunk(4, -1)
        gate_loc, gate_log_scale = gate_loc.sigmoid(), gate_log_scale.sigmoid()
        new_loc = gate_loc * loc + (1 - gate_loc) * delta_loc
        new_log_scale = gate_log_scale * log_scale + (1 - gate_log_scale) * delta_log_scale
        return TanhNormal(new_loc, self.bounds(new_log_scale))

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
        out, grad_loc, grad_log_scale = self.value_and_grad(
            objective, states, dist, generator, keep_graph=differentiable
        )
        with torch.set_grad_enabled(differentiable):
            new = self.propose(states, dist, grad_loc, grad_log_scale)
        return StepOutput(new, value=out.value, n_evals=1.0)

    def loss(
        self,
        objective: Objective,
        states: Tensor,
        generator: torch.Generator | None = None,
        mask: Tensor | None = None,
        n_iters: int | None = None,
    ) -> tuple[Tensor, PlanResult]:
        """Mean over k = 1..N and states of −Ĵ(s, λ_k), plus the bound penalty (DESIGN.md §4).

        One-step truncated backprop: λ_k depends on the weights only through the last network call,
        so ∂(−Ĵ_k)/∂θ = −(∂Ĵ_k/∂λ_k)·(∂λ_k/∂θ). The gradient ∂Ĵ_k/∂λ_k is the one the optimizer
        already computed as its input for step k+1 (and once more at λ_N), with the same samples,
        so the loss backpropagates through the network only, never a second time through the
        critics or model: N+1 objective evaluations with gradient, no retained graphs.

        Returns:
            (loss whose value is the true mean −Ĵ plus penalty and whose gradient is exact,
            the :class:`PlanResult` with detached trace and the final evaluation). With
            ``MBPLAN_FAST=0``, the generic loss of :class:`AmortizedPlanner` (its plain twin).
        """
        if not fast.enabled():
            return super().loss(objective, states, generator, mask, n_iters)
        n_iters = self.default_iters if n_iters is None else n_iters
        B = states.shape[0]
        dist = self._check_inputs(objective, states, None)
        weight = torch.ones(B, dtype=states.dtype, device=states.device) if mask is None else mask
        weight = weight / weight.sum().clamp_min(1.0)  # (B,)

        values, dists, surrogate = [], [dist], states.new_zeros(())
        out, grad_loc, grad_log_scale = self.value_and_grad(objective, states, dist, generator)
        values.append(out.value)
        for _ in range(n_iters):
            dist = self.propose(states, dist, grad_loc, grad_log_scale)  # graph to the weights
            out, grad_loc, grad_log_scale = self.value_and_grad(objective, states, dist, generator)
            # d(surrogate)/dλ_k = −weight·∂Ĵ_k/∂λ_k, the gradient of the term −mean_B Ĵ_k
            w = weight.unsqueeze(-1)  # (B, 1)
            surrogate = (
                surrogate - (w * (dist.loc * grad_loc + dist.log_scale * grad_log_scale)).sum()
            )
            values.append(out.value)
            dists.append(dist.detach())

        J = torch.stack(values)  # (N+1, B)
        valid = torch.isfinite(J[1:])
        true_loss = -(torch.where(valid, J[1:], 0.0) * weight).sum() / n_iters
        loss = true_loss + (surrogate - surrogate.detach()) / n_iters + self.bounds.penalty()
        trace = PlanTrace(
            objective=worst_if_nonfinite(J),
            loc=torch.stack([d.loc for d in dists]),  # (N+1, B, A)
            log_scale=torch.stack([d.log_scale for d in dists]),
            n_evals=torch.arange(n_iters + 1, dtype=torch.float32),
            elapsed=torch.zeros(n_iters + 1),
        )
        return loss, PlanResult(dists[-1], trace, out)
