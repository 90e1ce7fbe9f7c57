"""The admin API: health, readiness, metrics, the effective config, reload.

`app.py` answers admin requests without knowing how they arrived (framework-free: method,
path, credentials in; status, headers, body out), so the two front ends serve the same
API: `listener.py` is the gateway's own small HTTP listener (`admin.host:admin.port`),
`asgi.py` mounts it under `admin.path` of the app the middleware wraps. `masking.py`
renders the effective config without secrets.

May import: `apishield.pipeline` and everything below it; never the front ends (they hand
the app what it needs as callables: the current pipeline, readiness, reload).
"""
