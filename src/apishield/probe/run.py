"""Send the plan through the one sender, and judge every answer.

When the plan is larger than `--max-requests`, the requests sent are picked round-robin
across operations (and the path-wide groups: undeclared paths, each path's methods and
preflight), so a budget too small for a large API still touches every operation it can
instead of exhausting itself on the first ones; they are sent, and reported, in plan order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from apishield.probe.leaks import Leak
from apishield.probe.plan import Attempt
from apishield.probe.sender import Answer, Sender
from apishield.probe.verdict import Outcome, judge


def pick(attempts: list[Attempt], budget: int) -> set[int]:
    """The indexes of the attempts to send: round-robin over their groups."""
    if budget >= len(attempts):
        return set(range(len(attempts)))
    groups: dict[str, list[int]] = {}
    for index, attempt in enumerate(attempts):
        groups.setdefault(attempt.operation or attempt.pointer, []).append(index)
    queues = [list(reversed(indexes)) for indexes in groups.values()]
    chosen: set[int] = set()
    while len(chosen) < budget:
        for queue in queues:
            if queue and len(chosen) < budget:
                chosen.add(queue.pop())
    return chosen


def execute(attempts: list[Attempt], sender: Sender, *, stack_traces: bool = True,
            progress: Callable[[int, int], None] | None = None,
            leaks: Callable[[Attempt, Answer], tuple[Leak, ...]] | None = None,
            ) -> list[Outcome]:
    """One outcome per attempt; those not picked within `max_requests` are `not-sent`.
    `stack_traces`: read 5xx answers for them (the leaks class is on); `leaks`: read
    each answer for properties it should not carry (probe/leaks.py)."""
    chosen = pick(attempts, sender.max_requests)
    outcomes: list[Outcome] = []
    try:
        for index, attempt in enumerate(attempts):
            if index not in chosen:
                outcomes.append(judge(attempt, None))
                continue
            answer = sender.send(attempt.request)
            outcome = judge(attempt, answer)
            if leaks is not None and isinstance(answer, Answer):
                outcome = replace(outcome, leaks=leaks(attempt, answer))
            if outcome.stack_trace and not stack_traces:
                outcome = replace(outcome, stack_trace=False)
            outcomes.append(outcome)
            if progress is not None:
                progress(len(outcomes), len(attempts))
    finally:
        sender.close()
    return outcomes
