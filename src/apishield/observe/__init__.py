"""What apishield says about what it did: the access log, security events, redaction.

`accesslog.py` writes one JSON line per request in batches; `events.py` the security
events (authentication, authorization) on the `apishield.security` logger; `redact.py`
masks secrets in anything logged that came from outside. (Metrics, alerts and the audit
trail land here next.)

May import: `apishield.config`, `apishield.exchange`, `apishield.problems` only: every
layer above logs through it.
"""
