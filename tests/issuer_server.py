"""A real token issuer for the auth tests, over HTTP on 127.0.0.1 (standard library +
`cryptography` + PyJWT).

It serves what an OIDC provider serves to a resource server: the discovery document
(`/.well-known/openid-configuration`), the key set (`/jwks.json`, with a settable
`Cache-Control: max-age`) and RFC 7662 introspection (`/introspect`, HTTP Basic client
authentication, answers from `server.tokens`). It counts requests per path
(`server.count(path)`), can rotate its keys (`rotate()`: a new key, the old kid gone) and
go down (`server.down = True`: 503; `"close"`: connection closed without an answer).

It also mints tokens: well-formed ones with PyJWT (`mint`), and malicious ones by hand
(`forge`: any header and payload bytes, any signature; `sign_raw`: a correct signature
over hand-written header/payload bytes, e.g. with duplicate claims).
"""

from __future__ import annotations

import base64
import json
import ssl
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote_plus

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

AUDIENCE = "https://api.example.test"
CLIENT_ID = "gateway"
CLIENT_SECRET = "s3cr3t:with/odd+chars"  # a test fixture
HS_SECRET = b"0123456789abcdef0123456789abcdef-hs256-test-secret"

_RSA_POOL: list[rsa.RSAPrivateKey] = []  # RSA generation is slow: reuse across servers
_pool_lock = threading.Lock()


