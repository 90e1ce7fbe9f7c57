"""Rules about the deployment policy: listener TLS, CORS, response handling, shadow mode
and rate limits on credential endpoints (checklist A9, C1, C3, E3; OWASP API2, API3, API8).
Config-only rules say nothing when no config is given and the default is safe."""

from __future__ import annotations

from collections.abc import Iterator

from apishield.audit.access import credential_like
from apishield.audit.context import AuditContext
from apishield.audit.findings import Location, Severity, rule
from apishield.config import is_loopback
from apishield.contract.loader import Operation, escape_pointer

Found = Iterator[tuple[Location, str]]


def _policy_at(ctx: AuditContext, operation: Operation, key: str) -> Location:
    """The operation's setting: in the config when operations.<id> sets it, else its
    x-apishield in the contract."""
    config_ops = ctx.config.operations
    if operation.operation_id in config_ops and key in \
            config_ops[operation.operation_id].model_fields_set:
        where = ctx.at_config(f"/operations/{escape_pointer(operation.operation_id)}/{key}")
        if where is not None:
            return where
    return ctx.at_operation(operation, f"/x-apishield/{key}")


def _rate_limited(ctx: AuditContext, operation: Operation) -> bool:
    return any(not limit.operations or operation.operation_id in limit.operations
               for limit in ctx.config.rate_limiting.limits if not limit.roles)


@rule("credential-endpoint-without-rate-limit",
      title="Login, token or password-reset operation without a rate limit",
      severity=Severity.HIGH, checklist="A9", owasp="API2",
      why="An endpoint that checks a password, issues a token or sends a reset code and "
          "can be called without limit is where credential stuffing and brute force happen.",
      fix="Add a rate limit naming the operation (`rate_limiting.limits: [{name: login, "
          "key: [ip], rate: 5/m, operations: [login], pre_auth: true}]`) and a ban "
          "rule on authn-failure.")
def credential_endpoint(ctx: AuditContext) -> Found:
    for operation in ctx.contract.operations:
        if operation.method not in ("POST", "PUT", "PATCH"):
            continue
        if not (credential_like(operation.path) or
                credential_like(operation.operation_id or "") or operation.policy.login):
            continue
        if not _rate_limited(ctx, operation):
            yield ctx.at_operation(operation), (
                f"{operation.label} looks like a credential endpoint and no rate limit "
                "applies to it")


@rule("cors-wildcard", title="CORS allows every origin",
      severity=Severity.MEDIUM, checklist="C3", owasp="API8",
      why="`allow_origins: ['*']` lets any web page call the API from a visitor's browser "
          "and read the answers; with cookies or a browser-held token that is the "
          "visitor's data.",
      fix="List the origins of your own front ends (https://app.example.com).")
def cors_wildcard(ctx: AuditContext) -> Found:
    cors = ctx.config.cors
    where = ctx.at_config("/cors/allow_origins")
    if cors is not None and "*" in cors.allow_origins and where is not None:
        yield where, "allow_origins holds '*'"


@rule("tls-off-public-listener", title="Plain HTTP on a non-loopback listener",
      severity=Severity.HIGH, checklist="C1", owasp="API8",
      why="Tokens, keys and data cross the network in clear text when the gateway listens "
          "on a reachable address without TLS.",
      fix="Configure `tls:` (cert and key), or listen on 127.0.0.1 behind a TLS-terminating "
          "proxy.")
def tls_off(ctx: AuditContext) -> Found:
    host = ctx.config.listen.host
    where = ctx.at_config("/listen/host")
    if ctx.config.tls is None and not is_loopback(host) and where is not None:
        yield where, f"listen.host {host or '(all addresses)'} without tls"


@rule("responses-unfiltered", title="Response filtering turned off",
      severity=Severity.MEDIUM, checklist="E3", owasp="API3",
      why="With `responses.mode: off` the upstream's answers pass untouched: properties "
          "the contract does not declare (internal fields, password hashes) reach clients.",
      fix="Use `responses.mode: filter` (the default) or `validate`.")
def responses_off(ctx: AuditContext) -> Found:
    where = ctx.at_config("/responses/mode")
    if ctx.config.responses.mode == "off" and where is not None:
        yield where, "responses.mode: off for every operation"
    for operation in ctx.contract.operations:
        if operation.policy.responses == "off":
            yield _policy_at(ctx, operation, "responses"), (
                f"{operation.label}: responses: off")


@rule("error-masking-off", title="Upstream error bodies shown to clients",
      severity=Severity.MEDIUM, checklist="E3", owasp="API8",
      why="With `responses.mask_errors: false` an upstream 5xx body (stack trace, SQL "
          "error, file paths) reaches the client and maps the system for an attacker.",
      fix="Keep `mask_errors: true` (the default); details stay in the log under the "
          "request id.")
def masking_off(ctx: AuditContext) -> Found:
    where = ctx.at_config("/responses/mask_errors")
    if not ctx.config.responses.mask_errors and where is not None:
        yield where, "responses.mask_errors: false"


@rule("shadow-mode", title="Log-only (shadow) mode left on",
      severity=Severity.HIGH, checklist="A7", owasp="API8",
      why="In `mode: log-only` apishield logs what it would refuse and lets it through: "
          "nothing is enforced. It is for rolling out, not for production.",
      fix="Set `mode: enforce` once the log shows no false refusals (docs/validation.md).")
def shadow_mode(ctx: AuditContext) -> Found:
    where = ctx.at_config("/mode")
    if ctx.config.mode == "log-only" and where is not None:
        yield where, "mode: log-only: nothing is enforced"
    for operation in ctx.contract.operations:
        if operation.policy.mode == "log-only":
            yield _policy_at(ctx, operation, "mode"), f"{operation.label}: mode: log-only"
