"""Tanh-Normal action distribution and the uniform prior on (-1, 1)^A (DESIGN.md §3).

Shapes: B states · K samples per state · A action dims.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from mbplan import fast

#: Actions are clamped to ±(1 − ACTION_EPS) after the squash.
ACTION_EPS = 1e-6
#: Added inside log(1 − tanh(u)² + ·) so the squash log-det stays finite.
LOGDET_EPS = 1e-6
_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class TanhNormal:
    """Policy π_λ(a|s) = tanh(N(loc, exp(log_scale)²)) per state, λ = (loc, log_scale).

    Attributes:
        loc: Pre-tanh means μ, shape [B, A].
        log_scale: Pre-tanh log standard deviations log σ, shape [B, A].
    """

    loc: Tensor
    log_scale: Tensor

    @classmethod
    def initial(
        cls,
        batch_size: int,
        action_dim: int,
        scale: float = 0.5,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> TanhNormal:
        """λ_0 = (μ = 0, σ = scale) for every state (the iterative planner's start)."""
        loc = torch.zeros(batch_size, action_dim, dtype=dtype, device=device)  # (B, A)
        return cls(loc, torch.full_like(loc, math.log(scale)))

    @property
    def shape(self) -> torch.Size:
        """[B, A]."""
        return self.loc.shape

    def mode(self) -> Tensor:
        """Deterministic action tanh(μ), shape [B, A]."""
        return torch.tanh(self.loc)

    def detach(self) -> TanhNormal:
        """A copy cut from the autograd graph."""
        return TanhNormal(self.loc.detach(), self.log_scale.detach())

    def rsample(
        self, n_samples: int, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Reparameterized samples a = tanh(μ + σ·ε), ε ~ N(0, I).

        Args:
            n_samples: K.
            generator: Source of ε; the same seed gives the same samples.

        Returns:
            (actions [K, B, A] clamped to ±(1 − eps), pre-tanh values u [K, B, A]).
        """
        B, A = self.loc.shape
        eps = torch.randn(
            n_samples, B, A, generator=generator, dtype=self.loc.dtype, device=self.loc.device
        )  # (K, B, A)
        pre_tanh = self.loc + self.log_scale.exp() * eps
        return squash(pre_tanh), pre_tanh

    def rsample_log_prob(
        self, n_samples: int, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Reparameterized samples with their exact log-probabilities, in fewer ops.

        Same values as :meth:`rsample` then :meth:`log_prob` (same generator draws): since
        u = μ + σ·ε, the standardised value (u − μ)/σ is ε itself and tanh(u) is computed once.

        Returns:
            (actions [K, B, A], pre-tanh values [K, B, A], log π(a|s) [K, B]).
        """
        B, A = self.loc.shape
        eps = torch.randn(
            n_samples, B, A, generator=generator, dtype=self.loc.dtype, device=self.loc.device
        )  # (K, B, A)
        if fast.enabled():
            return _SampleLogProb.apply(self.loc, self.log_scale, eps)
        pre_tanh = self.loc + self.log_scale.exp() * eps  # the plain twin, op by op
        return squash(pre_tanh), pre_tanh, self.log_prob(pre_tanh)

    def log_prob(self, pre_tanh: Tensor) -> Tensor:
        """log π(a|s) of a = tanh(u) from the pre-tanh value u [K, B, A]; returns [K, B]."""
        z = (pre_tanh - self.loc) / self.log_scale.exp()
        normal = -0.5 * z.square() - self.log_scale - _LOG_SQRT_2PI  # (K, B, A)
        log_det = torch.log(1 - torch.tanh(pre_tanh).square() + LOGDET_EPS)
        return (normal - log_det).sum(-1)


class _SampleLogProb(torch.autograd.Function):
    """(loc [B, A], log σ [B, A], ε [K, B, A]) → (a, u [K, B, A], log π(a|s) [K, B]) in one node.

    u = μ + σ·ε, a = clamp(tanh u), log π = Σ_A (−ε²/2 − log √(2π) − log(1 − tanh²u + δ) − log σ).
    Autograd would record ~15 nodes for these few [K, B, A] ops; on a CPU each costs more than its
    arithmetic. The backward (:func:`sample_log_prob_vjp`) is the same chain rule written out:
    ∂/∂u = g_a·(1 − t²)·[|t| ≤ 1 − eps] + g_u + g_logπ·2t(1 − t²)/(1 − t² + δ), t = tanh u;
    ∂/∂μ = Σ_K ∂/∂u; ∂/∂log σ = σ·Σ_K ε·∂/∂u − Σ_K g_logπ. It recomputes t from the saved output u
    with differentiable ops, so second derivatives stay exact.
    """

    @staticmethod
    def forward(ctx, loc: Tensor, log_scale: Tensor, eps: Tensor):
        pre_tanh = loc + log_scale.exp() * eps  # (K, B, A)
        tanh = torch.tanh(pre_tanh)
        log_det = torch.log(1 - tanh.square() + LOGDET_EPS)  # (K, B, A)
        log_prob = (-0.5 * eps.square() - _LOG_SQRT_2PI - log_det).sum(-1) - log_scale.sum(-1)
        actions = tanh.clamp(-1 + ACTION_EPS, 1 - ACTION_EPS)
        ctx.save_for_backward(log_scale, eps, pre_tanh)
        ctx.set_materialize_grads(False)
        return actions, pre_tanh, log_prob

    @staticmethod
    def backward(ctx, g_actions: Tensor | None, g_pre: Tensor | None, g_log_prob: Tensor | None):
        log_scale, eps, pre_tanh = ctx.saved_tensors
        g_loc, g_log_scale, g_eps = sample_log_prob_vjp(
            log_scale, eps, pre_tanh, g_actions, g_pre, g_log_prob, need_eps=ctx.needs_input_grad[2]
        )
        return (
            g_loc if ctx.needs_input_grad[0] else None,
            g_log_scale if ctx.needs_input_grad[1] else None,
            g_eps,
        )


def sample_log_prob_vjp(
    log_scale: Tensor,
    eps: Tensor,
    pre_tanh: Tensor,
    g_actions: Tensor | None,
    g_pre: Tensor | None,
    g_log_prob: Tensor | None,
    need_eps: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Gradients of :meth:`TanhNormal.rsample_log_prob`'s outputs to (loc, log σ[, ε]).

    Args:
        log_scale: log σ [B, A].
        eps: ε [K, B, A].
        pre_tanh: u = μ + σ·ε [K, B, A].
        g_actions: ∂L/∂a [K, B, A], or None.
        g_pre: ∂L/∂u [K, B, A], or None.
        g_log_prob: ∂L/∂log π [K, B], or None.
        need_eps: Also return ∂L/∂ε.

    Returns:
        (∂L/∂loc [B, A], ∂L/∂log σ [B, A], ∂L/∂ε [K, B, A] or None).
    """
    tanh = torch.tanh(pre_tanh)
    one_minus = 1 - tanh.square()  # (K, B, A)
    g = torch.zeros_like(pre_tanh) if g_pre is None else g_pre  # ∂/∂u, (K, B, A)
    if g_actions is not None:  # tanh, then clamp: passes the gradient inside its range only
        # (``where``, not a 0/1 product, so a non-finite gradient at a clamped action is cut)
        g = g + torch.where(tanh.abs() <= 1 - ACTION_EPS, g_actions, 0.0) * one_minus
    if g_log_prob is not None:  # −log(1 − tanh²u + δ)
        g = g + g_log_prob.unsqueeze(-1) * (2 * tanh * one_minus / (one_minus + LOGDET_EPS))
    scale = log_scale.exp()
    g_log_scale = (g * eps).sum(0) * scale
    if g_log_prob is not None:
        g_log_scale = g_log_scale - g_log_prob.sum(0).unsqueeze(-1)
    return g.sum(0), g_log_scale, g * scale if need_eps else None


def kl_between(p: TanhNormal, q: TanhNormal) -> Tensor:
    """KL(p ‖ q) of two tanh-Normals, [B].

    The closed-form KL of their pre-tanh Gaussians: the squash is invertible, so it leaves the KL
    unchanged.
    """
    log_ratio = q.log_scale - p.log_scale
    var_ratio = torch.exp(2 * (p.log_scale - q.log_scale))
    mean_term = ((p.loc - q.loc) / q.log_scale.exp()).square()
    return (log_ratio + 0.5 * (var_ratio + mean_term) - 0.5).sum(-1)


def squash(pre_tanh: Tensor) -> Tensor:
    """tanh, clamped to ±(1 − ACTION_EPS) so downstream inverses stay finite."""
    return torch.tanh(pre_tanh).clamp(-1 + ACTION_EPS, 1 - ACTION_EPS)


def uniform_log_prob(action_dim: int) -> float:
    """log p(a) of the uniform prior on (-1, 1)^A: −A·log 2."""
    return -action_dim * math.log(2.0)


def kl_to_uniform(dist: TanhNormal, pre_tanh: Tensor) -> Tensor:
    """Monte-Carlo KL̂(π ‖ p) = mean_K [log π(a_k) − log p(a_k)] over the given samples; [B]."""
    A = pre_tanh.shape[-1]
    return (dist.log_prob(pre_tanh) - uniform_log_prob(A)).mean(0)


def target_kl(action_dim: int) -> float:
    """KL target A·(1 + log 2) of the α update (SAC's entropy target −A under a uniform prior)."""
    return action_dim * (1.0 + math.log(2.0))
