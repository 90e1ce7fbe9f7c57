"""Redaction for anything apishield logs that came from outside (checklist F6).

Upstream error bodies are logged so operators can debug what the client no longer sees,
but they are where secrets leak (a DSN with a password in a stack trace, a token echoed
in an error). Logged text is truncated and known secret shapes are masked first.
"""

from __future__ import annotations

import re

_SECRET_ASSIGNMENT = re.compile(
    r"(?i)\b(password|passwd|pwd|secret|token|api[_-]?key|apikey|authorization|"
    r"access[_-]?key|private[_-]?key|session|cookie)\b(\s*[\"']?\s*[=:]\s*)"
    r"(\"[^\"]*\"|'[^']*'|[^\s,;&\"'}]+)"
)
_BEARER = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}")
_URL_CREDENTIALS = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^\s/:@]+:[^\s/@]+@")
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*")
# an apishield API key (`ask_<id>_<secret>`, see auth/apikeys.py) anywhere in the text
_API_KEY = re.compile(r"\bask_[a-z2-7]{4,32}_[A-Za-z0-9_-]{16,}")
MAX_LOGGED = 512


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(char, f"\\x{ord(char):02x}")


def redact(text: str, limit: int = MAX_LOGGED) -> str:
    """`text` with secrets masked, cut to `limit` characters, on one line (control
    characters escaped, so an upstream cannot forge log lines)."""
    text = _URL_CREDENTIALS.sub(r"\1<redacted>@", text)
    text = _BEARER.sub(r"\1 <redacted>", text)
    text = _JWT.sub("<redacted-jwt>", text)
    text = _API_KEY.sub("<redacted-api-key>", text)
    text = _SECRET_ASSIGNMENT.sub(r"\1\2<redacted>", text)
    if len(text) > limit:
        text = text[:limit] + "...(truncated)"
    return _CONTROL.sub(_escape, text)
