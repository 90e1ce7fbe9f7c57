"""`apishield --version` and the one `--config` option every config-reading command shares."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import pytest

from apishield.cli.config_option import CONFIG_HELP, DEFAULT_CONFIG
from apishield.cli.main import build_parser

SRC = Path(__file__).parent.parent / "src" / "apishield"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "apishield", *args], capture_output=True,
                          text=True, timeout=30, env={**os.environ, "COLUMNS": "200"},
                          check=False)


def test_version_prints_the_installed_distributions_version():
    result = run("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"apishield {version('apishield')}\n"
    assert result.stderr == ""


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
             ) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every command that does something (the leaves of the parser tree), with its path."""
    groups = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not groups:
        yield path, parser
    for group in groups:
        for name, sub in group.choices.items():
            yield from commands(sub, (*path, name))


LEAVES = dict(commands(build_parser()))


def test_the_tree_is_what_this_test_walks():
    assert {" ".join(path) for path in LEAVES} >= {
        "serve", "check", "demo", "keys create", "keys list", "keys revoke", "keys rotate",
        "bans list", "bans add", "bans remove"}


# the demo builds its own config and `init` writes one: neither reads a config file
NO_CONFIG = [("demo",), ("init",)]


@pytest.mark.parametrize("path", [p for p in LEAVES if p not in NO_CONFIG], ids=" ".join)
def test_every_command_reading_a_config_documents_config(path):
    """The help a user sees (`apishield ... --help`) says what the file is and the default."""
    (option,) = [a for a in LEAVES[path]._actions if "--config" in a.option_strings]
    assert option.option_strings == ["--config", "-c"]
    assert option.help == CONFIG_HELP
    result = run(*path, "--help")
    assert result.returncode == 0
    assert "--config FILE, -c FILE" in result.stdout
    assert f"default: {DEFAULT_CONFIG}" in " ".join(result.stdout.split())


def test_only_demo_and_init_take_no_config():
    """The demo builds its own config and `init` writes one; any other command without
    --config is a new one that forgot the shared option."""
    without = [p for p, parser in LEAVES.items()
               if not any("--config" in a.option_strings for a in parser._actions)]
    assert without == NO_CONFIG


@pytest.mark.parametrize("group", ["keys", "bans"])
def test_config_before_or_after_the_subcommand(group):
    parse = build_parser().parse_args
    assert parse([group, "list"]).config == DEFAULT_CONFIG
    assert parse([group, "-c", "a.yaml", "list"]).config == "a.yaml"
    assert parse([group, "list", "--config", "b.yaml"]).config == "b.yaml"
    assert parse([group, "-c", "a.yaml", "list", "-c", "b.yaml"]).config == "b.yaml"
    assert parse(["serve"]).config == DEFAULT_CONFIG
    assert parse(["check", "-c", "c.yaml"]).config == "c.yaml"


def test_config_option_is_defined_once():
    defining = sorted(path.name for path in (SRC / "cli").glob("*.py")
                      if '"--config"' in path.read_text())
    assert defining == ["config_option.py"]
