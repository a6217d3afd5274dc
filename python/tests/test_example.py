"""docs/examples/where-the-model-hesitates.py, the notebook of docs/python.md, runs as a script
on the tiny test model and draws its figure."""

import os
import struct
import subprocess
import sys

from conftest import ROOT, TINY_GGUF

EXAMPLE = ROOT / "docs" / "examples" / "where-the-model-hesitates.py"


def test_the_notebook_example_runs_and_draws_its_figure(tmp_path):
    png = tmp_path / "figure.png"
    env = dict(
        os.environ,
        LOGITPROBE_EXAMPLE_MODEL=str(TINY_GGUF),
        LOGITPROBE_EXAMPLE_PROMPTS="24",
        LOGITPROBE_EXAMPLE_PNG=str(png),
    )
    p = subprocess.run([sys.executable, str(EXAMPLE)], env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == f"wrote {png}"
    head = png.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", head[16:24])
    assert (width, height) == (1210, 462), "the figure's size (11 x 4.2 in at 110 dpi)"
