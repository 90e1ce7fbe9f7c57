"""Injection defence in depth (checklist B6): SQL injection, XSS and shell payloads in
strings the contract leaves unconstrained.

A contract that says `format: uuid`, `enum` or `pattern` already excludes payloads; a
free-text string does not, so apishield looks at those with libinjection (the C library
behind ModSecurity's `@detectSQLi`/`@detectXSS`, via its Python binding): tokenizers and
fingerprints, not a regex list, so it costs microseconds and does not backtrack. Shell
payloads have no such library; `shell_payload` reads the word at each command position
(after a separator, inside a substitution) as a shell would and decides whether it runs a
program (`; cat /etc/passwd`, `;e''cho`, `;/bin/echo`, `$(curl ...)`, `` `id` ``).

The trade-off (documented in docs/validation.md): a detector can refuse a legitimate
value (a tutorial about SQL in a comment field). Per operation it can be switched off
with `x-apishield: {injection: false}`, and `mode: log-only` shows what it would refuse
before it is enforced.
"""

from __future__ import annotations

import re

from apishield.config import Injection
from apishield.steps.libinjection_c import Binding, binding

# Shell payloads (issue 16: `;e''cho`, `;/bin/echo` and `;printf` went through a list of
# a few command names). A command position is what follows a separator (`; & | newline`)
# or opens a substitution (`$(`, a backtick); the word there is read as a shell reads it,
# quotes and backslashes removed. It is a payload when that word
# - was obfuscated (quotes or backslashes inside it: no one writes `e''cho` by accident),
# - is a path to a program (`/bin/echo`, `/usr/bin/id`),
# - is a command that is not also an English word (`whoami`, `curl`, `printf`, ...), or
# - is a command that is also a word (`cat`, `id`, `echo`, `sleep`) used as one: at the
#   end, before another separator, or before an argument that looks like a shell's (a
#   flag, a path, a number, a quote, a variable): `; cat /etc/passwd`, `;id;`, `| sleep 5`
#   but not `Tom & Jerry; cat videos`.
# `$(` before a word, `${IFS}`, shellshock's `() {` and SSI's `<!--#exec` are payloads as
# such. Measured in tests/test_injection_corpus.py against a payload corpus and a corpus of
# ordinary text (tests/data/injection/).
_COMMAND_POSITION = re.compile(r"(?:[;&|\n]|\$\(|`)[ \t]*")
_WRAPPERS = frozenset({"sudo", "env", "nohup", "exec", "command", "busybox", "nice", "time",
                       "timeout", "xargs"})
_PROGRAMS = frozenset(
    "sh bash zsh dash ksh csh tcsh fish curl wget nc ncat netcat socat telnet ssh scp tftp "
    "ftp python python2 python3 perl php ruby node nodejs lua powershell pwsh cmd "
    "whoami uname chmod chown chgrp ifconfig ipconfig netstat nslookup dig traceroute "
    "sysinfo netsh printf base64 xxd hexdump openssl useradd usermod passwd crontab systemctl "
    "iptables killall pkill wmic certutil bitsadmin rundll32 regsvr32 mshta cscript "
    "wscript nmap gcc awk sed grep egrep fgrep mkfifo tee dd strings".split())
_COMMON_WORDS = frozenset(
    "cat id ls echo ping sleep dir pwd rm cp mv kill net route reg type set head tail "
    "sort find more less touch date who w env uptime ps top df du file which whereis "
    "hostname exit eval source unset export alias history mail mkdir rmdir ln tar zip "
    "unzip gzip".split())
# common words that are a command before these words (`; net user hacker /ADD`)
_SUBCOMMANDS = {"net": re.compile(r"[ \t]+(?:user|localgroup|group|view|share|use|start|stop)\b",
                                  re.IGNORECASE)}
_TOKEN_END = re.compile(r"[\s;&|`)<>]")
_SHELL_ARGUMENT = re.compile(r"[ \t]+(?:-|/|~|\$|'|\"|\d|\\|\.{1,2}/|[a-z]:\\)",
                             re.IGNORECASE)
_SHELL_ALWAYS = re.compile(r"\$\{?IFS\b|\(\)\s*\{|<!--\s*#\s*exec", re.IGNORECASE)
_QUOTES = re.compile(r"['\"\\]")


def _command_at(text: str, start: int) -> bool:
    """Whether the word at `start` (a command position) runs a program."""
    wrapped = False
    for _ in range(4):  # a wrapper and its flags (`sudo -u x`, `env -i`) may come first
        match = _TOKEN_END.search(text, start, start + 256)
        end = match.start() if match else min(len(text), start + 256)
        raw = text[start:end]
        if raw.startswith("{"):  # brace expansion: {cat,/etc/passwd} runs cat
            raw = raw[1:].split(",", 1)[0]
        if not raw:
            return False
        word = _QUOTES.sub("", raw).lower()
        if (word in _WRAPPERS or (wrapped and word.startswith("-"))) and \
                end < len(text) and text[end] in " \t":
            wrapped = True
            start = end + 1
            while start < len(text) and text[start] in " \t":
                start += 1
            continue
        if word != raw.lower() and word.isascii() and word[:1].isalpha():
            return True  # quotes or backslashes inside a command word: obfuscation
        if word.startswith("/") and word.count("/") >= 2 and word[1:2].isalpha():
            return True  # /bin/echo, /usr/bin/id
        name = word.rsplit("/", 1)[-1]
        if name in _PROGRAMS or name.rstrip("0123456789.") in _PROGRAMS:
            return True
        if name in _COMMON_WORDS:
            if end >= len(text) or text[end] in ";&|`)\n<>":
                return True
            if _SHELL_ARGUMENT.match(text, end) is not None:
                return True
            following = _SUBCOMMANDS.get(name)
            return following is not None and following.match(text, end) is not None
        return wrapped  # `sudo anything`, `env -i anything`
    return False


