"""Send the plan through the one sender, and judge every answer.

When the plan is larger than `--max-requests`, the requests sent are picked round-robin
across operations (and the path-wide groups: undeclared paths, each path's methods and
preflight), so a budget too small for a large API still touches every operation it can
instead of exhausting itself on the first ones; they are sent, and reported, in plan order.
The budget is counted in requests: a multi-step attempt (BOLA replay, burst: multistep.py)
reserves its `cost`, the most requests it may send, and one that does not fit what is
left is "not sent" whole, never half-sent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from apishield.probe.leaks import Leak
from apishield.probe.plan import Attempt
from apishield.probe.sender import Answer, Sender
from apishield.probe.verdict import Outcome, judge


def pick(attempts: list[Attempt], budget: int) -> set[int]:
    """The indexes of the attempts to send: round-robin over their groups, each taking its
    `cost` of the budget; one that does not fit is passed over (others still may)."""
    if budget >= sum(attempt.cost for attempt in attempts):
        return set(range(len(attempts)))
    groups: dict[str, list[int]] = {}
    for index, attempt in enumerate(attempts):
        groups.setdefault(attempt.operation or attempt.pointer, []).append(index)
    queues = [list(reversed(indexes)) for indexes in groups.values()]
    chosen: set[int] = set()
    left = budget
    while left > 0 and any(queues):
        for queue in queues:
            while queue and left > 0:
                index = queue.pop()
                if attempts[index].cost <= left:
                    chosen.add(index)
                    left -= attempts[index].cost
                    break
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
                outcome = judge(attempt, None)
                if attempt.steps is not None:
                    outcome = replace(outcome, detail=f"not sent: its {attempt.cost} "
                                      "requests do not fit the rest of --max-requests")
                outcomes.append(outcome)
                continue
            if attempt.steps is not None:
                outcome = attempt.steps.run(attempt, lambda request, paced: sender.send(
                    request, paced=paced))
            else:
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
