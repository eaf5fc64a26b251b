"""The one-node tanh-Normal sample + log-prob (_SampleLogProb) equals the ops one by one."""

import math

import pytest
import torch

from mbplan.distributions import TanhNormal


def test_rsample_log_prob_matches_rsample_then_log_prob():
    dist = TanhNormal(torch.randn(5, 3), 0.3 * torch.randn(5, 3))
    a1, u1 = dist.rsample(7, torch.Generator().manual_seed(2))
    a2, u2, lp = dist.rsample_log_prob(7, torch.Generator().manual_seed(2))
    assert torch.equal(a1, a2) and torch.equal(u1, u2)
    assert torch.allclose(lp, dist.log_prob(u1), atol=1e-5)


def _sample_log_prob_by_autograd(loc, log_scale, eps):
    """The composite of plain torch ops that ``_SampleLogProb`` fuses into one node."""
    from mbplan.distributions import ACTION_EPS, LOGDET_EPS

    pre = loc + log_scale.exp() * eps
    t = torch.tanh(pre)
    normal = -0.5 * eps.square() - 0.5 * math.log(2 * math.pi)
    log_prob = (normal - torch.log(1 - t.square() + LOGDET_EPS)).sum(-1) - log_scale.sum(-1)
    return t.clamp(-1 + ACTION_EPS, 1 - ACTION_EPS), pre, log_prob


@pytest.mark.parametrize("saturated", [False, True])
def test_fused_sample_log_prob_gradients_equal_autograd(saturated):
    from mbplan.distributions import _SampleLogProb

    g = torch.Generator().manual_seed(0)
    loc = torch.randn(4, 3, generator=g, dtype=torch.float64)
    if saturated:  # tanh at the clamp: the action's gradient is cut there, log π's is not
        loc[0] = 9.0
    log_scale = 0.3 * torch.randn(4, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(5, 4, 3, generator=g, dtype=torch.float64)
    weights = [torch.randn(5, 4, 3, generator=g, dtype=torch.float64),
               torch.randn(5, 4, 3, generator=g, dtype=torch.float64),
               torch.randn(5, 4, generator=g, dtype=torch.float64)]  # fmt: skip

    def grads(fn, *outputs_used):
        x = [loc.clone().requires_grad_(), log_scale.clone().requires_grad_()]
        outs = fn(*x, eps)
        total = sum((outs[i] * weights[i]).sum() for i in outputs_used)
        return outs, torch.autograd.grad(total, x)

    for used in [(0,), (1,), (2,), (0, 2), (0, 1, 2)]:  # any subset of outputs may get gradients
        out_f, grad_f = grads(_SampleLogProb.apply, *used)
        out_r, grad_r = grads(_sample_log_prob_by_autograd, *used)
        for a, b in zip(out_f + grad_f, out_r + grad_r, strict=True):
            assert torch.allclose(a, b, rtol=1e-8, atol=1e-9), (used, (a - b).abs().max())
    if saturated:
        return
    x = (loc.requires_grad_(), log_scale.requires_grad_())
    fn = lambda m, s: _SampleLogProb.apply(m, s, eps)  # noqa: E731
    assert torch.autograd.gradcheck(fn, x)
    assert torch.autograd.gradgradcheck(fn, x)  # exact second derivatives
