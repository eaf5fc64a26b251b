"""DirectPlanner.loss (SAC's loss, no loop bookkeeping) equals the generic amortized loss."""

import pytest
import torch
from conftest import make, quadratic_family

import mbplan
from mbplan import fast
from mbplan.planners.amortized import AmortizedPlanner


@pytest.mark.parametrize("masked", [False, True])
def test_direct_loss_equals_the_generic_amortized_loss(masked):
    S, A, B = 4, 3, 16
    q_fn, _ = quadratic_family(S, A, dtype=torch.float64)
    obj = mbplan.make_objective(
        lambda s, a: q_fn(s, a) + torch.sin(2 * a).sum(-1), alpha=0.1, n_samples=5
    )
    planner = make("direct", S, A).double()
    torch.nn.init.normal_(planner.net[-1].weight, std=0.3)  # leave the zero init: non-trivial λ
    states = torch.randn(B, S, dtype=torch.float64)
    mask = (torch.arange(B) % 5 != 0).double() if masked else None

    grads, losses, finals = [], [], []
    for loss_fn in (planner.loss, lambda *a, **k: AmortizedPlanner.loss(planner, *a, **k)):
        planner.zero_grad()
        loss, result = loss_fn(obj, states, generator=torch.Generator().manual_seed(3), mask=mask)
        loss.backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in planner.parameters()]))
        losses.append(loss.detach())
        finals.append((result.dist.loc.detach(), result.trace.objective[-1].detach()))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-12, atol=1e-12)
    for a, b in zip(finals[0], finals[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_switch_sends_the_direct_loss_to_the_generic_one(monkeypatch):
    planner = make("direct", 3, 2)
    obj = mbplan.make_objective(lambda s, a: -a.square().sum(-1), alpha=0.1, n_samples=2)
    calls = []
    generic = AmortizedPlanner.loss

    def spy(self, *args, **kwargs):
        calls.append(1)
        return generic(self, *args, **kwargs)

    monkeypatch.setattr(AmortizedPlanner, "loss", spy)
    planner.loss(obj, torch.randn(4, 3))
    assert calls == []
    with fast.disabled():
        planner.loss(obj, torch.randn(4, 3))
    assert calls == [1]
