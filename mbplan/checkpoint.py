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
import hashlib
import json
import os
import shutil
import socket
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from mbplan.agent import Agent
from mbplan.errors import UserError
from mbplan.models.dynamics import Dynamics, EulerSpec, Reward
from mbplan.models.ensemble import EnsembleDynamics, EnsembleReward
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
    try:
        save_file(cpu, str(path), metadata=metadata)
    except SafetensorError as exc:  # an I/O error inside the writer, e.g. the disk is full
        raise OSError(f"cannot write {path}: {str(exc).splitlines()[0]}") from None
    with open(path, "rb") as f:
        os.fsync(f.fileno())


# -- run folders: one writer at a time -------------------------------------------------------------

#: Files of the lock itself, ignored when asking whether a run folder is empty.
LOCK_FILES = (".lock", ".lock.owner")


@contextlib.contextmanager
def run_lock(folder: str | Path, command: str) -> Iterator[Path]:
    """Hold the run folder's lock while ``command`` writes into it (creating the folder).

    A lock file (``filelock``) guards the folder, so two mbplan processes never write into one
    run at once; the holder's pid and command are kept beside it for the error message.

    Raises:
        UserError: Another process holds the lock (names it).
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserError(f"{folder} is a file, not a run folder") from None
    lock = FileLock(str(folder / ".lock"), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        try:
            holder = (folder / ".lock.owner").read_text().strip()
        except OSError:
            holder = "another process"
        raise UserError(f"{folder} is in use by {holder}; wait for it to finish") from None
    try:
        owner = f"mbplan {command} (pid {os.getpid()} on {socket.gethostname()})"
        atomic_write_text(folder / ".lock.owner", owner)
        yield folder
    finally:
        with contextlib.suppress(OSError):
            (folder / ".lock.owner").unlink()
        lock.release()


def is_empty_folder(folder: str | Path) -> bool:
    """Whether ``folder`` is missing or holds nothing but the lock's own files."""
    folder = Path(folder)
    return not folder.exists() or all(p.name in LOCK_FILES for p in folder.iterdir())


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
    try:
        digests = {}
        for name, tensors in groups.items():
            _save_tensors(tensors, tmp / f"{name}.safetensors")
            digests[name] = file_digest(tmp / f"{name}.safetensors")
        meta = {**meta, "step": step, "sha256": digests}
        atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=1))
        _fsync_dir(tmp)
    except BaseException:  # e.g. the disk is full: leave no partial checkpoint taking space
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.is_dir() and not final.is_symlink():
        shutil.rmtree(final)
    elif final.exists() or final.is_symlink():  # a stray file under the checkpoint's name
        final.unlink()
    os.replace(tmp, final)
    atomic_write_text(run_dir / LATEST, final.name + "\n")
    _fsync_dir(run_dir)
    for old in completed_checkpoints(run_dir)[:-keep]:
        if old != final:  # never the one just written, whatever older runs left behind
            shutil.rmtree(old, ignore_errors=True)
    return final


def file_digest(path: Path) -> str:
    """SHA-256 of a file (hex), read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _verify(folder: Path, digests: Any, names: list[str]) -> None:
    """Compare the files' SHA-256 with those recorded at save time.

    Files saved before mbplan recorded digests have none and are not checked.
    """
    if digests is None:
        return
    if not isinstance(digests, dict):
        raise UserError(f"corrupt {folder}/meta.json: sha256 is not an object")
    for name in names:
        want = digests.get(name)
        if want is not None and file_digest(folder / f"{name}.safetensors") != want:
            raise UserError(
                f"corrupt checkpoint {folder}: {name}.safetensors changed since it was saved"
            )


def completed_checkpoints(run_dir: str | Path) -> list[Path]:
    """Completed checkpoint folders of a run, oldest first."""
    return sorted(p for p in Path(run_dir).glob(f"{PREFIX}*") if p.is_dir())


def find_checkpoint(path: str | Path) -> Path:
    """Resolve a run folder (its latest checkpoint) or a checkpoint folder.

    Falls back to the newest completed checkpoint when ``latest`` is missing, names something
    outside the run, or points at a checkpoint without ``meta.json`` — with a warning that says
    which checkpoint is used instead.

    Raises:
        UserError: Nothing there, or no completed checkpoint in it.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    if not path.is_dir():
        raise UserError(f"not a run or checkpoint folder: {path}")
    if (path / "meta.json").is_file():
        return path
    pointer, problem = path / LATEST, None
    if pointer.is_file():
        try:
            name = pointer.read_text().strip()
        except (OSError, UnicodeDecodeError):
            name = ""
        if not (name.startswith(PREFIX) and name[len(PREFIX) :].isdigit()):
            problem = f"{pointer} does not name a checkpoint of this run"
        elif not (path / name / "meta.json").is_file():
            problem = f"{pointer} names {name}, which is incomplete (no meta.json)"
        else:
            return path / name
    done = [p for p in completed_checkpoints(path) if (p / "meta.json").is_file()]
    if not done:
        raise UserError(f"no completed checkpoint in {path}")
    if problem is not None:
        warnings.warn(f"{problem}; using {done[-1].name} instead", stacklevel=2)
    return done[-1]


