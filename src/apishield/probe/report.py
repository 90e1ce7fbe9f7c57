"""The probe's reports: text for people, JSON for tools, SARIF through the audit's renderer.

Every attempt is listed, sent or not, with its request (credentials replaced by
`<identity>`), so the report is the record of what the probe did to the target; a
multi-step attempt (BOLA, roles, bursts) also lists each request it sent, and as whom.
"got through" outcomes (and stack traces in 5xx answers) become audit `Finding`s located
at the operation in the contract, so SARIF has one implementation (audit/report.py).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import orjson

from apishield.audit.context import display
from apishield.audit.findings import Finding, Location
from apishield.audit.lines import LineIndex
from apishield.audit.report import render_sarif
from apishield.probe.rules import PROBE_RULES
from apishield.probe.verdict import Outcome


def findings(outcomes: list[Outcome], contract: Path) -> list[Finding]:
    """What got through, as findings (one per attempt, plus one per stack trace seen)."""
    found: list[Finding] = []
    lines = LineIndex()
    for outcome in outcomes:
        attempt = outcome.attempt
        if outcome.verdict != "got-through" and not outcome.stack_trace:
            continue
        file = (attempt.file or contract).resolve()
        where = Location(display(file), attempt.pointer, lines.line(file, attempt.pointer))
        request = f"{attempt.request.method} {attempt.request.shown}"
        if outcome.verdict == "got-through":
            found.append(Finding(PROBE_RULES[attempt.rule], where,
                                 f"{request}: {attempt.what}: {outcome.detail}"))
        if outcome.stack_trace:
            found.append(Finding(PROBE_RULES["probe-stack-trace"], where,
                                 f"{request}: answered {outcome.status} with a stack trace"))
    return found + _leaks(outcomes) + _missing_headers(outcomes, contract)


def _leaks(outcomes: list[Outcome]) -> list[Finding]:
    """One finding per operation and leaked property, located at the response schema."""
    found: list[Finding] = []
    seen: set[tuple[str | None, str, str]] = set()
    lines = LineIndex()
    for outcome in outcomes:
        attempt = outcome.attempt
        for leak in outcome.leaks:
            key = (attempt.operation, leak.kind, leak.property)
            if key in seen:
                continue
            seen.add(key)
            rule = ("probe-response-write-only" if leak.kind == "write-only"
                    else "probe-response-undeclared-property")
            file = leak.file.resolve()
            where = Location(display(file), leak.pointer, lines.line(file, leak.pointer))
            what = ("a writeOnly property" if leak.kind == "write-only"
                    else "a property the response schema does not declare")
            found.append(Finding(PROBE_RULES[rule], where,
                                 f"{attempt.request.method} {attempt.request.shown}: "
                                 f"answered {outcome.status} with {leak.property}, {what}"))
    return found


def _missing_headers(outcomes: list[Outcome], contract: Path) -> list[Finding]:
    """Security headers missing on answers to the other attempts: one finding per status
    (a gateway that forgets them on its 404s forgets them on every 404)."""
    by_status: dict[int | None, list[Outcome]] = {}
    for outcome in outcomes:
        if outcome.missing_headers and outcome.attempt.expect != "headers":
            by_status.setdefault(outcome.status, []).append(outcome)
    found = []
    for status, seen in by_status.items():
        first = seen[0]
        missing = sorted({name for o in seen for name in o.missing_headers})
        found.append(Finding(
            PROBE_RULES["probe-security-headers"], Location(display(contract), "/paths"),
            f"{len(seen)} answer(s) {status} without {', '.join(missing)}, e.g. to "
            f"{first.attempt.request.method} {first.attempt.request.shown}"))
    return found


def summary(outcomes: list[Outcome], found: list[Finding]) -> dict[str, int]:
    """Counts of attempts by verdict; `sent` counts requests (a burst is many)."""
    counts = Counter(outcome.verdict for outcome in outcomes)
    return {"planned": len(outcomes),
            "sent": sum(len(o.requests) if o.attempt.steps is not None else 1
                        for o in outcomes if o.verdict != "not-sent"),
            "refused": counts["refused"], "got_through": len(found),
            "blocked": counts["blocked"], "no_answer": counts["no-answer"],
            "not_sent": counts["not-sent"], "inconclusive": counts["inconclusive"]}


def _outcome_json(outcome: Outcome) -> dict[str, Any]:
    attempt = outcome.attempt
    rule = PROBE_RULES[attempt.rule]
    document: dict[str, Any] = {
        "rule": rule.id, "operation": attempt.operation, "pointer": attempt.pointer,
        "what": attempt.what, "method": attempt.request.method,
        "target": attempt.request.shown, "verdict": outcome.verdict,
        "status": outcome.status, "problem_type": outcome.problem_type,
        "detail": outcome.detail, "stack_trace": outcome.stack_trace,
        "leaks": [{"kind": leak.kind, "property": leak.property} for leak in outcome.leaks],
    }
    if outcome.verdict == "got-through":
        document.update(checklist=rule.checklist, owasp=rule.owasp, fix=rule.fix)
    if attempt.steps is not None:
        document["requests"] = [{"identity": sent.identity, "step": sent.step,
                                 "method": sent.method, "target": sent.shown,
                                 "status": sent.status} for sent in outcome.requests]
    return document


def render_json(outcomes: list[Outcome], contract: Path, *, target: str, config: str,
                skipped_writes: int, notes: list[str], version: str) -> str:
    found = findings(outcomes, contract)
    document = {
        "version": 1, "tool": {"name": "apishield", "version": version},
        "target": target, "config": config, "contract": display(contract),
        "summary": {**summary(outcomes, found), "skipped_writes": skipped_writes},
        "notes": notes,
        "attempts": [_outcome_json(outcome) for outcome in outcomes],
        "got_through": [{"rule": f.rule.id, "checklist": f.rule.checklist,
                         "owasp": f.rule.owasp, "message": f.message, "fix": f.rule.fix}
                        for f in found],
    }
    return orjson.dumps(document, option=orjson.OPT_INDENT_2).decode() + "\n"


def render_sarif_report(outcomes: list[Outcome], contract: Path, *, version: str) -> str:
    return render_sarif(findings(outcomes, contract), PROBE_RULES, version=version)


_MARK = {"refused": "refused", "got-through": "GOT THROUGH", "blocked": "blocked",
         "no-answer": "no answer", "not-sent": "not sent", "inconclusive": "inconclusive"}


def render_text(outcomes: list[Outcome], contract: Path, *, target: str,
                skipped_writes: int, notes: list[str]) -> str:
    out = [f"apishield probe: {target}"]
    out += [f"note: {note}" for note in notes]
    for outcome in outcomes:
        attempt = outcome.attempt
        status = "" if outcome.status is None else str(outcome.status)
        seen = outcome.problem_type or ""
        # a valid request whose answer carried every security header: nothing to refuse
        mark = ("ok" if outcome.verdict == "refused" and attempt.expect == "headers"
                else _MARK[outcome.verdict])
        out.append(f"{mark:<11} {status:>3} {attempt.request.method} "
                   f"{attempt.request.shown}  [{attempt.rule}] {attempt.what}"
                   + (f"  ({seen})" if seen and outcome.verdict == "refused" else ""))
        if attempt.steps is not None and outcome.verdict != "not-sent":
            out += _steps_text(outcome)
    found = findings(outcomes, contract)
    if found:
        out.append("")
        out.append("got through:")
        for finding in found:
            rule = finding.rule
            out.append(f"  {rule.severity.label.upper():<8} {rule.id}  [{rule.checklist}, "
                       f"{rule.owasp_title}]")
            out.append(f"    {finding.message}")
            out.append(f"    fix: {rule.fix}")
    counts = summary(outcomes, found)
    out.append("")
    out.append(f"{counts['sent']} request(s) sent, {counts['refused']} refused, "
               f"{counts['got_through']} got through, {counts['blocked']} blocked (the "
               f"prober rate-limited or banned), {counts['no_answer']} without an "
               f"answer, {counts['not_sent']} not sent (--max-requests), {skipped_writes} "
               "skipped (need --allow-writes)"
               + (f", {counts['inconclusive']} inconclusive" if counts["inconclusive"]
                  else ""))
    return "\n".join(out) + "\n"


def _steps_text(outcome: Outcome) -> list[str]:
    """A multi-step attempt's requests, one line each (a burst's identical ones folded),
    then what was concluded."""
    lines: list[str] = []
    sent = list(outcome.requests)
    index = 0
    while index < len(sent):
        first = sent[index]
        same = index
        while (same + 1 < len(sent) and sent[same + 1].status == first.status
               and sent[same + 1].shown == first.shown and first.step.startswith("burst")):
            same += 1
        status = "---" if first.status is None else str(first.status)
        who = f"as {first.identity}" if first.identity else "anonymous"
        label = first.step if same == index else f"burst {index + 1}-{same + 1}"
        lines.append(f"    {status:>3} {first.method} {first.shown}  ({label}, {who})")
        index = same + 1
    lines.append(f"    -> {outcome.detail}")
    return lines


def render_plan(planned: list[tuple[str, str, str, str]], *, target: str,
                skipped_writes: int, notes: list[str], requests: int | None = None) -> str:
    """--dry-run: (rule, method, target, what) per planned attempt; nothing is sent.
    `requests`: the most requests they send (multi-step attempts send several)."""
    count = len(planned) if requests is None else requests
    out = [f"apishield probe --dry-run: {count} request(s) planned for {target}, "
           "none sent"]
    out += [f"note: {note}" for note in notes]
    out += [f"{method} {shown}  [{rule}] {what}" for rule, method, shown, what in planned]
    out.append(f"{skipped_writes} more need --allow-writes")
    return "\n".join(out) + "\n"
