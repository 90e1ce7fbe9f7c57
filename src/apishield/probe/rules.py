"""The probe's rules: one per kind of attempt, with the audit's `Rule` metadata.

A probe rule is an audit `Rule` whose check never runs statically (the probe's "check" is
a request and its answer), so the audit's SARIF renderer, severities and OWASP titles serve
both commands. Ids start with `probe-` so a CI job that uploads both reports never sees
one id meaning two things; like audit ids they are stable for life.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from apishield.audit.findings import Location, Rule, Severity

if TYPE_CHECKING:
    from apishield.audit.context import AuditContext


def _never(_context: AuditContext) -> Iterable[tuple[Location, str]]:
    return ()


def _rule(id: str, title: str, severity: Severity, checklist: str, owasp: str, why: str,
          fix: str) -> Rule:
    return Rule(id, title, severity, checklist, owasp, why, fix, _never)


_ROUTES = ("Declare every path and method the API serves in the contract and keep the "
           "gateway in front of every route; remove what is not meant to be public.")
_SCHEMA = ("Keep request validation in `enforce` mode for this operation (no `mode: "
           "log-only`) and constrain the schema (types, minimum/maximum, maxLength, enum).")
_AUTH = ("Keep a security requirement on the operation (no `public: true` over it) and "
         "configure an issuer or API keys for its scheme, with explicit `algorithms`; keep "
         "the operation in `enforce` mode (no `mode: log-only`).")

RULE_LIST: tuple[Rule, ...] = (
    _rule("probe-undeclared-path", "A path the contract does not declare was answered",
          Severity.HIGH, "A7", "API9",
          "An undeclared route is an unreviewed one: debug endpoints, old versions, admin "
          "consoles (OWASP API9, improper inventory).", _ROUTES),
    _rule("probe-undeclared-method", "A method the contract does not declare was answered",
          Severity.HIGH, "A7", "API5",
          "A method nobody declared (TRACE, a DELETE beside a GET) reaches code nobody "
          "reviewed or authorized.", _ROUTES),
    _rule("probe-undeclared-media-type", "A media type the operation does not declare was "
          "accepted", Severity.MEDIUM, "B5", "API8",
          "A second parser (XML, form) behind a JSON API is a second attack surface with none "
          "of the JSON schema's checks.",
          "Declare only the media types the API parses; the gateway then answers 415."),
    _rule("probe-schema-type", "A value of the wrong type was accepted", Severity.MEDIUM, "B1",
          "API8", "A string where a number is expected is how injection and type-confusion "
          "bugs start; the contract already says what is valid.", _SCHEMA),
    _rule("probe-schema-bounds", "A value out of its declared bounds was accepted",
          Severity.MEDIUM, "B1", "API4",
          "Bounds (minimum, maximum, maxLength) cap what the API has to handle: page sizes, "
          "ids, buffers.", _SCHEMA),
    _rule("probe-schema-enum", "A value outside its declared enum was accepted",
          Severity.MEDIUM, "B1", "API8",
          "An enum is an allow-list; a value outside it reaches a switch nobody wrote a case "
          "for.", _SCHEMA),
    _rule("probe-schema-format", "A value that breaks its declared format was accepted",
          Severity.MEDIUM, "B1", "API8",
          "A `format` (email, uuid, date, ipv4...) is a promise the API's code relies on: an "
          "id that is not a uuid reaches a query, a date that is not a date a parser.",
          _SCHEMA),
    _rule("probe-schema-pattern", "A value that does not match its declared pattern was "
          "accepted", Severity.MEDIUM, "B1", "API8",
          "A `pattern` is an allow-list for free text (codes, slugs, phone numbers); a value "
          "outside it is text the API was told it would never see.", _SCHEMA),
    _rule("probe-schema-required", "A body without a required property was accepted",
          Severity.MEDIUM, "B1", "API8",
          "A required property left out reaches code that assumes it is there: null "
          "dereferences, defaults nobody chose (an owner, a price).", _SCHEMA),
    _rule("probe-unknown-parameter", "An undeclared query parameter was accepted",
          Severity.MEDIUM, "B2", "API8",
          "Undeclared parameters reach frameworks that bind them (debug flags, filters, "
          "sort keys).",
          "Keep `validation.strict` on for this operation (no `strict: false`)."),
    _rule("probe-mass-assignment", "A body property the schema does not declare was accepted",
          Severity.HIGH, "B2", "API3",
          "Mass assignment: an extra property (`is_admin`, `role`) bound straight to a model.",
          "Keep `validation.strict` on for this operation (no `strict: false`), or write "
          "`additionalProperties: false` on the schema."),
    _rule("probe-read-only-property", "A readOnly property was accepted in a request",
          Severity.HIGH, "B2", "API3",
          "A readOnly property (an id, an owner, a balance) set by the client is mass "
          "assignment of a field the server owns.",
          "Keep request validation in `enforce` mode; apishield refuses readOnly properties "
          "in requests."),
    _rule("probe-injection", "An injection payload was accepted in a free-text field",
          Severity.HIGH, "B6", "API8",
          "SQL, script and shell payloads in free text are refused at the edge as defence in "
          "depth; the API must still use parameterized queries and escaping.",
          "Keep `injection` on for this operation (no `injection: false`) and its detectors "
          "on under `validation.injection`; constrain the field (pattern, enum, format) if it "
          "is not really free text."),
    _rule("probe-path-traversal", "A path traversal in a path parameter was accepted",
          Severity.HIGH, "B3", "API8",
          "`../` (encoded or not) in a path reaches file and route lookups that trust it.",
          "Keep the gateway in front: it normalizes the request target once and refuses "
          "encoded separators and dot segments."),
    _rule("probe-oversized-body", "A body over the size limit was accepted", Severity.MEDIUM,
          "B4", "API4",
          "Unbounded bodies are memory and CPU the client decides to spend (OWASP API4).",
          "Set `limits.max_body_bytes` (or the operation's `limits.max_body_bytes`) to what "
          "the API needs."),
    _rule("probe-deep-nesting", "A deeply nested body was accepted", Severity.MEDIUM, "B4",
          "API4", "Deep nesting exhausts recursive parsers and validators (stack, time).",
          "Keep `validation.max_json_depth` low (default 32)."),
    _rule("probe-auth-missing", "An operation that needs a credential answered without one",
          Severity.CRITICAL, "A7", "API2",
          "The operation is protected in the contract but served to anyone.", _AUTH),
    _rule("probe-auth-malformed", "A malformed credential was accepted", Severity.CRITICAL,
          "A1", "API2", "A credential that does not even parse must never authenticate.",
          _AUTH),
    _rule("probe-jwt-alg-none", "An unsigned (`alg: none`) token was accepted",
          Severity.CRITICAL, "A1", "API2",
          "`alg: none` lets anyone write their own claims (CVE-2015-9235 class).", _AUTH),
    _rule("probe-jwt-expired", "An expired token was accepted", Severity.CRITICAL, "A3",
          "API2", "An expired token is a stolen token's second life.", _AUTH),
    _rule("probe-jwt-bad-signature", "A token with a wrong signature was accepted",
          Severity.CRITICAL, "A1", "API2",
          "A signature that does not verify means the claims are the caller's own.", _AUTH),
    _rule("probe-jwt-tampered", "A token with edited claims was accepted", Severity.CRITICAL,
          "A1", "API2",
          "Claims changed after signing (subject, roles) must break the signature.", _AUTH),
    _rule("probe-jwt-unknown-kid", "A token signed under an unknown key id was accepted",
          Severity.CRITICAL, "A1", "API2",
          "A `kid` the issuer never published must not select a key (or a fallback).", _AUTH),
    _rule("probe-jwt-key-confusion", "An HS256 token keyed with the issuer's public key "
          "was accepted", Severity.CRITICAL, "A1", "API2",
          "A verifier that takes the algorithm from the token HMACs with the public key's "
          "PEM text, which anyone can download: anyone can mint tokens (RFC 8725 2.1, "
          "CVE-2016-10555 class).", _AUTH),
    _rule("probe-jwt-psychic-signature", "An ECDSA token with the signature r = s = 0 was "
          "accepted", Severity.CRITICAL, "A1", "API2",
          "Java 15-18's ECDSA check accepted r = s = 0 for any message and key "
          "(CVE-2022-21449, \"psychic signatures\"): anyone can mint ES256/384/512 tokens.",
          _AUTH + " Update the runtime whose ECDSA check the verifier uses."),
    _rule("probe-jwt-jku", "A token whose `jku` names the caller's own key set was accepted",
          Severity.CRITICAL, "A1", "API2",
          "A verifier that fetches the key set a token's `jku` names lets the token's author "
          "choose the key (RFC 7515 4.1.2; RFC 8725 3.10).",
          _AUTH + " Take keys only from the configured issuer, never from a token's header."),
    _rule("probe-jwt-x5u", "A token whose `x5u` names the caller's own certificate was "
          "accepted", Severity.CRITICAL, "A1", "API2",
          "A verifier that fetches the certificate a token's `x5u` names lets the token's "
          "author choose the key (RFC 7515 4.1.5).",
          _AUTH + " Take keys only from the configured issuer, never from a token's header."),
    _rule("probe-jwt-embedded-jwk", "A token signed by the key embedded in its own header "
          "was accepted", Severity.CRITICAL, "A1", "API2",
          "A verifier that trusts the `jwk` header verifies a token against the key its "
          "author put in it (RFC 7515 4.1.3; CVE-2018-0114).",
          _AUTH + " Take keys only from the configured issuer, never from a token's header."),
    _rule("probe-cors-foreign-origin", "A CORS preflight from a foreign origin was allowed",
          Severity.HIGH, "C3", "API8",
          "A browser on any site may then call the API with the user's credentials or read "
          "its answers.",
          "List only your own origins in `cors.allow_origins` (never `*` with credentials)."),
    _rule("probe-security-headers", "Security headers are missing from an answer",
          Severity.LOW, "C3", "API8",
          "nosniff, a restrictive CSP, no-store and HSTS keep browsers from misusing API "
          "answers.",
          "Keep the gateway's `headers` defaults (docs/responses.md) on every answer."),
    _rule("probe-response-undeclared-property", "An answer carried a property its schema "
          "does not declare", Severity.HIGH, "E3", "API3",
          "Excessive data exposure: internal fields (hashes, flags, other users' data) sent "
          "because the API serializes whole models and trusts the client to ignore them.",
          "Keep `responses.mode` at `filter` (the default) or `validate` for this operation, "
          "and declare the response schema with the properties clients may see."),
    _rule("probe-response-write-only", "An answer carried a writeOnly property",
          Severity.HIGH, "E3", "API3",
          "A `writeOnly` property (a password, a secret) is meant to go in, never out; one "
          "that comes back is leaked to every caller of the operation.",
          "Keep `responses.mode` at `filter` (the default) or `validate` for this "
          "operation: both keep writeOnly properties out of answers."),
    _rule("probe-stack-trace", "A 5xx answer carried a stack trace", Severity.HIGH, "E3",
          "API8",
          "Stack traces name files, queries and versions: a map for the next attack.",
          "Keep the gateway's upstream error masking on (`responses`), and log details "
          "instead of sending them."),
    # several requests or identities (multistep.py)
    _rule("probe-bola", "One identity read another identity's object", Severity.CRITICAL,
          "A6", "API1",
          "Broken object level authorization: changing an id in the path hands one user "
          "another's data, the first OWASP API risk.",
          "Add an `owner` rule to the operation (`owner: {param: path.<name>}`, or `owner: "
          "{response: body.<owner field>}` when only the answer says whose the object "
          "is), or make the API check that the caller owns the object it asks for."),
    _rule("probe-role-escalation", "An identity called an operation its roles do not "
          "reach", Severity.CRITICAL, "A5", "API5",
          "Broken function level authorization: a normal user calls an administrative or "
          "another role's operation by knowing its path.",
          "Keep `require: {roles: [...]}` (or `permissions`) on the operation and make sure "
          "the identity's roles (token claim, key record) and `auth.roles` grant no more "
          "than intended; keep the operation in `enforce` mode."),
    _rule("probe-rate-limit", "A burst over a rate limit was admitted", Severity.HIGH, "D1",
          "API4",
          "A limit the deployment does not enforce leaves the API open to scraping, "
          "credential stuffing and resource exhaustion at the client's pace.",
          "Keep the limit in `rate_limiting.limits` with the operations and key it names, "
          "the same config on every gateway (and `on_store_error: deny`); apishield's 429 "
          "carries Retry-After and the RateLimit headers."),
)

PROBE_RULES: dict[str, Rule] = {rule.id: rule for rule in sorted(RULE_LIST, key=lambda r: r.id)}

# `--only` names a class; a class is a group of rules
CLASSES: dict[str, tuple[str, ...]] = {
    "undeclared": ("probe-undeclared-path", "probe-undeclared-method",
                   "probe-undeclared-media-type"),
    "schema": ("probe-schema-type", "probe-schema-bounds", "probe-schema-enum",
               "probe-schema-format", "probe-schema-pattern", "probe-schema-required",
               "probe-unknown-parameter", "probe-mass-assignment", "probe-read-only-property"),
    "injection": ("probe-injection", "probe-path-traversal"),
    "size": ("probe-oversized-body", "probe-deep-nesting"),
    "auth": ("probe-auth-missing", "probe-auth-malformed", "probe-jwt-alg-none",
             "probe-jwt-expired", "probe-jwt-bad-signature", "probe-jwt-tampered",
             "probe-jwt-unknown-kid", "probe-jwt-key-confusion",
             "probe-jwt-psychic-signature", "probe-jwt-jku", "probe-jwt-x5u",
             "probe-jwt-embedded-jwk"),
    "cors": ("probe-cors-foreign-origin",),
    "headers": ("probe-security-headers",),
    "leaks": ("probe-stack-trace", "probe-response-undeclared-property",
              "probe-response-write-only"),
    "bola": ("probe-bola",),
    "roles": ("probe-role-escalation",),
    "rate-limit": ("probe-rate-limit",),
}
assert sorted(r for rules in CLASSES.values() for r in rules) == sorted(PROBE_RULES)
