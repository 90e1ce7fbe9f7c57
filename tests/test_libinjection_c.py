"""libinjection's C SQLi function through ctypes (issue 18): the same answers as the
Python API on every corpus, and the fallback to the Python API when the C function is
missing or disagrees, forced here with real libraries (no mock)."""

from __future__ import annotations

import ctypes.util
import logging
import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apishield.config import Injection
from apishield.steps import libinjection_c
from apishield.steps.injection import Detector
from apishield.steps.libinjection_c import DICT_API, SAMPLES, dict_sqli, dict_xss, load
from tests.test_injection_corpus import lines

# SQL injection and XSS payloads beside the corpora's shell ones and ordinary text
PAYLOADS = [
    "1' or '1'='1", "admin'--", "' UNION SELECT username, password FROM users --",
    "1 union all select 1,2,3", "1) AND SLEEP(5)#", "1; WAITFOR DELAY '0:0:5'--",
    "-1 or 1", "1 or 1 limit 1", "' or ''='", "\" or \"\"=\"", "1'; DROP TABLE t; --",
    "<script>alert(document.cookie)</script>", "<img src=x onerror=alert(1)>",
    "<svg onload=alert(1)>", "javascript:alert(1)", "<iframe src=\"javascript:x\">",
    "<body onload=alert(1)>", "<a href='javas&#99;ript:x'>x</a>",
]


def texts() -> list[str]:
    """Every corpus string, plus seeded random strings of SQL/markup/shell characters,
    words and non-ASCII letters (the same each run)."""
    found = [*SAMPLES, *PAYLOADS, *lines("shell_payloads.txt"), *lines("ordinary_text.txt")]
    pieces = ["'", '"', "`", " ", "1", "or", "and", "union", "select", "=", "--", "/*", "#",
              "(", ")", ";", "<", ">", "script", "img", "onerror", "src", "x", "é", "日本",
              "&", "|", "\\", ":", "javascript", "null", "from", "users"]
    rng = random.Random(18)
    found += ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 12)))
              for _ in range(3000)]
    return found


def test_the_c_functions_are_used_on_the_pinned_binding():
    assert libinjection_c.binding().kind == "c"
    assert Detector(Injection())._sqli is libinjection_c.binding().sqli


def test_c_and_python_api_agree_on_every_corpus():
    binding = load()
    assert binding.kind == "c"
    texts_ = texts()
    disagree = [t for t in texts_ if binding.sqli(t) != dict_sqli(t)]
    assert disagree == []
    assert binding.xss is dict_xss  # measured cheaper than its ctypes call
    # the corpus exercises both answers of both detectors
    assert {binding.sqli(t) for t in texts_} == {True, False}
    assert {binding.xss(t) for t in texts_} == {True, False}


def test_a_missing_c_function_falls_back_to_the_python_api(caplog):
    libc = ctypes.util.find_library("c")
    assert libc is not None
    with caplog.at_level(logging.WARNING, logger="apishield"):
        binding = load(libc)
    assert binding is DICT_API
    assert "not exported" in caplog.text and "using the Python API" in caplog.text


def test_a_c_function_that_disagrees_fall_back_to_the_python_api(caplog):
    # libinjection's XSS function where SQLi is expected: real C code (same arguments,
    # the third ignored) that answers differently
    with caplog.at_level(logging.WARNING, logger="apishield"):
        binding = load(None, sqli_symbol="libinjection_xss")
    assert binding is DICT_API
    assert "disagree" in caplog.text


@pytest.mark.parametrize("binding", [load(), DICT_API], ids=["c", "dict"])
def test_the_detector_answers_the_same_on_either_binding(binding):
    detector = Detector(Injection(), binding)
    reference = Detector(Injection(), DICT_API)
    assert detector.check("1' or '1'='1") == "sql-injection"
    assert detector.check("<script>alert(1)</script>") == "xss"
    assert detector.check("; cat /etc/passwd") == "shell-injection"
    assert detector.check("O'Brien") is None
    for text in texts():
        assert detector.check(text) == reference.check(text), text


@pytest.mark.parametrize("binding", [load(), DICT_API], ids=["c", "dict"])
def test_a_lone_surrogate_does_not_raise(binding):
    # a JSON body may hold "\ud800" (refused after the walk that scans it)
    assert binding.sqli("\ud800' or 1=1 --") in (True, False)
    assert binding.xss("\ud800<script>") in (True, False)


ANY_CHARS = re.compile(r"['\"`;#=()|&\\<>:\n$]|--|/\*")  # the union, as a regex


def test_the_one_prefilter_sees_every_character_the_three_look_for():
    """`_plain` skips exactly the strings with none of the SQL, XSS and shell prefilters'
    characters: a string it skips is one none of them would have passed on (issue 18)."""
    from apishield.steps import injection

    for code in range(0x80):
        for text in (chr(code), "a" + chr(code) + "b"):
            needed = (injection._SQL_CHARS.search(text) or injection._XSS_CHARS.search(text)
                      or injection._SHELL_CHARS.search(text))
            plain = injection._plain(injection.lowered(text))
            assert bool(needed) == (not plain), repr(text)
            assert bool(ANY_CHARS.search(text)) == (not plain), repr(text)
    for pair in ("--", "/*", "a--b", "x/*y"):
        assert injection._SQL_CHARS.search(pair) and not injection._plain(injection.lowered(pair))
    for near in ("-", "/", "-/", "/-", "*/", "a-b-c", "a/b*c", "\ud800-\ud800", "é-/è"):
        assert injection._plain(injection.lowered(near)), near


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet=st.characters(exclude_categories=()), max_size=30))
def test_plain_means_what_the_union_regex_means(text):
    """Any text, lone surrogates included (a JSON body may hold `\\ud800`)."""
    from apishield.steps import injection

    assert injection._plain(injection.lowered(text)) == (ANY_CHARS.search(text) is None)
