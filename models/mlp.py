"""Multi-layer perceptrons used by critics, models and amortized planners."""

from __future__ import annotations

from torch import nn


def mlp(
    in_dim: int,
    out_dim: int,
    hidden: int = 256,
    n_hidden: int = 2,
    activation: type[nn.Module] = nn.ReLU,
    layer_norm: bool = False,
    zero_last: bool = False,
) -> nn.Sequential:
    """``n_hidden`` × (Linear → [LayerNorm] → activation), then a Linear head.

    Args:
        in_dim: Input width.
        out_dim: Output width (0 builds the trunk alone, without a head).
        hidden: Width of each hidden layer.
        n_hidden: Number of hidden layers.
        activation: Activation class taking ``inplace`` (``nn.ReLU``, ``nn.LeakyReLU``).
        layer_norm: Insert LayerNorm before each activation.
        zero_last: Zero-initialise the head's weight and bias.
    """
    layers: list[nn.Module] = []
    width = in_dim
    for _ in range(n_hidden):
        layers.append(nn.Linear(width, hidden))
        if layer_norm:
            layers.append(nn.LayerNorm(hidden))
        layers.append(activation(inplace=True))
        width = hidden
    if out_dim > 0:
        head = nn.Linear(width, out_dim)
        if zero_last:
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        layers.append(head)
    return nn.Sequential(*layers)
