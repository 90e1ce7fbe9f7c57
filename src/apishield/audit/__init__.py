"""`apishield audit`: a static review of a contract plus the policy that enforces it (G1, G5).

Each rule is one function in a registry (`rules.RULES`), reads the loaded `Contract` and the
`Config` (defaults when no config file is given: the audit then reviews what apishield
would enforce out of the box) and yields `Finding`s: a stable rule id, a severity, a
location (file, JSON pointer, line when the source is YAML or JSON), the checklist row and
OWASP API Security Top 10 (2023) category, and why it matters and how to fix it.

Placed at the `admin` layer: it reads config, contract and auth helpers (the weak-secret
check) and must never start a pipeline or open a state store, and the admin API is the
one front end that may later serve its findings; `cli` sits above and renders them.
"""

from apishield.audit.findings import Finding, Rule, Severity
from apishield.audit.rules import RULES, run_audit

__all__ = ["RULES", "Finding", "Rule", "Severity", "run_audit"]
