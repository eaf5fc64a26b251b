"""Corruption matrix (issue 20): each damage to a small real run × {eval, plan, resume}.

Every case ends in exit 0 with the right result, or in exit 2 with one line on stderr, and the
run is left as it was (a command that fails writes nothing; eval and plan never write).

The catalogue (``CORRUPTIONS``) and the helpers here are shared with ``test_fuzz.py``,
``test_reliability.py`` and ``benchmarks/robustness.py``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mbplan.checkpoint import load_agent, load_checkpoint
from mbplan.cli import main

pytestmark = pytest.mark.slow

# -- a small real run and the commands on it -----------------------------------------------------

#: ``mbplan train`` of the small run: 300 Pendulum steps, checkpoints at 200 and 300 (seconds).
TRAIN = ["train", "--env", "Pendulum-v1", "--steps", "300", "--warmup", "100", "--batch-size", "32",
         "--eval-interval", "100", "--eval-episodes", "1", "--checkpoint-interval", "100",
         "--log-interval", "100", "--threads", "1", "--no-compile"]  # fmt: skip
FIT_MODEL = ["fit-model", "--steps", "50", "--horizon", "2", "--hidden", "64", "--threads", "1"]
PLAN = ["--planner", "adam", "--iters", "2", "--horizon", "2", "--max-steps", "3",
        "--episodes", "1", "--no-compile"]  # fmt: skip
#: The three commands of the matrix, each a function of the run folder.
COMMANDS: dict[str, Callable[[Path], list[str]]] = {
    "eval": lambda run: ["eval", "--checkpoint", str(run), "--episodes", "1"],
    "plan": lambda run: ["plan", "--checkpoint", str(run), *PLAN],
    "resume": lambda run: ["train", "--resume", str(run), "--steps", "400"],
}
OLDER, NEWEST = "ckpt-000000200", "ckpt-000000300"

#: A tqdm progress-bar fragment (a training error can end a bar that was already on screen).
_BAR = re.compile(r"\d+%\|.*\| *\d+/\d+ \[|\| *\d+/\d+ \[")


@dataclass
class Result:
    """Exit code and output of one command."""

    code: int
    out: str
    err: str

    def lines(self) -> list[str]:
        """stderr without progress-bar fragments or blank lines."""
        return [ln for ln in self.err.splitlines() if ln.strip() and not _BAR.search(ln)]

    def returns(self) -> list[float]:
        """Every ``return X`` printed on stdout (eval's mean, plan's episodes)."""
        return [float(x) for x in re.findall(r"return (-?[\d.]+|nan|-?inf)", self.out)]


def cli(*args: object) -> Result:
    """``mbplan ARGS`` in this process (fast): its exit code, stdout and stderr.

    Any exception escaping ``main`` propagates: in a test, a traceback is a failure.
    """
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:  # argparse ends a usage error this way (exit 2)
            code = exc.code if isinstance(exc.code, int) else 1
    return Result(code, out.getvalue(), err.getvalue())


def cli_process(*args: object, timeout: float = 300) -> Result:
    """``mbplan ARGS`` in a subprocess on one thread (for crashes a process cannot survive)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(
        [sys.executable, "-m", "mbplan.cli", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, env=env,
    )  # fmt: skip
    return Result(p.returncode, p.stdout, p.stderr)


def one_line_error(r: Result) -> str:
    """Assert exit 2 with exactly one line on stderr that says ``error``; that line."""
    assert r.code == 2, (r.code, r.err[-2000:])
    assert "Traceback" not in r.err, r.err
    lines = r.lines()
    assert len(lines) == 1 and "error" in lines[0], r.err
    return lines[0]


def contract(r: Result) -> str:
    """Assert the CLI's contract (exit 0, or exit 2 + one line); ``"ok"`` or ``"error"``."""
    assert "Traceback" not in r.err, r.err
    if r.code == 0:
        return "ok"
    one_line_error(r)
    return "error"


def build_run(folder: Path) -> Path:
    """The small real run (checkpoints 200 and 300, a fitted model) in ``folder``."""
    r = cli(*TRAIN, "--out", folder)
    assert r.code == 0, r.err
    r = cli(*FIT_MODEL, "--checkpoint", folder)
    assert r.code == 0, r.err
    return folder


def cached_run(tmp_path_factory) -> Path:
    """The small run, built once per test session (callers copy it before changing anything)."""
    run = tmp_path_factory.getbasetemp() / "small-run" / "run"
    done = run.parent / "done"
    if not done.exists():
        shutil.rmtree(run.parent, ignore_errors=True)
        run.parent.mkdir()
        build_run(run)
        done.write_text("")
    return run


def snapshot(run: Path) -> dict[str, bytes]:
    """Every file of a run folder (relative path → bytes), the lock's own files left out."""
    return {
        str(p.relative_to(run)): p.read_bytes()
        for p in sorted(run.rglob("*"))
        if p.is_file() and not p.name.startswith(".lock")
    }


def assert_unchanged(run: Path, before: dict[str, bytes]) -> None:
    """Nothing written is lost or changed."""
    after = snapshot(run)
    assert sorted(after) == sorted(before)
    changed = [k for k in before if after[k] != before[k]]
    assert not changed, changed


def weights_finite(path: Path) -> bool:
    """Whether the agent of a run or checkpoint loads and has finite weights."""
    agent, _ = load_agent(path)
    return agent.weights_finite()


# -- the corruptions -----------------------------------------------------------------------------


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _update_digest(ckpt: Path, name: str) -> None:
    """Record the damaged file's SHA-256, so the check behind the digest is what is tested."""
    meta_path = ckpt / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["sha256"][name] = _sha(ckpt / f"{name}.safetensors")
    meta_path.write_text(json.dumps(meta))


def _edit_json(path: Path, edit: Callable) -> None:
    value = json.loads(path.read_text())
    value = edit(value)
    path.write_text(json.dumps(value))


def truncate(name: str, digest: bool = False) -> Callable[[Path], None]:
    def apply(run: Path) -> None:
        path = run / NEWEST / f"{name}.safetensors"
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        if digest:
            _update_digest(run / NEWEST, name)

    return apply


def _flip(path: Path) -> None:
    """Flip 64 bytes of the tensor data (after the header) of a safetensors file."""
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little") + 16
    for i in range(start, min(start + 64, len(data))):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


def flip_data_bytes(name: str) -> Callable[[Path], None]:
    return lambda run: _flip(run / NEWEST / f"{name}.safetensors")


def flip_header_bytes(run: Path) -> None:
    """Damage the JSON header of weights.safetensors (digest updated)."""
    path = run / NEWEST / "weights.safetensors"
    data = bytearray(path.read_bytes())
    for i in range(9, 40):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    _update_digest(run / NEWEST, "weights")


def huge_header(name: str, digest: bool = False) -> Callable[[Path], None]:
    """The first 8 bytes of a safetensors file are its header length: make it 2⁶²."""

    def apply(run: Path) -> None:
        path = run / NEWEST / f"{name}.safetensors"
        data = path.read_bytes()
        path.write_bytes((2**62).to_bytes(8, "little") + data[8:])
        if digest:
            _update_digest(run / NEWEST, name)

    return apply


def rewrite(name: str, edit: Callable[[dict], None], digest: bool = True) -> Callable:
    """Re-save a checkpoint file, well formed, with ``edit`` applied to its tensors."""

    def apply(run: Path) -> None:
        path = run / NEWEST / f"{name}.safetensors"
        tensors = load_file(str(path))
        edit(tensors)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
        if digest:
            _update_digest(run / NEWEST, name)

    return apply


def halve(key: str | None = None) -> Callable[[dict], None]:
    """Halve the first dimension of tensor ``key`` (every tensor with ≥ 1 dim when None)."""

    def edit(tensors: dict) -> None:
        for k in [key] if key else list(tensors):
            if tensors[k].ndim:
                tensors[k] = tensors[k][: tensors[k].shape[0] // 2].clone()

    return edit


def fill_nan(key: str | None = None) -> Callable[[dict], None]:
    def edit(tensors: dict) -> None:
        for k in [key] if key else list(tensors):
            if tensors[k].is_floating_point():
                tensors[k] = torch.full_like(tensors[k], math.nan)

    return edit


def cast(key: str, dtype: torch.dtype) -> Callable[[dict], None]:
    def edit(tensors: dict) -> None:
        tensors[key] = tensors[key].to(dtype)

    return edit


def rename(key: str) -> Callable[[dict], None]:
    def edit(tensors: dict) -> None:
        tensors[key + "_renamed"] = tensors.pop(key)

    return edit


def remove(relative: str) -> Callable[[Path], None]:
    def apply(run: Path) -> None:
        path = run / relative
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()

    return apply


def write(relative: str, content: bytes | str) -> Callable[[Path], None]:
    def apply(run: Path) -> None:
        path = run / relative
        if isinstance(content, str):
            path.write_text(content)
        else:
            path.write_bytes(content)

    return apply


def edit_json(relative: str, edit: Callable) -> Callable[[Path], None]:
    return lambda run: _edit_json(run / relative, edit)


def _set(key: str, value) -> Callable:
    def edit(d):
        d[key] = value
        return d

    return edit


def _drop_spec_keys(meta):
    spec = meta["env_spec"]
    meta["env_spec"] = {k: v for k, v in spec.items() if k not in ("state_dim", "env_id")}
    return meta


def _set_spec(key, value) -> Callable:
    def edit(meta):
        meta["env_spec"][key] = value
        return meta

    return edit


def _set_optimizer_lr(value) -> Callable:
    def edit(meta):
        meta["optimizers"]["adam"]["param_groups"][0]["lr"] = value
        return meta

    return edit


def _replace_with_file(relative: str) -> Callable[[Path], None]:
    def apply(run: Path) -> None:
        shutil.rmtree(run / relative)
        (run / relative).write_text("not a folder")

    return apply


#: Expected outcome per command: "ok" (exit 0, the undamaged result), "fallback" (exit 0 on the
#: older checkpoint, with one warning line), "error" (exit 2, one line).
OK, FALLBACK, ERROR = "ok", "fallback", "error"


@dataclass(frozen=True)
class Corruption:
    """One way of damaging the small run, and what each command must then do."""

    name: str
    apply: Callable[[Path], None]
    eval: str
    plan: str
    resume: str


W, M, C = f"{NEWEST}/weights.safetensors", f"{NEWEST}/meta.json", "config.json"
ALL_ERROR = {"eval": ERROR, "plan": ERROR, "resume": ERROR}
RESUME_ONLY = {"eval": OK, "plan": OK, "resume": ERROR}
PLAN_ONLY = {"eval": OK, "plan": ERROR, "resume": OK}
READ_ONLY = {"eval": ERROR, "plan": ERROR, "resume": OK}
ALL_OK = {"eval": OK, "plan": OK, "resume": OK}
ALL_FALLBACK = {"eval": FALLBACK, "plan": FALLBACK, "resume": FALLBACK}
CORRUPTIONS = [
    # truncated and flipped files
    Corruption("weights-truncated", truncate("weights"), **ALL_ERROR),
    Corruption("weights-truncated-digest-updated", truncate("weights", True), **ALL_ERROR),
    Corruption("weights-empty", write(W, b""), **ALL_ERROR),
    Corruption("weights-flipped-data", flip_data_bytes("weights"), **ALL_ERROR),
    Corruption("weights-flipped-header-digest-updated", flip_header_bytes, **ALL_ERROR),
    Corruption("optimizer-truncated", truncate("optim_adam"), **ALL_ERROR),
    Corruption("replay-flipped-data", flip_data_bytes("replay"), **ALL_ERROR),
    Corruption("rng-truncated", truncate("rng"), **ALL_ERROR),
    # huge headers
    Corruption("weights-huge-header", huge_header("weights"), **ALL_ERROR),
    Corruption("weights-huge-header-digest-updated", huge_header("weights", True), **ALL_ERROR),
    Corruption("replay-huge-header-digest-updated", huge_header("replay", True), **ALL_ERROR),
    # well-formed files of the wrong shapes, dtypes and names
    Corruption("weights-halved", rewrite("weights", halve(), digest=False), **ALL_ERROR),
    Corruption("weights-halved-digest-updated", rewrite("weights", halve()), **ALL_ERROR),
    Corruption(
        "weights-one-halved-digest-updated",
        rewrite("weights", halve("critic.hidden.0.weight")),
        **ALL_ERROR,
    ),
    Corruption(
        "weights-float64-digest-updated",
        rewrite("weights", cast("planner.net.0.weight", torch.float64)),
        **ALL_ERROR,
    ),
    Corruption(
        "weights-renamed-digest-updated", rewrite("weights", rename("log_alpha")), **ALL_ERROR
    ),
    Corruption("optimizer-halved-digest-updated", rewrite("optim_adam", halve()), **ALL_ERROR),
    Corruption("replay-halved-digest-updated", rewrite("replay", halve("rewards")), **RESUME_ONLY),
    Corruption("rng-halved-digest-updated", rewrite("rng", halve("torch")), **RESUME_ONLY),
    # NaN tensors
    Corruption("weights-nan-digest-updated", rewrite("weights", fill_nan()), **ALL_ERROR),
    Corruption(
        "weights-one-nan-digest-updated", rewrite("weights", fill_nan("log_alpha")), **ALL_ERROR
    ),
    Corruption("optimizer-nan-digest-updated", rewrite("optim_adam", fill_nan()), **ALL_ERROR),
    Corruption("replay-nan-digest-updated", rewrite("replay", fill_nan("states")), **RESUME_ONLY),
    # JSON of the wrong types
    Corruption("meta-step-abc", edit_json(M, _set("step", "abc")), **RESUME_ONLY),
    Corruption("meta-episode-negative", edit_json(M, _set("episode", -1)), **RESUME_ONLY),
    Corruption("meta-last-eval-string", edit_json(M, _set("last_eval", "x")), **RESUME_ONLY),
    Corruption("meta-list", edit_json(M, lambda m: [m]), **ALL_ERROR),
    Corruption("meta-not-json", write(M, "{not json"), **ALL_ERROR),
    # (resume builds its options from config.json, and the next checkpoint records them again)
    Corruption("meta-config-list", edit_json(M, _set("config", [1, 2])), **READ_ONLY),
    Corruption(
        "meta-config-iters-string", edit_json(M, _set("config", {"iters": "x"})), **READ_ONLY
    ),
    Corruption("meta-sha256-list", edit_json(M, _set("sha256", ["x"])), **ALL_ERROR),
    Corruption("meta-optimizer-lr-string", edit_json(M, _set_optimizer_lr("abc")), **ALL_ERROR),
    Corruption("meta-optimizers-list", edit_json(M, _set("optimizers", [])), **ALL_ERROR),
    Corruption("config-steps-x", edit_json(C, _set("steps", "x")), **RESUME_ONLY),
    Corruption("config-lr-list", edit_json(C, _set("lr", [1])), **RESUME_ONLY),
    Corruption("config-list", edit_json(C, lambda c: [c]), **RESUME_ONLY),
    Corruption("config-string", write(C, '"a string"'), **RESUME_ONLY),
    Corruption("config-not-json", write(C, "{"), **RESUME_ONLY),
    # missing files
    Corruption("weights-missing", remove(W), **ALL_ERROR),
    Corruption("optimizer-missing", remove(f"{NEWEST}/optim_adam.safetensors"), **ALL_ERROR),
    Corruption("replay-missing", remove(f"{NEWEST}/replay.safetensors"), **ALL_ERROR),
    Corruption("rng-missing", remove(f"{NEWEST}/rng.safetensors"), **ALL_ERROR),
    Corruption("meta-missing", remove(M), **ALL_FALLBACK),
    Corruption("config-missing", remove(C), **RESUME_ONLY),
    Corruption("metrics-missing", remove("metrics.jsonl"), **ALL_OK),
    Corruption("latest-missing", remove("latest"), **ALL_OK),
    Corruption("newest-checkpoint-is-a-file", _replace_with_file(NEWEST), **ALL_FALLBACK),
    # a `latest` that points elsewhere
    Corruption("latest-outside-run", write("latest", "../../x\n"), **ALL_OK),
    Corruption("latest-absolute", write("latest", "/etc\n"), **ALL_OK),
    Corruption("latest-missing-checkpoint", write("latest", "ckpt-000000999\n"), **ALL_OK),
    Corruption("latest-binary", write("latest", b"\xff\xfe\x00"), **ALL_OK),
    # env_spec
    Corruption("env-spec-keys-missing", edit_json(M, _drop_spec_keys), **ALL_ERROR),
    Corruption("env-spec-missing", edit_json(M, lambda m: {**m, "env_spec": None}), **ALL_ERROR),
    Corruption("env-spec-state-dim-5", edit_json(M, _set_spec("state_dim", 5)), **ALL_ERROR),
    Corruption("env-spec-state-dim-0", edit_json(M, _set_spec("state_dim", 0)), **ALL_ERROR),
    Corruption("env-spec-dt-string", edit_json(M, _set_spec("dt", "x")), **ALL_ERROR),
    # the fitted model (plan only uses it)
    Corruption(
        "model-flipped-data", lambda run: _flip(run / "model/weights.safetensors"), **PLAN_ONLY
    ),
    Corruption("model-meta-list", write("model/meta.json", "[]"), **PLAN_ONLY),
    Corruption(
        "model-hidden-string", edit_json("model/meta.json", _set("hidden", "x")), **PLAN_ONLY
    ),
    Corruption("metrics-garbage", write("metrics.jsonl", "{\n[1]\n\x00\n"), **ALL_OK),
]


# -- the matrix ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """The small run, and the results of eval and plan on it and of eval on its older checkpoint."""
    run = cached_run(tmp_path_factory)
    results = {name: cli(*COMMANDS[name](run)).returns() for name in ("eval", "plan")}
    results["eval-older"] = cli(*COMMANDS["eval"](run / OLDER)).returns()
    assert all(v and all(map(math.isfinite, v)) for v in results.values()), results
    return run, results


def check_case(pristine, tmp_path, corruption: Corruption, command: str) -> str:
    """Apply one corruption to a copy of the run, run one command, check what it must do."""
    source, results = pristine
    run = tmp_path / "run"
    shutil.copytree(source, run)
    corruption.apply(run)
    before = snapshot(run)
    older = snapshot(run / OLDER)
    expected = getattr(corruption, command)
    argv = COMMANDS[command](run)
    if command == "resume" and corruption.name == "optimizer-halved-digest-updated":
        r = cli_process(*argv)  # damaged optimizer state once segfaulted fused Adam
    else:
        r = cli(*argv)
    outcome = contract(r)
    if expected == ERROR:
        assert outcome == "error", (r.code, r.out, r.err)
        assert_unchanged(run, before)
        load_checkpoint(run / OLDER)  # the older checkpoint is intact and loads
        return outcome
    assert outcome == "ok", (expected, r.err)
    warnings = [ln for ln in r.lines() if "warning" in ln]
    if expected == FALLBACK:
        assert len(warnings) == 1 and OLDER in warnings[0], r.err
    else:
        assert not warnings or "latest" in warnings[0], r.err
    if command == "eval":
        want = results["eval-older" if expected == FALLBACK else "eval"]
        assert r.returns() == want
        assert_unchanged(run, before)
    elif command == "plan":
        got = r.returns()
        assert len(got) >= 1 and all(math.isfinite(x) for x in got), r.out
        if expected == OK:
            assert got[0] == results["plan"][0]
        assert_unchanged(run, before)
    else:  # resume: finished at step 400, loads with finite weights, metrics in order
        assert (run / "latest").read_text().strip() == "ckpt-000000400"
        assert weights_finite(run)
        steps = [
            json.loads(ln).get("step") for ln in (run / "metrics.jsonl").read_text().splitlines()
        ]
        steps = [s for s in steps if s is not None]
        assert steps == sorted(steps) and steps[-1] == 400, steps
        if expected == FALLBACK:
            assert snapshot(run / OLDER) == older or not (run / OLDER).exists()
    return outcome


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("corruption", CORRUPTIONS, ids=lambda c: c.name)
def test_corruption_matrix(pristine, tmp_path, corruption, command):
    check_case(pristine, tmp_path, corruption, command)


def test_run_folder_is_a_file(tmp_path):
    path = tmp_path / "run"
    path.write_text("x")
    for command in COMMANDS:
        one_line_error(cli(*COMMANDS[command](path)))
    assert path.read_text() == "x"
