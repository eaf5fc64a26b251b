"""Every on-disk format of mbplan, all in one place: safetensors for tensors, JSON for the rest.

* **Run checkpoint** ``RUN/ckpt-<step>/``: weights, optimizer state, replay buffer and RNG state
  (``<group>.safetensors``), counters and settings (``meta.json``); ``RUN/latest`` names the newest.
  It is written whole under a temporary name and renamed into place, then ``latest`` is replaced,
  so a process killed at any moment leaves every completed checkpoint intact.
* **Model folder** ``RUN/model/`` and **optimizer folders** ``RUN/optimizers/<objective>/``:
  ``weights.safetensors`` + ``meta.json`` (from ``fit-model`` and ``fit-optimizer``).
* **Export bundle** (``mbplan export``) and the **bundled default** (``mbplan/data/default``): the
  newest checkpoint's weights without replay or optimizer state, plus model and optimizers.
* **Plans file** (``mbplan plan --save-plans``): one safetensors key per tensor per step.

Every write goes through :func:`atomic_path` (a temp file beside the target, fsync, rename), so a
crash never leaves a half-written file under a final name. Loading never unpickles.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from mbplan.agent import Agent
from mbplan.errors import UserError
from mbplan.models.dynamics import Dynamics, EulerSpec, Reward
from mbplan.options import TrainOptions
from mbplan.planners import DirectPlanner, IterativePlanner

LATEST = "latest"
PREFIX = "ckpt-"
#: The objectives an optimizer folder can be fitted on (``RUN/optimizers/<objective>``).
OBJECTIVES = ("model-free", "model")
#: Name of the bundled default inside the package's data folder.
DEFAULT_BUNDLE = "default"


# -- atomic writes -------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success, fsync it and rename it over ``path``.

    The temporary name keeps the suffix (matplotlib and imageio pick the format from it). On an
    exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        yield tmp
        if tmp.is_file():
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            if tmp.is_dir():
                shutil.rmtree(tmp)
            else:
                tmp.unlink()
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None):
    # clone: parameters may be views into one flat buffer, which safetensors refuses to share
    cpu = {
        k: v.detach().cpu().clone(memory_format=torch.contiguous_format) for k, v in tensors.items()
    }
    save_file(cpu, str(path), metadata=metadata)
    with open(path, "rb") as f:
        os.fsync(f.fileno())


# -- run checkpoints -----------------------------------------------------------------------------


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    groups: dict[str, dict[str, torch.Tensor]],
    meta: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write tensor groups and JSON metadata as checkpoint ``step``; keep the newest ``keep``.

    Args:
        run_dir: The run folder.
        step: Env step of the checkpoint (names the folder).
        groups: name → flat dict of tensors, each saved as ``<name>.safetensors``.
        meta: JSON-serialisable metadata, saved as ``meta.json``.
        keep: Completed checkpoints kept (older ones are removed after the new one is in place).

    Returns:
        The checkpoint folder.
    """
    run_dir = Path(run_dir)
    final = run_dir / f"{PREFIX}{step:09d}"
    tmp = run_dir / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, tensors in groups.items():
        _save_tensors(tensors, tmp / f"{name}.safetensors")
    atomic_write_text(tmp / "meta.json", json.dumps({**meta, "step": step}, indent=1))
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(run_dir / LATEST, final.name + "\n")
    _fsync_dir(run_dir)
    for old in completed_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def completed_checkpoints(run_dir: str | Path) -> list[Path]:
    """Completed checkpoint folders of a run, oldest first."""
    return sorted(p for p in Path(run_dir).glob(f"{PREFIX}*") if p.is_dir())


