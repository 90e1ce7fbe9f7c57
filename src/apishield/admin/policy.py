"""The effective policy per operation, as the compiled pipeline enforces it (checklist G3).

A reviewer should read one table, not a contract plus a config plus the merge rules
between them (`x-apishield` overlaid by `operations.<id>`, global defaults, per-operation
overrides). So this reads the *compiled* objects of a `Pipeline` (the auth plans, the
authorize rules, the rate-limit plans of both limit steps, the validation plans, the body
limits, the response-filter plans) rather than the YAML: what it shows is what runs.
`apishield policy show` prints it; the admin API serves it as `GET /policy`.

The JSON shape (`POLICY_VERSION` 1, documented in docs/observability.md) is stable: keys
are only ever added. Lists are in contract order; sets are sorted, so two runs over the
same files give the same bytes.
"""

from __future__ import annotations

from typing import Any

from apishield.auth.authenticators import DelegatedAuthenticator, RefusedAuthenticator
from apishield.auth.service import NOT_PUBLIC, PUBLIC, Plan
from apishield.contract.loader import Operation
from apishield.pipeline import Pipeline
from apishield.steps.authorize import AuthorizeStep
from apishield.steps.limits import LimitsStep
from apishield.steps.rate_limit import RateLimitStep
from apishield.steps.validate import ParametersStep

POLICY_VERSION = 1


def _head_step(pipeline: Pipeline, name: str) -> object | None:
    return next((step for step in pipeline.head_steps if step.name == name), None)


def _rate(count: int, period: float) -> str:
    """(10, 60.0) -> `10/60s`: the unit the config accepts, whatever it was written in."""
    return f"{count}/{period:g}s"


_MODE_NOTES = {"verify": "", "delegate": ", delegated", "refuse": ", refused: not set up"}


def _access(pipeline: Pipeline, operation: Operation) -> dict[str, Any]:
    plan = pipeline.auth.plans.get(operation.pointer)
    declared = pipeline.contract.security_schemes
    access: dict[str, Any] = {"public": plan == PUBLIC, "refused": plan == NOT_PUBLIC,
                              "anonymous": False, "alternatives": []}
    if isinstance(plan, Plan):
        access["anonymous"] = plan.anonymous
        access["alternatives"] = [
            [{"scheme": authenticator.name,
              # a delegated or refused scheme's own kind says so: name the contract's type
              "kind": (str(declared.get(authenticator.name, {}).get("type", "delegated"))
                       if isinstance(authenticator, (DelegatedAuthenticator,
                                                     RefusedAuthenticator))
                       else authenticator.kind),
              "mode": ("delegate" if isinstance(authenticator, DelegatedAuthenticator)
                       else "refuse" if isinstance(authenticator, RefusedAuthenticator)
                       else "verify"),
              "scopes": sorted(scopes)}
             for authenticator, scopes in alternative]
            for alternative in plan.alternatives
        ]
    elif plan == NOT_PUBLIC:
        access["why"] = ("declares no security and is not marked public: refused to "
                         "everyone (403 not-public)")
    authorize = _head_step(pipeline, "authorize")
    rule = authorize.rules.get(operation.pointer) if isinstance(authorize,
                                                                 AuthorizeStep) else None
    access["require"] = None
    if rule is not None and (rule.roles or rule.permissions):
        access["require"] = {"roles": sorted(rule.roles),
                             "permissions": sorted(rule.permissions)}
    owner = operation.policy.owner
    # the request side runs in `authorize` (head or body phase), the response side in
    # `response_owner`: shown only when the step that enforces it holds the rule
    enforced = (operation.pointer in pipeline.response_owner.rules
                or (rule is not None and rule.owner is not None))
    access["owner"] = None if owner is None or not enforced else {
        "param": owner.param, "response": owner.response, "equals": owner.equals,
        "bypass_roles": sorted(owner.bypass_roles),
        "on_mismatch": owner.on_mismatch if owner.response is not None else 403,
    }
    return access


