"""The one planning loop every planner shares (bookkeeping), and its result types.

A planner only supplies :meth:`Planner.step`: given λ_k it returns λ_{k+1}, the objective value at
λ_k if it computed one, and how many objective evaluations it spent. The loop validates input,
records the trace (Ĵ, λ, evaluations, time per iterate), replaces non-finite iterates and treats a
NaN objective as the worst value.

Shapes: B states · A action dims · I iterations.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
from torch import Tensor

from mbplan.distributions import TanhNormal
from mbplan.objective import Objective, ObjectiveValue


@dataclass
class PlanTrace:
    """Per-iterate record of one :meth:`Planner.plan` call; leading dimension I+1 (λ_0 … λ_I).

    Attributes:
        objective: Ĵ(s, λ_k) per state, [I+1, B]. Non-finite values are stored as −inf; NaN
            marks an iterate left unevaluated (``record_objective=False``).
            Gradient planners reuse the evaluation their step made at λ_k; the final iterate (and
            every iterate of CEM/direct that had none) is evaluated once more for the record.
        loc: μ_k, [I+1, B, A].
        log_scale: log σ_k, [I+1, B, A].
        n_evals: Cumulative objective evaluations spent to produce λ_k, [I+1]. One evaluation is
            one call on B states with the objective's K samples (CEM's population of P samples
            counts as P/K). Record-keeping evaluations are not counted.
        elapsed: Cumulative wall-clock seconds at which λ_k was ready, [I+1].
    """

    objective: Tensor
    loc: Tensor
    log_scale: Tensor
    n_evals: Tensor
    elapsed: Tensor

    @property
    def n_iters(self) -> int:
        """I, the number of iterations run."""
        return self.objective.shape[0] - 1


@dataclass
class PlanResult:
    """What :meth:`Planner.plan` returns.

    Attributes:
        dist: The final λ_I (``loc`` and ``log_scale`` [B, A]).
        trace: The per-iterate :class:`PlanTrace`.
        final: The objective evaluation at λ_I (samples, per-sample Q, KL), when recorded.
        warm: What the plan leaves to warm-start the next one (``mppi``: its final mean action
            sequence in pre-tanh space, [H, B, A], to be shifted by one step with
            :func:`mbplan.planners.mppi.shift_sequence`); None for planners without one.
    """

    dist: TanhNormal
    trace: PlanTrace
    final: ObjectiveValue | None = None
    warm: Any = None

    def improvement(self) -> Tensor:
        """Ĵ(λ_I) − Ĵ(λ_0) per state, [B]."""
        return self.trace.objective[-1] - self.trace.objective[0]


@dataclass
class StepOutput:
    """What one planner iteration hands back to the loop.

    Attributes:
        dist: λ_{k+1}.
        value: Ĵ(s, λ_k) [B] if the step evaluated it (gradient planners), else None.
        n_evals: Objective evaluations the step spent.
        carry: Planner-specific state for the next step (e.g. Adam moments).
    """

    dist: TanhNormal
    value: Tensor | None
    n_evals: float
    carry: Any = None


def worst_if_nonfinite(values: Tensor) -> Tensor:
    """Map NaN/±inf objective values to −inf (the worst value), never to a good one."""
    return torch.where(torch.isfinite(values), values, torch.full_like(values, -torch.inf))


class Planner:
    """Base class: the batched planning loop. Subclasses implement :meth:`step` only.

    Subclasses set ``name`` and ``default_iters``.
    """

    name: ClassVar[str] = "planner"
    default_iters: ClassVar[int] = 1
    #: Whether :meth:`plan` accepts a ``warm`` start beyond λ_0 (sequence planners).
    takes_warm: ClassVar[bool] = False

    # -- hooks -------------------------------------------------------------------------------
    def init_carry(
        self, objective: Objective, states: Tensor, dist: TanhNormal, warm: Any = None
    ) -> Any:
        """Planner state before the first step (default: none); ``warm`` as given to plan()."""
        return None

    def warm_start(self, carry: Any) -> Any:
        """What the final carry leaves to warm-start the next plan (default: nothing)."""
        return None

    def step(
        self,
        objective: Objective,
        states: Tensor,
        dist: TanhNormal,
        carry: Any,
        generator: torch.Generator | None,
        differentiable: bool,
    ) -> StepOutput:
        """One iteration λ_k → λ_{k+1}. Implemented by each planner."""
        raise NotImplementedError

    def expected_dims(self) -> tuple[int | None, int | None]:
        """(S, A) this planner was built for, or None where it works for any."""
        return None, None

    # -- the loop ----------------------------------------------------------------------------
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
        warm: Any = None,
    ) -> PlanResult:
        """Optimize λ per state for ``n_iters`` iterations against ``objective``.

        Args:
            objective: Ĵ(s, λ), e.g. from :func:`mbplan.make_objective`.
            states: [B, S] finite states.
            init: λ to warm-start from, [B, A] each; default λ_0 = (μ = 0, σ = 0.5).
            n_iters: I; default the planner's own (iterative 5, direct 1, adam 250, cem 10, mppi 6).
            generator: Source of all sampling noise; the same seed gives the same result on CPU.
            differentiable: Keep the autograd graph from the planner's weights to the trace
                (used by :func:`mbplan.planners.train_amortized`); off for planning. The loss
                needs no Ĵ(λ_0), so it is not evaluated for the record in this mode.
            record_objective: Evaluate Ĵ at iterates whose step did not (the final one, and all
                of ``direct``). Off when acting fast: those entries of the trace are then NaN.
            warm: A planner-specific warm start beyond λ_0 (``mppi``: a mean action sequence,
                see :class:`~mbplan.planners.mppi.MPPIPlanner`); planners without one reject it.

        Returns:
            :class:`PlanResult` with the final λ, the trace and what warm-starts the next plan.

        Raises:
            ValueError: States of the wrong width or not finite, a bad ``init``, ``n_iters`` or
                ``warm``.
        """
        n_iters = self.default_iters if n_iters is None else n_iters
        if n_iters < 1:
            raise ValueError(f"n_iters must be >= 1, got {n_iters}")
        if warm is not None and not self.takes_warm:
            raise ValueError(f"planner {self.name!r} takes no warm start beyond init")
        dist = self._check_inputs(objective, states, init)

        start = time.perf_counter()
        carry = self.init_carry(objective, states, dist, warm)
        dists, values, n_evals, elapsed = [dist], [], [0.0], [0.0]
        for _ in range(n_iters):
            out = self.step(objective, states, dist, carry, generator, differentiable)
            values.append(out.value)
            new = _keep_finite(out.dist, dist)
            dist = new if differentiable else new.detach()
            carry = out.carry
            dists.append(dist)
            n_evals.append(n_evals[-1] + out.n_evals)
            elapsed.append(time.perf_counter() - start)
        values.append(None)

        # Record Ĵ at iterates whose step did not evaluate it (always the final one).
        final = None
        for k, v in enumerate(values):
            if v is None and record_objective and not (differentiable and k == 0):
                with torch.set_grad_enabled(differentiable):
                    final = objective(states, dists[k], generator=generator)
                v = worst_if_nonfinite(final.value)
            elif v is None:
                v = torch.full(
                    (states.shape[0],), torch.nan, dtype=dist.loc.dtype, device=states.device
                )
            else:
                v = worst_if_nonfinite(v)
            values[k] = v if differentiable else v.detach()
        trace = PlanTrace(
            objective=torch.stack(values),  # (I+1, B)
            loc=torch.stack([d.loc for d in dists]),  # (I+1, B, A)
            log_scale=torch.stack([d.log_scale for d in dists]),  # (I+1, B, A)
            n_evals=torch.tensor(n_evals),
            elapsed=torch.tensor(elapsed),
        )
        return PlanResult(dist, trace, final, self.warm_start(carry))

    def _check_inputs(
        self, objective: Objective, states: Tensor, init: TanhNormal | None
    ) -> TanhNormal:
        if states.ndim != 2:
            raise ValueError(f"states must be [B, S], got shape {tuple(states.shape)}")
        B, S = states.shape
        want_s, want_a = self.expected_dims()
        want_s = want_s if want_s is not None else objective.state_dim
        want_a = want_a if want_a is not None else objective.action_dim
        if want_s is not None and want_s != S:
            raise ValueError(f"states have width {S}, expected state_dim {want_s}")
        if not torch.isfinite(states).all():
            raise ValueError("states contain NaN or infinite values")
        if init is None:
            if want_a is None:
                raise ValueError(
                    "cannot infer the action dimension: pass init or build the objective "
                    "with action_dim"
                )
            return TanhNormal.initial(B, want_a, dtype=states.dtype, device=states.device)
        if init.loc.shape != init.log_scale.shape or init.loc.ndim != 2 or init.loc.shape[0] != B:
            raise ValueError(
                f"init must have loc and log_scale of shape [{B}, A], got "
                f"{tuple(init.loc.shape)} and {tuple(init.log_scale.shape)}"
            )
        if want_a is not None and init.loc.shape[1] != want_a:
            raise ValueError(f"init has action dim {init.loc.shape[1]}, expected {want_a}")
        if not (torch.isfinite(init.loc).all() and torch.isfinite(init.log_scale).all()):
            raise ValueError("init contains NaN or infinite values")
        return init.detach()

    def hyperparameters(self) -> dict[str, Any]:
        """The planner's settings as a plain dict (for configs and logs)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]


def _keep_finite(new: TanhNormal, old: TanhNormal) -> TanhNormal:
    """Per state, keep the previous λ wherever the new one is not finite."""
    ok = (torch.isfinite(new.loc) & torch.isfinite(new.log_scale)).all(-1, keepdim=True)  # (B, 1)
    return TanhNormal(
        torch.where(ok, new.loc, old.loc), torch.where(ok, new.log_scale, old.log_scale)
    )
