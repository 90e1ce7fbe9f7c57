"""Rules about what requests and responses may carry: open objects, unbounded values,
risky patterns, sensitive fields, undeclared error answers (checklist B1-B4, D4, E1, E3;
OWASP API3, API4, API8). Each schema node is reported once, however many operations
share it."""

from __future__ import annotations

import re
from collections.abc import Iterator
from itertools import pairwise
from typing import Any

from apishield.audit.access import credential_like, words
from apishield.audit.context import AuditContext, SchemaNode
from apishield.audit.findings import Location, Severity, rule
from apishield.contract.loader import Operation, escape_pointer

Found = Iterator[tuple[Location, str]]

# Credentials: matched inside words too (`accesstoken`, `clientsecret` are common).
CREDENTIAL = re.compile(r"(password|passwd|secret|token|apikey|api_key|privatekey|private_key|"
                        r"passphrase)", re.IGNORECASE)
_CREDENTIAL_PAIRS = frozenset({("api", "key"), ("private", "key"), ("access", "key")})
# Personal and card data; SSN only as a word (`businessName` holds "ssn", `IOSSNumber` too).
PERSONAL = re.compile(r"(social_?security|card_?number|cardnumber|^card$|cvv|cvc|pin_?code)",
                      re.IGNORECASE)
# A page cursor named token (`nextPageToken`, `NextToken`, `continuationToken`) and an
# idempotency token are opaque handles, not credentials.
HANDLE_TOKEN = re.compile(r"(page|next|prev|previous|continuation|pagination|cursor|sync|"
                          r"resume|skip|marker|paging|idempotency)[_-]?tokens?$", re.IGNORECASE)
# A last word that makes the name about the credential, not the credential itself:
# `tokenType`, `passwordPolicy`, `AccessTokenValidity`, `secretName`, `tokenId`,
# `refreshTokenExpiresAt` (measured on the corpus: bench/RESULTS.md, issue 15).
ABOUT = frozenset({
    "validity", "policy", "policies", "unit", "units", "revocation", "generation", "expiry",
    "expiration", "expires", "expired", "length", "type", "types", "count", "enabled",
    "required", "url", "uri", "endpoint", "id", "ids", "at", "changed", "updated", "created",
    "age", "lifetime", "ttl", "strength", "status", "format", "days", "hours", "minutes",
    "seconds", "name", "names", "arn", "ref", "version", "configuration", "config",
    "settings", "rules", "complexity", "hint", "location", "role"})
TOKEN_NAME = re.compile(r"token", re.IGNORECASE)


def sensitive_name(name: str, schema: object) -> bool:
    """Whether a property named so, with this schema, likely carries a secret or personal
    data: a credential-like name holding a string (a boolean `hasPassword` or an integer
    `max_tokens` carries none), or a card or social security number; not a page cursor
    or idempotency token, nor a name about the value (`tokenType`, `passwordPolicy`)."""
    split = words(name)
    if len(split) > 1 and split[-1] in ABOUT:
        return False
    if PERSONAL.search(name) or "ssn" in split:
        return True
    if not (CREDENTIAL.search(name) or any(pair in _CREDENTIAL_PAIRS
                                           for pair in pairwise(split))):
        return False
    kind = schema.get("type") if isinstance(schema, dict) else None
    return kind not in ("boolean", "integer", "number") and not HANDLE_TOKEN.search(name)
# a group holding a quantifier, itself quantified: (a+)+, (\w*)*, (.+){2,}
NESTED_QUANTIFIER = re.compile(r"\((?:[^()\\]|\\.)*[+*](?:[^()\\]|\\.)*\)(?:[+*]|\{\d*,\d*\})")


def _types(node: dict[str, Any]) -> set[str]:
    kind = node.get("type")
    if isinstance(kind, str):
        return {kind}
    if isinstance(kind, list):
        return {k for k in kind if isinstance(k, str)}
    return set()


def _at(ctx: AuditContext, item: SchemaNode, suffix: str = "") -> Location:
    return ctx.at_contract(item.file, item.pointer + suffix)


def _closed(node: dict[str, Any]) -> bool:
    return node.get("additionalProperties") is False or \
        node.get("unevaluatedProperties") is False


@rule("open-request-object", title="Request object accepts undeclared properties",
      severity=Severity.MEDIUM, checklist="B2", owasp="API3",
      why="An object that accepts properties it does not declare lets a client send "
          "`role`, `is_admin` or `owner_id` and have the upstream bind them (mass "
          "assignment).",
      fix="Keep validation strict (the default closes every object), or write "
          "`additionalProperties: false`; remove `additionalProperties: true` where strict "
          "mode should hold.")
def open_request_object(ctx: AuditContext) -> Found:
    for item in ctx.request_schemas():
        node = item.node
        if node.get("additionalProperties") is True or node.get("unevaluatedProperties") is True:
            yield _at(ctx, item), ("additionalProperties: true keeps the object open"
                                   + (" although strict mode is on" if ctx.strict(item.operation)
                                      else ""))
        elif (not ctx.strict(item.operation) and "properties" in node and not _closed(node)
              and not isinstance(node.get("additionalProperties"), dict)):
            yield _at(ctx, item), (f"{item.operation.label} is not strict and this object "
                                   "has no additionalProperties: false")


