"""Ensembles of dynamics and reward models, E members in one batched network (DESIGN.md §6).

Every member is the single model's trunk (2 × H Linear → LayerNorm → LeakyReLU, zero-initialised
head), with its own weights and LayerNorm affines; a forward pass over all members is one batched
matmul per layer (:class:`~mbplan.models.critic.EnsembleLinear`), as the twin critics are built.
Members differ in their initialisation and, when fitted with :func:`mbplan.fit.fit_models`, in
the bootstrap resample of the data each one trains on (PETS: Chua et al., NeurIPS 2018; MBPO:
Janner et al., NeurIPS 2019).

Inside Ĵ_MB a rollout of K·B rows (row k·B + b = sample k of state b) uses the members in one of
two ways (:data:`PROPAGATIONS`):

* ``fixed`` (TS-∞): sample k follows member k mod E for its whole rollout. The rows are regrouped
  so that each member sees K/E·B rows (⌈K/E⌉·B when E does not divide K, padded with zero rows
  that are dropped after): the same matmuls as one model.
* ``mean``: every row follows the members' mean prediction (E × the matmuls).

Shapes: N rows · E members · S state dims · A action dims · H hidden width.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import Tensor, nn

from mbplan.models.critic import EnsembleLinear
from mbplan.models.dynamics import Dynamics, Reward, _Standardize

#: How a K·B-row rollout uses the members.
PROPAGATIONS = ("fixed", "mean")


class EnsembleLayerNorm(nn.Module):
    """LayerNorm over the last dim with a separate affine per member: [E, N, H] → [E, N, H]."""

    def __init__(self, n_members: int, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n_members, 1, dim))
        self.bias = nn.Parameter(torch.zeros(n_members, 1, dim))

    def forward(self, x: Tensor) -> Tensor:
        """Normalise each row of x [E, N, H], then scale and shift by the member's affine."""
        x = nn.functional.layer_norm(x, x.shape[-1:], eps=self.eps)
        return torch.addcmul(self.bias, x, self.weight)


class EnsembleMLP(nn.Module):
    """E MLPs of 2 hidden layers (Linear → LayerNorm → LeakyReLU) and a zero-initialised head."""

    def __init__(self, n_members: int, in_dim: int, out_dim: int, hidden: int = 256):
        super().__init__()
        self.n_members = n_members
        layers: list[nn.Module] = []
        for width in (in_dim, hidden):
            layers += [
                EnsembleLinear(n_members, width, hidden, init_bound=1 / math.sqrt(width)),
                EnsembleLayerNorm(n_members, hidden),
                nn.LeakyReLU(inplace=True),
            ]
        head = EnsembleLinear(n_members, hidden, out_dim)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        self.net = nn.Sequential(*layers, head)

    def forward(self, x: Tensor) -> Tensor:
        """x [E, N, in] (or [N, in], shared by all members) → [E, N, out]."""
        return self.net(x)


