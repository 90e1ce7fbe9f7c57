"""`apishield users create | list | rotate | revoke`: the users of HTTP Basic schemes.

Managed like API keys (`cli/keys.py`): the CLI writes to the state store a running
gateway reads (the SQLite file or Redis), and the gateway drops its cached verifications
within about a second of any write, so a revocation or a new password is not held back by
`auth.basic.cache_ttl`.

Passwords are stored only as Argon2id hashes (PHC strings, with the cost of
`auth.basic.argon2` at the time of hashing). Scriptable: `create` and `rotate` print a
generated password, and only it, as the single line of standard output; with
`--password-stdin` they read the password from the first line of standard input instead
and print nothing (it is never an argument: arguments end up in shell history and `ps`).

Exit codes as for `keys`: 0 done, 1 refused (unknown user, weak password, ...), 2 the
configuration is invalid. Every create, rotate and revoke is one JSON line on the
`apishield.audit` logger (the user, scopes, roles, expiry, the OS user; never a password or
a hash) and a record in the audit trail (docs/audit-trail.md; not recorded = exit 1).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from contextlib import closing
from typing import Any, TypedDict

from apishield.auth.apikeys import check_labels
from apishield.auth.basic import check_password, check_user_name, generate_password, hash_password
from apishield.cli.audit_log import check_trail, record_change
from apishield.cli.config_option import config_parent
from apishield.cli.keys import (
    EXIT_OK,
    CliError,
    _actor,
    _duration,
    _iso,
    _say,
    cli_command,
    print_table,
)
from apishield.config import Config
from apishield.observe.logjson import fields
from apishield.state.open import describe_state, open_user_store, state_exists
from apishield.state.users import (
    DuplicateUser,
    UserRecord,
    UserState,
    UserStore,
    UserStoreError,
)

audit = logging.getLogger("apishield.audit")

_command = cli_command("users", UserStoreError, "user store")


def _audit(config: Config, event: str, record: UserRecord, **extra: Any) -> None:
    """One `kind: "audit"` line (docs/logging.md); JSON escaping keeps a hostile name
    from forging log lines."""
    entry: dict[str, Any] = {
        "event": event, "user": record.name, "scopes": list(record.scopes),
        "roles": list(record.roles), "expires_at": _iso(record.expires_at),
        "actor": _actor(),
    }
    entry.update(extra)
    audit.info("%s", event, extra=fields("audit", **entry))
    record_change(config, event, **{name: value for name, value in entry.items()
                                    if name not in ("event", "actor")})


def _password(args: argparse.Namespace) -> tuple[str, bool]:
    """(password, generated): the first line of standard input with --password-stdin,
    else a new random one (192 bits)."""
    if not args.password_stdin:
        return generate_password(), True
    line = sys.stdin.readline()
    password = line.removesuffix("\n").removesuffix("\r")
    try:
        return check_password(password), False
    except ValueError as exc:
        raise CliError(f"--password-stdin: {exc}") from None


def _lifetime(args: argparse.Namespace, config: Config) -> float | None:
    if args.no_expiry:
        return None
    if args.expires_in is not None:
        return _duration(args.expires_in, "--expires-in")
    return config.auth.basic.default_expires_in


def _name(text: str) -> str:
    try:
        return check_user_name(text)
    except ValueError as exc:
        raise CliError(str(exc)) from None


def _show(password: str, generated: bool) -> None:
    if generated:
        print(password, flush=True)


# -- commands -----------------------------------------------------------------------------

def cmd_create(args: argparse.Namespace, config: Config) -> int:
    check_trail(config)
    name = _name(args.name)
    scopes = check_labels(args.scope, "scope")
    roles = check_labels(args.role, "role")
    lifetime = _lifetime(args, config)
    password, generated = _password(args)
    hashed = hash_password(password, config.auth.basic.argon2)
    now = time.time()
    record = UserRecord(name=name, hash=hashed, scopes=scopes, roles=roles, created_at=now,
                        expires_at=None if lifetime is None else now + lifetime,
                        changed_at=now)
    with closing(open_user_store(config, background=False)) as store:
        try:
            store.create(record)
        except DuplicateUser:
            raise CliError(f"a user named {name!r} exists; use `users rotate {name}` for a "
                           "new password, or `users revoke` it first") from None
    _show(password, generated)
    del password
    expiry = _iso(record.expires_at) or "never"
    shown = "; the password above is shown only once" if generated else ""
    _say(f"created Basic user {name!r}, password expires {expiry}{shown}")
    _audit(config, "basic-user-created", record)
    return EXIT_OK


class _UserRow(TypedDict):
    """One user as `users list --json` prints it."""

    name: str
    state: UserState
    scopes: list[str]
    roles: list[str]
    created_at: str
    changed_at: str
    expires_at: str | None
    revoked_at: str | None


def cmd_list(args: argparse.Namespace, config: Config) -> int:
    records: list[UserRecord] = []
    if state_exists(config):
        with closing(open_user_store(config, background=False)) as store:
            records = store.list()
    now = time.time()
    rows: list[_UserRow] = [
        {"name": r.name, "state": r.state(now), "scopes": list(r.scopes),
         "roles": list(r.roles), "created_at": _iso(r.created_at),
         "changed_at": _iso(r.changed_at), "expires_at": _iso(r.expires_at),
         "revoked_at": _iso(r.revoked_at)}
        for r in records
    ]
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return EXIT_OK
    if not rows:
        _say(f"no Basic users in {describe_state(config)}")
        return EXIT_OK
    header = ("NAME", "STATE", "CREATED", "PASSWORD SET", "EXPIRES", "SCOPES", "ROLES")
    table = [header] + [
        (row["name"], row["state"], row["created_at"], row["changed_at"],
         row["expires_at"] or "never", ",".join(row["scopes"]) or "-",
         ",".join(row["roles"]) or "-")
        for row in rows
    ]
    print_table(table)
    return EXIT_OK


def _existing(config: Config, name: str) -> tuple[UserStore, UserRecord]:
    if not state_exists(config):
        raise CliError(f"no Basic user named {name!r} (no state at {describe_state(config)})")
    store = open_user_store(config, background=False)
    record = store.get(name)
    if record is None:
        store.close()
        raise CliError(f"no Basic user named {name!r}")
    return store, record


def cmd_rotate(args: argparse.Namespace, config: Config) -> int:
    check_trail(config)
    name = _name(args.name)
    store, old = _existing(config, name)
    with closing(store):
        if old.revoked_at is not None:
            raise CliError(f"user {name!r} was revoked at {_iso(old.revoked_at)}; create it "
                           "again with `users create`")
        password, generated = _password(args)
        hashed = hash_password(password, config.auth.basic.argon2)
        now = time.time()
        # the password keeps the lifetime it was given (90 days stays 90 days)
        lifetime = None if old.expires_at is None else old.expires_at - old.changed_at
        expires_at = None if lifetime is None else now + lifetime
        if not store.set_password(name, hashed, now, expires_at):
            raise CliError(f"user {name!r} was revoked by someone else just now; nothing "
                           "was changed")
    _show(password, generated)
    del password
    shown = "; the password above is shown only once" if generated else ""
    _say(f"new password for Basic user {name!r}: the old one stops working at once (a "
         f"running gateway within about a second), expires {_iso(expires_at) or 'never'}"
         f"{shown}")
    _audit(config, "basic-user-rotated", old, expires_at=_iso(expires_at))
    return EXIT_OK


def cmd_revoke(args: argparse.Namespace, config: Config) -> int:
    check_trail(config)
    name = _name(args.name)
    store, record = _existing(config, name)
    with closing(store):
        if record.revoked_at is not None:
            _say(f"user {name!r} was already revoked at {_iso(record.revoked_at)}")
            return EXIT_OK
        now = time.time()
        if not store.revoke(name, now):
            _say(f"user {name!r} was already revoked")
            return EXIT_OK
    _say(f"revoked Basic user {name!r}; a running gateway refuses it within about a second")
    _audit(config, "basic-user-revoked", record, revoked_at=_iso(now))
    return EXIT_OK


# -- parser -------------------------------------------------------------------------------

def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `users` and its subcommands to the `apishield` parser (see cli.build_parser)."""
    config_option = config_parent(inherited=True)

    users_cmd = commands.add_parser(
        "users", parents=[config_parent()],
        help="create, list, rotate and revoke HTTP Basic users",
        description="Manage the users HTTP Basic schemes are verified against, in the "
        "config's `state` store. Generated passwords are printed once, alone on standard "
        "output.")
    sub = users_cmd.add_subparsers(dest="users_command", required=True)

    def password_option(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--password-stdin", action="store_true",
            help="read the password from the first line of standard input (at least 12 "
            "characters) instead of generating one")

    create = sub.add_parser("create", parents=[config_option], help="add a user",
                            description="Add a user and print its generated password once.")
    create.add_argument("name", help="the user name clients send (the principal's subject)")
    create.add_argument("--scope", action="append", default=[], metavar="SCOPE",
                        help="a scope the user holds (repeat for several)")
    create.add_argument("--role", action="append", default=[], metavar="ROLE",
                        help="a role the user holds (repeat for several)")
    expiry = create.add_mutually_exclusive_group()
    expiry.add_argument("--expires-in", metavar="DURATION",
                        help="password lifetime such as 90d or 12h (default "
                        "auth.basic.default_expires_in: never)")
    expiry.add_argument("--no-expiry", action="store_true", help="a password that never expires")
    password_option(create)
    create.set_defaults(func=_command(cmd_create))

    listing = sub.add_parser("list", parents=[config_option],
                             help="list users (never passwords or hashes)")
    listing.add_argument("--json", action="store_true", help="a JSON array instead of a table")
    listing.set_defaults(func=_command(cmd_list))

    rotate = sub.add_parser(
        "rotate", parents=[config_option], help="give a user a new password",
        description="Replace the user's password (the old one stops working at once); the "
        "new password keeps the lifetime the old one was given.")
    rotate.add_argument("name", help="the user name")
    password_option(rotate)
    rotate.set_defaults(func=_command(cmd_rotate))

    revoke = sub.add_parser("revoke", parents=[config_option], help="revoke a user now")
    revoke.add_argument("name", help="the user name")
    revoke.set_defaults(func=_command(cmd_revoke))
