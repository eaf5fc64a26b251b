"""The agent: twin-Q critic, a planner as policy (``direct`` or ``iterative``), and learned α.

Soft actor-critic with KL to a uniform prior and pessimism β (DESIGN.md §3, §5); the policy is
whatever λ the planner returns. Marino et al., *Iterative Amortized Policy Optimization*, 2021.

Shapes: B batch · K samples · S state dims · A action dims · E critics.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from mbplan import fast
from mbplan.distributions import TanhNormal, kl_between, target_kl, uniform_log_prob
from mbplan.fast import fused_sac
from mbplan.model_value import ModelValue
from mbplan.models.critic import EnsembleQ
from mbplan.models.dynamics import Dynamics, Reward
from mbplan.models.ensemble import EnsembleDynamics, EnsembleReward
from mbplan.models.flat import flatten_into, frozen_alias, views_intact
from mbplan.objective import Objective, make_objective, pessimistic
from mbplan.planners import AmortizedPlanner, DirectPlanner, make_planner
from mbplan.replay import Batch

AGENTS = ("direct", "iterative")
VALUES = ("model-free", "model")


@dataclass(frozen=True)
class AgentConfig:
    """Hyperparameters of an :class:`Agent` (defaults from DESIGN.md).

    Attributes:
        agent: ``direct`` (SAC-like network) or ``iterative`` (iterative amortized optimizer).
        beta: Pessimism β of Q̂ = mean − β·std over the critics (2.5 recommended for iterative).
        n_iters: Iterations N of the iterative optimizer (train and act).
        n_samples: Samples K per state in Ĵ.
        gamma: Discount γ.
        tau: Polyak rate τ of the target critics.
        lr: Adam learning rate of every parameter group.
        hidden: Width of every 2-layer MLP.
        n_critics: E.
        value: ``model-free`` (Ĵ on the critics) or ``model`` (Ĵ_MB: H-step model rollouts,
            Retrace; the agent then also learns dynamics and reward models, and an iterative
            agent a direct network distilled from it as the rollouts' future policy).
        horizon: H of the model value.
        lam: Retrace λ_R of the model value.
        ensemble: Members E of the dynamics and reward models (1 = one model each); the members
            differ in initialisation and train on the same batches.
        propagation: How Ĵ_MB rolls an ensemble out (``fixed`` or ``mean``).
        kappa: Pessimism κ ≥ 0 on the members' disagreement in Ĵ_MB (0 = off).
    """

    agent: str = "direct"
    beta: float = 1.0
    n_iters: int = 5
    n_samples: int = 10
    gamma: float = 0.99
    tau: float = 0.005
    lr: float = 3e-4
    hidden: int = 256
    n_critics: int = 2
    value: str = "model-free"
    horizon: int = 2
    lam: float = 0.9
    ensemble: int = 1
    propagation: str = "fixed"
    kappa: float = 0.0


class Agent(nn.Module):
    """Critic + target critic + planner + log α, with their optimizers.

    Args:
        state_dim: S.
        action_dim: A.
        config: :class:`AgentConfig`.
    """

    def __init__(self, state_dim: int, action_dim: int, config: AgentConfig):
        super().__init__()
        if config.agent not in AGENTS:
            raise ValueError(f"unknown agent {config.agent!r}; choose from {', '.join(AGENTS)}")
        self.state_dim, self.action_dim, self.config = state_dim, action_dim, config
        self.critic = EnsembleQ(state_dim, action_dim, config.n_critics, config.hidden)
        self.target_critic = copy.deepcopy(self.critic).requires_grad_(False)
        extra = {"n_iters": config.n_iters} if config.agent == "iterative" else {}
        planner = make_planner(
            config.agent, state_dim=state_dim, action_dim=action_dim, hidden=config.hidden, **extra
        )
        assert isinstance(planner, AmortizedPlanner)
        self.planner: AmortizedPlanner = planner
        self.log_alpha = nn.Parameter(torch.zeros(()))
        if config.value not in VALUES:
            raise ValueError(f"unknown value {config.value!r}; choose from {', '.join(VALUES)}")
        self.dynamics: Dynamics | None = None
        self.reward: Reward | None = None
        self.distilled: DirectPlanner | None = None
        if config.value == "model":
            if config.ensemble > 1:
                E, H = config.ensemble, config.hidden
                self.dynamics = EnsembleDynamics(state_dim, action_dim, E, H)
                self.reward = EnsembleReward(state_dim, action_dim, E, H)
            else:
                self.dynamics = Dynamics(state_dim, action_dim, config.hidden)
                self.reward = Reward(state_dim, action_dim, config.hidden)
            if config.agent == "iterative":
                self.distilled = DirectPlanner(state_dim, action_dim, config.hidden)
        # One Adam over every trained parameter, all living in one flat buffer. The critic, planner
        # and α losses touch disjoint parameters (Ĵ uses the frozen target critics, the critic
        # target is computed without gradients), so one backward of their sum and one fused step
        # equal three separate updates, with far fewer ops.
        self._trained = [*self.critic.parameters(), *self.planner.parameters(), self.log_alpha]
        for extra in (self.dynamics, self.reward, self.distilled):
            if extra is not None:
                self._trained += list(extra.parameters())
        self._n_critic = sum(p.numel() for p in self.critic.parameters())
        self._flatten()
        #: Use the hand-written gradients of :mod:`mbplan.fast.fused_sac` where they apply (direct,
        #: model-free); False (or ``MBPLAN_FAST=0``) forces autograd (same values to rounding).
        self.fused_update = True
        self._sac_parts = fused_sac.SACParts(
            self.planner,
            self.critic,
            self.target_critic,
            self.log_alpha,
            config.beta,
            config.gamma,
            config.n_samples,
        )
        self._fused_supported = (  # the structure is fixed from here on
            config.agent == "direct"
            and config.value == "model-free"
            and fused_sac.supports(self._sac_parts)
        )
        #: Run those gradients through ``torch.compile`` (one-off compile, faster updates).
        self.compile_update = False

    def _flatten(self) -> None:
        """(Re)build the flat parameter buffers and the optimizer over them."""
        # A plain dict: the flat buffers must not register as (duplicate) module parameters.
        self._flat = {
            "trained": flatten_into(self._trained, with_grad=True),
            "target": flatten_into(list(self.target_critic.parameters()), with_grad=False),
        }
        self.optim = torch.optim.Adam([self._flat["trained"]], lr=self.config.lr, fused=True)
        # Frozen twins of the model and the future policy for use inside Ĵ_MB: their parameters
        # alias the live ones (no copies, always current) but never receive gradients there.
        self._frozen: dict[str, nn.Module] = {}
        if self.config.value == "model":
            future = self.distilled if self.distilled is not None else self.planner
            for name, module in (
                ("dynamics", self.dynamics),
                ("reward", self.reward),
                ("future", future),
            ):
                self._frozen[name] = frozen_alias(module)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if hasattr(self, "_flat") and not views_intact(self._trained, self._flat["trained"]):
            state = copy.deepcopy(self.optim.state_dict())
            self._flatten()
            self.optim.load_state_dict(state)
        return self

    @property
    def _fused_grads(self) -> bool:
        """Whether this update runs :mod:`mbplan.fast.fused_sac` (never under autocast)."""
        return (
            self.fused_update
            and self._fused_supported
            and fast.enabled()
            and not torch.is_autocast_enabled(self.log_alpha.device.type)
        )

    @property
    def alpha(self) -> Tensor:
        """α = exp(log α), detached."""
        return self.log_alpha.detach().exp()

    def objective(self) -> Objective:
        """Ĵ(s, λ) on the frozen target critics with pessimism β and the current α.

        With ``value="model"``, Q is the model value: H-step rollouts through the (frozen) models
        and future policy, combined by Retrace (DESIGN.md §6).
        """
        critic, beta = self.target_critic, self.config.beta
        q_fn = lambda s, a: pessimistic(critic(s, a), beta)  # noqa: E731
        if self.config.value == "model":
            q_fn = ModelValue(
                self._frozen["dynamics"],
                self._frozen["reward"],
                critic,
                self._frozen["future"],
                self.config.horizon,
                beta=beta,
                gamma=self.config.gamma,
                lam=self.config.lam,
                alpha=self.alpha,
                propagation=self.config.propagation,
                kappa=self.config.kappa,
            )
        return make_objective(
            q_fn,
            alpha=self.alpha,
            n_samples=self.config.n_samples,
            state_dim=self.state_dim,
            action_dim=self.action_dim,
        )

    def policy(self, states: Tensor, generator: torch.Generator | None = None) -> TanhNormal:
        """The agent's final-iterate policy λ at states [B, S] (no graph to the weights)."""
        with torch.no_grad():
            if self.config.agent == "direct":
                return self.planner(states)
            return self.planner.plan(
                self.objective(), states, generator=generator, record_objective=False
            ).dist

    def act(
        self, state: np.ndarray, deterministic: bool, generator: torch.Generator | None = None
    ) -> np.ndarray:
        """One action in (−1, 1)^A: tanh(μ) if deterministic, else a sample."""
        device = self.log_alpha.device
        s = torch.as_tensor(state, dtype=torch.float32, device=device).unsqueeze(0)  # (1, S)
        dist = self.policy(s, generator)
        action = dist.mode() if deterministic else dist.rsample(1, generator)[0][0]
        return action.reshape(-1).cpu().numpy()

    def critic_target(self, batch: Batch, generator: torch.Generator | None) -> Tensor:
        """y = r + γ(1 − terminal)[Q̂_β(s', a') − α·KL̂(π(·|s') ‖ p)], a' ~ π(·|s'); [B]."""
        dist = self.policy(batch.next_states, generator)
        with torch.no_grad():
            actions, _, log_prob = dist.rsample_log_prob(1, generator)  # (1, B, A), (1, B)
            kl = log_prob[0] - uniform_log_prob(self.action_dim)  # (B,)
            q = pessimistic(self.target_critic(batch.next_states, actions[0]), self.config.beta)
            not_done = 1.0 - batch.terminated
            return batch.rewards + self.config.gamma * not_done * (q - self.alpha * kl)

    def critic_loss(self, batch: Batch, target: Tensor) -> Tensor:
        """0.5·Σ_E (Q_e(s, a) − y)², averaged over the batch."""
        q = self.critic(batch.states, batch.actions)  # (E, B)
        return 0.5 * (q - target).square().sum(0).mean()

    def update(self, batch: Batch, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """One gradient update of critic, planner and α, then Polyak averaging.

        Returns:
            Detached scalar metrics: critic/actor/alpha losses, α, KL, mean critic target, and for
            the iterative agent the improvement Ĵ(λ_N) − Ĵ(λ_0).
        """
        flat = self._flat["trained"]
        if self._fused_grads:
            metrics = fused_sac.direct_update_grads(
                self._sac_parts, batch, generator, self.compile_update
            )
        else:
            flat.grad.zero_()
            metrics = self._autograd_grads(batch, generator)
        self.optim.step()

        # Target critics (the critic's parameters come first in the flat buffer)
        with torch.no_grad():
            self._flat["target"].lerp_(flat[: self._n_critic], self.config.tau)
        metrics["alpha"] = self.alpha
        return metrics

    def _autograd_grads(self, batch: Batch, generator: torch.Generator | None) -> dict[str, Tensor]:
        """The update's losses, and their gradients accumulated into ``.grad`` by autograd."""
        # Critic: regress on the one-step model-free target
        target = self.critic_target(batch, generator)
        critic_loss = self.critic_loss(batch, target)

        # Policy / optimizer: maximise Ĵ on the frozen target critics
        actor_loss, result = self.planner.loss(self.objective(), batch.states, generator)

        # α towards the KL target, from the KL̂ of the final λ's evaluation
        assert result.final is not None
        kl = result.final.kl.detach().mean()
        alpha_loss = -self.log_alpha.exp() * (kl - target_kl(self.action_dim))

        total = critic_loss + actor_loss + alpha_loss
        extra: dict[str, Tensor] = {}
        if self.config.value == "model":
            # Models on real transitions; an iterative agent's future policy distilled from it
            extra = self.model_losses(batch)
            total = total + extra["dynamics_loss"] + extra["reward_loss"]
            if self.distilled is not None:
                teacher = result.dist.detach()
                extra["distill_loss"] = kl_between(teacher, self.distilled(batch.states)).mean()
                total = total + extra["distill_loss"]

        # One backward for all (disjoint parameters)
        total.backward()

        metrics = {
            "critic_loss": critic_loss.detach(),
            "actor_loss": actor_loss.detach(),
            "alpha_loss": alpha_loss.detach(),
            "kl": kl,
            "q_target": target.mean(),
        }
        if self.config.agent == "iterative":
            metrics["improvement"] = result.improvement().detach().mean()
        metrics.update({k: v.detach() for k, v in extra.items()})
        return metrics

    # -- model (value="model") ------------------------------------------------------------------
    def model_losses(self, batch: Batch) -> dict[str, Tensor]:
        """Dynamics MSE and reward NLL on real transitions."""
        assert self.dynamics is not None and self.reward is not None
        return {
            "dynamics_loss": self.dynamics.loss(batch.states, batch.actions, batch.next_states),
            "reward_loss": self.reward.loss(batch.states, batch.actions, batch.rewards),
        }

    def fit_model_normalizers(self, data: dict[str, Tensor]) -> None:
        """Set the models' input/output statistics from real transitions."""
        assert self.dynamics is not None and self.reward is not None
        device = self.log_alpha.device
        s, a = data["states"].to(device), data["actions"].to(device)
        self.dynamics.fit_normalizers(s, a, data["next_states"].to(device))
        self.reward.fit_normalizers(s, a, data["rewards"].to(device))

    def model_update(self, batch: Batch) -> dict[str, Tensor]:
        """One model-only update (the warm-up of the model before joint training)."""
        losses = self.model_losses(batch)
        flat = self._flat["trained"]
        flat.grad.zero_()
        (losses["dynamics_loss"] + losses["reward_loss"]).backward()
        self.optim.step()
        return {k: v.detach() for k, v in losses.items()}

    def future_policy(self) -> DirectPlanner | None:
        """The direct network the model rollouts act with (None for a model-free agent)."""
        if self.config.value != "model":
            return None
        return self.distilled if self.distilled is not None else self.planner  # type: ignore[return-value]

    def weights_finite(self) -> bool:
        """Whether every trained and target weight is finite (one check over the flat buffers)."""
        with torch.no_grad():
            return all(bool(torch.isfinite(flat).all()) for flat in self._flat.values())

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """The optimizers by name (for checkpoints)."""
        return {"adam": self.optim}
