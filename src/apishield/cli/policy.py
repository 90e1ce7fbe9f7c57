"""`apishield policy show`: who may call each operation, and under which limits (G3).

The config and contract are compiled into a pipeline exactly as `serve` would (the same
loaders, the same errors, exit 2), then `apishield.admin.policy` reads the compiled
objects, so the output is what the gateway enforces, not a re-reading of the YAML. The
admin API serves the same JSON as `GET /policy`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import orjson

from apishield.admin.policy import effective_policy, render_text
from apishield.cli.config_option import config_parent
from apishield.config import ConfigError, load_config
from apishield.contract.loader import load_contract
from apishield.pipeline import Pipeline

EXIT_CONFIG = 2


def cmd_show(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
        pipeline = Pipeline(config, load_contract(config), tls=config.tls is not None)
    except ConfigError as exc:
        print(f"apishield: {len(exc.problems)} problem(s) in {args.config}:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        policy = effective_policy(pipeline, args.operation)
    finally:
        asyncio.run(pipeline.stop())  # the state store it may have opened
        pipeline.close()
    if args.operation is not None and not policy["operations"]:
        print(f"apishield: no operation {args.operation!r} in {config.contract}: give an "
              "operationId, or METHOD /path for an operation without one", file=sys.stderr)
        return EXIT_CONFIG
    if args.format == "json":
        sys.stdout.write(orjson.dumps(policy, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        sys.stdout.write(render_text(policy))
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `policy show` to the `apishield` parser (see cli.build_parser)."""
    policy_cmd = commands.add_parser(
        "policy", parents=[config_parent()], help="show the effective policy per operation",
        description="What the gateway enforces per operation: schemes, scopes, roles, "
        "ownership, rate limits and quotas, validation, body limit, response mode, shadow "
        "mode, CORS and IP lists.")
    sub = policy_cmd.add_subparsers(dest="policy_command", required=True)
    show = sub.add_parser("show", parents=[config_parent(inherited=True)],
                          help="the policy of every operation (or of one)")
    show.add_argument("--operation", metavar="ID",
                      help="only this operation (its operationId, or METHOD /path)")
    show.add_argument("--format", choices=("text", "json"), default="text",
                      help="text (a block per operation, default) or json (stable, as "
                      "GET /policy on the admin API)")
    show.set_defaults(func=cmd_show)
