"""Fitting the dynamics and reward models on real transitions, and their open-loop errors."""

from __future__ import annotations

import torch
from torch import Tensor

from mbplan.models.dynamics import Dynamics, Reward

Transitions = dict[str, Tensor]  # states, actions, rewards, next_states, terminated: [N, ...]


def split_holdout(data: Transitions, fraction: float = 0.05) -> tuple[Transitions, Transitions]:
    """(train, held-out): the newest ``fraction`` of ordered transitions is held out."""
    n = data["states"].shape[0]
    cut = n - max(1, int(n * fraction))
    return {k: v[:cut] for k, v in data.items()}, {k: v[cut:] for k, v in data.items()}


def fit_models(
    dynamics: Dynamics,
    reward: Reward,
    data: Transitions,
    steps: int,
    batch_size: int = 256,
    lr: float = 3e-4,
    generator: torch.Generator | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    fit_normalizers: bool = True,
) -> list[dict[str, float]]:
    """Train both models on uniformly sampled real transitions with Adam.

    Args:
        dynamics: The dynamics model (trained in place).
        reward: The reward model (trained in place).
        data: Real transitions.
        steps: Gradient steps.
        batch_size: Transitions per step.
        lr: Adam learning rate (when no optimizer is given).
        generator: Sampling of batches.
        optimizer: An optimizer over both models' parameters to continue with.
        fit_normalizers: First set the models' input/output statistics from ``data``.

    Returns:
        Per-step losses ``{"dynamics_loss", "reward_loss"}``.
    """
    s, a, r, s2 = data["states"], data["actions"], data["rewards"], data["next_states"]
    if fit_normalizers:
        dynamics.fit_normalizers(s, a, s2)
        reward.fit_normalizers(s, a, r)
    if optimizer is None:
        params = [*dynamics.parameters(), *reward.parameters()]
        optimizer = torch.optim.Adam(params, lr=lr)
    n = s.shape[0]
    log = []
    for _ in range(steps):
        idx = torch.randint(0, n, (batch_size,), generator=generator)
        d_loss = dynamics.loss(s[idx], a[idx], s2[idx])
        r_loss = reward.loss(s[idx], a[idx], r[idx])
        optimizer.zero_grad(set_to_none=True)
        (d_loss + r_loss).backward()
        optimizer.step()
        log.append({"dynamics_loss": d_loss.item(), "reward_loss": r_loss.item()})
    return log


def sequence_starts(data: Transitions, horizon: int) -> Tensor:
    """Start indices of H consecutive transitions of one episode.

    Transitions i … i+H−1 qualify when each continues into the next (next_states[j] equals
    states[j+1]) and none but the last is terminal.
    """
    s, s2, term = data["states"], data["next_states"], data["terminated"]
    n = s.shape[0]
    if n < horizon:
        return torch.zeros(0, dtype=torch.long)
    link = (s2[:-1] == s[1:]).all(-1) & (term[:-1] == 0)  # (N-1,) transition j continues into j+1
    ok = torch.ones(n - horizon + 1, dtype=torch.bool)
    for h in range(horizon - 1):
        ok &= link[h : n - horizon + 1 + h]
    return ok.nonzero().squeeze(-1)


@torch.no_grad()
def open_loop_errors(
    dynamics: Dynamics,
    reward: Reward,
    data: Transitions,
    horizon: int,
    max_starts: int = 1000,
    generator: torch.Generator | None = None,
) -> dict[str, list[float]]:
    """Open-loop H-step prediction errors on real sequences (actions replayed from the data).

    Returns:
        ``state_rmse[h]`` (root mean squared error per state dim, after h+1 steps),
        ``state_nrmse[h]`` (the same in units of each dim's std) and ``reward_rmse[h]``.
    """
    starts = sequence_starts(data, horizon)
    if starts.numel() == 0:
        raise ValueError(f"no {horizon}-step sequences in the data")
    if starts.numel() > max_starts:
        starts = starts[torch.randperm(starts.numel(), generator=generator)[:max_starts]]
    s = data["states"][starts]  # (M, S)
    std = data["states"].std(0).clamp_min(1e-6)
    out: dict[str, list[float]] = {"state_rmse": [], "state_nrmse": [], "reward_rmse": []}
    for h in range(horizon):
        a = data["actions"][starts + h]
        r_hat = reward(s, a)
        s = dynamics(s, a)
        err = s - data["next_states"][starts + h]
        out["state_rmse"].append(err.square().mean().sqrt().item())
        out["state_nrmse"].append((err / std).square().mean().sqrt().item())
        out["reward_rmse"].append(
            (r_hat - data["rewards"][starts + h]).square().mean().sqrt().item()
        )
    return out
