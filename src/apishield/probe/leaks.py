"""Response leaks (OWASP API3, checklist E3): properties an answer should not carry.

Every 2xx JSON answer the probe gets (the valid requests of the headers class, and any
attempt that got through) is read against the response schema the contract declares for
the operation (the status, then `2XX`, then `default`: the gateway's order) and walked
with the same shapes the gateway's response filter uses (contract/shapes.py), in the same
strict sense: an object schema that declares `properties` and does not allow others is
closed. What is found: properties a closed schema does not declare, and properties marked
`writeOnly` (a password must never come back). Only the property path is kept, never its
value.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import orjson

from apishield.contract.loader import Contract
from apishield.contract.shapes import Builder, Shape
from apishield.probe.plan import Attempt
from apishield.probe.sender import BODY_KEPT, Answer

MAX_LEAKS = 20  # per answer: enough to name the problem
_MAX_DEPTH = 32

LeakKind = Literal["undeclared", "write-only"]


@dataclass(frozen=True)
class Leak:
    kind: LeakKind
    property: str  # `password_hash`, `owner.password`, `[].token`: where, never the value
    pointer: str  # the response in the contract (a finding's location)
    file: Path


@dataclass(frozen=True)
class _Declared:
    status: str  # "200", "2XX", "DEFAULT"
    media: str
    shape: Shape
    pointer: str
    file: Path


class LeakCheck:
    """Built once per run from the contract; called with each answer."""

    def __init__(self, contract: Contract) -> None:
        self.declared: dict[str, list[_Declared]] = {}
        if contract.resolver is None:
            return
        builder = Builder(contract.resolver)
        for operation in contract.operations:
            found: list[_Declared] = []
            for status, media, schema, file in operation.responses:
                if not _is_json(media):
                    continue
                shape = builder.build(schema, file)
                if shape is not None:
                    key = "default" if status == "DEFAULT" else status
                    found.append(_Declared(status, media, shape,
                                           f"{operation.pointer}/responses/{key}", file))
            if found:
                self.declared[operation.label] = found

    def __call__(self, attempt: Attempt, answer: Answer) -> tuple[Leak, ...]:
        if attempt.operation is None or not 200 <= answer.status < 300:
            return ()
        candidates = self.declared.get(attempt.operation)
        content_type = (answer.header("content-type") or "").split(";")[0].strip().lower()
        if not candidates or not _is_json(content_type) or len(answer.body) >= BODY_KEPT:
            return ()  # a cut body can not be read whole
        declared = _pick(candidates, answer.status, content_type)
        if declared is None:
            return ()
        try:
            document = orjson.loads(answer.body)
        except orjson.JSONDecodeError:
            return ()
        found: list[tuple[LeakKind, str]] = []
        _walk(document, declared.shape, "", found, 0)
        return tuple(Leak(kind, name, declared.pointer, declared.file)
                     for kind, name in dict.fromkeys(found))


def _is_json(media: str) -> bool:
    return media == "application/json" or media.endswith("+json")


def _pick(candidates: list[_Declared], status: int, content_type: str) -> _Declared | None:
    for key in (str(status), f"{status // 100}XX", "DEFAULT"):
        matching = [c for c in candidates if c.status == key]
        if matching:
            return next((c for c in matching if c.media == content_type), matching[0])
    return None


def _walk(value: object, shape: Shape | None, path: str,
          found: list[tuple[LeakKind, str]], depth: int) -> None:
    if shape is None or depth > _MAX_DEPTH or len(found) >= MAX_LEAKS:
        return
    if isinstance(value, dict):
        for name, child in value.items():
            where = f"{path}.{name}" if path else str(name)
            if name in shape.write_only:
                found.append(("write-only", where))
            elif name in shape.properties:
                _walk(child, shape.properties[name], where, found, depth + 1)
            elif not shape.open:
                found.append(("undeclared", where))
    elif isinstance(value, list) and shape.items is not None:
        for item in value:
            _walk(item, shape.items, f"{path}[]", found, depth + 1)
