"""Retrace-style value estimate over a model rollout (on-policy: no importance ratios).

Munos et al., *Safe and Efficient Off-Policy RL*, 2016; used as in Marino et al. 2021 (DESIGN §6).
"""

from __future__ import annotations

import torch
from torch import Tensor


def retrace(rewards: Tensor, q: Tensor, kl: Tensor, gamma: float, lam: float) -> Tensor:
    """Q̂(s_0, a_0) = Q_0 + Σ_{t=0}^{H−1} (γλ)^t δ_t,  δ_t = r_t + γ(Q_{t+1} − KL_{t+1}) − Q_t.

    λ = 0 gives the one-step model estimate r_0 + γ(Q_1 − KL_1); λ = 1 gives the H-step return
    Σ γ^t r_t − Σ γ^{t+1} KL_{t+1} + γ^H Q_H.

    Args:
        rewards: r_0 … r_{H−1}, [H, ...].
        q: Q_0 … Q_H, [H+1, ...].
        kl: α-weighted KL terms of the future actions, KL_1 … KL_H, [H, ...].
        gamma: Discount γ.
        lam: Trace decay λ_R.

    Returns:
        Q̂, [...].
    """
    H = rewards.shape[0]
    if q.shape[0] != H + 1 or kl.shape[0] != H:
        raise ValueError(
            f"need rewards [H], q [H+1], kl [H]; got {rewards.shape[0]}, "
            f"{q.shape[0]}, {kl.shape[0]}"
        )
    delta = rewards + gamma * (q[1:] - kl) - q[:-1]  # (H, ...)
    shape = (H,) + (1,) * (delta.ndim - 1)
    weights = (gamma * lam) ** torch.arange(H, dtype=delta.dtype, device=delta.device)
    return q[0] + (weights.reshape(shape) * delta).sum(0)
