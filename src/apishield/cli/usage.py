"""`apishield usage`: requests, refusals and bytes per identity and operation, per day or
month, from the state store the gateways flush into (checklist F4; docs/usage.md).

Reads only: a SQLite state file that does not exist is an error (a wrong `--config` must
not create an empty database and answer "no usage"). The counts lag the gateways by at
most their `usage.flush_interval` (and are complete once they stopped).

Exit codes (as `apishield keys`): 0 done, 1 the request cannot be carried out (bad
option, no state file, store failure), 2 the configuration is invalid.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from contextlib import closing

from apishield.cli.config_option import config_parent
from apishield.cli.keys import EXIT_OK, CliError, _duration, _say, cli_command, print_table
from apishield.config import Config
from apishield.state.open import describe_state, open_usage_store, state_exists
from apishield.state.usage import (
    COUNTS,
    MAX_SINCE,
    PERIODS,
    UsageStoreError,
    first_day,
    report,
    since_days,
)

FORMATS = ("table", "json", "csv")
DEFAULT_SINCE = "30d"


def cmd_usage(args: argparse.Namespace, config: Config) -> int:
    seconds = _duration(args.since, "--since")
    if seconds > MAX_SINCE:
        raise CliError(f"--since: {args.since} reaches back more than 3660 days; no usage "
                       "is kept that long")
    days = since_days(seconds)
    if not state_exists(config):
        raise CliError(f"no state file at {describe_state(config)}: no gateway using this "
                       "config has written usage there yet (check --config, and the "
                       "config's `state`)")
    since_day = first_day(time.time(), days)
    with closing(open_usage_store(config)) as store:
        rows = store.query(since_day, args.identity, args.operation)
    result = report(rows, args.by, since_day)
    if args.format == "json":
        print(json.dumps(result, indent=2, ensure_ascii=False))
        return EXIT_OK
    lines = result["rows"]
    columns = ("period", "identity", "operation", *COUNTS)
    if args.format == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([line[column] for column in columns] for line in lines)
        return EXIT_OK
    if not lines:
        _say(f"no usage since {since_day} in {describe_state(config)}")
        return EXIT_OK
    total = result["total"]
    table = [tuple(column.upper() for column in columns)]
    table += [tuple(str(line[column]) for column in columns) for line in lines]
    table.append(("total", "", "", *(str(total[count]) for count in COUNTS)))
    print_table(table)
    return EXIT_OK


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `usage` to the `apishield` parser (see cli.build_parser)."""
    usage = commands.add_parser(
        "usage", parents=[config_parent()],
        help="requests, refusals and bytes per identity and operation",
        description="Usage per identity (API key id, token subject, anonymous, other) and "
        "operation, per UTC day or month, as the gateways wrote it to the config's "
        "`state` (SQLite file or Redis).")
    usage.add_argument("--identity", metavar="ID", help="one identity only (an API key id, "
                       "a subject, anonymous or other)")
    usage.add_argument("--operation", metavar="OP", help="one operation only (its "
                       "operationId, or METHOD /path)")
    usage.add_argument("--since", default=DEFAULT_SINCE, metavar="DURATION",
                       help=f"how far back, in whole UTC days (e.g. 7d; default "
                       f"{DEFAULT_SINCE}; today counts as one)")
    usage.add_argument("--by", choices=PERIODS, default="day", help="one row per day "
                       "(default) or per month")
    usage.add_argument("--format", choices=FORMATS, default="table",
                       help="a table (default), JSON (versioned) or CSV with a header")
    usage.set_defaults(func=cli_command("usage", UsageStoreError, "usage store")(cmd_usage))
