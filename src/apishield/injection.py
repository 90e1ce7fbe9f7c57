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


class Detector:
    def __init__(self, config: Injection) -> None:
        self.sql = config.sql
        self.xss = config.xss
        self.shell = config.shell
        self.enabled = config.sql or config.xss or config.shell

    def check(self, value: str) -> str | None:
        """The kind of payload found in `value`, or None."""
        if self.sql and libinjection.is_sql_injection(value)["is_sqli"]:
            return "sql-injection"
        if self.xss and libinjection.is_xss(value)["is_xss"]:
            return "xss"
        if self.shell and _SHELL.search(value):
            return "shell-injection"
        return None
