"""Learned dynamics and reward models (DESIGN.md §6).

Both: input [s, a], 2 × 256 Linear → LayerNorm → LeakyReLU, trained on real transitions. Inputs are
standardised with statistics fitted on the replay buffer (kept as buffers, saved with the weights).

Shapes: N state–action pairs · S state dims · A action dims.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mbplan.models.mlp import mlp


@dataclass(frozen=True)
class EulerSpec:
    """Semi-implicit Euler layout of an observation: positions integrate the new velocities.

    ``pos'[i] = pos[i] + dt · vel'[vel_of_pos[i]]``; angles in ``angle_dims`` (indices into the
    observation) are wrapped to (−π, π] with atan2.

    Attributes:
        pos_dims: Observation indices of the position part.
        vel_dims: Observation indices of the velocity part.
        vel_of_pos: For each position dim, the index into ``vel_dims`` of its velocity.
        dt: Env time step (seconds).
        angle_dims: Observation indices that are angles.
    """

    pos_dims: tuple[int, ...]
    vel_dims: tuple[int, ...]
    vel_of_pos: tuple[int, ...]
    dt: float
    angle_dims: tuple[int, ...] = ()


class _Standardize(nn.Module):
    """x ↦ (x − mean)/std with statistics set by :meth:`fit` (identity until then)."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def fit(self, x: Tensor) -> None:
        """Set mean and std from samples [N, dim] (std floored at 1e-3)."""
        self.mean.copy_(x.mean(0))
        self.std.copy_(x.std(0).clamp_min(1e-3))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class Dynamics(nn.Module):
    """Deterministic ŝ' = s + Δ(s, a), Δ predicted in standardised units by a zero-initialised head.

    With an :class:`EulerSpec`, only the velocity part is predicted as a delta; positions integrate
    the predicted new velocities (semi-implicit Euler) and angles are wrapped.

    Args:
        state_dim: S.
        action_dim: A.
        hidden: Hidden width.
        euler: Optional semi-implicit Euler layout.
    """

    def __init__(
        self, state_dim: int, action_dim: int, hidden: int = 256, euler: EulerSpec | None = None
    ):
        super().__init__()
        self.state_dim, self.action_dim, self.euler = state_dim, action_dim, euler
        self.inputs = _Standardize(state_dim + action_dim)
        self.delta_scale = _Standardize(state_dim)
        self.net = mlp(
            state_dim + action_dim,
            state_dim,
            hidden,
            activation=nn.LeakyReLU,
            layer_norm=True,
            zero_last=True,
        )

    def fit_normalizers(self, states: Tensor, actions: Tensor, next_states: Tensor) -> None:
        """Set input and output statistics from real transitions [N, ·]."""
        self.inputs.fit(torch.cat([states, actions], -1))
        self.delta_scale.fit(next_states - states)
        self.delta_scale.mean.zero_()  # the head predicts a zero delta at initialisation

    def forward(self, states: Tensor, actions: Tensor) -> Tensor:
        """ŝ' for states [..., S] and actions [..., A]; returns [..., S]."""
        x = self.inputs(torch.cat([states, actions], -1))
        delta = self.net(x) * self.delta_scale.std  # (..., S)
        next_states = states + delta
        if self.euler is None:
            return next_states
        e = self.euler
        vel = next_states[..., list(e.vel_dims)]  # new velocities
        pos = states[..., list(e.pos_dims)] + e.dt * vel[..., list(e.vel_of_pos)]
        next_states = next_states.clone()
        next_states[..., list(e.pos_dims)] = pos
        if e.angle_dims:
            ang = next_states[..., list(e.angle_dims)]
            next_states[..., list(e.angle_dims)] = torch.atan2(torch.sin(ang), torch.cos(ang))
        return next_states

    def loss(self, states: Tensor, actions: Tensor, next_states: Tensor) -> Tensor:
        """Mean squared error of ŝ' in standardised delta units."""
        error = (self(states, actions) - next_states) / self.delta_scale.std
        return error.square().sum(-1).mean()


class Reward(nn.Module):
    """r̂(s, a) with a Gaussian likelihood of learned constant scale σ_r (the mean is used).

    Args:
        state_dim: S.
        action_dim: A.
        hidden: Hidden width.
    """

    def __init__(self, state_dim: int, action_dim: int, hidden: int = 256):
        super().__init__()
        self.inputs = _Standardize(state_dim + action_dim)
        self.net = mlp(
            state_dim + action_dim,
            1,
            hidden,
            activation=nn.LeakyReLU,
            layer_norm=True,
            zero_last=True,
        )
        self.log_scale = nn.Parameter(torch.zeros(()))
        self.register_buffer("offset", torch.zeros(()))
        self.register_buffer("scale", torch.ones(()))

    def fit_normalizers(self, states: Tensor, actions: Tensor, rewards: Tensor) -> None:
        """Set input and reward statistics from real transitions."""
        self.inputs.fit(torch.cat([states, actions], -1))
        self.offset.copy_(rewards.mean())
        self.scale.copy_(rewards.std().clamp_min(1e-3))

    def forward(self, states: Tensor, actions: Tensor) -> Tensor:
        """Mean reward for [..., S], [..., A]; returns [...]."""
        x = self.inputs(torch.cat([states, actions], -1))
        return self.net(x).squeeze(-1) * self.scale + self.offset

    def loss(self, states: Tensor, actions: Tensor, rewards: Tensor) -> Tensor:
        """Gaussian negative log-likelihood (standardised rewards, learned constant log σ_r)."""
        z = (rewards - self(states, actions)) / self.scale
        nll = 0.5 * z.square() * torch.exp(-2 * self.log_scale) + self.log_scale
        return nll.mean() + 0.5 * math.log(2 * math.pi)
