"""BOLA (OWASP API1, checklist A6): identity B asks for identity A's object.

With two `--identity` values, for every read (GET, HEAD) that the contract protects and
that either has an ownership rule in the policy (`owner`, docs/authentication.md) or takes
an ID-like path parameter (the audit's `bola-id-parameter` heuristic, with its exception:
an operation that requires roles or permissions is the roles class's), the replay is:

1. A lists the objects, when a list operation returns them (a GET whose 200 answer is an
   array of the same schema, or whose path is the object path's collection): the first
   item's id (the parameter's name, its snake_case form, or `id`) is an object A can see;
   else the parameter's valid value from the schema;
2. A reads the object: not a 2xx means there is nothing to replay, and the attempt is
   **inconclusive** (the report says why), not a pass and not a hole;
3. B asks for the same object: a 2xx got through; a 403 or 404 refused it, whether as a
   problem (the gateway's ownership rule) or plain (the API's own check: for BOLA, unlike
   the other classes, the API's check IS the protection the probe looks for).

Reads only in this slice: a replayed DELETE or PUT that gets through destroys A's data.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import orjson

from apishield.audit.access import ID_PARAMETER
from apishield.contract.loader import Operation
from apishield.probe.plan import Attempt, ProbeRequest
from apishield.probe.sender import Answer
from apishield.probe.values import as_text
from apishield.probe.verdict import Outcome, SentRequest, judge

if TYPE_CHECKING:
    from apishield.probe.multistep import Send
    from apishield.probe.plan import _Planner

RULE = "probe-bola"
MARKER = "apishield-probe-object-id"  # where the object id goes, once it is known
_LIST_KEYS = ("items", "data", "results", "records", "objects")


@dataclass(frozen=True)
class Replay:
    """A reads an object (found through `listing` when there is one), then B asks for it.
    `as_owner` and `as_intruder` carry MARKER where the object id goes."""

    owner: str  # identity A's name
    intruder: str  # identity B's name
    listing: ProbeRequest | None  # A's request to the list operation
    fields: tuple[str, ...]  # where an item of the list keeps its id, best first
    fallback: str  # the schema's valid value, when the list gives no id
    as_owner: ProbeRequest
    as_intruder: ProbeRequest

    @property
    def cost(self) -> int:
        return 3 if self.listing is not None else 2

    def run(self, attempt: Attempt, send: Send) -> Outcome:
        sent: list[SentRequest] = []

        def call(request: ProbeRequest, who: str, step: str) -> Answer | str:
            answer = send(request, True)
            sent.append(SentRequest(who, request.method, request.shown,
                                    answer.status if isinstance(answer, Answer) else None,
                                    step))
            return answer

        object_id, source = self.fallback, "the schema's valid value"
        if self.listing is not None:
            listed = call(self.listing, self.owner, "list")
            found = _first_id(listed, self.fields)
            if found is not None:
                object_id = found
                source = f"{self.owner}'s answer to {self.listing.method} {self.listing.shown}"
        mine = _with_id(self.as_owner, object_id)
        first = call(mine, self.owner, "owner")
        theirs = _with_id(self.as_intruder, object_id)
        shown = replace(attempt, request=theirs)
        if not isinstance(first, Answer) or judge(attempt, first).verdict == "blocked":
            outcome = judge(replace(attempt, request=mine), first)
            return replace(outcome, attempt=shown, requests=tuple(sent))
        if not 200 <= first.status < 300:
            return Outcome(shown, "inconclusive", first.status, None,
                           f"identity {self.owner} could not read {mine.method} {mine.shown} "
                           f"({first.status}; id from {source}): nothing to replay",
                           requests=tuple(sent))
        second = call(theirs, self.intruder, "intruder")
        return replace(_judge_intruder(shown, second, self), requests=tuple(sent))


def _judge_intruder(attempt: Attempt, answer: Answer | str, replay: Replay) -> Outcome:
    outcome = judge(attempt, answer)
    if not isinstance(answer, Answer) or outcome.verdict == "blocked":
        return outcome
    who, whose = replay.intruder, replay.owner
    if 200 <= answer.status < 300:
        return replace(outcome, verdict="got-through", detail=(
            f"identity {who} read identity {whose}'s object: answered {answer.status}"))
    if answer.status in (403, 404):
        if outcome.problem_type is not None:
            return replace(outcome, verdict="refused", detail=(
                f"refused {answer.status} {outcome.problem_type}: identity {who} may not "
                f"read identity {whose}'s object"))
        return replace(outcome, verdict="refused", detail=(
            f"refused by the API itself (a plain {answer.status}): for BOLA the API's own "
            "ownership check is the protection, so this counts as refused"))
    if answer.status == 401:
        return replace(outcome, verdict="inconclusive", detail=(
            f"identity {who} was not authenticated ({answer.status}"
            f"{' ' + outcome.problem_type if outcome.problem_type else ''}): check its "
            "credential; the replay proves nothing"))
    return outcome


def _with_id(request: ProbeRequest, object_id: str) -> ProbeRequest:
    encoded = quote(object_id, safe="")
    return replace(request, target=request.target.replace(MARKER, encoded),
                   shown=request.shown.replace(MARKER, encoded))


def _first_id(answer: Answer | str, fields: tuple[str, ...]) -> str | None:
    """The id of the first listed object that has one, or None."""
    if not isinstance(answer, Answer) or not 200 <= answer.status < 300:
        return None
    try:
        document = orjson.loads(answer.body)
    except orjson.JSONDecodeError:
        return None
    for item in _items(document):
        if not isinstance(item, dict):
            continue
        for name in fields:
            value = item.get(name)
            if isinstance(value, str | int) and not isinstance(value, bool) and value != "":
                return as_text(value)
    return None


def _items(document: Any) -> list[Any]:
    if isinstance(document, list):
        return document
    if isinstance(document, dict):
        for key in _LIST_KEYS:
            if isinstance(document.get(key), list):
                return list(document[key])
    return []


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", name).lower()


def object_parameter(operation: Operation) -> str | None:
    """The path parameter naming the object: the owner rule's (`path.NAME`), else the last
    ID-like one (None: not an object read the replay can vary)."""
    path_names = [p.name for p in operation.parameters if p.location == "path"]
    owner = operation.policy.owner
    if owner is not None and owner.param is not None:
        source, _, name = owner.param.partition(".")
        if source == "path" and name in path_names:
            return name
    ids = [name for name in path_names if ID_PARAMETER.search(name)]
    if ids:
        return ids[-1]
    return path_names[-1] if owner is not None and path_names else None


def candidate(planner: _Planner, operation: Operation) -> bool:
    """A protected read with an ownership rule or an ID-like path parameter."""
    if operation.method not in ("GET", "HEAD") or planner._scheme(operation) is None:
        return False
    if operation.policy.owner is not None:
        return True
    require = operation.policy.require
    if require is not None and (require.roles or require.permissions):
        return False  # the audit's exception: a role requirement (the roles class)
    return any(p.location == "path" and ID_PARAMETER.search(p.name)
               for p in operation.parameters)


def _response_ref(operation: Operation) -> tuple[str | None, str | None]:
    """($ref of the 200 JSON answer, $ref of its array items), as written."""
    for status, media, schema, _file in operation.responses:
        if status not in ("200", "2XX") or not (media == "application/json"
                                                 or media.endswith("+json")):
            continue
        if not isinstance(schema, dict):
            return None, None
        items = schema.get("items") if schema.get("type") == "array" else None
        if items is None:
            for key in _LIST_KEYS:
                node = (schema.get("properties") or {}).get(key)
                if isinstance(node, dict) and node.get("type") == "array":
                    items = node.get("items")
                    break
        item_ref = items.get("$ref") if isinstance(items, dict) else None
        return schema.get("$ref"), item_ref
    return None, None


def listing_for(planner: _Planner, operation: Operation, parameter: str) -> Operation | None:
    """A GET that lists what `operation` reads: its 200 answer is an array of the same
    schema, or its path is the object path's collection (`/pets` for `/pets/{petId}`)."""
    own_ref, _ = _response_ref(operation)
    collection = operation.path.rsplit("/{" + parameter + "}", 1)[0] \
        if operation.path.endswith("/{" + parameter + "}") else None
    by_path = None
    for other in planner.contract.operations:
        if other.method != "GET" or other is operation:
            continue
        _, item_ref = _response_ref(other)
        if own_ref is not None and item_ref == own_ref:
            return other
        if collection is not None and other.path == collection and by_path is None:
            by_path = other
    return by_path


