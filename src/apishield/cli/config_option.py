"""`--config`/`-c`, defined once for every command that reads a config file.

`serve`, `check`, `keys ...` and `bans ...` all take the same file, so they share one
argparse parent parser: one spelling, one default, one help text (before this, each
command group declared its own and `serve`/`check` had no help at all).

`keys` and `bans` accept the option before or after their subcommand
(`apishield keys -c prod.yaml list` and `apishield keys list -c prod.yaml`). argparse
copies a parent's actions into each parser, so the group parser carries the real default
and its subcommands carry `SUPPRESS`: a subcommand that was not given `--config` then
leaves the group's value alone instead of resetting it to the default.
"""

from __future__ import annotations

import argparse

DEFAULT_CONFIG = "apishield.yaml"
CONFIG_HELP = (
    "the apishield config file (YAML: contract, upstream, listener, state; "
    f"docs/configuration.md); default: {DEFAULT_CONFIG}"
)


def config_parent(*, inherited: bool = False) -> argparse.ArgumentParser:
    """A parent parser (`parents=[...]`) holding `--config/-c`.

    `inherited=True` is for the subcommands of a group that already takes `--config`:
    same option and help, no default of its own (see the module docstring).
    """
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--config", "-c", metavar="FILE",
        default=argparse.SUPPRESS if inherited else DEFAULT_CONFIG, help=CONFIG_HELP)
    return parent