def member_rows(x: Tensor, n_members: int, groups: int) -> Tensor:
    """Regroup K·B rows so member e gets the rows of samples k ≡ e (mod E): [N, D] → [E, N/E, D].

    Requires E to divide K = ``groups``.
    """
    return rearrange(x, "(j e b) d -> e (j b) d", e=n_members, j=groups // n_members)


def unmember_rows(y: Tensor, groups: int) -> Tensor:
    """Inverse of :func:`member_rows`: [E, N/E, D] → [N, D]."""
    E = y.shape[0]
    return rearrange(y, "e (j b) d -> (j e b) d", j=groups // E)


def member_of_row(n_rows: int, groups: int, n_members: int, device=None) -> Tensor:
    """Member k mod E of each row k·B + b of a K·B-row rollout, K = ``groups``: [N]."""
    return (torch.arange(n_rows, device=device) // (n_rows // groups)) % n_members


def select_members(all_members: Tensor, groups: int) -> Tensor:
    """Row k·B + b of member k mod E from predictions of every member [E, N, ...] → [N, ...]."""
    E, N = all_members.shape[:2]
    member = member_of_row(N, groups, E, all_members.device)  # (N,)
    return all_members[member, torch.arange(N, device=all_members.device)]


def propagate(
    members, states: Tensor, actions: Tensor, n_members: int, groups: int, mode: str
) -> Tensor:
    """Outputs [N, D] of K·B rollout rows (row k·B + b), K = ``groups``, by propagation ``mode``.

    Args:
        members: (states, actions) → every member's outputs [E, rows, D] (rows may be [E, n, ·]).
        states: [N, S].
        actions: [N, A].
        n_members: E.
        groups: K.
        mode: ``fixed`` (row k·B + b follows member k mod E) or ``mean`` (the members' mean).
    """
    if mode == "mean":
        return members(states, actions).mean(0)
    if mode != "fixed":
        raise ValueError(f"unknown propagation {mode!r}; choose from {', '.join(PROPAGATIONS)}")
    E, N = n_members, states.shape[0]
    pad = -groups % E  # groups of zero rows appended so that E divides K (dropped after)
    if pad:
        B = N // groups
        states = torch.cat([states, states.new_zeros(pad * B, states.shape[-1])])
        actions = torch.cat([actions, actions.new_zeros(pad * B, actions.shape[-1])])
    # Each member gets ⌈K/E⌉·B rows: the matmuls of one model (K/E·B rows when E divides K)
    grouped = members(member_rows(states, E, groups + pad), member_rows(actions, E, groups + pad))
    return unmember_rows(grouped, groups + pad)[:N]  # (N, D)


class EnsembleDynamics(nn.Module):
    """E deterministic dynamics members ŝ' = s + Δ_e(s, a), one batched network.

    Input and output statistics are shared by the members (fitted on the same data). Called like
    :class:`~mbplan.models.dynamics.Dynamics`, it returns the members' mean.

    Args:
        state_dim: S.
        action_dim: A.
        n_members: E ≥ 1.
        hidden: Hidden width.
    """

    euler = None  # no semi-implicit Euler layout for ensembles

    def __init__(self, state_dim: int, action_dim: int, n_members: int = 5, hidden: int = 256):
        super().__init__()
        if n_members < 1:
            raise ValueError(f"an ensemble needs at least one member, got {n_members}")
        self.state_dim, self.action_dim, self.n_members = state_dim, action_dim, n_members
        self.inputs = _Standardize(state_dim + action_dim)
        self.delta_scale = _Standardize(state_dim)
        self.net = EnsembleMLP(n_members, state_dim + action_dim, state_dim, hidden)

    fit_normalizers = Dynamics.fit_normalizers  # shared statistics: the same fit

    def members(self, states: Tensor, actions: Tensor) -> Tensor:
        """Every member's ŝ' for rows [N, S], [N, A] (or per-member rows [E, N, ·]): [E, N, S]."""
        x = self.inputs(torch.cat([states, actions], -1))
        return states + self.net(x) * self.delta_scale.std  # (E, N, S)

    def forward(self, states: Tensor, actions: Tensor) -> Tensor:
        """The members' mean ŝ' for states [N, S] and actions [N, A]; returns [N, S]."""
        return self.members(states, actions).mean(0)

    def propagate(self, states: Tensor, actions: Tensor, groups: int, mode: str) -> Tensor:
        """ŝ' of K·B rollout rows (row k·B + b), K = ``groups``, by propagation ``mode``: [N, S]."""
        return propagate(self.members, states, actions, self.n_members, groups, mode)

    def disagreement(self, predictions: Tensor) -> Tensor:
        """u = ‖std over members of ŝ'‖₂ in standardised delta units, from [E, N, S]: [N]."""
        if predictions.shape[0] < 2:
            return predictions.new_zeros(predictions.shape[1])
        return (predictions.std(0) / self.delta_scale.std).norm(dim=-1)

    def loss(self, states: Tensor, actions: Tensor, next_states: Tensor) -> Tensor:
        """Sum over members of each member's mean squared error in standardised delta units.

        Rows may be shared [N, ·] or per member [E, N, ·] (bootstrap batches).
        """
        error = (self.members(states, actions) - next_states) / self.delta_scale.std
        return error.square().sum(-1).mean(-1).sum()


class EnsembleReward(nn.Module):
    """E reward members r̂_e(s, a), each with its own learned constant log σ_r (mean used).

    Args:
        state_dim: S.
        action_dim: A.
        n_members: E ≥ 1.
        hidden: Hidden width.
    """

    def __init__(self, state_dim: int, action_dim: int, n_members: int = 5, hidden: int = 256):
        super().__init__()
        if n_members < 1:
            raise ValueError(f"an ensemble needs at least one member, got {n_members}")
        self.n_members = n_members
        self.inputs = _Standardize(state_dim + action_dim)
        self.net = EnsembleMLP(n_members, state_dim + action_dim, 1, hidden)
        self.log_scale = nn.Parameter(torch.zeros(n_members, 1))
        self.register_buffer("offset", torch.zeros(()))
        self.register_buffer("scale", torch.ones(()))

    fit_normalizers = Reward.fit_normalizers  # shared statistics: the same fit

    def members(self, states: Tensor, actions: Tensor) -> Tensor:
        """Every member's mean reward for rows [N, ·] (or [E, N, ·]): [E, N]."""
        x = self.inputs(torch.cat([states, actions], -1))
        return self.net(x).squeeze(-1) * self.scale + self.offset

    def forward(self, states: Tensor, actions: Tensor) -> Tensor:
        """The members' mean reward for [N, S], [N, A]; returns [N]."""
        return self.members(states, actions).mean(0)

    def propagate(self, states: Tensor, actions: Tensor, groups: int, mode: str) -> Tensor:
        """r̂ of K·B rollout rows by propagation ``mode`` (as :meth:`EnsembleDynamics.propagate`)."""

        def members(s: Tensor, a: Tensor) -> Tensor:
            return self.members(s, a).unsqueeze(-1)  # (E, rows, 1)

        return propagate(members, states, actions, self.n_members, groups, mode).squeeze(-1)

    def loss(self, states: Tensor, actions: Tensor, rewards: Tensor) -> Tensor:
        """Sum over members of the Gaussian NLL (standardised rewards, each member's log σ_r)."""
        z = (rewards - self.members(states, actions)) / self.scale  # (E, N)
        nll = 0.5 * z.square() * torch.exp(-2 * self.log_scale) + self.log_scale
        return (nll.mean(-1) + 0.5 * math.log(2 * math.pi)).sum()


def keep_members(module: EnsembleDynamics | EnsembleReward, keep: list[int]) -> None:
    """Keep only members ``keep`` (e.g. the elites), in that order, in place."""
    index = torch.as_tensor(keep, dtype=torch.long)
    with torch.no_grad():
        for p in list(module.parameters()):
            if p.shape[0] == module.n_members:  # every per-member parameter leads with E
                p.data = p.data.index_select(0, index).clone()
    module.n_members = len(keep)
    module.net.n_members = len(keep)
