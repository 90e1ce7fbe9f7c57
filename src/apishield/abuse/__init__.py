"""Abuse protection that spans requests: ban rules and the ban gate.

`bans.py` counts outcomes (authentication failures, probes, refusals) per client over
sliding windows and bans with escalation; `gate.py` is what the pipeline asks (is this
address or subject banned, record this outcome). The stores live in `apishield.state`
(`bans.py`, `sqlite_bans.py`, `redis_store.py`); the command line in `apishield.cli.bans`.

May import: `apishield.config`, `apishield.state`, `apishield.exchange`,
`apishield.problems`.
"""