def replays(planner: _Planner) -> Iterator[Attempt]:
    """One BOLA attempt per candidate operation (identity 1 is A, identity 2 is B)."""
    if RULE not in planner.rules:
        return
    candidates = [op for op in planner.contract.operations if candidate(planner, op)]
    operations = [op for op in candidates if object_parameter(op) is not None]
    unvaried = [op.label for op in candidates if op not in operations]
    if unvaried:
        planner.notes.append(f"no BOLA attempt on {', '.join(unvaried)}: an owner rule but "
                             "no path parameter to replay (the replay varies a path id)")
    if not operations:
        return
    if len(planner.identities) < 2:
        planner.notes.append(
            f"{len(planner.identities)} --identity: no BOLA attempts on the "
            f"{len(operations)} operation(s) with an owner rule or an ID-like path "
            "parameter; they need two (A reads an object, B asks for it)")
        return
    owner, intruder = planner.identities[0], planner.identities[1]
    for operation in operations:
        parameter = object_parameter(operation)
        assert parameter is not None
        found = next(p for p in operation.parameters
                     if p.location == "path" and p.name == parameter)
        fallback = as_text(planner.schemas.valid(found.schema, found.file))
        listing = listing_for(planner, operation, parameter)
        fields = tuple(dict.fromkeys((parameter, _snake(parameter), "id")))
        replay = Replay(
            owner.name, intruder.name,
            planner.request_as(listing, owner) if listing is not None else None,
            fields, fallback,
            planner.request_as(operation, owner, path={parameter: MARKER}),
            planner.request_as(operation, intruder, path={parameter: MARKER}))
        why = ("an owner rule" if operation.policy.owner is not None
               else f"the ID-like path parameter {parameter}")
        source = (f"one {listing.label} lists" if listing is not None
                  else "the schema's valid value")
        yield Attempt(RULE, operation.label, operation.pointer,
                      f"identity {intruder.name} asks for identity {owner.name}'s object "
                      f"(id: {source}), an operation with {why}",
                      _display(replay.as_intruder, parameter), steps=replay)


def _display(request: ProbeRequest, parameter: str) -> ProbeRequest:
    """The request as the plan shows it before the id is known: `{parameter}` in place of
    the id (the replay sends its own copies, with the id in)."""
    return replace(request, target=request.target.replace(MARKER, f"{{{parameter}}}"),
                   shown=request.shown.replace(MARKER, f"{{{parameter}}}"))
