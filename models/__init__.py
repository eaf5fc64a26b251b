"""Networks: MLPs, the twin-Q critic ensemble (installed as ``mbplan.models``)."""

from mbplan.models.critic import EnsembleQ
from mbplan.models.mlp import mlp

__all__ = ["EnsembleQ", "mlp"]
