"""The alerts fired lately, kept in memory for the admin listener's dashboard (F3).

The alert engine appends every alert it fires (after deduplication and cooldown, before
delivery); the dashboard reads the newest ones. A bounded deque: a storm of alerts keeps
the last `MAX_ALERTS`, never more memory. Per process, like METRICS: it survives a
config reload.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

MAX_ALERTS = 200


@dataclass(frozen=True)
class FiredAlert:
    """One alert as the dashboard and the webhooks see it.

    `rule`: the configured rule's name; `kind`: what the rule watches (e.g.
    `failed-auth-burst`); `key`: what it fired for (a client IP, an identity, a reason);
    `at`: epoch seconds; `summary`: one human line; `details`: the numbers behind it."""

    rule: str
    kind: str
    key: str
    at: float
    summary: str
    severity: str = "warning"
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "kind": self.kind, "key": self.key, "at": self.at,
                "summary": self.summary, "severity": self.severity,
                "details": dict(self.details)}


class AlertFeed:
    def __init__(self, size: int = MAX_ALERTS) -> None:
        self._alerts: deque[FiredAlert] = deque(maxlen=size)
        self.fired = 0  # every alert ever added, including those the deque dropped

    def add(self, alert: FiredAlert) -> None:
        self._alerts.append(alert)
        self.fired += 1

    def recent(self, limit: int = 20) -> list[FiredAlert]:
        """The newest `limit` alerts, newest first."""
        alerts = self._alerts
        return [alerts[-1 - i] for i in range(min(limit, len(alerts)))]


ALERT_FEED = AlertFeed()
