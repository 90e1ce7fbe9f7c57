"""`apishield probe --config FILE --target URL [--only CLASS,...] [--format text|json|sarif]
[--max-requests N] [--rate R] [--dry-run] [--yes] [--allow-writes] [--identity name=CRED]...
[--issuer-keys FILE]`

Attack your own deployment from its contract and policy (issue 17, docs/probe.md). Only
--target is contacted. Without --yes it asks before sending, and refuses when it can not
ask (stdin is not a terminal: a CI job must say --yes). Exit codes: 0 every attempt
sent was refused (or inconclusive: listed and counted, not a failure), 1 something got
through, 2 usage, configuration or contract errors, a target that never answered, or
attempts blocked because the prober was rate-limited.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from apishield import __version__
from apishield.cli.config_option import config_parent
from apishield.cli.probe_progress import ProgressBar
from apishield.config import ConfigError, load_config
from apishield.contract.loader import load_contract
from apishield.probe.issuer_keys import PemKey, read_key_file
from apishield.probe.leaks import LeakCheck
from apishield.probe.multistep import PLANNERS
from apishield.probe.plan import Identity, build_plan
from apishield.probe.report import (
    findings,
    render_json,
    render_plan,
    render_sarif_report,
    render_text,
)
from apishield.probe.roles import split_roles
from apishield.probe.rules import CLASSES
from apishield.probe.run import execute
from apishield.probe.sender import Sender, Target

EXIT_GOT_THROUGH = 1
EXIT_USAGE = 2


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    probe = commands.add_parser(
        "probe", parents=[config_parent()],
        help="send attacks generated from the contract to a target; report what got through",
        description="Attack a deployment (only --target is contacted) with requests "
        "generated from the contract and policy, each one a refusal a sound policy gives; "
        "report each as refused or got through. Safety rules and classes: docs/probe.md.")
    probe.add_argument("--target", required=True, metavar="URL",
                       help="scheme://host[:port][/base]: the only origin contacted")
    probe.add_argument("--only", metavar="CLASS,...",
                       help=f"only these classes ({', '.join(CLASSES)})")
    probe.add_argument("--format", "-f", choices=("text", "json", "sarif"), default="text")
    probe.add_argument("--output", "-o", metavar="FILE",
                       help="write the report here instead of standard output")
    probe.add_argument("--max-requests", type=int, default=500, metavar="N",
                       help="send at most N requests (default 500)")
    probe.add_argument("--rate", type=float, default=20.0, metavar="R",
                       help="at most R requests a second (default 20)")
    probe.add_argument("--dry-run", action="store_true",
                       help="print the planned requests and send nothing")
    probe.add_argument("--yes", "-y", action="store_true",
                       help="do not ask before sending (required when stdin is not a TTY)")
    probe.add_argument("--allow-writes", action="store_true",
                       help="also send POST, PUT, PATCH and DELETE attempts (they may change "
                       "data if the policy lets them through)")
    probe.add_argument("--ca-file", metavar="PEM",
                       help="also trust this CA for an https target (a staging deployment's "
                       "private CA); certificates are always verified")
    probe.add_argument("--identity", action="append", default=[],
                       metavar="NAME[:ROLE,...]=CREDENTIAL",
                       help="a credential for operations that need one (API key, bearer "
                       "token, user:password); CREDENTIAL may be env:VAR or file:PATH; "
                       ":ROLE,... the roles it holds (for role attempts; NAME:= for none); "
                       "two identities enable BOLA attempts")
    probe.add_argument("--issuer-keys", metavar="FILE",
                       help="the bearer issuer's public keys (a JWK Set downloaded from its "
                       "jwks_url, or PEM) for the key-confusion attack; the config's static "
                       "keys are used without it")
    probe.set_defaults(func=cmd_probe)


def _usage(message: str) -> int:
    print(f"apishield probe: {message}", file=sys.stderr)
    return EXIT_USAGE


def parse_identity(text: str) -> Identity:
    """`name=CREDENTIAL`, CREDENTIAL literal, `env:VAR` or `file:PATH` (kept off the
    command line, where other users of the machine can read it); `name:r1,r2=...` also
    says which roles it holds (roles.py)."""
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise ValueError(f"--identity {name or text!r}: write NAME=CREDENTIAL")
    name, roles = split_roles(name)
    if value.startswith("env:"):
        if value[4:] not in os.environ:
            raise ValueError(f"--identity {name}: environment variable {value[4:]} is not set")
        value = os.environ[value[4:]]
    elif value.startswith("file:"):
        try:
            value = Path(value[5:]).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ValueError(f"--identity {name}: {exc.strerror}: {value[5:]}") from None
    return Identity(name, value, roles)


def _rules(only: str | None) -> set[str]:
    if only is None:
        return {rule for rules in CLASSES.values() for rule in rules}
    chosen = [name.strip() for name in only.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in CLASSES]
    if unknown or not chosen:
        raise ValueError(f"--only {only!r}: unknown class {', '.join(unknown) or '(none)'}; "
                         f"choose from {', '.join(CLASSES)}")
    return {rule for name in chosen for rule in CLASSES[name]}


def cmd_probe(args: argparse.Namespace) -> int:
    try:
        target = Target.parse(args.target)
        rules = _rules(args.only)
        identities = [parse_identity(text) for text in args.identity]
        names = [identity.name for identity in identities]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"--identity {twice[0]}: given twice; each NAME once (reports "
                             "tell identities apart by name)")
        if args.max_requests < 1:
            raise ValueError("--max-requests must be at least 1")
        if not 0 < args.rate <= 1000:
            raise ValueError("--rate must be above 0 and at most 1000 a second")
        public_keys: list[PemKey] | None = None
        if args.issuer_keys is not None:
            try:
                public_keys = read_key_file(Path(args.issuer_keys))
            except ValueError as exc:
                raise ValueError(f"--issuer-keys: {exc}") from None
    except ValueError as exc:
        return _usage(str(exc))
    try:
        config = load_config(args.config)
        contract = load_contract(config)
    except ConfigError as exc:
        print(f"apishield: {len(exc.problems)} problem(s) in {args.config}:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_USAGE
    shown_target = target.origin + target.base
    plan = build_plan(contract, config, identities, rules=rules,
                      allow_writes=args.allow_writes, https=target.scheme == "https",
                      user_agent=f"apishield-probe/{__version__}", more=PLANNERS,
                      public_keys=public_keys)
    if args.dry_run:
        listed = [(a.rule, a.request.method, a.request.shown, a.what
                   + (f" (up to {a.cost} requests)" if a.cost > 1 else ""))
                  for a in plan.attempts]
        _write(args, render_plan(listed, target=shown_target,
                                 skipped_writes=plan.skipped_writes, notes=plan.notes,
                                 requests=sum(a.cost for a in plan.attempts)))
        return 0
    count = min(sum(attempt.cost for attempt in plan.attempts), args.max_requests)
    if not args.yes:
        if not sys.stdin.isatty():
            return _usage("stdin is not a terminal: pass --yes to send requests without "
                          "asking (or --dry-run to see the plan)")
        print(f"apishield probe will send {count} request(s) to {shown_target} "
              f"(at most {args.rate:g}/s){' including writes' if args.allow_writes else ''}."
              " Only probe systems you are allowed to test.", file=sys.stderr)
        if input("Continue? [y/N] ").strip().lower() not in ("y", "yes"):
            print("apishield probe: nothing sent", file=sys.stderr)
            return 0
    try:
        sender = Sender(target, max_requests=args.max_requests, rate=args.rate,
                        ca_file=args.ca_file)
        sender.check_ca()
    except (ValueError, OSError) as exc:
        return _usage(f"--ca-file {args.ca_file}: {exc}")
    bar = ProgressBar(sys.stderr)
    leak_rules = {"probe-response-undeclared-property", "probe-response-write-only"}
    try:
        outcomes = execute(plan.attempts, sender, stack_traces="probe-stack-trace" in rules,
                           progress=bar,
                           leaks=LeakCheck(contract) if leak_rules & rules else None)
    finally:
        bar.finish()
    source = contract.source
    if args.format == "json":
        text = render_json(outcomes, source, target=shown_target, config=args.config,
                           skipped_writes=plan.skipped_writes, notes=plan.notes,
                           version=__version__)
    elif args.format == "sarif":
        text = render_sarif_report(outcomes, source, version=__version__)
    else:
        text = render_text(outcomes, source, target=shown_target,
                           skipped_writes=plan.skipped_writes, notes=plan.notes)
    _write(args, text)
    if findings(outcomes, source):
        return EXIT_GOT_THROUGH
    answered = [o for o in outcomes if o.verdict in ("refused", "got-through")]
    if not answered and any(o.verdict == "no-answer" for o in outcomes):
        # nothing was probed: a pipeline must not go green on an unreachable target
        first = next(o.detail for o in outcomes if o.verdict == "no-answer")
        return _usage(f"{shown_target} never answered ({first})")
    blocked = sum(o.verdict == "blocked" for o in outcomes)
    if blocked:  # those attempts proved nothing: not a pass
        return _usage(f"{blocked} attempt(s) were blocked (the prober was rate-limited or "
                      "banned); lower --rate, or raise the limits for the probe's key or "
                      "address on the target")
    return 0


def _write(args: argparse.Namespace, text: str) -> None:
    if args.output is None:
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text, encoding="utf-8")
