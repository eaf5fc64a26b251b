"""``mbplan viz surface``: Ĵ over a 2-D slice of the policy mean at one state (paper Fig. 1, 14).

At one on-policy state, Ĵ(s, λ) is evaluated on a grid of two pre-tanh mean dims μ[d0], μ[d1]
(the action is tanh μ); the other mean dims and every log σ stay at the iterative optimizer's final
λ_I. Every grid point uses the same sampling noise (the same ε for its K first actions and, for
Ĵ_MB, for the future policy's actions), so the surface is a smooth function of μ rather than a
noisy one. Marked on the contours: the direct policy's estimate f_φ(s), the iterative optimizer's
path λ_0 … λ_I (projected on the two dims), and the best grid point.

Outputs ``<out>/<stem>.csv`` (columns mu_x, mu_y, objective) and ``<out>/<stem>.png``.

Shapes: N grid points · G points per axis · K samples · A action dims · S state dims.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from einops import repeat
from torch import Tensor

from mbplan.distributions import TanhNormal, squash
from mbplan.errors import UserError
from mbplan.model_value import ModelValue
from mbplan.mpc import planner_for
from mbplan.objective import Objective
from mbplan.options import option
from mbplan.report import (
    OBJECTIVE_KINDS,
    CommonOptions,
    load,
    new_figure,
    objective_for,
    out_path,
    save_figure,
    write_csv,
)
from mbplan.viz._shared import real_state

COLUMNS = ("mu_x", "mu_y", "objective")


@dataclass
class SurfaceOptions(CommonOptions):
    """Options of ``mbplan viz surface``."""

    objective: str = option("model-free", "objective Ĵ to map", choices=OBJECTIVE_KINDS)
    state_index: int = option(0, "on-policy state (every 5th step of the direct policy)")
    dims: list[int] = option(
        None,
        "the two action dims whose pre-tanh means span the grid",
        default_factory=lambda: [0, 1],
    )
    grid: int = option(41, "grid points per axis")
    span: float = option(3.0, "grid covers ±span of the pre-tanh means (widened to fit markers)")
    horizon: int = option(5, "rollout horizon H of the model objective")
    samples: int = option(0, "samples K per grid point (0 = 10)")
    iters: int = option(0, "iterations of the iterative optimizer (0 = its default)")
    batch: int = option(512, "grid points per objective call")
    stem: str = option("viz-surface", "file name stem of the outputs")


class SharedNoise(TanhNormal):
    """A tanh-Normal for ``batch`` λs whose samples all use the same ε.

    Its rows are ``G`` groups of ``batch`` λs (G = rows / batch; 1 for the first action, K for the
    future policy inside a model rollout); ε is drawn once per group and sample and shared by the
    batch, so that every λ of the batch sees the same noise.
    """

    def __init__(self, loc: Tensor, log_scale: Tensor, batch: int):
        super().__init__(loc, log_scale)
        self.batch = batch

    def rsample_log_prob(
        self, n_samples: int, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Like :meth:`TanhNormal.rsample_log_prob`, with ε shared across the batch."""
        R, A = self.loc.shape
        G = R // self.batch
        eps = torch.randn(n_samples, G, 1, A, generator=generator, dtype=self.loc.dtype)
        eps = repeat(eps, "n g 1 a -> n (g c) a", c=self.batch)  # (n, G·batch, A)
        pre_tanh = self.loc + self.log_scale.exp() * eps
        return squash(pre_tanh), pre_tanh, self.log_prob(pre_tanh)


@contextmanager
def _shared_future_noise(objective: Objective, batch: int) -> Iterator[None]:
    """Inside, a model objective's future policy samples with :class:`SharedNoise` too."""
    value = objective.q_fn if isinstance(objective.q_fn, ModelValue) else None
    if value is None:
        yield
        return
    policy = value.future_policy

    def shared(states: Tensor) -> TanhNormal:
        dist = policy(states)
        return SharedNoise(dist.loc, dist.log_scale, batch)

    value.future_policy = shared
    try:
        yield
    finally:
        value.future_policy = policy


def evaluate_fixed_noise(
    objective: Objective, state: Tensor, loc: Tensor, log_scale: Tensor, batch: int, seed: int
) -> Tensor:
    """Ĵ(s, λ_n) at one state for N λs, every λ with the same sampling noise.

    Args:
        objective: Ĵ (model-free or model-based).
        state: The state [1, S].
        loc: Pre-tanh means μ_n, [N, A].
        log_scale: log σ_n, [N, A].
        batch: λs per objective call (the noise does not depend on it).
        seed: Seed of the shared noise.

    Returns:
        Ĵ per λ, [N]; non-finite values become −inf.
    """
    values = []
    for start in range(0, loc.shape[0], batch):
        mu, ls = loc[start : start + batch], log_scale[start : start + batch]  # (B, A)
        B = mu.shape[0]
        generator = torch.Generator().manual_seed(seed)  # same draws for every batch
        with torch.no_grad(), _shared_future_noise(objective, B):
            j = objective(state.expand(B, -1), SharedNoise(mu, ls, B), generator=generator).value
        values.append(j)
    out = torch.cat(values)  # (N,)
    return torch.where(torch.isfinite(out), out, torch.full_like(out, -torch.inf))


