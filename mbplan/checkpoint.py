"""Checkpoint I/O, all in one place: safetensors for tensors, JSON for everything else.

A checkpoint is a folder ``ckpt-<step>`` inside a run folder. It is written whole under a temporary
name and renamed into place, then the ``latest`` pointer file is replaced atomically, so a process
killed at any moment leaves every completed checkpoint intact. Loading never unpickles.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mbplan.errors import UserError

LATEST = "latest"
PREFIX = "ckpt-"


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file + fsync + rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
        path = tmp / f"{name}.safetensors"
        # clone: parameters may be views into one flat buffer, which safetensors refuses to share
        save_file(
            {
                k: v.detach().cpu().clone(memory_format=torch.contiguous_format)
                for k, v in tensors.items()
            },
            str(path),
        )
        with open(path, "rb") as f:
            os.fsync(f.fileno())
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