@rule("unbounded-string", title="Request string without maxLength",
      severity=Severity.LOW, checklist="B4", owasp="API4",
      why="A string with no maxLength takes whatever size the body allows; apishield caps "
          "it at validation.max_string_length, a cap made for every field, not this one.",
      fix="Give the string a `maxLength` that fits the field (or an `enum`, or a `format` "
          "with a bounded size such as uuid or date).")
def unbounded_string(ctx: AuditContext) -> Found:
    for item in ctx.request_schemas():
        node = item.node
        if "string" in _types(node) and "maxLength" not in node and not (
                {"enum", "const"} & node.keys()) and node.get("format") not in (
                "uuid", "date", "date-time", "time", "ipv4", "ipv6", "binary"):
            yield _at(ctx, item), "string without maxLength"


@rule("unbounded-array", title="Request array without maxItems",
      severity=Severity.LOW, checklist="B4", owasp="API4",
      why="An array with no maxItems lets one request ask the upstream for work "
          "proportional to its size; apishield caps it at validation.max_array_items only.",
      fix="Give the array a `maxItems` the upstream is built for.")
def unbounded_array(ctx: AuditContext) -> Found:
    for item in ctx.request_schemas():
        if "array" in _types(item.node) and "maxItems" not in item.node:
            yield _at(ctx, item), "array without maxItems"


@rule("unbounded-number", title="Request number without maximum",
      severity=Severity.LOW, checklist="B1", owasp="API4",
      why="Numbers without a maximum reach the upstream as page sizes, quantities or "
          "amounts it never planned for (a `limit=1000000` scrapes a table in one call).",
      fix="Give the number a `maximum` (or `exclusiveMaximum`), and a `minimum`.")
def unbounded_number(ctx: AuditContext) -> Found:
    for item in ctx.request_schemas():
        node = item.node
        if _types(node) & {"integer", "number"} and not (
                {"maximum", "exclusiveMaximum", "enum", "const"} & node.keys()):
            yield _at(ctx, item), "number without maximum"


@rule("backtracking-pattern", title="Pattern prone to catastrophic backtracking",
      severity=Severity.MEDIUM, checklist="B1", owasp="API4",
      why="A nested quantifier such as `(a+)+` makes a backtracking regex engine take "
          "exponential time on a crafted input (ReDoS). apishield's validator is linear, "
          "but the upstream often runs the same pattern on its own engine.",
      fix="Rewrite the pattern without a quantified group that itself holds a quantifier, "
          "and bound the string with maxLength.")
def backtracking_pattern(ctx: AuditContext) -> Found:
    for item in ctx.request_schemas():
        pattern = item.node.get("pattern")
        if isinstance(pattern, str) and NESTED_QUANTIFIER.search(pattern):
            yield _at(ctx, item, "/pattern"), f"pattern {pattern!r} nests quantifiers"


@rule("sensitive-response-property", title="Sensitive property in a response",
      severity=Severity.MEDIUM, checklist="E3", owasp="API3",
      why="A response schema that declares a password, secret, token, API or private key, "
          "SSN or card number "
          "tells apishield's response filter to let it through: excessive data exposure "
          "by contract.",
      fix="Remove the property from the response schema, or mark it `writeOnly: true` "
          "(the response filter drops writeOnly properties); keep responses.mode filter.")
def sensitive_response(ctx: AuditContext) -> Found:
    for item in ctx.response_schemas():
        properties = item.node.get("properties")
        if not isinstance(properties, dict):
            continue
        issues_tokens = credential_like(item.operation.path) or credential_like(
            item.operation.operation_id or "")
        for name, sub in properties.items():
            if issues_tokens and TOKEN_NAME.search(str(name)):
                continue  # a token endpoint answers with its token: that is its purpose
            if sensitive_name(str(name), sub) and not (
                    isinstance(sub, dict) and sub.get("writeOnly") is True
                    and _response_mode(ctx, item.operation) != "off"):
                yield _at(ctx, item, f"/properties/{escape_pointer(str(name))}"), (
                    f"response property {name!r} looks sensitive")


def _response_mode(ctx: AuditContext, operation: Operation) -> str:
    return operation.policy.responses or ctx.config.responses.mode


def _declared(operation: Operation, status: str) -> bool:
    responses = operation.spec.get("responses")
    if not isinstance(responses, dict):
        return False
    keys = {str(key).upper() for key in responses}
    return status in keys or f"{status[0]}XX" in keys or "DEFAULT" in keys


def _limited(ctx: AuditContext, operation: Operation) -> bool:
    settings = ctx.config.rate_limiting
    names = [item.operations for item in settings.limits] + \
        [item.operations for item in settings.quotas]
    return any(not ops or operation.operation_id in ops for ops in names)


@rule("undeclared-error-response", title="401, 403 or 429 answer not declared",
      severity=Severity.LOW, checklist="E1", owasp="API8",
      why="Clients generated from the contract do not expect the refusals apishield will "
          "send (401 without a credential, 403 without the scope or role, 429 past a "
          "limit), and with responses.mode validate an undeclared status is a 502.",
      fix="Declare the statuses (or a `4XX`/`default` response) with an "
          "application/problem+json body.")
def undeclared_errors(ctx: AuditContext) -> Found:
    for operation in ctx.contract.operations:
        missing = []
        if not operation.public and operation.security and any(operation.security):
            missing += [s for s in ("401", "403") if not _declared(operation, s)]
        if _limited(ctx, operation) and not _declared(operation, "429"):
            missing.append("429")
        if missing:
            yield ctx.at_operation(operation, "/responses"), (
                f"{operation.label} does not declare {', '.join(missing)}")
