"""`state:` URLs that name Redis, parsed in one place for the counters, the key store,
the ban store and the config check.

- `redis://[[user]:password@]host[:port][/db]`, `rediss://...` (TLS): one server; the URL
  goes to redis-py's `from_url` as is (its query options included).
- `redis+sentinel://[[user]:password@]host1[:26379],host2[:26379]/<service>[/<db>]`,
  `rediss+sentinel://...`: the master of `<service>`, found through the sentinels and
  followed across a failover (`redis.sentinel.Sentinel.master_for`). The password is the
  master's (the sentinels are asked without one); with `rediss+sentinel` both the
  sentinels and the master are reached over TLS.
- `redis+cluster://[[user]:password@]host1[:6379],host2[:6379][/]`, `rediss+cluster://...`:
  a Redis Cluster, entered through these startup nodes (`redis.cluster.RedisCluster`;
  the rest of the cluster is discovered). No database number (a cluster has db 0 only).
  The stores then put their keys under a `{namespace}` hash tag (`cluster_namespace`) so
  that every multi-key script and transaction stays within one hash slot.

The sentinel and cluster forms take the TLS options `ssl_ca_certs`, `ssl_certfile`,
`ssl_keyfile` and `ssl_cert_reqs` as query parameters, and nothing else.

Passwords never appear in messages: `redact_url` masks them, and `StateUrlError`
messages are built from the redacted URL.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import parse_qsl, quote, unquote

if TYPE_CHECKING:
    import redis
    import redis.asyncio

SINGLE_SCHEMES = ("redis", "rediss")
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
SCHEMES = SINGLE_SCHEMES + SENTINEL_SCHEMES + CLUSTER_SCHEMES
PREFIXES = tuple(f"{scheme}://" for scheme in SCHEMES)
SENTINEL_PORT = 26379
REDIS_PORT = 6379
TLS_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs")


class StateUrlError(ValueError):
    """A Redis `state` URL that cannot be used; the message holds no password."""


@dataclass(frozen=True)
class StateUrl:
    url: str = field(repr=False)  # as written (never print it: use `redacted`)
    mode: Literal["single", "sentinel", "cluster"]
    tls: bool
    hosts: tuple[tuple[str, int], ...] = ()  # sentinel / cluster: the nodes to ask
    service: str = ""  # sentinel: the monitored master's name
    db: int = 0
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    options: tuple[tuple[str, str], ...] = ()  # TLS query options

    @property
    def redacted(self) -> str:
        return redact_url(self.url)

    @property
    def cluster(self) -> bool:
        return self.mode == "cluster"


def is_redis_url(state: str) -> bool:
    return state.startswith(PREFIXES)


def is_cluster_url(state: str) -> bool:
    return state.startswith(tuple(f"{scheme}://" for scheme in CLUSTER_SCHEMES))


def redact_url(url: str) -> str:
    """The URL without its password, for messages and logs. Works on the raw text (a URL
    too broken to parse must not leak either); user info without a `:` is masked whole,
    since `redis://secret@host` is a password written the wrong way, not a user name."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    netloc, slash, tail = rest.partition("/")
    userinfo, at, hostport = netloc.rpartition("@")
    if not at:
        return url
    user, colon, _ = userinfo.partition(":")
    masked = f"{user}:***" if colon else "***"
    return f"{scheme}://{masked}@{hostport}{slash}{tail}"


def _bad(where: str, detail: str) -> StateUrlError:
    return StateUrlError(f"{where} is not a usable Redis URL: {detail}")


