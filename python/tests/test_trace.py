"""A trace through the package is the command line's trace, value for value: the same
tokens, every step's numbers and candidates, the tables built from the same steps."""

import pytest

from conftest import TINY_GGUF, TINY_ONNX

PROMPTS = ["The capital of France is", "Once upon a time"]
SAMPLING = dict(max_new_tokens=24, temperature=0.7, top_k=40, top_p=0.9, min_p=0.02, repeat_penalty=1.1, seed=1)


def flags(settings):
    """The command line's flags for the package's keyword arguments."""
    out = []
    for k, v in settings.items():
        flag = "--" + k.replace("_", "-")
        if v is True:
            out.append(flag)
        elif isinstance(v, list):
            for x in v:
                out += [flag, x]
        else:
            out += [flag, str(v)]
    return out


def cli_trace(cli, tmp_path, model, prompts, settings, extra=()):
    out = tmp_path / "cli"
    args = ["trace", "--model", model, "--no-plots", "--out", out, *extra, *flags(settings)]
    for p in prompts:
        args += ["--prompt", p]
    cli.run(*args)
    return cli.traces(out)


def without_timestamps(traces):
    for t in traces:
        del t["metadata"]["generated_at"]
    return traces


def assert_tables_hold(run, traces):
    """run.steps, run.candidates and run.prompts hold exactly the traces' values."""
    steps = run.steps.to_pylist()
    cands = run.candidates.to_pylist()
    prompts = run.prompts.to_pylist()
    assert len(prompts) == len(traces)
    assert len(steps) == sum(len(t["steps"]) for t in traces)
    rows = iter(steps)
    cand_rows = iter(cands)
    for i, t in enumerate(traces):
        assert prompts[i]["prompt_index"] == i
        assert prompts[i]["prompt"] == t["metadata"]["prompt"]
        assert prompts[i]["generated_text"] == t["metadata"]["generated_text"]
        assert prompts[i]["prompt_tokens"] == len(t["tokens"]["prompt_token_ids"])
        assert prompts[i]["generated_tokens"] == len(t["steps"])
        for s in t["steps"]:
            row = next(rows)
            assert (row["prompt_index"], row["step"]) == (i, s["step"])
            assert (row["token_id"], row["token"]) == (s["selected"]["token_id"], s["selected"]["token"])
            for d in ("raw", "processed"):
                for k in ("entropy", "k_used", "top_mass_used", "selected_prob", "selected_logprob", "selected_rank"):
                    assert row[f"{d}_{k}"] == s[d][k], (i, s["step"], d, k)
                for c in s[d]["candidates"]:
                    got = next(cand_rows)
                    assert (got["prompt_index"], got["step"], got["distribution"]) == (i, s["step"], d)
                    for k in ("rank", "token_id", "token", "prob", "logprob"):
                        assert got[k] == c[k], (i, s["step"], d, k)
    assert next(rows, None) is None and next(cand_rows, None) is None


def test_trace_equals_the_command_lines(cli, tiny, tmp_path):
    run = tiny.trace(PROMPTS, **SAMPLING)
    expected = cli_trace(cli, tmp_path, TINY_GGUF, PROMPTS, SAMPLING, ["--threads", "1"])
    got = without_timestamps(run.traces())
    assert got == expected
    assert_tables_hold(run, expected)
    assert run.seed == 1
    assert len(run) == 2
    assert run.token_ids == [[s["selected"]["token_id"] for s in t["steps"]] for t in expected]
    assert run.stop_reasons == [p["stop_reason"] for p in run.prompts.to_pylist()]


def test_chat_template_system_prompt_and_stop_strings_as_the_command_line(cli, tiny, tmp_path):
    settings = dict(SAMPLING, chat_template="chatml", system_prompt="Be brief.", stop=["e", "a"], seed=7)
    run = tiny.trace(PROMPTS, **settings)
    expected = cli_trace(cli, tmp_path, TINY_GGUF, PROMPTS, settings, ["--threads", "1"])
    assert without_timestamps(run.traces()) == expected
    assert_tables_hold(run, expected)
    assert all(r in ("stop_string", "end_of_generation", "max_new_tokens") for r in run.stop_reasons)
    assert all(p["system_prompt"] == "Be brief." for p in run.prompts.to_pylist())