def run(opts: SurfaceOptions) -> None:
    """Map Ĵ over two policy-mean dims at one state; write the CSV and the contour plot."""
    if opts.grid < 2 or opts.batch < 1 or opts.span <= 0 or opts.horizon < 1:
        raise UserError("--grid must be >= 2, --batch and --horizon >= 1, --span > 0")
    if opts.iters < 0 or opts.samples < 0:
        raise UserError("--iters and --samples must be >= 0")
    setup = load(opts)
    A = setup.action_dim
    if len(opts.dims) != 2 or opts.dims[0] == opts.dims[1]:
        raise UserError(f"--dims takes two different action dims, got {opts.dims}")
    if not all(0 <= d < A for d in opts.dims):
        raise UserError(f"--dims {opts.dims} out of range: actions have {A} dims")
    dx, dy = opts.dims
    objective = objective_for(setup, opts.objective, opts.horizon, opts.samples or None)
    state = real_state(setup, opts.state_index, opts.seed).state.unsqueeze(0)  # (1, S)

    # The iterative optimizer's path and the direct estimate
    planner = planner_for(setup, "iterative", opts.objective)
    generator = torch.Generator().manual_seed(opts.seed)
    result = planner.plan(objective, state, n_iters=opts.iters or None, generator=generator)
    path = result.trace.loc[:, 0, [dx, dy]].numpy()  # (I+1, 2)
    with torch.no_grad():
        direct = setup.future_policy()(state).loc[0, [dx, dy]].numpy()  # (2,)

    # The grid: other mean dims and all log σ at λ_I
    reach = np.abs(np.vstack([path, direct[None]])).max(0) * 1.1  # (2,)
    half = np.maximum(opts.span, reach)
    G = opts.grid
    xs, ys = (torch.linspace(-float(h), float(h), G) for h in half)
    X, Y = torch.meshgrid(xs, ys, indexing="xy")  # (G, G): rows vary μ_y
    loc = result.dist.loc.expand(G * G, A).clone()  # (N, A)
    loc[:, dx], loc[:, dy] = X.reshape(-1), Y.reshape(-1)
    log_scale = result.dist.log_scale.expand(G * G, A)
    Z = evaluate_fixed_noise(objective, state, loc, log_scale, opts.batch, opts.seed)  # (N,)

    # Ĵ on the slice (same noise) at the iterative λ_I and at the direct estimate's (μ_x, μ_y)
    marks = result.dist.loc.expand(2, A).clone()
    marks[1, dx], marks[1, dy] = float(direct[0]), float(direct[1])
    j_iter, j_direct = evaluate_fixed_noise(
        objective, state, marks, result.dist.log_scale.expand(2, A), 2, opts.seed
    ).tolist()
    best = int(Z.argmax())
    bx, by, bz = float(X.reshape(-1)[best]), float(Y.reshape(-1)[best]), float(Z[best])

    rows = [
        {"mu_x": x, "mu_y": y, "objective": z}
        for x, y, z in zip(X.reshape(-1).tolist(), Y.reshape(-1).tolist(), Z.tolist(), strict=True)
    ]
    csv_path = write_csv(out_path(opts, opts.stem, ".csv"), rows, COLUMNS)

    # Contours and markers
    fig, axes = new_figure(size=(6.4, 5.2))
    ax = axes[0, 0]
    Zg = Z.reshape(G, G).numpy()
    finite = np.isfinite(Zg)
    shown = np.where(finite, Zg, np.nanmin(np.where(finite, Zg, np.nan)) if finite.any() else 0.0)
    filled = ax.contourf(X.numpy(), Y.numpy(), shown, levels=30, cmap="viridis")
    ax.contour(X.numpy(), Y.numpy(), shown, levels=10, colors="white", linewidths=0.4, alpha=0.5)
    bar = fig.colorbar(filled, ax=ax)
    bar.set_label(f"Ĵ(s, λ)  ({opts.objective} objective)")
    ax.plot(
        path[:, 0],
        path[:, 1],
        "-o",
        color="white",
        ms=4,
        lw=1.5,
        mec="black",
        mew=0.6,
        label=f"iterative λ_0 … λ_{len(path) - 1}",
    )
    ax.plot(*path[-1], "o", color="orange", ms=9, mec="black", label="iterative λ_I")
    ax.plot(*direct, "*", color="red", ms=15, mec="black", label="direct f_φ(s)")
    ax.plot(bx, by, "X", color="magenta", ms=11, mec="black", label="best grid point")
    ax.set_xlabel(f"μ[{dx}]: pre-tanh mean of action dim {dx} (action = tanh μ)")
    ax.set_ylabel(f"μ[{dy}]: pre-tanh mean of action dim {dy}")
    ax.set_title(
        f"Ĵ at on-policy state {opts.state_index} ({setup.config['env']}); other dims and σ at λ_I",
        fontsize=10,
    )
    ax.legend(loc="best", fontsize=8, framealpha=0.8)
    figures = save_figure(fig, opts, opts.stem)

    print(
        f"Ĵ ({opts.objective}) over a {G}×{G} grid of μ[{dx}], μ[{dy}] at on-policy state "
        f"{opts.state_index}: best {bz:.3f} at ({bx:.2f}, {by:.2f}); on this slice with the same "
        f"noise: iterative λ_I {j_iter:.3f}, direct estimate {j_direct:.3f}"
    )
    print(f"wrote {csv_path} and {', '.join(map(str, figures))}")


COMMAND = ("surface", "Ĵ over two policy-mean dims at one state (Fig. 1, 14)", SurfaceOptions, run)
