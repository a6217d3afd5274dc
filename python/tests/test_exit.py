"""A model left open at the interpreter's exit: its engine thread frees it before the process
ends (C++'s static destructors must not run beside a thread still freeing llama.cpp's model)."""

import subprocess
import sys

from conftest import TINY_GGUF

SCRIPT = f"""
import atexit, pathlib

def engine_threads():
    return sum(p.read_text().startswith("logitprobe-engi")
               for p in pathlib.Path("/proc/self/task").glob("*/comm"))

# Registered before the package's own handler, so it runs after it (atexit is LIFO).
atexit.register(lambda: print("engine threads at exit:", engine_threads(), flush=True))
import logitprobe as lp
kept = lp.Model({str(TINY_GGUF)!r})
dropped = lp.Model({str(TINY_GGUF)!r})
kept.trace(["Hi", "Yo"], max_new_tokens=4, seed=1)
print("engine threads running:", engine_threads(), flush=True)
del dropped  # garbage-collected: its thread is let go, not waited for
"""


def test_engine_threads_end_before_the_interpreter_exits():
    p = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == ["engine threads running: 2", "engine threads at exit: 0"], p.stdout
