"""libinjection's SQLi function called directly, returning a bool (issue 18).

The Python binding (`libinjection-python`) answers each call with a dict holding the
whole token vector: `is_sql_injection` cost ~3.8 us a call in a loop, for an answer the
scan reads one bool of. The binding's extension module exports the C API itself
(`libinjection_sqli(const char *, size_t, char fingerprint[])`), so ctypes calls it with
no compiler and no new dependency: ~2.0 us (bench/RESULTS.md, issue 18). XSS stays on
the Python API: `is_xss` returns a two-key dict, and at ~1.1 us it is cheaper than the
ctypes call of `libinjection_xss` (~1.5 us: argument conversion and the UTF-8 copy cost
more than the dict it saves).

Pinned, not trusted: at load the symbol must exist and agree with the dict API on
`SAMPLES` (payloads and ordinary text, ASCII and not); otherwise the dict API is used,
with one warning. Both paths give the same answers (tests/test_libinjection_c.py).

Loaded with `ctypes.PyDLL`, which keeps the GIL during the call: a call is a few
microseconds, and releasing the GIL for it (`CDLL`) would let a validation thread that
gives it up wait for the event loop's thread at every string (the interpreter's 5 ms
switch interval) and would make the shared fingerprint buffer a race.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import libinjection

logger = logging.getLogger("apishield")

# Fixed strings the C functions must answer as the dict API does: SQLi and XSS payloads
# (quoted, numeric, comment, keyword-only, stacked), markup, and text that is neither.
SAMPLES = (
    "1' or '1'='1", "' OR 1=1 --", "1 union select null, null", "1 order by 1",
    "admin'--", "1; DROP TABLE users", "-1 or 1", "1) or sleep(5)#",
    "<script>alert(1)</script>", "<img src=x onerror=alert(1)>", "javascript:alert(1)",
    "<a href=\"javascript:x\">", "<svg/onload=alert(1)>",
    "O'Brien", "Tom & Jerry", "pack with the small blue widgets, keep dry",
    "the cat and the hat", "a < b and c > d", "x = 1", "café 'crème' <b>", "",
)


@dataclass(frozen=True)
class Binding:
    """The two detectors and where SQLi's comes from (`c` or `dict`)."""

    sqli: Callable[[str], bool]
    xss: Callable[[str], bool]
    kind: str


def dict_sqli(text: str) -> bool:
    try:
        return bool(libinjection.is_sql_injection(text)["is_sqli"])
    except UnicodeEncodeError:
        # a lone surrogate (`"\\ud800"` in JSON): the body step refuses such a body
        # whatever the scan says (body-lone-surrogate); parameters cannot hold one
        return False


def dict_xss(text: str) -> bool:
    try:
        return bool(libinjection.is_xss(text)["is_xss"])
    except UnicodeEncodeError:
        return False


DICT_API = Binding(dict_sqli, dict_xss, "dict")


def load(path: str | None = None, sqli_symbol: str = "libinjection_sqli") -> Binding:
    """The C SQLi function of the library at `path` (the binding's own extension module
    by default), checked against the dict API on `SAMPLES`; the dict API when it is
    missing or disagrees (logged). The symbol name is a parameter so that a test can
    point it at a function that disagrees."""
    where = path or str(libinjection.__file__)
    try:
        c_sqli = getattr(ctypes.PyDLL(where), sqli_symbol)
    except (OSError, AttributeError) as exc:
        return _fallback(f"the C function is not exported by {where} ({exc})")
    c_sqli.argtypes = (ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p)
    c_sqli.restype = ctypes.c_int
    # libinjection writes at most 5 tokens + NUL; one buffer serves every call (the GIL
    # is held during a call, see above)
    fingerprint = ctypes.create_string_buffer(32)

    def sqli(text: str) -> bool:
        data = text.encode("utf-8", "surrogatepass")
        return int(c_sqli(data, len(data), fingerprint)) != 0

    for sample in SAMPLES:
        if sqli(sample) != dict_sqli(sample):
            return _fallback(f"the C function of {where} disagrees with the Python API "
                             f"on a fixed sample")
    return Binding(sqli, dict_xss, "c")


def _fallback(why: str) -> Binding:
    logger.warning("libinjection: %s; using the Python API (slower, same answers)", why)
    return DICT_API


@cache
def binding() -> Binding:
    """The process's binding, loaded (and checked) once, on first use: when the first
    pipeline is built, after logging is set up, so the warning is a JSON line."""
    return load()
