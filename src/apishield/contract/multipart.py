"""`multipart/form-data` request bodies (RFC 7578), read strictly.

python-multipart's streaming parser (the one Starlette uses) finds the delimiters. On top
of it this module refuses what two parsers could read differently, since the upstream
parses the same bytes after the gateway has checked them:

- the boundary must be given once and be valid (RFC 2046 5.1.1: 1-70 characters from a
  small set, not ending in a space); a preamble other than blank lines is refused, and so
  is a body that stops before its closing delimiter;
- every part has exactly one `Content-Disposition: form-data; name=...`, no `name*` or
  `filename*` (RFC 7578 4.2 forbids them, and a parser that honours them would read
  another name than one that does not), at most one `Content-Type`, and no
  `Content-Transfer-Encoding` other than the identity ones (7bit, 8bit, binary): a
  base64 part would be checked encoded and used decoded;
- the number of parts and the size of each part are capped while parsing, so a body with
  100 000 empty parts or one huge part costs no more than the caps allow.

What the parts mean (text or file, their types, the schema) is `steps/validate.py`'s job.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser

MULTIPART = "multipart/form-data"

_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
# `; name=value` with value a token or a quoted-string (RFC 9110 5.6.6); bytes >= 0x80
# are allowed inside quotes (browsers send UTF-8 field and file names there).
_PARAM = re.compile(
    rb"[ \t]*;[ \t]*(" + _TOKEN + rb")=(" + _TOKEN
    + rb'|"(?:[^"\\\x00-\x08\x0a-\x1f\x7f]|\\[^\x00-\x08\x0a-\x1f\x7f])*")[ \t]*')
_QUOTED_PAIR = re.compile(rb"\\(.)")
# RFC 2046 5.1.1: boundary := 0*69<bchars> bcharsnospace
_BOUNDARY = re.compile(rb"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]\Z")
_IDENTITY_ENCODINGS = frozenset({b"7bit", b"8bit", b"binary"})

# The parser logs a warning (quoting the offending byte) for every malformed body it sees:
# a client could fill the log with them. Refusals are logged by the access log instead.
_QUIET = logging.Logger("apishield.multipart.parser", level=logging.CRITICAL + 1)


class MultipartError(ValueError):
    """The body cannot be read as a form. `reason` is short and machine-readable; `name`
    the field concerned, when known (for the pointer); `too_large` a part over its cap."""

    def __init__(self, reason: str, name: str | None = None, *, too_large: bool = False
                 ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.name = name
        self.too_large = too_large


@dataclass(slots=True)
class Part:
    name: str
    filename: bytes | None  # None: no `filename` parameter (a text field, unless declared)
    media: str | None  # the part's own media type, lower case; None: none was sent
    charset: bytes | None  # its `charset` parameter, lower case
    data: bytes


def parameters(value: bytes) -> tuple[bytes, dict[bytes, bytes]] | None:
    """`type; a=1; b="x"` -> (`type` lower case, {name lower case: unquoted value}); None
    when it does not parse or names a parameter twice."""
    head, sep, rest = value.partition(b";")
    found: dict[bytes, bytes] = {}
    position = 0
    rest = sep + rest
    while position < len(rest):
        match = _PARAM.match(rest, position)
        if match is None:
            return None
        name = match.group(1).lower()
        raw = match.group(2)
        if name in found:
            return None
        found[name] = _QUOTED_PAIR.sub(rb"\1", raw[1:-1]) if raw.startswith(b'"') else raw
        position = match.end()
    return head.strip().lower(), found


def boundary_of(content_type: bytes) -> bytes:
    """The boundary of a `multipart/form-data` Content-Type, checked (RFC 2046 5.1.1)."""
    parsed = parameters(content_type)
    if parsed is None:
        raise MultipartError("content-type-invalid")
    boundary = parsed[1].get(b"boundary")
    if boundary is None:
        raise MultipartError("boundary-missing")
    if not _BOUNDARY.match(boundary):
        raise MultipartError("boundary-invalid")
    return boundary


def parse(body: bytes, boundary: bytes, *, max_parts: int, max_part_bytes: int
          ) -> list[Part]:
    """The parts of a complete body, in order; MultipartError for anything malformed."""
    parts: list[Part] = []
    headers: list[tuple[bytes, bytes]] = []
    field = bytearray()
    value = bytearray()
    chunks: list[bytes] = []
    size = 0
    current: Part | None = None
    ended = False

    def on_part_begin() -> None:
        nonlocal size, current
        if len(parts) >= max_parts:
            raise MultipartError("too-many-parts")
        headers.clear()
        chunks.clear()
        size = 0
        current = None

    def on_header_field(data: bytes, start: int, end: int) -> None:
        field.extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        value.extend(data[start:end])

    def on_header_end() -> None:
        headers.append((bytes(field).lower(), bytes(value).strip(b" \t")))
        field.clear()
        value.clear()

    def on_headers_finished() -> None:
        nonlocal current
        current = _part(headers)

    def on_part_data(data: bytes, start: int, end: int) -> None:
        nonlocal size
        size += end - start
        if size > max_part_bytes:
            raise MultipartError("part-too-large", current.name if current else None,
                                 too_large=True)
        chunks.append(data[start:end])

    def on_part_end() -> None:
        if current is None:  # a part whose headers never ended
            raise MultipartError("malformed")
        current.data = b"".join(chunks)
        parts.append(current)

    def on_end() -> None:
        nonlocal ended
        ended = True

    parser = MultipartParser(boundary, {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field,
        "on_header_value": on_header_value, "on_header_end": on_header_end,
        "on_headers_finished": on_headers_finished, "on_part_data": on_part_data,
        "on_part_end": on_part_end, "on_end": on_end,
    })
    parser.logger = _QUIET
    try:
        parser.write(body)
    except FormParserError:
        raise MultipartError("malformed") from None
    if not ended:
        raise MultipartError("truncated")  # no closing delimiter: the body was cut
    return parts


def _part(headers: list[tuple[bytes, bytes]]) -> Part:
    """A part from its header lines; refuses what could be read two ways."""
    seen: dict[bytes, bytes] = {}
    for header, value in headers:
        if header in seen:
            raise MultipartError("part-header-repeated")
        seen[header] = value
    disposition = seen.get(b"content-disposition")
    if disposition is None:
        raise MultipartError("content-disposition-missing")
    parsed = parameters(disposition)
    if parsed is None or parsed[0] != b"form-data":
        raise MultipartError("content-disposition-invalid")
    params = parsed[1]
    if any(key.endswith(b"*") for key in params):
        raise MultipartError("content-disposition-extended")  # RFC 7578 4.2
    raw_name = params.get(b"name")
    if raw_name is None:
        raise MultipartError("content-disposition-invalid")
    try:
        name = raw_name.decode("utf-8")
    except UnicodeDecodeError:
        raise MultipartError("field-name-not-utf8") from None
    encoding = seen.get(b"content-transfer-encoding")
    if encoding is not None and encoding.lower() not in _IDENTITY_ENCODINGS:
        raise MultipartError("part-transfer-encoding", name)
    media: str | None = None
    charset: bytes | None = None
    content_type = seen.get(b"content-type")
    if content_type is not None:
        typed = parameters(content_type)
        if typed is None or b"/" not in typed[0]:
            raise MultipartError("part-content-type-invalid", name)
        media = typed[0].decode("latin-1")
        charset = typed[1].get(b"charset")
        charset = charset.lower() if charset is not None else None
    return Part(name=name, filename=params.get(b"filename"), media=media, charset=charset,
                data=b"")
