"""Bad input raises a Python exception with the command line's one-line message (keyword
arguments where it names flags); nothing crashes the interpreter, and the model goes on."""

import os

import pytest

import logitprobe as lp
from conftest import ROOT, TINY_GGUF


def as_keywords(message):
    """The command line's message with its flags said as keyword arguments."""
    for flag in ("temperature", "top-p", "top-k", "min-p", "max-new-tokens", "min-k", "max-k",
                 "mass-threshold", "repeat-penalty", "threads"):
        message = message.replace("--" + flag, flag.replace("-", "_"))
    return message


def test_the_exception_classes():
    assert issubclass(lp.UsageError, lp.Error) and issubclass(lp.UsageError, ValueError)
    assert issubclass(lp.ModelNotFoundError, lp.Error) and issubclass(lp.ModelNotFoundError, FileNotFoundError)
    assert issubclass(lp.EngineError, lp.Error) and issubclass(lp.EngineError, RuntimeError)


@pytest.mark.parametrize(
    "kwargs, flags",
    [
        (dict(temperature=-1), ["--temperature", "-1"]),
        (dict(top_p=2), ["--top-p", "2"]),
        (dict(min_p=1.5), ["--min-p", "1.5"]),
        (dict(max_new_tokens=0), ["--max-new-tokens", "0"]),
        (dict(min_k=0), ["--min-k", "0"]),
        (dict(min_k=9, max_k=4), ["--min-k", "9", "--max-k", "4"]),
        (dict(mass_threshold=0), ["--mass-threshold", "0"]),
        (dict(repeat_penalty=0), ["--repeat-penalty", "0"]),
        (dict(temperature=float("nan")), ["--temperature", "NaN"]),
    ],
)
def test_a_bad_setting_says_what_the_command_line_says(cli, tiny, kwargs, flags):
    expected = as_keywords(cli.error("trace", "--model", TINY_GGUF, "-p", "Hi", *flags))
    with pytest.raises(lp.UsageError) as e:
        tiny.trace("Hi", **kwargs)
    assert str(e.value) == expected


def test_settings_out_of_range_for_python(tiny):
    cases = [
        (dict(max_new_tokens=-3), "max_new_tokens -3 generates nothing: use 1 or more"),
        (dict(top_k=-1), "top_k -1 is invalid"),
        (dict(seed=-1), "seed -1 is invalid"),
        (dict(seed=2**64), "seed 18446744073709551616 is invalid"),
        (dict(parallel=0), "parallel 0 decodes nothing"),
        (dict(system_prompt="x"), "system_prompt needs use_chat_template=True"),
        (dict(chat_template="nope"), 'chat_template "nope" is neither a known name'),
    ]
    for kwargs, message in cases:
        with pytest.raises(lp.UsageError, match="^" + message):
            tiny.trace("Hi", **kwargs)


def test_bad_prompts(tiny):
    with pytest.raises(lp.UsageError, match="no prompt given"):
        tiny.trace([])
    with pytest.raises(lp.UsageError, match=r"prompts\[1\] is empty"):
        tiny.trace(["Hi", ""])
    with pytest.raises(TypeError, match="prompts must be a str or a list of str, not a list holding int at index 0"):
        tiny.trace([1, 2])
    with pytest.raises(TypeError, match="prompts must be a str or a list of str, not int"):
        tiny.trace(5)
    with pytest.raises(TypeError):
        tiny.trace("Hi", temperature="hot")
    with pytest.raises(TypeError):
        tiny.trace("Hi", max_new_tokens=2.5)
    with pytest.raises(TypeError):
        tiny.trace("Hi", no_such_setting=1)


def test_a_missing_model_file(cli):
    path = "/nonexistent/model.gguf"
    expected = cli.error("trace", "--model", path, "-p", "Hi")
    with pytest.raises(lp.ModelNotFoundError) as e:
        lp.Model(path)
    assert str(e.value) == expected
    assert isinstance(e.value, FileNotFoundError)


def test_a_text_file_given_as_a_model(cli, tmp_path):
    f = tmp_path / "notes.gguf"
    f.write_text("not a model\n")
    expected = cli.error("trace", "--model", f, "-p", "Hi")
    with pytest.raises(lp.UsageError) as e:
        lp.Model(f)
    # The same message; its fix names the keyword where the command line names the flag.
    assert str(e.value).split(";")[0] == expected.split(";")[0]
    assert 'backend="onnx"' in str(e.value)


def test_bad_model_settings(cli):
    with pytest.raises(lp.UsageError, match='^backend "gpt" is unknown'):
        lp.Model(TINY_GGUF, backend="gpt")
    expected = as_keywords(cli.error("trace", "--model", TINY_GGUF, "-p", "Hi", "--threads", "0"))
    with pytest.raises(lp.UsageError) as e:
        lp.Model(TINY_GGUF, threads=0)
    assert str(e.value) == expected
    with pytest.raises(lp.UsageError, match='^flash_attn "maybe" is unknown'):
        lp.Model(TINY_GGUF, flash_attn="maybe")
    with pytest.raises(lp.UsageError, match="is a GGUF file: use backend=\"llama\""):
        lp.Model(TINY_GGUF, backend="onnx")
    with pytest.raises(TypeError, match="model must be a str or os.PathLike, not int"):
        lp.Model(123)
    with pytest.raises(lp.UsageError, match="test backend model 'x' is invalid"):
        lp.Model("x", backend="test")


def test_a_prompt_beyond_the_context(tiny):
    with pytest.raises(lp.UsageError, match="needs .* tokens"):
        tiny.trace("word " * 2000, max_new_tokens=4)


def test_the_model_goes_on_after_errors(tiny):
    for bad in (dict(temperature=-1), dict(top_p=2)):
        with pytest.raises(lp.UsageError):
            tiny.trace("Hi", **bad)
    assert len(tiny.trace("Hi", max_new_tokens=3, seed=1).token_ids[0]) >= 1


def test_a_closed_model_says_so():
    m = lp.Model(TINY_GGUF, threads=1)
    m.close()
    with pytest.raises(lp.UsageError, match="the model is closed"):
        m.trace("Hi")
    assert "closed" in repr(m)


def test_the_test_engine_needs_no_model():
    with lp.Model("300:0", backend="test") as m:
        run = m.trace(["a", "b"], max_new_tokens=5, seed=1)
        assert run.steps.num_rows >= 2
