"""Early size and media-type limits (checklist B4, B5), decided from the request head.

The body limit is known before a byte of body is read, so the front ends refuse a
`Content-Length` over it at once and stop reading a chunked body the moment it passes it:
an oversized body is never buffered whole.
"""

from __future__ import annotations

from apishield.config import Limits
from apishield.contract.loader import Operation
from apishield.exchange import Exchange, media_type
from apishield.problems import BadRequest, PayloadTooLarge, UnsupportedMediaType


class LimitsStep:
    name = "limits"

    def __init__(self, limits: Limits, operations: tuple[Operation, ...]) -> None:
        self.default_body = limits.max_body_bytes
        self.body_limit: dict[str, int] = {}
        self.media: dict[str, tuple[frozenset[str], frozenset[str], bool]] = {}
        for op in operations:
            override = op.policy.limits.max_body_bytes if op.policy.limits else None
            self.body_limit[op.pointer] = limits.max_body_bytes if override is None else override
            exact = frozenset(m for m in op.media_types if not m.endswith("/*"))
            prefixes = frozenset(m[:-1] for m in op.media_types if m.endswith("/*") and m != "*/*")
            self.media[op.pointer] = (exact, prefixes, "*/*" in op.media_types)

    def on_head(self, exchange: Exchange) -> None:
        operation = exchange.operation
        assert operation is not None  # the route step runs first
        limit = self.body_limit[operation.pointer]
        exchange.body_limit = limit
        # what the front end found in its one pass over the headers (Exchange)
        length = exchange.declared_length
        if length < 0:  # llhttp refuses this first; the middleware has no llhttp
            raise BadRequest("content-length-invalid", close=True)
        if exchange.content_type_repeated:
            # a singleton field (RFC 9110 8.3): two values let two parsers disagree on
            # what the body is (one validates JSON, the other reads text)
            raise BadRequest("content-type-repeated")
        if length > limit:
            raise PayloadTooLarge("body-over-limit", close=True)
        content_type = exchange.content_type
        has_body = exchange.chunked or length > 0
        if not has_body:
            if operation.body_required:
                raise BadRequest("body-required", contract_rule=True)
            return
        exact, prefixes, anything = self.media[operation.pointer]
        if not (exact or prefixes or anything):
            raise UnsupportedMediaType("body-not-declared", close=not length)
        if anything:
            return
        if content_type is None:
            raise UnsupportedMediaType("content-type-missing")
        media = media_type(content_type)
        if media in exact:
            return
        if any(media.startswith(prefix) for prefix in prefixes):
            return
        raise UnsupportedMediaType("content-type-not-declared")
