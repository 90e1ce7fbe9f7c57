"""The SQL keyword rule of the injection prefilter (steps/injection.py) gives the answers
of its definition: a space, and a maximal run of `[a-z_]` in the lower-cased text that is
an SQL keyword. The rule works on bytes now (issue 18: non-ASCII characters replaced,
every byte outside `[a-z_]` a space, `split()`); the reference here is the definition as
first written (`findall` into words, a set test)."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from apishield.steps.injection import _SQL_WORDS, _sql_words, lowered

_WORD = re.compile(r"[a-z_]+")


def rule(value: str) -> bool:
    """The rule as Detector.check calls it."""
    return _sql_words(value, lowered(value))


def reference(value: str, words: frozenset[str] = _SQL_WORDS) -> bool:
    return re.search(r"\s", value) is not None and not words.isdisjoint(
        _WORD.findall(value.lower()))


def test_the_keywords_and_their_neighbours():
    assert rule("1 union all")
    assert rule("ORDER by")  # case folds
    assert rule("pick one or two")
    assert not rule("or")  # no space: one token cannot be an injection
    assert not rule("the ordering of things")  # `or`, `order` inside a word
    assert not rule("sql_or x")  # `_` joins a token
    assert not rule("x or_ y")
    assert rule("9or 1")  # a digit ends a token
    assert rule("a\tselect")
    assert not rule("keep dry, deliver to the loading bay at the back")
    assert rule("the cat and the hat")
    assert rule("\ud800 or x")  # a lone surrogate (a JSON escape) is no letter
    assert rule("\u212a or x") and not rule("\u212aor x")  # KELVIN SIGN: k


# Keyword fragments, separators and characters whose lower case is not one ASCII letter.
_PIECES = st.sampled_from([
    *sorted(_SQL_WORDS), "o", "r", "de", "ta", "_", " ", "\t", "\n", ",", "1", "x", "İ",
    "K", "é", "ß", "-", "S", "ELECT", "Or", "aNd", "orde", "unio", "nul"])


@settings(max_examples=600, deadline=None)
@given(st.lists(_PIECES, max_size=12).map("".join))
def test_same_answers_as_the_definition(value):
    assert rule(value) == reference(value)


@settings(max_examples=600, deadline=None)
@given(st.text(max_size=40))
def test_same_answers_on_any_text(value):
    """Any text: characters whose lower case is ASCII (KELVIN SIGN) or longer (İ),
    separators of every kind."""
    assert rule(value) == reference(value)
    assert rule(value + " or") == reference(value + " or")