def find_checkpoint(path: str | Path) -> Path:
    """Resolve a run folder (its latest checkpoint) or a checkpoint folder.

    Raises:
        UserError: Nothing there, or no completed checkpoint in it.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    if (path / "meta.json").is_file():
        return path
    pointer = path / LATEST
    if pointer.is_file():
        candidate = path / pointer.read_text().strip()
        if (candidate / "meta.json").is_file():
            return candidate
    done = [p for p in completed_checkpoints(path) if (p / "meta.json").is_file()]
    if not done:
        raise UserError(f"no completed checkpoint in {path}")
    return done[-1]


def load_checkpoint(path: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Load every ``*.safetensors`` group and ``meta.json`` of a checkpoint (or run folder).

    Raises:
        UserError: Missing or corrupt files.
    """
    ckpt = find_checkpoint(path)
    try:
        meta = json.loads((ckpt / "meta.json").read_text())
        groups = {p.stem: load_file(str(p)) for p in sorted(ckpt.glob("*.safetensors"))}
    except (OSError, ValueError, SafetensorError) as exc:
        raise UserError(f"corrupt checkpoint {ckpt}: {exc}") from None
    if not isinstance(meta, dict):
        raise UserError(f"corrupt checkpoint {ckpt}: meta.json is not an object")
    return groups, meta


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into flat tensors and JSON-able settings."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{key}"] = value
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_tensors(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], settings: dict
) -> None:
    """Inverse of :func:`optimizer_to_tensors` (loads into ``optimizer``)."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *settings["scalars"].items()]:
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    groups = settings["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# -- agents in and out of run checkpoints --------------------------------------------------------


def agent_tensors(agent: Agent) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Weights and optimizer state as safetensors groups, plus JSON optimizer settings."""
    groups = {"weights": dict(agent.state_dict())}
    settings = {}
    for name, opt in agent.optimizers().items():
        groups[f"optim_{name}"], settings[name] = optimizer_to_tensors(opt)
    return groups, settings


def restore_agent(agent: Agent, groups: dict[str, dict[str, torch.Tensor]], meta: dict) -> None:
    """Load weights (and optimizer state when present) into ``agent``.

    Raises:
        UserError: The checkpoint does not fit this agent (other env shape, other agent kind).
    """
    try:
        agent.load_state_dict(groups["weights"])
        for name, opt in agent.optimizers().items():
            if f"optim_{name}" in groups and name in meta.get("optimizers", {}):
                optimizer_from_tensors(opt, groups[f"optim_{name}"], meta["optimizers"][name])
    except (KeyError, RuntimeError, ValueError) as exc:
        raise UserError(f"checkpoint does not fit the agent: {str(exc).splitlines()[0]}") from None


def load_agent(path: str | Path, device: str = "cpu") -> tuple[Agent, dict[str, Any]]:
    """Build the agent of a run folder or checkpoint and load its weights.

    Returns:
        (agent, the run's config dict with an ``env_spec`` entry).
    """
    groups, meta = load_checkpoint(path)
    config = meta.get("config")
    spec = meta.get("env_spec")
    if not isinstance(config, dict) or not isinstance(spec, dict):
        raise UserError(f"corrupt checkpoint {find_checkpoint(path)}: no config or env_spec")
    known = {f.name for f in fields(TrainOptions)}
    opts = TrainOptions(**{k: v for k, v in config.items() if k in known})
    agent = Agent(spec["state_dim"], spec["action_dim"], opts.agent_config()).to(device)
    restore_agent(agent, groups, meta)
    return agent, {**config, "env_spec": spec}


def replay_transitions(path: str | Path) -> dict[str, torch.Tensor]:
    """The replay buffer of a run's newest checkpoint, oldest transition first."""
    groups, _ = load_checkpoint(path)
    if "replay" not in groups or groups["replay"]["states"].shape[0] < 2:
        raise UserError(f"no replay buffer in {path}")
    return groups["replay"]


# -- folders of weights.safetensors + meta.json (model/, optimizers/<objective>/) -----------------


