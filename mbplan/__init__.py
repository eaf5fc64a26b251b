"""mbplan: model-based planning with iterative amortized policy optimization.

Marino, Piché, Ialongo, Yue. *Iterative Amortized Policy Optimization*. NeurIPS 2021.
"""

__version__ = "0.1.0"

from mbplan.distributions import TanhNormal
from mbplan.objective import Objective, ObjectiveValue, make_objective, pessimistic
from mbplan.planners import PLANNERS, PlanResult, PlanTrace, make_planner, train_amortized

__all__ = [
    "PLANNERS",
    "Objective",
    "ObjectiveValue",
    "PlanResult",
    "PlanTrace",
    "TanhNormal",
    "__version__",
    "make_objective",
    "make_planner",
    "pessimistic",
    "train_amortized",
]
