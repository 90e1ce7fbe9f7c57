"""Excessive data exposure (OWASP API3, checklist E3): JSON responses are cut down to what
the contract declares for them.

An upstream that serializes its whole database row (`password_hash`, `is_admin`,
internal ids) leaks whatever the contract does not mention. For a JSON response whose
status has a declared schema, apishield removes every property the schema does not
declare and every `writeOnly` property, recursively, before the client sees it.

The schema is compiled once into a `Shape` tree (`shapes.py`). Compositions are read
generously: a property declared by any `allOf`/`anyOf`/`oneOf` member is kept. An object
schema that declares no properties and a schema that allows `additionalProperties` keep
everything; a response without a declared schema is passed as it is (the contract is
silent on it).
"""

from __future__ import annotations

import logging
from typing import Any

import orjson

from apishield.contract import Contract
from apishield.exchange import Exchange, media_type
from apishield.shapes import Builder, Shape
from apishield.steps.validate import is_json

logger = logging.getLogger("apishield")


def prune(value: Any, shape: Shape | None, depth: int = 0) -> Any:
    """`value` without what `shape` does not declare (a new structure; input untouched)."""
    if shape is None or depth > 256:
        return value
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if key in shape.write_only:
                continue
            if key in shape.properties:
                out[key] = prune(item, shape.properties[key], depth + 1)
            elif shape.open:
                out[key] = item
        return out
    if isinstance(value, list) and shape.items is not None:
        return [prune(item, shape.items, depth + 1) for item in value]
    return value


class ResponseFilter:
    name = "response_filter"

    def __init__(self, contract: Contract) -> None:
        assert contract.resolver is not None
        builder = Builder(contract.resolver)
        # operation -> status key -> shape of the JSON body
        self.shapes: dict[str, dict[str, Shape]] = {}
        for op in contract.operations:
            per_status: dict[str, Shape] = {}
            for status, media, schema, file in op.responses:
                if not is_json(media) or status in per_status:
                    continue
                shape = builder.build(schema, file)
                if shape is not None:
                    per_status[status] = shape
            if per_status:
                self.shapes[op.pointer] = per_status

    def shape_for(self, exchange: Exchange, status: int, content_type: bytes | None
                  ) -> Shape | None:
        operation = exchange.operation
        if operation is None or content_type is None:
            return None
        per_status = self.shapes.get(operation.pointer)
        if per_status is None:
            return None
        media = media_type(content_type)
        if not is_json(media):
            return None
        code = str(status)
        return per_status.get(code) or per_status.get(code[0] + "XX") or per_status.get(
            "DEFAULT")

    def filter(self, exchange: Exchange, shape: Shape, body: bytes) -> bytes | None:
        """The filtered body, or None when it is not JSON (then it must not be sent)."""
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError:
            logger.warning("response to %s declared JSON but is not; refused", exchange.id)
            return None
        pruned = prune(document, shape)
        if pruned == document:
            return body  # nothing undeclared: the upstream's bytes as they were
        exchange.reason = exchange.reason or "response-filtered"
        return orjson.dumps(pruned)
