"""The README's Python example runs as written."""

import re
from pathlib import Path

import pytest


@pytest.mark.slow
def test_readme_python_example_runs():
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = re.search(r"## Plan against your own value function.*?```python\n(.*?)```", text, re.S)
    assert block is not None
    namespace: dict = {}
    exec(compile(block.group(1), "README.md", "exec"), namespace)
    assert namespace["result"].trace.objective.shape == (6, 256)
