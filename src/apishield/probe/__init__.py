"""`apishield probe`: attack your own API from its contract and report what got through
(issue 17; checklist G1, G5, and every A/B/C/E row it can test from outside).

`apishield audit` says what the contract and policy *allow*; the probe checks that the
deployed gateway and API really *refuse* it. It reads the contract and the config (never
the pipeline: it is a client of the target, placed at the audit layer), plans attempts per
operation (`plan.py`: each one request expected to be refused; `multistep.py`: several
requests or identities), sends them to `--target` only, bounded in count and rate
(`sender.py`), judges each answer (`verdict.py`) and renders the outcomes; "got through"
outcomes are audit `Finding`s, so SARIF comes from the audit's one renderer.

    rules.py    the probe rules (stable ids, checklist row, OWASP category, why, fix)
    values.py   valid values from schemas, and the one broken part an attempt varies
    tokens.py   forged bearer tokens (alg none, expired, bad signature, unknown kid...)
    plan.py     contract + config + identities -> the attempts, in a stable order
    sender.py   the only code that opens a socket: one scheme://host:port, no redirects
    verdict.py  refused or got through, and the stack-trace check on every answer
    multistep.py  attempts of several requests or identities, planned after the others:
    ownership.py    BOLA: identity B asks for identity A's object
    roles.py        each identity calls what its roles should not reach
    bursts.py       a burst just over each rate limit, expecting 429 (planned last)
    run.py      the budget (round-robin, multi-step attempts whole) and the sending loop
    report.py   text and JSON (and SARIF through audit.report)
"""

from apishield.probe.plan import Attempt, Identity, build_plan
from apishield.probe.rules import CLASSES, PROBE_RULES
from apishield.probe.sender import Sender, Target
from apishield.probe.verdict import Outcome, judge

__all__ = ["CLASSES", "PROBE_RULES", "Attempt", "Identity", "Outcome", "Sender", "Target",
           "build_plan", "judge"]