def test_greedy_and_one_prompt_as_the_command_line(cli, tiny, tmp_path):
    settings = dict(max_new_tokens=16, temperature=0, ignore_eos=True)
    run = tiny.trace("Hello", **settings)
    expected = cli_trace(cli, tmp_path, TINY_GGUF, ["Hello"], settings, ["--threads", "1"])
    assert without_timestamps(run.traces()) == expected
    assert run.stop_reasons == ["max_new_tokens"]


def test_onnx_trace_equals_the_command_lines(cli, tiny_onnx, tmp_path):
    run = tiny_onnx.trace(PROMPTS, **SAMPLING)
    expected = cli_trace(cli, tmp_path, TINY_ONNX, PROMPTS, SAMPLING)
    assert without_timestamps(run.traces()) == expected
    assert_tables_hold(run, expected)


def test_the_same_seed_gives_the_same_run_and_another_seed_another(tiny):
    a = tiny.trace(PROMPTS, **SAMPLING)
    b = tiny.trace(PROMPTS, **SAMPLING)
    assert a.steps.equals(b.steps) and a.candidates.equals(b.candidates)
    c = tiny.trace(PROMPTS, **dict(SAMPLING, seed=2))
    assert c.token_ids != a.token_ids


def test_a_fresh_seed_is_reported(tiny):
    run = tiny.trace("Hi", max_new_tokens=4)
    again = tiny.trace("Hi", max_new_tokens=4, seed=run.seed)
    assert again.token_ids == run.token_ids


def test_pandas_polars_and_duckdb_read_the_tables(tiny):
    run = tiny.trace(PROMPTS, **SAMPLING)
    df = run.to_pandas()
    assert len(df) == run.steps.num_rows and list(df.columns) == run.steps.column_names
    pl = run.to_polars("candidates")
    assert pl.height == run.candidates.num_rows
    assert run.to_pandas("prompts")["prompt"].tolist() == PROMPTS
    import duckdb

    steps = run.steps  # noqa: F841 (read by name in the query)
    [(n, mean)] = duckdb.sql("select count(*), avg(raw_entropy) from steps").fetchall()
    assert n == run.steps.num_rows
    assert mean == pytest.approx(sum(run.steps.column("raw_entropy").to_pylist()) / n)


def test_an_unknown_table_name_is_refused(tiny):
    import logitprobe as lp

    run = tiny.trace("Hi", max_new_tokens=2, seed=1)
    with pytest.raises(lp.UsageError, match='table "rows" is unknown'):
        run.to_pandas("rows")


def test_duckdb_over_the_command_lines_parquet_gives_its_summary_csv(cli, tmp_path):
    """`trace --format parquet`'s steps.parquet, read by pyarrow and queried by DuckDB, gives
    the per-prompt means the same run writes in summary.csv."""
    import csv

    import duckdb
    import pyarrow.parquet as pq

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"{p} {i}\n" for i in range(6) for p in PROMPTS[:1]))
    out = tmp_path / "run"
    cli.run("trace", "--model", TINY_GGUF, "--prompts-file", prompts, "--max-new-tokens", 7,
            "--temperature", 0.8, "--seed", 5, "--format", "parquet", "--out", out)
    steps = pq.read_table(out / "steps.parquet")  # noqa: F841 (read by name in the query)
    rows = duckdb.sql(
        "select prompt_index, count(*), avg(raw_entropy), avg(processed_entropy) "
        "from steps group by prompt_index order by prompt_index"
    ).fetchall()
    with open(out / "summary.csv", newline="") as f:
        summary = list(csv.DictReader(f))
    assert len(rows) == len(summary) == 6
    for (index, n, raw, processed), s in zip(rows, summary):
        assert index == int(s["index"]) and n == int(s["generated_tokens"])
        assert raw == pytest.approx(float(s["mean_entropy_raw"]), rel=1e-12)
        assert processed == pytest.approx(float(s["mean_entropy_processed"]), rel=1e-12)
