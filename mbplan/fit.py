"""Fit jobs on a trained run's data: models, iterative optimizers, and distilled policies.

* :func:`fit_models` trains dynamics and reward on real transitions (``mbplan fit-model``) and
  :func:`open_loop_errors` measures their H-step error on held-out sequences (``eval-model``);
* :func:`fit_optimizer` trains a fresh iterative optimizer on a frozen objective
  (``mbplan fit-optimizer``);
* :func:`distill_direct` distils a direct network from an iterative agent, the future policy of
  its model rollouts (DESIGN.md §6);
* :func:`finetune_direct` trains a copy of a direct policy on a frozen objective (``bench gap``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor

from mbplan.agent import Agent
from mbplan.distributions import kl_between
from mbplan.models.dynamics import Dynamics, Reward
from mbplan.models.ensemble import EnsembleDynamics, EnsembleReward, keep_members
from mbplan.objective import Objective
from mbplan.planners import DirectPlanner, IterativePlanner, train_amortized

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
    E = getattr(dynamics, "n_members", 0)
    if E:  # each member trains on its own bootstrap resample of the data (drawn once)
        boot = torch.randint(0, n, (E, n), generator=generator)  # (E, n)
    log = []
    for _ in range(steps):
        if E:
            pick = torch.randint(0, n, (E, batch_size), generator=generator)
            idx = boot.gather(1, pick)  # (E, batch): per-member rows
        else:
            idx = torch.randint(0, n, (batch_size,), generator=generator)
        d_loss = dynamics.loss(s[idx], a[idx], s2[idx])
        r_loss = reward.loss(s[idx], a[idx], r[idx])
        if not (torch.isfinite(d_loss) and torch.isfinite(r_loss)):
            raise ValueError(
                f"model fit diverged at step {len(log)}: dynamics_loss = {d_loss.item()}, "
                f"reward_loss = {r_loss.item()}"
            )
        optimizer.zero_grad(set_to_none=True)
        (d_loss + r_loss).backward()
        optimizer.step()
        log.append({"dynamics_loss": d_loss.item(), "reward_loss": r_loss.item()})
    check_finite_weights("model fit", dynamics, reward)
    return log


def check_finite_weights(what: str, *modules: torch.nn.Module) -> None:
    """Raise ValueError (nothing gets saved) if any weight of ``modules`` is NaN or infinite."""
    for module in modules:
        for name, p in module.named_parameters():
            if not bool(torch.isfinite(p).all()):
                raise ValueError(f"{what} diverged: {name} holds non-finite weights")


@torch.no_grad()
def member_errors(dynamics: EnsembleDynamics, reward: EnsembleReward, data: Transitions) -> Tensor:
    """One-step held-out error of each member [E], the score elites are chosen by.

    The state MSE in standardised delta units plus the standardised reward MSE.
    """
    s, a = data["states"], data["actions"]
    ds = (dynamics.members(s, a) - data["next_states"]) / dynamics.delta_scale.std  # (E, N, S)
    dr = (reward.members(s, a) - data["rewards"]) / reward.scale  # (E, N)
    return ds.square().sum(-1).mean(-1) + dr.square().mean(-1)


def keep_elites(
    dynamics: EnsembleDynamics, reward: EnsembleReward, held: Transitions, n_elites: int
) -> list[int]:
    """Keep the ``n_elites`` members with the lowest held-out error (in place); their indices."""
    order = member_errors(dynamics, reward, held).argsort()[:n_elites].sort().values.tolist()
    keep_members(dynamics, order)
    keep_members(reward, order)
    return order


def _ranks(x: Tensor) -> Tensor:
    return x.argsort().argsort().to(torch.float64)


def rank_correlation(x: Tensor, y: Tensor) -> float:
    """Spearman's rank correlation of two [N] samples (no tie correction)."""
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = (rx.square().sum() * ry.square().sum()).sqrt()
    return float((rx * ry).sum() / denom) if denom > 0 else float("nan")


@torch.no_grad()
def ensemble_errors(
    dynamics: EnsembleDynamics,
    reward: EnsembleReward,
    data: Transitions,
    horizon: int,
    max_starts: int = 1000,
    generator: torch.Generator | None = None,
) -> dict[str, list]:
    """Open-loop errors of each member and of their mean; how well disagreement predicts error.

    Each member rolls out on its own; the mean rollout follows the members' mean. At every step
    h, u_h = the members' disagreement (:meth:`EnsembleDynamics.disagreement`) at the mean
    rollout's state, and the rank correlation (Spearman) of u_h with the mean's actual state
    error over the held-out sequences says whether disagreement ranks errors well.

    Returns:
        ``member_state_nrmse[e][h]``, ``mean_state_nrmse[h]``, ``mean_reward_rmse[h]`` and
        ``disagreement_rank_corr[h]`` for h = 1 … H.
    """
    starts = sample_starts(data, horizon, max_starts, generator)
    E = dynamics.n_members
    std = data["states"].std(0).clamp_min(1e-6)
    s_members = data["states"][starts].expand(E, -1, -1)  # (E, M, S)
    s_mean = data["states"][starts]  # (M, S)
    out: dict[str, list] = {
        "member_state_nrmse": [[] for _ in range(E)],
        "mean_state_nrmse": [],
        "mean_reward_rmse": [],
        "disagreement_rank_corr": [],
    }
    for h in range(horizon):
        a = data["actions"][starts + h]  # (M, A)
        truth = data["next_states"][starts + h]
        s_members = dynamics.members(s_members, a.expand(E, -1, -1))  # each member its own path
        preds = dynamics.members(s_mean, a)  # (E, M, S) from the mean path's state
        r_hat = reward(s_mean, a)
        u = dynamics.disagreement(preds)  # (M,)
        s_mean = preds.mean(0)
        err = ((s_mean - truth) / std).square().mean(-1).sqrt()  # (M,)
        for e in range(E):
            nrmse = ((s_members[e] - truth) / std).square().mean().sqrt()
            out["member_state_nrmse"][e].append(float(nrmse))
        out["mean_state_nrmse"].append(float(err.square().mean().sqrt()))
        r_err = (r_hat - data["rewards"][starts + h]).square().mean().sqrt()
        out["mean_reward_rmse"].append(float(r_err))
        out["disagreement_rank_corr"].append(rank_correlation(u, err))
    return out


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


