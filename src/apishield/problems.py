"""Refusals, and the one place that renders them (RFC 9457 problem details).

Steps reject a request by raising a `Problem`. Nothing else writes an error body, so
masking is decided once, here: the client sees a generic `title`/`detail`, the `type`
that names the practice, and the request id; the precise `reason` goes to the access
log only (no oracle for attackers, checklist E1/E2).

Exception tree::

    Problem                         status 400 unless a subclass says otherwise
    ├── BadRequest                  400  malformed request (parser, smuggling, path tricks)
    ├── InvalidParameters           400  parameters break the contract (B1, B2); `errors`
    ├── InvalidBody                 422  a well-formed body breaks its schema (B1, B2); `errors`
    ├── InjectionSuspected          400  SQLi/XSS/shell payload in a free-text value (B6)
    ├── NotFound                    404  path not in the contract (A7)
    ├── MethodNotAllowed            405  method not declared for the path (A7), carries Allow
    ├── PayloadTooLarge             413  body over the limit (B4)
    ├── UriTooLong                  414  URL over the limit (B4)
    ├── UnsupportedMediaType        415  undeclared request media type (B5)
    ├── HeadersTooLarge             431  header bytes or count over the limit (B4)
    ├── Unauthorized                401  no valid credential (A1-A4); carries WWW-Authenticate
    ├── Forbidden                   403  refused on purpose (websockets not allowed, ...)
    │   ├── AccessDenied            403  authenticated, but not allowed (A5, A6)
    │   ├── NotPublic               403  the operation declares no security and is not public (A7)
    │   ├── IpDenied                403  the client address is not allowed (D5)
    │   └── ClientBanned            403  the client (address or account) is banned for a time (A9)
    │   └── HttpsRequired           403  plain HTTP on a listener that refuses it (C1)
    ├── TooManyRequests             429  a rate limit, quota or concurrency cap (D1-D4, RFC 6585)
    ├── RequestTimeout              408  the client did not send its request in time (D3)
    ├── InternalError               500  a bug in apishield: traceback logged, never sent
    ├── UpstreamFailure             5xx  the upstream failed; its body is masked (E3)
    ├── BadGateway                  502  upstream unreachable or broke the protocol
    ├── ServiceUnavailable          503  shutting down, pool exhausted
    └── GatewayTimeout              504  upstream too slow
"""

from __future__ import annotations

from typing import ClassVar

import orjson

PROBLEM_CONTENT_TYPE = b"application/problem+json"
TYPE_PREFIX = "urn:apishield:problem:"


