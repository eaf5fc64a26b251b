"""A fused, frozen-weight Q̂_MB(s, a_0) with a hand-written backward, for planning latency.

Same value as :class:`~mbplan.model_value.ModelValue` (to rounding; same generator draws) and the
same gradient with respect to the first actions, in a fraction of the ops. Planning evaluates Ĵ_MB
on K = 10 rows, where every op costs its fixed overhead (~5 µs here) and autograd's generic
backward takes ~3,500 of them per evaluation (~700 here). Here:

* dynamics, reward and the critics read the same input [s, a], so their layers are stacked and
  run as one batched matmul per layer (input standardisation and output scales are folded into
  the weights);
* Retrace is linear in rewards, Q-values, KL terms and the ensemble's pessimism terms κ·u, so their
  adjoints are constants;
* the backward pass is written out by hand (input gradients only: the weights are frozen).

An ensemble model (:mod:`mbplan.models.ensemble`) stacks its E dynamics and E reward members the
same way. How the K·B rows meet the members follows ``ModelValue``'s propagation (:data:`MODES`):
with ``fixed`` propagation and E dividing K, member e takes only the rows of samples k ≡ e (mod E),
so a step costs the matmuls of one model (two batched passes: the models on their rows, the
critics on all rows). The rows are regrouped member-major once per rollout (states, actions and
noise in, values and ∂/∂a_0 out), so every step's member rows are views, not copies.

Used automatically by ``ModelValue`` when its networks have the supported form (deterministic
dynamics without the Euler layout, or an ensemble; LayerNorm + LeakyReLU model trunks, an
``EnsembleQ`` critic and a ``direct`` future policy, all frozen) and nothing asks for the recorded
rollout.

Shapes: N = K·B rows · E model members · C critics · M = 2E + C stacked networks · H hidden width ·
S state · A action dims.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mbplan.distributions import _LOG_SQRT_2PI, ACTION_EPS, LOGDET_EPS, uniform_log_prob
from mbplan.models.critic import EnsembleQ
from mbplan.models.dynamics import Dynamics, Reward
from mbplan.models.ensemble import (
    EnsembleDynamics,
    EnsembleReward,
    member_of_row,
    member_rows,
    select_members,
    unmember_rows,
)
from mbplan.planners.direct import DirectPlanner

aten = torch.ops.aten

#: How a step's N rows meet the E model members: ``one`` (a single model), ``mean`` (every member on
#: every row, their mean), ``select`` (every member on every row, row k·B + b keeps member k mod E:
#: fixed propagation when κ > 0 needs every member's prediction, or E does not divide K), ``split``
#: (fixed propagation: member e runs only the K/E·B rows of samples k ≡ e (mod E)).
MODES = ("one", "mean", "select", "split")


@dataclass
class _Layer:
    """One stacked layer: z = x·w + b for members lo:hi; w [M, in, out], w_t its transpose.

    w_t is a view of w, not a copy: the backward reads the bytes the forward read. At a few rows
    per member the products are bound by reading the weights (an ensemble's do not fit in L2), so
    a transposed copy would double what a plan reads.
    """

    w: Tensor
    w_t: Tensor
    b: Tensor


@dataclass
class _Trunk:
    """Tape of one stacked trunk pass (members lo:hi) for the backward pass."""

    lo: int
    hi: int
    n_ln: int  # members among lo:hi with LayerNorm (they come first)
    saved: list[tuple]  # per hidden layer: (z, mean, rstd, LeakyReLU input, ReLU output)


@dataclass
class _PolicyTape:
    """What the backward pass of one future-policy call needs (all [N, ·])."""

    h1: Tensor
    h2: Tensor
    pre_grad: Tensor  # ∂a/∂u on the clamp's pass-through set: (1 − tanh²)·[|tanh| ≤ 1 − eps]
    kl_pre_grad: Tensor  # ∂/∂u of the KL term times its constant adjoint
    scale_eps: Tensor  # σ·ε = ∂u/∂log σ
    raw_grad: Tensor  # ∂log σ/∂raw of the soft clamp


def _linear_t(layer: nn.Linear) -> tuple[Tensor, Tensor]:
    """(Wᵀ [in, out], b [out]) of an nn.Linear."""
    return layer.weight.detach().t(), layer.bias.detach()


def _pairs(weights: Tensor, biases: Tensor) -> list[tuple[Tensor, Tensor]]:
    """[(w_e, b_e)] of E stacked members: weights [E, ...], biases [E, 1, out] → b_e [out]."""
    return list(zip(weights.detach(), biases.detach()[:, 0], strict=True))


#: A model's members, layer by layer: per layer (1, 2, head) the members' (W [in, out], b [out]);
#: per hidden layer the members' LayerNorm (γ [H], β [H]); and (LeakyReLU slope, LayerNorm eps).
_Members = tuple[list[list[tuple[Tensor, Tensor]]], list[list[tuple[Tensor, Tensor]]], tuple]


def _model_members(model: nn.Module) -> _Members | None:
    """The members of a single model (one) or an ensemble (E), or None for another form.

    A trunk must be exactly 2 × (Linear with bias → affine LayerNorm → LeakyReLU) → Linear with
    bias (batched: ``EnsembleLinear`` → ``EnsembleLayerNorm``), with one slope and one eps.
    """
    ensemble = isinstance(model, EnsembleDynamics | EnsembleReward)
    net = model.net.net if ensemble else model.net
    linear, norm = (type(net[0]), type(net[1])) if ensemble else (nn.Linear, nn.LayerNorm)
    if [type(m) for m in net] != [linear, norm, nn.LeakyReLU] * 2 + [linear]:
        return None
    linears, norms = [net[0], net[3], net[6]], [net[1], net[4]]
    if any(m.bias is None for m in linears) or any(m.weight is None for m in linears):
        return None
    if any(m.weight is None or m.bias is None for m in norms):
        return None
    if net[2].negative_slope != net[5].negative_slope or norms[0].eps != norms[1].eps:
        return None
    if ensemble:  # weights [E, in, out], biases [E, 1, out], affines [E, 1, H]
        layers = [_pairs(m.weight, m.bias) for m in linears]
        lns = [_pairs(m.weight[:, 0], m.bias) for m in norms]
    else:
        if any(len(m.normalized_shape) != 1 for m in norms):
            return None
        layers = [[_linear_t(m)] for m in linears]
        lns = [[(m.weight.detach(), m.bias.detach())] for m in norms]
    return layers, lns, (float(net[2].negative_slope), float(norms[0].eps))


@dataclass(frozen=True)
class RolloutSettings:
    """The scalars of Q̂_MB: horizon H, pessimism β, discount γ, Retrace λ, the future KL's α.

    For an ensemble also its propagation and pessimism κ (as in
    :class:`~mbplan.model_value.ModelValue`).
    """

    horizon: int
    beta: float
    gamma: float
    lam: float
    alpha: float | Tensor
    propagation: str = "fixed"
    kappa: float = 0.0


class FusedRollout:
    """Q̂_MB(s, a_0) of a :class:`~mbplan.model_value.ModelValue` with a hand-written backward.

    Build with :meth:`from_networks`, which returns None when the networks are of another form.
    It holds copies of the weights (``ModelValue`` rebuilds it when they change). Stacked members:
    dynamics 0…E−1, reward E…2E−1, critics 2E…; the first 2E use LayerNorm.
    """

    def __init__(
        self,
        settings: RolloutSettings,
        policy: nn.Module,
        slope: float,
        ln_eps: float,
        layers: list[_Layer],
        ln: list[tuple],
        n_members: int,
        delta_std: Tensor,
    ):
        self.settings = settings
        self.slope, self.ln_eps = slope, ln_eps
        self.layers = layers  # hidden 1, hidden 2, head
        self.ln = ln  # per hidden layer: (γ [2E, 1, H], β [2E, 1, H])
        self.n_members = n_members  # E
        self.n_model = 2 * n_members  # stacked model members (dynamics, then reward)
        self.n_critics = layers[0].w.shape[0] - self.n_model  # C
        self.delta_std = delta_std  # σ_Δ [S]: the disagreement's units
        self.policy = [tuple(x.clone() for x in _linear_t(policy.net[i])) for i in (0, 2, 4)]
        self.policy_w = [w.t() for w, _ in self.policy]  # [out, in] for the backward
        self.log_scale_min = policy.bounds.log_scale_min.detach().clone()
        self.log_scale_max = policy.bounds.log_scale_max.detach().clone()
        self.log_scale_span = self.log_scale_max - self.log_scale_min
        A = policy.action_dim
        self.kl_const = -A * _LOG_SQRT_2PI - uniform_log_prob(A)  # of log π(a) − log p(a)
        self.ln_shape = [layers[0].w.shape[-1]]
        self._views = self._member_views()  # (lo, hi) → layers and LayerNorm of members lo:hi

    @classmethod
    def from_networks(
        cls,
        dyn: nn.Module,
        rew: nn.Module,
        critic: nn.Module,
        policy: nn.Module,
        settings: RolloutSettings,
    ) -> FusedRollout | None:
        """Stack frozen dynamics, reward, critics and future policy, or None for another form."""
        if getattr(dyn, "euler", True) is not None:
            return None
        # Exact classes: a subclass may evaluate differently.
        if type(policy) is not DirectPlanner or type(critic) is not EnsembleQ:
            return None
        single = type(dyn) is Dynamics and type(rew) is Reward
        ensemble = type(dyn) is EnsembleDynamics and type(rew) is EnsembleReward
        if not (single or ensemble) or (ensemble and dyn.n_members != rew.n_members):
            return None
        if len(critic.hidden) != 2 or critic.n_members < 2:
            return None
        if [type(m) for m in policy.net] != [nn.Linear, nn.ReLU] * 2 + [nn.Linear]:
            return None
        if any(policy.net[i].bias is None for i in (0, 2, 4)):
            return None
        parts = [_model_members(m) for m in (dyn, rew)]
        if parts[0] is None or parts[1] is None or parts[0][2] != parts[1][2]:
            return None  # another form, or dynamics and reward differ in slope or eps
        modules = [dyn, rew, critic, policy]
        if any(p.requires_grad for m in modules for p in m.parameters()):
            return None
        widths = {critic.hidden[0].weight.shape[-1]} | {w.shape[-1] for w, _ in parts[0][0][0]}
        widths |= {w.shape[-1] for w, _ in parts[1][0][0]}
        if len(widths) != 1:
            return None
        S = dyn.state_dim

        # Hidden layer 1 with each model's input standardisation folded in:
        # ((x − m)/σ)·Wᵀ + b = x·(Wᵀ/σ) + (b − (m/σ)·Wᵀ).
        w1, b1 = [], []
        for model, (layers, _, _) in zip((dyn, rew), parts, strict=True):
            mean, std = model.inputs.mean, model.inputs.std
            for w, b in layers[0]:
                w1.append(w / std[:, None])
                b1.append(b - (mean / std) @ w)
        w1 += list(critic.hidden[0].weight.detach())
        b1 += [bias[0] for bias in critic.hidden[0].bias.detach()]
        w2 = [w for p in parts for w, _ in p[0][1]] + list(critic.hidden[1].weight.detach())
        b2 = [b for p in parts for _, b in p[0][1]] + [b[0] for b in critic.hidden[1].bias.detach()]
        # Heads padded to S outputs: dynamics Δ·σ_Δ, reward·scale + offset, critics' Q.
        sigma = dyn.delta_scale.std
        w3 = [w * sigma for w, _ in parts[0][0][2]]
        b3 = [b * sigma for _, b in parts[0][0][2]]
        w3 += [F.pad(w * rew.scale, (0, S - 1)) for w, _ in parts[1][0][2]]
        b3 += [F.pad(b * rew.scale + rew.offset, (0, S - 1)) for _, b in parts[1][0][2]]
        w3 += [F.pad(w, (0, S - 1)) for w in critic.head.weight.detach()]
        b3 += [F.pad(b[0], (0, S - 1)) for b in critic.head.bias.detach()]
        layers = []
        for ws, bs in ((w1, b1), (w2, b2), (w3, b3)):
            w = torch.stack(ws).contiguous()  # (M, in, out)
            layers.append(_Layer(w, w.transpose(1, 2), torch.stack(bs)[:, None]))
        ln = []
        for i in range(2):
            pairs = parts[0][1][i] + parts[1][1][i]
            gamma = torch.stack([g for g, _ in pairs])[:, None]  # (2E, 1, H)
            beta = torch.stack([b for _, b in pairs])[:, None]
            ln.append((gamma, beta))
        slope, eps = parts[0][2]
        E = len(parts[0][0][0])
        return cls(settings, policy, slope, eps, layers, ln, E, sigma.detach().clone())

    # ---------------------------------------------------------------- stacked trunks

    def _member_views(self) -> dict[tuple[int, int], tuple]:
        """The layers and LayerNorm (γ, β) of every member range a step runs, as views.

        Made once here (not on first use) so that compiled code never sees this dict change.
        """
        M, n_model = self.layers[0].w.shape[0], self.n_model
        views = {}
        for lo, hi in ((0, M), (0, n_model), (n_model, M)):  # all, the models, the critics
            n_ln = max(0, min(hi, n_model) - lo)
            layers = [_Layer(x.w[lo:hi], x.w_t[lo:hi], x.b[lo:hi]) for x in self.layers]
            ln = [(g[lo : lo + n_ln], b[lo : lo + n_ln]) for g, b in self.ln]
            views[(lo, hi)] = (layers, ln)
        return views

    def _members(self, lo: int, hi: int) -> tuple[list[_Layer], list[tuple[Tensor, Tensor]]]:
        """The layers and LayerNorm (γ, β) of members lo:hi (views)."""
        return self._views[(lo, hi)]

    def _trunk(self, x: Tensor, lo: int, hi: int) -> tuple[Tensor, _Trunk]:
        """Members lo:hi on x [N, S+A] (shared) or [hi − lo, n, S+A]: outputs [hi − lo, ·, S]."""
        n_ln = max(0, min(hi, self.n_model) - lo)
        tape = _Trunk(lo, hi, n_ln, [])
        layers, ln = self._members(lo, hi)
        h = x.expand(hi - lo, *x.shape) if x.ndim == 2 else x  # (m, N, S+A)
        for i, layer in enumerate(layers[:2]):
            z = torch.baddbmm(layer.b, h, layer.w)  # (m, N, H)
            zl = z if n_ln == hi - lo else z[:n_ln]
            mean = rstd = pre = out = None
            parts = []
            if n_ln:
                gamma, beta = ln[i]
                xhat, mean, rstd = torch.native_layer_norm(
                    zl, self.ln_shape, None, None, self.ln_eps
                )
                pre = torch.addcmul(beta, xhat, gamma)
                parts.append(F.leaky_relu(pre, self.slope))
            if n_ln < hi - lo:
                out = (z if n_ln == 0 else z[n_ln:]).relu()
                parts.append(out)
            h = parts[0] if len(parts) == 1 else torch.cat(parts)
            tape.saved.append((zl, mean, rstd, pre, out))
        return torch.baddbmm(layers[2].b, h, layers[2].w), tape

    def _trunk_backward(self, g: Tensor, tape: _Trunk) -> Tensor:
        """Each member's input gradient [hi − lo, N, S+A] from output gradients [hi − lo, N, S]."""
        lo, hi, n_ln = tape.lo, tape.hi, tape.n_ln
        layers, ln = self._members(lo, hi)
        g = torch.bmm(g, layers[2].w_t)  # (m, N, H)
        for i in (1, 0):
            z, mean, rstd, pre, out = tape.saved[i]
            parts = []
            if n_ln:
                gl = g if n_ln == hi - lo else g[:n_ln]
                gl = aten.leaky_relu_backward(gl, pre, self.slope, False)
                gl = gl * ln[i][0]  # through the affine γ
                mask = [True, False, False]  # input gradient only
                parts.append(
                    aten.native_layer_norm_backward(
                        gl, z, self.ln_shape, mean, rstd, None, None, mask
                    )[0]
                )
            if n_ln < hi - lo:
                parts.append(aten.threshold_backward(g if n_ln == 0 else g[n_ln:], out, 0))
            g = parts[0] if len(parts) == 1 else torch.cat(parts)
            g = torch.bmm(g, layers[i].w_t)  # (m, N, in)
        return g  # (m, N, S+A)

    # ---------------------------------------------------------------- future policy

    def _policy(
        self, s: Tensor, eps: Tensor, g_kl: float, grad: bool
    ) -> tuple[Tensor, Tensor, _PolicyTape | None]:
        """a = tanh(μ + σ·ε) and log π(a|s) without its constant Σ(−ε²/2 − log √2π).

        Args:
            s: States [N, S].
            eps: Noise ε [N, A].
            g_kl: The constant adjoint of log π in Q̂ (for the tape).
            grad: Keep the tape for :meth:`_policy_backward`.
        """
        (w1, b1), (w2, b2), (w3, b3) = self.policy
        h1 = torch.addmm(b1, s, w1).relu_()
        h2 = torch.addmm(b2, h1, w2).relu_()
        loc, raw = torch.addmm(b3, h2, w3).chunk(2, -1)  # (N, A) each
        # Soft clamp of log σ: m + softplus((M − m) − softplus(M − raw))
        outer = F.softplus(self.log_scale_max - raw)
        soft = self.log_scale_span - outer
        log_scale = F.softplus(soft) + self.log_scale_min
        scale_eps = log_scale.exp() * eps
        tanh = torch.tanh(loc + scale_eps)
        one_minus = 1 - tanh.square()
        log_det_arg = one_minus + LOGDET_EPS
        log_prob = -(torch.log(log_det_arg) + log_scale).sum(-1)  # (N,)
        actions = tanh.clamp(-1 + ACTION_EPS, 1 - ACTION_EPS)
        if not grad:
            return actions, log_prob, None
        # d(−log det)/du = 2·tanh·(1 − tanh²)/(1 − tanh² + eps); d softplus = sigmoid
        kl_pre_grad = (2 * g_kl) * tanh * one_minus / log_det_arg
        pre_grad = one_minus * (tanh.abs() <= 1 - ACTION_EPS)
        raw_grad = torch.sigmoid(soft) * torch.sigmoid(self.log_scale_max - raw)
        return actions, log_prob, _PolicyTape(h1, h2, pre_grad, kl_pre_grad, scale_eps, raw_grad)

    def _policy_backward(self, g_action: Tensor, g_kl: float, tape: _PolicyTape) -> Tensor:
        """State gradient [N, S] from ∂/∂a [N, A] and the KL term's constant adjoint ``g_kl``."""
        g_pre = torch.addcmul(tape.kl_pre_grad, g_action, tape.pre_grad)  # (N, A)
        g_raw = (g_pre * tape.scale_eps).sub_(g_kl).mul_(tape.raw_grad)  # via log σ
        w1, w2, w3 = self.policy_w
        g = aten.threshold_backward(torch.cat([g_pre, g_raw], -1).mm(w3), tape.h2, 0)
        g = aten.threshold_backward(g.mm(w2), tape.h1, 0)
        return g.mm(w1)

    # ---------------------------------------------------------------- model members and rows

    def mode(self, groups: int) -> str:
        """How a rollout of K = ``groups`` samples per state meets the members (:data:`MODES`)."""
        E, v = self.n_members, self.settings
        if E == 1:
            return "one"
        if v.propagation == "mean":
            return "mean"
        return "select" if v.kappa > 0 or groups % E else "split"

    def _combine(self, out: Tensor, mode: str, groups: int) -> Tensor:
        """The rows' predictions [N, ·] from the members' outputs [E, rows, ·] (rows N or N/E)."""
        if mode == "one":
            return out[0]
        if mode == "mean":
            return out.mean(0)
        if mode == "split":  # rows are member-major (see forward): member e's rows are a block
            return out.flatten(0, 1)
        return select_members(out, groups)

    def _uncombine(self, g: Tensor, mode: str, groups: int) -> Tensor:
        """Adjoint of :meth:`_combine`: the members' output gradients [E, rows, D] from g [N, D]."""
        E = self.n_members
        if mode == "one":
            return g[None]
        if mode == "mean":
            return (g / E).expand(E, *g.shape)
        if mode == "split":
            return g.unflatten(0, (E, -1))
        N = g.shape[0]
        out = g.new_zeros(E, *g.shape)
        out[member_of_row(N, groups, E, g.device), torch.arange(N, device=g.device)] = g
        return out

    def _disagreement(self, d: Tensor) -> tuple[Tensor, Tensor]:
        """u = ‖std over members of Δ/σ_Δ‖₂ [N] from the members' Δ·σ_Δ [E, N, S], and ∂u/∂(Δ·σ_Δ).

        As :meth:`~mbplan.models.ensemble.EnsembleDynamics.disagreement` (σ of s + Δ·σ_Δ is that
        of Δ·σ_Δ).
        """
        E = d.shape[0]
        z = d / self.delta_std  # (E, N, S)
        dev = z - z.mean(0)
        u = (dev.square().sum(0) / (E - 1)).sum(-1).sqrt()  # (N,)
        grad = dev / ((E - 1) * u.clamp_min(1e-30)[:, None] * self.delta_std)  # (E, N, S)
        return u, grad

    # ---------------------------------------------------------------- rollout

    def coefficients(self) -> tuple[list[float], list[float], list[float]]:
        """Retrace as a linear form: Q̂ = Σ_t w_t r_t + Σ_{t≥1} c_t Q_t − Σ_{t≥1} k_t KL_t.

        w_t = (γλ)^t, c_t = γ w_{t−1} − w_t (c_H = γ w_{H−1}; Q_0 cancels), k_t = γ w_{t−1}.
        An ensemble's pessimism enters with r_t: r_t − κ·u_t.
        """
        v = self.settings
        H, gamma = v.horizon, v.gamma
        w = [(gamma * v.lam) ** t for t in range(H)]
        c = [0.0] + [gamma * w[t - 1] - w[t] for t in range(1, H)] + [gamma * w[H - 1]]
        return w, c, [0.0] + [gamma * w[t - 1] for t in range(1, H + 1)]

    def noise(self, actions: Tensor, generator) -> list[Tensor]:
        """The future policy's noise ε_1 … ε_H [N, A], drawn as ``ModelValue`` draws it."""
        like = {"dtype": actions.dtype, "device": actions.device}
        shape = (1, *actions.shape)
        H = self.settings.horizon
        return [torch.randn(shape, generator=generator, **like)[0] for _ in range(H)]

    def _passes(self, x: Tensor, t: int, critics: bool, mode: str, groups: int) -> list[tuple]:
        """The stacked trunk passes of step t on x [N, S+A]: [(outputs [m, rows, S], tape)].

        The models run at steps t < H, the critics where ``critics``. One pass over every member
        needed, except with ``split`` rows: the models on their members' rows, the critics on all.
        """
        has_models = t < self.settings.horizon
        lo = 0 if has_models else self.n_model
        hi = self.n_model + self.n_critics if critics else self.n_model
        if mode != "split" or not has_models:
            return [self._trunk(x, lo, hi)]
        rows = x.unflatten(0, (self.n_members, -1))  # (E, N/E, S+A): rows are member-major
        passes = [self._trunk(torch.cat([rows, rows]), 0, self.n_model)]  # dynamics and reward
        if critics:
            passes.append(self._trunk(x, self.n_model, hi))
        return passes

    def forward(
        self,
        states: Tensor,
        actions: Tensor,
        noise: list[Tensor],
        grad: bool = True,
        alpha: float | None = None,
        groups: int = 1,
    ) -> tuple[Tensor, list]:
        """Q̂_MB for rows states [N, S], actions [N, A], noise ε_1 … ε_H: values [N], tape.

        ``alpha`` (the future steps' KL weight) defaults to the value's; pass it as a float to keep
        a tensor α's ``float()`` out of compiled code. ``groups`` is K (row k·B + b = sample k of
        state b): an ensemble's members follow the samples. With ``split`` rows the rollout runs
        member-major (row e·N/E + i is member e's i-th row); values and the backward's ∂/∂a_0
        come back in the callers' row order.
        """
        v = self.settings
        H, beta = v.horizon, v.beta
        alpha = float(v.alpha) if alpha is None else alpha
        w, c, k = self.coefficients()
        E, C, n_model = self.n_members, self.n_critics, self.n_model
        mode = self.mode(groups)
        kappa = v.kappa if E > 1 else 0.0  # one member has no disagreement
        s, a = states, actions
        if mode == "split":  # member-major rows for the whole rollout, regrouped once
            s, a = (member_rows(x, E, groups).flatten(0, 1) for x in (states, actions))
            A = actions.shape[-1]  # noise [N, A] × H, regrouped as one [N, H·A]
            noise = member_rows(torch.cat(noise, -1), E, groups).flatten(0, 1).split(A, -1)
        terms, coef, tape = [], [], []  # Q̂ = Σ coef·terms
        for t in range(H + 1):
            critics = c[t] != 0  # c_t = 0: no critics (t = 0); the last step: critics only
            if t == H and not critics:
                break
            passes = self._passes(torch.cat([s, a], -1), t, critics, mode, groups)
            step = {"passes": [p[1] for p in passes], "t": t, "mode": mode, "groups": groups}
            if critics:
                out = passes[-1][0]
                q = out[out.shape[0] - C :, :, 0]  # (C, N)
                mean = q.mean(0)
                dev = q - mean
                sd = torch.sqrt(dev.square().sum(0) / (C - 1) + 1e-6)
                terms.append(torch.add(mean, sd, alpha=-beta))  # pessimistic Q̂_t
                coef.append(c[t])
                if grad:  # ∂(c_t·Q̂_t)/∂Q_e, for the backward pass
                    step["dq"] = (
                        torch.addcdiv(torch.full_like(dev, 1 / C), dev, sd, value=-beta / (C - 1))
                        * c[t]
                    )
            if t < H:
                out = passes[0][0]  # (2E + ·, rows, S)
                terms.append(self._combine(out[E:n_model, :, 0], mode, groups))  # r_t
                coef.append(w[t])
                if kappa:  # r_t − κ·u_t, u_t the members' disagreement on s_{t+1}
                    u, step["du"] = self._disagreement(out[:E])
                    terms.append(u)
                    coef.append(-kappa * w[t])
                s = s + self._combine(out[:E], mode, groups)
                g_kl = -k[t + 1] * alpha
                a, log_prob, step["policy"] = self._policy(s, noise[t], g_kl, grad)
                terms.append(log_prob - noise[t].square().sum(-1) * 0.5)
                coef.append(g_kl)
                step["g_kl"] = g_kl
                step["kappa"] = kappa
            tape.append(step)
        # Constants left out of the terms: Σ g_kl·(−A·log √2π − log p(a))
        const = sum(step.get("g_kl", 0.0) for step in tape) * self.kl_const
        weights = torch.tensor(coef, dtype=states.dtype, device=states.device)
        values = torch.stack(terms).T.mv(weights) + const  # (N,)
        if mode == "split":
            values = unmember_rows(values.view(E, -1, 1), groups)[:, 0]
        return values, tape

    def _model_grad(self, step: dict, g_state: Tensor, w_t: float) -> Tensor:
        """The model members' output gradients [2E, rows, S] of step t from ∂/∂s_{t+1} [N, S]."""
        mode, groups = step["mode"], step["groups"]
        g_dyn = self._uncombine(g_state, mode, groups)  # (E, rows, S)
        if "du" in step:
            g_dyn = g_dyn - (step["kappa"] * w_t) * step["du"]
        g_rew = self._uncombine(g_state.new_full((g_state.shape[0], 1), w_t), mode, groups)
        return torch.cat([g_dyn, F.pad(g_rew, (0, g_state.shape[1] - 1))])

    def backward(self, tape: list, actions: Tensor, n_state: int) -> Tensor:
        """∂Q̂_MB/∂a_0 [N, A] for unit output gradients (the backward of every row is linear)."""
        w = self.coefficients()[0]
        N = actions.shape[0]
        n_model = self.n_model
        # ∂/∂s and ∂/∂a of the step after the one being processed (zero past the last trunk)
        g_state = actions.new_zeros(N, n_state)
        g_action = torch.zeros_like(actions)
        for step in reversed(tape):
            t = step["t"]
            if "policy" in step:  # a_{t+1} and its KL term came from the future policy on s_{t+1}
                g_state = g_state + self._policy_backward(g_action, step["g_kl"], step["policy"])
            g_x = None
            for trunk in step["passes"]:
                rows = N if trunk.lo >= n_model or step["mode"] != "split" else N // self.n_members
                g_out = g_state.new_zeros(trunk.hi - trunk.lo, rows, n_state)  # (m, rows, S)
                if trunk.lo == 0:
                    g_out[:n_model] = self._model_grad(step, g_state, w[t])
                if "dq" in step and trunk.hi > n_model:
                    g_out[max(n_model - trunk.lo, 0) :, :, 0] = step["dq"]
                g_in = self._trunk_backward(g_out, trunk)  # (m, rows, S+A)
                if rows != N:  # split rows: dynamics and reward member e read the same rows
                    E = self.n_members
                    g_in = (g_in[:E] + g_in[E:]).flatten(0, 1)  # member-major rows
                else:
                    g_in = g_in.sum(0)
                g_x = g_in if g_x is None else g_x + g_in  # (N, S+A)
            g_state = g_state + g_x[:, :n_state]
            g_action = g_x[:, n_state:]
        if tape and tape[0]["mode"] == "split":  # back to the callers' row order
            g_action = unmember_rows(g_action.unflatten(0, (self.n_members, -1)), tape[0]["groups"])
        return g_action


class _FusedQ(torch.autograd.Function):
    """Q̂_MB(s, a_0) with the hand-written input gradient of :class:`FusedRollout`."""

    @staticmethod
    def forward(
        ctx, actions: Tensor, fused: FusedRollout, states: Tensor, generator, groups: int
    ) -> Tensor:
        grad = ctx.needs_input_grad[0]
        noise = fused.noise(actions, generator)
        values, tape = fused.forward(states, actions, noise, grad, groups=groups)
        ctx.fused, ctx.tape, ctx.n_state = fused, tape, states.shape[-1]
        ctx.save_for_backward(actions)
        return values

    @staticmethod
    def backward(ctx, grad: Tensor):
        if torch.is_grad_enabled():  # create_graph=True: a silent first-order answer would be wrong
            raise RuntimeError(
                "the fused model rollout has no second-order gradient: use ModelValue(fused=False)"
            )
        (actions,) = ctx.saved_tensors
        g = ctx.fused.backward(ctx.tape, actions, ctx.n_state) * grad[:, None]
        return g, None, None, None, None


def fused_q(
    fused: FusedRollout, states: Tensor, actions: Tensor, generator, groups: int = 1
) -> Tensor:
    """Q̂_MB [N] for rows states [N, S] and first actions [N, A] (gradient to the actions only).

    Row k·B + b is sample k of state b, K = ``groups``.
    """
    return _FusedQ.apply(actions, fused, states, generator, groups)
