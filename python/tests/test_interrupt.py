"""Ctrl-C interrupts a running call cleanly (KeyboardInterrupt after the step in progress, the
model usable after it), and the engine works with the GIL released."""

import os
import signal
import threading
import time

import pytest

import logitprobe as lp
from conftest import TINY_GGUF

LONG = dict(max_new_tokens=500, ignore_eos=True, seed=1)
PROMPTS = [f"Count from {i}:" for i in range(64)]


@pytest.fixture(autouse=True)
def sigint_raises_keyboard_interrupt():
    """Python's own SIGINT handler, as an interactive interpreter or a notebook has it. A
    process started in the background of a script inherits SIGINT ignored, and Python then
    installs no handler (so Ctrl-C could not reach these tests at all)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def interrupt_after(seconds):
    """SIGINT to this process from another thread, as Ctrl-C in a terminal or a notebook's
    interrupt sends it."""
    t = threading.Timer(seconds, lambda: os.kill(os.getpid(), signal.SIGINT))
    t.start()
    return t


def test_ctrl_c_interrupts_a_long_trace_and_the_model_goes_on():
    with lp.Model(TINY_GGUF, threads=1) as m:
        short = m.trace("Hello", max_new_tokens=8, seed=5)
        t0 = time.monotonic()
        full = m.trace(PROMPTS, **LONG)
        whole = time.monotonic() - t0
        assert whole > 1.0, f"the long trace took only {whole:.2f} s"
        timer = interrupt_after(whole / 10)
        t0 = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            m.trace(PROMPTS, **LONG)
        took = time.monotonic() - t0
        timer.join()
        assert took < whole / 2, f"interrupted after {took:.2f} s of {whole:.2f}"
        again = m.trace("Hello", max_new_tokens=8, seed=5)
        assert again.steps.equals(short.steps)
        assert m.trace(PROMPTS[:2], **dict(LONG, max_new_tokens=20)).token_ids == [
            ids[:20] for ids in full.token_ids[:2]
        ]


def test_ctrl_c_interrupts_a_stream():
    with lp.Model(TINY_GGUF, threads=1) as m:
        seen = 0
        with pytest.raises(KeyboardInterrupt):
            for _ in m.stream("Hi", max_new_tokens=500, ignore_eos=True, seed=1):
                seen += 1
                if seen == 3:
                    os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.01)
        assert seen < 500
        assert len(list(m.stream("Hi", max_new_tokens=4, seed=1))) == 4


def test_the_engine_runs_with_the_gil_released():
    with lp.Model(TINY_GGUF, threads=1) as m:
        done = threading.Event()
        ticks = 0

        def work():
            m.trace(PROMPTS[:16], **LONG)
            done.set()

        worker = threading.Thread(target=work)
        t0 = time.monotonic()
        worker.start()
        while not done.is_set():
            ticks += 1
            time.sleep(0.001)
        worker.join()
        took = time.monotonic() - t0
        # The main thread kept running throughout: about one tick a millisecond.
        assert took > 0.2 and ticks > took * 200, (ticks, took)


def test_calls_from_two_threads_run_one_after_the_other():
    with lp.Model(TINY_GGUF, threads=1) as m:
        want = m.trace("Hello", max_new_tokens=16, seed=3).token_ids
        got = []
        threads = [threading.Thread(target=lambda: got.append(m.trace("Hello", max_new_tokens=16, seed=3).token_ids)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert got == [want] * 4
