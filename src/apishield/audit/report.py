"""The three renderings of findings: a terminal table, stable JSON, SARIF 2.1.0.

The score is 100 less a weight per distinct rule that fired (critical 40, high 15,
medium 5, low 1), floored at 0: a rule firing on 500 operations is one problem to fix in
one place, so it costs once; the count per severity is printed beside it."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import orjson

from apishield.audit.findings import Finding, Rule, Severity

WEIGHTS = {Severity.CRITICAL: 40, Severity.HIGH: 15, Severity.MEDIUM: 5, Severity.LOW: 1}
SARIF_LEVEL = {Severity.CRITICAL: "error", Severity.HIGH: "error", Severity.MEDIUM: "warning",
               Severity.LOW: "note"}
# GitHub code scanning reads `security-severity` (0-10) on a rule to rank alerts
SECURITY_SEVERITY = {Severity.CRITICAL: "9.5", Severity.HIGH: "8.0", Severity.MEDIUM: "5.5",
                     Severity.LOW: "2.0"}
_COLOUR = {Severity.CRITICAL: "\033[1;35m", Severity.HIGH: "\033[1;31m",
           Severity.MEDIUM: "\033[33m", Severity.LOW: "\033[36m"}


def score(findings: list[Finding]) -> int:
    rules = {f.rule.id: f.severity for f in findings}
    return max(0, 100 - sum(WEIGHTS[severity] for severity in rules.values()))


def summary(findings: list[Finding]) -> dict[str, int]:
    counts = Counter(f.severity for f in findings)
    return {s.label: counts.get(s, 0) for s in sorted(Severity, reverse=True)}


def _where(finding: Finding) -> str:
    loc = finding.location
    line = f":{loc.line}" if loc.line is not None else ""
    return f"{loc.file}{line}#{loc.pointer}"


def render_text(findings: list[Finding], *, colour: bool) -> str:
    def paint(severity: Severity, text: str) -> str:
        return f"{_COLOUR[severity]}{text}\033[0m" if colour else text

    out: list[str] = []
    for finding in findings:
        rule = finding.rule
        out.append(f"{paint(finding.severity, finding.severity.label.upper()):<8} "
                   f"{rule.id}  [{rule.checklist}, {rule.owasp}]")
        out.append(f"    at:  {_where(finding)}")
        out.append(f"    {finding.message}")
        out.append(f"    fix: {rule.fix}")
    counts = summary(findings)
    if out:
        out.append("")
    out.append("severity  findings")
    out += [f"{label:<9} {count:>8}" for label, count in counts.items()]
    out.append(f"score: {score(findings)}/100 ({len(findings)} finding(s), "
               f"{len({f.rule.id for f in findings})} rule(s); docs/audit.md explains each)")
    return "\n".join(out) + "\n"


def _finding_json(finding: Finding) -> dict[str, Any]:
    rule = finding.rule
    loc = finding.location
    return {
        "rule": rule.id, "severity": finding.severity.label, "checklist": rule.checklist,
        "owasp": rule.owasp, "title": rule.title,
        "location": {"file": loc.file, "pointer": loc.pointer, "line": loc.line},
        "message": finding.message, "why": rule.why, "fix": rule.fix,
    }


def render_json(findings: list[Finding], contract: str, config: str | None, *,
                version: str) -> str:
    document = {
        "version": 1,
        "tool": {"name": "apishield", "version": version},
        "contract": contract, "config": config,
        "score": score(findings), "summary": summary(findings),
        "findings": [_finding_json(f) for f in findings],
    }
    return orjson.dumps(document, option=orjson.OPT_INDENT_2).decode() + "\n"


def _rule_sarif(rule: Rule) -> dict[str, Any]:
    return {
        "id": rule.id,
        "name": "".join(word.capitalize() for word in rule.id.split("-")),
        "shortDescription": {"text": rule.title},
        "fullDescription": {"text": rule.why},
        "help": {"text": f"{rule.why}\nFix: {rule.fix}",
                 "markdown": f"{rule.why}\n\n**Fix:** {rule.fix}\n\nChecklist {rule.checklist}; "
                             f"OWASP {rule.owasp_title}. See docs/audit.md, "
                             f"rule `{rule.id}`."},
        "defaultConfiguration": {"level": SARIF_LEVEL[rule.severity]},
        "properties": {
            "tags": ["security", f"checklist/{rule.checklist}", f"owasp/{rule.owasp}:2023"],
            "security-severity": SECURITY_SEVERITY[rule.severity],
            "precision": "medium",
        },
    }


def _uri(file: str) -> str:
    path = Path(file)
    return path.as_posix() if not path.is_absolute() else path.as_uri()


def render_sarif(findings: list[Finding], rules: dict[str, Rule], *, version: str) -> str:
    """`version`: apishield's, given by the caller (the package root is the top layer)."""
    index = {rule_id: n for n, rule_id in enumerate(rules)}
    results = []
    for finding in findings:
        loc = finding.location
        physical: dict[str, Any] = {"artifactLocation": {"uri": _uri(loc.file)}}
        if loc.line is not None:
            physical["region"] = {"startLine": loc.line}
        results.append({
            "ruleId": finding.rule.id, "ruleIndex": index[finding.rule.id],
            "level": SARIF_LEVEL[finding.severity],
            "message": {"text": f"{finding.message}. Fix: {finding.rule.fix}"},
            "locations": [{"physicalLocation": physical,
                           "logicalLocations": [{"fullyQualifiedName": loc.pointer,
                                                 "kind": "element"}]}],
            "partialFingerprints": {"apishieldLocation/v1": f"{finding.rule.id}:{loc.file}#"
                                                              f"{loc.pointer}"},
        })
    document = {
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "version": "2.1.0",
        "runs": [{
            "tool": {"driver": {"name": "apishield", "version": version,
                                "rules": [_rule_sarif(rule) for rule in rules.values()]}},
            "results": results,
        }],
    }
    return orjson.dumps(document, option=orjson.OPT_INDENT_2).decode() + "\n"
