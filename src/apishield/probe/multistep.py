"""Attempts of several requests or several identities, and the classes that plan them.

An ordinary attempt is one request judged alone (plan.py, verdict.py). Three classes need
more: a BOLA replay (ownership.py: identity A lists and reads an object, identity B asks
for it), a role call (roles.py: one request, but judged as an authorization refusal, and
"inconclusive" when the identity is not even authenticated) and a rate-limit burst
(bursts.py: the limit + 2 requests back to back). Each is an `Attempt` whose `steps` is a
`MultiStep`: it says how many requests it may send at most (`cost`, what `--max-requests`
reserves, so an attempt is never half-sent) and runs itself through a `Send` callback
that goes to the one sender. Every request it sends is recorded in the outcome
(verdict.SentRequest), so the report still lists every request the probe sent.

`PLANNERS` is the order they are planned in, after the single-request classes: bursts
last, because a 429 they provoke would make the attempts after them "blocked".
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from apishield.probe import bursts, ownership, roles

if TYPE_CHECKING:
    from collections.abc import Callable

    from apishield.probe.plan import Attempt, MorePlanner, ProbeRequest
    from apishield.probe.sender import Answer
    from apishield.probe.verdict import Outcome

    # send(request, paced): paced=False skips the --rate spacing (bursts only)
    Send = Callable[[ProbeRequest, bool], Answer | str]


class MultiStep(Protocol):
    @property
    def cost(self) -> int:
        """The most requests `run` sends."""
        ...

    def run(self, attempt: Attempt, send: Send) -> Outcome:
        """Send the requests (never more than `cost`) and judge them."""
        ...


PLANNERS: tuple[MorePlanner, ...] = (ownership.replays, roles.calls, bursts.bursts)
