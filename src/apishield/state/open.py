"""The key store, the user store, the ban store, the usage store and the counters the
config asks for:
`state: <path>` is the embedded SQLite file (relative to the config file), `state: redis://...` or
`rediss://...` a Redis server shared by every gateway instance and the CLI (or `redis+sentinel://`,
`redis+cluster://` and their `rediss+` forms: see `redis_urls`).

`background=True` (the default, for the gateway) gives the Redis stores a thread that
follows changes, so nothing on the event loop waits on the network; the CLI passes
`background=False`: a short process talks to Redis directly and sees errors at once.
SQLite needs no thread either way (its reads and change probes are local and fast).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from apishield.config import Config, ConfigError, worker_role
from apishield.config.redis_urls import StateUrlError, is_redis_url, redact_url, with_password
from apishield.config.secrets import read_secret
from apishield.state.bans import BanStore
from apishield.state.counters import Counters, MemoryCounters
from apishield.state.keys import KeyStore
from apishield.state.usage import UsageStore
from apishield.state.users import UserStore

if TYPE_CHECKING:
    from apishield.observe.audit_trail import AuditTrail, Sink
    from apishield.state.redis_store import SyncClient

def is_redis(config: Config) -> bool:
    return is_redis_url(config.state)


def state_exists(config: Config) -> bool:
    """Whether there may be anything to read: always for Redis; for SQLite, whether the
    file exists (reading commands must not create a stray database because `--config`
    pointed at the wrong file)."""
    return is_redis(config) or config.resolve(config.state).exists()


def describe_state(config: Config) -> str:
    """Where the state lives, fit for a message (a Redis password is masked)."""
    if is_redis(config):
        return redact_url(config.state)
    return str(config.resolve(config.state))


def state_url(config: Config) -> str:
    """The Redis URL to connect with: `state`, with the password of `state_password` when
    one is configured (read now, from its variable or file: never logged)."""
    if config.state_password is None:
        return config.state
    try:
        password = read_secret(config.state_password, config.source_dir,
                               what="state_password")
    except ValueError as exc:
        raise ConfigError([str(exc)]) from None
    return with_password(config.state, password.decode("utf-8"))


def _redis_client(config: Config) -> SyncClient:  # imported lazily: SQLite needs none
    from apishield.state.redis_store import connect

    try:
        return connect(state_url(config))
    except StateUrlError as exc:  # its message names the URL, redacted
        raise ConfigError([f"state: {exc}"]) from None
    except ValueError as exc:
        raise ConfigError([f"state: {redact_url(config.state)} is not a usable Redis URL "
                           f"({redact_url(str(exc))})"]) from None


def open_key_store(config: Config, *, background: bool = True) -> KeyStore:
    """The API-key store. With Redis the pepper must be configured explicitly: a pepper
    file generated beside one instance would differ from every other instance's, and
    keys would verify on one gateway only."""
    if not is_redis(config):
        from apishield.state.sqlite import SqliteKeyStore

        return SqliteKeyStore(config.resolve(config.state))
    if config.auth.api_keys.pepper is None:
        raise ConfigError([
            f"auth.api_keys.pepper: required with state: {redact_url(config.state)}; every "
            "gateway instance and the CLI must hash API keys with the same pepper, so give "
            "it as {env: NAME} or {file: path} (e.g. the output of python -c 'import "
            "secrets; print(secrets.token_urlsafe(32))')"])
    from apishield.state.redis_store import RedisKeyStore

    return RedisKeyStore(state_url(config), background=background,
                         client=_redis_client(config))


def open_user_store(config: Config, *, background: bool = True) -> UserStore:
    """The store of HTTP Basic users (the `users` table of the SQLite file, or Redis).
    Argon2id salts every hash, so unlike API keys no pepper is needed."""
    if not is_redis(config):
        from apishield.state.sqlite_users import SqliteUserStore

        return SqliteUserStore(config.resolve(config.state))
    from apishield.state.redis_store import RedisUserStore

    return RedisUserStore(state_url(config), background=background,
                          client=_redis_client(config))


def open_ban_store(config: Config, *, background: bool = True) -> BanStore:
    """The ban store (the `bans` tables of the SQLite file, or Redis)."""
    if not is_redis(config):
        from apishield.state.sqlite_bans import SqliteBanStore

        return SqliteBanStore(config.resolve(config.state))
    from apishield.state.redis_store import RedisBanStore

    return RedisBanStore(state_url(config), background=background,
                         client=_redis_client(config))


def open_counters(config: Config) -> Counters:
    """Rate-limit counters: in this process, leased from Redis (`redis_counters`), or, in
    a worker of `serve --workers N` with the embedded state, leased from the supervisor
    (`local_leases`: every worker shares the same limits, exactly like gateways on Redis)."""
    if is_redis(config):
        from apishield.state.redis_counters import RedisCounters

        return RedisCounters(state_url(config),
                             lease_fraction=config.rate_limiting.lease_fraction)
    role = worker_role.current()
    if role is not None:
        from apishield.state.local_leases import LocalLeaseCounters

        return LocalLeaseCounters(role.lease_socket,
                                  lease_fraction=config.rate_limiting.lease_fraction)
    return MemoryCounters()


def open_usage_store(config: Config) -> UsageStore:
    """Where usage counts are kept (F4): the `usage_daily` table of the SQLite file, or
    per-day hashes in Redis. Both are synchronous; the gateway calls them from a thread."""
    if not is_redis(config):
        from apishield.state.sqlite_usage import SqliteUsageStore

        return SqliteUsageStore(config.resolve(config.state))
    from apishield.state.redis_usage import RedisUsageStore

    return RedisUsageStore(state_url(config), client=_redis_client(config))


def audit_key(config: Config) -> bytes | None:
    """The audit trail's HMAC key (`audit_log.key`), read now; None when none is set."""
    if config.audit_log.key is None:
        return None
    try:
        return read_secret(config.audit_log.key, config.source_dir, what="audit_log.key")
    except ValueError as exc:
        raise ConfigError([str(exc)]) from None


def open_audit_sink(config: Config) -> Sink:
    """Where the trail lives: `audit_log.path` when given (a file), else the Redis stream
    beside the other shared state, else a file beside the SQLite state file."""
    from apishield.observe.audit_trail import FileSink, default_path

    if config.audit_log.path is not None:
        return FileSink(config.resolve(config.audit_log.path))
    if is_redis(config):
        from apishield.state.audit_stream import RedisAuditSink

        return RedisAuditSink(state_url(config), client=_redis_client(config))
    return FileSink(default_path(config.resolve(config.state)))


def open_audit_trail(config: Config) -> AuditTrail | None:
    """The audit trail the config asks for (docs/audit-trail.md); None when
    `audit_log.enabled` is false. A key that cannot be read is a ConfigError."""
    if not config.audit_log.enabled:
        return None
    from apishield.observe.audit_trail import AuditTrail

    key = audit_key(config)
    return AuditTrail(open_audit_sink(config), key)
