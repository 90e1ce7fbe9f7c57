#!/usr/bin/env python3
"""What the JSON body step costs, in a loop (issue 18): `BodyStep.on_body` on the
harness's `post_validate_1k` body (~1 KB, 20 properties, 13 free-text strings) and on its
100 KB twin (500 entries in `lines`, ~1,000 free-text strings), with the injection scan
on (`post_validate_*`) and off (`x-apishield: {injection: false}`, `_noscan`), plus the
step's pieces timed one by one and a cProfile breakdown.

The wrk runs (`bench/run --only validation`) measure the same step in situ, where the
machine's noise is larger than most changes to it; this loop gives their size without
that noise. In situ, Python code runs slower than in a loop (bench/RESULTS.md, issue 2),
so read these figures as a floor.

Measured in `--repeat` alternating rounds; figures are medians over rounds (us per body).

    .venv/bin/python bench/scan_bench.py [--repeat 7] [--number 2000] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import BODY_1K, BODY_100K, validation_contract

from apishield.config import load_config
from apishield.contract.loader import Contract, load_contract
from apishield.exchange import Exchange, Suspend
from apishield.steps import injection, validate

try:
    from apishield.steps import libinjection_c
except ImportError:  # before issue 18
    libinjection_c = None  # type: ignore[assignment]
from apishield.steps.validate import BodyStep

HEADERS = [(b"content-type", b"application/json")]


def prose_body() -> bytes:
    """BODY_1K with its free text written the way people write: apostrophes, `and`,
    `from`, a colon, a semicolon: every string goes past the prefilters to libinjection
    (the harness's text is plain enough that almost none does)."""
    document = json.loads(BODY_1K)
    document["name"] = "O'Brien's small and blue widget"
    document["description"] = ("Our customers' favourite: small and light, made from "
                               "recycled aluminium; shipped in a box (manual included).")
    document["brand"] = "Acme & Sons"
    document["notes"] = "Don't stack more than five boxes; order from the back and keep dry."
    document["tags"] = ["it's small", "blue and light", "from recycling", "a=b"]
    for line in document["lines"]:
        line["label"] = "widget, blue and small (it's the 4\" one)"
        line["note"] = "keep dry; deliver from the loading bay: back of the building"
    return json.dumps(document, separators=(",", ":")).encode()


BODY_PROSE = prose_body()
BODIES = (("1k", BODY_1K), ("1k prose", BODY_PROSE), ("100k", BODY_100K))


def body_step(target: str, directory: Path) -> tuple[BodyStep, Contract]:
    """The body step the gateway builds for a harness target's contract."""
    (directory / "c.json").write_text(json.dumps(validation_contract(target)))
    (directory / "a.yaml").write_text("contract: c.json\n")
    config = load_config(directory / "a.yaml")
    contract = load_contract(config)
    _, step = validate.build(contract, config.validation)
    return step, contract


def exchange_for(contract: Contract, body: bytes) -> Exchange:
    exchange = Exchange("POST", b"/item", b"", HEADERS, "127.0.0.1")
    exchange.operation = next(op for op in contract.operations if op.method == "POST")
    exchange.body = body
    return exchange


def run_step(step: BodyStep, exchange: Exchange) -> None:
    """`on_body` as the pipeline runs it, minus the thread: a body over the off-loop
    threshold (issue 18) suspends, and its validation (what the thread would run) is
    run here, so the figure is its CPU cost (the thread hop is measured apart)."""
    try:
        step.on_body(exchange)
    except Suspend as suspended:
        suspended.owner.check()  # type: ignore[union-attr]


def per_body(fn: Callable[[], Any], number: int) -> float:
    """us per call of `fn`."""
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) / number * 1e6


def cases(steps: dict[str, tuple[BodyStep, Contract]]) -> dict[str, Callable[[], Any]]:
    """name -> a call timed per body."""
    out: dict[str, Callable[[], Any]] = {}
    for size, body in BODIES:
        scan, contract = steps["post_validate_1k"]
        noscan, contract_noscan = steps["post_validate_1k_noscan"]
        ex = exchange_for(contract, body)
        ex_noscan = exchange_for(contract_noscan, body)
        out[f"on_body {size} scan"] = lambda s=scan, e=ex: run_step(s, e)  # type: ignore[misc]
        out[f"on_body {size} noscan"] = (
            lambda s=noscan, e=ex_noscan: run_step(s, e))  # type: ignore[misc]
        # the pieces, on the same body
        document = scan.parse(body, b"application/json")
        shape = scan.shapes[ex.operation.pointer]["application/json"]  # type: ignore[union-attr]
        out[f"  parse {size}"] = lambda s=scan, b=body: s.parse(b, b"application/json")  # type: ignore[misc]
        out[f"  json.loads {size} (no hook)"] = lambda b=body: json.loads(b)  # type: ignore[misc]
        validator = scan.validators[ex.operation.pointer]["application/json"]  # type: ignore[union-attr]
        out[f"  schema {size}"] = lambda v=validator, d=document: list(v.iter_errors(d))  # type: ignore[misc]
        if hasattr(scan, "_walk"):  # issue 18: one walk for the depth cap and the scan
            out[f"  walk: depth+scan {size}"] = (
                lambda s=scan, d=document, sh=shape: s._walk(d, sh, s.detector.check, True))  # type: ignore[misc]
            out[f"  walk: depth only {size}"] = (
                lambda s=scan, d=document: s._walk(d, None, None, True))  # type: ignore[misc]
        else:  # before it (the commits this bench measures against)
            out[f"  walk: scan {size}"] = (
                lambda s=scan, d=document, sh=shape: s._scan(d, sh, [], []))  # type: ignore[misc]
            out[f"  walk: depth only {size}"] = (
                lambda s=scan, d=document: validate._too_deep(d, s.max_depth))  # type: ignore[misc]
    return out


