"""Request-target normalization: one decoding, one canonical form, or a refusal.

A security layer and the application behind it must agree on which resource a URL names
(fastapi-guard GHSA-f2vm-w8gq-h378 shows what happens when they do not). Instead of
"cleaning" ambiguous paths into something the upstream might read differently, apishield
accepts only paths whose meaning is unambiguous and refuses the rest (checklist B3):

- origin-form only (`/path?query`, RFC 9112 3.2.1); absolute-form and `*` are refused;
- percent-decoding happens once; a `%` not followed by two hex digits, an encoded `/` or
  `\\`, a decoded control character, or a decoded `%XX` (double encoding) is refused;
- the decoded path must be UTF-8;
- `.` and `..` segments (also as `%2e`, and `..;x` which servlet containers read as `..`)
  and empty segments (`//`) are refused, as is `\\`.

The raw target is what goes to the upstream, so both sides read the same bytes.
"""

from __future__ import annotations

import re

from apishield.problems import BadRequest

_PERCENT = re.compile(rb"%([0-9A-Fa-f]{2})?")
_DOUBLE_ENCODED = re.compile(r"%[0-9A-Fa-f]{2}")
_FORBIDDEN_DECODED = frozenset(b"/\\") | frozenset(range(0x20)) | {0x7F}


def split_target(target: bytes) -> tuple[bytes, bytes]:
    """Split an origin-form request target into (raw path, raw query)."""
    if not target.startswith(b"/"):
        raise BadRequest("target-not-origin-form", close=True)
    if b"#" in target:
        raise BadRequest("target-has-fragment", close=True)
    path, _, query = target.partition(b"?")
    return path, query


def normalize_path(raw: bytes) -> str:
    """Decode a raw path once and refuse every ambiguous form (see module docstring)."""
    if b"\\" in raw:
        raise BadRequest("path-backslash")
    if b"%" in raw:
        decoded = _percent_decode(raw)
    else:
        decoded = raw
    try:
        path = decoded.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("path-invalid-utf8") from None
    if "%" in path and _DOUBLE_ENCODED.search(path):
        raise BadRequest("path-double-encoded")
    if "//" in path or "/." in path:
        _check_segments(path)
    return path


def _percent_decode(raw: bytes) -> bytes:
    out = bytearray()
    last = 0
    for match in _PERCENT.finditer(raw):
        hexdigits = match.group(1)
        if hexdigits is None:
            raise BadRequest("path-bad-percent-encoding")
        value = int(hexdigits, 16)
        if value in _FORBIDDEN_DECODED:
            raise BadRequest("path-encoded-separator-or-control")
        out += raw[last : match.start()]
        out.append(value)
        last = match.end()
    out += raw[last:]
    return bytes(out)


def _check_segments(path: str) -> None:
    segments = path.split("/")[1:]
    for index, segment in enumerate(segments):
        if segment in (".", "..") or segment.split(";", 1)[0] in (".", ".."):
            # `..;/` is a dot segment to servlet containers (path parameters, RFC 3986 3.3)
            raise BadRequest("path-dot-segment")
        if segment == "" and index != len(segments) - 1:
            raise BadRequest("path-empty-segment")
