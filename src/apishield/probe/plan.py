"""The plan: from the contract, the config and the identities to a list of attempts.

Each attempt is one request that a sound policy refuses, built so that exactly one thing
is wrong with it: path parameters, required parameters, the body and the credential are
valid (the first `--identity` is sent wherever the operation needs a credential), except
the part under test. Methods that change state (anything but GET, HEAD, OPTIONS, TRACE)
are planned only with `--allow-writes`; the others are counted as skipped so the report
can say what was not tried.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import quote, urlencode

from apishield.config import Config
from apishield.config.auth import Issuer
from apishield.contract.loader import Contract, Operation, escape_pointer
from apishield.probe.bodies import INJECTIONS
from apishield.probe.bodies import variants as body_variants
from apishield.probe.issuer_keys import PemKey, asymmetric, issuer_keys
from apishield.probe.tokens import attack_tokens, forged_tokens, key_confusion_tokens
from apishield.probe.values import Schemas, as_text

if TYPE_CHECKING:
    from apishield.probe.multistep import MultiStep

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
WRITE_METHODS = ("POST", "PUT", "PATCH", "DELETE")
FOREIGN_ORIGIN = "https://apishield-probe.invalid"
UNDECLARED_PATHS = ("/apishield-probe-undeclared", "/admin", "/.env", "/.git/config",
                    "/actuator/env", "/debug/vars", "/server-status")
TRAVERSALS = ("..%2F..%2F..%2Fetc%2Fpasswd", "%2e%2e%2f%2e%2e%2fadmin")
_BEARER_TYPES = ("oauth2", "openIdConnect")

Expect = Literal["refusal", "cors", "headers"]


@dataclass(frozen=True)
class Identity:
    """A named credential from `--identity name=CREDENTIAL`; never shown in a report."""

    name: str
    credential: str = field(repr=False)
    # what it holds, from `--identity name:r1,r2=CRED` (or a JWT's role claims: roles.py);
    # None: unknown, so the identity makes no role attempts
    roles: frozenset[str] | None = None


@dataclass(frozen=True)
class ProbeRequest:
    method: str
    target: str  # path and query, relative to --target's base path, as sent
    headers: tuple[tuple[str, str], ...]
    body: bytes | None
    shown: str  # `target` with credentials replaced, for reports


@dataclass(frozen=True)
class Attempt:
    rule: str
    operation: str | None  # the operation's label, None for path- or API-wide attempts
    pointer: str  # where in the contract (a finding's location): the part under test
    what: str
    request: ProbeRequest
    expect: Expect = "refusal"
    required_headers: tuple[str, ...] = ()  # names every answer must carry (C3)
    file: Path | None = None  # the file `pointer` is in, when not the contract's root
    # an attempt of several requests or identities (BOLA, roles, bursts: multistep.py),
    # which sends and judges itself; `request` is then its main request, for the report
    steps: MultiStep | None = None

    @property
    def cost(self) -> int:
        """The most requests the attempt sends (what `--max-requests` reserves for it)."""
        return self.steps.cost if self.steps is not None else 1


@dataclass
class Plan:
    attempts: list[Attempt]
    skipped_writes: int  # attempts not planned: they need --allow-writes
    notes: list[str]


@dataclass
class _Parts:
    """A request being assembled: the valid base, then one part broken."""

    path: dict[str, str]  # path parameter -> already percent-encoded value
    query: list[tuple[str, str]]
    headers: list[tuple[str, str]]
    secrets: list[str]  # values to hide in `shown`


# a planner of attempts beyond the single-request classes (multistep.PLANNERS): it is
# given the planner (for its request assembly) and yields attempts, added after the others
MorePlanner = Callable[["_Planner"], Iterable[Attempt]]


def build_plan(contract: Contract, config: Config, identities: list[Identity], *,
               rules: set[str], allow_writes: bool, https: bool,
               user_agent: str, more: tuple[MorePlanner, ...] = (),
               public_keys: list[PemKey] | None = None) -> Plan:
    """`more`: planners run after the single-request classes, in order (bursts last, so
    their 429s do not block other attempts); a callback, so this module imports none of
    them (they build on it). `public_keys`: the issuer's keys from `--issuer-keys` (else
    the config's `keys`)."""
    planner = _Planner(contract, config, identities, rules, allow_writes, https, user_agent)
    planner.public_keys = public_keys
    return planner.plan(more)


def template_pattern(template: str) -> re.Pattern[str]:
    parts = re.split(r"(\{[^}/]+\})", template)
    return re.compile("^" + "".join("[^/]+" if p.startswith("{") else re.escape(p)
                                    for p in parts) + "$")


