"""``mppi``: a policy-seeded open-loop action-sequence planner with TD-MPC2's defaults.

MPPI (Williams, Aldrich, Theodorou, "Information Theoretic MPC for Model-Based Reinforcement
Learning", ICRA 2017) as TD-MPC2 uses it (Hansen, Su, Wang, "TD-MPC2: Scalable, Robust World
Models for Continuous Control", ICLR 2024): the decision variable is an open-loop H × A action
sequence per state with a diagonal Gaussian per step. Each iteration scores N candidate sequences,
of which P come from rolling the policy out through the model (drawn once, kept through the
iterations), keeps the best N_e, and refits the Gaussian to them with weights
softmax(temperature·(v − v_max)).

Score of a sequence a_0 … a_{H−1} through the ModelValue's own models and pessimistic target
critics (DESIGN.md §4): Σ_t γ^t r̂_t + γ^H Q̂_β(s_H, tanh μ_f(s_H)), μ_f the future policy's mean.
On an objective whose ``q_fn`` is not a :class:`~mbplan.model_value.ModelValue` (a critic, an
analytic function) there is no model to roll out: H = 1 and a candidate is a first action scored
by ``q_fn`` itself, with no policy candidates.

Mapping onto the common interface (λ = a tanh-Normal over the first action):

* The sequence is sampled in pre-tanh space, as CEM does: u_t ~ N(μ_t, σ_t²), a_t = tanh(u_t)
  (clamped as :func:`~mbplan.distributions.squash`), so λ_k is exactly the first step's Gaussian,
  ``TanhNormal(μ_0, log σ_0)``, and the trace records Ĵ at it (record-keeping, not counted).
* Start: step 0 at λ_0 (``init``, else the warm sequence's first mean with σ = ``init_scale``,
  else the common λ_0 = (0, 0.5)); the later steps at the warm sequence's means (else 0) with
  σ = ``init_scale`` (TD-MPC2: 2).
* ``n_evals``: one evaluation is K·B rows through an H-step rollout, so N candidate sequences per
  state cost N/K evaluations (CEM's population of P samples costs P/K). The policy candidates are
  rolled out once per plan and their scores kept (the score is deterministic given the actions):
  the first iteration costs N/K, every later one (N − P)/K.
* Warm start (stateless): ``PlanResult.warm`` is the final mean sequence [H, B, A]; the caller
  shifts it by one step (:func:`shift_sequence`) and passes it back as ``plan(..., warm=...)``.
* Trust region: against an :class:`~mbplan.objective.AnchoredObjective` (Ĵ − η·KL(π ‖ π_anchor))
  each candidate's score gets the part of −η·KL that depends on the candidate,
  η·log N(u_0; μ_anchor, σ_anchor²) of its first action's pre-tanh value (constants dropped). Not
  CEM's per-sample −η·(log π_k(u_0) − log π_anchor(u_0)): its −log π_k rewards candidates far out
  in π_k's tails without bound, and the policy candidates are not drawn from π_k.
* Differences from TD-MPC2: NaN scores rank last (TD-MPC2 maps them to 0); the end value takes the
  policy's mean action (DESIGN.md §4; TD-MPC2 samples it); the plan acts with tanh μ_0 like every
  planner here (TD-MPC2 samples one elite by its weight); actions live in pre-tanh space (TD-MPC2
  clamps Gaussian samples to [−1, 1]), so σ bounds and ``init_scale`` are pre-tanh values.

Shapes: B states · N candidates · P policy candidates · N_e elites · H horizon · S state dims ·
A action dims.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from einops import rearrange
from torch import Tensor

from mbplan.distributions import TanhNormal, squash
from mbplan.model_value import ModelValue
from mbplan.objective import AnchoredObjective, Objective, pessimistic
from mbplan.planners.base import Planner, PlanResult, StepOutput, worst_if_nonfinite


@dataclass
class MPPIState:
    """The carry of one :meth:`MPPIPlanner.plan` call.

    Attributes:
        loc: Pre-tanh means μ_t of the sequence, [H, B, A].
        scale: Pre-tanh standard deviations σ_t, [H, B, A].
        policy_pre_tanh: The policy candidates' pre-tanh actions, [H, P, B, A] (None until drawn,
            or without a model or with ``policy_samples = 0``).
        policy_values: Their scores, [P, B].
    """

    loc: Tensor
    scale: Tensor
    policy_pre_tanh: Tensor | None = None
    policy_values: Tensor | None = None


@dataclass(frozen=True)
class MPPIPlanner(Planner):
    """Sample sequences around the mean, keep the elites, refit by softmax(temperature·v) weights.

    Attributes:
        samples: Candidate sequences N per state per iteration (TD-MPC2: 512), policy ones
            included.
        policy_samples: P of them rolled out from the future policy through the model, drawn once
            per plan and kept through the iterations (TD-MPC2: 24; 0 = the plain open-loop planner
            of the PETS family). Needs a model-based objective; otherwise all N are sampled.
        elites: N_e candidates the Gaussian is refitted to (TD-MPC2: 64).
        temperature: Elite weights softmax(temperature·(v − v_max)) (TD-MPC2: 0.5).
        scale_bounds: σ is clamped into this range after every update (TD-MPC2: [0.05, 2]).
        init_scale: σ of the steps λ_0 does not give (TD-MPC2 starts at its max σ, 2).
        n_iters: Default iterations (TD-MPC2: 6).
    """

    samples: int = 512
    policy_samples: int = 24
    elites: int = 64
    temperature: float = 0.5
    scale_bounds: tuple[float, float] = (0.05, 2.0)
    init_scale: float = 2.0
    n_iters: int = 6

    name: ClassVar[str] = "mppi"
    takes_warm: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not 0 <= self.policy_samples < self.samples:
            raise ValueError(
                f"need 0 <= policy_samples < samples, got {self.policy_samples}, {self.samples}"
            )
        if not 1 <= self.elites <= self.samples:
            raise ValueError(f"need 1 <= elites <= samples, got {self.elites}, {self.samples}")
        low, high = self.scale_bounds
        if not (0 < low <= high and math.isfinite(high)):
            raise ValueError(f"need 0 < scale_bounds[0] <= scale_bounds[1], got {low}, {high}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature}")
        if not (self.init_scale > 0 and math.isfinite(self.init_scale)):
            raise ValueError(f"init_scale must be a finite number > 0, got {self.init_scale}")

    @property
    def default_iters(self) -> int:  # type: ignore[override]
        """I when the caller gives none."""
        return self.n_iters

    def plan(
        self,
        objective: Objective,
        states: Tensor,
        init: TanhNormal | None = None,
        n_iters: int | None = None,
        generator: torch.Generator | None = None,
        *,
        differentiable: bool = False,
        record_objective: bool = True,
        warm: Tensor | None = None,
    ) -> PlanResult:
        """:meth:`Planner.plan`, warm-started from a mean sequence.

        Args:
            objective: Ĵ; with a :class:`~mbplan.model_value.ModelValue` as ``q_fn`` the
                sequences are rolled out through its models over its horizon H, else H = 1.
            states: [B, S].
            init: λ_0, the first step's start; default (warm[0], σ = ``init_scale``) when
                ``warm`` is given, else (0, 0.5).
            n_iters: I (default 6).
            generator: Source of all sampling noise.
            differentiable: Accepted for the common interface; the plan itself is not.
            record_objective: As :meth:`Planner.plan`.
            warm: Pre-tanh means of the whole sequence, [H, B, A] (e.g. the previous plan's
                ``warm``, shifted by :func:`shift_sequence`); steps 1 … H−1 start there.

        Returns:
            :class:`~mbplan.planners.PlanResult`; its ``warm`` is the final mean sequence
            [H, B, A] (its step 0 is ``dist.loc``).
        """
        if warm is not None:
            warm = _check_warm(objective, states, init, warm)
            if init is None:
                init = TanhNormal(warm[0], torch.full_like(warm[0], math.log(self.init_scale)))
        return super().plan(
            objective,
            states,
            init,
            n_iters,
            generator,
            differentiable=differentiable,
            record_objective=record_objective,
            warm=warm,
        )

    def init_carry(
        self, objective: Objective, states: Tensor, dist: TanhNormal, warm: Any = None
    ) -> MPPIState:
        """The start sequence: step 0 at λ_0, steps 1 … H−1 at (warm or 0, ``init_scale``)."""
        H = planning_horizon(objective)
        B, A = dist.loc.shape
        loc = dist.loc.new_zeros(H, B, A) if warm is None else warm.to(dist.loc).clone()
        scale = torch.full_like(loc, self.init_scale)  # (H, B, A)
        loc[0], scale[0] = dist.loc, dist.log_scale.exp()
        return MPPIState(loc, scale)

    def warm_start(self, carry: MPPIState) -> Tensor:
        """The final mean sequence [H, B, A] (pre-tanh), unshifted."""
        return carry.loc

    def step(
        self,
        objective: Objective,
        states: Tensor,
        dist: TanhNormal,
        carry: MPPIState,
        generator: torch.Generator | None,
        differentiable: bool,
    ) -> StepOutput:
        """One MPPI update of the whole sequence; λ_{k+1} is its first step."""
        value = objective.q_fn if isinstance(objective.q_fn, ModelValue) else None
        K = objective.n_samples
        H, B, A = carry.loc.shape
        n_evals = 0.0
        with torch.no_grad():
            # Roll out the policy (once per plan; its candidates are kept through the iterations)
            n_policy = self.policy_samples if value is not None else 0
            if n_policy and carry.policy_pre_tanh is None:
                pre, values = policy_sequences(value, states, n_policy, generator)
                carry = replace(carry, policy_pre_tanh=pre, policy_values=values)
                n_evals += n_policy / K

            # Sample actions
            n = self.samples - n_policy
            eps = torch.randn(
                H, n, B, A, generator=generator, dtype=carry.loc.dtype, device=carry.loc.device
            )  # (H, N−P, B, A)
            pre = carry.loc.unsqueeze(1) + carry.scale.unsqueeze(1) * eps  # (H, N−P, B, A)
            actions = squash(pre)
            if value is not None:
                v = sequence_value(value, states, actions)  # (N−P, B)
            else:
                v = objective.q(states, actions[0], generator)  # (N, B): H = 1
            n_evals += n / K
            if carry.policy_pre_tanh is not None:
                pre = torch.cat([carry.policy_pre_tanh, pre], 1)  # (H, N, B, A)
                v = torch.cat([carry.policy_values, v], 0)  # (N, B)
            if isinstance(objective, AnchoredObjective):  # the trust region's per-candidate part
                v = v + objective.weight * anchor_log_density(objective.anchor, pre[0])
            v = worst_if_nonfinite(v)  # NaN ranks last

            # Select the elites
            top, idx = v.topk(self.elites, dim=0)  # (N_e, B), best first
            index = idx[None, :, :, None].expand(H, -1, -1, A)  # (H, N_e, B, A)
            elites = pre.gather(1, index)  # (H, N_e, B, A)

            # Update parameters (a state whose candidates all scored NaN keeps its Gaussian)
            w = torch.softmax(self.temperature * (top - top[:1]), dim=0)  # (N_e, B)
            w = rearrange(w, "e b -> 1 e b 1")
            loc = (w * elites).sum(1)  # (H, B, A)
            var = (w * (elites - loc.unsqueeze(1)).square()).sum(1)  # (H, B, A)
            scale = var.sqrt().clamp(*self.scale_bounds)
            ok = torch.isfinite(top[0])[None, :, None]  # (1, B, 1)
            loc = torch.where(ok, loc, carry.loc)
            scale = torch.where(ok, scale, carry.scale)
        carry = replace(carry, loc=loc, scale=scale)
        return StepOutput(TanhNormal(loc[0], scale[0].log()), None, n_evals, carry)


def planning_horizon(objective: Objective) -> int:
    """H of the sequences: the ModelValue's horizon, or 1 when ``q_fn`` is not a ModelValue."""
    return objective.q_fn.horizon if isinstance(objective.q_fn, ModelValue) else 1


