"""The package's import graph points down only (README, "Layout"; DESIGN.md §1)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: Layer of each first-party module, bottom first; a module imports from its own layer or below.
LAYERS = [
    ["mbplan.errors", "mbplan.fast"],
    ["mbplan.distributions"],
    ["mbplan.objective"],
    ["mbplan.models", "mbplan.planners", "mbplan.model_value", "mbplan.replay",
     "mbplan.fast.fused_sac", "mbplan.fast.fused_value", "mbplan.fast.fast_plan",
     "mbplan.fast.malloc"],
    ["mbplan.agent"],
    ["mbplan.checkpoint", "mbplan.envs", "mbplan.options"],
    ["mbplan.train", "mbplan.mpc", "mbplan.fit", "mbplan.sweep"],
    ["mbplan.report"],
    ["mbplan.bench", "mbplan.viz"],
    ["mbplan.cli", "mbplan.cli_planning", "mbplan.cli_sweep"],
]  # fmt: skip


def layer_of(module: str) -> int:
    """The layer of the longest matching prefix in :data:`LAYERS`."""
    best, level = "", None
    for i, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > len(best):
                best, level = name, i
    if level is None:
        raise KeyError(module)
    return level


def modules():
    """(module name, path) of every first-party source file."""
    roots = {"mbplan": ROOT / "mbplan", "mbplan.models": ROOT / "models",
             "mbplan.planners": ROOT / "planners"}  # fmt: skip
    for prefix, folder in roots.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if prefix == "mbplan" and parts[0] in ("models", "planners", "data"):
                continue
            name = ".".join([prefix, *parts]).removesuffix(".__init__")
            yield name, path


def imports(path: Path) -> set[str]:
    """First-party modules imported anywhere in a file (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("mbplan")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mbplan"):
            for a in node.names:  # `from mbplan import fast` names a module
                full = f"{node.module}.{a.name}"
                found.add(full if node.module == "mbplan" else node.module)
    return found


@pytest.mark.parametrize(("name", "path"), list(modules()), ids=lambda x: str(x))
def test_no_module_imports_a_higher_layer(name, path):
    if name == "mbplan":  # the package root re-exports the public API
        return
    own = layer_of(name)
    upward = sorted(m for m in imports(path) if m != "mbplan" and layer_of(m) > own)
    assert not upward, f"{name} (layer {own}) imports a higher layer: {upward}"


def test_fast_twins_do_not_import_the_objects_they_serve():
    """The twins take parts (networks, tensors), not Agent or the CLI: no import cycle."""
    for name, path in modules():
        if name.startswith("mbplan.fast."):
            assert not {"mbplan.agent", "mbplan.train", "mbplan.mpc"} & imports(path), name
