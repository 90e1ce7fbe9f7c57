"""`apishield audit-log verify`: check the tamper-evident audit trail (F5,
docs/audit-trail.md); and `record_change`, how the CLI's commands write to it.

Not `apishield audit` (cli/audit.py), which reviews a contract.

The CLI's changes (keys, users, bans) are recorded synchronously: a command whose record
cannot be written exits 1 and says so, because an operator action missing from the trail
is exactly what the trail exists to rule out. The check comes first (`check_trail`: the
key readable, the trail not ending in a partial record), so a command that would not be
recorded usually changes nothing; a failure between the change and its record is
reported as such (the change stands, the message says it was not recorded).

Exit codes of `verify`: 0 the chain is intact (count and head printed on standard
output), 1 it is not (the first bad record named on standard error), 2 the trail or the
config could not be read.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from contextlib import closing
from pathlib import Path
from typing import Any

from apishield.cli.config_option import config_parent
from apishield.config import Config, ConfigError, load_config
from apishield.config.auth import Secret
from apishield.config.secrets import read_secret
from apishield.observe.audit_trail import AuditTrailError, FileSink, Sink
from apishield.observe.audit_verify import verify
from apishield.state.open import audit_key, open_audit_sink, open_audit_trail

EXIT_OK = 0
EXIT_BROKEN = 1
EXIT_UNREADABLE = 2


def actor() -> str | None:
    """Who runs the command: the OS user (`$USER`, else the password database)."""
    try:
        return getpass.getuser()
    except Exception:  # no user name in this environment (e.g. a bare container uid)
        return None


def check_trail(config: Config) -> None:
    """Before a change: fail now (AuditTrailError, ConfigError) if it could not be
    recorded afterwards: the key readable; for a file, its folder there and its last record
    whole."""
    if not config.audit_log.enabled:
        return
    audit_key(config)
    sink = open_audit_sink(config)
    try:
        if isinstance(sink, FileSink):
            sink.check()
    finally:
        sink.close()


def record_change(config: Config, action: str, **details: Any) -> None:
    """Append one record for a change the CLI made; AuditTrailError (exit 1) when it
    cannot be written."""
    trail = open_audit_trail(config)
    if trail is None:
        return
    with closing(trail):
        try:
            trail.append(action, actor(), **details)
        except AuditTrailError as exc:
            raise AuditTrailError(f"the change was made, but the audit trail could not "
                                  f"record it: {exc}") from None


# -- verify -------------------------------------------------------------------------------

def _say(message: str) -> None:
    print(message, file=sys.stderr)


def cmd_verify(args: argparse.Namespace) -> int:
    try:
        sink, key = _source(args)
    except ConfigError as exc:
        for problem in exc.problems:
            _say(f"apishield audit-log: {problem}")
        return EXIT_UNREADABLE
    except ValueError as exc:
        _say(f"apishield audit-log: {exc}")
        return EXIT_UNREADABLE
    with closing(sink):
        try:
            verdict = verify(sink.entries(), key, anchor=sink.anchor(),
                             expect_head=args.expect_head)
        except OSError as exc:
            _say(f"apishield audit-log: cannot read {sink.where}: {exc.strerror or exc}")
            return EXIT_UNREADABLE
        except Exception as exc:  # a Redis error: named, never a traceback
            _say(f"apishield audit-log: cannot read {sink.where}: {type(exc).__name__}: {exc}")
            return EXIT_UNREADABLE
    if verdict.problem is not None:
        _say(f"apishield audit-log: {sink.where}: BROKEN after {verdict.count} good "
             f"record(s): {verdict.problem}")
        return EXIT_BROKEN
    print(f"intact: {verdict.count} record(s) in {sink.where}; head seq {verdict.head.seq} "
          f"{verdict.head.hash or '-'}")
    return EXIT_OK


def _source(args: argparse.Namespace) -> tuple[Sink, bytes | None]:
    """The trail to check (FILE, else the config's) and the key (the options', else the
    config's). With FILE the config is only read for its key, and only if it exists: a
    copy of a trail can be checked anywhere."""
    keyed = args.key_env is not None or args.key_file is not None
    config = None
    if args.file is None or (not keyed and Path(args.config).is_file()):
        config = load_config(args.config)
    if keyed:
        secret = Secret(env=args.key_env, file=args.key_file)
        key: bytes | None = read_secret(secret, ".", what="the audit trail key")
    else:
        key = audit_key(config) if config is not None else None
    if args.file is not None:
        return FileSink(Path(args.file)), key
    assert config is not None
    return open_audit_sink(config), key


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `audit-log verify` to the `apishield` parser (see cli.build_parser)."""
    audit_log = commands.add_parser(
        "audit-log", help="check the tamper-evident audit trail",
        description="The audit trail of sensitive operations (docs/audit-trail.md).")
    sub = audit_log.add_subparsers(dest="audit_log_command", required=True)
    check = sub.add_parser(
        "verify", parents=[config_parent()],
        help="check the hash chain; exit 0 intact, 1 broken, 2 unreadable",
        description="Check every record's hash and its link to the one before; name the "
        "first record that was changed, removed, reordered or cut.")
    check.add_argument("file", nargs="?", metavar="FILE",
                       help="a trail file (default: the one --config names)")
    keys = check.add_mutually_exclusive_group()
    keys.add_argument("--key-env", metavar="NAME", help="the HMAC key is in this variable")
    keys.add_argument("--key-file", metavar="PATH", help="the HMAC key is in this file")
    check.add_argument("--expect-head", metavar="HASH",
                       help="a head hash printed by an earlier verify: it must still be in "
                       "the chain (shows records cut from the end)")
    check.set_defaults(func=cmd_verify)