def anchor_log_density(anchor: TanhNormal, pre_tanh: Tensor) -> Tensor:
    """log N(u; μ, σ²) of pre-tanh values u [N, B, A] under the anchor's Gaussian, up to a constant.

    Summed over A; returns [N, B]. Without the squash's log-det, which would reward saturated
    actions (it cancels inside a KL between two tanh-Normals).
    """
    z = (pre_tanh - anchor.loc) / anchor.log_scale.exp()  # (N, B, A)
    return (-0.5 * z.square() - anchor.log_scale).sum(-1)


def shift_sequence(sequence: Tensor) -> Tensor:
    """The receding-horizon warm start: step t + 1 moves to t, the last step restarts at 0.

    Args:
        sequence: Pre-tanh means [H, B, A] (``PlanResult.warm`` of the previous plan).

    Returns:
        [H, B, A].
    """
    return torch.cat([sequence[1:], torch.zeros_like(sequence[:1])])


def sequence_value(value: ModelValue, states: Tensor, actions: Tensor) -> Tensor:
    """Σ_t γ^t r̂_t + γ^H Q̂_β(s_H, tanh μ_f(s_H)) of action sequences through the value's models.

    Args:
        value: The models, target critics (β, γ) and future policy f.
        states: s_0, [B, S].
        actions: a_0 … a_{H−1} in (−1, 1), [H, N, B, A].

    Returns:
        The score of every sequence, [N, B].
    """
    H, N, B, A = actions.shape
    S = states.shape[-1]
    s = states.expand(N, B, S).reshape(N * B, S)  # (N*B, S): row n·B + b is state b
    total = s.new_zeros(N * B)
    for t in range(H):
        r, s = value.model_step(s, actions[t].reshape(N * B, A), N)  # (N*B,), (N*B, S)
        total = total + value.gamma**t * r
    end = value.future_policy(s).mode()  # (N*B, A): tanh μ_f(s_H)
    total = total + value.gamma**H * pessimistic(value.critic(s, end), value.beta)
    return total.reshape(N, B)