def _limits(pipeline: Pipeline, operation: Operation) -> tuple[list[dict[str, Any]],
                                                              list[dict[str, Any]]]:
    limiting = pipeline.config.rate_limiting
    by_name = {limit.name: limit for limit in limiting.limits}
    quotas_by_name = {quota.name: quota for quota in limiting.quotas}
    limits: list[dict[str, Any]] = []
    quotas: list[dict[str, Any]] = []
    for step_name in ("pre_auth_limit", "rate_limit"):
        step = _head_step(pipeline, step_name)
        if not isinstance(step, RateLimitStep):
            continue
        for plan in step.plans.get(operation.pointer, ()):
            if plan.quota is not None:
                quota = quotas_by_name[plan.name]
                quotas.append({"name": plan.name, "key": list(plan.key), "limit": quota.limit,
                               "period": quota.period, "roles": sorted(plan.roles)})
                continue
            limit = by_name[plan.name]
            limits.append({"name": plan.name, "key": list(plan.key),
                           "rate": _rate(*limit.rate), "burst": plan.burst,
                           "pre_auth": limit.pre_auth, "roles": sorted(plan.roles)})
    return limits, quotas


def operation_policy(pipeline: Pipeline, operation: Operation) -> dict[str, Any]:
    """One operation's effective policy (see the module docstring for why compiled)."""
    config = pipeline.config
    limits, quotas = _limits(pipeline, operation)
    concurrency = config.rate_limiting.concurrency
    parameters = _head_step(pipeline, "validate_parameters")
    validation = (parameters.plans.get(operation.pointer)
                  if isinstance(parameters, ParametersStep) else None)
    injection = config.validation.injection
    scan = validation is not None and validation.scan
    limits_step = _head_step(pipeline, "limits")
    body_limit = (limits_step.body_limit[operation.pointer]
                  if isinstance(limits_step, LimitsStep) else config.limits.max_body_bytes)
    filter_plan = pipeline.response_filter.plans.get(operation.pointer)
    cors = config.cors
    ip = config.rate_limiting.ip
    own_ip = operation.policy.ip
    return {
        "operation": operation.label,
        "operation_id": operation.operation_id,
        "method": operation.method,
        "path": pipeline.contract.base_path + operation.path,
        "pointer": operation.pointer,
        "access": _access(pipeline, operation),
        "rate_limits": limits,
        "quotas": quotas,
        "concurrency": None if pipeline.concurrency is None else {
            "max_in_flight": concurrency.max_in_flight,
            "per_identity": concurrency.per_identity,
            "queue_timeout": concurrency.queue_timeout},
        "validation": {
            "strict": validation.strict if validation is not None else config.validation.strict,
            "injection": sorted(kind for kind, on in (("sql", injection.sql),
                                                      ("xss", injection.xss),
                                                      ("shell", injection.shell))
                                if on) if scan else [],
        },
        "body": {"max_bytes": body_limit, "media_types": list(operation.media_types),
                 "required": operation.body_required},
        "responses": {"mode": filter_plan.mode if filter_plan is not None
                      else config.responses.mode,
                      "mask_errors": pipeline.mask_errors},
        "mode": "log-only" if _log_only(pipeline, operation) else "enforce",
        "cors": None if cors is None else {
            "allow_origins": list(cors.allow_origins),
            "allow_methods": list(cors.allow_methods),
            "allow_credentials": cors.allow_credentials},
        "ip": {"allow": [*ip.allow, *(own_ip.allow if own_ip else ())],
               "deny": [*ip.deny, *(own_ip.deny if own_ip else ())]},
    }


def _log_only(pipeline: Pipeline, operation: Operation) -> bool:
    if operation.policy.mode is not None:
        return operation.policy.mode == "log-only"
    return pipeline.global_log_only


def matches(operation: Operation, wanted: str) -> bool:
    """`--operation` / `?operation=`: the operationId, or `METHOD /path` for the others."""
    return wanted in (operation.operation_id, operation.label)


