"""`apishield serve | check | demo`.

Exit codes: 0 success, 2 configuration or contract errors (every problem is printed, one
per line, with its location), 1 anything else. Warnings (a configuration that works but is
risky, such as plain HTTP on a public address) never change the exit code: `check` prints
them on stderr as `warning: location: message`, `serve` logs them at start.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from apishield.auth.service import NOT_PUBLIC
from apishield.cli import version as version_cli
from apishield.cli.config_option import config_parent
from apishield.config import (
    Config,
    ConfigError,
    config_from_dict,
    is_loopback,
    load_config,
    read_yaml,
    worker_role,
)
from apishield.contract.loader import load_contract
from apishield.contract.review import open_in_strict_mode
from apishield.gateway import Gateway, build_gateway, serve
from apishield.observe.logjson import configure_process
from apishield.pipeline import Pipeline

EXIT_CONFIG = 2
DEMO_DIR = Path(__file__).parent.parent / "demo"


def _setup_logging() -> None:
    """Every line the process logs is one JSON object on stderr (docs/logging.md)."""
    configure_process(logging.INFO)


def _run(coro: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        asyncio.run(coro)
    else:
        uvloop.run(coro)


def _report(error: ConfigError, source: str) -> int:
    print(f"apishield: {len(error.problems)} problem(s) in {source}:", file=sys.stderr)
    for problem in error.problems:
        print(f"  {problem}", file=sys.stderr)
    return EXIT_CONFIG


def _load(path: str, host: str | None = None, port: int | None = None) -> Config:
    config = load_config(path)
    if host is not None or port is not None:
        listen = config.listen.model_copy(
            update={k: v for k, v in (("host", host), ("port", port)) if v is not None}
        )
        config = config.model_copy(update={"listen": listen})
    return config


def _contract_problems_despite(path: str) -> list[str]:
    """When the config itself is broken, still check its contract: report everything at once."""
    try:
        data = read_yaml(Path(path))
    except ConfigError:
        return []
    if not isinstance(data, dict) or not isinstance(data.get("contract"), str):
        return []
    source_dir = Path(path).parent.resolve()
    minimal: Config | None = None
    # With the config's `operations` when they are valid on their own, so an unknown
    # operationId there is reported too; else with the contract alone.
    for candidate in ({"contract": data["contract"], "operations": data.get("operations") or {}},
                      {"contract": data["contract"]}):
        try:
            minimal = config_from_dict(candidate, source_dir=source_dir)
            break
        except ConfigError:
            continue
    if minimal is None:
        return []
    try:
        load_contract(minimal)
    except ConfigError as exc:
        return exc.problems
    return []


def _load_and_compile(path: str, host: str | None = None, port: int | None = None) -> Gateway:
    try:
        config = _load(path, host, port)
    except ConfigError as exc:
        raise ConfigError(exc.problems + _contract_problems_despite(path)) from None
    return _compile_for_serving(config)


def _compile_for_serving(config: Config) -> Gateway:
    if config.upstream is None:
        raise ConfigError(["upstream: required key is missing (write e.g. upstream: {url: "
                           "http://127.0.0.1:9000})"])
    return build_gateway(config)


def config_warnings(gateway: Gateway) -> list[str]:
    """Risky but working settings of a compiled gateway, each `location: message`."""
    config = gateway.config
    found: list[str] = []
    if gateway.tls is None and not is_loopback(config.listen.host):
        found.append(
            f"listen.host: {config.listen.host or '(all addresses)'} is reachable from other "
            "hosts but tls is not configured, so tokens and data cross the network in clear "
            "text (checklist C1); configure tls, or listen on 127.0.0.1 behind a TLS proxy"
        )
    if gateway.tls is not None:
        found += gateway.tls.warnings()
    upstream = config.upstream
    if upstream is not None and gateway.upstream_tls and not upstream.tls.verify:
        found.append(
            "upstream.tls.verify: false: the upstream's certificate is not checked, so anyone "
            "on the path can impersonate it; give its CA with upstream.tls.ca instead"
        )
    admin = config.admin
    if admin is not None and not is_loopback(admin.host):
        found.append(
            f"admin.host: {admin.host or '(all addresses)'} serves the admin API over plain "
            "HTTP to other hosts, so its bearer token and the config it shows cross the "
            "network in clear text (checklist C1, C4); bind it to 127.0.0.1, or reach it "
            "through a TLS-terminating proxy or a private network only")
    found += security_warnings(gateway.pipeline)
    return found


def security_warnings(pipeline: Pipeline) -> list[str]:
    """Operations apishield will refuse to everyone (A7), and insecure key sources."""
    contract = pipeline.contract
    name = contract.source.name
    found = [
        f"{name}#{operation.pointer}: declares no security and is not marked public, "
        "so apishield refuses it to everyone (403 not-public); give it a `security` "
        "requirement, or make it public with `security: []` or `x-apishield: {public: true}`"
        for operation in contract.operations
        if pipeline.auth.plans.get(operation.pointer) == NOT_PUBLIC
    ]
    found += [
        f"{name}#{operation.pointer}: public: true overrides the contract's security "
        "requirement, so anyone can call it without a credential; remove public: true if "
        "callers must authenticate"
        for operation in contract.operations if operation.public_over_security]
    found += open_in_strict_mode(contract, pipeline.config)
    found += pipeline.auth.mode_warnings()
    found += pipeline.alerts.warnings() if pipeline.alerts is not None else []
    for issuer_name, weak in pipeline.auth.weak_secrets.items():
        # worded without `secret: value` pairs: logged by `serve`, such a pair is masked
        found.append(
            f"auth.issuers.{issuer_name}: its shared secret {weak}; accepted because the "
            "issuer sets allow_weak_secret, but anyone who guesses it can mint any token "
            "(A1): move the app to a random 32+ byte secret, or to an asymmetric algorithm")
    for issuer_name, issuer in pipeline.config.auth.issuers.items():
        for key, url in (("jwks_url", issuer.jwks_url), ("introspection.url",
                         issuer.introspection.url if issuer.introspection else None)):
            if url is not None and url.startswith("http://") and not is_loopback(
                    urlsplit(url).hostname or ""):
                found.append(
                    f"auth.issuers.{issuer_name}.{key}: {url} is plain HTTP to another host: "
                    "anyone on the path can swap the keys or answers; use https://")
    return found


def cmd_check(args: argparse.Namespace) -> int:
    try:
        gateway = _load_and_compile(args.config)
    except ConfigError as exc:
        return _report(exc, args.config)
    operations = gateway.contract.operations
    print(f"{args.config}: OK ({len(operations)} operations from {gateway.config.contract})")
    for warning in config_warnings(gateway):
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    spec = None
    if args.worker_spec is not None:  # a worker of `serve --workers N` (supervisor.py)
        from apishield import supervisor

        spec = supervisor.WorkerSpec.loads(args.worker_spec)
        supervisor.become_worker(spec)
    try:
        gateway = _load_and_compile(args.config, args.host, args.port)
    except ConfigError as exc:
        return _report(exc, args.config)
    # SIGHUP, POST /reload and reload.watch read the same file, with the same overrides
    gateway.reload_from(args.config, lambda: _load(args.config, args.host, args.port))
    _setup_logging()
    if spec is None:  # the supervisor has logged them once for every worker
        for warning in config_warnings(gateway):
            logging.getLogger("apishield").warning("%s", warning)
    listen = gateway.config.listen
    workers = args.workers
    if workers is None:  # one per usable core; Windows has no supervisor (see below)
        workers = 1 if sys.platform == "win32" else worker_role.usable_cores()
    try:
        if spec is not None:
            from apishield.supervisor import serve_worker

            _run(serve_worker(gateway, spec))
        elif workers > 1:
            if sys.platform == "win32":  # no inherited listening sockets, no POSIX signals
                print("apishield: --workers needs Linux or macOS; run one process per "
                      "port behind a load balancer instead", file=sys.stderr)
                return EXIT_CONFIG
            from apishield.supervisor import supervise, worker_command

            return supervise(gateway, worker_command(args.config, args.host, args.port),
                             workers)
        else:
            _run(serve(gateway, listen.host, listen.port))
    except ConfigError as exc:  # found at start: the key store or its pepper
        return _report(exc, args.config)
    return 0


def _workers(text: str) -> int:
    try:
        workers = int(text)
    except ValueError:
        workers = 0
    if workers < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of worker processes (1 or more; 1 runs the gateway in "
            "this process)")
    return workers


def cmd_demo(args: argparse.Namespace) -> int:
    from apishield.demo.api import make_server

    upstream = make_server("127.0.0.1", args.upstream_port)
    thread = threading.Thread(target=upstream.serve_forever, daemon=True)
    thread.start()
    up_host, up_port = upstream.server_address[:2]
    # the demo's state (usage counts, the audit trail) lives for the run in a temporary
    # folder: never in the installed package, which may be read-only or shared
    state_dir = tempfile.TemporaryDirectory(prefix="apishield-demo-")
    config = config_from_dict(
        {
            "contract": "openapi.yaml",
            "upstream": {"url": f"http://{up_host}:{up_port}"},
            "listen": {"host": "127.0.0.1", "port": args.port},
            "access_log": {"path": args.access_log},
            "state": str(Path(state_dir.name) / "apishield-state.db"),
        },
        source_dir=DEMO_DIR,
    )
    try:
        gateway = build_gateway(config)
    except ConfigError as exc:  # the bundled demo must always load; this is a bug
        state_dir.cleanup()
        return _report(exc, "the bundled demo")
    _setup_logging()

    async def main() -> None:
        ready: asyncio.Future[tuple[str, int]] = asyncio.get_running_loop().create_future()
        task = asyncio.ensure_future(serve(gateway, "127.0.0.1", args.port, ready=ready))
        waiting: list[asyncio.Future[tuple[str, int]] | asyncio.Task[None]] = [ready, task]
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():  # serve failed before listening (e.g. the port is taken)
            ready.cancel()
            await task  # raises the OSError, reported by main()
        host, port = ready.result()
        base = f"http://{host}:{port}"
        print(
            f"""
