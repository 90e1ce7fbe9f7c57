"""Injection defence in depth (checklist B6): SQL injection, XSS and shell payloads in
strings the contract leaves unconstrained.

A contract that says `format: uuid`, `enum` or `pattern` already excludes payloads; a
free-text string does not, so apishield looks at those with libinjection (the C library
behind ModSecurity's `@detectSQLi`/`@detectXSS`, via its Python binding): tokenizers and
fingerprints, not a regex list, so it costs microseconds and does not backtrack. Shell
payloads have no such library; a single linear regex looks for a command separator or
substitution followed by a well-known command (`; cat /etc/passwd`, `$(curl ...)`,
`` `id` ``, `| sh`).

The trade-off (documented in docs/validation.md): a detector can refuse a legitimate
value (a tutorial about SQL in a comment field). Per operation it can be switched off
with `x-apishield: {injection: false}`, and `mode: log-only` shows what it would refuse
before it is enforced.
"""

from __future__ import annotations

import re

import libinjection

from apishield.config import Injection

_SHELL = re.compile(
    r"(?:[;&|\n]|\$\(|`)\s*(?:sudo\s+)?"
    r"(?:sh|bash|zsh|dash|ksh|rm|cat|curl|wget|nc|ncat|netcat|python[0-9.]*|perl|php|ruby|"
    r"chmod|chown|echo|id|whoami|uname|ls|ping|nslookup|powershell|cmd)\b"
    r"|\$\{IFS\}"
)


# Every SQL injection libinjection can fingerprint needs a quote, an operator, a comment
# or two tokens with an SQL keyword; every XSS needs markup, an entity, a script URL or
# handler. A string with none of those skips the tokenizers: each binding call costs
# ~2.5 us (it also builds a Python dict of tokens), a character-class search ~0.1 us.
_SQL_CHARS = re.compile(r"['\"`;#=()|&\\]|--|/\*")
_SQL_WORDS = frozenset(
    "and or xor not union select insert update delete drop exec execute sleep benchmark "
    "waitfor having limit order group like between null case when then if into from where "
    "table declare cast convert char".split()
)
_WORD = re.compile(r"[a-z_]+")
_XSS_CHARS = re.compile(r"[<>&=:(\\]")
_SHELL_CHARS = re.compile(r"[;&|\n`$]")
_SPACE = re.compile(r"\s")


def _maybe_sql(value: str) -> bool:
    if _SQL_CHARS.search(value):
        return True
    # (a set lookup per word: a regex alternation of 35 keywords costs 4x more)
    return _SPACE.search(value) is not None and not _SQL_WORDS.isdisjoint(
        _WORD.findall(value.lower()))


class Detector:
    def __init__(self, config: Injection) -> None:
        self.sql = config.sql
        self.xss = config.xss
        self.shell = config.shell
        self.enabled = config.sql or config.xss or config.shell

    def check(self, value: str) -> str | None:
        """The kind of payload found in `value`, or None."""
        if self.sql and _maybe_sql(value) and libinjection.is_sql_injection(value)["is_sqli"]:
            return "sql-injection"
        if self.xss and _XSS_CHARS.search(value) and libinjection.is_xss(value)["is_xss"]:
            return "xss"
        if self.shell and _SHELL_CHARS.search(value) and _SHELL.search(value):
            return "shell-injection"
        return None
