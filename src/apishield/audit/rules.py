"""The registry of every rule, and the run that applies them.

Importing the rule modules registers their rules; `RULES` is ordered by id so listings
(docs, SARIF `rules`) are stable."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from apishield.audit import access, policy, schemas  # noqa: F401 - registers the rules
from apishield.audit.context import AuditContext
from apishield.audit.findings import REGISTRY, Finding, Rule
from apishield.audit.lines import LineIndex
from apishield.config import Config
from apishield.contract.loader import Contract

RULES: dict[str, Rule] = dict(sorted(REGISTRY.items()))


def run_audit(contract: Contract, config: Config, config_file: Path | None) -> list[Finding]:
    """Every finding, most severe first, then by file, line and rule."""
    context = AuditContext(contract, config, config_file)
    lines = LineIndex()
    found: list[Finding] = []
    for rule in RULES.values():
        for location, message in rule.check(context):
            line = lines.line(Path(location.file).resolve(), location.pointer)
            found.append(Finding(rule, replace(location, line=line), message))
    found.sort(key=lambda f: (-f.severity, f.location.file, f.location.line or 0,
                              f.location.pointer, f.rule.id))
    return found
