"""The iterative planner's whole plan on Ĵ_MB as one tensor function, optionally compiled.

:meth:`Planner.plan` runs the iterative optimizer as N rounds of: sample a_0 ~ π_λ, evaluate Ĵ_MB
(the fused model rollout), backpropagate through autograd to λ, propose the next λ. For one state
on a CPU each of the ~3,700 ops of a plan costs its fixed overhead, so the loop costs several times
its arithmetic. Here the same computation is one function of tensors:

* the noise of every round is drawn up front, in the order the loop draws it (so the same
  generator gives the same plan, to rounding);
* ∂Ĵ/∂λ is written out: the fused rollout gives ∂Q̂_MB/∂a_0, and the chain rule through
  a_0 = clamp(tanh(μ + σ·ε)) and the Monte-Carlo KL term is a handful of elementwise ops (plus the
  closed-form trust-region KL of :class:`~mbplan.objective.AnchoredObjective`);
* with ``compile=True`` one round (evaluation, gradient, proposal) goes through ``torch.compile``
  (inductor): one C++ kernel per chain of elementwise ops and no Python between them. The first
  plan compiles it (about a minute on a 2-core CPU; inductor caches the result on disk, so later
  processes take less).

Used by :class:`~mbplan.mpc.MPC` (``mbplan plan``: uncompiled by default, compiled with
``--compile``) and ``benchmarks/plan_latency.py``. It applies to the iterative
planner on a :class:`~mbplan.model_value.ModelValue` objective that takes the fused rollout;
:meth:`FastIterativePlan.applies` says whether it does.

Shapes: B states · K samples · A action dims · I iterations · H horizon · N = K·B rollout rows.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from mbplan.distributions import (
    _LOG_SQRT_2PI,
    ACTION_EPS,
    LOGDET_EPS,
    TanhNormal,
    kl_between,
    uniform_log_prob,
)
from mbplan.fast.fused_value import FusedRollout
from mbplan.model_value import ModelValue
from mbplan.objective import AnchoredObjective, Objective
from mbplan.planners.base import PlanResult, PlanTrace, _keep_finite, worst_if_nonfinite
from mbplan.planners.iterative import IterativePlanner


class FastIterativePlan:
    """Runs an :class:`~mbplan.planners.iterative.IterativePlanner` on Ĵ_MB as one function.

    Same result as ``planner.plan(objective, states, init, n_iters, generator,
    record_objective=False)`` to rounding, in fewer ops (see the module docstring).

    Args:
        planner: The iterative optimizer (frozen).
        compile: Compile the plan with ``torch.compile`` on first use.
    """

    def __init__(self, planner: IterativePlanner, compile: bool = False):
        self.planner = planner
        self.compile = compile
        self._fns: dict[tuple, object] = {}  # (rollout, α, rollout α, η) → the (compiled) round

    @staticmethod
    def applies(objective: Objective, states: Tensor) -> FusedRollout | None:
        """The fused rollout the plan would run on, or None where the fast path does not apply."""
        base = objective.base if isinstance(objective, AnchoredObjective) else objective
        if type(base) is not Objective or type(base.q_fn) is not ModelValue:
            return None
        if type(objective) not in (Objective, AnchoredObjective) or states.requires_grad:
            return None
        return base.q_fn._fused(states)

    def plan(
        self,
        objective: Objective,
        states: Tensor,
        init: TanhNormal | None = None,
        n_iters: int | None = None,
        generator: torch.Generator | None = None,
    ) -> PlanResult:
        """Plan λ for states [B, S] (``planner.plan`` where the fast path does not apply).

        The trace holds λ_0 … λ_I and Ĵ at λ_0 … λ_{I−1} (Ĵ(λ_I) is NaN: not evaluated, as with
        ``record_objective=False``); ``elapsed`` has the total time at λ_I and NaN before it (the
        iterates are not timed one by one).
        """
        planner = self.planner
        fused = self.applies(objective, states)
        if fused is None:
            return planner.plan(objective, states, init, n_iters, generator, record_objective=False)
        n_iters = planner.default_iters if n_iters is None else n_iters
        if n_iters < 1:
            raise ValueError(f"n_iters must be >= 1, got {n_iters}")
        dist = planner._check_inputs(objective, states, init)
        start = time.perf_counter()
        base = objective.base if isinstance(objective, AnchoredObjective) else objective
        B, A = dist.loc.shape
        K = base.n_samples
        like = {"dtype": dist.loc.dtype, "device": dist.loc.device}
        # Noise in the order the loop draws it: per round, a_0's ε, then ε_1 … ε_H of the rollout
        eps0, eps_future = [], []
        for _ in range(n_iters):
            eps0.append(torch.randn(K, B, A, generator=generator, **like))
            eps_future.append(torch.stack(fused.noise(torch.empty(K * B, A, **like), generator)))
        alpha, rollout_alpha = float(base.alpha), float(base.q_fn.alpha)
        if isinstance(objective, AnchoredObjective):
            anchor, eta = objective.anchor, float(objective.weight)
        else:
            anchor, eta = dist, 0.0
        round_ = self._function(fused, alpha, rollout_alpha, eta)
        # Fresh row-major inputs: a compiled round is specialised to its inputs' strides, and
        # λ = f(s) arrives as views of the policy's [B, 2A] output, strides (2A, 1), which
        # ``contiguous()`` keeps at B = 1 (a recompile at an episode's first step)
        anchor_loc, anchor_log_scale = _row_major(anchor.loc), _row_major(anchor.log_scale)
        values, locs, log_scales = [], [_row_major(dist.loc)], [_row_major(dist.log_scale)]
        with torch.no_grad():
            for k in range(n_iters):
                value, loc, log_scale = round_(
                    states,
                    locs[-1],
                    log_scales[-1],
                    eps0[k],
                    eps_future[k],
                    anchor_loc,
                    anchor_log_scale,
                )
                values.append(value)
                locs.append(loc)
                log_scales.append(log_scale)
        values, locs, log_scales = torch.stack(values), torch.stack(locs), torch.stack(log_scales)
        elapsed = torch.full((n_iters + 1,), torch.nan)
        elapsed[0], elapsed[-1] = 0.0, time.perf_counter() - start
        nan = torch.full((1, B), torch.nan, **like)
        trace = PlanTrace(
            objective=torch.cat([worst_if_nonfinite(values), nan]),  # (I+1, B)
            loc=locs,  # (I+1, B, A)
            log_scale=log_scales,
            n_evals=torch.arange(n_iters + 1, dtype=torch.float32),
            elapsed=elapsed,
        )
        return PlanResult(TanhNormal(locs[-1], log_scales[-1]), trace, None)

    def _function(self, fused: FusedRollout, alpha: float, rollout_alpha: float, eta: float):
        """One round as a function of tensors, compiled on first use when asked."""
        key = (id(fused), alpha, rollout_alpha, eta)
        if key not in self._fns:
            self._fns.clear()  # one at a time: a new rollout (new weights) replaces the old

            alphas = (alpha, rollout_alpha)

            def round_(states, loc, log_scale, eps0, eps_future, anchor_loc, anchor_log_scale):
                return _round(
                    self.planner,
                    fused,
                    alphas,
                    eta,
                    states,
                    loc,
                    log_scale,
                    eps0,
                    eps_future,
                    anchor_loc,
                    anchor_log_scale,
                )

            self._fns[key] = torch.compile(round_, dynamic=False) if self.compile else round_
        return self._fns[key]


def _row_major(x: Tensor) -> Tensor:
    """x with the strides of a fresh tensor of its shape (a copy only where they differ)."""
    if x.stride() == torch.empty(x.shape, device="meta").stride():
        return x
    return x.clone(memory_format=torch.contiguous_format)


def value_and_grad(
    fused: FusedRollout,
    states: Tensor,
    loc: Tensor,
    log_scale: Tensor,
    eps0: Tensor,
    eps_future: Tensor,
    alpha: float,
    rollout_alpha: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Ĵ_MB(s, λ) = mean_K Q̂_MB(s, a_k) − α·KL̂ and its gradient to λ, without autograd.

    Args:
        fused: The rollout of Q̂_MB.
        states: [B, S].
        loc: μ of λ, [B, A].
        log_scale: log σ of λ, [B, A].
        eps0: The noise of a_k = clamp(tanh(μ + σ·ε_k)), [K, B, A].
        eps_future: The rollout's noise ε_1 … ε_H, [H, K·B, A].
        alpha: α of the objective's KL term.
        rollout_alpha: α of the rollout's future KL terms (default the ``ModelValue``'s).

    Returns:
        (Ĵ [B], ∂Ĵ/∂μ [B, A], ∂Ĵ/∂log σ [B, A]).
    """
    K, B, A = eps0.shape
    S = states.shape[-1]
    scale_eps = log_scale.exp() * eps0  # (K, B, A)
    tanh = torch.tanh(loc + scale_eps)
    one_minus = 1 - tanh.square()
    log_det_arg = one_minus + LOGDET_EPS
    actions = tanh.clamp(-1 + ACTION_EPS, 1 - ACTION_EPS)
    s = states.expand(K, B, S).reshape(K * B, S)
    q, tape = fused.forward(
        s, actions.reshape(K * B, A), list(eps_future.unbind(0)), True, rollout_alpha, K
    )
    dq = fused.backward(tape, actions.reshape(K * B, A), S).view(K, B, A)  # ∂Q̂/∂a_k
    # log π(a_k) − log p(a_k), summed over A, without the constants' gradient
    log_prob = (-0.5 * eps0.square() - _LOG_SQRT_2PI - torch.log(log_det_arg)).sum(-1)
    kl = (log_prob - log_scale.sum(-1) - uniform_log_prob(A)).mean(0)  # (B,)
    value = q.view(K, B).mean(0) - alpha * kl
    # ∂/∂u_k of mean_K Q − α·mean_K log π, u = μ + σ·ε; the clamp passes |tanh| ≤ 1 − eps
    # (where, not a product with the mask: a non-finite ∂Q̂/∂a of a clamped sample contributes 0)
    dq_u = torch.where(tanh.abs() <= 1 - ACTION_EPS, dq * one_minus, 0.0)
    g_u = (dq_u - (2 * alpha) * tanh * one_minus / log_det_arg) / K
    grad_loc = g_u.sum(0)
    grad_log_scale = (g_u * scale_eps).sum(0) + alpha  # −α·∂(−log σ)/∂log σ, per dim
    return value, grad_loc, grad_log_scale


