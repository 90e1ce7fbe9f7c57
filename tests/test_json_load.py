"""The body step parses JSON with the C scanner directly (`BodyStep._load`), not through
`json.JSONDecoder.decode`'s two interpreted frames (issue 18): the same documents, and the
same texts refused, as `decode` with the same hook. Whitespace before and after the value
is JSON's own four characters only (RFC 8259 2); anything else after the value is refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apishield.config import config_from_dict
from apishield.contract.loader import load_contract
from apishield.problems import BadRequest
from apishield.steps import validate

DEMO = Path(__file__).resolve().parents[1] / "src" / "apishield" / "demo"


@pytest.fixture(scope="module")
def body_step() -> validate.BodyStep:
    config = config_from_dict({"contract": "openapi.yaml",
                               "upstream": {"url": "http://127.0.0.1:9"}}, source_dir=DEMO)
    return validate.build(load_contract(config), config.validation)[1]


def _oracle(text: str) -> Any:
    """What `json.JSONDecoder(...).decode` says, or the exception class it raises."""
    try:
        return json.JSONDecoder().decode(text)
    except json.JSONDecodeError:
        return json.JSONDecodeError


def _ours(step: validate.BodyStep, text: str) -> Any:
    try:
        return step._load(text.encode("utf-8"), b"application/json")[0]
    except BadRequest as problem:
        assert problem.reason == "body-malformed-json", problem.reason
        return json.JSONDecodeError


values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=8)
spaces = st.text(alphabet=" \t\n\r\x0b\x0c\u00a0", max_size=3)
tails = st.sampled_from(["", "", "x", "{}", ",", "]", "0", "\x00", "//", " \n"])


@settings(max_examples=400, deadline=None)
@given(before=spaces, value=values, after=spaces, tail=tails)
def test_same_document_or_refusal_as_decode(body_step, before, value, after, tail):
    text = before + json.dumps(value) + after + tail
    assert _ours(body_step, text) == _oracle(text)


@pytest.mark.parametrize("text", ["", " ", "\n\t\r ", "{", "{} {}", "[] x", "1 2", "nul",
                                  "\u00a0{}", "{}\u00a0", "\x0c[]", "\"a\"", " 3 ", "{}\n"])
def test_edge_texts(body_step, text):
    assert _ours(body_step, text) == _oracle(text)
