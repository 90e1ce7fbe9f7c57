"""apishield: contract-first API security, as a gateway or as ASGI middleware."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["ApiShieldMiddleware", "__version__"]

if TYPE_CHECKING:
    from apishield.middleware import ApiShieldMiddleware


def __getattr__(name: str) -> Any:
    # Lazy: `import apishield` for the CLI must not pay for the middleware's imports.
    if name == "ApiShieldMiddleware":
        from apishield.middleware import ApiShieldMiddleware

        return ApiShieldMiddleware
    raise AttributeError(name)
