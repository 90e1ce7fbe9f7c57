"""Checking an audit trail's chain (`apishield audit-log verify`, docs/audit-trail.md).

Walks the records in order and stops at the first one that is wrong, saying where (line
and seq) and what: `tampered` (its hash does not match its content, or the key is not
the one it was written with), `missing` (a gap in seq: records deleted), `reordered`
(seq going back, or `prev` not the hash of the record before it), `truncated` (a last
line cut short), `malformed` (not a record). A whole record cut from the end leaves a
valid shorter chain: only an anchor, a head seen earlier and kept elsewhere, shows that
(`expect_head`, and the Redis stream's head key: `Sink.anchor`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from apishield.observe.audit_trail import KEYED, PLAIN, Entry, Head, record_hash

FIELDS = ("seq", "time", "actor", "action", "details", "prev", "hash")


@dataclass(frozen=True, slots=True)
class Verdict:
    """What verification found: `problem` is None for an intact chain."""

    count: int  # records checked and found good
    head: Head  # the last good record
    problem: str | None = None


def verify(entries: Iterable[Entry], key: bytes | None, *,
           anchor: Head | None = None, expect_head: str | None = None) -> Verdict:
    """Check every record; `anchor`: the head the store keeps apart from the records (the
    Redis head key); `expect_head`: a hash an operator noted earlier, which must be in
    the chain (whole records cut from the end are otherwise invisible)."""
    head = Head(0, None)
    count = 0
    seen_expected = expect_head is None
    for entry in entries:
        problem = _check(entry, head, key)
        if problem is not None:
            return Verdict(count, head, problem)
        record = json.loads(entry.text)
        head = Head(record["seq"], record["hash"])
        count += 1
        if record["hash"] == expect_head:
            seen_expected = True
    if anchor is not None and anchor.seq == 0 and head.seq > 0:
        return Verdict(count, head, "the store's head key is missing (deleted?): records "
                       "removed from the end could not be seen")
    if anchor is not None and anchor != head:
        return Verdict(count, head, f"truncated: the chain ends at seq {head.seq} "
                       f"({head.hash}) but the store's head says seq {anchor.seq} "
                       f"({anchor.hash}): records were removed from the end")
    if not seen_expected:
        return Verdict(count, head, f"truncated: {expect_head} (the expected head) is not in "
                       "the chain: records were removed from its end, or the anchor belongs "
                       "to another trail")
    return Verdict(count, head)


def _check(entry: Entry, head: Head, key: bytes | None) -> str | None:
    where = entry.location
    if not entry.complete:
        return (f"{where}: truncated: a partial record with no line end (a write was cut "
                "short, or the file was cut)")
    try:
        record: Any = json.loads(entry.text)
    except ValueError:
        return f"{where}: malformed: not a JSON record"
    if not isinstance(record, dict) or set(record) != set(FIELDS):
        return f"{where}: malformed: a record has exactly the fields {', '.join(FIELDS)}"
    seq, digest = record["seq"], record["hash"]
    if not isinstance(seq, int) or isinstance(seq, bool) or not isinstance(digest, str):
        return f"{where}: malformed: seq must be a number and hash a string"
    where = f"{where} (seq {seq})"
    expected = head.seq + 1
    if seq > expected:
        gap = f"seq {expected}" if seq == expected + 1 else f"seq {expected} to {seq - 1}"
        return (f"{where}: missing or reordered: {gap} should follow seq {head.seq} (records "
                "were deleted, or moved further down)")
    if seq < expected:
        return f"{where}: reordered: seq {seq} comes after seq {head.seq}"
    algorithm = digest.partition(":")[0]
    if key is not None and algorithm != KEYED:
        return (f"{where}: tampered: written without an HMAC key, but the trail is keyed (a "
                "record anyone could have forged)")
    if key is None and algorithm == KEYED:
        return (f"{where}: the records are HMAC-keyed ({KEYED}): give the key with "
                "--key-env NAME or --key-file PATH (or --config)")
    if algorithm not in (PLAIN, KEYED):
        return f"{where}: malformed: unknown hash algorithm {algorithm!r}"
    if record_hash(record, key) != digest:
        why = ("the record was changed, or the HMAC key is not the one it was written with"
               if key else "the record or its hash was changed")
        return f"{where}: tampered: its hash does not match its content ({why})"
    if record["prev"] != head.hash:
        return (f"{where}: reordered: its prev is not the hash of the record before it (a "
                "record was replaced, inserted or moved)")
    return None
