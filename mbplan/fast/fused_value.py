"""A fused, frozen-weight Q̂_MB(s, a_0) with a hand-written backward, for planning latency.

Same value as :class:`~mbplan.model_value.ModelValue` (to rounding; same generator draws) and the
same gradient with respect to the first actions, in a fraction of the ops. Planning evaluates Ĵ_MB
on K = 10 rows, where every op costs its fixed overhead (~5 µs here) and autograd's generic
backward takes ~3,500 of them per evaluation (~700 here). Here:

* dynamics, reward and the E critics read the same input [s, a], so their layers are stacked
  and run as one batched matmul per layer (input standardisation and output scales are folded into
  the weights);
* Retrace is linear in rewards, Q-values and KL terms, so its adjoints are constants;
* the backward pass is written out by hand (input gradients only: the weights are frozen).

Used automatically by ``ModelValue`` when its networks have the supported form (deterministic
dynamics without the Euler layout, LayerNorm + LeakyReLU model trunks, an ``EnsembleQ`` critic and a
``direct`` future policy, all frozen) and nothing asks for the recorded rollout.

Shapes: N = K·B rows · M = 2 + E stacked networks · H hidden width · S state · A action dims.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mbplan.distributions import _LOG_SQRT_2PI, ACTION_EPS, LOGDET_EPS, uniform_log_prob
from mbplan.models.critic import EnsembleQ
from mbplan.models.dynamics import Dynamics, Reward
from mbplan.planners.direct import DirectPlanner

aten = torch.ops.aten

#: Stacked members: 0 = dynamics, 1 = reward, 2… = critics. The first N_MODEL use LayerNorm.
N_MODEL = 2


@dataclass
class _Layer:
    """One stacked layer: z = x·w + b for members lo:hi; w [M, in, out], w_t its transpose."""

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


def _model_parts(
    net: nn.Sequential,
) -> tuple[list[nn.Linear], list[nn.LayerNorm], tuple[float, float]] | None:
    """Linear/LayerNorm layers and (LeakyReLU slope, LayerNorm eps) of a model trunk, or None.

    The trunk must be exactly 2 × (Linear with bias → affine LayerNorm → LeakyReLU) → Linear
    with bias, with one slope and one eps.
    """
    if [type(m) for m in net] != [nn.Linear, nn.LayerNorm, nn.LeakyReLU] * 2 + [nn.Linear]:
        return None
    linears, norms = [net[0], net[3], net[6]], [net[1], net[4]]
    if any(m.bias is None for m in linears):
        return None
    if any(m.weight is None or m.bias is None or len(m.normalized_shape) != 1 for m in norms):
        return None
    if net[2].negative_slope != net[5].negative_slope or norms[0].eps != norms[1].eps:
        return None
    return linears, norms, (float(net[2].negative_slope), float(norms[0].eps))


@dataclass(frozen=True)
class RolloutSettings:
    """The scalars of Q̂_MB: horizon H, pessimism β, discount γ, Retrace λ and the future KL's α."""

    horizon: int
    beta: float
    gamma: float
    lam: float
    alpha: float | Tensor


