"""The finding and rule models, and the registry every rule module adds itself to.

Rule ids are kebab-case words (`jwt-audience-check-off`), stable: a rule keeps its id
for life, a removed rule's id is never reused, so CI baselines and SARIF fingerprints that
key on it keep working. Severity belongs to the rule, not the finding, so a tool reading
the SARIF `rules` metadata and one reading the results agree.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from apishield.audit.context import AuditContext


class Severity(IntEnum):
    """Ordered, so `--fail-on high` is `severity >= Severity.HIGH`."""

    LOW = 1
    MEDIUM = 2
    HIGH = 3
    CRITICAL = 4

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, text: str) -> Severity:
        return cls[text.upper()]


OWASP_2023 = {
    "API1": "Broken Object Level Authorization",
    "API2": "Broken Authentication",
    "API3": "Broken Object Property Level Authorization",
    "API4": "Unrestricted Resource Consumption",
    "API5": "Broken Function Level Authorization",
    "API6": "Unrestricted Access to Sensitive Business Flows",
    "API7": "Server Side Request Forgery",
    "API8": "Security Misconfiguration",
    "API9": "Improper Inventory Management",
    "API10": "Unsafe Consumption of APIs",
}


@dataclass(frozen=True)
class Location:
    """Where a finding points: a file, a JSON pointer in it, and its line when known."""

    file: str  # as given on the command line or resolved from the config
    pointer: str
    line: int | None = None


@dataclass(frozen=True)
class Finding:
    rule: Rule
    location: Location
    message: str  # what was found here, specifically

    @property
    def severity(self) -> Severity:
        return self.rule.severity


Check = Callable[["AuditContext"], Iterable[tuple[Location, str]]]


@dataclass(frozen=True)
class Rule:
    """One rule: its metadata (docs/audit.md lists every one) and its check."""

    id: str
    title: str
    severity: Severity
    checklist: str  # the practice id in CHECKLIST.md: A1, B2, ...
    owasp: str  # API1 .. API10 (2023)
    why: str
    fix: str
    check: Check

    @property
    def owasp_title(self) -> str:
        return f"{self.owasp}:2023 {OWASP_2023[self.owasp]}"


REGISTRY: dict[str, Rule] = {}


def rule(id: str, *, title: str, severity: Severity, checklist: str, owasp: str,
         why: str, fix: str) -> Callable[[Check], Check]:
    """Register the decorated check under `id` (each id once)."""
    assert owasp in OWASP_2023, owasp

    def register(check: Check) -> Check:
        assert id not in REGISTRY, f"rule id {id} registered twice"
        REGISTRY[id] = Rule(id, title, severity, checklist, owasp, why, fix, check)
        return check
    return register