def sample_starts(
    data: Transitions, horizon: int, max_starts: int, generator: torch.Generator | None
) -> Tensor:
    """Up to ``max_starts`` random starts of H-step sequences (:func:`sequence_starts`) [M].

    Raises:
        ValueError: The data holds no such sequence.
    """
    starts = sequence_starts(data, horizon)
    if starts.numel() == 0:
        raise ValueError(f"no {horizon}-step sequences in the data")
    if starts.numel() > max_starts:
        starts = starts[torch.randperm(starts.numel(), generator=generator)[:max_starts]]
    return starts


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
    starts = sample_starts(data, horizon, max_starts, generator)
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


def fit_optimizer(
    objective: Objective,
    states: torch.Tensor,
    steps: int,
    batch_size: int = 256,
    lr: float = 3e-4,
    n_iters: int = 5,
    seed: int = 0,
    on_step=None,
) -> tuple[IterativePlanner, list[float]]:
    """Train a fresh iterative optimizer on a frozen objective, on replay states.

    Returns:
        (the optimizer, per-step mean improvement Ĵ(λ_N) − Ĵ(λ_0)).
    """
    torch.manual_seed(seed)
    S, A = states.shape[-1], objective.action_dim
    if A is None:
        raise ValueError("the objective must know its action_dim")
    planner = IterativePlanner(S, A, n_iters=n_iters)
    generator = torch.Generator().manual_seed(seed)
    batches = random_batches(states, batch_size, generator)
    log = train_amortized(planner, objective, batches, steps, lr, generator, on_step=on_step)
    check_finite_weights("optimizer fit", planner)
    return planner.eval().requires_grad_(False), log.improvements


def random_batches(
    states: Tensor, batch_size: int, generator: torch.Generator
) -> Callable[[], Tensor]:
    """A sampler of ``batch_size`` states [B, S] drawn uniformly (with replacement) from [N, S]."""

    def sample() -> Tensor:
        return states[torch.randint(0, states.shape[0], (batch_size,), generator=generator)]

    return sample


def finetune_direct(
    policy: DirectPlanner,
    objective: Objective,
    states: Tensor,
    steps: int,
    batch_size: int = 256,
    lr: float = 3e-4,
    seed: int = 0,
    on_step=None,
) -> tuple[DirectPlanner, list[float]]:
    """Fine-tune a copy of a direct policy on a frozen objective (SAC's policy loss, −Ĵ(s, f(s))).

    The direct policy of a run was trained against a critic that kept moving; this trains a copy
    for ``steps`` more Adam steps on ``objective`` itself, as :func:`fit_optimizer` trains an
    iterative optimizer, so that both amortized planners have seen the objective they are
    measured on. ``policy`` is left as it was.

    Args:
        policy: The direct policy (not modified).
        objective: Ĵ with frozen weights inside.
        states: Training states [N, S], sampled uniformly in batches.
        steps: Adam steps.
        batch_size: States per step.
        lr: Adam step size.
        seed: Seed of the batches and of the objective's samples.
        on_step: Called after each step with (step, loss, mean improvement).

    Returns:
        (the fine-tuned copy, its loss per step).
    """
    student = copy.deepcopy(policy).train().requires_grad_(True)
    generator = torch.Generator().manual_seed(seed)
    batches = random_batches(states, batch_size, generator)
    log = train_amortized(student, objective, batches, steps, lr, generator, on_step=on_step)
    check_finite_weights("fine-tuning", student)
    return student.eval().requires_grad_(False), log.losses


def distill_direct(
    agent: Agent,
    states: torch.Tensor,
    steps: int,
    batch_size: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
) -> tuple[DirectPlanner, float]:
    """Distil a direct network from an iterative agent: minimise KL(π_iter (detached) ‖ π_direct).

    The teacher is the agent's final-iterate policy on its model-free objective, at replay states.

    Returns:
        (the network, the mean KL over the last 50 steps).
    """
    torch.manual_seed(seed)
    student = DirectPlanner(states.shape[-1], agent.action_dim, agent.config.hidden)
    generator = torch.Generator().manual_seed(seed)
    optim = torch.optim.Adam(student.parameters(), lr=lr)
    kls = []
    for _ in range(steps):
        idx = torch.randint(0, states.shape[0], (batch_size,), generator=generator)
        teacher = agent.policy(states[idx], generator)  # detached λ_N
        kl = kl_between(teacher, student(states[idx])).mean()
        optim.zero_grad(set_to_none=True)
        kl.backward()
        optim.step()
        kls.append(kl.item())
    check_finite_weights("distillation", student)
    tail = kls[-min(50, len(kls)) :]
    return student.eval().requires_grad_(False), sum(tail) / len(tail)
