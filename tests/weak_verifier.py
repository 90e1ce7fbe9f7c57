"""A deliberately broken bearer-token verifier on 127.0.0.1, for the probe's token attacks.

Each weakness is a mistake real verifiers made, written the naive way:

- `key-confusion`: the algorithm comes from the token; for HS256 the configured public
  key's PEM text is the HMAC secret (CVE-2016-10555);
- `psychic`: an ECDSA signature of r = s = 0 verifies (CVE-2022-21449, Java 15-18);
- `jwk`: the key is the one embedded in the token's header (CVE-2018-0114);
- `jku` / `x5u`: the key comes from the URL the token names. The probe names
  `https://apishield-probe.invalid/...`, which never resolves; an attacker's real host
  would serve its own key there, so `fetch` here answers those URLs with the probe's public
  key, as that host would (no network is used);
- `alg-none`: an unsigned token is accepted.

Anything else is verified properly (RS256 with the configured key, audience checked).
Accepted requests get 200 `{}`; refused ones 401 `application/problem+json`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt

WEAKNESSES = ("key-confusion", "psychic", "jwk", "jku", "x5u", "alg-none")


def _b64decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


class WeakVerifier(ThreadingHTTPServer):
    daemon_threads = True
    server_address: tuple[str, int]

    def __init__(self, public_pem: bytes, audience: str, weaknesses: set[str],
                 fetch: Callable[[str], dict[str, Any]]) -> None:
        self.public_pem = public_pem
        self.audience = audience
        self.weaknesses = weaknesses
        self.fetch = fetch  # URL -> JWK (what the named host would serve)
        self.accepted: list[str] = []  # which weakness let each accepted token in
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def verify(self, token: str) -> str | None:
        """Which path accepted the token, or None (refused)."""
        try:
            header_part, claims_part, signature_part = token.split(".")
            header = json.loads(_b64decode(header_part))
            signature = _b64decode(signature_part)
        except ValueError:
            return None
        signing_input = f"{header_part}.{claims_part}".encode()
        alg = header.get("alg")
        weak = self.weaknesses
        if alg == "none" and "alg-none" in weak:
            return "alg-none"
        if alg == "HS256" and "key-confusion" in weak:
            mac = hmac.new(self.public_pem, signing_input, hashlib.sha256).digest()
            return "key-confusion" if hmac.compare_digest(mac, signature) else None
        if str(alg).startswith("ES") and "psychic" in weak and signature and not any(
                signature):
            return "psychic"
        for field, kind in (("jwk", "jwk"), ("jku", "jku"), ("x5u", "x5u")):
            if field in header and kind in weak:
                jwk = header["jwk"] if field == "jwk" else self.fetch(header[field])
                key = jwt.PyJWK(jwk, algorithm=alg).key
                try:
                    jwt.api_jws.PyJWS().decode_complete(token, key, algorithms=[alg])
                except jwt.PyJWTError:
                    return None
                return kind
        try:
            jwt.decode(token, self.public_pem, algorithms=["RS256"], audience=self.audience)
        except jwt.PyJWTError:
            return None
        return "valid"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: WeakVerifier

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        scheme, _, token = (self.headers.get("Authorization") or "").partition(" ")
        accepted = self.server.verify(token) if scheme.lower() == "bearer" else None
        if accepted is None:
            status, content_type = 401, "application/problem+json"
            body = b'{"type": "urn:example:unauthorized", "status": 401}'
        else:
            with self.server.lock:
                self.server.accepted.append(accepted)
            status, content_type, body = 200, "application/json", b"{}"
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _answer
    do_TRACE = _answer


def start_weak_verifier(public_pem: bytes, audience: str, weaknesses: set[str],
                        fetch: Callable[[str], dict[str, Any]]) -> WeakVerifier:
    server = WeakVerifier(public_pem, audience, weaknesses, fetch)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return server


def stop_weak_verifier(server: WeakVerifier) -> None:
    server.shutdown()
    server.server_close()
