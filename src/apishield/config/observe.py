"""What the gateway records: the access log (and, as they land, metrics, alerts, audit).

Its own module because observability keys are read by `apishield.observe`, not by any
pipeline step, and the next features of that layer add their models here rather than to
the transport or response modules.
"""

from __future__ import annotations

from apishield.config.units import Model


class AccessLog(Model):
    enabled: bool = True
    path: str = "-"  # "-" = standard output
