"""Send the plan, in order, through the one sender, and judge every answer."""

from __future__ import annotations

from collections.abc import Callable

from apishield.probe.plan import Attempt
from apishield.probe.sender import Sender
from apishield.probe.verdict import Outcome, judge


def execute(attempts: list[Attempt], sender: Sender,
            progress: Callable[[int, int], None] | None = None) -> list[Outcome]:
    """One outcome per attempt; those past `max_requests` are `not-sent`, in the report."""
    outcomes: list[Outcome] = []
    try:
        for index, attempt in enumerate(attempts):
            if sender.sent >= sender.max_requests:
                outcomes.append(judge(attempt, None))
                continue
            outcomes.append(judge(attempt, sender.send(attempt.request)))
            if progress is not None:
                progress(index + 1, len(attempts))
    finally:
        sender.close()
    return outcomes
