"""Twin-Q critic as one fused ensemble: E critics evaluated with batched matmuls (DESIGN.md §5).

Shapes: N state–action pairs · E ensemble members · S state dims · A action dims.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor, nn

from mbplan import fast

# Rows per block of the frozen critics' fused evaluation: the block's activations stay in cache.
_FROZEN_CHUNK = 512


class EnsembleLinear(nn.Module):
    """E independent linear layers applied with one ``baddbmm``: [E, N, in] → [E, N, out]."""

    def __init__(self, n_members: int, in_dim: int, out_dim: int, init_bound: float | None = None):
        super().__init__()
        bound = init_bound if init_bound is not None else 1.0 / math.sqrt(in_dim)
        self.weight = nn.Parameter(torch.empty(n_members, in_dim, out_dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(n_members, 1, out_dim).uniform_(-bound, bound))

    def forward(self, x: Tensor) -> Tensor:
        """x [E, N, in] (or [N, in], shared by all members) → [E, N, out]."""
        if x.ndim == 2:
            x = x.expand(self.weight.shape[0], *x.shape)  # (E, N, in)
        return torch.baddbmm(self.bias, x, self.weight)


def head_values(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """q_e = x_e·w_e + b_e for one-output members: x [E, N, H], w [E, H, 1], b [E, 1, 1] → [E, N].

    A multiply and a row sum: ``baddbmm(b, x, w)`` gives the same values (to float rounding) but
    MKL runs that one-column product 4–6× slower (93 vs 25 µs at N = 256, 858 vs 136 µs at
    N = 2560, 2 threads).
    """
    return (x * w.transpose(1, 2)).sum(-1).add_(b.squeeze(-1))  # (E, N)


class _EnsembleHead(torch.autograd.Function):
    """One-output members: x [E, N, H], w [E, H, 1], b [E, 1, 1] → q [E, N], q_e = x_e·w_e + b_e.

    MKL runs one-column batched products far below its peak, so neither direction uses one: the
    forward is :func:`head_values` and ∂q/∂x an elementwise outer product (autograd's backward of
    ``baddbmm`` forms it as a rank-1 batched matmul, ~10× slower at [2, 2560, 256]: 1.7 vs
    0.14 ms). The backward is made of differentiable ops, so second derivatives still work.
    """

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        ctx.save_for_backward(x, w)
        return head_values(x, w, b)

    @staticmethod
    def backward(ctx, g: Tensor):
        x, w = ctx.saved_tensors
        g = g.unsqueeze(-1)  # (E, N, 1)
        gx = g * w.transpose(1, 2) if ctx.needs_input_grad[0] else None  # (E, N, H)
        # (gᵀx)ᵀ, not xᵀg: the same numbers, ~8× faster in MKL for a one-column g
        gw = torch.bmm(g.transpose(1, 2), x).transpose(1, 2) if ctx.needs_input_grad[1] else None
        gb = g.sum(1, keepdim=True) if ctx.needs_input_grad[2] else None  # (E, 1, 1)
        return gx, gw, gb


class _FrozenActionGrad(torch.autograd.Function):
    """Q-values of frozen critics whose only gradient is to the actions, computed with its Jacobian.

    Ĵ differentiates the frozen target critics with respect to the actions only. Each member's
    q_e is a scalar per row, so ∂q_e/∂a (E·N·A) costs one backward pass with unit gradient; doing
    it in the forward, block by block, keeps each block's activations in cache, skips autograd's
    saved activations, and gives the first layer's input gradient for the A action columns only
    (not all S + A). The backward is then Σ_e g_e·∂q_e/∂a. ReLU masks use
    ``threshold_backward``, one pass each. Second derivatives stay exact: with frozen weights the
    Jacobian is piecewise constant in the actions (ReLU masks), so the backward, linear in g, is
    differentiable as written.
    """

    @staticmethod
    def forward(ctx, actions: Tensor, states: Tensor, module: EnsembleQ) -> Tensor:
        q, jac = module.values_and_action_jacobian(states, actions)
        ctx.save_for_backward(jac)
        return q

    @staticmethod
    def backward(ctx, g: Tensor):
        (jac,) = ctx.saved_tensors
        return (g.unsqueeze(1) * jac).sum(0).t(), None, None  # (N, A)


class EnsembleQ(nn.Module):
    """E Q-networks Q_e(s, a): input [s, a], ``n_hidden`` × ``hidden`` ReLU, last layer U(±3e-3).

    Args:
        state_dim: S.
        action_dim: A.
        n_members: E (2 for twin Q).
        hidden: Hidden width.
        n_hidden: Hidden layers.
    """

    def __init__(
        self,
        state_dim: int,
        action_dim: int,
        n_members: int = 2,
        hidden: int = 256,
        n_hidden: int = 2,
    ):
        super().__init__()
        self.state_dim, self.action_dim, self.n_members = state_dim, action_dim, n_members
        dims = [state_dim + action_dim] + [hidden] * n_hidden
        self.hidden = nn.ModuleList(
            EnsembleLinear(n_members, d_in, d_out) for d_in, d_out in itertools.pairwise(dims)
        )
        self.head = EnsembleLinear(n_members, hidden, 1, init_bound=3e-3)

    def forward(self, states: Tensor, actions: Tensor) -> Tensor:
        """Q-values of every member.

        Args:
            states: [..., S].
            actions: [..., A] with the same leading dims as ``states`` (broadcast first).

        Returns:
            [E, ...] values.
        """
        lead = actions.shape[:-1]
        states = states.expand(*lead, states.shape[-1])
        if fast.enabled() and self._frozen_action_grad(states, actions):
            q = _FrozenActionGrad.apply(
                actions.reshape(-1, actions.shape[-1]), states.reshape(-1, states.shape[-1]), self
            )  # (E, N)
            return q.reshape(self.n_members, *lead)
        x = torch.cat([states, actions], -1)
        x = x.reshape(-1, x.shape[-1])  # (N, S+A)
        for layer in self.hidden:
            x = layer(x).relu_()  # (E, N, hidden); in place: baddbmm keeps its input, not output
        if fast.enabled():
            q = _EnsembleHead.apply(x, self.head.weight, self.head.bias)  # (E, N)
        else:  # the plain twin: autograd through the batched matmul
            q = self.head(x).squeeze(-1)  # (E, N)
        return q.reshape(self.n_members, *lead)  # (E, ...)

    def values_and_action_jacobian(
        self, states: Tensor, actions: Tensor, grad_rows: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """Q-values and their Jacobian to the actions, without autograd (weights taken as fixed).

        Block by block (``_FROZEN_CHUNK`` rows), so each block's activations stay in cache; the
        first layer's input gradient is formed for the A action columns only (not all S + A); ReLU
        masks use ``threshold_backward``, one pass each.

        Args:
            states: [N, S].
            actions: [N, A].
            grad_rows: Form the Jacobian for the first ``grad_rows`` rows only (default all N);
                the rest get values alone.

        Returns:
            (q [E, N], ∂q_e/∂a transposed [E, A, grad_rows]).
        """
        S = self.state_dim
        x = torch.cat([states, actions], -1)  # (N, S+A)
        weights = [layer.weight for layer in self.hidden]  # [E, in, out] each
        back = [w.transpose(1, 2) for w in weights[1:]]  # (E, out, in): ∂/∂input of layers 2..
        w_action = weights[0][:, S:]  # (E, A, H): the first layer's action rows only
        grad_head = self.head.weight.transpose(1, 2)  # (E, 1, H)
        N = x.shape[0]
        grad_rows = N if grad_rows is None else grad_rows
        q = x.new_empty(self.n_members, N)
        jacs = []  # per block ∂q_e/∂a, transposed: (E, A, m)
        for i in range(0, N, _FROZEN_CHUNK):
            h = x[i : i + _FROZEN_CHUNK]  # (n, S+A), shared by the members
            hs = []
            for layer in self.hidden:
                h = layer(h).relu_()  # (E, n, H)
                hs.append(h)
            q[:, i : i + _FROZEN_CHUNK] = head_values(h, self.head.weight, self.head.bias)
            m = min(h.shape[1], grad_rows - i)  # rows of this block that want the Jacobian
            if m <= 0:
                continue
            hs = [h[:, :m] for h in hs]
            g = torch.ops.aten.threshold_backward(grad_head.expand_as(hs[-1]), hs[-1], 0)
            for wt, h_in in zip(reversed(back), reversed(hs[:-1]), strict=True):
                g = torch.ops.aten.threshold_backward(torch.bmm(g, wt), h_in, 0)  # ∂q/∂pre-act
            # W_a·gᵀ (E, A, m): MKL runs this shape ~1.6× faster than g·W_aᵀ (E, m, A)
            jacs.append(torch.bmm(w_action, g.transpose(1, 2)))
        if not jacs:
            return q, x.new_zeros(self.n_members, actions.shape[-1], 0)
        return q, jacs[0] if len(jacs) == 1 else torch.cat(jacs, -1)

    def _frozen_action_grad(self, states: Tensor, actions: Tensor) -> bool:
        """Whether the only gradient wanted is to the actions (Ĵ on frozen target critics)."""
        return (
            torch.is_grad_enabled()
            and not torch.is_autocast_enabled(actions.device.type)
            and actions.requires_grad
            and not states.requires_grad
            and not any(p.requires_grad for p in self.parameters())
        )
