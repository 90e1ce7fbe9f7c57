#!/usr/bin/env python3
"""The ASGI middleware against its Python peers, one run (stdlib only; issue 18).

Targets, each an app of bench/middleware_apps.py served by uvicorn (1 worker, uvloop,
httptools, access log off) from a separate venv with the peers pinned (PEER_PINS) and
apishield installed from this checkout:

  starlette        bare Starlette routes, no validation: the reference (ratio 1.0)
  apishield        ApiShieldMiddleware around that same app, the whole contract check
                   (routing, parameters, body schema + injection scan, response filter,
                   security headers, request id), access log to a file
  apishield_nolog  the same with `access_log: {enabled: false}`
  fastapi          FastAPI + pydantic models equivalent to the schema
  connexion        Connexion 3 AsyncApp from the same OpenAPI document
  openapi_core     openapi-core's Starlette middleware around the bare app

Operations (the same for all): `GET /items/42?limit=10` and `POST /items` with bench/
harness.py's 1 KB JSON body (post_validate_1k: same schema, same bytes). Before measuring,
every target must answer the valid requests with 2xx and the expected body, and every
validating target must refuse the two required invalid ones with a 4xx; a table of which
target refuses which invalid request is recorded. Then wrk -t1 -c50 in alternating rounds
(app on CPU 0, wrk on CPU 1), GET and POST separately; ratios are medians of per-round rps
ratios to `starlette` measured in the same round. See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from harness import (  # bench/ is sys.path[0] when run as a script
    BODY_1K,
    FULL_RESPONSE_SCHEMA,
    HOST,
    ITEM_SCHEMA,
    RESULTS_DIR,
    UPSTREAM_BODY,
    BenchError,
    Load,
    Pinning,
    Processes,
    Service,
    add_wrk_arguments,
    apishield_build,
    decide_pinning,
    ensure_tools,
    free_ports,
    http_get,
    log,
    machine_info,
    median,
    proc_tree_cpu_seconds,
    run,
    run_guarded,
    settle_wrk_arguments,
    to_yaml,
    wait_port,
    wrk_script,
)

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
APPS = BENCH_DIR / "middleware_apps.py"

TARGETS = ("starlette", "apishield", "apishield_nolog", "fastapi", "connexion", "openapi_core")
BASELINE = "starlette"
VALIDATING = tuple(t for t in TARGETS if t != BASELINE)
# The goals for the middleware (ratios to bare Starlette, same run).
GOALS = {"get": 0.6, "post": 0.5}
ROUNDS = 3  # default rounds

# The peers as a user installs them (late-2026 releases). openapi-core 0.23.1's `starlette`
# extra caps Starlette below 1.1 while FastAPI 0.163 needs 1.x: openapi-core is installed
# without the extra and its one extra dependency (aioitertools) is pinned here, so every
# target runs on the same Starlette. uvicorn, uvloop and httptools as the project pins them.
PEER_PINS = (
    "starlette==1.10.0",
    "fastapi==0.163.2",
    "pydantic==2.14.3",
    "connexion[uvicorn]==3.3.0",
    "openapi-core==0.23.1",
    "aioitertools==0.13.0",
    "uvicorn==0.54.0",
    "uvloop==0.23.0",
    "httptools==0.9.0",
)
DEFAULT_VENV = Path.home() / ".cache" / "apishield" / "bench-middleware-venv"
# `--wheel`: a venv of its own, so a run of a built wheel never swaps the apishield that
# another checkout's editable run is importing from the default one
DEFAULT_WHEEL_VENV = DEFAULT_VENV.with_name(DEFAULT_VENV.name + "-wheel")

GET_PATH = "/items/42?limit=10"
POST_PATH = "/items"
CREATED_BODY = {"id": 1001, "status": "created"}
OPS = ("get", "post")
# Answers of the apishield targets must carry these (security headers and the request id).
APISHIELD_HEADERS = ("x-request-id", "x-content-type-options", "content-security-policy")


# --------------------------------------------------------------------------- the app


def contract() -> dict:
    """The one OpenAPI document: apishield, Connexion and openapi-core read it; FastAPI's
    models say the same in pydantic (bench/middleware_apps.py). OpenAPI 3.0.3: the version
    all three read."""
    return {
        "openapi": "3.0.3",
        "info": {"title": "bench middleware", "version": "1"},
        "security": [],
        "paths": {
            "/items/{itemId}": {"get": {
                "operationId": "getItem",
                "parameters": [
                    {"name": "itemId", "in": "path", "required": True,
                     "schema": {"type": "integer", "minimum": 1, "maximum": 1000000}},
                    {"name": "limit", "in": "query", "required": False,
                     "schema": {"type": "integer", "minimum": 1, "maximum": 100}},
                ],
                "responses": {"200": {"description": "ok", "content": {
                    "application/json": {"schema": FULL_RESPONSE_SCHEMA}}}},
            }},
            "/items": {"post": {
                "operationId": "createItem",
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/Item"}}}},
                "responses": {"201": {"description": "created", "content": {
                    "application/json": {"schema": {
                        "type": "object", "required": ["id", "status"],
                        "properties": {"id": {"type": "integer"},
                                       "status": {"type": "string", "maxLength": 20}}}}}}},
            }},
        },
        "components": {"schemas": {"Item": ITEM_SCHEMA}},
    }


def apishield_config(target: str, d: Path) -> dict:
    """Everything on by default (request id, security headers, metrics, the injection scan,
    response filtering of the declared 200); only the access log differs."""
    log_section = ({"enabled": False} if target == "apishield_nolog"
                   else {"path": str(d / "access.log")})
    return {"contract": "openapi.yaml", "access_log": log_section}


def _body(**changes) -> bytes:
    doc = json.loads(BODY_1K)
    doc.update(changes)
    return json.dumps(doc, separators=(",", ":")).encode()


# name -> (method, path, body, content type, why it is invalid). The first two are required
# to be refused (4xx) by every validating target before anything is measured.
REQUIRED_INVALID = ("get_path_not_int", "post_extra_property")
INVALID_REQUESTS: dict[str, tuple[str, str, bytes | None, str | None, str]] = {
    "get_path_not_int": ("GET", "/items/abc?limit=10", None, None,
                         "a string where the integer path parameter is"),
    "post_extra_property": ("POST", POST_PATH, _body(is_admin=True), "application/json",
                            "an undeclared property (additionalProperties: false)"),
    "get_query_not_int": ("GET", "/items/42?limit=ten", None, None,
                          "a string where the integer query parameter is"),
    "get_query_out_of_range": ("GET", "/items/42?limit=1000", None, None,
                               "limit above its maximum (100)"),
    "get_query_undeclared": ("GET", "/items/42?limit=10&debug=1", None, None,
                             "a query parameter the operation does not declare"),
    "post_int_as_string": ("POST", POST_PATH, _body(quantity="120"), "application/json",
                           "\"120\" (a string) where an integer is declared"),
    "post_bool_as_string": ("POST", POST_PATH, _body(in_stock="yes"), "application/json",
                            "\"yes\" where a boolean is declared"),
    "post_enum": ("POST", POST_PATH, _body(currency="XXX"), "application/json",
                  "a value outside the enum"),
    "post_null_optional": ("POST", POST_PATH, _body(brand=None), "application/json",
                           "null for an optional string (not nullable)"),
    "post_sql_injection": ("POST", POST_PATH, _body(notes="1' OR '1'='1' -- "),
                           "application/json", "a SQL injection in a free-text string"),
    "post_xss": ("POST", POST_PATH, _body(description="<script>alert(1)</script>"),
                 "application/json", "a script tag in a free-text string"),
    "post_duplicate_key": ("POST", POST_PATH,
                           b'{"sku":"WID-0042",' + BODY_1K[1:], "application/json",
                           "a duplicate JSON key (which value does the app see?)"),
    "post_wrong_media_type": ("POST", POST_PATH, BODY_1K, "text/plain",
                              "an undeclared media type (text/plain)"),
    "post_not_json": ("POST", POST_PATH, b'{"sku": "WID-0042",', "application/json",
                      "a truncated JSON document"),
}


# --------------------------------------------------------------------------- peer venv


def pins_digest() -> str:
    """What the venv is built from: the peer pins, apishield's own dependencies (its
    pyproject) and the interpreter. A change to any of them rebuilds it."""
    h = hashlib.sha256()
    h.update("\n".join(PEER_PINS).encode())
    h.update((REPO / "pyproject.toml").read_bytes())
    h.update(sys.version.encode())
    return h.hexdigest()


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_venv(venv: Path, rebuild: bool, wheel: Path | None = None) -> Path:
    """The peer venv, built once and reused while the pins stay the same. apishield is
    installed editable from this checkout (a venv built by another checkout is pointed
    here again with a quick `--no-deps` reinstall), or from `wheel` (e.g. the compiled
    build, docs/performance.md), reinstalled whenever the file's content differs from
    what the venv has: the project's own venv and pyproject are not touched."""
    venv.parent.mkdir(parents=True, exist_ok=True)
    # Two checkouts running the bench at once must not build the same venv together.
    with open(venv.parent / f".{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _ensure_venv(venv, rebuild, wheel)


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _ensure_venv(venv: Path, rebuild: bool, wheel: Path | None) -> Path:
    stamp = venv / "apishield-bench-pins.sha256"
    wheel_stamp = venv / "apishield-bench-wheel.sha256"  # the wheel installed, if any
    digest = pins_digest()
    py = venv_python(venv)
    fresh = (not rebuild and py.exists() and stamp.exists()
             and stamp.read_text().strip() == digest)
    apishield = [str(wheel)] if wheel is not None else ["-e", str(REPO)]
    if not fresh:
        log(f"building the peer venv {venv} (pins changed or first run; needs PyPI) ...")
        if venv.exists():
            if any(venv.iterdir()) and not (venv / "pyvenv.cfg").exists():
                raise BenchError(f"--venv {venv} exists and is not a venv: not replacing it; "
                                 "give a new or empty directory")
            shutil.rmtree(venv)
        out = run([sys.executable, "-m", "venv", str(venv)], timeout=300)
        if out.returncode != 0:
            raise BenchError(f"python -m venv {venv} failed:\n{out.stderr[-3000:]}")
        for argv in ([str(py), "-m", "pip", "install", "-q", *PEER_PINS],
                     [str(py), "-m", "pip", "install", "-q", *apishield]):
            out = run(argv, timeout=1800)
            if out.returncode != 0:
                raise BenchError(f"{' '.join(argv)} failed:\n{out.stderr[-3000:]}")
        stamp.write_text(digest + "\n")
        if wheel is not None:
            wheel_stamp.write_text(file_digest(wheel) + "\n")
    if wheel is not None:
        wanted = file_digest(wheel)
        if not wheel_stamp.exists() or wheel_stamp.read_text().strip() != wanted:
            log(f"installing {wheel} into the peer venv ...")
            argv = [str(py), "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall",
                    str(wheel)]
            out = run(argv, timeout=600)
            if out.returncode != 0:
                raise BenchError(f"{' '.join(argv)} failed:\n{out.stderr[-3000:]}")
            wheel_stamp.write_text(wanted + "\n")
        return py
    wheel_stamp.unlink(missing_ok=True)
    where = run([str(py), "-c",
                 "import os, apishield; print(os.path.realpath(apishield.__file__))"],
                timeout=60)
    src = str((REPO / "src").resolve())
    if where.returncode != 0 or not where.stdout.strip().startswith(src):
        log(f"pointing the peer venv's apishield at {REPO} ...")
        out = run([str(py), "-m", "pip", "install", "-q", "--no-deps", "-e", str(REPO)],
                  timeout=600)
        if out.returncode != 0:
            raise BenchError(f"pip install -e {REPO} failed:\n{out.stderr[-3000:]}")
    return py


def venv_versions(py: Path) -> dict:
    out = run([str(py), "-m", "pip", "freeze", "--exclude-editable"], timeout=120)
    versions = {}
    for line in out.stdout.splitlines():
        name, sep, version = line.partition("==")
        if sep:
            versions[name.lower()] = version
    return versions


# --------------------------------------------------------------------------- targets


@dataclass
class PathLoad(Load):
    """harness.Load with the request path of the operation (harness.Load sends /item)."""

    path: str = "/"

    def argv(self, port: int, duration: float, scheme: str = "http",
             script: Path | None = None) -> list[str]:
        argv = super().argv(port, duration, scheme, script)
        argv[-1] = f"{scheme}://{HOST}:{port}{self.path}"
        return argv


def start_targets(procs: Processes, tmp: Path, pin: Pinning, py: Path,
                  targets: list[str]) -> dict[str, Service]:
    services: dict[str, Service] = {}
    doc = "\n".join(to_yaml(contract())) + "\n"
    for t, port in zip(targets, free_ports(len(targets)), strict=True):
        d = tmp / t
        d.mkdir(parents=True)
        (d / "openapi.yaml").write_text(doc)
        extra: dict = {"dir": d}
        if t.startswith("apishield"):
            cfg = apishield_config(t, d)
            (d / "apishield.yaml").write_text("\n".join(to_yaml(cfg)) + "\n")
            if t == "apishield":
                extra["access_log"] = d / "access.log"
        argv = [*pin.prefix("proxy"), str(py), str(APPS), "--target", t, "--port", str(port),
                "--dir", str(d)]
        stderr_path = d / "stderr.log"
        with open(stderr_path, "wb") as err, open(d / "stdout.log", "wb") as out:
            proc = procs.start(t, argv, out, err, cwd=d)
        services[t] = Service(t, proc, port, stderr_path, pin.proxy_cpu if pin.pinned else None,
                              extra=extra)
    for svc in services.values():
        wait_port(svc, 60)
    return services


# --------------------------------------------------------------------------- checks


def _json(body: bytes):
    try:
        return json.loads(body)
    except ValueError:
        return None


def check(services: dict[str, Service]) -> dict:
    """Valid requests: 200 with the GET body, 201 with the created body (any target: a
    wrong answer would make its speed meaningless); the apishield targets' answers carry
    the security headers and the request id, and `apishield` wrote access-log lines.
    Invalid requests: every one sent to every target and its status recorded; the
    REQUIRED_INVALID ones must be a 4xx from every validating target."""
    failures: list[str] = []
    valid: dict[str, dict] = {}
    refusals: dict[str, dict[str, int]] = {name: {} for name in INVALID_REQUESTS}
    for t, svc in services.items():
        status, headers, body = http_get(svc.port, GET_PATH)
        post_status, _, post_body = http_get(svc.port, POST_PATH, method="POST", body=BODY_1K,
                                             content_type="application/json")
        valid[t] = {"get": status, "post": post_status,
                    "get_response_headers": sorted(headers)}
        if status != 200 or _json(body) != json.loads(UPSTREAM_BODY):
            failures.append(f"{t}: GET {GET_PATH} answered {status} {body[:300]!r}, "
                            "expected 200 and the item")
        if post_status not in (200, 201) or _json(post_body) != CREATED_BODY:
            failures.append(f"{t}: POST {POST_PATH} (the 1 KB body) answered {post_status} "
                            f"{post_body[:300]!r}, expected 201 and {CREATED_BODY}")
        for name, (method, path, req_body, ctype, _why) in INVALID_REQUESTS.items():
            st, _, answer = http_get(svc.port, path, method=method, body=req_body,
                                     content_type=ctype)
            refusals[name][t] = st
            if name in REQUIRED_INVALID and t in VALIDATING and not 400 <= st < 500:
                failures.append(f"{t}: {name} ({method} {path}) answered {st} "
                                f"{answer[:200]!r}, expected a 4xx")
    for t, svc in services.items():  # the whole check is on: headers, request id, log
        if not t.startswith("apishield"):
            continue
        missing = [h for h in APISHIELD_HEADERS if h not in valid[t]["get_response_headers"]]
        if missing:
            failures.append(f"{t}: the answer to GET {GET_PATH} lacks {', '.join(missing)}")
        access_log = svc.extra.get("access_log")
        if access_log is not None:
            time.sleep(0.3)  # lines are written in batches, at most every 100 ms
            lines = access_log.read_bytes().count(b"\n") if access_log.exists() else 0
            valid[t]["access_log_lines"] = lines
            if lines == 0:
                failures.append(f"{t}: nothing in its access log {access_log} after the checks")
    if failures:
        raise BenchError("checks before measuring failed:\n  " + "\n  ".join(failures))
    return {"valid": valid, "refusals": refusals,
            "invalid_requests": {n: v[4] for n, v in INVALID_REQUESTS.items()},
            "refused_count": {t: sum(1 for r in refusals.values() if 400 <= r.get(t, 0) < 500)
                              for t in services}}


# --------------------------------------------------------------------------- measuring


def measure(svc: Service, load: PathLoad, duration: float, warmup: float,
            script: Path | None) -> dict:
    if not svc.alive():
        raise BenchError(f"{svc.name} died (code {svc.proc.returncode}). "
                         f"stderr:\n{svc.stderr_tail()}")
    if warmup > 0:
        load.run(svc.port, warmup, script=script)
    access_log: Path | None = svc.extra.get("access_log")
    if access_log is not None and access_log.exists():
        os.truncate(access_log, 0)  # keeps the temp dir small; the middleware appends
    cpu0 = proc_tree_cpu_seconds(svc.proc.pid)
    t0 = time.monotonic()
    res, _ = load.run(svc.port, duration, script=script)
    wall = time.monotonic() - t0
    cpu1 = proc_tree_cpu_seconds(svc.proc.pid)
    res["app_cpu_pct"] = round(100 * (cpu1 - cpu0) / wall, 1)
    if res.get("requests"):
        res["app_cpu_us_per_request"] = round(1e6 * (cpu1 - cpu0) / res["requests"], 2)
    if not svc.alive():
        raise BenchError(f"{svc.name} died during the run. stderr:\n{svc.stderr_tail()}")
    return res


def summarize(rounds: list[dict], targets: list[str]) -> dict:
    """Per operation and target: medians over rounds of rps, latency, CPU per request, and
    of the per-round ratio to the baseline (and the time it adds per request)."""
    out: dict = {}
    for op in OPS:
        out[op] = {}
        for t in targets:
            runs = [r[op][t] for r in rounds if t in r.get(op, {})]
            if not runs:
                continue
            ratios, added = [], []
            for r in rounds:
                base = r.get(op, {}).get(BASELINE)
                mine = r.get(op, {}).get(t)
                if base and mine and base["rps"] > 0 and mine["rps"] > 0:
                    ratios.append(mine["rps"] / base["rps"])
                    added.append(1e6 / mine["rps"] - 1e6 / base["rps"])
            out[op][t] = {
                "rps_median": median([x["rps"] for x in runs], 1),
                "rps_min": min(x["rps"] for x in runs),
                "rps_max": max(x["rps"] for x in runs),
                "ratio_to_starlette": median(ratios),
                "ratios_per_round": [round(v, 4) for v in ratios],
                "added_us_per_request": median(added, 1),
                "latency_ms_median": {p: median([x["latency_ms"].get(p) for x in runs])
                                      for p in ("p50", "p99")},
                "app_cpu_us_per_request_median": median(
                    [x.get("app_cpu_us_per_request") for x in runs], 2),
                "app_cpu_pct_median": median([x.get("app_cpu_pct") for x in runs], 1),
                "errors_total": sum(x["errors"] for x in runs),
            }
    return out


def goals(summary: dict) -> dict:
    """The issue's goals for the middleware: >= 0.6x on GET, >= 0.5x on POST, and ahead of
    FastAPI's own validation on both."""
    out = {}
    for op, goal in GOALS.items():
        mine = summary.get(op, {}).get("apishield", {}).get("ratio_to_starlette")
        fastapi = summary.get(op, {}).get("fastapi", {}).get("ratio_to_starlette")
        out[op] = {"goal_ratio": goal, "apishield": mine, "fastapi": fastapi,
                   "met": None if mine is None else mine >= goal,
                   "ahead_of_fastapi": None if mine is None or fastapi is None
                   else mine > fastapi}
    return out


def fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def render(result: dict) -> str:
    lines = [f"bench/middleware: the ASGI middleware against its Python peers "
             f"({result['date']}, git {result['machine']['git']})",
             f"load: wrk -t{result['load']['threads']} -c{result['load']['connections']}, "
             f"{result['load']['rounds']} rounds x {result['load']['duration_s']:g} s; "
             f"{result['machine']['pinning']}; load average at start "
             f"{', '.join(f'{x:.2f}' for x in result['machine']['loadavg_at_start'])}"]
    if "apishield_build" in result["machine"]:
        lines.append(f"apishield build: {result['machine']['apishield_build']} "
                     f"({result['machine']['apishield_install']})")
    if result.get("note"):
        lines.append(f"NOTE: {result['note']}")
    for op in OPS:
        rows = result["summary"].get(op, {})
        if not rows:
            continue
        title = (f"GET {GET_PATH}" if op == "get"
                 else f"POST {POST_PATH} ({len(BODY_1K):,} B JSON)")
        lines += ["", title,
                  f"  {'target':<16} {'rps':>9} {'ratio':>7} {'+us/req':>8} {'p50 ms':>7} "
                  f"{'p99 ms':>7} {'cpu us/req':>10} {'errors':>6}"]
        for t, s in rows.items():
            lines.append(
                f"  {t:<16} {fmt(s['rps_median'], ',.0f'):>9} "
                f"{fmt(s['ratio_to_starlette'], '.3f'):>7} "
                f"{fmt(s['added_us_per_request'], ',.0f'):>8} "
                f"{fmt(s['latency_ms_median']['p50'], '.2f'):>7} "
                f"{fmt(s['latency_ms_median']['p99'], '.2f'):>7} "
                f"{fmt(s['app_cpu_us_per_request_median'], ',.1f'):>10} "
                f"{s['errors_total']:>6}")
    for op, g in result.get("goals", {}).items():
        if g["apishield"] is None:
            continue
        lines.append(f"  issue 18 goal, {op.upper()}: apishield {g['apishield']:.2f}x "
                     f"(goal >= {g['goal_ratio']:g}x): {'MET' if g['met'] else 'NOT MET'}; "
                     + ("FastAPI not measured" if g["ahead_of_fastapi"] is None else
                        f"FastAPI {g['fastapi']:.2f}x: "
                        f"{'ahead' if g['ahead_of_fastapi'] else 'behind'}"))
    checks = result["checks"]
    targets = list(checks["refused_count"])
    lines += ["", "what each target refuses (status per invalid request; 4xx = refused)",
              f"  {'request':<24} " + " ".join(f"{t:>15}" for t in targets)]
    for name, by_target in checks["refusals"].items():
        lines.append(f"  {name:<24} " + " ".join(f"{by_target.get(t, '-'):>15}"
                                                 for t in targets))
    lines.append(f"  {'refused (of ' + str(len(checks['refusals'])) + ')':<24} "
                 + " ".join(f"{checks['refused_count'][t]:>15}" for t in targets))
    lines += ["", "invalid requests:"]
    lines += [f"  {n:<24} {why}" for n, why in checks["invalid_requests"].items()]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def benchmark(args, procs: Processes, tmp: Path) -> int:
    if not args.check_only:
        ensure_tools(not args.no_install)
    pin = decide_pinning(args.no_pin)
    if not pin.pinned:
        log(f"NOTE: {pin.note}")
    py = ensure_venv(args.venv, args.rebuild_venv, args.wheel)
    build = apishield_build([str(py), "-m", "apishield"])
    log(f"apishield build: {build} ({args.wheel or 'editable install of ' + str(REPO)})")
    targets = [t for t in TARGETS if not args.only or t in args.only]
    if BASELINE not in targets:
        targets.insert(0, BASELINE)  # every ratio is to it
    services = start_targets(procs, tmp, pin, py, targets)
    checks = check(services)
    for name, by_target in checks["refusals"].items():
        log(f"  {name:<24} " + " ".join(f"{t}={s}" for t, s in by_target.items()))
    if args.check_only:
        print(json.dumps({"ok": True, "targets": targets, **checks}, indent=2))
        log(f"checks passed for {', '.join(targets)}")
        return 0
    machine = machine_info(pin)
    machine.pop("nginx", None)  # harness.machine_info describes bench/run's setup
    machine["pinning"] = (f"apps on CPU {pin.proxy_cpu}; wrk on CPU {pin.load_cpu}"
                          if pin.pinned else pin.note)
    scripts_dir = tmp / "wrk"
    scripts_dir.mkdir()
    post_script = wrk_script(scripts_dir, "post_validate_1k")  # POST, BODY_1K, JSON
    # the path by keyword: Load's fields after `prefix` (pace, pace_dir) come first
    loads = {"get": (PathLoad(args.threads, args.connections, pin.prefix("load"),
                              path=GET_PATH), None),
             "post": (PathLoad(args.threads, args.connections, pin.prefix("load"),
                               path=POST_PATH), post_script)}
    rounds: list[dict] = []
    for i in range(1, args.rounds + 1):
        entry: dict = {"round": i}
        for op in OPS:
            entry[op] = {}
            load, script = loads[op]
            for t in targets:
                res = measure(services[t], load, args.duration, args.warmup, script)
                entry[op][t] = res
                log(f"  round {i}/{args.rounds} {op.upper():<4} {t:<16} {res['rps']:>9,.0f} rps"
                    f"  p99 {res['latency_ms'].get('p99', float('nan')):.2f} ms"
                    f"  cpu {res.get('app_cpu_us_per_request', '-')} us/req"
                    f"{'  ERRORS' if res['errors'] else ''}")
        rounds.append(entry)
    summary = summarize(rounds, targets)
    machine["loadavg_at_end"] = os.getloadavg()
    machine["apishield_build"] = build
    machine["apishield_install"] = (f"wheel {args.wheel} (sha256 {file_digest(args.wheel)})"
                                    if args.wheel else f"editable {REPO}")
    result = {
        "targets": targets,
        "summary": summary,
        "goals": goals(summary),
        "flagged": sorted({t for op in OPS for t, s in summary[op].items()
                           if s["errors_total"]}),
        "checks": checks,
        "rounds": rounds,
        "app": {"get": GET_PATH, "post": POST_PATH, "post_body_bytes": len(BODY_1K),
                "get_body_bytes": len(UPSTREAM_BODY), "contract": contract(),
                "server": "uvicorn, 1 worker, loop=uvloop, http=httptools, access_log off, "
                          "server_header off, lifespan auto"},
        "load": {"tool": "wrk", "threads": args.threads, "connections": args.connections,
                 "duration_s": args.duration, "rounds": args.rounds, "warmup_s": args.warmup},
        "peers": {"pins": list(PEER_PINS), "installed": venv_versions(py),
                  "venv": str(args.venv)},
        "machine": machine,
        "note": args.note,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    table = render(result)
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / f"{args.output}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS_DIR / f"{args.output}.txt").write_text(table)
    print(table, end="")
    log(f"wrote {RESULTS_DIR / (args.output + '.json')} and .txt")
    return 3 if result["flagged"] else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="bench/middleware",
        description="The ASGI middleware against bare Starlette, FastAPI+pydantic, "
                    "Connexion 3 and openapi-core: same app, same requests, one run.")
    add_wrk_arguments(ap, ROUNDS)
    ap.add_argument("--only", type=lambda s: [p.strip() for p in s.split(",") if p.strip()],
                    help=f"comma list of targets ({', '.join(TARGETS)}); starlette is always "
                         "added: every ratio is to it")
    ap.add_argument("--check-only", action="store_true",
                    help="start the targets, run the checks, print the refusal table; no load")
    ap.add_argument("--venv", type=Path,
                    help=f"the peer venv (default {DEFAULT_VENV}; with --wheel "
                         f"{DEFAULT_WHEEL_VENV})")
    ap.add_argument("--wheel", type=Path,
                    help="install apishield from this wheel (e.g. the compiled build: "
                         "APISHIELD_COMPILE=1 pip wheel) instead of editable from this checkout")
    ap.add_argument("--rebuild-venv", action="store_true", help="rebuild the peer venv")
    ap.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    ap.add_argument("--no-install", action="store_true", help="never apt-get install wrk")
    ap.add_argument("--output", default="middleware",
                    help="results name: bench/results/<NAME>.json and .txt (default middleware)")
    ap.add_argument("--note", help="a note stored with the results (e.g. 'busy machine')")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    ap.add_argument("--max-seconds", type=float,
                    help="abort the whole run after this long (default: computed from the plan)")
    args = ap.parse_args(argv)
    settle_wrk_arguments(ap, args, ROUNDS)
    if args.wheel is not None:
        args.wheel = args.wheel.resolve()
        if args.wheel.suffix != ".whl" or not args.wheel.is_file():
            ap.error(f"--wheel {args.wheel}: not a wheel file (build one with "
                     "`APISHIELD_COMPILE=1 pip wheel --no-deps -w DIR .`)")
    if args.venv is None:
        args.venv = DEFAULT_VENV if args.wheel is None else DEFAULT_WHEEL_VENV
    if not args.duration.is_integer() or not args.warmup.is_integer():
        ap.error("--duration and --warmup are whole seconds (wrk -d takes no fractions)")
    unknown = [t for t in args.only or [] if t not in TARGETS]
    if unknown:
        ap.error(f"--only: unknown target(s) {', '.join(unknown)}; use {', '.join(TARGETS)}")
    # A first run builds the venv (minutes); measuring is rounds x 2 ops x targets x run.
    limit = args.max_seconds or (
        2400 + args.rounds * len(OPS) * len(TARGETS) * (args.duration + args.warmup + 10))

    def run(procs: Processes, tmp: Path) -> int:
        log(f"temp dir: {tmp}")
        return benchmark(args, procs, tmp)

    return run_guarded("bench/middleware", limit, "apishield-bench-mw-", args.keep_tmp, run)

if __name__ == "__main__":
    sys.exit(main())