class _Planner:
    def __init__(self, contract: Contract, config: Config, identities: list[Identity],
                 rules: set[str], allow_writes: bool, https: bool, user_agent: str) -> None:
        self.contract = contract
        self.config = config
        self.identity = identities[0] if identities else None
        self.identities = identities
        self.rules = rules
        self.allow_writes = allow_writes
        self.https = https
        self.user_agent = user_agent
        self.schemas = Schemas(contract.resolver)
        self.skipped_writes = 0
        self.notes: list[str] = []
        self.attempts: list[Attempt] = []
        self.required = required_headers(config, https)
        self.public_keys: list[PemKey] | None = None

    # -- the whole plan ---------------------------------------------------------------

    def plan(self, more: tuple[MorePlanner, ...] = ()) -> Plan:
        operations = list(self.contract.operations)
        if self.identity is None and any(self._scheme(op) for op in operations):
            self.notes.append("no --identity: attempts on operations that need a credential "
                              "stop at authentication, whatever they probe")
        if {"probe-response-undeclared-property", "probe-response-write-only"} & self.rules \
                and "probe-security-headers" not in self.rules:
            self.notes.append("response leaks are read in 2xx answers, which come from the "
                              "headers class's valid requests: add it (--only headers,leaks)")
        self._add_all(self._undeclared_paths())
        by_path: dict[str, list[Operation]] = {}
        for operation in operations:
            by_path.setdefault(operation.path, []).append(operation)
        for template, ops in by_path.items():
            self._add_all(self._undeclared_methods(template, ops))
            self._add_all(self._cors(template, ops))
        for operation in operations:
            for attempts in (self._media_types(operation), self._parameters(operation),
                             self._bodies(operation), self._sizes(operation),
                             self._auth(operation), self._headers(operation)):
                self._add_all(attempts)
        for planner in more:
            self._add_all(iter(planner(self)))
        return Plan(self.attempts, self.skipped_writes, self.notes)

    def _add_all(self, attempts: Iterator[Attempt]) -> None:
        for attempt in attempts:
            if attempt.rule not in self.rules:
                continue
            if attempt.request.method not in SAFE_METHODS and not self.allow_writes:
                self.skipped_writes += 1
                continue
            if "probe-security-headers" in self.rules:  # `--only` without headers: not read
                attempt = replace(attempt, required_headers=self.required)
            self.attempts.append(attempt)

    # -- request assembly -------------------------------------------------------------

    def _base(self, operation: Operation, *, credential: bool = True) -> _Parts:
        parts = _Parts({}, [], [], [])
        for parameter in operation.parameters:
            if parameter.location == "path" or (parameter.required and
                                                parameter.location in ("query", "header")):
                value = as_text(self.schemas.valid(parameter.schema, parameter.file))
                if parameter.location == "path":
                    parts.path[parameter.name] = quote(value, safe="")
                elif parameter.location == "query":
                    parts.query.append((parameter.name, value))
                else:
                    parts.headers.append((parameter.name, value))
        if credential:
            self._credential(operation, parts, self.identity.credential
                             if self.identity else None)
        return parts

    def request_as(self, operation: Operation, identity: Identity | None, *,
                   path: dict[str, str] | None = None) -> ProbeRequest:
        """A valid request for `operation` sent as `identity` (None: no credential), with
        `path` parameters (already percent-encoded) overriding the valid values; the
        identity's credential is hidden in `shown` like the first one's."""
        parts = self._base(operation, credential=False)
        parts.path.update(path or {})
        if identity is not None:
            parts.secrets.append(identity.credential)
            self._credential(operation, parts, identity.credential)
        return self._request(operation.method, operation.path, parts,
                             **self._valid_body(operation))

    def _scheme(self, operation: Operation) -> tuple[str, dict[str, Any]] | None:
        """The first security scheme the contract requires for the operation (None: it
        needs none). The contract, not the policy: `public: true` over a requirement is one
        of the holes the probe is for."""
        if not operation.security:
            return None
        for requirement in operation.security:
            for name in requirement:
                scheme = self.contract.security_schemes.get(name)
                if scheme is not None:
                    return name, scheme
        return None

    def _credential(self, operation: Operation, parts: _Parts, value: str | None,
                    raw_authorization: str | None = None) -> None:
        """Put `value` where the operation's scheme reads a credential."""
        found = self._scheme(operation)
        if found is None or (value is None and raw_authorization is None):
            return
        _name, scheme = found
        kind = scheme.get("type")
        if raw_authorization is not None:
            parts.headers.append(("Authorization", raw_authorization))
            return
        assert value is not None
        if value == getattr(self.identity, "credential", None):
            parts.secrets.append(value)
        if kind == "apiKey":
            where, name = scheme.get("in"), str(scheme.get("name"))
            if where == "query":
                parts.query.append((name, value))
            elif where == "cookie":
                parts.headers.append(("Cookie", f"{name}={value}"))
            else:
                parts.headers.append((name, value))
        elif kind == "http" and str(scheme.get("scheme", "")).lower() == "basic":
            encoded = base64.b64encode(value.encode()).decode()
            if parts.secrets:
                parts.secrets.append(encoded)
            parts.headers.append(("Authorization", f"Basic {encoded}"))
        else:
            parts.headers.append(("Authorization", f"Bearer {value}"))

    def _request(self, method: str, template: str, parts: _Parts, *,
                 body: bytes | None = None, content_type: str | None = None,
                 extra_headers: tuple[tuple[str, str], ...] = ()) -> ProbeRequest:
        path = self.contract.base_path.rstrip("/") + re.sub(
            r"\{([^}/]+)\}", lambda m: parts.path.get(m.group(1), "1"), template)
        target = path + (("?" + urlencode(parts.query, quote_via=quote)) if parts.query else "")
        headers = [("User-Agent", self.user_agent), ("Accept", "application/json"),
                   *parts.headers, *extra_headers]
        if body is not None:
            headers.append(("Content-Type", content_type or "application/json"))
        shown = target
        for secret in parts.secrets:
            for form in (secret, quote(secret, safe="")):
                shown = shown.replace(form, "<identity>")
        return ProbeRequest(method, target, tuple(headers), body, shown)

    def _attempt(self, rule: str, operation: Operation, what: str, request: ProbeRequest,
                 *, at: tuple[Path, str] | None = None, **kwargs: Any) -> Attempt:
        """`at`: the file and pointer of the part under test (default: the operation)."""
        file, pointer = at if at is not None else (None, operation.pointer)
        return Attempt(rule, operation.label, pointer, what, request, file=file, **kwargs)

    def _json_body(self, operation: Operation) -> tuple[str, Any, Path] | None:
        """(media type, schema, file) of the operation's JSON body, if it has one."""
        found = self._json_body_at(operation)
        return found[:3] if found is not None else None

    def _json_body_at(self, operation: Operation) -> tuple[str, Any, Path, str] | None:
        for media, schema, file, pointer in operation.bodies:
            if media == "application/json" or media.endswith("+json"):
                return media, schema, file, pointer
        return None

    # -- the classes ------------------------------------------------------------------

    def _undeclared_paths(self) -> Iterator[Attempt]:
        patterns = [template_pattern(op.path) for op in self.contract.operations]
        base = self.contract.base_path.rstrip("/")
        for path in UNDECLARED_PATHS:
            if any(p.match(path) for p in patterns):
                continue
            request = ProbeRequest("GET", base + path, (("User-Agent", self.user_agent),),
                                   None, base + path)
            yield Attempt("probe-undeclared-path", None, "/paths",
                          f"GET {path}, a path the contract does not declare", request)

    def _undeclared_methods(self, template: str, ops: list[Operation]) -> Iterator[Attempt]:
        declared = {op.method for op in ops}
        if "GET" in declared:
            declared.add("HEAD")
        pointer = f"/paths/{escape_pointer(template)}"
        parts = self._base(ops[0])
        candidates = ["TRACE", "GET", *WRITE_METHODS]
        for method in candidates:
            if method in declared:
                continue
            request = self._request(method, template, parts)
            yield Attempt("probe-undeclared-method", None, pointer,
                          f"{method} on {template}, which declares "
                          f"{', '.join(sorted(declared))}", request)

    def _cors(self, template: str, ops: list[Operation]) -> Iterator[Attempt]:
        parts = self._base(ops[0], credential=False)
        request = self._request("OPTIONS", template, parts, extra_headers=(
            ("Origin", FOREIGN_ORIGIN), ("Access-Control-Request-Method", ops[0].method)))
        yield Attempt("probe-cors-foreign-origin", None, f"/paths/{escape_pointer(template)}",
                      f"a CORS preflight for {ops[0].method} {template} from "
                      f"{FOREIGN_ORIGIN}", request, expect="cors")

    def _media_types(self, operation: Operation) -> Iterator[Attempt]:
        if not operation.media_types:
            return
        for media, body in (("text/plain", b"probe"), ("application/xml", b"<probe/>")):
            if media in operation.media_types:
                continue
            request = self._request(operation.method, operation.path, self._base(operation),
                                    body=body, content_type=media)
            yield self._attempt("probe-undeclared-media-type", operation,
                                f"a {media} body (declared: "
                                f"{', '.join(operation.media_types)})", request)

    def _parameters(self, operation: Operation) -> Iterator[Attempt]:
        body = self._valid_body(operation)
        for parameter in operation.parameters:
            if parameter.schema is None or parameter.location not in ("path", "query",
                                                                     "header"):
                continue
            at = (parameter.file, parameter.pointer)
            variants = [(b.rule, b.what, as_text(b.value))
                        for b in self.schemas.breaks(parameter.schema, parameter.file)
                        # arrays are written per style; an empty path segment is a route
                        if not isinstance(b.value, list) and not (
                            b.value == "" and parameter.location == "path")]
            for kind, payload in INJECTIONS:
                if parameter.location != "path" and self.schemas.free_text(
                        parameter.schema, parameter.file, payload):
                    variants.append(("probe-injection", f"a {kind} injection payload",
                                     payload))
            for rule, what, value in variants:
                parts = self._base(operation)
                self._set(parts, parameter.location, parameter.name, quote(value, safe="")
                          if parameter.location == "path" else value)
                yield self._attempt(rule, operation, f"{parameter.location} parameter "
                                    f"{parameter.name}: {what}",
                                    self._request(operation.method, operation.path, parts,
                                                  **body), at=at)
            if parameter.location == "path":
                for traversal in TRAVERSALS:
                    parts = self._base(operation)
                    parts.path[parameter.name] = traversal
                    yield self._attempt("probe-path-traversal", operation,
                                        f"path parameter {parameter.name}: {traversal}",
                                        self._request(operation.method, operation.path,
                                                      parts, **body), at=at)
        if any(parameter.location == "query" and self.schemas.resolve(
                parameter.schema, parameter.file)[0].get("type") == "object"
               for parameter in operation.parameters):
            return  # a free-form object in the query (style: form): any name is declared
        parts = self._base(operation)
        parts.query.append(("apishield_probe", "1"))
        yield self._attempt("probe-unknown-parameter", operation,
                            "an undeclared query parameter apishield_probe",
                            self._request(operation.method, operation.path, parts, **body))

    def _set(self, parts: _Parts, location: str, name: str, value: str) -> None:
        if location == "path":
            parts.path[name] = value
        elif location == "query":
            parts.query = [(n, v) for n, v in parts.query if n != name] + [(name, value)]
        else:
            parts.headers = [(n, v) for n, v in parts.headers if n != name] + [(name, value)]

    def _valid_body(self, operation: Operation) -> dict[str, Any]:
        """The keyword arguments of `_request` for a valid body (none when not needed)."""
        found = self._json_body(operation)
        if found is None or not operation.body_required:
            return {}
        media, schema, file = found
        return {"body": json.dumps(self.schemas.valid(schema, file)).encode(),
                "content_type": media}

    def _bodies(self, operation: Operation) -> Iterator[Attempt]:
        """Broken JSON bodies, nested properties included (probe/bodies.py)."""
        found = self._json_body_at(operation)
        if found is None:
            return
        media, schema, file, pointer = found
        for variant in body_variants(self.schemas, schema, file, pointer):
            yield self._attempt(variant.rule, operation, variant.what, self._request(
                operation.method, operation.path, self._base(operation),
                body=json.dumps(variant.body).encode(), content_type=media), at=variant.at)

    def _sizes(self, operation: Operation) -> Iterator[Attempt]:
        found = self._json_body(operation)
        if found is None:
            return
        media, schema, file = found
        limits = operation.policy.limits
        limit = (limits.max_body_bytes if limits and limits.max_body_bytes is not None
                 else self.config.limits.max_body_bytes)
        if limit <= 64 * 1024 * 1024:
            body = b'{"probe":"' + b"p" * int(limit) + b'"}'
            yield self._attempt("probe-oversized-body", operation,
                                f"a {len(body)}-byte body (limit {int(limit)})",
                                self._request(operation.method, operation.path,
                                              self._base(operation), body=body,
                                              content_type=media))
        depth = self.config.validation.max_json_depth + 8
        valid = self.schemas.valid(schema, file)
        nested: Any = []
        for _ in range(depth):
            nested = [nested]
        document = {**valid, "probe": nested} if isinstance(valid, dict) else nested
        yield self._attempt("probe-deep-nesting", operation,
                            f"a body nested {depth} levels deep (limit "
                            f"{self.config.validation.max_json_depth})",
                            self._request(operation.method, operation.path,
                                          self._base(operation),
                                          body=json.dumps(document).encode(),
                                          content_type=media))

    def _auth(self, operation: Operation) -> Iterator[Attempt]:
        found = self._scheme(operation)
        if found is None:
            return
        name, scheme = found
        body = self._valid_body(operation)

        def send(rule: str, what: str, parts: _Parts) -> Attempt:
            return self._attempt(rule, operation, f"{what} (scheme {name})",
                                 self._request(operation.method, operation.path, parts,
                                               **body))

        if not any(not requirement for requirement in operation.security or ()):
            # `{}` among the requirements: anonymous callers are allowed, by contract
            yield send("probe-auth-missing", "no credential",
                       self._base(operation, credential=False))
        parts = self._base(operation, credential=False)
        kind = scheme.get("type")
        bearer = kind in _BEARER_TYPES or (kind == "http" and str(
            scheme.get("scheme", "")).lower() == "bearer")
        if kind == "apiKey":
            self._credential(operation, parts, "apishield-probe-not-a-key")
        elif bearer:
            self._credential(operation, parts, None, "Bearer apishield-probe-malformed")
        else:
            self._credential(operation, parts, None, "Basic !!apishield-probe!!")
        yield send("probe-auth-malformed", "a malformed credential", parts)
        if not bearer:
            return
        issuer, audience, algorithm = self._issuer(name)
        real = self.identity.credential if self.identity else None
        tokens = [(rule, what, token) for rule, (what, token) in
                  forged_tokens(real, issuer, audience, algorithm).items()]
        settings = self._issuer_settings(name)
        algorithms = settings.algorithms if settings is not None else ()
        tokens += [(rule, what, token) for rule, (what, token) in attack_tokens(
            real, issuer, audience, algorithm, algorithms).items()]
        tokens += [("probe-jwt-key-confusion", what, token) for what, token in
                   key_confusion_tokens(real, issuer, audience, algorithm,
                                        self._public_keys(name))]
        for rule, what, token in tokens:
            parts = self._base(operation, credential=False)
            self._credential(operation, parts, None, f"Bearer {token}")
            yield send(rule, what, parts)

    def _issuer_settings(self, scheme: str) -> Issuer | None:
        for issuer in self.config.auth.issuers.values():
            if not issuer.schemes or scheme in issuer.schemes:
                return issuer
        return None

    def _public_keys(self, scheme: str) -> list[PemKey]:
        """The keys to sign key-confusion tokens with; none (and a plan note saying how to
        give them) when the issuer's keys are only online."""
        if self.public_keys is not None:
            return self.public_keys
        settings = self._issuer_settings(scheme)
        keys = issuer_keys(settings, self.config.source_dir) if settings else []
        noted = f"scheme {scheme}: probe-jwt-key-confusion"
        if not keys and "probe-jwt-key-confusion" in self.rules and not any(
                note.startswith(noted) for note in self.notes) and (
                settings is None or asymmetric(settings)):
            self.notes.append(
                f"{noted} not planned: the issuer's public keys are not in a local file "
                "(the probe contacts only --target); download its JWK Set (jwks_url, or "
                "the discovery document's jwks_uri) and pass --issuer-keys FILE")
        return keys

    def _issuer(self, scheme: str) -> tuple[str | None, str | None, str]:
        """The issuer, an audience and an algorithm the config expects for `scheme`."""
        for issuer in self.config.auth.issuers.values():
            if not issuer.schemes or scheme in issuer.schemes:
                return (issuer.issuer, issuer.audiences[0] if issuer.audiences else None,
                        issuer.algorithms[0] if issuer.algorithms else "RS256")
        return None, None, "RS256"

    def _headers(self, operation: Operation) -> Iterator[Attempt]:
        if operation.method not in ("GET", "HEAD"):
            return
        request = self._request(operation.method, operation.path, self._base(operation))
        yield self._attempt("probe-security-headers", operation,
                            f"a valid request; the answer must carry "
                            f"{', '.join(self.required)}", request, expect="headers")


def required_headers(config: Config, https: bool) -> tuple[str, ...]:
    """The headers the config says every answer carries (C3; docs/responses.md)."""
    headers = config.headers
    required = []
    if headers.x_content_type_options:
        required.append("x-content-type-options")
    if headers.content_security_policy:
        required.append("content-security-policy")
    if headers.cache_control:
        required.append("cache-control")
    if headers.hsts == "always" or (headers.hsts == "auto" and https):
        required.append("strict-transport-security")
    return tuple(required)
