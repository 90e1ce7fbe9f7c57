"""Security headers on every response, refusals included (checklist C3).

The header set is compiled once. Upstream values of the headers apishield owns are
replaced, not merged: a weaker upstream policy must not survive the gateway. `Server` and
`X-Powered-By` are removed (fingerprinting). `Cache-Control: no-store` is forced unless
the operation is explicitly public and the upstream chose a cache policy itself.
"""

from __future__ import annotations

from apishield.config import SecurityHeaders
from apishield.exchange import Exchange, Headers


class SecurityHeadersStep:
    name = "security_headers"

    def __init__(self, config: SecurityHeaders, *, tls: bool) -> None:
        added: Headers = []
        if config.hsts == "always" or (config.hsts == "auto" and tls):
            # RFC 6797 7.2: never sent over plain HTTP unless asked for by name.
            value = f"max-age={config.hsts_max_age}"
            if config.hsts_include_subdomains:
                value += "; includeSubDomains"
            added.append((b"strict-transport-security", value.encode()))
        if config.content_security_policy:
            added.append((b"content-security-policy", config.content_security_policy.encode()))
        if config.x_content_type_options:
            added.append((b"x-content-type-options", b"nosniff"))
        if config.referrer_policy:
            added.append((b"referrer-policy", config.referrer_policy.encode()))
        self.added = added
        self.cache_control = config.cache_control.encode() if config.cache_control else None
        self.dropped = frozenset(
            [name for name, _ in added]
            + [name.lower().encode() for name in config.remove]
            + [b"x-request-id"]
            + ([b"cache-control"] if self.cache_control else [])
        )
        # The same header set as head bytes, serialized once (`serialize`, the gateway's)
        self.block = b"".join([b"%b: %b\r\n" % item for item in added])
        self.cache_block = (b"cache-control: %b\r\n" % self.cache_control
                            if self.cache_control is not None else b"")

    def on_response(self, exchange: Exchange, status: int, headers: Headers) -> Headers:
        dropped = self.dropped
        out = [item for item in headers if item[0] not in dropped]
        out.extend(self.added)
        if self.cache_control is not None:
            upstream_policy = _public_cache_policy(exchange, headers)
            if upstream_policy is not None:
                out.append((b"cache-control", upstream_policy))
            else:
                out.append((b"cache-control", self.cache_control))
        out.append((b"x-request-id", exchange.id.encode()))
        return out

    def serialize(self, exchange: Exchange, status: int, headers: Headers) -> bytes:
        """`on_response`'s result as head bytes (`name: value\\r\\n` each, in the same
        order): the gateway writes the head without building the list and joining it
        again; the constant part is one pre-serialized block."""
        dropped = self.dropped
        parts = [b"%b: %b\r\n" % item for item in headers if item[0] not in dropped]
        parts.append(self.block)
        if self.cache_control is not None:
            upstream_policy = _public_cache_policy(exchange, headers)
            parts.append(self.cache_block if upstream_policy is None
                         else b"cache-control: %b\r\n" % upstream_policy)
        parts.append(b"x-request-id: %b\r\n" % exchange.id.encode())
        return b"".join(parts)


def _public_cache_policy(exchange: Exchange, headers: Headers) -> bytes | None:
    """The upstream's own Cache-Control (its last one) when the operation is public: a
    public answer may keep the API's caching policy; anything else gets the gateway's."""
    policy = None
    if exchange.operation is not None and exchange.operation.public:
        for name, value in headers:
            if name == b"cache-control":
                policy = value
    return policy