def b64(data: bytes) -> str:
    """base64url without padding (RFC 7515 2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _json(value: dict[str, Any] | bytes) -> bytes:
    return value if isinstance(value, bytes) else json.dumps(value, separators=(",", ":")).encode()


def rsa_key(index: int) -> rsa.RSAPrivateKey:
    """The index-th pooled RSA-2048 key (generated once per test session)."""
    with _pool_lock:
        while len(_RSA_POOL) <= index:
            _RSA_POOL.append(rsa.generate_private_key(public_exponent=65537, key_size=2048))
        return _RSA_POOL[index]


def private_key(alg: str, fresh: bool = False) -> Any:
    """A new private key for `alg` (RSA from the pool unless `fresh`)."""
    if alg.startswith(("RS", "PS")):
        if fresh:
            return rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return rsa_key(0)
    if alg == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if alg == "ES384":
        return ec.generate_private_key(ec.SECP384R1())
    if alg == "ES512":
        return ec.generate_private_key(ec.SECP521R1())
    if alg == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    if alg == "Ed448":
        return ed448.Ed448PrivateKey.generate()
    raise ValueError(alg)


@dataclass
class SigningKey:
    kid: str
    alg: str  # the JWS alg it signs with ("Ed448" keys sign as EdDSA)
    private: Any
    publish_alg: bool = True  # put `alg` in the JWK

    @property
    def jws_alg(self) -> str:
        return "EdDSA" if self.alg == "Ed448" else self.alg

    @property
    def public(self) -> Any:
        return self.private.public_key()

    def jwk(self) -> dict[str, Any]:
        algorithm = jwt.get_algorithm_by_name(self.jws_alg)
        data = algorithm.to_jwk(self.public, as_dict=True)
        data.update(kid=self.kid, use="sig")
        if self.publish_alg:
            data["alg"] = self.jws_alg
        return data

    def public_pem(self) -> bytes:
        return self.public.public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)


def forge(header: dict[str, Any] | bytes, payload: dict[str, Any] | bytes,
          signature: bytes = b"") -> str:
    """A compact JWS from arbitrary parts (nothing checked, nothing signed)."""
    return f"{b64(_json(header))}.{b64(_json(payload))}.{b64(signature)}"


def sign_raw(header: dict[str, Any] | bytes, payload: dict[str, Any] | bytes, key: Any,
             alg: str) -> str:
    """A compact JWS with a genuine `alg` signature over exactly these header and payload
    bytes (PyJWT's algorithm objects do the signing; `key` is a private key or bytes)."""
    signing_input = f"{b64(_json(header))}.{b64(_json(payload))}"
    signature = jwt.get_algorithm_by_name(alg).sign(signing_input.encode(), key)
    return f"{signing_input}.{b64(signature)}"


class IssuerHandler(BaseHTTPRequestHandler):
    server: IssuerServer

    def log_message(self, format: str, *args: Any) -> None:
        """Silent."""

    def _send(self, status: int, body: bytes, content_type: str = "application/json",
              headers: dict[str, str] | None = None, length: bool = True) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if length:  # else the body ends when the connection closes (HTTP/1.0)
            self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _gate(self) -> bool:
        """Count the request; answer 503 or drop the connection when down."""
        server = self.server
        path = self.path.split("?", 1)[0]
        with server.lock:
            server.counts[path] += 1
        if server.delay:
            time.sleep(server.delay)
        if server.down == "close":
            self.close_connection = True
            self.connection.close()
            return False
        if server.down:
            self._send(503, b'{"error":"down"}')
            return False
        return True

    def do_GET(self) -> None:
        if not self._gate():
            return
        server = self.server
        path = self.path.split("?", 1)[0]
        if path == "/.well-known/openid-configuration":
            self._send(200, _json(server.discovery()))
        elif path == "/jwks.json":
            if server.jwks_override is not None:
                body, content_type = server.jwks_override
                self._send(200, body, content_type, length=not server.omit_length)
                return
            headers = {}
            if server.max_age is not None:
                headers["Cache-Control"] = f"public, max-age={server.max_age}"
            self._send(200, _json(server.jwks()), headers=headers)
        elif path == "/redirect":
            self.send_response(302)
            self.send_header("Location", server.redirect_to)
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self._send(404, b'{"error":"not found"}')

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        if not self._gate():
            return
        server = self.server
        if self.path != "/introspect":
            self._send(404, b'{"error":"not found"}')
            return
        if not server.check_client(self.headers.get("Authorization", "")):
            self._send(401, b'{"error":"invalid_client"}',
                       headers={"WWW-Authenticate": 'Basic realm="issuer"'})
            return
        form = parse_qs(body.decode(), strict_parsing=False)
        token = (form.get("token") or [""])[0]
        with server.lock:
            server.introspected.append(token)
            answer = server.tokens.get(token, {"active": False})
        self._send(200, _json(answer))


class IssuerServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        super().__init__(("127.0.0.1", 0), IssuerHandler)
        scheme = "http"
        if tls is not None:  # the handshake runs in accept(), in the serving thread
            self.socket = tls.wrap_socket(self.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self.server_address[1]}"
        self.issuer = self.url  # the `iss` it mints and announces
        self.discovery_issuer: str | None = None  # announce another issuer (attack test)
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.max_age: int | None = None
        self.down: bool | str = False
        self.delay = 0.0
        self.jwks_override: tuple[bytes, str] | None = None  # (body, content type)
        self.omit_length = False  # send jwks_override without Content-Length
        self.redirect_to = ""
        self.keys: dict[str, SigningKey] = {}
        self.tokens: dict[str, dict[str, Any]] = {}  # introspection answers
        self.introspected: list[str] = []
        self.client_id = CLIENT_ID
        self.client_secret = CLIENT_SECRET
        for alg in ("RS256", "ES256", "EdDSA"):
            self.add_key(alg)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Silent: `down = "close"` makes writes fail on purpose."""

    # -- keys --------------------------------------------------------------------------

    def add_key(self, alg: str, *, kid: str | None = None, fresh: bool = False,
                publish_alg: bool = True) -> SigningKey:
        key = SigningKey(kid or f"{alg.lower()}-{uuid.uuid4().hex[:8]}", alg,
                         private_key(alg, fresh), publish_alg)
        with self.lock:
            self.keys[key.kid] = key
        return key

    def key(self, alg: str) -> SigningKey:
        """The current key signing with `alg`."""
        return next(k for k in reversed(list(self.keys.values())) if k.jws_alg == alg)

    def rotate(self, alg: str = "ES256") -> tuple[str, str]:
        """A new key for `alg`, the old one removed: (old kid, new kid)."""
        old = self.key(alg)
        new = self.add_key(alg, fresh=True)
        with self.lock:
            del self.keys[old.kid]
        return old.kid, new.kid

    def jwks(self) -> dict[str, Any]:
        with self.lock:
            return {"keys": [key.jwk() for key in self.keys.values()]}

    def discovery(self) -> dict[str, Any]:
        return {
            "issuer": self.discovery_issuer or self.issuer,
            "jwks_uri": f"{self.url}/jwks.json",
            "introspection_endpoint": f"{self.url}/introspect",
            "id_token_signing_alg_values_supported": ["RS256", "ES256", "EdDSA"],
        }

    def count(self, path: str) -> int:
        with self.lock:
            return self.counts[path]

    # -- tokens ------------------------------------------------------------------------

    def claims(self, **overrides: Any) -> dict[str, Any]:
        now = int(time.time())
        claims: dict[str, Any] = {"iss": self.issuer, "aud": AUDIENCE, "sub": "alice",
                                  "iat": now, "exp": now + 300, "scope": "read write"}
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}

    def mint(self, alg: str = "RS256", *, key: SigningKey | None = None,
             headers: dict[str, Any] | None = None, kid: Any = ..., **claims: Any) -> str:
        """A well-formed token signed by the current `alg` key; claims override the
        defaults (None removes one), `kid=None` leaves the kid out."""
        key = key or self.key(alg)
        header = {"kid": key.kid, "typ": "JWT"}
        if kid is not ...:
            header.pop("kid")
            if kid is not None:
                header["kid"] = kid
        header.update(headers or {})
        return jwt.encode(self.claims(**claims), key.private, algorithm=key.jws_alg,
                          headers=header)

    def check_client(self, authorization: str) -> bool:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, _, password = base64.b64decode(value).decode().partition(":")
        except ValueError:
            return False
        return unquote_plus(user) == self.client_id and unquote_plus(
            password) == self.client_secret


def start_issuer(tls: ssl.SSLContext | None = None) -> IssuerServer:
    """An issuer serving on a thread; `tls`: a server-side context to serve https."""
    server = IssuerServer(tls)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                     daemon=True).start()
    return server


def stop_issuer(server: IssuerServer) -> None:
    server.shutdown()
    server.server_close()


@contextmanager
def running_issuer(tls: ssl.SSLContext | None = None) -> Iterator[IssuerServer]:
    server = start_issuer(tls)
    try:
        yield server
    finally:
        stop_issuer(server)
