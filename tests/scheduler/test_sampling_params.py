"""SamplingParams validation: every bad field raises InvalidRequest naming that field."""

import math

import pytest

from scheduler.errors import DSparkError, InvalidRequest
from scheduler.sampling_params import MAX_STOP_STRING_LEN, MAX_STOP_STRINGS, SamplingParams


def test_defaults():
    p = SamplingParams()
    assert p.max_tokens == 16
    assert p.temperature == 1.0
    assert p.top_p == 1.0
    assert p.top_k == 0
    assert p.seed is None
    assert p.stop == []
    assert p.stop_token_ids == []
    assert p.ignore_eos is False
    assert not p.greedy


def test_greedy():
    assert SamplingParams(temperature=0.0).greedy
    assert SamplingParams(temperature=0).greedy
    assert not SamplingParams(temperature=0.01).greedy


def test_stop_str_becomes_list():
    p = SamplingParams(stop="###")
    assert p.stop == ["###"]


def test_stop_none_becomes_empty_list():
    assert SamplingParams(stop=None).stop == []


def test_stop_list_is_copied():
    stops = ["a", "b"]
    p = SamplingParams(stop=stops)
    assert p.stop == ["a", "b"]
    assert p.stop is not stops


def test_stop_tuple_becomes_list():
    p = SamplingParams(stop=("x", "y"))
    assert p.stop == ["x", "y"]


def test_invalid_request_is_a_value_error_and_dspark_error():
    with pytest.raises(ValueError):
        SamplingParams(max_tokens=0)
    with pytest.raises(DSparkError):
        SamplingParams(max_tokens=0)


@pytest.mark.parametrize(
    "kwargs, param",
    [
        # max_tokens
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"max_tokens": "16"}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"max_tokens": None}, "max_tokens"),
        # temperature
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": -1}, "temperature"),
        ({"temperature": 100.5}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        # top_p in (0, 1]
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": -0.5}, "top_p"),
        ({"top_p": 1.0001}, "top_p"),
        ({"top_p": 2}, "top_p"),
        ({"top_p": math.nan}, "top_p"),
        ({"top_p": None}, "top_p"),
        # top_k
        ({"top_k": -2}, "top_k"),
        ({"top_k": 1.5}, "top_k"),
        ({"top_k": "5"}, "top_k"),
        # seed
        ({"seed": -1}, "seed"),
        ({"seed": 2**63}, "seed"),
        ({"seed": 1.0}, "seed"),
        ({"seed": "42"}, "seed"),
        # stop strings
        ({"stop": ["s"] * (MAX_STOP_STRINGS + 1)}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"stop": ""}, "stop"),
        ({"stop": ["x" * (MAX_STOP_STRING_LEN + 1)]}, "stop"),
        ({"stop": ["ok", 5]}, "stop"),
        # stop token ids
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"stop_token_ids": [1, "2"]}, "stop_token_ids"),
        ({"stop_token_ids": [1.0]}, "stop_token_ids"),
    ],
)
def test_invalid_params_raise_with_param(kwargs, param):
    with pytest.raises(InvalidRequest) as exc_info:
        SamplingParams(**kwargs)
    assert exc_info.value.param == param
    assert str(exc_info.value)  # carries a human-readable message


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_tokens": 1},
        {"max_tokens": 100_000},
        {"temperature": 0.0},
        {"temperature": 100.0},
        {"temperature": 2},
        {"top_p": 1.0},
        {"top_p": 1},
        {"top_p": 1e-6},
        {"top_k": -1},
        {"top_k": 0},
        {"top_k": 50},
        {"seed": 0},
        {"seed": 2**63 - 1},
        {"seed": None},
        {"stop": ["s"] * MAX_STOP_STRINGS},
        {"stop": "x" * MAX_STOP_STRING_LEN},
        {"stop_token_ids": [0, 1, 2]},
        {"ignore_eos": True},
    ],
)
def test_valid_params_accepted(kwargs):
    SamplingParams(**kwargs)


def test_validate_can_be_called_again_after_mutation():
    p = SamplingParams()
    p.top_p = 0.0
    with pytest.raises(InvalidRequest) as exc_info:
        p.validate()
    assert exc_info.value.param == "top_p"


def test_invalid_request_param_defaults_to_none():
    e = InvalidRequest("bad")
    assert e.param is None
    assert str(e) == "bad"