apishield demo
  demo API (unprotected): http://{up_host}:{up_port}
  gateway  (protected):   {base}
  contract:               {DEMO_DIR / 'openapi.yaml'}

Try:
  curl -i {base}/pets/1                      # declared: passes (note the security headers)
  curl -i {base}/admin                       # not in the contract: 404 problem+json
  curl -i -X PUT {base}/pets/1               # method not declared: 405 with Allow
  curl -i -X POST {base}/pets -H 'content-type: text/plain' -d hi     # 415
  curl -i {base}/pets/abc                    # petId is an integer: 400, errors point at it
  curl -i -X POST {base}/pets -H 'content-type: application/json' \
       -d '{{"name": "rex", "admin": true}}'                            # undeclared field: 422
  curl -i '{base}/pets/..%2fadmin'           # path trick: 400
  head -c 10000000 /dev/zero | curl -i {base}/pets \\
       -H 'content-type: application/json' --data-binary @-          # 413 before reading it
  curl -i {base}/orders/13                   # the API crashes: its traceback stays in the log

Access log: {args.access_log if args.access_log != '-' else 'standard output'}. Ctrl-C stops.
""",
            flush=True,
        )
        await task

    try:
        _run(main())
    finally:
        upstream.shutdown()
        upstream.server_close()
        state_dir.cleanup()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="apishield",
        description="Contract-first API security gateway: what the OpenAPI document does "
        "not declare is refused.",
    )
    parser.add_argument("-V", "--version", action="version", version=version_cli.short(),
                        help="print the version and exit (with -v: the libraries' too)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="with --version: the versions of the security-relevant "
                        "libraries and of OpenSSL, one per line, for a bug report")
    commands = parser.add_subparsers(dest="command", required=True)

    serve_cmd = commands.add_parser("serve", parents=[config_parent()],
                                    help="run the gateway in front of an upstream")
    serve_cmd.add_argument("--host", help="listen address (overrides listen.host)")
    serve_cmd.add_argument("--port", type=int, help="listen port (overrides listen.port)")
    serve_cmd.add_argument(
        "--workers", type=_workers, default=os.environ.get("APISHIELD_WORKERS") or None,
        help="worker processes sharing the listener and exact rate limits (default: "
        "$APISHIELD_WORKERS, else the usable cores; 1 runs the gateway in this process, "
        "2 or more start a supervisor: docs/workers.md)")
    serve_cmd.add_argument("--worker-spec", help=argparse.SUPPRESS)  # set by the supervisor
    serve_cmd.set_defaults(func=cmd_serve)

    check_cmd = commands.add_parser("check", parents=[config_parent()],
                                    help="load and compile everything; report problems")
    check_cmd.set_defaults(func=cmd_check)

    demo_cmd = commands.add_parser("demo", help="the bundled demo API behind the gateway")
    demo_cmd.add_argument("--port", type=int, default=8080, help="gateway port (default 8080)")
    demo_cmd.add_argument("--upstream-port", type=int, default=0, help="demo API port (0: any)")
    demo_cmd.add_argument("--access-log", default="-", help="access log file ('-': stdout)")
    demo_cmd.set_defaults(func=cmd_demo)

    from apishield.cli import keys as keys_cli  # `keys create | list | revoke | rotate`

    keys_cli.register(commands)
    from apishield.cli import bans as bans_cli  # `bans list | add | remove`

    bans_cli.register(commands)
    from apishield.cli import usage as usage_cli  # `usage`

    usage_cli.register(commands)
    from apishield.cli import users as users_cli  # `users create | list | rotate | revoke`

    users_cli.register(commands)
    from apishield.cli import policy as policy_cli  # `policy show`

    policy_cli.register(commands)
    from apishield.cli import audit as audit_cli  # `audit CONTRACT [--config] [--format]`

    audit_cli.add_parser(commands)
    from apishield.cli import probe as probe_cli  # `probe --target URL [--only] [--dry-run]`

    probe_cli.add_parser(commands)
    from apishield.cli import init as init_cli  # `init CONTRACT [--output FILE]`

    init_cli.add_parser(commands)
    from apishield.cli import audit_log as audit_log_cli  # `audit-log verify` (the trail)

    audit_log_cli.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    report = version_cli.requested(sys.argv[1:] if argv is None else argv)
    if report is not None:  # `--version --verbose`, in either order (cli/version.py)
        sys.stdout.write(report)
        return 0
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 0
    except OSError as exc:  # e.g. the port is taken
        print(f"apishield: {exc.strerror or exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
