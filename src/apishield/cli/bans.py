"""`apishield bans list | add | remove`: see and change bans while gateways run (A9, D5).

The CLI writes to the store the gateways read (`state`: the SQLite file or Redis); a
running gateway picks the change up within about a second. `add` bans an address, a CIDR
network (`--ip 203.0.113.0/24`) or a subject (an account name, as `by: subject` rules and
the access log name it) for a duration; `remove` lifts a ban by exactly what `list`
shows. Manual bans count as offenses for the escalation of later automatic ones.

Exit codes (as `apishield keys`): 0 done, 1 the request cannot be carried out (bad
address or network, bad duration, no such ban, store failure), 2 the configuration is
invalid. Every add and remove is logged as one JSON line on the `apishield.audit` logger
and recorded in the audit trail (docs/audit-trail.md; not recorded = exit 1).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from typing import Any, TypedDict

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
from apishield.state.bans import BanKind, BanRecord, BanStore, BanStoreError
from apishield.state.open import describe_state, open_ban_store, state_exists

audit = logging.getLogger("apishield.audit")

MANUAL_RULE = "manual"
MAX_REASON = 200
# A temporary ban wider than this would lock out a large part of the internet; static
# blocks belong in rate_limiting.ip.deny, where they are reviewed with the config.
MIN_PREFIX = {4: 8, 6: 16}


# -- helpers ------------------------------------------------------------------------------

def parse_target(args: argparse.Namespace) -> tuple[BanKind, str]:
    """(kind, value) from --ip or --subject, validated and in the stored spelling."""
    if args.ip is not None:
        return "ip", _ip_value(args.ip)
    return "subject", _subject_value(args.subject)


def _ip_value(text: str) -> str:
    text = text.strip()
    try:
        network = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        if "host bits set" in str(exc):
            wider = ipaddress.ip_network(text, strict=False)
            raise CliError(f"--ip: {text} has host bits set; did you mean {wider}?") from None
        raise CliError(f"--ip: {text!r} is not an IP address or CIDR network (write e.g. "
                       "203.0.113.7, 2001:db8::1 or 203.0.113.0/24)") from None
    if network.prefixlen == network.max_prefixlen:
        address = network.network_address
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(address)
    if network.prefixlen < MIN_PREFIX[network.version]:
        raise CliError(f"--ip: {network} is wider than /{MIN_PREFIX[network.version]}; a "
                       "temporary ban that broad would shut out a large part of the "
                       "internet. Put static blocks in rate_limiting.ip.deny")
    return str(network)


def _subject_value(text: str) -> str:
    if not text.strip():
        raise CliError("--subject: must not be empty")
    if len(text) > 200 or any(ord(char) < 0x20 or ord(char) == 0x7F for char in text):
        raise CliError("--subject: at most 200 characters, no control characters")
    return text


def _reason(text: str | None) -> str:
    text = (text or "").strip()
    if len(text) > MAX_REASON or any(ord(char) < 0x20 or ord(char) == 0x7F for char in text):
        raise CliError(f"--reason: at most {MAX_REASON} characters, no control characters")
    return text


def _audit(config: Config, event: str, record: BanRecord, **extra: Any) -> None:
    """One `kind: "audit"` line (docs/logging.md); JSON escaping keeps a hostile
    reason from forging log lines."""
    entry: dict[str, Any] = {
        "event": event, "target": record.kind, "value": record.value, "rule": record.rule,
        "until": _iso(record.until), "reason": record.reason, "actor": _actor(),
    }
    entry.update(extra)
    audit.info("%s", event, extra=fields("audit", **entry))
    record_change(config, event, **{name: value for name, value in entry.items()
                                    if name not in ("event", "actor")})


class _BanRow(TypedDict):
    """One ban as `bans list --json` prints it (and the table shows part of it)."""

    kind: BanKind
    value: str
    rule: str
    reason: str
    offense: int
    created_at: str
    until: str
    remaining_seconds: int


def _row(record: BanRecord, now: float) -> _BanRow:
    return {
        "kind": record.kind, "value": record.value, "rule": record.rule,
        "reason": record.reason, "offense": record.offense,
        "created_at": _iso(record.created_at), "until": _iso(record.until),
        "remaining_seconds": max(0, round(record.until - now)),
    }


@contextmanager
def _store(config: Config, *, create: bool) -> Iterator[BanStore | None]:
    """The ban store; None for a SQLite file that does not exist when `create` is
    False (reading or removing creates nothing)."""
    if not create and not state_exists(config):
        yield None
        return
    with closing(open_ban_store(config, background=False)) as store:
        yield store


_command = cli_command("bans", BanStoreError, "ban store")


# -- commands -----------------------------------------------------------------------------

def cmd_list(args: argparse.Namespace, config: Config) -> int:
    now = time.time()
    with _store(config, create=False) as store:
        records = store.list(now) if store is not None else []
    rows = [_row(record, now) for record in records]
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return EXIT_OK
    if not rows:
        _say(f"no bans in force in {describe_state(config)}")
        return EXIT_OK
    header = ("KIND", "VALUE", "UNTIL", "RULE", "OFFENSE", "REASON")
    table = [header] + [
        (row["kind"], row["value"], row["until"], row["rule"], str(row["offense"]),
         row["reason"] or "-")
        for row in rows
    ]
    print_table(table)
    return EXIT_OK


def cmd_add(args: argparse.Namespace, config: Config) -> int:
    check_trail(config)
    kind, value = parse_target(args)
    seconds = _duration(args.duration, "--duration")
    reason = _reason(args.reason)
    now = time.time()
    with _store(config, create=True) as store:
        assert store is not None
        previous = store.banned(kind, value, now)
        replaced = previous if previous is not None and previous.value == value else None
        record = BanRecord(kind=kind, value=value, until=now + seconds, rule=MANUAL_RULE,
                           reason=reason, created_at=now,
                           offense=store.offenses(kind, value, now) + 1)
        store.ban(record)
    what = f"{kind} {value}"
    if replaced is not None:
        _say(f"replaced the ban on {what} (was until {_iso(replaced.until)}, rule "
             f"{replaced.rule}): now banned until {_iso(record.until)}")
    else:
        _say(f"banned {what} until {_iso(record.until)}")
    if previous is not None and replaced is None:
        _say(f"note: {value} is also inside the ban on {previous.value} (until "
             f"{_iso(previous.until)})")
    _say("a running gateway applies it within about a second")
    _audit(config, "ban-added", record, replaced=replaced is not None)
    return EXIT_OK


def cmd_remove(args: argparse.Namespace, config: Config) -> int:
    check_trail(config)
    kind, value = parse_target(args)
    now = time.time()
    with _store(config, create=False) as store:
        current = store.banned(kind, value, now) if store is not None else None
        if current is None:
            raise CliError(f"no ban in force on {kind} {value} (see `apishield bans list`)")
        if current.value != value:
            raise CliError(f"{value} is not banned itself: it is inside the ban on "
                           f"{current.value}; remove that with --ip {current.value}")
        assert store is not None
        lifted = store.lift(kind, value)
    if not lifted:  # lifted or expired by someone else in between
        _say(f"the ban on {kind} {value} was already gone")
        return EXIT_OK
    _say(f"lifted the ban on {kind} {value} (rule {current.rule}); a running gateway "
         "admits it again within about a second")
    _audit(config, "ban-removed", current, removed_at=_iso(now))
    return EXIT_OK


# -- parser -------------------------------------------------------------------------------

def _target(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--ip", metavar="ADDRESS_OR_CIDR",
                       help="an address (203.0.113.7, 2001:db8::1) or a network "
                       "(203.0.113.0/24)")
    group.add_argument("--subject", metavar="NAME", help="an account (the caller's subject)")


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `bans` and its subcommands to the `apishield` parser (see cli.build_parser)."""
    # `--config` is accepted before or after the subcommand (cli/config_option.py).
    config_option = config_parent(inherited=True)

    bans_cmd = commands.add_parser(
        "bans", parents=[config_parent()], help="list, add and remove temporary bans",
        description="See and change the bans in the config's `state` (SQLite file or "
        "Redis); running gateways apply changes within about a second.")
    sub = bans_cmd.add_subparsers(dest="bans_command", required=True)

    listing = sub.add_parser("list", parents=[config_option], help="the bans in force")
    listing.add_argument("--json", action="store_true", help="a JSON array instead of a table")
    listing.set_defaults(func=_command(cmd_list))

    add = sub.add_parser("add", parents=[config_option], help="ban an address, network or "
                         "subject for a time")
    _target(add)
    add.add_argument("--duration", required=True, metavar="DURATION",
                     help="how long, e.g. 30m, 12h or 7d")
    add.add_argument("--reason", metavar="TEXT", help="why (shown by `bans list`, audited)")
    add.set_defaults(func=_command(cmd_add))

    remove = sub.add_parser("remove", parents=[config_option], help="lift a ban now")
    _target(remove)
    remove.set_defaults(func=_command(cmd_remove))
