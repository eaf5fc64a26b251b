"""The iterative optimizer's fast loss equals the generic one-step truncated-backprop loss."""

import torch
from conftest import make, quadratic_family

import mbplan
from mbplan.planners.amortized import AmortizedPlanner


def test_fast_loss_matches_generic_truncated_backprop():
    S, A, B = 4, 3, 16
    q_fn, _ = quadratic_family(S, A, dtype=torch.float64)
    obj = mbplan.make_objective(
        lambda s, a: q_fn(s, a) + torch.sin(2 * a).sum(-1), alpha=0.1, n_samples=5
    )
    planner = make("iterative", S, A).double()
    torch.nn.init.normal_(planner.net[-1].weight, std=0.1)  # leave the zero init: non-trivial Δ
    states = torch.randn(B, S, dtype=torch.float64)
    mask = (torch.arange(B) % 5 != 0).double()

    grads, values = [], []
    for loss_fn in (planner.loss, lambda *a, **k: AmortizedPlanner.loss(planner, *a, **k)):
        planner.zero_grad()
        g = torch.Generator().manual_seed(3)
        loss, result = loss_fn(obj, states, generator=g, mask=mask, n_iters=3)
        loss.backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in planner.parameters()]))
        values.append((loss.detach(), result.trace.objective.detach()))
    assert torch.allclose(grads[0], grads[1], rtol=1e-8, atol=1e-10)
    assert torch.allclose(values[0][0], values[1][0])
    assert torch.allclose(values[0][1][1:], values[1][1][1:])
