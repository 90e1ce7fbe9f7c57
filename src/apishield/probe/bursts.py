"""Rate-limit bursts (OWASP API4, checklist D1): just over each configured limit, expecting
429 with `Retry-After` and the RateLimit headers.

For each limit in `rate_limiting.limits`, one burst on the first operation it applies to
(a read, unless only writes are limited and `--allow-writes` is given): the limit's burst
(its `burst`, else its rate's count) + 2 valid requests sent back to back, ignoring
`--rate`: a limit is only exceeded by requests faster than it refills, and spacing them at
`--rate` would let a 100/min limit refill between them. The limit refills while the burst
is sent (GCRA: one request per `period / count`), so the burst counts what refilled and
sends that much more, up to SLACK extra requests; a burst still within the refilled limit
at SLACK is "inconclusive" (the probe could not outrun the limit), never a hole.

Verdicts: the first 429 stops the burst; it is a refusal when it carries `Retry-After`,
`RateLimit-Policy` and `RateLimit` (steps/rate_limit.py, docs/rate-limiting.md) naming
this limit (a 429 of another limit, one an earlier burst used up, is inconclusive).
Every request admitted: got through. A 401 or 403 before any 429: inconclusive (the
request was refused before the limit counted it). Bursts are planned last
(multistep.PLANNERS), narrow limits (with `operations`) before global ones, so their 429s
neither block the other attempts nor each other. A limit that admits more than MAX_BURST
requests at once is skipped with a plan note; one that does not fit the rest of `--max-requests`
is "not sent", never half-sent (run.py reserves `cost`).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from apishield.config import RateLimit
from apishield.contract.loader import Operation
from apishield.probe.plan import SAFE_METHODS, Attempt, Identity, ProbeRequest
from apishield.probe.roles import held
from apishield.probe.sender import Answer
from apishield.probe.verdict import Outcome, SentRequest, judge, problem_type

if TYPE_CHECKING:
    from apishield.probe.multistep import Send
    from apishield.probe.plan import _Planner

RULE = "probe-rate-limit"
MAX_BURST = 1000
OVER = 2  # requests past the limit's burst
SLACK = 3  # more, for what refills while the burst is sent
RATE_HEADERS = ("retry-after", "ratelimit-policy", "ratelimit")
_NAME = re.compile(r'^\s*"([^"]*)"')


@dataclass(frozen=True)
class Burst:
    limit: str
    burst: int  # requests the limit admits at once
    interval: float  # seconds per request it refills
    identity: str | None
    request: ProbeRequest

    @property
    def cost(self) -> int:
        return self.burst + OVER + SLACK

    def run(self, attempt: Attempt, send: Send) -> Outcome:
        sent: list[SentRequest] = []
        start = time.monotonic()
        while True:
            refilled = math.floor((time.monotonic() - start) / self.interval)
            if len(sent) >= self.burst + OVER + refilled:
                return Outcome(attempt, "got-through", sent[-1].status, None,
                               f"all {len(sent)} requests admitted back to back (limit "
                               f"{self.limit}: {self.burst} at once, {refilled} refilled "
                               "meanwhile)", requests=tuple(sent))
            if len(sent) >= self.cost:
                return Outcome(attempt, "inconclusive", sent[-1].status, None,
                               f"all {len(sent)} requests admitted, but the limit refilled "
                               f"{refilled} meanwhile: the probe could not send faster "
                               f"than limit {self.limit} refills", requests=tuple(sent))
            answer = send(self.request, False)
            sent.append(SentRequest(self.identity, self.request.method, self.request.shown,
                                    answer.status if isinstance(answer, Answer) else None,
                                    f"burst {len(sent) + 1}"))
            if not isinstance(answer, Answer):
                return replace(judge(attempt, answer), requests=tuple(sent))
            if answer.status == 429:
                return replace(self._limited(attempt, answer, len(sent)),
                               requests=tuple(sent))
            outcome = judge(attempt, answer)
            if outcome.verdict == "blocked":  # a ban: a 403 client-banned problem
                return replace(outcome, requests=tuple(sent))
            if answer.status in (401, 403) and outcome.problem_type is not None:
                return replace(outcome, verdict="inconclusive", requests=tuple(sent),
                               detail=f"request {len(sent)} was refused {answer.status} "
                               f"{outcome.problem_type} before limit {self.limit} counted "
                               "it: the burst proves nothing")

    def _limited(self, attempt: Attempt, answer: Answer, count: int) -> Outcome:
        kind = problem_type(answer)
        named = {match.group(1) for name in ("ratelimit", "ratelimit-policy")
                 if (match := _NAME.match(answer.header(name) or "")) is not None}
        if named and self.limit not in named:
            return Outcome(attempt, "inconclusive", 429, kind,
                           f"request {count} was refused 429 by limit "
                           f"{', '.join(sorted(named))}, not {self.limit} (an earlier burst "
                           "or attempt used it up)")
        lacking = [name for name in RATE_HEADERS if answer.header(name) is None]
        if lacking:
            return Outcome(attempt, "got-through", 429, kind,
                           f"request {count} was refused 429, but without "
                           f"{', '.join(lacking)}: clients can not tell when to retry")
        return Outcome(attempt, "refused", 429, kind,
                       f"request {count} of the burst was refused 429 {kind or '(plain)'} "
                       f"with Retry-After {answer.header('retry-after')} and RateLimit "
                       f"{answer.header('ratelimit')}")


def _applies(limit: RateLimit, operation: Operation) -> bool:
    return not limit.operations or operation.operation_id in limit.operations


def _caller(planner: _Planner, limit: RateLimit, operation: Operation
            ) -> tuple[Identity | None, str | None]:
    """(the identity the burst is sent as, None: anonymous) or (None, why not possible)."""
    if limit.roles:
        for identity in planner.identities:
            holds = held(identity, planner.config)
            if holds is not None and holds[0] & set(limit.roles):
                return identity, None
        return None, (f"no --identity is known to hold one of its roles "
                      f"({', '.join(limit.roles)})")
    if planner._scheme(operation) is None:
        return None, None
    if planner.identity is None:
        return None, f"{operation.label} needs a credential and no --identity was given"
    return planner.identity, None


def bursts(planner: _Planner) -> Iterator[Attempt]:
    """One burst per limit, narrow limits (with `operations`) first."""
    if RULE not in planner.rules:
        return
    limits = sorted(planner.config.rate_limiting.limits, key=lambda lim: not lim.operations)
    for limit in limits:
        count, period = limit.rate
        burst = limit.burst or count
        if burst > MAX_BURST:
            planner.notes.append(f"rate limit {limit.name}: admits {burst} requests at "
                                 f"once, over {MAX_BURST}: no burst planned")
            continue
        operations = [op for op in planner.contract.operations if _applies(limit, op)]
        reads = [op for op in operations if op.method in SAFE_METHODS - {"TRACE"}]
        chosen = reads or (operations if planner.allow_writes else [])
        if not chosen:
            if operations:
                planner.notes.append(f"rate limit {limit.name}: applies to writes only; a "
                                     "burst needs --allow-writes")
                planner.skipped_writes += 1
            continue
        why = ""
        for operation in chosen:
            identity, why_not = _caller(planner, limit, operation)
            if why_not is None:
                break
            why = why_not
        else:
            planner.notes.append(f"rate limit {limit.name}: no burst: {why}")
            continue
        request = planner.request_as(operation, identity)
        steps = Burst(limit.name, burst, period / count,
                      identity.name if identity is not None else None, request)
        yield Attempt(RULE, operation.label, operation.pointer,
                      f"a burst of {burst + OVER} requests or more back to back over limit "
                      f"{limit.name} ({burst} at once; expected: 429 with Retry-After and "
                      "RateLimit headers)", request, steps=steps)
