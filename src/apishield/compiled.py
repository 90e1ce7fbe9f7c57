"""Which modules a compiled build turns into C extensions, and whether this one did.

The request path's modules are plain Python, type-checked with `mypy --strict`, and can be
compiled with mypyc into C extensions: the same source, the same behaviour, about 40% less
CPU per proxied request (bench/RESULTS.md, "mypyc"). A wheel built with
`APISHIELD_COMPILE=1` (setup.py, build_backend/) compiles the modules listed here; an
ordinary install (and every editable install) stays pure Python. Both are tested in CI
(.ci/run), so the fallback is never a stale path.

The list is the per-request work: the transports (the gateway's, and the
middleware's per-request path), the pipeline and its steps, the router, the
counters, the log and metric slots, authentication's cache-hit path. Start-up code (config,
contract loading, the CLI, the admin API) gains nothing from compiling and stays
interpreted, which keeps its tracebacks and monkeypatching as they are.

This module imports nothing: setup.py reads it before any dependency is installed.
"""

from __future__ import annotations

HOT_MODULES: tuple[str, ...] = (
    "apishield.asgi_http",
    "apishield.exchange",
    "apishield.gateway",
    "apishield.abuse.gate",
    "apishield.pipeline",
    "apishield.http.server",
    "apishield.http.upstream",
    "apishield.http.deadlines",
    "apishield.contract.paths",
    "apishield.contract.router",
    "apishield.state.counters",
    "apishield.observe.accesslog",
    "apishield.observe.metrics",
    "apishield.observe.usage",
    "apishield.observe.refusers",
    "apishield.observe.events",
    "apishield.auth.service",
    "apishield.auth.token_cache",
    "apishield.auth.authenticators",
    "apishield.steps.authenticate",
    "apishield.steps.authorize",
    "apishield.steps.client_ip",
    "apishield.steps.concurrency",
    "apishield.steps.cors",
    "apishield.steps.injection",
    "apishield.steps.ip_filter",
    "apishield.steps.libinjection_c",
    "apishield.steps.limits",
    "apishield.steps.rate_limit",
    "apishield.steps.response_cutter",
    "apishield.steps.response_filter",
    "apishield.steps.response_owner",
    "apishield.steps.route",
    "apishield.steps.security_headers",
    "apishield.steps.validate",
)


def compiled_modules() -> list[str]:
    """The listed modules this installation runs as C extensions (imported to find out)."""
    import importlib
    from importlib.machinery import EXTENSION_SUFFIXES

    found = []
    for name in HOT_MODULES:
        path = getattr(importlib.import_module(name), "__file__", None) or ""
        if path.endswith(tuple(EXTENSION_SUFFIXES)):
            found.append(name)
    return found


def build_kind() -> str:
    """`pure Python`, or how many of the hot modules are compiled (a partial build is a bug)."""
    found = compiled_modules()
    if not found:
        return "pure Python"
    return f"mypyc, {len(found)} of {len(HOT_MODULES)} hot modules compiled"