def effective_policy(pipeline: Pipeline, operation: str | None = None) -> dict[str, Any]:
    """Every operation's policy (or the one `operation` names: none when it names none)."""
    return {
        "version": POLICY_VERSION,
        "contract": pipeline.contract.source.name,
        "operations": [operation_policy(pipeline, op) for op in pipeline.contract.operations
                       if operation is None or matches(op, operation)],
    }


def _who(access: dict[str, Any]) -> str:
    if access["public"]:
        return "public (no credential)"
    if access["refused"]:
        return f"nobody: {access['why']}"
    options = [" + ".join(
        f"{s['scheme']} ({s['kind']}{_MODE_NOTES[s['mode']]}"
        + (f"; scopes {' '.join(s['scopes'])}" if s["scopes"] else "") + ")"
        for s in alternative) for alternative in access["alternatives"]]
    if access["anonymous"]:
        options.append("anonymous")
    return " | ".join(options) or "nobody (no usable scheme)"


def render_text(policy: dict[str, Any]) -> str:
    """A compact block per operation, for a terminal or a review."""
    blocks: list[str] = []
    for op in policy["operations"]:
        access = op["access"]
        lines = [f"{op['operation']}  {op['method']} {op['path']}",
                 f"  who:         {_who(access)}"]
        if access["require"]:
            require = access["require"]
            parts = ([f"a role of {', '.join(require['roles'])}"] if require["roles"] else [])
            if require["permissions"]:
                parts.append(f"permissions {', '.join(require['permissions'])}")
            lines.append(f"  require:     {'; '.join(parts)}")
        if access["owner"]:
            owner = access["owner"]
            where = (f"request {owner['param']}" if owner["param"]
                     else f"response {owner['response']}")
            bypass = (f" (bypass: {', '.join(owner['bypass_roles'])})"
                      if owner["bypass_roles"] else "")
            lines.append(f"  owner:       {where} == caller {owner['equals']}{bypass}")
        for limit in op["rate_limits"]:
            extra = (" pre-auth" if limit["pre_auth"] else "") + (
                f" roles {', '.join(limit['roles'])}" if limit["roles"] else "")
            lines.append(f"  rate limit:  {limit['name']} {limit['rate']} burst "
                         f"{limit['burst']} per {'+'.join(limit['key'])}{extra}")
        for quota in op["quotas"]:
            roles = f" roles {', '.join(quota['roles'])}" if quota["roles"] else ""
            lines.append(f"  quota:       {quota['name']} {quota['limit']}/{quota['period']} "
                         f"per {'+'.join(quota['key'])}{roles}")
        if op["concurrency"]:
            c = op["concurrency"]
            lines.append(f"  concurrency: {c['max_in_flight'] or 'unlimited'} in flight, "
                         f"{c['per_identity'] or 'unlimited'} per caller")
        validation = op["validation"]
        scan = ", ".join(validation["injection"]) or "off"
        lines.append(f"  validation:  {'strict' if validation['strict'] else 'lenient'}; "
                     f"injection scan {scan}")
        body = op["body"]
        media = ", ".join(body["media_types"]) or "no body"
        lines.append(f"  body:        {media}; at most {body['max_bytes']} bytes"
                     + ("; required" if body["required"] else ""))
        responses = op["responses"]
        lines.append(f"  responses:   {responses['mode']}; 5xx bodies "
                     f"{'masked' if responses['mask_errors'] else 'passed through'}")
        if op["mode"] == "log-only":
            lines.append("  mode:        log-only (shadow: contract refusals are logged, "
                         "not enforced)")
        if op["cors"]:
            cors = op["cors"]
            lines.append(f"  cors:        {', '.join(cors['allow_origins'])}"
                         + ("; with credentials" if cors["allow_credentials"] else ""))
        if op["ip"]["allow"] or op["ip"]["deny"]:
            lines.append(f"  ip:          allow {', '.join(op['ip']['allow']) or 'any'}; "
                         f"deny {', '.join(op['ip']['deny']) or 'none'}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n" if blocks else ""
