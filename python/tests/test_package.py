"""The package's surface: the stubs name what the module has, the README's example runs as
written, the two pyproject files describe one package."""

import ast
import os
import pathlib
import re
import subprocess
import sys

import pytest

import logitprobe as lp
from conftest import CACHE, ROOT, SMOLLM2


def test_the_stubs_name_what_the_module_has():
    stub = ast.parse((ROOT / "python" / "logitprobe" / "__init__.pyi").read_text())
    for node in stub.body:
        if isinstance(node, ast.ClassDef):
            cls = getattr(lp, node.name)
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and not item.name.startswith("__"):
                    assert hasattr(cls, item.name), f"{node.name}.{item.name}"
        elif isinstance(node, ast.FunctionDef):
            assert callable(getattr(lp, node.name)), node.name
    public = {n.name for n in stub.body if isinstance(n, (ast.ClassDef, ast.FunctionDef)) and not n.name.startswith("_")}
    assert public == set(lp.__all__) - {"__version__"}


def test_every_method_has_a_docstring():
    for name in lp.__all__:
        obj = getattr(lp, name)
        if isinstance(obj, type):
            assert obj.__doc__, name
            for attr, member in vars(obj).items():
                if not attr.startswith("_") and callable(getattr(member, "__get__", None)):
                    assert getattr(member, "__doc__", None), f"{name}.{attr}"
    assert lp.compare.__doc__ and "(a, b, *, text" in lp.compare.__text_signature__


def test_the_two_pyprojects_describe_one_package():
    import tomllib

    root = tomllib.loads((ROOT / "pyproject.toml").read_text())
    here = tomllib.loads((ROOT / "python" / "pyproject.toml").read_text())
    assert root["build-system"] == here["build-system"]
    for key in set(root["project"]) | set(here["project"]):
        if key != "readme":
            assert root["project"].get(key) == here["project"].get(key), key
    assert root["tool"]["maturin"]["module-name"] == here["tool"]["maturin"]["module-name"]


def readme_example():
    text = (ROOT / "README.md").read_text()
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


def test_the_readmes_example_runs_as_written():
    # What the test command fetches and builds first; missing, the test fails (never skips).
    assert SMOLLM2.exists(), "SmolLM2 not fetched: run models/fetch smollm2 (or scripts/test once)"
    assert (CACHE / "SmolLM2-135M-Instruct-onnx" / "model.onnx").exists(), (
        "SmolLM2's ONNX twin not built: run models/export-onnx (or scripts/test once)"
    )
    p = subprocess.run(
        [sys.executable, "-c", readme_example()],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONWARNINGS="error::ResourceWarning"),
    )
    assert p.returncode == 0, p.stderr
    assert "Paris" in p.stdout and "Mean KLD" in p.stdout, p.stdout