class Problem(Exception):
    """A refusal. Class attributes are the public defaults; `reason` is private."""

    status: int = 400  # an instance may override it (UpstreamFailure: the upstream's 5xx)
    slug: ClassVar[str] = "bad-request"
    title: ClassVar[str] = "Bad Request"
    detail: ClassVar[str] = "The request is not acceptable."
    practice: ClassVar[str] = "B3"
    # A refusal that only the contract decides (not the protocol, not a size limit): in
    # `log-only` mode it is logged and the request goes through.
    contract_rule: bool = False  # the class default; an instance may override it

    def __init__(
        self,
        reason: str,
        *,
        headers: list[tuple[bytes, bytes]] | None = None,
        close: bool = False,
        contract_rule: bool | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason  # precise, machine-readable; logged, never sent
        self.headers = headers or []
        self.close = close  # close the client connection after answering
        if contract_rule is not None:
            self.contract_rule = contract_rule
        # [{"pointer": ..., "reason": ...}]: where the request breaks the contract, never
        # what it contained (the submitted value is not echoed)
        self.errors: list[dict[str, str]] = []


class BadRequest(Problem):
    pass


class InvalidParameters(Problem):
    contract_rule = True
    slug = "invalid-parameters"
    title = "Bad Request"
    detail = "The request parameters do not match the API contract; see `errors`."
    practice = "B1"


class InvalidBody(Problem):
    contract_rule = True
    status = 422
    slug = "invalid-body"
    title = "Unprocessable Content"
    detail = "The request body does not match the API contract; see `errors`."
    practice = "B1"


class InjectionSuspected(Problem):
    contract_rule = True
    slug = "injection-suspected"
    detail = "A value in the request looks like an injection payload; see `errors`."
    practice = "B6"


class NotFound(Problem):
    contract_rule = True
    status = 404
    slug = "route-not-found"
    title = "Not Found"
    detail = "No such resource."
    practice = "A7"


class MethodNotAllowed(Problem):
    contract_rule = True
    status = 405
    slug = "method-not-allowed"
    title = "Method Not Allowed"
    detail = "The method is not allowed for this resource."
    practice = "A7"


class Forbidden(Problem):
    status = 403
    slug = "forbidden"
    title = "Forbidden"
    detail = "The request is not allowed."
    practice = "A7"


class Unauthorized(Problem):
    """Missing or invalid credentials. One public detail for every reason (expired, bad
    signature, revoked key, ...): the precise reason goes to the security event only, so
    the answer is no oracle (RFC 6750 3.1 lets the error code be omitted)."""

    contract_rule = True
    status = 401
    slug = "unauthorized"
    subject: str | None = None  # the account a refused credential named, when known
    title = "Unauthorized"
    detail = "Valid credentials are required."
    practice = "A1"


class AccessDenied(Forbidden):
    contract_rule = True
    status = 403
    slug = "access-denied"
    title = "Forbidden"
    detail = "The credentials are valid but do not allow this request."
    practice = "A5"


class NotPublic(Forbidden):
    contract_rule = True
    status = 403
    slug = "not-public"
    title = "Forbidden"
    detail = "This operation is not open: the API contract declares no security for it."
    practice = "A7"


class IpDenied(Forbidden):
    slug = "ip-denied"
    detail = "Requests from this address are not allowed."
    practice = "D5"


class ClientBanned(Forbidden):
    slug = "client-banned"
    detail = "Too many refused requests: this client is blocked for a while; see Retry-After."
    practice = "A9"


class TooManyRequests(Problem):
    """RFC 6585 4: with Retry-After, and the IETF RateLimit headers of the limit hit."""

    status = 429
    slug = "rate-limited"
    title = "Too Many Requests"
    detail = "Too many requests; retry after the time given in Retry-After."
    practice = "D1"


class HttpsRequired(Forbidden):
    slug = "https-required"
    detail = "This API is served over HTTPS only."
    practice = "C1"


class CorsRefused(Forbidden):
    slug = "cors-refused"
    detail = "This cross-origin request is not allowed."
    practice = "C3"


class PreflightAccepted(Problem):
    """Not a refusal: a CORS preflight the gateway answers itself (204, no body).
    Raised like a Problem so the head phase stops there; rendered without a body."""

    status = 204
    slug = "cors-preflight"
    title = "No Content"
    detail = ""
    practice = "C3"


class RequestTimeout(Problem):
    status = 408
    slug = "request-timeout"
    title = "Request Timeout"
    detail = "The request was not received in time."
    practice = "D3"


class PayloadTooLarge(Problem):
    status = 413
    slug = "body-too-large"
    title = "Content Too Large"
    detail = "The request body is larger than allowed."
    practice = "B4"


class UriTooLong(Problem):
    status = 414
    slug = "url-too-long"
    title = "URI Too Long"
    detail = "The request URL is longer than allowed."
    practice = "B4"


class UnsupportedMediaType(Problem):
    contract_rule = True
    status = 415
    slug = "unsupported-media-type"
    title = "Unsupported Media Type"
    detail = "The request body media type is not accepted for this operation."
    practice = "B5"


class HeadersTooLarge(Problem):
    status = 431
    slug = "headers-too-large"
    title = "Request Header Fields Too Large"
    detail = "The request headers are larger or more numerous than allowed."
    practice = "B4"


class InternalError(Problem):
    status = 500
    slug = "internal-error"
    title = "Internal Server Error"
    detail = "An internal error occurred. Quote the request id to the API operator."
    practice = "E2"


class UpstreamFailure(Problem):
    """The upstream answered 5xx: its status is kept, its body (stack traces, SQL) is not."""

    status = 500  # replaced per instance by the upstream's status
    slug = "upstream-error"
    title = "Upstream Error"
    detail = "The service behind the gateway failed. Quote the request id to the API operator."
    practice = "E3"


class BadGateway(Problem):
    status = 502
    slug = "bad-gateway"
    title = "Bad Gateway"
    detail = "The service behind the gateway could not answer."
    practice = "E1"


class ServiceUnavailable(Problem):
    status = 503
    slug = "unavailable"
    title = "Service Unavailable"
    detail = "The service is temporarily unavailable."
    practice = "E1"


class GatewayTimeout(Problem):
    status = 504
    slug = "gateway-timeout"
    title = "Gateway Timeout"
    detail = "The service behind the gateway did not answer in time."
    practice = "E1"


ALL_PROBLEMS: tuple[type[Problem], ...] = (
    BadRequest,
    InvalidParameters,
    InvalidBody,
    InjectionSuspected,
    NotFound,
    MethodNotAllowed,
    Unauthorized,
    Forbidden,
    AccessDenied,
    NotPublic,
    IpDenied,
    ClientBanned,
    TooManyRequests,
    HttpsRequired,
    CorsRefused,
    RequestTimeout,
    PayloadTooLarge,
    UriTooLong,
    UnsupportedMediaType,
    HeadersTooLarge,
    InternalError,
    UpstreamFailure,
    BadGateway,
    ServiceUnavailable,
    GatewayTimeout,
)


class ProblemRenderer:
    """Renders refusals with the documentation link of their type (G5: teaching).

    RFC 9457 3.2 allows extension members: `docs` is `<responses.problem_docs>#<slug>`,
    the page (an anchor of docs/problems.md, wherever the operator publishes it) that says
    what the type means, the practice it enforces and how to fix its cause. The URN `type`
    stays as it is: clients that match on it keep working.

    On the refusal hot path (a flood of 429s renders one body each), so everything but the
    request id and `errors` is serialized once per (class, status) and kept as bytes; the
    cache holds at most one entry per problem class and status (UpstreamFailure's 5xx
    range bounds it)."""

    __slots__ = ("_docs", "_parts")

    def __init__(self, docs: str | None = None) -> None:
        self._docs = docs
        self._parts: dict[tuple[type[Problem], int], tuple[bytes, bytes]] = {}

    def _compile(self, problem: Problem) -> tuple[bytes, bytes]:
        """(what comes before the request id, what comes after it), as bytes."""
        members: dict[str, object] = {
            "type": TYPE_PREFIX + problem.slug,
            "title": problem.title,
            "status": problem.status,
            "detail": problem.detail,
            "instance": "urn:apishield:request:",
            "practice": problem.practice,
        }
        if self._docs is not None:
            members["docs"] = f"{self._docs}#{problem.slug}"
        document = orjson.dumps(members)
        cut = document.index(b'urn:apishield:request:"') + len(b"urn:apishield:request:")
        return document[:cut], document[cut:]

    def render(self, problem: Problem, request_id: str) -> bytes:
        """The body every refusal gets: RFC 9457 members plus `practice` and `docs`."""
        parts = self._parts.get((type(problem), problem.status))
        if parts is None:
            parts = self._parts[(type(problem), problem.status)] = self._compile(problem)
        head, tail = parts
        # request ids are hex from exchange.new_request_id: nothing in them needs escaping
        if problem.errors:
            return b"%s%s%s,\"errors\":%s}" % (head, request_id.encode(), tail[:-1],
                                                 orjson.dumps(problem.errors))
        return head + request_id.encode() + tail
