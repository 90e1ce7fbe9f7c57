"""`apishield keys create | list | revoke | rotate`: the API-key lifecycle (A4, G2).

The CLI writes to the same state file a running gateway reads (`state` in the config,
SQLite in WAL mode), so it works while the gateway serves; the gateway notices a write
within about a second and drops its cache, so a revocation is not held back by
`auth.api_keys.cache_ttl`.

Scriptable: `create` and `rotate` print the new key, and only the key, as the single line
of standard output (`KEY=$(apishield keys create --name ci)`); everything else goes to
standard error. The key is shown once and cannot be recovered: only its HMAC is stored.

Exit codes: 0 done, 1 the request cannot be carried out (unknown id, bad duration,
rotating a revoked key...), 2 the configuration is invalid (as for `serve` and `check`).
Every create, rotate and revoke is logged as one JSON line on the `apishield.audit` logger
(ids, names, scopes, expiry, the OS user; never a key or a hash) and recorded in the audit
trail (docs/audit-trail.md); a change the trail cannot record exits 1 (cli/audit_log.py).
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from datetime import UTC, datetime
from typing import Any, TypedDict, overload

from apishield.auth.apikeys import (
    ID_LENGTH,
    check_labels,
    check_name,
    issue_key,
    load_pepper,
    parse_key,
)
from apishield.auth.principal import AuthFailure
from apishield.cli.audit_log import check_trail, record_change
from apishield.cli.config_option import config_parent
from apishield.config import Config, ConfigError, _parse_duration, load_config
from apishield.observe.audit_trail import AuditTrailError
from apishield.observe.logjson import configure_process, fields
from apishield.state.keys import KeyRecord, KeyState, KeyStore, KeyStoreError
from apishield.state.open import describe_state, open_key_store, state_exists

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
DEFAULT_GRACE = "7d"

audit = logging.getLogger("apishield.audit")

_KEY_ID = re.compile(rf"[a-z2-7]{{{ID_LENGTH}}}")


class CliError(Exception):
    """A request the CLI refuses: the message is printed, the exit code is 1."""


# -- helpers ------------------------------------------------------------------------------

@overload
def _iso(moment: float) -> str: ...


@overload
def _iso(moment: float | None) -> str | None: ...


def _iso(moment: float | None) -> str | None:
    if moment is None:
        return None
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _duration(text: str, option: str, *, allow_zero: bool = False) -> float:
    """`90d`, `12h`, `30m`, `45s`, `500ms` or plain seconds, via the config's parser so the
    CLI and `apishield.yaml` accept the same spellings."""
    try:
        value = float(_parse_duration(text))
    except (ValueError, TypeError):
        raise CliError(f"{option}: {text!r} is not a duration; write e.g. 90d, 12h, 30m or "
                       "45s") from None
    if value < 0 or (value == 0 and not allow_zero):
        raise CliError(f"{option}: {text!r} must be longer than zero")
    return value


def _key_id(text: str) -> str:
    """An id as `keys list` shows it; a whole key is accepted too (revoking a key found
    leaked in a log or a repository should not need a lookup first)."""
    if _KEY_ID.fullmatch(text):
        return text
    try:
        return parse_key(text)
    except AuthFailure:
        raise CliError(f"{text!r} is not an API key id (12 characters a-z, 2-7, as shown "
                       "by `apishield keys list`)") from None


def _actor() -> str | None:
    try:
        return getpass.getuser()
    except Exception:  # no user name in this environment (e.g. a bare container uid)
        return None


def _audit(config: Config, event: str, record: KeyRecord, **extra: Any) -> None:
    """One `kind: "audit"` line (docs/logging.md); JSON escaping keeps a hostile name
    from forging log lines."""
    entry: dict[str, Any] = {
        "event": event, "key_id": record.id, "name": record.name,
        "scopes": list(record.scopes), "roles": list(record.roles),
        "expires_at": _iso(record.expires_at), "actor": _actor(),
    }
    entry.update(extra)
    audit.info("%s", event, extra=fields("audit", **entry))
    record_change(config, event, **{name: value for name, value in entry.items()
                                    if name not in ("event", "actor")})


def _setup_logging() -> None:
    """The audit line reaches stderr as JSON, as every apishield line (docs/logging.md)."""
    configure_process(logging.INFO)


def _say(message: str) -> None:
    print(message, file=sys.stderr)


@contextmanager
def _existing_store(config: Config) -> Iterator[KeyStore | None]:
    """The store if the state file exists (or is Redis); None otherwise (reading commands
    must not create a stray database because `--config` pointed at the wrong file)."""
    if not state_exists(config):
        yield None
        return
    with closing(open_key_store(config, background=False)) as store:
        yield store


def cli_command(name: str, store_error: type[Exception], store: str) -> Callable[
        [Callable[[argparse.Namespace, Config], int]], Callable[[argparse.Namespace], int]]:
    """For `apishield <name> ...`: load the config, run the handler, and turn refusals into
    messages and exit codes (shared by `keys` and `bans`)."""

    def wrap(handler: Callable[[argparse.Namespace, Config], int]) -> Callable[
            [argparse.Namespace], int]:
        def run(args: argparse.Namespace) -> int:
            _setup_logging()
            try:
                config = load_config(args.config)
            except ConfigError as exc:
                return _report(exc, args.config)
            try:
                return handler(args, config)
            except ConfigError as exc:
                return _report(exc, args.config)
            except (CliError, ValueError) as exc:
                _say(f"apishield {name}: {exc}")
                return EXIT_FAILED
            except store_error as exc:
                _say(f"apishield {name}: the {store} failed: {exc}")
                return EXIT_FAILED
            except AuditTrailError as exc:  # the trail is the point: not recorded = failed
                _say(f"apishield {name}: {exc}")
                return EXIT_FAILED

        return run

    return wrap


_command = cli_command("keys", KeyStoreError, "key store")


def _report(error: ConfigError, source: str) -> int:
    _say(f"apishield: {len(error.problems)} problem(s) in {source}:")
    for problem in error.problems:
        _say(f"  {problem}")
    return EXIT_CONFIG


# -- commands -----------------------------------------------------------------------------

def cmd_create(args: argparse.Namespace, config: Config) -> int:
    check_trail(config)
    if args.no_expiry:
        lifetime = None
    elif args.expires_in is not None:
        lifetime = _duration(args.expires_in, "--expires-in")
    else:
        lifetime = config.auth.api_keys.default_expires_in
    name = check_name(args.name)
    scopes = check_labels(args.scope, "scope")
    roles = check_labels(args.role, "role")
    with closing(open_key_store(config, background=False)) as store:
        pepper = load_pepper(config, store)
        now = time.time()
        key, record = issue_key(store, pepper, name=name, scopes=scopes, roles=roles,
                                now=now, expires_at=None if lifetime is None else now + lifetime)
    print(key, flush=True)
    del key
    expiry = _iso(record.expires_at) or "never (consider --expires-in)"
    _say(f"created API key {record.id} for {record.name!r}, expires {expiry}; the key above "
         "is shown only once")
    _audit(config, "api-key-created", record)
    return EXIT_OK


class _KeyRow(TypedDict):
    """One key as `keys list --json` prints it (and the table shows part of it)."""

    id: str
    name: str
    state: KeyState
    scopes: list[str]
    roles: list[str]
    created_at: str
    expires_at: str | None
    revoked_at: str | None
    rotated_to: str | None


def cmd_list(args: argparse.Namespace, config: Config) -> int:
    with _existing_store(config) as store:
        records = store.list() if store is not None else []
    now = time.time()
    rows: list[_KeyRow] = [
        {
            "id": record.id, "name": record.name, "state": record.state(now),
            "scopes": list(record.scopes), "roles": list(record.roles),
            "created_at": _iso(record.created_at), "expires_at": _iso(record.expires_at),
            "revoked_at": _iso(record.revoked_at), "rotated_to": record.rotated_to,
        }
        for record in records
    ]
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return EXIT_OK
    if not rows:
        _say(f"no API keys in {describe_state(config)}")
        return EXIT_OK
    header = ("ID", "NAME", "STATE", "CREATED", "EXPIRES", "SCOPES", "ROLES")
    table = [header] + [
        (row["id"], row["name"], row["state"], row["created_at"], row["expires_at"] or "never",
         ",".join(row["scopes"]) or "-", ",".join(row["roles"]) or "-")
        for row in rows
    ]
    print_table(table)
    return EXIT_OK


def print_table(table: Sequence[tuple[str, ...]]) -> None:
    """Rows as aligned columns (the first row is the header); the last column is not
    padded, so no line ends in spaces. Shared by `keys list`, `bans list`, `users list`."""
    widths = [max(len(line[column]) for line in table) for column in range(len(table[0]) - 1)]
    for line in table:
        cells = [cell.ljust(width) for cell, width in zip(line, widths, strict=False)]
        print("  ".join([*cells, line[-1]]))


def _get(store: KeyStore | None, key_id: str) -> KeyRecord:
    record = store.get(key_id) if store is not None else None
    if record is None:
        raise CliError(f"no API key with id {key_id}")
    return record


def cmd_revoke(args: argparse.Namespace, config: Config) -> int:
    check_trail(config)
    key_id = _key_id(args.id)
    with _existing_store(config) as store:
        record = _get(store, key_id)
        if record.revoked_at is not None:
            _say(f"API key {key_id} ({record.name!r}) was already revoked at "
                 f"{_iso(record.revoked_at)}")
            return EXIT_OK
        assert store is not None
        now = time.time()
        if not store.revoke(key_id, now):  # revoked by someone else in between
            _say(f"API key {key_id} ({record.name!r}) was already revoked")
            return EXIT_OK
    _say(f"revoked API key {key_id} ({record.name!r}); a running gateway refuses it within "
         "about a second")
    _audit(config, "api-key-revoked", record, revoked_at=_iso(now))
    return EXIT_OK


def cmd_rotate(args: argparse.Namespace, config: Config) -> int:
    check_trail(config)
    key_id = _key_id(args.id)
    grace = _duration(args.grace, "--grace", allow_zero=True)
    with _existing_store(config) as store:
        old = _get(store, key_id)
        assert store is not None
        now = time.time()
        if old.revoked_at is not None:
            raise CliError(f"API key {key_id} was revoked at {_iso(old.revoked_at)}; a revoked "
                           "key is not rotated (create a new one with `keys create`)")
        if old.expires_at is not None and now >= old.expires_at:
            raise CliError(f"API key {key_id} expired at {_iso(old.expires_at)}; create a new "
                           "one with `keys create`")
        if old.rotated_to is not None:
            raise CliError(f"API key {key_id} was already rotated to {old.rotated_to} (it "
                           f"stops working at {_iso(old.expires_at)}); rotate "
                           f"{old.rotated_to} instead")
        pepper = load_pepper(config, store)
        lifetime = None if old.expires_at is None else old.expires_at - old.created_at
        key, new = issue_key(store, pepper, name=old.name, scopes=old.scopes, roles=old.roles,
                             now=now, expires_at=None if lifetime is None else now + lifetime)
        old_expiry = now + grace if old.expires_at is None else min(old.expires_at, now + grace)
        if not store.set_expiry(old.id, old_expiry, new.id):
            # revoked or rotated by another process meanwhile: withdraw the unseen new key
            store.revoke(new.id, time.time())
            raise CliError(f"API key {key_id} was revoked or rotated by someone else just now; "
                           "nothing was changed")
    print(key, flush=True)
    del key
    _say(f"rotated API key {old.id} ({old.name!r}) to {new.id}: the old key works until "
         f"{_iso(old_expiry)}, the new one expires {_iso(new.expires_at) or 'never'}; the key "
         "above is shown only once")
    _audit(config, "api-key-created", new, rotated_from=old.id)
    _audit(config, "api-key-rotated", old, rotated_to=new.id, old_key_valid_until=_iso(old_expiry))
    return EXIT_OK


# -- parser -------------------------------------------------------------------------------

def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `keys` and its subcommands to the `apishield` parser (see cli.build_parser)."""
    # `--config` is accepted before or after the subcommand (cli/config_option.py).
    config_option = config_parent(inherited=True)

    keys_cmd = commands.add_parser(
        "keys", parents=[config_parent()], help="create, list, rotate and revoke API keys",
        description="Manage the API keys stored in the config's `state` file. New keys are "
        "printed once, alone on standard output.")
    sub = keys_cmd.add_subparsers(dest="keys_command", required=True)

    create = sub.add_parser("create", parents=[config_option], help="issue a new key",
                            description="Issue a key and print it once on standard output.")
    create.add_argument("--name", required=True, help="the owner: the principal's subject")
    create.add_argument("--scope", action="append", default=[], metavar="SCOPE",
                        help="a scope the key grants (repeat for several)")
    create.add_argument("--role", action="append", default=[], metavar="ROLE",
                        help="a role the key holds (repeat for several)")
    expiry = create.add_mutually_exclusive_group()
    expiry.add_argument("--expires-in", metavar="DURATION",
                        help="lifetime such as 90d, 12h or 30m (default "
                        "auth.api_keys.default_expires_in)")
    expiry.add_argument("--no-expiry", action="store_true", help="a key that never expires")
    create.set_defaults(func=_command(cmd_create))

    listing = sub.add_parser("list", parents=[config_option], help="list keys (never secrets)")
    listing.add_argument("--json", action="store_true", help="a JSON array instead of a table")
    listing.set_defaults(func=_command(cmd_list))

    revoke = sub.add_parser("revoke", parents=[config_option], help="revoke a key now")
    revoke.add_argument("id", help="the key id (as `keys list` shows it) or the key itself")
    revoke.set_defaults(func=_command(cmd_revoke))

    rotate = sub.add_parser(
        "rotate", parents=[config_option], help="replace a key, keeping the old one for a grace",
        description="Issue a new key with the same name, scopes, roles and lifetime, and end "
        "the old one after the grace period (both work meanwhile).")
    rotate.add_argument("id", help="the key id (as `keys list` shows it) or the key itself")
    rotate.add_argument("--grace", default=DEFAULT_GRACE, metavar="DURATION",
                        help=f"how long the old key keeps working (default {DEFAULT_GRACE}; "
                        "0 ends it now)")
    rotate.set_defaults(func=_command(cmd_rotate))
