"""The verified identity the upstream may trust (checklist A8).

Both front ends drop every client-sent header in the `X-Apishield-` namespace (and its
`X_Apishield_` twin) before these are added, so an upstream that reads them reads what
the gateway verified, never what a client wrote. Values are percent-encoded outside
visible ASCII: a `sub` claim holding CR LF must not become a header of its own.
"""

from __future__ import annotations

from functools import lru_cache
from urllib.parse import quote

from apishield.auth.principal import Principal

# visible ASCII except `%` (the escape) and `,` (the list separator of Scopes/Roles)
_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in "%,")


def _encode(value: str) -> bytes:
    return quote(value, safe=_SAFE).encode("ascii")


@lru_cache(maxsize=4096)
def identity_headers(principal: Principal) -> tuple[tuple[bytes, bytes], ...]:
    """Memoized: a cached principal is one object per token or key, so the headers of a
    returning caller cost a dictionary lookup."""
    headers = [(b"x-apishield-subject", _encode(principal.subject))]
    if principal.scopes:
        headers.append((b"x-apishield-scopes",
                        b",".join(_encode(s) for s in sorted(principal.scopes))))
    if principal.roles:
        headers.append((b"x-apishield-roles",
                        b",".join(_encode(r) for r in sorted(principal.roles))))
    if principal.key_id is not None:
        headers.append((b"x-apishield-key-id", _encode(principal.key_id)))
    return tuple(headers)
