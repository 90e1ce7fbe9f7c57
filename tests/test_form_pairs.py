"""`steps.validate.form_pairs`: the query and form parser, the same pairs as `parse_qsl`
(keep_blank_values, strict UTF-8) on every input, on its fast path (no `%`, no `+`) and
off it (issue 18)."""

from __future__ import annotations

from urllib.parse import parse_qsl

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apishield.steps.validate import form_pairs


def reference(data: bytes) -> list[tuple[str, str]]:
    return parse_qsl(data.decode("ascii"), keep_blank_values=True, encoding="utf-8",
                     errors="strict")


@pytest.mark.parametrize("query", [
    b"", b"&", b"&&a=1&&", b"a", b"a=", b"=", b"=x", b"a=b=c", b"limit=10", b"a=1&a=2&b",
    b"q=a+b", b"q=%41%2B", b"q=caf%C3%A9", b"x;y=1", b"a[b]=1&a[c]=2", b" a = b ",
])
def test_same_pairs_as_parse_qsl(query):
    assert form_pairs(query) == reference(query)


@settings(max_examples=800, deadline=None)
@given(st.lists(st.sampled_from(["a", "b", "=", "&", "+", "%", "%41", "%C3%A9", ";", " ", "[",
                                 "]", "x1", ""]), max_size=12).map("".join))
def test_same_pairs_or_the_same_error(text):
    data = text.encode()
    try:
        expected = reference(data)
    except (UnicodeDecodeError, ValueError) as exc:
        with pytest.raises(type(exc)):
            form_pairs(data)
        return
    assert form_pairs(data) == expected


def test_a_non_ascii_byte_is_refused_as_before():
    with pytest.raises(UnicodeDecodeError):
        form_pairs("q=é".encode())