def save_folder(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write ``weights.safetensors`` + ``meta.json`` into ``path`` atomically (replacing it)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _save_tensors(tensors, tmp / "weights.safetensors")
    atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=1))
    old = path.with_name(f".{path.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def load_folder(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Inverse of :func:`save_folder`; :class:`UserError` when missing or corrupt."""
    path = Path(path)
    if not (path / "meta.json").is_file():
        old = path.with_name(f".{path.name}.old")  # killed between the two renames
        if (old / "meta.json").is_file():
            path = old
        else:
            raise UserError(f"not found: {path}")
    try:
        return load_file(str(path / "weights.safetensors")), json.loads(
            (path / "meta.json").read_text()
        )
    except (OSError, ValueError, SafetensorError) as exc:
        raise UserError(f"corrupt {path}: {exc}") from None


def has_folder(path: str | Path) -> bool:
    """Whether a folder of :func:`save_folder` is there (or survives under its ``.old`` name)."""
    path = Path(path)
    return path.exists() or path.with_name(f".{path.name}.old").exists()


def model_tensors(
    dynamics: Dynamics, reward: Reward, distilled: DirectPlanner | None = None
) -> dict[str, torch.Tensor]:
    """The model folder's tensors: prefixed ``dynamics.``, ``reward.`` (and ``distilled.``)."""
    out = {f"dynamics.{k}": v for k, v in dynamics.state_dict().items()}
    out.update({f"reward.{k}": v for k, v in reward.state_dict().items()})
    if distilled is not None:
        out.update({f"distilled.{k}": v for k, v in distilled.state_dict().items()})
    return out


def build_models(S: int, A: int, meta: dict[str, Any]) -> tuple[Dynamics, Reward]:
    """Empty models with the sizes and layout recorded in a model folder's meta."""
    euler = None
    if meta.get("euler"):
        euler = EulerSpec(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in meta["euler"].items()}
        )
    hidden = int(meta.get("hidden", 256))
    return Dynamics(S, A, hidden, euler), Reward(S, A, hidden)


def load_model_folder(
    path: str | Path, S: int, A: int
) -> tuple[Dynamics, Reward, DirectPlanner | None]:
    """Dynamics, reward and (for an iterative run) the distilled future policy of ``RUN/model``."""
    tensors, meta = load_folder(path)
    dynamics, reward = build_models(S, A, meta)
    load_prefixed(dynamics, tensors, "dynamics.")
    load_prefixed(reward, tensors, "reward.")
    distilled = None
    if any(k.startswith("distilled.") for k in tensors):
        distilled = DirectPlanner(S, A, int(meta.get("hidden", 256)))
        load_prefixed(distilled, tensors, "distilled.")
    return dynamics, reward, distilled


def load_optimizer_folder(path: str | Path, S: int, A: int) -> IterativePlanner:
    """The iterative optimizer of ``RUN/optimizers/<objective>``."""
    tensors, meta = load_folder(path)
    try:
        planner = IterativePlanner(S, A, **meta["hyperparameters"])
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"corrupt {path}: bad hyperparameters ({exc})") from None
    load_prefixed(planner, tensors, "")
    return planner


def load_prefixed(module: torch.nn.Module, tensors: dict[str, torch.Tensor], prefix: str) -> None:
    """Load the tensors whose names start with ``prefix`` (stripped) into ``module``."""
    state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        raise UserError(f"weights do not fit: {str(exc).splitlines()[0]}") from None


# -- lean planning bundles (mbplan export; the shipped default is one) ---------------------------


def export_bundle(run: str | Path, out: str | Path) -> Path:
    """Copy what planning needs from a run into ``out``.

    That is the newest checkpoint's weights (no replay, no optimizer state), ``model/`` and
    ``optimizers/``: a few MB for 2×256 networks; plus the run's ``config.json`` and
    ``metrics.jsonl`` (its training history, for ``mbplan viz training``).
    """
    run, out = Path(run), Path(out)
    groups, meta = load_checkpoint(run)
    lean_meta = {k: v for k, v in meta.items() if k in ("config", "env_spec", "mbplan_version")}
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out, int(meta["step"]), {"weights": groups["weights"]}, lean_meta, keep=1)
    for sub in ("model", *(f"optimizers/{o}" for o in OBJECTIVES)):
        if (run / sub).exists():
            tensors, sub_meta = load_folder(run / sub)
            (out / sub).parent.mkdir(parents=True, exist_ok=True)
            save_folder(out / sub, tensors, sub_meta)
    for name in ("config.json", "metrics.jsonl"):
        if (run / name).is_file():
            with atomic_path(out / name) as tmp:
                shutil.copyfile(run / name, tmp)
    source = {"run": str(run), "checkpoint": find_checkpoint(run).name}
    atomic_write_text(out / "source.json", json.dumps(source, indent=1))
    return out


def default_bundle() -> Path:
    """The bundled default checkpoint shipped inside the package.

    Raises:
        UserError: This build ships none.
    """
    from importlib.resources import files

    path = Path(str(files("mbplan") / "data" / DEFAULT_BUNDLE))
    if not (path / LATEST).is_file():
        raise UserError("no bundled default checkpoint in this version: pass --checkpoint RUN")
    return path