def free_strings(document: Any, shape: Any) -> list[str]:
    """The strings `_scan` hands to the detector (mirrors its walk)."""
    found: list[str] = []

    def walk(value: Any, node: Any) -> None:
        if isinstance(value, str):
            if node is None or node.free_string:
                found.append(value)
        elif isinstance(value, dict):
            for key, item in value.items():
                if node is None or key not in node.unscanned:
                    walk(item, node.properties.get(key) if node is not None else None)
        elif isinstance(value, list):
            for item in value:
                walk(item, node.items if node is not None else None)

    walk(document, shape)
    return found


def detector_counts(step: BodyStep, contract: Contract, body: bytes) -> str:
    """How many strings reach the detector and each of its stages, for one body."""
    document = step.parse(body, b"application/json")
    operation = next(op for op in contract.operations if op.method == "POST")
    texts = free_strings(document, step.shapes[operation.pointer]["application/json"])
    sql = sum(1 for t in texts if injection._maybe_sql(t))
    xss = sum(1 for t in texts if injection._XSS_CHARS.search(t))
    shell = sum(1 for t in texts if injection._SHELL_CHARS.search(t))
    return (f"{len(texts)} free strings; past the prefilters: sql {sql}, xss {xss}, "
            f"shell {shell}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=7, help="alternating rounds")
    parser.add_argument("--number", type=int, default=2000,
                        help="calls per round for 1 KB (100 KB: a hundredth)")
    parser.add_argument("--profile", action="store_true", help="print cProfile breakdowns")
    parser.add_argument("--only", default="", help="run the cases whose name has this")
    parser.add_argument("--dict-api", action="store_true",
                        help="libinjection through its Python (dict) API, not the C calls")
    args = parser.parse_args()
    if args.dict_api and libinjection_c is not None:
        # the name the detector calls (a bench-only switch: the gateway has none)
        injection.binding = lambda: libinjection_c.DICT_API

    with tempfile.TemporaryDirectory() as tmp:
        steps = {}
        for target in ("post_validate_1k", "post_validate_1k_noscan"):
            directory = Path(tmp) / target
            directory.mkdir()
            steps[target] = body_step(target, directory)
        timed = {name: fn for name, fn in cases(steps).items() if args.only in name}
        scan, contract = steps["post_validate_1k"]
        print(f"bodies: 1k = {len(BODY_1K):,} B, 1k prose = {len(BODY_PROSE):,} B, "
              f"100k = {len(BODY_100K):,} B")
        for size, body in BODIES:
            print(f"  {size}: {detector_counts(scan, contract, body)}")
        print("libinjection binding:",
              injection.binding().kind if libinjection_c is not None else "dict")

        for _size, body in BODIES:  # every body passes: the loop times the step, not a refusal
            run_step(scan, exchange_for(contract, body))
        rounds: dict[str, list[float]] = {name: [] for name in timed}
        for _ in range(args.repeat):
            for name, fn in timed.items():
                number = args.number // 100 if "100k" in name else args.number
                fn()  # warm
                rounds[name].append(per_body(fn, max(number, 5)))
        print(f"\nus per body, median of {args.repeat} rounds (min..max):")
        for name, values in rounds.items():
            print(f"  {name:<34} {statistics.median(values):>10.1f}"
                  f"   ({min(values):.1f}..{max(values):.1f})")

        if args.profile:
            for size, body, number in (("1k", BODY_1K, args.number),
                                       ("1k prose", BODY_PROSE, args.number),
                                       ("100k", BODY_100K, max(args.number // 100, 5))):
                exchange = exchange_for(contract, body)
                profiler = cProfile.Profile()
                profiler.enable()
                for _ in range(number):
                    run_step(scan, exchange)
                profiler.disable()
                out = io.StringIO()
                stats = pstats.Stats(profiler, stream=out)
                stats.sort_stats("tottime").print_stats(14)
                print(f"\ncProfile, on_body {size} scan x {number} (tottime order):")
                print("\n".join(line for line in out.getvalue().splitlines()
                                if line.strip() and not line.startswith("   Ordered")))


if __name__ == "__main__":
    main()