def load_checkpoint(path: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Load every ``*.safetensors`` group and ``meta.json`` of a checkpoint (or run folder).

    Raises:
        UserError: Missing or corrupt files.
    """
    ckpt = find_checkpoint(path)
    try:
        meta = json.loads((ckpt / "meta.json").read_text())
        if not isinstance(meta, dict):
            raise UserError(f"corrupt checkpoint {ckpt}: meta.json is not an object")
        files = sorted(ckpt.glob("*.safetensors"))
        _verify(ckpt, meta.get("sha256"), [p.stem for p in files])
        for name in meta.get("sha256") or {}:
            if not (ckpt / f"{name}.safetensors").is_file():
                raise UserError(f"corrupt checkpoint {ckpt}: {name}.safetensors is missing")
        groups = {p.stem: load_file(str(p)) for p in files}
    except (OSError, ValueError, SafetensorError, UnicodeDecodeError) as exc:
        raise UserError(f"corrupt checkpoint {ckpt}: {str(exc).splitlines()[0]}") from None
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


def check_tensors(
    label: str,
    tensors: dict[str, torch.Tensor],
    expected: dict[str, tuple[tuple[int, ...], torch.dtype]],
) -> None:
    """Check loaded tensors against what they will be loaded into, before any kernel sees them.

    Args:
        label: Start of the error message, naming what is loaded (``"corrupt replay.safetensors"``).
        tensors: name → loaded tensor.
        expected: name → (shape, dtype) of the tensor it replaces.

    Raises:
        UserError: A name missing or unexpected, a shape or dtype that differs, a non-finite value.
    """
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        what = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise UserError(f"{label}: {what} tensors")
    for name, (shape, dtype) in expected.items():
        t = tensors[name]
        if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
            raise UserError(
                f"{label}: {name} is {t.dtype} {tuple(t.shape)}, expected {dtype} {tuple(shape)}"
            )
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise UserError(f"{label}: {name} holds non-finite values")


def _like(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}


def _optimizer_expected(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], settings: Any
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The (shape, dtype) of each saved optimizer tensor: Adam's moments like their parameter."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    groups = settings.get("param_groups") if isinstance(settings, dict) else None
    saved_ids = [i for g in groups or [] if isinstance(g, dict) for i in g.get("params", [])]
    if not isinstance(groups, list) or saved_ids != list(range(len(params))):
        raise UserError("corrupt optimizer settings: parameter groups do not fit the agent")
    for g in groups:
        lr = g.get("lr")
        if not isinstance(lr, (int, float)) or not 0 < lr < float("inf"):
            raise UserError(f"corrupt optimizer settings: learning rate {lr!r}")
    expected = {}
    for key in tensors:
        pid, _, name = key.partition(".")
        if not pid.isdigit() or int(pid) >= len(params):
            raise UserError(f"corrupt optimizer state: unexpected tensor {key}")
        p = params[int(pid)]
        if name == "step":
            expected[key] = ((), torch.float32)
        else:  # exp_avg, exp_avg_sq, max_exp_avg_sq: one value per parameter entry
            expected[key] = (tuple(p.shape), p.dtype)
    return expected


def restore_agent(agent: Agent, groups: dict[str, dict[str, torch.Tensor]], meta: dict) -> None:
    """Validate, then load weights (and optimizer state when present) into ``agent``.

    Every tensor is checked against the agent (names, shapes, dtypes, finite values) before it
    is loaded, so a damaged file ends in a :class:`UserError`, never in a crashed kernel.

    Raises:
        UserError: The checkpoint does not fit this agent (other env shape, other agent kind), or
            it is damaged.
    """
    if "weights" not in groups:
        raise UserError("corrupt checkpoint: no weights.safetensors")
    weights = groups["weights"]
    if set(weights) != set(agent.state_dict()):
        raise UserError("checkpoint does not fit the agent: other networks (another agent kind?)")
    check_tensors("checkpoint does not fit the agent", weights, _like(agent.state_dict()))
    settings = meta.get("optimizers", {})
    if not isinstance(settings, dict):
        raise UserError("corrupt checkpoint: optimizer settings are not an object")
    for name, opt in agent.optimizers().items():
        if f"optim_{name}" in groups and name in settings:
            tensors = groups[f"optim_{name}"]
            check_tensors(f"corrupt optim_{name}.safetensors", tensors,
                          _optimizer_expected(opt, tensors, settings[name]))  # fmt: skip
    try:
        agent.load_state_dict(groups["weights"])
        for name, opt in agent.optimizers().items():
            if f"optim_{name}" in groups and name in settings:
                optimizer_from_tensors(opt, groups[f"optim_{name}"], settings[name])
    except (KeyError, RuntimeError, ValueError, TypeError, AttributeError) as exc:
        raise UserError(f"checkpoint does not fit the agent: {str(exc).splitlines()[0]}") from None


def load_agent(path: str | Path, device: str = "cpu") -> tuple[Agent, dict[str, Any]]:
    """Build the agent of a run folder or checkpoint and load its weights.

    Returns:
        (agent, the run's config dict with an ``env_spec`` entry).
    """
    ckpt = find_checkpoint(path)  # resolved once: a fallback warns once
    groups, meta = load_checkpoint(ckpt)
    config = meta.get("config")
    if not isinstance(config, dict):
        raise UserError(f"corrupt checkpoint {ckpt}: no config")
    spec = check_env_spec(meta.get("env_spec"), f"checkpoint {ckpt}")
    opts = TrainOptions.from_dict(config, f"checkpoint {ckpt}")
    agent = Agent(spec["state_dim"], spec["action_dim"], opts.agent_config()).to(device)
    restore_agent(agent, groups, meta)
    return agent, {**config, "env_spec": spec}


def check_env_spec(spec: Any, where: str) -> dict[str, Any]:
    """A saved ``env_spec`` with the keys and types planning and training read.

    Raises:
        UserError: Not an object, a key missing, or a value of the wrong type.
    """
    if not isinstance(spec, dict):
        raise UserError(f"corrupt {where}: no env_spec")
    for key, kind in (("env_id", str), ("state_dim", int), ("action_dim", int)):
        value = spec.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise UserError(f"corrupt {where}: env_spec.{key} is {value!r}")
    if spec["state_dim"] < 1 or spec["action_dim"] < 1:
        raise UserError(f"corrupt {where}: env_spec sizes must be >= 1")
    dt = spec.get("dt")
    if dt is not None and (not isinstance(dt, (int, float)) or not dt > 0):
        raise UserError(f"corrupt {where}: env_spec.dt is {dt!r}")
    return spec


def replay_transitions(path: str | Path) -> dict[str, torch.Tensor]:
    """The replay buffer of a run's newest checkpoint, oldest transition first."""
    groups, _ = load_checkpoint(path)
    if "replay" not in groups:
        raise UserError(f"no replay buffer in {path} (an exported bundle keeps none)")
    replay = groups["replay"]
    check_replay(replay)
    if replay["states"].shape[0] < 2:
        raise UserError(f"no replay buffer in {path}")
    return replay


def check_replay(replay: dict[str, torch.Tensor], S: int | None = None, A: int | None = None):
    """Check a saved replay buffer: every field, one length, float32, finite, S and A if given.

    Raises:
        UserError: A field missing or of another shape, dtype or length; non-finite values.
    """
    states = replay.get("states")
    if states is None or states.ndim != 2:
        raise UserError("corrupt replay.safetensors: no states [N, S]")
    actions = replay.get("actions")
    if actions is None or actions.ndim != 2:
        raise UserError("corrupt replay.safetensors: no actions [N, A]")
    n, S = states.shape[0], states.shape[1] if S is None else S
    A = actions.shape[1] if A is None else A
    expected = {
        "states": ((n, S), torch.float32),
        "actions": ((n, A), torch.float32),
        "rewards": ((n,), torch.float32),
        "next_states": ((n, S), torch.float32),
        "terminated": ((n,), torch.float32),
    }
    check_tensors("corrupt replay.safetensors", replay, expected)


def check_rng(rng: dict[str, torch.Tensor], names: tuple[str, ...]) -> None:
    """Check saved generator states against the size of a fresh generator's state."""
    size = tuple(torch.Generator().get_state().shape)
    check_tensors("corrupt rng.safetensors", rng, dict.fromkeys(names, (size, torch.uint8)))


def read_evals(path: str | Path) -> list[dict[str, Any]]:
    """The evaluation lines of a run's ``metrics.jsonl`` (unreadable lines skipped)."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return []
    evals = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("eval_return_mean"), (int, float)):
            evals.append(record)
    return evals


def model_fit_horizon(path: str | Path) -> int | None:
    """The open-loop horizon a model folder was checked for at fit time, if it records one.

    That is ``fit-model --horizon``: the length of the held-out errors in its ``meta.json``.
    None when the folder, its meta or the entry is missing or malformed.
    """
    path = Path(path)
    for folder in (path, path.with_name(f".{path.name}.old")):
        try:
            meta = json.loads((folder / "meta.json").read_text())
        except (OSError, ValueError):
            continue
        fit = meta.get("fit") if isinstance(meta, dict) else None
        horizon = fit.get("horizon") if isinstance(fit, dict) else None
        if isinstance(horizon, int) and not isinstance(horizon, bool) and horizon >= 1:
            return horizon
        return None
    return None


# -- folders of weights.safetensors + meta.json (model/, optimizers/<objective>/) -----------------


def save_folder(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write ``weights.safetensors`` + ``meta.json`` into ``path`` atomically (replacing it)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _save_tensors(tensors, tmp / "weights.safetensors")
        meta = {**meta, "sha256": {"weights": file_digest(tmp / "weights.safetensors")}}
        atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=1))
    except BaseException:  # e.g. the disk is full: the old folder stays, no partial one is left
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
        meta = json.loads((path / "meta.json").read_text())
        if not isinstance(meta, dict):
            raise UserError(f"corrupt {path}/meta.json: not an object")
        _verify(path, meta.get("sha256"), ["weights"])
        return load_file(str(path / "weights.safetensors")), meta
    except (OSError, ValueError, SafetensorError, UnicodeDecodeError) as exc:
        raise UserError(f"corrupt {path}: {str(exc).splitlines()[0]}") from None


def has_folder(path: str | Path) -> bool:
    """Whether a folder of :func:`save_folder` is there (or survives under its ``.old`` name)."""
    path = Path(path)
    return path.exists() or path.with_name(f".{path.name}.old").exists()


def model_tensors(
    dynamics: Dynamics | EnsembleDynamics,
    reward: Reward | EnsembleReward,
    distilled: DirectPlanner | None = None,
) -> dict[str, torch.Tensor]:
    """The model folder's tensors: prefixed ``dynamics.``, ``reward.`` (and ``distilled.``)."""
    out = {f"dynamics.{k}": v for k, v in dynamics.state_dict().items()}
    out.update({f"reward.{k}": v for k, v in reward.state_dict().items()})
    if distilled is not None:
        out.update({f"distilled.{k}": v for k, v in distilled.state_dict().items()})
    return out


def build_models(
    S: int, A: int, meta: dict[str, Any]
) -> tuple[Dynamics | EnsembleDynamics, Reward | EnsembleReward]:
    """Empty models with the sizes and layout recorded in a model folder's meta.

    ``members`` > 1 builds an ensemble (:mod:`mbplan.models.ensemble`); absent or 1, one model.
    """
    members = meta.get("members", 1)
    hidden = meta.get("hidden", 256)
    for name, value in (("members", members), ("hidden", hidden)):
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 4096:
            raise UserError(f"corrupt model meta.json: {name} is {value!r}")
    if members > 1:
        return EnsembleDynamics(S, A, members, hidden), EnsembleReward(S, A, members, hidden)
    euler = None
    if meta.get("euler"):
        euler = EulerSpec(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in meta["euler"].items()}
        )
    return Dynamics(S, A, hidden, euler), Reward(S, A, hidden)


def load_model_folder(
    path: str | Path, S: int, A: int
) -> tuple[Dynamics | EnsembleDynamics, Reward | EnsembleReward, DirectPlanner | None]:
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
    for k, v in state.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise UserError(f"corrupt weights: {prefix}{k} holds non-finite values")
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
    ckpt = find_checkpoint(run)
    groups, meta = load_checkpoint(ckpt)
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
    source = {"run": str(run), "checkpoint": ckpt.name}
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
