"""Redaction for anything apishield logs that came from outside (checklist F6).

Upstream error bodies are logged so operators can debug what the client no longer sees,
but they are where secrets leak (a DSN with a password in a stack trace, a token echoed
in an error). Logged text is truncated and known secret shapes are masked first.

A secret is as often logged encoded as plain: a URL or form body holds
`x-api-key%3A%20ask_...` or `Bearer+eyJ...`, a JSON string `\\"password\\": ...` or
`\\u0020`, and an error that quotes either encodes it once more (`%253A`). So the patterns
are not run on the text alone but on decoded views of it: each view undoes one more level
of percent escapes (`%3a`, `%3A`) and JSON string escapes (`\\uXXXX`, `\\"`, `\\/`, ...),
in two chains: one reads `+` as it is, the other also as a space at every level before
undoing its escapes (form encoding, as `unquote_plus` does). Every character of a view
knows the span of the original it came from, so a secret found in any view masks exactly
the original characters it was written with; what is logged is the original text, masked.

Cost stays linear in the text: at most `3 * (_MAX_DEPTH + 1)` views, each built in one
pass, and no pattern can backtrack more than once over a run of characters. A pattern
starts only where a run of its alphabet begins (a lookbehind, not `\\b`), its quantifiers
are never adjacent over the same characters, and a quoted value may stay unclosed rather
than be retried. Only the first `SCANNED * limit` characters are looked at (no more can
reach the log line).

Operators add their own names (`redact: {fields: [ssn, x-internal-token]}`, body field
and header names): `protect()` compiles them into one more name-value pattern of the same
shape as the built-in one, once, when a config is loaded. The set only grows in a process
(two middlewares with different lists both get theirs): more masking never leaks.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

MAX_LOGGED = 512
SCANNED = 4  # characters looked at, per character logged
_MAX_DEPTH = 3  # levels of encoding seen through: %25253A (three) is still a colon

_REDACTED = "<redacted>"

# (pattern, the group holding the secret, what replaces it)
_PATTERNS: tuple[tuple[re.Pattern[str], int, str], ...] = (
    # scheme://user:password@host: the userinfo (the scheme starts where its run starts)
    (re.compile(r"(?i)(?<![a-z0-9+.-])[a-z][a-z0-9+.-]*://([^\s/:@]+:[^\s/@]+)@"), 1,
     _REDACTED),
    # a whole header-like value: cookies hold several secrets, Authorization any scheme
    (re.compile(r"(?i)(?<![a-z0-9])(?:proxy-authorization|authorization|set-cookie|cookie)"
                r"(?![a-z0-9])[ \t]*(?:[\"'][ \t]*)?[=:][ \t]*"
                r"(\"(?:[^\"\\\r\n]|\\.)*\"?|'[^'\r\n]*'?|[^\r\n\"'\\]+)"), 1, _REDACTED),
    (re.compile(r"(?i)(?<![a-z0-9])(?:bearer|basic)\s+([A-Za-z0-9._~+/=-]{8,})"), 1,
     _REDACTED),
    # a JWT (or a cut one: the log sample may end inside it): base64url of `{"...`
    (re.compile(r"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]{5,}(?:\.[A-Za-z0-9_-]*){0,2}"), 0,
     "<redacted-jwt>"),
    # an apishield API key (`ask_<id>_<secret>`, see auth/apikeys.py) anywhere in the text
    (re.compile(r"(?<![A-Za-z0-9_-])ask_[a-z2-7]{4,32}_[A-Za-z0-9_-]{16,}"), 0,
     "<redacted-api-key>"),
    # name = value, name: value, "name": "value" (access_token, client_secret, x-api-key..)
    (re.compile(r"(?i)(?<![a-z0-9])(?:password|passwd|pwd|secret|token|api[_-]?key|apikey|"
                r"access[_-]?key|private[_-]?key|session(?:[_-]?id)?)(?![a-z0-9])"
                r"\s*(?:[\"']\s*)?[=:]\s*"
                r"(\"(?:[^\"\\\r\n]|\\.)*\"?|'[^'\r\n]*'?|[^\s,;&\"'}]+)"), 1, _REDACTED),
)

# one escape of the encodings seen through: percent (RFC 3986), JSON string (RFC 8259 7)
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})|\\(?:u([0-9A-Fa-f]{4})|([\"\\/bfnrt]))")
_JSON_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r",
                 "t": "\t"}

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# what masking wrote: a value that is only these (or a password `***` as `redact_url`
# writes it) is not masked again, so text redacted twice (an upstream body, then the log
# line holding it) keeps what the first pass left readable
_LABELS = re.compile(r"<redacted(?:-jwt|-api-key)?>")
_MASKED_USERINFO = re.compile(r"[^:]*:\*+")


def _masked(value: str) -> bool:
    """Whether a secret's value is only what masking already wrote."""
    return (not _LABELS.sub("", value).strip(" \"'")
            or _MASKED_USERINFO.fullmatch(value) is not None)

_configured: frozenset[str] = frozenset()
_extra: tuple[tuple[re.Pattern[str], int, str], ...] = ()


