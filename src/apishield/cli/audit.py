"""`apishield audit CONTRACT [--config FILE] [--format text|json|sarif] [--fail-on SEVERITY]`.

A static review of the contract with the policy that enforces it (G1). Without a
config file (no `--config`, and no `apishield.yaml` in the working directory: the shared
option's default), the defaults are reviewed (what apishield enforces out of the box);
with one, CONTRACT replaces the config's `contract` so a CI job can audit the file it just changed.
Exit codes, for CI: 0 no finding at or above `--fail-on` (default high), 1 some, 2 usage,
configuration or contract errors (as `check`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from apishield import __version__
from apishield.audit import RULES, Severity, run_audit
from apishield.audit.report import render_json, render_sarif, render_text
from apishield.cli.config_option import DEFAULT_CONFIG, config_parent
from apishield.config import Config, ConfigError, config_from_dict, load_config
from apishield.contract.loader import load_contract

EXIT_FINDINGS = 1
EXIT_USAGE = 2
SEVERITIES = [s.label for s in Severity]


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    audit = commands.add_parser(
        "audit", parents=[config_parent()],
        help="review a contract and its policy; findings as text, JSON or SARIF",
        description="Review an OpenAPI contract together with the apishield policy that "
        "enforces it, against the checklist and the OWASP API Security Top 10 (2023). "
        "Rules, severities and formats: docs/audit.md. Without a config file (none given "
        f"and no {DEFAULT_CONFIG} here), apishield's defaults are reviewed.")
    audit.add_argument("contract", metavar="CONTRACT", help="the OpenAPI 3.0/3.1 document")
    audit.add_argument("--format", "-f", choices=("text", "json", "sarif"), default="text")
    audit.add_argument("--fail-on", choices=SEVERITIES, default="high",
                       help="exit 1 when a finding is at least this severe (default: high)")
    audit.add_argument("--output", "-o", metavar="FILE",
                       help="write the report here instead of standard output")
    audit.set_defaults(func=cmd_audit)


def _config(args: argparse.Namespace) -> tuple[Config, Path | None]:
    contract = str(Path(args.contract).resolve())
    if args.config == DEFAULT_CONFIG and not Path(DEFAULT_CONFIG).exists():
        return config_from_dict({"contract": contract}, source_dir=Path.cwd()), None
    config = load_config(args.config)
    return config.model_copy(update={"contract": contract}), Path(args.config).resolve()


def _problems(error: ConfigError, source: str) -> int:
    print(f"apishield: {len(error.problems)} problem(s) in {source}:", file=sys.stderr)
    for problem in error.problems:
        print(f"  {problem}", file=sys.stderr)
    return EXIT_USAGE


def cmd_audit(args: argparse.Namespace) -> int:
    try:
        config, config_file = _config(args)
    except ConfigError as exc:
        # the config file was given (or found) and did not load: name it, not the contract
        return _problems(exc, args.config)
    try:
        contract = load_contract(config)
    except ConfigError as exc:
        # the contract's own problems, or the config's operations that do not match it
        return _problems(exc, args.contract if config_file is None
                         else f"{args.contract} (with {args.config})")
    findings = run_audit(contract, config, config_file)
    config_name = args.config if config_file is not None else None
    if args.format == "json":
        text = render_json(findings, args.contract, config_name, version=__version__)
    elif args.format == "sarif":
        text = render_sarif(findings, RULES, version=__version__)
    else:
        colour = args.output is None and sys.stdout.isatty() and "NO_COLOR" not in os.environ
        text = render_text(findings, colour=colour)
    if args.output is None:
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text, encoding="utf-8")
    threshold = Severity.parse(args.fail_on)
    return EXIT_FINDINGS if any(f.severity >= threshold for f in findings) else 0
