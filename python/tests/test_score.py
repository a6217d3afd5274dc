"""`score` gives `compare`'s numbers, and `compare` the command line's statistics."""

import json

import numpy as np
import pytest

import logitprobe as lp
from conftest import ROOT, TINY_GGUF, TINY_Q8

TEXT = (ROOT / "models" / "corpus" / "genesis-kjv.txt").read_text()[:400]


def cli_compare(cli, tmp_path, a, b, text, *flags):
    f = tmp_path / "text.txt"
    f.write_text(text)
    out = tmp_path / "compare"
    cli.run("compare", "--a", a, "--b", b, "--text-file", f, "--out", out, *flags)
    return json.loads((out / "compare.json").read_text())


def test_score_equals_compares_side_a(cli, tiny, tmp_path):
    ids = tiny.tokenize(TEXT)
    scores = tiny.score(TEXT)
    assert isinstance(scores, np.ndarray) and scores.dtype == np.float64
    assert scores.shape == (len(ids) - 1,)
    report = cli_compare(
        cli, tmp_path, f"llama:{TINY_GGUF}", f"llama:{TINY_GGUF}", TEXT,
        "--ctx-size", len(ids), "--score-all", "--threads", "1",
    )
    positions = report["positions"]
    assert [p["token_id"] for p in positions] == ids[1:]
    assert scores.tolist() == [p["a"]["logprob"] for p in positions]


def test_score_equals_the_traces_logprobs(tiny):
    # Raw is the distribution at the temperature: 1 here, as scoring.
    run = tiny.trace("In the beginning", max_new_tokens=12, temperature=1.0, seed=4, ignore_eos=True)
    trace = run.traces()[0]
    prompt = trace["tokens"]["prompt_token_ids"]
    scores = tiny.score(prompt + run.token_ids[0])
    assert scores[len(prompt) - 1 :].tolist() == [s["raw"]["selected_logprob"] for s in trace["steps"]]
    # Token ids and a list of them.
    both = tiny.score([prompt, "In the beginning"])
    assert both[0].tolist() == both[1].tolist() == scores[: len(prompt) - 1].tolist()


def test_score_of_several_texts_and_short_ones(tiny):
    out = tiny.score(["Hello world", "x", ""])
    assert isinstance(out, list) and len(out) == 3
    assert out[0].shape == (len(tiny.tokenize("Hello world")) - 1,)
    assert out[1].shape == (0,) and out[2].shape == (0,)
    assert np.all(out[0] <= 0)
    assert out[0].tolist() == tiny.score("Hello world").tolist()
    assert tiny.score([]) == []
    with pytest.raises(lp.UsageError, match="token id 100000 is beyond the model's vocabulary of 384"):
        tiny.score([1, 100000])
    with pytest.raises(TypeError, match="texts must be a str, a list of token ids, or a list of those, not a list holding float"):
        tiny.score(["a", 1.5])


def test_compare_equals_the_command_line(cli, tmp_path):
    c = lp.compare(a=TINY_GGUF, b=[TINY_Q8, f"llama:{TINY_GGUF}"], text=TEXT, ctx_size=64, threads=1)
    report = cli_compare(
        cli, tmp_path, f"llama:{TINY_GGUF}", f"llama:{TINY_Q8}", TEXT, "--b", f"llama:{TINY_GGUF}",
        "--ctx-size", 64, "--threads", 1,
    )
    mine = c.to_dict()
    assert mine["input"]["tokens"] == report["input"]["tokens"]
    assert mine["input"]["chunks"] == report["input"]["chunks"]
    assert mine["positions"] == report["positions"]
    for got, want in zip(mine["summaries"], report["summaries"]):
        for k in want:
            if k != "label":
                assert got[k] == want[k], k
    table = c.positions
    assert table.num_rows == 2 * len(report["positions"])
    rows = table.to_pylist()
    assert [r["kld"] for r in rows if r["b"] == 1] == [p["b"][0]["kld"] for p in report["positions"]]
    summary = c.summary.to_pylist()
    assert [s["kld_mean"] for s in summary] == [s["kld"]["mean"] for s in report["summaries"]]
    assert summary[1]["kld_max"] == 0.0, "B2 is A itself"
    text = str(c)
    assert "Mean KLD" in text and "PPL" in text


def test_compare_saves_the_command_lines_files(tmp_path):
    c = lp.compare(a=TINY_GGUF, b=TINY_Q8, text=TEXT, ctx_size=64, chunks=1)
    c.save(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert saved["positions"] == c.to_dict()["positions"]
    assert (tmp_path / "out" / "compare.csv").exists()
    assert (tmp_path / "out" / "report.html").exists()


def test_compare_refuses_bad_input():
    with pytest.raises(lp.UsageError, match="fewer than one ctx_size 512 chunk"):
        lp.compare(a=TINY_GGUF, b=TINY_Q8, text="short")
    with pytest.raises(lp.UsageError, match="no B to compare with A"):
        lp.compare(a=TINY_GGUF, b=[], text=TEXT)
    with pytest.raises(lp.UsageError, match="text is empty"):
        lp.compare(a=TINY_GGUF, b=TINY_Q8, text="  ")
    with pytest.raises(lp.UsageError, match=r"side B \(llama:/nonexistent.gguf\) failed to load"):
        lp.compare(a=TINY_GGUF, b="/nonexistent.gguf", text=TEXT)
    with pytest.raises(TypeError):
        lp.compare(a=TINY_GGUF, b=3, text=TEXT)