def policy_sequences(
    value: ModelValue, states: Tensor, n: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Roll the future policy out through the model: n sampled sequences per state and scores.

    Each action is one sample a_t ~ π_f(·|ŝ_t) along the model rollout; the score is
    :func:`sequence_value`'s, computed in the same pass.

    Args:
        value: The models, target critics and future policy.
        states: s_0, [B, S].
        n: P sequences per state.
        generator: Source of the policy's sampling noise.

    Returns:
        (pre-tanh actions [H, P, B, A], scores [P, B]).
    """
    B, S = states.shape
    s = states.expand(n, B, S).reshape(n * B, S)  # (P*B, S): row p·B + b is state b
    total, pre = s.new_zeros(n * B), []
    for t in range(value.horizon):
        a, u = value.future_policy(s).rsample(1, generator)  # (1, P*B, A) each
        r, s = value.model_step(s, a[0], n)
        total = total + value.gamma**t * r
        pre.append(u[0])
    end = value.future_policy(s).mode()  # (P*B, A)
    total = total + value.gamma**value.horizon * pessimistic(value.critic(s, end), value.beta)
    pre_tanh = rearrange(torch.stack(pre), "h (p b) a -> h p b a", p=n)  # (H, P, B, A)
    return pre_tanh, total.reshape(n, B)


def _check_warm(
    objective: Objective, states: Tensor, init: TanhNormal | None, warm: Tensor
) -> Tensor:
    """``warm`` detached if it is a finite [H, B, A] sequence for this objective and states."""
    H = planning_horizon(objective)
    B = states.shape[0] if states.ndim == 2 else None
    A = objective.action_dim or (init.loc.shape[-1] if init is not None else warm.shape[-1])
    if warm.ndim != 3 or tuple(warm.shape) != (H, B, A):
        raise ValueError(
            f"warm must be a mean sequence of shape [H, B, A] = [{H}, {B}, {A}], got "
            f"{tuple(warm.shape)}"
        )
    if not torch.isfinite(warm).all():
        raise ValueError("warm contains NaN or infinite values")
    return warm.detach()
