"""Java's POSIX character classes in `pattern`s, rewritten as ECMA-262 (issue 15).

OpenAPI patterns are ECMA-262 regular expressions, but contracts generated from Java or
Smithy models (many AWS documents) write `\\p{Alnum}`, `\\p{Print}`, ...: java.util.regex's
US-ASCII POSIX classes. ECMA-262 has no such property names, so the pattern would not
compile and the contract would not load. Each is rewritten to the ASCII range Java
defines (java.util.regex.Pattern, "POSIX character classes (US-ASCII only)"), which is
what the API that wrote them enforces. `\\P{...}` (the negation) is rewritten outside a
bracket expression only; inside one there is no ECMA-262 spelling, so it stays (and the
pattern is reported as before). Java's `\\p{LD}` (letter or digit) becomes
`\\p{L}\\p{Nd}`; Unicode properties (`\\p{L}`, `\\p{Lu}`) are ECMA-262 and left alone.
"""

from __future__ import annotations

import re

_PUNCT = r"!-\/:-@\[-`{-~"  # !"#$%&'()*+,-./ :;<=>?@ [\]^_` {|}~
_RANGES = {
    "Lower": "a-z",
    "Upper": "A-Z",
    "ASCII": r"\x00-\x7F",
    "Alpha": "a-zA-Z",
    "Digit": "0-9",
    "Alnum": "a-zA-Z0-9",
    "Punct": _PUNCT,
    "Graph": "a-zA-Z0-9" + _PUNCT,
    "Print": r"\x20-\x7E",  # Graph and the space
    "Blank": r" \t",
    "Cntrl": r"\x00-\x1F\x7F",
    "XDigit": "0-9a-fA-F",
    "Space": r" \t\n\x0B\f\r",
    # not POSIX: Java's "letter or digit" category (Character.isLetterOrDigit), Unicode
    "LD": r"\p{L}\p{Nd}",
}
_CLASS = re.compile(r"\\([pP])\{(" + "|".join(_RANGES) + r")\}")


def rewrite(pattern: str) -> str:
    """`pattern` with Java's POSIX classes spelled as ECMA-262 ASCII ranges."""
    if "\\p{" not in pattern and "\\P{" not in pattern:
        return pattern
    out: list[str] = []
    in_class = False
    index = 0
    while index < len(pattern):
        char = pattern[index]
        if char == "\\":
            found = _CLASS.match(pattern, index)
            if found is not None and not (in_class and found.group(1) == "P"):
                ranges = _RANGES[found.group(2)]
                if in_class:
                    out.append(ranges)
                else:
                    out.append(f"[{'^' if found.group(1) == 'P' else ''}{ranges}]")
                index = found.end()
                continue
            out.append(pattern[index:index + 2])  # an escape: copied as it is
            index += 2
            continue
        if char == "[" and not in_class:
            in_class = True
            out.append(char)
            if pattern.startswith("^", index + 1):  # [^...]
                out.append("^")
                index += 1
            if pattern.startswith("]", index + 1):  # []...] : a literal ] first
                out.append("]")
                index += 1
        elif char == "]" and in_class:
            in_class = False
            out.append(char)
        else:
            out.append(char)
        index += 1
    return "".join(out)
