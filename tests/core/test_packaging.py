"""The wheel carries mbplan.models and mbplan.planners and imports outside the repository."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_wheel_contains_subpackages_and_imports(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("mbplan-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for sub in ("mbplan/models/", "mbplan/planners/", "mbplan/bench/", "mbplan/viz/"):
        assert any(n.startswith(sub) and n.endswith(".py") for n in names), sub
    # The bundled default checkpoint travels with the package.
    for part in ("latest", "model/weights.safetensors", "optimizers/model/meta.json",
                 "optimizers/model-free/meta.json"):  # fmt: skip
        assert f"mbplan/data/default/{part}" in names, part
    assert not any(n.startswith(("models/", "planners/")) for n in names)

    # Installed into a separate target and imported from a folder outside the repository.
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    code = (
        "import mbplan, mbplan.models, mbplan.planners, mbplan.checkpoint;"
        "assert (mbplan.checkpoint.default_bundle() / 'latest').is_file();"
        f"assert mbplan.__file__.startswith({str(target)!r}), mbplan.__file__;"
        "print(sorted(mbplan.planners.PLANNERS))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
        check=True,
        capture_output=True,
        text=True,
    )
    assert "iterative" in out.stdout


def test_source_imports_use_installed_names():
    """Code imports models/planners only as mbplan.models / mbplan.planners."""
    offenders = []
    for path in [
        *ROOT.glob("mbplan/**/*.py"),
        *ROOT.glob("models/*.py"),
        *ROOT.glob("planners/*.py"),
    ]:
        for line in path.read_text().splitlines():
            s = line.strip()
            if s.startswith(("import models", "import planners", "from models", "from planners")):
                offenders.append(f"{path}: {s}")
    assert not offenders