class FusedRollout:
    """Q̂_MB(s, a_0) of a :class:`~mbplan.model_value.ModelValue` with a hand-written backward.

    Build with :meth:`from_networks`, which returns None when the networks are of another form.
    It holds copies of the weights (``ModelValue`` rebuilds it when they change).
    """

    def __init__(
        self,
        settings: RolloutSettings,
        policy: nn.Module,
        slope: float,
        ln_eps: float,
        layers: list[_Layer],
        ln: list[tuple],
    ):
        self.settings = settings
        self.slope, self.ln_eps = slope, ln_eps
        self.layers = layers  # hidden 1, hidden 2, head
        self.ln = ln  # per hidden layer: (γ [N_MODEL, 1, H], β [N_MODEL, 1, H])
        self._views: dict[tuple[int, int], tuple] = {}
        self.policy = [tuple(x.clone() for x in _linear_t(policy.net[i])) for i in (0, 2, 4)]
        self.policy_w = [w.t() for w, _ in self.policy]  # [out, in] for the backward
        self.log_scale_min = policy.bounds.log_scale_min.detach().clone()
        self.log_scale_max = policy.bounds.log_scale_max.detach().clone()
        self.log_scale_span = self.log_scale_max - self.log_scale_min
        A = policy.action_dim
        self.kl_const = -A * _LOG_SQRT_2PI - uniform_log_prob(A)  # of log π(a) − log p(a)
        self.ln_shape = [layers[0].w.shape[-1]]

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
        if type(dyn) is not Dynamics or type(rew) is not Reward:
            return None
        if len(critic.hidden) != 2 or critic.n_members < 2:
            return None
        if [type(m) for m in policy.net] != [nn.Linear, nn.ReLU] * 2 + [nn.Linear]:
            return None
        if any(policy.net[i].bias is None for i in (0, 2, 4)):
            return None
        parts = [_model_parts(m.net) for m in (dyn, rew)]
        if parts[0] is None or parts[1] is None or parts[0][2] != parts[1][2]:
            return None  # another form, or dynamics and reward differ in slope or eps
        modules = [dyn, rew, critic, policy]
        if any(p.requires_grad for m in modules for p in m.parameters()):
            return None
        widths = {critic.hidden[0].weight.shape[-1]} | {p[0][0].out_features for p in parts}
        if len(widths) != 1:
            return None
        S = dyn.state_dim

        # Hidden layer 1 with each model's input standardisation folded in:
        # ((x − m)/σ)·Wᵀ + b = x·(Wᵀ/σ) + (b − (m/σ)·Wᵀ).
        w1, b1 = [], []
        for model, (linears, _, _) in zip((dyn, rew), parts, strict=True):
            w, b = _linear_t(linears[0])
            mean, std = model.inputs.mean, model.inputs.std
            w1.append(w / std[:, None])
            b1.append(b - (mean / std) @ w)
        w1 += list(critic.hidden[0].weight.detach())
        b1 += [bias[0] for bias in critic.hidden[0].bias.detach()]
        w2 = [_linear_t(p[0][1])[0] for p in parts] + list(critic.hidden[1].weight.detach())
        b2 = [_linear_t(p[0][1])[1] for p in parts] + [b[0] for b in critic.hidden[1].bias.detach()]
        # Heads padded to S outputs: dynamics Δ·σ_Δ, reward·scale + offset, critics' Q.
        w_dyn, b_dyn = _linear_t(parts[0][0][2])
        w_rew, b_rew = _linear_t(parts[1][0][2])
        sigma = dyn.delta_scale.std
        w3 = [w_dyn * sigma, F.pad(w_rew * rew.scale, (0, S - 1))]
        b3 = [b_dyn * sigma, F.pad(b_rew * rew.scale + rew.offset, (0, S - 1))]
        w3 += [F.pad(w, (0, S - 1)) for w in critic.head.weight.detach()]
        b3 += [F.pad(b[0], (0, S - 1)) for b in critic.head.bias.detach()]
        layers = []
        for ws, bs in ((w1, b1), (w2, b2), (w3, b3)):
            w = torch.stack(ws).contiguous()  # (M, in, out)
            layers.append(_Layer(w, w.transpose(1, 2).contiguous(), torch.stack(bs)[:, None]))
        ln = []
        for i in range(2):
            gamma = torch.stack([p[1][i].weight.detach() for p in parts])[:, None]  # (2, 1, H)
            beta = torch.stack([p[1][i].bias.detach() for p in parts])[:, None]
            ln.append((gamma, beta))
        slope, eps = parts[0][2]
        return cls(settings, policy, slope, eps, layers, ln)

    # ---------------------------------------------------------------- stacked trunks

    def _members(self, lo: int, hi: int) -> tuple[list[_Layer], list[tuple[Tensor, Tensor]]]:
        """The layers and LayerNorm (γ, β) of members lo:hi (views, made once per range)."""
        key = (lo, hi)
        if key not in self._views:
            n_ln = max(0, min(hi, N_MODEL) - lo)
            layers = [_Layer(x.w[lo:hi], x.w_t[lo:hi], x.b[lo:hi]) for x in self.layers]
            ln = [(g[lo : lo + n_ln], b[lo : lo + n_ln]) for g, b in self.ln]
            self._views[key] = (layers, ln)
        return self._views[key]

    def _trunk(self, x: Tensor, lo: int, hi: int) -> tuple[Tensor, _Trunk]:
        """Members lo:hi on x [N, S+A]: outputs [hi − lo, N, S] and the tape."""
        n_ln = max(0, min(hi, N_MODEL) - lo)
        tape = _Trunk(lo, hi, n_ln, [])
        layers, ln = self._members(lo, hi)
        h = x.expand(hi - lo, *x.shape)  # (m, N, S+A)
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
        """Input gradient [N, S+A] from output gradients g [hi − lo, N, S]."""
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
        return g.sum(0)  # (N, S+A)

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

    # ---------------------------------------------------------------- rollout

    def coefficients(self) -> tuple[list[float], list[float], list[float]]:
        """Retrace as a linear form: Q̂ = Σ_t w_t r_t + Σ_{t≥1} c_t Q_t − Σ_{t≥1} k_t KL_t.

        w_t = (γλ)^t, c_t = γ w_{t−1} − w_t (c_H = γ w_{H−1}; Q_0 cancels), k_t = γ w_{t−1}.
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

    def forward(
        self,
        states: Tensor,
        actions: Tensor,
        noise: list[Tensor],
        grad: bool = True,
        alpha: float | None = None,
    ) -> tuple[Tensor, list]:
        """Q̂_MB for rows states [N, S], actions [N, A], noise ε_1 … ε_H: values [N], tape.

        ``alpha`` (the future steps' KL weight) defaults to the value's; pass it as a float to keep
        a tensor α's ``float()`` out of compiled code.
        """
        v = self.settings
        H, beta = v.horizon, v.beta
        alpha = float(v.alpha) if alpha is None else alpha
        w, c, k = self.coefficients()
        E = self.layers[0].w.shape[0] - N_MODEL
        s, a = states, actions
        terms, coef, tape = [], [], []  # Q̂ = Σ coef·terms
        for t in range(H + 1):
            lo = N_MODEL if t == H else 0  # last step: critics only
            hi = N_MODEL if c[t] == 0 else N_MODEL + E  # c_t = 0: no critics
            if lo >= hi:
                break
            out, trunk = self._trunk(torch.cat([s, a], -1), lo, hi)  # (m, N, S)
            step = {"trunk": trunk, "t": t}
            if c[t]:
                q = out[N_MODEL - lo :, :, 0]  # (E, N)
                mean = q.mean(0)
                dev = q - mean
                sd = torch.sqrt(dev.square().sum(0) / (E - 1) + 1e-6)
                terms.append(torch.add(mean, sd, alpha=-beta))  # pessimistic Q̂_t
                coef.append(c[t])
                if grad:  # ∂(c_t·Q̂_t)/∂Q_e, for the backward pass
                    step["dq"] = (
                        torch.addcdiv(torch.full_like(dev, 1 / E), dev, sd, value=-beta / (E - 1))
                        * c[t]
                    )
            if t < H:
                terms.append(out[1, :, 0])  # r_t
                coef.append(w[t])
                s = s + out[0]
                g_kl = -k[t + 1] * alpha
                a, log_prob, step["policy"] = self._policy(s, noise[t], g_kl, grad)
                terms.append(log_prob - noise[t].square().sum(-1) * 0.5)
                coef.append(g_kl)
                step["g_kl"] = g_kl
            tape.append(step)
        # Constants left out of the terms: Σ g_kl·(−A·log √2π − log p(a))
        const = sum(step.get("g_kl", 0.0) for step in tape) * self.kl_const
        weights = torch.tensor(coef, dtype=states.dtype, device=states.device)
        return torch.stack(terms).T.mv(weights) + const, tape

    def backward(self, tape: list, actions: Tensor, n_state: int) -> Tensor:
        """∂Q̂_MB/∂a_0 [N, A] for unit output gradients (the backward of every row is linear)."""
        w = self.coefficients()[0]
        N = actions.shape[0]
        # ∂/∂s and ∂/∂a of the step after the one being processed (zero past the last trunk)
        g_state = actions.new_zeros(N, n_state)
        g_action = torch.zeros_like(actions)
        for step in reversed(tape):
            trunk, t = step["trunk"], step["t"]
            if "policy" in step:  # a_{t+1} and its KL term came from the future policy on s_{t+1}
                g_state = g_state + self._policy_backward(g_action, step["g_kl"], step["policy"])
            g_out = g_state.new_zeros(trunk.hi - trunk.lo, N, n_state)  # (m, N, S)
            if trunk.lo == 0:
                g_out[0] = g_state  # s_{t+1} = s_t + Δ_t
                g_out[1, :, 0] = w[t]
            if "dq" in step:
                g_out[N_MODEL - trunk.lo :, :, 0] = step["dq"]
            g_x = self._trunk_backward(g_out, trunk)  # (N, S+A)
            g_state = g_state + g_x[:, :n_state]
            g_action = g_x[:, n_state:]
        return g_action


class _FusedQ(torch.autograd.Function):
    """Q̂_MB(s, a_0) with the hand-written input gradient of :class:`FusedRollout`."""

    @staticmethod
    def forward(ctx, actions: Tensor, fused: FusedRollout, states: Tensor, generator) -> Tensor:
        grad = ctx.needs_input_grad[0]
        values, tape = fused.forward(states, actions, fused.noise(actions, generator), grad)
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
        return g, None, None, None


def fused_q(fused: FusedRollout, states: Tensor, actions: Tensor, generator) -> Tensor:
    """Q̂_MB [N] for rows states [N, S] and first actions [N, A] (gradient to the actions only)."""
    return _FusedQ.apply(actions, fused, states, generator)
