"""A stream yields the steps a trace of the prompt alone gives, as they are produced."""

import logitprobe as lp
import pytest

SETTINGS = dict(max_new_tokens=20, temperature=0.8, top_p=0.95, seed=3)


def test_stream_yields_the_traces_steps(tiny):
    stream = tiny.stream("Once upon a time", **SETTINGS)
    assert stream.text is None and stream.stop_reason is None
    steps = list(stream)
    run = tiny.trace("Once upon a time", **SETTINGS)
    assert steps == run.traces()[0]["steps"]
    assert stream.text == run.texts[0]
    assert stream.stop_reason == run.stop_reasons[0]
    assert stream.token_ids == run.token_ids[0]
    assert list(stream) == []


def test_stream_with_a_stop_string_as_the_trace(tiny):
    settings = dict(SETTINGS, stop="e")
    steps = list(tiny.stream("Hello", **settings))
    run = tiny.trace("Hello", **settings)
    assert steps == run.traces()[0]["steps"]


def test_a_stream_left_early_stops_and_the_model_goes_on(tiny):
    stream = tiny.stream("Hi", max_new_tokens=400, ignore_eos=True, seed=1)
    first = next(stream)
    assert first["step"] == 0 and set(first) >= {"selected", "raw", "processed"}
    stream.close()
    rest = list(stream)
    assert len(rest) < 399
    del stream
    assert tiny.trace("Hi", max_new_tokens=3, seed=1).token_ids[0][0] == first["selected"]["token_id"]


def test_stream_settings_are_checked_when_it_starts(tiny):
    with pytest.raises(lp.UsageError, match="^top_p 2 is outside"):
        tiny.stream("Hi", top_p=2)
    with pytest.raises(TypeError, match="prompt must be a str, not list"):
        tiny.stream(["Hi"])
    with pytest.raises(lp.UsageError, match="prompt is empty"):
        tiny.stream("")
