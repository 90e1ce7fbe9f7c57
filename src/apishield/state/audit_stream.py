"""The audit trail in Redis (`state: redis://...`): one stream every gateway and the CLI
append to, so a cluster of gateways keeps one chain (docs/audit-trail.md).

Layout, under the stores' namespace (a hash tag on a Cluster, as in `redis_store`):
`<ns>:audit` a stream whose entries hold one field `record` (the JSON line a file would
hold), `<ns>:audit:head` the last record's `<seq> <hash>`.

Why a compare-and-set script and not a script that hashes: Redis's Lua has SHA-1 only
(and no HMAC), so the record is built and hashed by the client from the head it read; the
script appends it only if the head is still that one (then moves the head in the same
atomic step), else returns the new head and the client builds again. Two writers can
never both chain onto the same record. The head key doubles as an anchor: `verify`
compares it with the stream's last record, so an XDEL of the last entries shows.

The stream is never trimmed (a trail with holes proves nothing); a record is a few
hundred bytes. Persistence is Redis's (`appendonly yes`, as for keys and bans).
"""

from __future__ import annotations

from collections.abc import Iterator

from apishield.config.redis_urls import cluster_namespace, redact_url
from apishield.observe.audit_trail import AuditTrailError, Build, Entry, Head
from apishield.state.redis_store import DEFAULT_NAMESPACE, SyncClient, connect

ATTEMPTS = 50  # other writers winning the race this many times in a row: give up
PAGE = 1000  # entries per XRANGE while verifying

# KEYS: stream, head; ARGV: the head the record was built on ("" for none), the new head,
# the record. {1, ""} when appended, else {0, the current head}.
_APPEND_SCRIPT = """
local head = redis.call('GET', KEYS[2]) or ''
if head ~= ARGV[1] then return {0, head} end
redis.call('XADD', KEYS[1], '*', 'record', ARGV[3])
redis.call('SET', KEYS[2], ARGV[2])
return {1, ''}
"""


def _text(value: object) -> str:
    """A Redis reply (bytes: the clients are built without decode_responses) as text."""
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def _head(raw: str) -> Head:
    if not raw:
        return Head(0, None)
    seq, _, digest = raw.partition(" ")
    return Head(int(seq), digest)


class RedisAuditSink:
    """A `Sink` (observe/audit_trail.py) over a Redis stream; synchronous (the CLI calls
    it directly, the gateway from its audit writer thread)."""

    def __init__(self, url: str, *, namespace: str = DEFAULT_NAMESPACE,
                 client: SyncClient | None = None) -> None:
        self._client = client if client is not None else connect(url)
        namespace = cluster_namespace(url, namespace)
        self._stream = f"{namespace}:audit"
        self._head_key = f"{namespace}:audit:head"
        self._script = self._client.register_script(_APPEND_SCRIPT)
        self.where = f"the Redis stream {self._stream} at {redact_url(url)}"

    def append(self, build: Build) -> None:
        raw = self._client.get(self._head_key)
        expected = raw.decode() if isinstance(raw, bytes) else ""
        for _ in range(ATTEMPTS):
            head = _head(expected)
            line, digest = build(head)
            done, current = self._script(keys=[self._stream, self._head_key],
                                         args=[expected, f"{head.seq + 1} {digest}", line])
            if int(done) == 1:
                return
            expected = current.decode() if isinstance(current, bytes) else str(current)
        raise AuditTrailError(f"{self.where}: other writers kept moving the head; "
                              f"gave up after {ATTEMPTS} attempts")

    def entries(self) -> Iterator[Entry]:
        start = "-"
        while True:
            page = self._client.xrange(self._stream, min=start, max="+", count=PAGE) or []
            name = ""
            for entry_id, values in page:
                name = _text(entry_id)
                yield Entry(f"entry {name}", _text((values or {}).get(b"record", b"")))
            if len(page) < PAGE:
                return
            start = "(" + name

    def anchor(self) -> Head | None:
        raw = self._client.get(self._head_key)
        return _head(raw.decode()) if isinstance(raw, bytes) else Head(0, None)

    def close(self) -> None:
        self._client.close()