def require_run(path: str) -> Path:
    """``--checkpoint``: required, and an existing folder."""
    if not path:
        raise UserError("--checkpoint is required")
    if not Path(path).is_dir():
        raise UserError(f"run folder not found: {path}")
    return Path(path)


def run_or_default(path: str) -> Path:
    """``--checkpoint``, or the bundled default when it is not given."""
    return require_run(path) if path else default_bundle()


# -- plans files (mbplan plan --save-plans; read by mbplan viz plan) ------------------------------

#: Trace fields of each step in a plans file.
_TRACE = ("objective", "loc", "log_scale", "n_evals", "elapsed")
#: Rollout fields of each objective evaluation in a plans file.
_ROLLOUT = ("states", "actions", "rewards", "q", "kl", "value")


def save_plans(path: str | Path, plans: list[dict], metadata: dict[str, str]) -> None:
    """Write the per-step records of ``run_mpc(plans=[...])``: one safetensors key per tensor.

    Keys: ``<step>/state``, ``<step>/trace/objective``, ..., ``<step>/rollout<j>/states``
    (j = the objective evaluation, in order).
    """
    out: dict[str, torch.Tensor] = {}
    for i, p in enumerate(plans):
        key = f"{i:06d}"
        out[f"{key}/state"] = p["state"]
        out[f"{key}/action"] = p["action"]
        out[f"{key}/episode_t"] = torch.tensor([p["episode"], p["t"]])
        out[f"{key}/objective_final"] = p["objective_final"]
        for name in _TRACE:
            out[f"{key}/trace/{name}"] = getattr(p["trace"], name)
        for j, ro in enumerate(p["rollouts"] or []):
            for name in _ROLLOUT:
                out[f"{key}/rollout{j:02d}/{name}"] = getattr(ro, name)
    with atomic_path(path) as tmp:
        _save_tensors(out, tmp, metadata)


@dataclass
class PlanStep:
    """One recorded step of a plans file.

    Attributes:
        planner: The planner's name (file metadata).
        rollouts: Per objective evaluation, in order: ``states`` [H+1, K, 1, S], ``rewards`` and
            ``q`` [H(+1), K, 1].
        objective: Ĵ at λ_0 … λ_I [I+1] (Ĵ(λ_I) from the final evaluation where not traced).
        loc: μ at λ_0 … λ_I [I+1, A].
        real_states: The real state and the next ones of its episode, up to H more [≤ H+1, S].
    """

    planner: str
    rollouts: list[dict[str, torch.Tensor]]
    objective: torch.Tensor
    loc: torch.Tensor
    real_states: torch.Tensor


def load_plan_step(path: str | Path, step: int) -> PlanStep:
    """Read recorded step ``step`` of a plans file.

    Raises:
        UserError: Missing or corrupt file, or ``step`` out of range.
    """
    if not Path(path).is_file():
        raise UserError(f"plans file not found: {path}")
    try:
        with safe_open(str(path), "pt") as f:
            keys = set(f.keys())
            planner = (f.metadata() or {}).get("planner", "planner")
            steps = sorted({k.split("/")[0] for k in keys if k.endswith("/state")})
            if not 0 <= step < len(steps):
                raise UserError(f"--step must be in [0, {len(steps)}) for {path}")
            prefix = steps[step]

            def get(name: str) -> torch.Tensor:
                return f.get_tensor(f"{prefix}/{name}")

            names = sorted({k.split("/")[1] for k in keys if k.startswith(f"{prefix}/rollout")})
            rollouts = [{n: get(f"{r}/{n}") for n in ("states", "rewards", "q")} for r in names]
            objective = get("trace/objective")[:, 0].clone()  # (I+1,)
            loc = get("trace/loc")[:, 0]  # (I+1, A)
            if not torch.isfinite(objective[-1]):
                objective[-1] = get("objective_final")[0]
            episode = int(get("episode_t")[0])
            H = rollouts[0]["states"].shape[0] - 1 if rollouts else 0
            real = [get("state")]
            for later in steps[step + 1 : step + 1 + H]:
                if int(f.get_tensor(f"{later}/episode_t")[0]) != episode:
                    break
                real.append(f.get_tensor(f"{later}/state"))
    except (OSError, SafetensorError, ValueError, IndexError, KeyError) as exc:
        raise UserError(f"corrupt plans file {path}: {exc}") from None
    return PlanStep(planner, rollouts, objective, loc, torch.stack(real))