def shell_payload(text: str) -> bool:
    """Whether `text` holds a shell command injection (see the comment above)."""
    if _SHELL_ALWAYS.search(text):
        return True
    for match in _COMMAND_POSITION.finditer(text):
        opener = match.group()[0]
        start = match.end()
        if opener == "$" and start < len(text) and (text[start].isalpha()
                                                    or text[start] in "/`"):
            return True  # $(command ...)
        if _command_at(text, start):
            return True
    return False


# Every SQL injection libinjection can fingerprint needs a quote, an operator, a comment
# or two tokens with an SQL keyword; every XSS needs markup, an entity, a script URL or
# handler. A string with none of those skips the tokenizers: a libinjection call costs
# ~1-2 us (steps/libinjection_c.py), a character-class search ~0.1 us.
_SQL_CHARS = re.compile(r"['\"`;#=()|&\\]|--|/\*")
_SQL_WORDS = frozenset(
    "and or xor not union select insert update delete drop exec execute sleep benchmark "
    "waitfor having limit order group like between null case when then if into from where "
    "table declare cast convert char".split()
)

# The keyword rule's tokens are the maximal runs of `[a-z_]` in the lower-cased text. In
# bytes: every other byte becomes a space (non-ASCII characters were already `?`), and
# `split()` gives the tokens. C calls only: a quarter of the cost of a regex over the text
# (`findall` into words, or one merged-trie search: sre pays ~200 instructions per
# position), which made this rule a quarter of the full pipeline's instructions (issue 18).
_NOT_WORD = bytes(byte if (0x61 <= byte <= 0x7A or byte == 0x5F) else 0x20
                  for byte in range(256))
_SQL_WORD_BYTES = frozenset(word.encode() for word in _SQL_WORDS)
_XSS_CHARS = re.compile(r"[<>&=:(\\]")
_SHELL_CHARS = re.compile(r"[;&|\n`$<]")
_SPACE = re.compile(r"\s")
# Every character (or pair) any of the three prefilters above looks for: most free text
# has none, and then only SQL's keyword rule can apply (issue 18: one check instead of
# three for such a string; the same answers). Checked in bytes, not with a regex: sre pays
# ~200 instructions per character of a string it does not match, which was most of the
# scan's cost on plain text. UTF-8 has ASCII bytes for ASCII characters only, so a byte
# found is a character found.
_SPECIAL = b"'\"`;#=()|&\\<>:\n$"
_PLAIN_BYTES = bytes(byte for byte in range(256) if byte not in _SPECIAL + b"-/")


def lowered(value: str) -> bytes:
    """`value` lower-cased, as ASCII bytes with `?` for every other character: what both
    checks below read. No non-ASCII character lower-cases to an ASCII one other than a
    letter (KELVIN SIGN is `k`), so the special characters are exactly the original's."""
    return value.lower().encode("ascii", "replace")


def _plain(text: bytes) -> bool:
    """No character of `_SPECIAL`, no `--`, no `/*` in `text` (`lowered(value)`;
    tests/test_libinjection_c.py: the same answers as the union regex on `value`)."""
    rest = text.translate(None, _PLAIN_BYTES)  # the special bytes, and - and /
    if not rest:
        return True
    if rest.translate(None, b"-/"):
        return False
    return b"--" not in text and b"/*" not in text


def _maybe_sql(value: str, text: bytes) -> bool:
    return _SQL_CHARS.search(value) is not None or _sql_words(value, text)


def _sql_words(value: str, text: bytes) -> bool:
    """Two tokens, one an SQL keyword: a keyword as a whole token of the lower-cased text
    (`text`, `lowered(value)`), and a space (tests/test_injection_keywords.py: the same
    answers as `findall`). The keywords first: most text has none, and the space regex
    would scan all of such a string."""
    return not _SQL_WORD_BYTES.isdisjoint(text.translate(_NOT_WORD).split()) and \
        _SPACE.search(value) is not None


class Detector:
    def __init__(self, config: Injection, detectors: Binding | None = None) -> None:
        self.sql = config.sql
        self.xss = config.xss
        self.shell = config.shell
        self.enabled = config.sql or config.xss or config.shell
        chosen = detectors if detectors is not None else binding()
        self._sqli = chosen.sqli
        self._xss = chosen.xss

    def check(self, value: str) -> str | None:
        """The kind of payload found in `value`, or None."""
        text = lowered(value)
        if _plain(text):  # no character any detector needs
            if self.sql and _sql_words(value, text) and self._sqli(value):
                return "sql-injection"
            return None
        if self.sql and _maybe_sql(value, text) and self._sqli(value):
            return "sql-injection"
        if self.xss and _XSS_CHARS.search(value) and self._xss(value):
            return "xss"
        if self.shell and _SHELL_CHARS.search(value) and shell_payload(value):
            return "shell-injection"
        return None
