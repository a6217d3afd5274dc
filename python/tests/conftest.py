"""Shared fixtures: the tiny twins (models/tiny), the command line built from the same tree,
and helpers that run it and read what it writes."""

import json
import os
import pathlib
import subprocess

import pytest

import logitprobe as lp

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = ROOT / "models" / "tiny"
TINY_GGUF = TINY / "tiny-f32.gguf"
TINY_Q8 = TINY / "tiny-q8_0.gguf"
TINY_ONNX = TINY / "optimum"
CACHE = pathlib.Path(
    os.environ.get("LOGITPROBE_CACHE")
    or pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache") / "logitprobe"
)
SMOLLM2 = CACHE / "SmolLM2-135M-Instruct.Q4_1.gguf"


def cli_path():
    """The `logitprobe` binary: $LOGITPROBE_BIN (scripts/test sets it), else the release build
    in $CARGO_TARGET_DIR or target/."""
    if os.environ.get("LOGITPROBE_BIN"):
        return pathlib.Path(os.environ["LOGITPROBE_BIN"])
    target = pathlib.Path(os.environ.get("CARGO_TARGET_DIR") or ROOT / "target")
    return target / "release" / "logitprobe"


class Cli:
    """Runs the command line and reads its files."""

    def __init__(self, path):
        self.path = path

    def run(self, *args, ok=True):
        p = subprocess.run(
            [str(self.path), *map(str, args)],
            capture_output=True,
            text=True,
            timeout=300,
            stdin=subprocess.DEVNULL,
        )
        if ok and p.returncode != 0:
            raise AssertionError(f"logitprobe {' '.join(map(str, args))} failed: {p.stderr}")
        return p

    def error(self, *args):
        """The one-line message of a command that must fail, without its `error: `."""
        p = self.run(*args, ok=False)
        assert p.returncode != 0, p
        lines = [l for l in p.stderr.splitlines() if l.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
        return lines[0][len("error: ") :]

    def traces(self, out):
        """Each prompt's adaptive_token_trace.json under `out`, in prompt order, without its
        timestamp."""
        out = pathlib.Path(out)
        files = [out / "adaptive_token_trace.json"]
        if not files[0].exists():
            files = sorted(out.glob("prompt-*/adaptive_token_trace.json"))
        traces = [json.loads(f.read_text()) for f in files]
        for t in traces:
            del t["metadata"]["generated_at"]
        return traces


@pytest.fixture(scope="session")
def cli():
    path = cli_path()
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} is missing: build it (cargo build --release) or set LOGITPROBE_BIN")
    return Cli(path)


@pytest.fixture(scope="session")
def tiny():
    """The tiny GGUF twin on llama.cpp, one for the session."""
    with lp.Model(TINY_GGUF, threads=1) as m:
        yield m


@pytest.fixture(scope="session")
def tiny_onnx():
    """The tiny twin's ONNX export on ONNX Runtime. Without an ONNX Runtime library the tests
    that use it fail, as the cargo tests do: `models/fetch onnxruntime` (the test command runs
    it) puts one where it is looked for."""
    try:
        m = lp.Model(TINY_ONNX)
    except lp.UsageError as e:
        if "ONNX Runtime library" in str(e):
            pytest.fail(f"no ONNX Runtime ({e}): run models/fetch onnxruntime, or scripts/test once")
        raise
    with m:
        yield m


def without_timestamp(trace):
    del trace["metadata"]["generated_at"]
    return trace