def _round(
    planner: IterativePlanner,
    fused: FusedRollout,
    alphas: tuple[float, float],
    eta: float,
    states: Tensor,
    loc: Tensor,
    log_scale: Tensor,
    eps0: Tensor,
    eps_future: Tensor,
    anchor_loc: Tensor,
    anchor_log_scale: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """One round: Ĵ (− η·KL to the anchor) and its gradient at λ_k, then λ_{k+1}.

    ``alphas``: (α of the objective, α of the rollout's future steps).

    Returns:
        (Ĵ(λ_k) [B], μ_{k+1} [B, A], log σ_{k+1} [B, A]).
    """
    value, grad_loc, grad_log_scale = value_and_grad(
        fused, states, loc, log_scale, eps0, eps_future, *alphas
    )
    dist = TanhNormal(loc, log_scale)
    if eta:  # − η·KL(π_λ ‖ π_anchor), the closed form of the pre-tanh Gaussians, and its gradient
        value = value - eta * kl_between(dist, TanhNormal(anchor_loc, anchor_log_scale))
        grad_loc = grad_loc - eta * (loc - anchor_loc) / torch.exp(2 * anchor_log_scale)
        grad_log_scale = grad_log_scale - eta * (torch.exp(2 * (log_scale - anchor_log_scale)) - 1)
    new = planner.propose(
        states, dist, grad_loc.nan_to_num(0, 0, 0), grad_log_scale.nan_to_num(0, 0, 0)
    )
    new = _keep_finite(new, dist)
    return value, new.loc, new.log_scale
