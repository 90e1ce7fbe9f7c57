"""`apishield init CONTRACT [--output apishield.yaml] [--force]`: a starter policy.

A user arriving with an existing OpenAPI document should get a policy that loads, fails
closed and teaches, rather than a list of load errors to work through (issue 15: half of
a sample of real 3.x documents did not load until issuer stanzas were written by hand).
The starter maps every security scheme the contract uses to a stanza:

- bearer, `oauth2` and `openIdConnect`: `mode: refuse` (every token is refused until an
  issuer is written) with the issuer stanza to fill in, commented, and what the contract
  says about the issuer (discovery URL, token URL);
- `apiKey`: verified against apishield's key store (`apishield keys create`), with the
  `delegate` alternative for an API that keeps its own keys;
- HTTP `basic`: verified against apishield's user store (`apishield users create`), or
  delegated;
- other HTTP schemes (digest, ...) and `mutualTLS`: refused, with how to enable them.

Operations without any security are written `public: false` (refused to everyone, A7),
each with the line to change; `base_path` comes from `servers` (the first server's when
they disagree, said in a comment); login, token and password-reset-like operations get a
pre-authentication rate limit and every failed authentication feeds a ban rule (A9).
What the user still has to decide is printed, and written at the top of the file.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from apishield import __version__
from apishield.audit.access import credential_like
from apishield.config import ConfigError, config_from_dict
from apishield.contract.loader import Contract, Operation, load_contract, load_document
from apishield.contract.servers import AmbiguousServers, first_server_path, servers_base_path

EXIT_ERROR = 1
EXIT_USAGE = 2



def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    init = commands.add_parser(
        "init", help="write a starter apishield.yaml for an existing OpenAPI contract",
        description="Write a commented starter policy for CONTRACT that loads, refuses what "
        "is not set up yet and says what is left to decide (docs/getting-started.md).")
    init.add_argument("contract", metavar="CONTRACT", help="the OpenAPI 3.0/3.1 document")
    init.add_argument("--output", "-o", default="apishield.yaml",
                      help="where to write the policy (default: apishield.yaml)")
    init.add_argument("--upstream", default="http://127.0.0.1:8000",
                      help="the URL the API itself runs at (default: http://127.0.0.1:8000)")
    init.add_argument("--force", action="store_true", help="overwrite an existing file")
    init.set_defaults(func=cmd_init)


def cmd_init(args: argparse.Namespace) -> int:
    output = Path(args.output)
    if output.exists() and not args.force:
        print(f"apishield init: {output} exists; pass --force to overwrite it, or "
              "--output to write elsewhere", file=sys.stderr)
        return EXIT_USAGE
    contract_path = Path(args.contract)
    try:
        starter = starter_policy(contract_path, output.resolve().parent,
                                 upstream=args.upstream)
    except ConfigError as exc:
        print(f"apishield init: {contract_path} cannot be read as a contract:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_ERROR
    output.write_text(starter.text, encoding="utf-8")
    print(f"wrote {output}: {starter.summary}")
    if starter.decisions:
        print("still yours to decide (also at the top of the file):")
        for decision in starter.decisions:
            print(f"  - {decision}")
    print(f"then: apishield check --config {output}   and   apishield audit {args.contract} "
          f"--config {output}")
    return 0


@dataclass
class Starter:
    text: str
    summary: str
    decisions: list[str] = field(default_factory=list)


def starter_policy(contract_path: Path, output_dir: Path, *,
                   upstream: str = "http://127.0.0.1:8000") -> Starter:
    """The starter policy for the contract at `contract_path`, as YAML text meant to be
    written in `output_dir` (the contract is named relative to it); ConfigError when the
    contract itself does not load (those problems are the document's, not the policy's)."""
    contract_path = contract_path.resolve()
    document = load_document(contract_path)
    if not isinstance(document, dict):
        raise ConfigError([f"{contract_path.name}: an OpenAPI document must be a mapping"])
    base_path, base_note = _base_path(document.get("servers"))
    contract_ref = os.path.relpath(contract_path, output_dir)
    config = config_from_dict({"contract": str(contract_path), "base_path": base_path},
                              source_dir=output_dir)
    contract = load_contract(config)
    return _Writer(contract, contract_ref, base_path, base_note, upstream).write()


def _base_path(servers: Any) -> tuple[str, str | None]:
    try:
        return servers_base_path(servers), None
    except AmbiguousServers as exc:
        path = first_server_path(servers)
        return path, (f"{exc}: this gateway serves the first one's; change it if it "
                      "serves another")


def _q(value: str) -> str:
    """A YAML scalar that reads back as exactly `value` (JSON strings are YAML)."""
    return orjson.dumps(value).decode()


def is_login_like(operation: Operation) -> bool:
    """A POST whose operationId or literal path reads like login, token, password reset
    or sign-up: the words `apishield audit` asks a rate limit for (one list, so a starter
    policy passes that rule). Credentials are submitted by POST; path parameters' names
    are not read (`/catalog/{token}` names no credential check)."""
    if operation.method != "POST":
        return False
    literal = "/".join(segment for segment in operation.path.split("/")
                       if not segment.startswith("{"))
    return credential_like(operation.operation_id or "") or credential_like(literal)


class _Writer:
    def __init__(self, contract: Contract, contract_ref: str, base_path: str,
                 base_note: str | None, upstream: str) -> None:
        self.contract = contract
        self.contract_ref = contract_ref
        self.base_path = base_path
        self.base_note = base_note
        self.upstream = upstream
        self.lines: list[str] = []
        self.decisions: list[str] = []

    def write(self) -> Starter:
        contract = self.contract
        used = self._used_schemes()
        self._transport()
        self._auth(used)
        self._operations()
        login = self._rate_limits()
        head = [
            f"# apishield policy for {self.contract_ref} (OpenAPI {contract.version}), "
            f"started by `apishield init` (apishield {__version__}).",
            "# It loads as it is and fails closed: what is not set up yet is refused.",
            "# Reference: docs/configuration.md; review it with "
            f"`apishield audit {self.contract_ref} --config <this file>`.",
        ]
        if self.decisions:
            head.append("#")
            head.append("# Still yours to decide:")
            head += [f"#  - {decision}" for decision in self.decisions]
        text = "\n".join([*head, "", *self.lines]) + "\n"
        unsecured = sum(1 for op in contract.operations if op.security is None)
        summary = (f"{len(contract.operations)} operations, {len(used)} security scheme(s) "
                   f"in use, {unsecured} operation(s) without security (refused), "
                   f"{login} login-like operation(s) rate limited")
        return Starter(text, summary, self.decisions)

    def _used_schemes(self) -> dict[str, int]:
        used: dict[str, int] = {}
        for operation in self.contract.operations:
            names = {name for requirement in operation.security or () for name in requirement}
            for name in names:
                used[name] = used.get(name, 0) + 1
        return {name: used[name] for name in sorted(used)}

    def _transport(self) -> None:
        out = self.lines
        out.append(f"contract: {_q(self.contract_ref)}")
        out.append(f"upstream: {{url: {_q(self.upstream)}}}   # where the API itself runs")
        out.append("listen: {host: 127.0.0.1, port: 8080}   # behind a TLS proxy, or set tls: "
                   "(docs/tls.md)")
        if self.base_note is not None:
            out.append(f"# servers: {self.base_note}")
            self.decisions.append(f"base_path: the servers disagree; {self.base_path or '/'} "
                                  "was taken from the first one")
        out.append(f"base_path: {_q(self.base_path)}   # the prefix every path is served "
                   "under (from the contract's servers)")
        out.append("# mode: log-only   # roll out in shadow mode first: refusals are logged, "
                   "not enforced")
        out.append("")
        self.decisions.append(f"upstream.url: where the API runs (now {self.upstream})")

    def _auth(self, used: dict[str, int]) -> None:
        out = self.lines
        schemes = self.contract.security_schemes
        if not used:
            out.append("# The contract's operations use no security scheme.")
            out.append("")
            return
        out.append("auth:")
        out.append("  schemes:")
        issuers: list[str] = []
        for name, count in used.items():
            scheme = schemes.get(name, {})
            kind = scheme.get("type")
            http = str(scheme.get("scheme", "")).lower() if kind == "http" else ""
            where = f"{name} ({count} operation(s))"
            if kind in ("oauth2", "openIdConnect") or http == "bearer":
                out.append(f"    {_q(name)}:   # {kind}{' ' + http if http else ''}, "
                           f"{count} operation(s)")
                out.append("      mode: refuse   # every token is refused until an issuer "
                           "below serves this scheme: then delete this line")
                issuers += self._issuer_template(name, scheme)
                self.decisions.append(f"auth.issuers: who issues the tokens of {where}; "
                                      f"until then auth.schemes.{name} refuses them")
            elif kind == "apiKey":
                out.append(f"    {_q(name)}:   # API key in {scheme.get('in')} "
                           f"{_q(str(scheme.get('name')))}, {count} operation(s)")
                out.append("      mode: verify   # keys from `apishield keys create --name "
                           "<client>`; your API's own keys: mode: delegate")
                if scheme.get("in") == "query":
                    out.append("      # in the query string a key ends up in access logs "
                               "and browser history: prefer a header")
                self.decisions.append(f"auth.schemes.{name}: apishield's API keys (verify) "
                                      "or your API's own (delegate)")
            elif http == "basic":
                out.append(f"    {_q(name)}:   # HTTP Basic, {count} operation(s)")
                out.append("      mode: verify   # users from `apishield users create "
                           "<name>`; your API's own passwords: mode: delegate")
                self.decisions.append(f"auth.schemes.{name}: apishield's users (verify) or "
                                      "your API's own passwords (delegate)")
            elif kind == "mutualTLS":
                out.append(f"    {_q(name)}:   # client certificates, {count} operation(s)")
                out.append("      mode: refuse   # set tls.client_ca and tls.client_cert "
                           "(docs/tls.md), then delete this line")
                self.decisions.append(f"tls.client_ca: the CA of the client certificates of "
                                      f"{where}; until then it is refused")
            else:
                out.append(f"    {_q(name)}:   # HTTP {http or kind}, {count} operation(s)")
                out.append("      mode: refuse   # apishield cannot verify it; `mode: "
                           "delegate` lets your API verify it (docs/authentication.md)")
                self.decisions.append(f"auth.schemes.{name}: refused; delegate it to your API "
                                      "to accept it")
        if issuers:
            out.append("  # issuers:   # one per token issuer (docs/authentication.md)")
            out += issuers
        out.append("")

    def _issuer_template(self, name: str, scheme: dict[str, Any]) -> list[str]:
        hints: list[str] = []
        if scheme.get("type") == "openIdConnect" and isinstance(
                scheme.get("openIdConnectUrl"), str):
            hints.append(f"discovery from {scheme['openIdConnectUrl']}")
        flows = scheme.get("flows") if scheme.get("type") == "oauth2" else None
        if isinstance(flows, dict):
            for flow_name, flow in flows.items():
                if isinstance(flow, dict):
                    url = flow.get("tokenUrl") or flow.get("authorizationUrl")
                    if isinstance(url, str):
                        hints.append(f"{flow_name} flow at {url}")
        lines = [f"  #   {_issuer_name(name)}:   # serves {name}"
                 + (f"; the contract says: {'; '.join(hints)}" if hints else ""),
                 f"  #     schemes: [{_q(name)}]",
                 "  #     issuer: https://login.example.com/   # the exact `iss` of its tokens",
                 "  #     audiences: [https://api.example.com]   # the `aud` minted for "
                 "this API",
                 "  #     algorithms: [RS256]",
                 "  #     discovery: true   # or jwks_url: https://.../jwks.json, or keys: "
                 "[issuer.pem]"]
        return lines

    def _operations(self) -> None:
        out = self.lines
        unsecured = [op for op in self.contract.operations if op.security is None]
        if not unsecured:
            return
        named = [op for op in unsecured if op.operation_id]
        unnamed = [op for op in unsecured if not op.operation_id]
        out.append("# Operations that declare no security are refused to everyone (403 "
                   "not-public).")
        out.append("# Public ones: public: true. The others: give them a `security` "
                   "requirement in the contract.")
        if named:
            out.append("operations:")
            for op in named:
                out.append(f"  {_q(op.operation_id or '')}: {{public: false}}   # "
                           f"{op.method} {op.path}")
        for op in unnamed:
            out.append(f"# {op.method} {op.path}: no operationId; mark it in the contract "
                       "(x-apishield: {public: true}) to open it")
        out.append("")
        self.decisions.append(f"{len(unsecured)} operation(s) declare no security and are "
                              "refused: make each public or give it a requirement")

    def _rate_limits(self) -> int:
        out = self.lines
        login = [op for op in self.contract.operations if is_login_like(op)]
        out.append("rate_limiting:")
        if login and all(op.operation_id for op in login):
            out.append("  limits:")
            out.append("    # login, token and password-reset-like operations (guessed from "
                       "their names): slows credential stuffing")
            out.append("    - name: login")
            out.append("      pre_auth: true")
            out.append("      key: [ip, operation]")
            out.append("      rate: 10/m")
            out.append("      burst: 5")
            out.append("      operations:")
            for op in login:
                out.append(f"        - {_q(op.operation_id or '')}   # {op.method} {op.path}")
            self.decisions.append(f"rate_limiting.limits.login: {len(login)} operation(s) "
                                  "guessed as login-like; add or remove some")
        elif login:
            out.append("  # login-like operations without an operationId (a limit names "
                       "operations by id):")
            out += [f"  #   {op.method} {op.path}" for op in login]
        out.append("  bans:")
        out.append("    rules:   # repeated failed credentials ban the address for a while")
        out.append("      - {name: brute-force, on: [authn-failure], by: ip, threshold: 20, "
                   "window: 5m, duration: 15m}")
        return len(login)


def _issuer_name(scheme: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", scheme).strip("-").lower()
    return name or "issuer"