def _host_port(item: str, default_port: int, where: str) -> tuple[str, int]:
    if item.startswith("["):  # [::1]:7000
        host, bracket, rest = item[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise _bad(where, f"{item!r} is not host:port")
        port_text = rest[1:]
    else:
        host, _, port_text = item.partition(":")
        if ":" in port_text:
            raise _bad(where, f"{item!r} is not host:port (write an IPv6 "
                                "address as [addr]:port)")
    if not host:
        raise _bad(where, f"{item!r} has no host")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise _bad(where, f"{item!r} has no valid port")
    return host, int(port_text)


def parse_state_url(url: str) -> StateUrl:
    """Parse a Redis `state` URL (StateUrlError, without the password, if it is bad)."""
    where = redact_url(url)
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in SCHEMES:
        raise _bad(where, f"the scheme must be one of "
                            f"{', '.join(f'{s}://' for s in SCHEMES)}")
    tls = scheme.startswith("rediss")
    if scheme in SINGLE_SCHEMES:
        from redis.connection import parse_url

        try:
            parse_url(url)
        except ValueError as exc:
            raise _bad(where, f"{redact_url(str(exc))}") from None
        return StateUrl(url=url, mode="single", tls=tls)
    mode: Literal["sentinel", "cluster"] = "sentinel" if scheme in SENTINEL_SCHEMES \
        else "cluster"
    rest, _, query = rest.partition("?")
    if "#" in query or "#" in rest:
        raise _bad(where, "a fragment (#...) is not allowed")
    netloc, _, path = rest.partition("/")
    userinfo, at, hostlist = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else unquote(user)
        if not colon:
            username = None
    if not hostlist:
        raise _bad(where, "no host; write host1:port,host2:port")
    default_port = SENTINEL_PORT if mode == "sentinel" else REDIS_PORT
    hosts = tuple(_host_port(item, default_port, where) for item in hostlist.split(","))
    parts = path.split("/") if path else []
    if parts and not parts[-1]:
        parts.pop()  # a trailing slash
    service, db = "", 0
    if mode == "sentinel":
        if not parts or not parts[0]:
            raise _bad(where, f"no service name; write "
                                f"{scheme}://host:26379,.../<service name>[/<db>]")
        if len(parts) > 2:
            raise _bad(where, "the path must be /<service name>[/<db>]")
        service = unquote(parts[0])
        if len(parts) == 2:
            if not parts[1].isdigit():
                raise _bad(where, f"the database must be a number, "
                                    f"not {parts[1]!r}")
            db = int(parts[1])
    elif parts not in ([], ["0"]):
        raise _bad(where, f"a cluster URL has no service or database in its "
                            f"path; write {scheme}://host1:port,host2:port/")
    options: list[tuple[str, str]] = []
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name not in TLS_OPTIONS:
            raise _bad(where, f"unknown option {name!r} (allowed: "
                                f"{', '.join(TLS_OPTIONS)})")
        if not tls:
            raise _bad(where, f"{name} needs TLS (rediss+{mode}://)")
        options.append((name, value))
    return StateUrl(url=url, mode=mode, tls=tls, hosts=hosts, service=service, db=db,
                    username=username, password=password, options=tuple(options))


def with_password(url: str, password: str) -> str:
    """`url` with `password` (from `state_password`) in its userinfo, a user name kept
    (`redis://app:@host` -> `redis://app:<password>@host`). A URL that already holds a
    password is refused: two sources for one secret is one too many."""
    scheme, sep, rest = url.partition("://")
    end = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    netloc, tail = rest[:end], rest[end:]
    userinfo, at, hosts = netloc.rpartition("@")
    user, colon, secret = userinfo.partition(":")
    if at and (secret or not colon):  # `x@host` is a password written as a user name
        raise StateUrlError(f"{redact_url(url)} holds a password and state_password gives "
                            "one too; keep only state_password (write user:@host for a "
                            "user name)")
    return f"{scheme}{sep}{user}:{quote(password, safe='')}@{hosts}{tail}"


def cluster_namespace(url: str, namespace: str) -> str:
    """The namespace as a hash tag (`{apishield}`) for a cluster URL, so that the keys a
    script or a transaction touches together share one slot; unchanged otherwise (the
    key names on a single server or behind Sentinel stay as they always were)."""
    if "{" in namespace or not parse_state_url(url).cluster:
        return namespace
    return f"{{{namespace}}}"


def _connection_kwargs(parsed: StateUrl, kwargs: dict[str, Any]) -> dict[str, Any]:
    merged = dict(kwargs)
    if parsed.username is not None:
        merged["username"] = parsed.username
    if parsed.password is not None:
        merged["password"] = parsed.password
    if parsed.tls:
        merged["ssl"] = True
        merged.update(parsed.options)
    return merged


def _sentinel_kwargs(parsed: StateUrl, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The sentinels' own connections: the timeouts and TLS, no password."""
    chosen = {name: value for name, value in kwargs.items() if name.startswith("socket_")}
    if parsed.tls:
        chosen["ssl"] = True
        chosen.update(parsed.options)
    return chosen


def sync_client(url: str, **kwargs: Any) -> redis.Redis | redis.RedisCluster:
    """A synchronous client for any Redis `state` URL; `kwargs` are connection options
    (timeouts, health checks). StateUrlError for a bad URL."""
    import redis as sync_redis
    from redis.cluster import ClusterNode, RedisCluster
    from redis.sentinel import Sentinel

    parsed = parse_state_url(url)
    if parsed.mode == "single":
        return sync_redis.Redis.from_url(url, **kwargs)
    connection = _connection_kwargs(parsed, kwargs)
    if parsed.mode == "sentinel":
        sentinel = Sentinel(list(parsed.hosts), sentinel_kwargs=_sentinel_kwargs(parsed, kwargs),
                            **connection)
        # master_for is unannotated in redis-py (Any): it returns a Redis client
        master: sync_redis.Redis = sentinel.master_for(parsed.service, db=parsed.db)
        return master
    connection.pop("single_connection_client", None)
    return RedisCluster(startup_nodes=[ClusterNode(host, port) for host, port in parsed.hosts],
                        **connection)


def async_client(url: str, **kwargs: Any) -> redis.asyncio.Redis | redis.asyncio.RedisCluster:
    """The asyncio counterpart of `sync_client`."""
    from redis.asyncio import Redis
    from redis.asyncio.cluster import ClusterNode, RedisCluster
    from redis.asyncio.sentinel import Sentinel

    parsed = parse_state_url(url)
    if parsed.mode == "single":
        return Redis.from_url(url, **kwargs)
    connection = _connection_kwargs(parsed, kwargs)
    if parsed.mode == "sentinel":
        connection.pop("single_connection_client", None)
        sentinel = Sentinel(list(parsed.hosts), sentinel_kwargs=_sentinel_kwargs(parsed, kwargs),
                            **connection)
        master: Redis = sentinel.master_for(parsed.service, db=parsed.db)  # as above
        return master
    connection.pop("single_connection_client", None)
    return RedisCluster(startup_nodes=[ClusterNode(host, port) for host, port in parsed.hosts],
                        **connection)
