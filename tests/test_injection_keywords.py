"""The SQL keyword rule of the injection prefilter (steps/injection.py) gives the answers
of its definition: a space, and a maximal run of `[a-z_]` in the lower-cased text that is
an SQL keyword. The rule is a merged-trie regex now (issue 18); the reference here is the
definition as first written (`findall` into words, a set test)."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from apishield.steps.injection import _SQL_WORDS, _sql_words, keyword_pattern

_WORD = re.compile(r"[a-z_]+")


def reference(value: str, words: frozenset[str] = _SQL_WORDS) -> bool:
    return re.search(r"\s", value) is not None and not words.isdisjoint(
        _WORD.findall(value.lower()))


def test_the_keywords_and_their_neighbours():
    assert _sql_words("1 union all")
    assert _sql_words("ORDER by")  # case folds
    assert _sql_words("pick one or two")
    assert not _sql_words("or")  # no space: one token cannot be an injection
    assert not _sql_words("the ordering of things")  # `or`, `order` inside a word
    assert not _sql_words("sql_or x")  # `_` joins a token
    assert not _sql_words("x or_ y")
    assert _sql_words("9or 1")  # a digit ends a token
    assert _sql_words("a\tselect")
    assert not _sql_words("keep dry, deliver to the loading bay at the back")
    assert _sql_words("the cat and the hat")


# Keyword fragments, separators and characters whose lower case is not one ASCII letter.
_PIECES = st.sampled_from([
    *sorted(_SQL_WORDS), "o", "r", "de", "ta", "_", " ", "\t", "\n", ",", "1", "x", "İ",
    "K", "é", "ß", "-", "S", "ELECT", "Or", "aNd", "orde", "unio", "nul"])


@settings(max_examples=600, deadline=None)
@given(st.lists(_PIECES, max_size=12).map("".join))
def test_same_answers_as_the_definition(value):
    assert _sql_words(value) == reference(value)


@settings(max_examples=200, deadline=None)
@given(st.frozensets(st.text(alphabet="abo_", min_size=1, max_size=4), min_size=1,
                     max_size=8),
       st.lists(st.sampled_from(["a", "b", "o", "_", " ", "ab", "bo", "x"]), max_size=10)
       .map("".join))
def test_any_word_set_prefixes_included(words, value):
    """Words that are prefixes of others (`or`, `order`) and share stems."""
    pattern = re.compile(keyword_pattern(words))
    expected = not words.isdisjoint(_WORD.findall(value))
    assert (pattern.search(value) is not None) == expected, pattern.pattern
