"""The planning objective Ĵ(s, λ) = mean_K Q(s, a_k) − α·KL̂(π_λ ‖ p) (DESIGN.md §3).

Any differentiable ``q_fn(states [B, S], actions [K, B, A]) -> values [K, B]`` becomes an objective.
Planners see only :class:`Objective`; what is behind ``q_fn`` (a critic, a learned model rolled out
over a horizon, an analytic function) is not their business.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from mbplan.distributions import TanhNormal, kl_between, uniform_log_prob

QFunction = Callable[[Tensor, Tensor], Tensor]


@dataclass
class ObjectiveValue:
    """One evaluation of Ĵ on B states with K samples each.

    Attributes:
        value: Ĵ(s, λ) per state, [B].
        sample_values: Q(s, a_k) per sample, [K, B] (CEM ranks by these).
        kl: KL̂(π_λ ‖ p) per state, [B].
        actions: The samples a_k, [K, B, A].
        pre_tanh: Their pre-tanh values u_k, [K, B, A].
    """

    value: Tensor
    sample_values: Tensor
    kl: Tensor
    actions: Tensor
    pre_tanh: Tensor


class Objective:
    """Ĵ(s, λ) = mean_K q(s, a_k) − α·KL̂, with a_k ~ π_λ reparameterized (K = ``n_samples``).

    α is detached. Weights inside ``q_fn`` should be frozen by the caller (``requires_grad=False``);
    gradients flow to λ through the actions.

    Args:
        q_fn: ``q_fn(states [B, S], actions [K, B, A]) -> [K, B]``.
        alpha: KL weight α (a float or a scalar tensor, read at each call).
        n_samples: K, the samples per state of one evaluation.
        state_dim: S, if known; planners then reject states of another width.
        action_dim: A, if known.
    """

    def __init__(
        self,
        q_fn: QFunction,
        alpha: float | Tensor = 0.0,
        n_samples: int = 10,
        state_dim: int | None = None,
        action_dim: int | None = None,
    ) -> None:
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        self.q_fn = q_fn
        # A q_fn that samples (e.g. a model rollout with a future policy) takes the generator.
        self._q_takes_generator = _takes_generator(q_fn)
        self.alpha = alpha
        self.n_samples = n_samples
        self.state_dim = state_dim
        self.action_dim = action_dim

    def __call__(
        self,
        states: Tensor,
        dist: TanhNormal,
        n_samples: int | None = None,
        generator: torch.Generator | None = None,
    ) -> ObjectiveValue:
        """Evaluate Ĵ at λ = ``dist`` for states [B, S] with ``n_samples`` (default K) samples."""
        actions, pre_tanh, log_prob = dist.rsample_log_prob(n_samples or self.n_samples, generator)
        q = self.q(states, actions, generator)  # (K, B)
        kl = (log_prob - uniform_log_prob(actions.shape[-1])).mean(0)  # (B,) MC KL̂ to uniform
        alpha = self.alpha.detach() if isinstance(self.alpha, Tensor) else self.alpha
        return ObjectiveValue(q.mean(0) - alpha * kl, q, kl, actions, pre_tanh)

    def q(
        self, states: Tensor, actions: Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        """``q_fn`` on given actions [K, B, A] at states [B, S] → [K, B], with the generator."""
        if self._q_takes_generator:
            return self.q_fn(states, actions, generator=generator)
        return self.q_fn(states, actions)


def _takes_generator(fn: Callable) -> bool:
    """Whether ``fn`` accepts a ``generator`` argument (plain functions without ``inspect``)."""
    code = getattr(fn, "__code__", None)
    if code is not None:  # a function or lambda: read its code object (~50× cheaper)
        n_named = code.co_argcount + code.co_kwonlyargcount
        return "generator" in code.co_varnames[:n_named]
    try:
        return "generator" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def make_objective(
    q_fn: QFunction,
    alpha: float | Tensor = 0.0,
    n_samples: int = 10,
    state_dim: int | None = None,
    action_dim: int | None = None,
) -> Objective:
    """Turn ``q_fn(states [B,S], actions [K,B,A]) -> [K,B]`` into the objective Ĵ(s, λ).

    Example:
        >>> import torch, mbplan
        >>> target = torch.tensor([0.5, -0.2])
        >>> q = lambda s, a: -((a - target) ** 2).sum(-1)
        >>> objective = mbplan.make_objective(q, alpha=0.01)
        >>> result = mbplan.make_planner("adam").plan(objective, torch.zeros(4, 3), n_iters=200)
        >>> result.dist.mode().shape
        torch.Size([4, 2])
    """
    return Objective(q_fn, alpha, n_samples, state_dim, action_dim)


class AnchoredObjective(Objective):
    """Ĵ(s, λ) − η·KL(π_λ ‖ π_anchor): a trust region around a per-state λ_anchor.

    In planning the anchor is the amortized policy's proposal λ = f(s): the data the model was
    fitted on came from that policy, so plans far from it are where the model is least trustworthy.
    The value uses the closed-form KL of the pre-tanh Gaussians. The per-sample values, which CEM
    ranks (the base objective's are Q(s, a_k) alone, without its α·KL term), get the matching
    single-sample term −η·(log π_λ(a_k) − log π_anchor(a_k)), whose mean over the samples
    estimates −η·KL: samples unlikely under the anchor rank lower.

    Args:
        base: The objective Ĵ.
        anchor: λ_anchor, loc and log_scale [B, A] (detached).
        weight: η ≥ 0.
    """

    def __init__(self, base: Objective, anchor: TanhNormal, weight: float) -> None:
        super().__init__(base.q_fn, base.alpha, base.n_samples, base.state_dim, base.action_dim)
        self.base, self.anchor, self.weight = base, anchor.detach(), weight

    def __call__(
        self,
        states: Tensor,
        dist: TanhNormal,
        n_samples: int | None = None,
        generator: torch.Generator | None = None,
    ) -> ObjectiveValue:
        """Ĵ − η·KL at λ = ``dist`` for states [B, S]."""
        out = self.base(states, dist, n_samples, generator)
        log_ratio = dist.log_prob(out.pre_tanh) - self.anchor.log_prob(out.pre_tanh)  # (K, B)
        value = out.value - self.weight * kl_between(dist, self.anchor)
        sample_values = out.sample_values - self.weight * log_ratio
        return ObjectiveValue(value, sample_values, out.kl, out.actions, out.pre_tanh)


def pessimistic(q_ensemble: Tensor, beta: float) -> Tensor:
    """Q̂ = mean_E(Q) − β·std_E(Q) over the leading ensemble axis (unbiased, +1e-6 in the sqrt).

    Args:
        q_ensemble: [E, ...] values of the E critics.
        beta: Pessimism β (β = 1 with E = 2 is already more pessimistic than the minimum).
    """
    E = q_ensemble.shape[0]
    mean = q_ensemble.mean(0)
    var = (q_ensemble - mean).square().sum(0) / (E - 1)  # unbiased
    return mean - beta * (var + 1e-6).sqrt()
