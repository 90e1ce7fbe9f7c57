"""Refused or got through: what each answer means for its attempt.

A refusal is a 4xx answer in RFC 9457 `application/problem+json` (checklist E1: one error
format). apishield refuses that way, so a plain 4xx means the request went past the policy
and something else (the API) answered it: that is "got through", even when the API then
said no, because the probe proves the policy, not the API's own checks. A 3xx is an
answer the probe does not follow; it counts as got through (nothing was refused).
CORS and security-header attempts are judged on the headers, whatever the status; every
other answer is read for the same security headers too (C3: on every response, refusals
included), reported once per status that lacks them. A 429,
or a `rate-limited` or `client-banned` problem, is "blocked": the target refused the
prober itself, so the attempt proved nothing either way.
Every answer with a 5xx status is also read for a stack trace (E3).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Literal

import orjson

from apishield.probe.leaks import Leak
from apishield.probe.plan import FOREIGN_ORIGIN, Attempt
from apishield.probe.sender import Answer

# inconclusive: a multi-step attempt (multistep.py) whose preconditions failed (identity A
# could not read its own object, an identity was not authenticated): neither a pass nor a
# hole, counted apart
Verdict = Literal["refused", "got-through", "blocked", "no-answer", "not-sent",
                  "inconclusive"]
# the target refused the prober, not the attempt: the answer says nothing of what was probed
_BLOCKED = ("rate-limited", "client-banned")

_STACK_TRACES = re.compile(
    rb"Traceback \(most recent call last\)|File \"[^\"]+\", line \d+|"
    rb"\bat [\w$.<>]+\([\w$]+\.(?:java|kt|scala):\d+\)|Exception in thread \"|"
    rb"\bat [\w.<>`]+\(.*\) in .+:line \d+|\.php on line \d+|"
    rb"\n\s+at .+ \(/[^)]+\.[cm]?js:\d+:\d+\)|goroutine \d+ \[running\]")


@dataclass(frozen=True)
class SentRequest:
    """One request of a multi-step attempt, as the report lists it."""

    identity: str | None  # the --identity it was sent as (None: no credential)
    method: str
    shown: str  # the request target, credentials replaced
    status: int | None  # None: no answer
    step: str  # what the request was for: "list", "owner", "intruder", "burst 3"...


@dataclass(frozen=True)
class Outcome:
    attempt: Attempt
    verdict: Verdict
    status: int | None
    problem_type: str | None
    detail: str  # what was seen, in a sentence
    stack_trace: bool = False  # a 5xx answer showed one (its own finding)
    missing_headers: tuple[str, ...] = ()  # required security headers the answer lacked
    requests: tuple[SentRequest, ...] = ()  # a multi-step attempt's requests, in order
    leaks: tuple[Leak, ...] = ()  # a 2xx answer's undeclared or writeOnly properties


def problem_type(answer: Answer) -> str | None:
    content_type = (answer.header("content-type") or "").split(";")[0].strip().lower()
    if content_type != "application/problem+json":
        return None
    try:
        document = orjson.loads(answer.body)
    except orjson.JSONDecodeError:
        return None
    kind = document.get("type", "about:blank") if isinstance(document, dict) else None
    return str(kind) if kind is not None else None


def judge(attempt: Attempt, answer: Answer | str | None) -> Outcome:
    outcome = _judge(attempt, answer)
    if isinstance(answer, Answer) and outcome.verdict != "blocked":
        missing = tuple(name for name in attempt.required_headers if not answer.header(name))
        if missing:
            return replace(outcome, missing_headers=missing)
    return outcome


def _judge(attempt: Attempt, answer: Answer | str | None) -> Outcome:
    if answer is None:
        return Outcome(attempt, "not-sent", None, None, "not sent: --max-requests reached")
    if isinstance(answer, str):
        return Outcome(attempt, "no-answer", None, None, answer)
    kind = problem_type(answer)
    trace = answer.status >= 500 and _STACK_TRACES.search(answer.body) is not None
    if answer.status == 429 or (kind is not None and kind.rsplit("#", 1)[-1].rsplit(
            "/", 1)[-1].rsplit(":", 1)[-1] in _BLOCKED):
        seen = f"{answer.status} {kind}" if kind else str(answer.status)
        return Outcome(attempt, "blocked", answer.status, kind,
                       f"the prober was rate-limited or banned ({seen}): this attempt "
                       "proves nothing")
    if attempt.expect == "cors":
        allowed = answer.header("access-control-allow-origin")
        if allowed in (FOREIGN_ORIGIN, "*"):
            return Outcome(attempt, "got-through", answer.status, kind,
                           f"Access-Control-Allow-Origin: {allowed}", trace)
        return Outcome(attempt, "refused", answer.status, kind,
                       "no Access-Control-Allow-Origin for the foreign origin", trace)
    if attempt.expect == "headers":
        missing = [name for name in attempt.required_headers if not answer.header(name)]
        if missing:
            return Outcome(attempt, "got-through", answer.status, kind,
                           f"answered {answer.status} without {', '.join(missing)}", trace)
        return Outcome(attempt, "refused", answer.status, kind,
                       f"answered {answer.status} with every required header", trace)
    if 400 <= answer.status < 500 and kind is not None:
        return Outcome(attempt, "refused", answer.status, kind,
                       f"refused {answer.status} {kind}", trace)
    seen = "a problem" if kind else (answer.header("content-type") or "no content type")
    return Outcome(attempt, "got-through", answer.status, kind,
                   f"answered {answer.status} ({seen})", trace)
