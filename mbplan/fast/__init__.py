"""Hand-written twins of plain code paths, and the one switch that turns them all off.

Every fast path in mbplan computes what a readable plain path computes (to float rounding, with the
same random draws), in fewer or larger ops. Each is proven equal to its plain twin by a float64
test in ``tests/fast/``. One switch sends every one of them back to its plain reference:

* the environment variable ``MBPLAN_FAST=0`` (read at import; ``1`` or unset = on), or
* ``with mbplan.fast.disabled(): ...`` (this thread, for the block).

Each twin, its plain path, and the float64 test that proves them equal:

* ``fused_sac.direct_update_grads``: the direct model-free update with hand-written gradients.
  Plain: ``Agent._autograd_grads``. Test: ``tests/fast/test_fused_sac.py``.
* ``fused_value.FusedRollout``: Q̂_MB rollout + Retrace with a hand-written input gradient, for
  one model or an ensemble (each propagation, κ). Plain: the ``ModelValue`` loop through autograd.
  Test: ``tests/fast/test_fused_value.py``.
* ``fast_plan.FastIterativePlan``: the iterative planner's whole plan on Ĵ_MB as one (compiled)
  function, uncompiled (``MPC``'s default) or compiled (``--compile``). Plain:
  ``IterativePlanner.plan``. Test: ``tests/fast/test_fast_plan.py``.
* critic nodes ``_EnsembleHead`` and ``_FrozenActionGrad`` (``mbplan.models.critic``).
  Plain: ``EnsembleLinear`` layers through autograd. Test: ``tests/fast/test_critic_nodes.py``.
* ``_SampleLogProb`` (``mbplan.distributions``): tanh-Normal sample and log-prob in one node.
  Plain: ``TanhNormal`` ops one by one. Test: ``tests/fast/test_sample_node.py``.
* ``DirectPlanner.loss``: SAC's loss without the planning loop's bookkeeping.
  Plain: ``AmortizedPlanner.loss`` with I = 1. Test: ``tests/fast/test_direct_loss.py``.
* ``malloc.tune_malloc``: glibc's malloc thresholds raised (speed only; no number changes).

This module imports nothing from mbplan, so any layer may ask :func:`enabled`; the twin modules
themselves import only downward (networks, tensors, objectives, planners).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

__all__ = ["disabled", "enabled"]

_ENV_ON = os.environ.get("MBPLAN_FAST", "1").strip().lower() not in ("0", "false", "off", "no")
_local = threading.local()


def enabled() -> bool:
    """Whether fast paths may run: MBPLAN_FAST is not 0 and no :func:`disabled` block is open."""
    return _ENV_ON and getattr(_local, "off", 0) == 0


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Run the block on the plain reference paths only (this thread; blocks may nest)."""
    _local.off = getattr(_local, "off", 0) + 1
    try:
        yield
    finally:
        _local.off -= 1
