"""The model-based value Q̂_MB(s, a_0): H-step rollouts through learned models, combined by Retrace.

Used as the ``q_fn`` of an :class:`~mbplan.objective.Objective` (DESIGN.md §6): for each of the K
samples a_0, roll the dynamics forward H steps (batch K·B), acting with an amortized future policy,
and combine rewards, pessimistic target-critic values and the future KL terms with Retrace. All
weights are frozen inside; gradients reach the actions through the whole rollout.

Shapes: B states · K samples · H horizon · S state dims · A action dims.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor, nn

from mbplan import fast
from mbplan.distributions import TanhNormal, uniform_log_prob
from mbplan.fast.fused_value import FusedRollout, RolloutSettings, fused_q
from mbplan.models.ensemble import PROPAGATIONS, EnsembleDynamics, select_members
from mbplan.models.retrace import retrace
from mbplan.objective import pessimistic


@dataclass
class Rollout:
    """One recorded rollout of :class:`ModelValue` (detached).

    Attributes:
        states: s_0 … s_H, [H+1, K, B, S].
        actions: a_0 … a_H, [H+1, K, B, A].
        rewards: r̂_0 … r̂_{H−1}, [H, K, B].
        q: Q̂_β(s_t, a_t) for t = 0 … H, [H+1, K, B].
        kl: α·KL terms of a_1 … a_H, [H, K, B].
        value: The Retrace estimate Q̂_MB(s_0, a_0), [K, B].
    """

    states: Tensor
    actions: Tensor
    rewards: Tensor
    q: Tensor
    kl: Tensor
    value: Tensor


class ModelValue:
    """Q̂_MB(s, a_0) by an H-step model rollout and Retrace (λ_R), usable as an objective's q_fn.

    Args:
        dynamics: ŝ' = dynamics(s, a), a single model or an ensemble.
        reward: r̂ = reward(s, a), of the same kind.
        critic: Target critic ensemble, critic(s, a) → [E, ...].
        future_policy: s → λ (a :class:`TanhNormal`) for the actions after a_0.
        horizon: H ≥ 1.
        beta: Pessimism β of Q̂ = mean − β·std over the critics.
        gamma: Discount γ.
        lam: Retrace λ_R.
        alpha: KL weight α of the future terms.
        fused: Evaluate with :class:`~mbplan.fast.fused_value.FusedRollout` (same values to
            rounding, same gradient to the actions, a fraction of the ops) when the networks allow
            it, MBPLAN_FAST is on, the states need no gradient and no rollout is recorded. It
            holds copies of the weights, rebuilt when a network is swapped or any weight or buffer
            is changed in place. A change made through another tensor that aliases the weights
            (e.g. the flat buffer of :func:`mbplan.models.flat.flatten_into`) does not bump their
            version and is not seen: build a new ``ModelValue`` after such updates, as
            :meth:`mbplan.agent.Agent.objective` does on every call. Ensembles are fused too
            (with their propagation and κ).
        propagation: How an ensemble (:class:`~mbplan.models.ensemble.EnsembleDynamics`) is
            rolled out: ``fixed`` (sample k follows member k mod E) or ``mean``. Ignored for a
            single model.
        kappa: MOPO-style pessimism κ ≥ 0: each step's reward becomes r̂_t − κ·u_t, u_t the
            members' disagreement on s_{t+1}; it enters Retrace through δ_t. 0 for a single model.
    """

    def __init__(
        self,
        dynamics: nn.Module,
        reward: nn.Module,
        critic: nn.Module,
        future_policy: Callable[[Tensor], TanhNormal],
        horizon: int,
        beta: float = 1.0,
        gamma: float = 0.99,
        lam: float = 0.9,
        alpha: float | Tensor = 0.0,
        fused: bool = True,
        propagation: str = "fixed",
        kappa: float = 0.0,
    ):
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")
        if propagation not in PROPAGATIONS:
            raise ValueError(
                f"unknown propagation {propagation!r}; choose from {', '.join(PROPAGATIONS)}"
            )
        if not kappa >= 0:
            raise ValueError(f"the pessimism weight κ must be >= 0, got {kappa}")
        self.propagation, self.kappa = propagation, float(kappa)
        self.dynamics, self.reward, self.critic = dynamics, reward, critic
        self.future_policy = future_policy
        self.horizon, self.beta, self.gamma, self.lam = horizon, beta, gamma, lam
        self.alpha = alpha.detach() if isinstance(alpha, Tensor) else alpha
        self.record: list[Rollout] | None = None  # set to [] to keep every rollout
        self.fused = fused
        self.fused_rollout: FusedRollout | None = None  # built on first use
        self._fused_key: tuple | None = None  # the networks and weight versions it was built for

    def _networks_key(self) -> tuple:
        """Identity of the networks, and identity and version of every weight and buffer.

        Walks the module trees directly (``Module.parameters()`` costs ~0.5 ms here), so a swapped
        submodule or a replaced tensor (``load_state_dict(assign=True)``) is seen as well as an
        in-place change.
        """
        modules = [self.dynamics, self.reward, self.critic, self.future_policy]
        alpha = self.alpha
        scalars = (self.horizon, self.beta, self.gamma, self.lam, self.propagation, self.kappa)
        alpha_key = (id(alpha), alpha._version) if isinstance(alpha, Tensor) else alpha
        key: list = [id(m) for m in modules] + [scalars, alpha_key]
        stack = [m for m in modules if isinstance(m, nn.Module)]
        while stack:
            module = stack.pop()
            for group in (module._parameters, module._buffers):
                key += [(id(t), t._version) for t in group.values() if t is not None]
            stack += [m for m in module._modules.values() if m is not None]
        return tuple(key)

    def _fused(self, states: Tensor) -> FusedRollout | None:
        """The fused evaluator when it applies to this call, else None."""
        if not self.fused or self.record is not None or states.requires_grad:
            return None
        if not fast.enabled():
            return None
        key = self._networks_key()
        if key != self._fused_key:  # first call, or networks swapped or changed
            settings = RolloutSettings(
                self.horizon,
                self.beta,
                self.gamma,
                self.lam,
                self.alpha,
                self.propagation,
                self.kappa,
            )
            self.fused_rollout = FusedRollout.from_networks(  # None: networks of another form
                self.dynamics, self.reward, self.critic, self.future_policy, settings
            )
            self._fused_key = key
        return self.fused_rollout

    def model_step(self, s: Tensor, a: Tensor, K: int) -> tuple[Tensor, Tensor]:
        """(r̂_t [N], ŝ_{t+1} [N, S]) of K·B rows (row k·B + b = sample k of state b).

        A single model predicts each row; an ensemble propagates as ``propagation`` says and,
        with κ > 0, pays κ·u in the reward. Sequence planners (``mppi``) score candidates with it.
        """
        dyn, rew = self.dynamics, self.reward
        if not isinstance(dyn, EnsembleDynamics):
            return rew(s, a), dyn(s, a)
        mode = self.propagation
        if self.kappa == 0:
            return rew.propagate(s, a, K, mode), dyn.propagate(s, a, K, mode)
        # Pessimism needs every member's prediction: r̂ − κ·u, u = the members' disagreement
        members = dyn.members(s, a)  # (E, N, S)
        s_next = members.mean(0) if mode == "mean" else select_members(members, K)
        r = rew.propagate(s, a, K, mode) - self.kappa * dyn.disagreement(members)
        return r, s_next

    def __call__(
        self, states: Tensor, actions: Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        """Q̂_MB for states [B, S] and first actions [K, B, A]; returns [K, B]."""
        K, B, A = actions.shape
        S = states.shape[-1]
        s = states.expand(K, B, S).reshape(K * B, S)  # (K*B, S): row k·B + b is state b
        a = rearrange(actions, "k b a -> (k b) a")  # (K*B, A)
        fused = self._fused(states)
        if fused is not None:
            return fused_q(fused, s, a, generator, K).reshape(K, B)
        log_prior = uniform_log_prob(A)
        qs, rewards, kls = [], [], []
        traj_s, traj_a = [s], [a]
        for _ in range(self.horizon):
            # Value, reward and next state of (s_t, a_t)
            qs.append(pessimistic(self.critic(s, a), self.beta))  # (K*B,)
            r_t, s = self.model_step(s, a, K)
            rewards.append(r_t)
            # Next action from the amortized future policy, with its KL term
            a, _, log_prob = self.future_policy(s).rsample_log_prob(1, generator)
            a, log_prob = a[0], log_prob[0]  # (K*B, A), (K*B,)
            kls.append(self.alpha * (log_prob - log_prior))
            traj_s.append(s)
            traj_a.append(a)
        qs.append(pessimistic(self.critic(s, a), self.beta))
        q, r, kl = torch.stack(qs), torch.stack(rewards), torch.stack(kls)  # (H+1|H, K*B)
        value = rearrange(retrace(r, q, kl, self.gamma, self.lam), "(k b) -> k b", k=K)
        if self.record is not None:
            H = self.horizon
            self.record.append(
                Rollout(
                    states=rearrange(torch.stack(traj_s).detach(), "h (k b) s -> h k b s", k=K),
                    actions=rearrange(torch.stack(traj_a).detach(), "h (k b) a -> h k b a", k=K),
                    rewards=r.detach().reshape(H, K, B),
                    q=q.detach().reshape(H + 1, K, B),
                    kl=kl.detach().reshape(H, K, B),
                    value=value.detach(),
                )
            )
        return value