def _name_value(names: str) -> re.Pattern[str]:
    """`name = value`, `name: value`, `"name": "value"` for the alternation `names`; the
    name stands alone (no letter, digit, `_` or `-` glued to it on either side)."""
    return re.compile(r"(?i)(?<![a-z0-9_-])(?:" + names + r")(?![a-z0-9_-])"
                      r"\s*(?:[\"']\s*)?[=:]\s*"
                      r"(\"(?:[^\"\\\r\n]|\\.)*\"?|'[^'\r\n]*'?|[^\s,;&\"'}]+)")


def protect(fields: tuple[str, ...] | list[str]) -> None:
    """Mask the values of these body field and header names too, from now on, in every
    text `redact` sees (compiled here once; per call only when the set grows)."""
    global _configured, _extra
    names = _configured | {name.lower() for name in fields}
    if names == _configured:
        return
    _configured = frozenset(names)
    alternation = "|".join(re.escape(name) for name in sorted(names, key=len, reverse=True))
    _extra = ((_name_value(alternation), 1, _REDACTED),)


def protected() -> frozenset[str]:
    """The configured names (lowercase) masked on top of the built-in ones."""
    return _configured


class _View:
    """A decoded reading of the original text: character i came from original[lo[i]:hi[i]]."""

    __slots__ = ("hi", "lo", "text")

    def __init__(self, text: str, lo: list[int], hi: list[int]) -> None:
        self.text, self.lo, self.hi = text, lo, hi

    def decoded(self) -> _View | None:
        """This view with one level of escapes undone; None when it holds none."""
        text, lo, hi = self.text, self.lo, self.hi
        out: list[str] = []
        new_lo: list[int] = []
        new_hi: list[int] = []
        done = 0
        for match in _ESCAPE.finditer(text):
            start, end = match.span()
            out.append(text[done:start])
            new_lo += lo[done:start]
            new_hi += hi[done:start]
            hex2, hex4, simple = match.groups()
            out.append(chr(int(hex2 or hex4, 16)) if simple is None else _JSON_ESCAPES[simple])
            new_lo.append(lo[start])
            new_hi.append(hi[end - 1])
            done = end
        if not out:
            return None
        out.append(text[done:])
        new_lo += lo[done:]
        new_hi += hi[done:]
        return _View("".join(out), new_lo, new_hi)


def _views(text: str) -> Iterator[_View]:
    """The text and its decoded readings, each level once as written and, for the form
    chain, once more with `+` as a space (then decoded, as `unquote_plus` does): a form
    value is read right at the level where its `+` still is one."""
    original = _View(text, list(range(len(text))), list(range(1, len(text) + 1)))
    for form in (False, True):
        view = original
        for _ in range(_MAX_DEPTH + 1):
            yield view
            if form and "+" in view.text:
                view = _View(view.text.replace("+", " "), view.lo, view.hi)
                yield view
            following = view.decoded()
            if following is None:
                break
            view = following


def _secret_spans(text: str) -> list[tuple[int, int, str]]:
    """(start, end, label) of every secret found in any view of `text`, in its offsets."""
    spans: list[tuple[int, int, str]] = []
    seen: set[str] = set()
    for view in _views(text):
        if view.text in seen:
            continue
        seen.add(view.text)
        for pattern, group, label in (*_PATTERNS, *_extra):
            for match in pattern.finditer(view.text):
                start, end = match.span(group)
                if start < end and not _masked(view.text[start:end]):
                    spans.append((view.lo[start], view.hi[end - 1], label))
    return spans


def _mask(text: str) -> str:
    """`text` with each run of overlapping secret spans replaced by one label: the specific
    one (`<redacted-jwt>`, `<redacted-api-key>`) when a span of that kind covers the whole
    run, else `<redacted>`."""
    spans = sorted(_secret_spans(text))
    out: list[str] = []
    done = index = 0
    while index < len(spans):
        start, end, _ = spans[index]
        group = [spans[index]]
        index += 1
        while index < len(spans) and spans[index][0] < end:  # overlapping: one mask
            end = max(end, spans[index][1])
            group.append(spans[index])
            index += 1
        labels = {label for s, e, label in group if (s, e) == (start, end)} - {_REDACTED}
        out.append(text[done:start])
        out.append(labels.pop() if len(labels) == 1 else _REDACTED)
        done = end
    out.append(text[done:])
    return "".join(out)


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(char, f"\\x{ord(char):02x}")


def redact(text: str, limit: int = MAX_LOGGED, *, one_line: bool = True) -> str:
    """`text` with secrets masked (in whatever encoding they were written), cut to `limit`
    characters, on one line (control characters escaped, so an upstream cannot forge log
    lines). `one_line=False` keeps the text's lines (a traceback inside a JSON string,
    where the JSON escaping already keeps it on one log line)."""
    scanned = text[: SCANNED * limit]
    masked = _mask(scanned)
    if len(masked) > limit or len(scanned) < len(text):
        masked = masked[:limit] + "...(truncated)"
    return _CONTROL.sub(_escape, masked) if one_line else masked
