"""The direct agent's model-free update with its gradients written out by hand.

Same losses, same gradients (to float rounding) and the same generator draws as
:meth:`mbplan.agent.Agent.update` runs through autograd for ``agent="direct"``,
``value="model-free"`` (DESIGN.md §5): the critic regresses on
y = r + γ(1 − terminal)[Q̂_β(s', a') − α·KL̂], the policy maximises
Ĵ = Q̂_β(s, a) − α·KL̂ with a ~ π(·|s) on the frozen target critics, and log α follows the KL
target. With SAC's K = 1 and batch 256 on a CPU, the update is a few hundred small ops; autograd
records ~85 nodes and ~900 aten calls for it, whose fixed costs take about half the time. Here
every gradient is one explicit op, written straight into the flat gradient buffer with ``out=``
(no accumulation pass), and the frozen critics' action gradient comes from their fused Jacobian
(:meth:`~mbplan.models.critic.EnsembleQ.values_and_action_jacobian`).

Shapes: B batch · S state dims · A action dims · H hidden · E critics.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mbplan.distributions import (
    _SampleLogProb,
    sample_log_prob_vjp,
    target_kl,
    uniform_log_prob,
)
from mbplan.models.critic import EnsembleQ, head_values
from mbplan.planners.direct import DirectPlanner
from mbplan.replay import Batch

_threshold_backward = torch.ops.aten.threshold_backward


@dataclass(frozen=True)
class SACParts:
    """What the direct model-free update reads and writes: networks, log α and the settings.

    Attributes:
        policy: The direct policy λ = f_φ(s) (its ``net`` and log-scale ``bounds`` are trained).
        critic: The trained critics (E ≥ 2 members).
        target_critic: The frozen target critics of Ĵ and of the critic target.
        log_alpha: The trained scalar log α.
        beta: Pessimism β of Q̂_β.
        gamma: Discount γ.
        n_samples: K samples per state in Ĵ.
    """

    policy: nn.Module
    critic: EnsembleQ
    target_critic: EnsembleQ
    log_alpha: nn.Parameter
    beta: float
    gamma: float
    n_samples: int


def supports(parts: SACParts) -> bool:
    """Whether :func:`direct_update_grads` computes this update (the networks' structure only)."""
    layers = list(getattr(parts.policy, "net", []))
    return (
        isinstance(parts.policy, DirectPlanner)
        and parts.critic.n_members >= 2
        and len(layers) == 5
        and all(isinstance(layers[i], nn.Linear) for i in (0, 2, 4))
        and all(isinstance(layers[i], nn.ReLU) for i in (1, 3))
        and len(parts.critic.hidden) == 2
    )


def _policy_forward(net: nn.Sequential, states: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """out = W3·relu(W2·relu(W1·s + b1) + b2) + b3 [B, 2A], with the hidden activations [B, H]."""
    l1, _, l2, _, l3 = net
    h1 = F.linear(states, l1.weight, l1.bias).relu_()
    h2 = F.linear(h1, l2.weight, l2.bias).relu_()
    return F.linear(h2, l3.weight, l3.bias), h1, h2


def _policy_backward(net: nn.Sequential, states: Tensor, h1: Tensor, h2: Tensor, g: Tensor) -> None:
    """Weight gradients of :func:`_policy_forward` for ∂L/∂out = g [B, 2A], into ``.grad``."""
    l1, _, l2, _, l3 = net
    for layer, x_in, h_in in ((l3, h2, h2), (l2, h1, h1), (l1, states, None)):
        torch.mm(g.t(), x_in, out=layer.weight.grad)  # (out, in)
        torch.sum(g, 0, out=layer.bias.grad)
        if h_in is not None:
            g = _threshold_backward(torch.mm(g, layer.weight), h_in, 0)  # ∂L/∂pre-activation


def _critic_grads(critic: EnsembleQ, states: Tensor, actions: Tensor, target: Tensor) -> Tensor:
    """0.5·Σ_E mean_B (Q_e(s, a) − y)²: returns the loss, writes the weight gradients."""
    E, B = critic.n_members, states.shape[0]
    (l1, l2), head = critic.hidden, critic.head
    x = torch.cat([states, actions], -1)  # (B, S+A)
    h1 = l1(x).relu_()  # (E, B, H)
    h2 = l2(h1).relu_()
    q = head_values(h2, head.weight, head.bias)  # (E, B)
    err = q - target  # (E, B)
    loss = 0.5 * err.square().sum(0).mean()
    g = (err / B).unsqueeze(1)  # ∂L/∂q as (E, 1, B)
    torch.bmm(g, h2, out=head.weight.grad.view(E, 1, -1))  # (E, 1, H) = (E, H, 1) in memory
    torch.sum(g, -1, keepdim=True, out=head.bias.grad)  # (E, 1, 1)
    g = _threshold_backward(g.transpose(1, 2) * head.weight.transpose(1, 2), h2, 0)  # (E, B, H)
    for layer, x_in, h_in in ((l2, h1, h1), (l1, x.expand(E, *x.shape), None)):
        torch.bmm(x_in.transpose(1, 2), g, out=layer.weight.grad)  # (E, in, out)
        torch.sum(g, 1, keepdim=True, out=layer.bias.grad)  # (E, 1, out)
        if h_in is not None:
            g = _threshold_backward(torch.bmm(g, layer.weight.transpose(1, 2)), h_in, 0)
    return loss


def direct_update_grads(
    parts: SACParts, batch: Batch, generator: torch.Generator | None, compiled: bool = False
) -> dict[str, Tensor]:
    """Losses of one direct, model-free update, with every trained parameter's gradient written.

    Draws the same noise, in the same order, as the autograd path (the target's a' first, then
    the policy's a). Overwrites (does not accumulate) the ``.grad`` of the critic, the policy and
    log α. Runs without autograd.

    Args:
        parts: Networks and settings that :func:`supports` this update.
        batch: Replay batch, B transitions.
        generator: Source of the sampling noise.
        compiled: Run the gradient computation through ``torch.compile`` (inductor fuses its ~200
            small ops into a few kernels: ~30% faster per update on a 2-core CPU, after a one-off
            compile of ~20 s). Falls back to eager, with a warning, if compiling fails.

    Returns:
        Detached scalar metrics, as :meth:`Agent.update` reports them (without α, which it
        reads after the step).
    """
    B, A, states = batch.states.shape[0], parts.policy.action_dim, batch.states
    noise = {"generator": generator, "dtype": states.dtype, "device": states.device}
    eps_next = torch.randn(1, B, A, **noise)  # a' ~ π(·|s') first, as the autograd path draws
    eps = torch.randn(parts.n_samples, B, A, **noise)
    global _compiled_grads
    if compiled and _compiled_grads is not False:
        try:
            if _compiled_grads is None:
                _compiled_grads = torch.compile(_grads, fullgraph=True, dynamic=False)
            return _compiled_grads(parts, batch, eps_next, eps)
        except Exception as err:  # any compiler failure: run eagerly instead
            warnings.warn(f"torch.compile failed, training eagerly: {err}", stacklevel=2)
            _compiled_grads = False
    return _grads(parts, batch, eps_next, eps)


#: The compiled :func:`_grads`: None until first asked for, False once compiling has failed.
_compiled_grads = None


def _grads(parts: SACParts, batch: Batch, eps_next: Tensor, eps: Tensor) -> dict[str, Tensor]:
    """:func:`direct_update_grads` for given noise ε' [1, B, A] and ε [K, B, A] (it compiles)."""
    cfg, planner, A = parts, parts.policy, parts.policy.action_dim
    net, bounds, critic = planner.net, planner.bounds, parts.target_critic
    states = batch.states
    K, B = eps.shape[:2]
    KB = K * B
    with torch.no_grad():
        alpha = parts.log_alpha.detach().exp()
        # One pass of the policy over [s; s'] (2B rows), then one of the frozen target critics
        # over K·B + B rows: the policy loss needs a_k ~ π(·|s) and Q̂_β(s, a_k) with its action
        # gradient (rows k·B + b), the critic target a' ~ π(·|s') and Q̂_β(s', a') (last B rows).
        both = torch.cat([states, batch.next_states])  # (2B, S)
        out, h1, h2 = _policy_forward(net, both)  # (2B, 2A), (2B, H), (2B, H)
        loc, raw = out[:, :A], out[:, A:]  # (2B, A) each
        log_scale = bounds(raw)  # the soft clamp of log σ
        noise = torch.cat([eps.reshape(KB, A), eps_next[0]])  # ((K+1)B, A)
        actions, pre_tanh, log_prob = _SampleLogProb.apply(
            torch.cat([loc[:B].repeat(K, 1), loc[B:]]),
            torch.cat([log_scale[:B].repeat(K, 1), log_scale[B:]]),
            noise.unsqueeze(0),
        )  # (1, (K+1)B, A), (1, (K+1)B, A), (1, (K+1)B)
        kl_rows = log_prob[0] - uniform_log_prob(A)  # ((K+1)B,)
        rows = torch.cat([states.repeat(K, 1), batch.next_states])  # ((K+1)B, S)
        q_all, jac = critic.values_and_action_jacobian(rows, actions[0], grad_rows=KB)
        E = q_all.shape[0]
        mean = q_all.mean(0)  # Q̂_β = mean − β·std over the members (pessimistic())
        std = ((q_all - mean).square().sum(0) / (E - 1) + 1e-6).sqrt()  # ((K+1)B,)
        q_hat = mean - cfg.beta * std

        # Critic: y = r + γ(1 − d)[Q̂_β(s', a') − α·KL̂(π(·|s') ‖ p)]
        soft = q_hat[KB:] - alpha * kl_rows[KB:]
        target = batch.rewards + cfg.gamma * (1.0 - batch.terminated) * soft  # (B,)
        critic_loss = _critic_grads(parts.critic, states, batch.actions, target)

        # Policy: −mean_B Ĵ(s, λ) + bound penalty, Ĵ = mean_K Q̂_β(s, a_k) − α·KL̂
        kl = kl_rows[:KB].view(K, B).mean(0)  # (B,)
        J = q_hat[:KB].view(K, B).mean(0) - alpha * kl
        actor_loss = -J.mean() + bounds.penalty()
        q, mean, std = q_all[:, :KB], mean[:KB], std[:KB]
        # ∂(−mean_B Ĵ)/∂q_e per sample row, through Q̂_β = mean − β·std
        g_q = ((q - mean) * (cfg.beta / ((E - 1) * std)) - 1.0 / E) / KB  # (E, KB)
        g_actions = (g_q.unsqueeze(1) * jac).sum(0).t()  # (KB, A)
        # Through the sample (rows k·B + b), then summed over the K samples of each state
        g_loc, g_log_scale, _ = sample_log_prob_vjp(
            log_scale[:B].repeat(K, 1),
            noise[None, :KB],
            pre_tanh[:, :KB],
            g_actions[None],
            None,
            (alpha / KB).expand(1, KB),  # ∂/∂log π(a_k|s), the same for every row
        )  # (KB, A) each
        g_loc, g_log_scale = g_loc.view(K, B, A).sum(0), g_log_scale.view(K, B, A).sum(0)
        # Through the soft clamp of log σ, then the bound penalty 0.01·(ΣM − Σm)
        g_raw, g_min, g_max = bounds.vjp(raw[:B], g_log_scale)
        torch.sub(g_min, 0.01, out=bounds.log_scale_min.grad)
        torch.add(g_max, 0.01, out=bounds.log_scale_max.grad)
        g_out = torch.cat([g_loc, g_raw], -1)  # ∂/∂(μ, raw log σ), (B, 2A)
        _policy_backward(net, states, h1[:B], h2[:B], g_out)

        # α towards the KL target
        kl_mean = kl.mean()
        log_alpha = parts.log_alpha
        alpha_now = log_alpha.exp()
        alpha_loss = -alpha_now * (kl_mean - target_kl(A))
        log_alpha.grad.copy_(alpha_loss)
    return {
        "critic_loss": critic_loss,
        "actor_loss": actor_loss,
        "alpha_loss": alpha_loss,
        "kl": kl_mean,
        "q_target": target.mean(),
    }
