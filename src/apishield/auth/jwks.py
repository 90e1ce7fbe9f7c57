"""An issuer's signing keys: static (files, shared secret) or fetched and kept fresh
(JWKS URL or OIDC discovery), checklist A1.

Both give the verifier `key_for(kid, alg)`: synchronous, O(1), a dict lookup in an
immutable `KeySet` that a refetch replaces in one assignment (no lock on the hot path).

`KeySource` fetches with the standard library (`urllib` in a worker thread): the keys
change a few times a year, so one request per refresh period does not justify an HTTP
client dependency. What it guards against:
- a slow or huge answer (timeout, 1 MiB cap, total deadline), a redirect to another
  scheme (https -> http, or file:), a discovery document for another issuer (OIDC
  Discovery 4.3);
- junk `kid`s making the gateway hammer the issuer: at most one unknown-kid refetch per
  `unknown_kid_cooldown`, shared by every concurrent caller;
- an issuer outage: the last good keys are served for `max_stale` past their expiry, so a
  short outage of the IdP is not an outage of the API; after that they are dropped,
  because keys that cannot be refreshed may have been revoked.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import logging
import random
import re
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import jwt
import orjson
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from apishield.auth.jwa import PublicKey, UnknownKey, VerifyKey, key_fits
from apishield.auth.principal import AuthFailure
from apishield.auth.weak_secrets import weakness
from apishield.config import ConfigError
from apishield.config.secrets import read_secret
from apishield.observe.metrics import METRICS

if TYPE_CHECKING:
    from apishield.config import Issuer

__all__ = [
    "MAX_DOCUMENT_BYTES",
    "FetchError",
    "KeyEntry",
    "KeySet",
    "KeySource",
    "StaticKeys",
    "fetch_json",
    "parse_jwks",
    "read_secret",
    "safe_url",
]

logger = logging.getLogger("apishield")

MAX_DOCUMENT_BYTES = 1024 * 1024  # a JWKS is a few KiB; a 1 GiB answer must not be read
MAX_KEYS = 100  # more keys than any issuer publishes; bounds the work of one refetch
MIN_RSA_BITS = 2048  # RFC 7518 3.3: "A key of size 2048 bits or larger MUST be used"

# Every JWS algorithm apishield verifies (config/ allows exactly these).
ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384",
              "ES512", "EdDSA", "HS256", "HS384", "HS512")
_EC_ALG = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}
_JSON_TYPES = ("application/json", "application/jwk-set+json")
_MAX_AGE = re.compile(r"(?:^|[,\s])max-age\s*=\s*\"?(\d+)\"?", re.IGNORECASE)
_NO_CACHE = re.compile(r"(?:^|[,\s])(?:no-store|no-cache)(?:$|[,\s=])", re.IGNORECASE)


# -- key sets ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyEntry:
    """One verification key: `kid` (None for a PEM file or the shared secret), the key
    object (public key, or bytes for HMAC) and the JWK's `alg` when it pinned one."""

    kid: str | None
    key: VerifyKey
    alg: str | None = None

    def fits(self, alg: str) -> bool:
        """Usable for a token signed with `alg`: right key type, and a JWK that names its
        algorithm (RFC 7517 4.4) is used with that algorithm only."""
        return (self.alg is None or self.alg == alg) and key_fits(alg, self.key)


class KeySet:
    """An immutable, indexed set of keys. Everything `key_for` needs is precomputed so a
    lookup is one or two dict reads, whatever the number of keys."""

    def __init__(self, entries: Iterable[KeyEntry]) -> None:
        self.entries = tuple(entries)
        by_kid: dict[str, list[KeyEntry]] = {}
        for entry in self.entries:
            if entry.kid is not None:
                by_kid.setdefault(entry.kid, []).append(entry)
        self._by_kid = {kid: tuple(found) for kid, found in by_kid.items()}
        self.kids = frozenset(self._by_kid)
        kidless = [entry for entry in self.entries if entry.kid is None]
        # alg -> the one key a token may use without a (known) kid, if exactly one fits
        self._unique_any = {alg: _unique(self.entries, alg) for alg in ALGORITHMS}
        self._unique_kidless = {alg: _unique(kidless, alg) for alg in ALGORITHMS}

    def __len__(self) -> int:
        return len(self.entries)

    def key_for(self, kid: str | None, alg: str) -> VerifyKey:
        """The key for a token's `kid` and `alg`.

        - a known kid: its key, if its type fits `alg` (else `jwt-alg-not-allowed`);
        - no kid: the only key that fits `alg`; none or several -> `jwt-unknown-kid` (a
          guess among several keys would be a signature oracle over our key set);
        - an unknown kid: the only kid-less key that fits (a PEM file configured by the
          operator: RFC 7515 4.1.4 makes kid a hint), else `UnknownKey` so the caller
          may refetch.
        """
        if not self.entries:
            raise AuthFailure("jwt-no-keys")
        if kid is None:
            key = self._unique_any.get(alg)
            if key is None:
                raise AuthFailure("jwt-unknown-kid")
            return key
        found = self._by_kid.get(kid)
        if found is None:
            key = self._unique_kidless.get(alg)
            if key is None:
                raise UnknownKey(kid)
            return key
        for entry in found:
            if entry.fits(alg):
                return entry.key
        raise AuthFailure("jwt-alg-not-allowed")


def _unique(entries: Iterable[KeyEntry], alg: str) -> VerifyKey | None:
    fitting = [entry.key for entry in entries if entry.fits(alg)]
    return fitting[0] if len(fitting) == 1 else None


def _public(key: object) -> object:
    """The public half: a JWK or PEM file with private material still only verifies."""
    if isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
                  | ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return key.public_key()
    return key


def _check_key(key: object) -> tuple[PublicKey | None, str]:
    """The public key if it is acceptable, else None and why not."""
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            return None, (f"RSA key of {key.key_size} bits (at least {MIN_RSA_BITS}, "
                          "RFC 7518 3.3)")
        return key, ""
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in ("secp256r1", "secp384r1", "secp521r1"):
            return None, f"EC curve {key.curve.name} (P-256, P-384 or P-521 only)"
        return key, ""
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return key, ""
    return None, f"unsupported key type {type(key).__name__}"


def entry_from_jwk(jwk: Any) -> tuple[KeyEntry | None, str]:
    """A JWK (RFC 7517) -> a key entry, or None and why it was skipped.

    Skipped: keys for encryption (`use` other than `sig`, RFC 7517 4.2; `key_ops`
    without `verify`, 4.3), symmetric (`oct`) keys (an HMAC secret published in a key set
    is a key-confusion trap, RFC 8725 2.1), algorithms or curves apishield does not
    verify, and weak RSA keys."""
    if not isinstance(jwk, dict):
        return None, "not a JSON object"
    kty = jwk.get("kty")
    use = jwk.get("use")
    if use is not None and use != "sig":
        return None, f"use={use!r}"
    ops = jwk.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        return None, "key_ops without verify"
    kid = jwk.get("kid")
    if kid is not None and not isinstance(kid, str):
        return None, "kid is not a string"
    alg = jwk.get("alg")
    if alg is not None and alg not in ALGORITHMS:
        return None, f"alg {alg!r} is not a signing algorithm apishield verifies"
    if kty == "RSA":
        family = "RS256"  # the key object serves RS* and PS*; `alg` pins it if present
    elif kty == "EC":
        crv = jwk.get("crv")  # not a string (a list is unhashable): no family, skipped
        family = _EC_ALG.get(crv, "") if isinstance(crv, str) else ""
    elif kty == "OKP":
        family = "EdDSA" if jwk.get("crv") in ("Ed25519", "Ed448") else ""
    elif kty == "oct":
        return None, "symmetric (oct) keys are never taken from a key set"
    else:
        return None, f"kty {kty!r}"
    if not family:
        return None, f"curve {jwk.get('crv')!r}"
    try:
        key = _public(jwt.PyJWK(jwk, algorithm=family).key)
    except (jwt.PyJWTError, ValueError, TypeError) as exc:
        return None, f"invalid {kty} key ({type(exc).__name__})"
    public, problem = _check_key(key)
    if public is None:
        return None, problem
    if alg is not None and not key_fits(alg, public):
        return None, f"alg {alg} does not fit a {kty} key"
    return KeyEntry(kid, public, alg), ""


def parse_jwks(document: Any) -> tuple[list[KeyEntry], list[str]]:
    """A JWK Set (`{"keys": [...]}`, RFC 7517 5) -> usable entries and skip notes."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("not a JWK Set (an object with a `keys` array)")
    entries: list[KeyEntry] = []
    skipped: list[str] = []
    for index, jwk in enumerate(document["keys"]):
        entry, why = entry_from_jwk(jwk)
        if entry is None:
            skipped.append(f"keys[{index}]: {why}")
        elif len(entries) < MAX_KEYS:
            entries.append(entry)
    return entries, skipped


class StaticKeys:
    """Keys from the config: PEM public keys, certificates or JWK / JWK Set files
    (`settings.keys`), or the HS* shared secret. Read once at build; a problem is a
    ValueError naming the file, so `apishield check` reports it before serving."""

    def __init__(self, settings: Issuer, source_dir: str | Path = ".", *,
                 name: str | None = None) -> None:
        label = f"issuer {name!r}" if name else f"issuer {settings.issuer!r}"
        entries: list[KeyEntry] = []
        for file in settings.keys:
            entries.extend(self._load_file(label, (Path(source_dir) / file).resolve()))
        self.weak: str | None = None  # why the shared secret is weak, when allowed
        if settings.shared_secret is not None:
            secret = read_secret(settings.shared_secret, source_dir,
                                 what=f"{label}: shared_secret")
            where = f"auth.issuers.{name}.shared_secret" if name else f"{label}: shared_secret"
            weak = weakness(secret, settings.algorithms)
            if weak is not None and not settings.allow_weak_secret:
                # located at the issuer's key, not at the scheme that uses it (issue 16)
                raise ConfigError([
                    f"{where}: {weak}: anyone who guesses it can mint tokens. Use 32+ "
                    "random bytes (python -c 'import secrets; print(secrets.token_urlsafe("
                    "48))'); if the app's secret cannot change yet, write "
                    "allow_weak_secret: true on the issuer (logged and reported by audit)"])
            self.weak = weak
            try:  # PyJWT refuses PEM/DER-looking HMAC secrets: say so now, not per request
                jwt.algorithms.HMACAlgorithm(jwt.algorithms.HMACAlgorithm.SHA256).prepare_key(
                    secret)
            except jwt.InvalidKeyError:
                raise ValueError(f"{label}: shared_secret looks like a public key or "
                                 "certificate; an HMAC secret must be random bytes") from None
            entries.append(KeyEntry(None, secret))
        for entry in entries:
            if not any(entry.fits(alg) for alg in settings.algorithms):
                kind = "shared secret" if isinstance(entry.key, bytes) else type(
                    entry.key).__name__
                raise ValueError(f"{label}: a {kind} (kid {entry.kid!r}) fits none of the "
                                 f"algorithms {list(settings.algorithms)}")
        if not entries and settings.algorithms and (settings.keys
                                                    or settings.shared_secret is not None):
            raise ValueError(f"{label}: no usable key")
        self.keyset = KeySet(entries)

    @property
    def kids(self) -> frozenset[str]:
        return self.keyset.kids

    def key_for(self, kid: str | None, alg: str) -> VerifyKey:
        return self.keyset.key_for(kid, alg)

    @staticmethod
    def _load_file(label: str, path: Path) -> list[KeyEntry]:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ValueError(f"{label}: cannot read key file {path}: "
                             f"{exc.strerror or exc}") from None
        return parse_key_data(f"{label}: key file {path}", data)


def parse_key_data(where: str, data: bytes) -> list[KeyEntry]:
    """The public keys in a key file's bytes: a PEM public key, a PEM certificate, a JWK
    or a JWK Set (the gateway's static `keys`, and the probe's `--issuer-keys`). Raises
    ValueError starting with `where`, for people."""
    if b"-----BEGIN" in data:
        if b"PRIVATE KEY-----" in data:
            raise ValueError(f"{where} holds a private key; give the public key only "
                             "(verifying needs nothing more)")
        key: object
        try:
            if b"-----BEGIN CERTIFICATE-----" in data:
                key = x509.load_pem_x509_certificate(data).public_key()
            else:
                key = serialization.load_pem_public_key(data)
        except ValueError as exc:
            raise ValueError(f"{where}: not a PEM public key or certificate "
                             f"({exc})") from None
        public, problem = _check_key(key)
        if public is None:
            raise ValueError(f"{where}: {problem}")
        return [KeyEntry(None, public)]
    try:
        document = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise ValueError(f"{where}: neither PEM nor JSON (a JWK or a JWK Set)") from None
    if isinstance(document, dict) and "keys" in document:
        entries, skipped = parse_jwks(document)
        if not entries:
            raise ValueError(f"{where}: no usable signing key ({'; '.join(skipped)})")
        return entries
    entry, why = entry_from_jwk(document)
    if entry is None:
        raise ValueError(f"{where}: {why}")
    return [entry]


# -- fetching ------------------------------------------------------------------------------


class FetchError(Exception):
    """A document could not be fetched or was refused. The message is safe to log: a
    status, an exception class, a URL without credentials or query."""


def safe_url(url: str) -> str:
    """A URL for log lines: no userinfo, no query, no fragment."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


class _SameSchemeRedirect(urllib.request.HTTPRedirectHandler):
    """Follows a few redirects, never to another scheme: https -> http would drop TLS,
    and urllib's default would also follow to ftp:."""

    max_redirections = 3

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str,
                         headers: Any, newurl: str) -> urllib.request.Request | None:
        if urlsplit(newurl).scheme != urlsplit(req.full_url).scheme:
            raise FetchError(f"redirect from {safe_url(req.full_url)} to another scheme "
                             "refused")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _opener(context: ssl.SSLContext) -> urllib.request.OpenerDirector:
    """Only HTTP(S): no file:, ftp: or data: handler exists to be reached."""
    opener = urllib.request.OpenerDirector()
    for handler in (urllib.request.ProxyHandler(), urllib.request.HTTPHandler(),
                    urllib.request.HTTPSHandler(context=context),
                    urllib.request.HTTPDefaultErrorHandler(), _SameSchemeRedirect(),
                    urllib.request.HTTPErrorProcessor()):
        opener.add_handler(handler)
    return opener


def fetch_json(url: str, *, timeout: float, context: ssl.SSLContext,
               max_bytes: int = MAX_DOCUMENT_BYTES, data: bytes | None = None,
               headers: Mapping[str, str] | None = None,
               accept: tuple[str, ...] = _JSON_TYPES) -> tuple[Any, dict[str, str]]:
    """GET (or POST `data`) a JSON document, blocking: run it in a thread. Only a 200 with
    a JSON media type and at most `max_bytes` is accepted; `timeout` bounds each socket
    operation and the whole read. Returns the parsed JSON and the response headers
    (lower-case names)."""
    if urlsplit(url).scheme not in ("http", "https"):
        raise FetchError(f"{safe_url(url)}: only http:// and https:// are fetched")
    request = urllib.request.Request(url, data=data, method="POST" if data else "GET")  # noqa: S310 - scheme checked above
    request.add_header("Accept", "application/json")
    request.add_header("User-Agent", "apishield")
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    deadline = time.monotonic() + timeout * 2
    try:
        with _opener(context).open(request, timeout=timeout) as response:
            status = response.status
            if status != 200:
                raise FetchError(f"{safe_url(url)}: HTTP {status}")
            answer = {k.lower(): v for k, v in response.headers.items()}
            media = answer.get("content-type", "").split(";", 1)[0].strip().lower()
            if media not in accept and not media.endswith("+json"):
                raise FetchError(f"{safe_url(url)}: content-type {media or 'missing'!r} is "
                                 "not JSON")
            length = answer.get("content-length", "")
            if length.isdigit() and int(length) > max_bytes:
                raise FetchError(f"{safe_url(url)}: {length} bytes (limit {max_bytes})")
            body = bytearray()
            while len(body) <= max_bytes:
                if time.monotonic() > deadline:
                    raise FetchError(f"{safe_url(url)}: too slow (deadline)")
                chunk = response.read(min(65536, max_bytes + 1 - len(body)))
                if not chunk:
                    break
                body += chunk
            if len(body) > max_bytes:
                raise FetchError(f"{safe_url(url)}: larger than {max_bytes} bytes")
    except FetchError:
        raise
    except urllib.error.HTTPError as exc:
        exc.close()  # it holds the response and its socket; do not leave them to the GC
        raise FetchError(f"{safe_url(url)}: HTTP {exc.code}") from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        detail = type(reason).__name__ if isinstance(reason, BaseException) else "error"
        raise FetchError(f"{safe_url(url)}: {detail}") from None
    except (OSError, ValueError, http.client.HTTPException) as exc:  # timeouts, resets, ...
        raise FetchError(f"{safe_url(url)}: {type(exc).__name__}") from None
    try:
        return orjson.loads(bytes(body)), answer
    except orjson.JSONDecodeError:
        raise FetchError(f"{safe_url(url)}: invalid JSON") from None


def _max_age(cache_control: str) -> float | None:
    """Seconds from `Cache-Control` (RFC 9111 5.2.2.1); no-store/no-cache mean 0."""
    if _NO_CACHE.search(cache_control):
        return 0.0
    match = _MAX_AGE.search(cache_control)
    return float(match.group(1)) if match else None


class KeySource:
    """An issuer's JWKS, fetched from `jwks_url` or found by OIDC discovery, refreshed in
    the background, refetched on demand for an unknown `kid`.

    `discovery_url`: the scheme's `openIdConnectUrl`; when None and `settings.discovery`
    is on, `<issuer>/.well-known/openid-configuration` (OIDC Discovery 4). A configured
    `jwks_url` is used as is, without discovery. `on_removed`
    gets the kids that disappeared at a refetch (or all kids when stale keys are dropped)
    so cached tokens signed with them can be evicted. `ssl_context` is for tests (a
    private CA); the default verifies against the system trust store."""

    def __init__(self, settings: Issuer, *, discovery_url: str | None = None,
                 on_removed: Callable[[set[str]], None] | None = None,
                 ssl_context: ssl.SSLContext | None = None, name: str | None = None) -> None:
        self.settings = settings
        self.label = f"issuer {name!r}" if name else f"issuer {settings.issuer!r}"
        self.metric_label = name or settings.issuer or "-"  # config names: bounded
        self.on_removed = on_removed
        self.context = ssl_context if ssl_context is not None else ssl.create_default_context()
        # an explicit jwks_url wins: discovery would only find it again, one request later
        if settings.jwks_url is not None:
            self.discovery_url: str | None = None
        elif settings.discovery:
            self.discovery_url = discovery_url or (
                (settings.issuer or "").rstrip("/") + "/.well-known/openid-configuration")
        else:
            raise ValueError(f"{self.label}: a KeySource needs jwks_url or discovery")
        for url in (self.discovery_url, settings.jwks_url):
            if url is not None and urlsplit(url).scheme not in ("http", "https"):
                raise ValueError(f"{self.label}: {url!r} must be an http(s) URL")
        self.jwks_url: str | None = settings.jwks_url if self.discovery_url is None else None
        jwks = settings.jwks
        self.refresh_min = float(jwks.refresh_min)
        self.refresh_max = max(float(jwks.refresh_max), self.refresh_min)
        self.cooldown = float(jwks.unknown_kid_cooldown)
        self.max_stale = float(jwks.max_stale)
        self.timeout = float(jwks.fetch_timeout)
        # retry after a failure: from 1 s (or refresh_min if shorter), doubling, to 60 s
        # (or refresh_max if shorter)
        self.retry_initial = min(1.0, self.refresh_min)
        self.retry_max = max(self.retry_initial, min(60.0, self.refresh_max))

        self.keyset = KeySet(())
        self.ttl: float | None = None  # of the last good fetch, after clamping
        self.fetched_at: float | None = None  # monotonic
        self._drop_at = float("inf")  # monotonic: stale keys are refused from here
        self._next_at = 0.0  # monotonic: next scheduled fetch
        self._retry = self.retry_initial
        self._last_unknown = float("-inf")  # monotonic: last unknown-kid refetch
        self._inflight: asyncio.Task[bool] | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._closed = False

    # -- hot path ------------------------------------------------------------------------

    def key_for(self, kid: str | None, alg: str) -> VerifyKey:
        """The key for `kid`/`alg` (see `KeySet.key_for`); `jwt-no-keys` before the first
        fetch succeeded and once the keys are stale beyond `max_stale`."""
        if time.monotonic() >= self._drop_at:
            raise AuthFailure("jwt-no-keys")
        return self.keyset.key_for(kid, alg)

    @property
    def kids(self) -> frozenset[str]:
        return self.keyset.kids

    @property
    def ready(self) -> bool:
        return len(self.keyset) > 0 and time.monotonic() < self._drop_at

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Fetch once, then keep the keys fresh in the background. A failed first fetch is
        logged and retried with backoff; until keys arrive this issuer's tokens fail with
        `jwt-no-keys` (the gateway starts anyway: the IdP may come up after it)."""
        if self._task is None:
            self._wake = asyncio.Event()  # bound to the running loop
            await self.refresh()
            self._task = asyncio.create_task(self._run(), name=f"jwks {self.label}")

    async def close(self) -> None:
        """Cancel the background refresh and any fetch in progress."""
        self._closed = True
        for task in (self._task, self._inflight):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._task = None

    async def refresh(self) -> bool:
        """Fetch now (or join the fetch in progress); True when it succeeded."""
        task = self._inflight
        if task is None:
            task = asyncio.create_task(self._fetch(), name=f"jwks fetch {self.label}")
            self._inflight = task
            task.add_done_callback(self._fetch_done)
        return await asyncio.shield(task)  # a cancelled waiter does not cancel the fetch

    def _fetch_done(self, task: asyncio.Task[bool]) -> None:
        if self._inflight is task:
            self._inflight = None

    async def refresh_for_unknown(self, kid: str) -> bool:
        """Refetch because a token named `kid` (maybe the issuer rotated). True when `kid`
        is known afterwards. Concurrent callers share one fetch, and a new one starts at
        most once per `unknown_kid_cooldown`, so a flood of junk kids costs the issuer
        one request per cooldown, not one per request."""
        if kid in self.keyset.kids:
            return True
        if self._inflight is None:
            now = time.monotonic()
            if now - self._last_unknown < self.cooldown:
                return False
            self._last_unknown = now
        await self.refresh()
        return kid in self.keyset.kids

    # -- background ----------------------------------------------------------------------

    async def _run(self) -> None:
        """Sleep until the next fetch is due (or the keys go stale), fetch, repeat."""
        while not self._closed:
            now = time.monotonic()
            wake_at = min(self._next_at, self._drop_at)
            if now < wake_at:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wake_at - now)
                continue
            if now >= self._drop_at and len(self.keyset):
                self._drop_stale()
            if time.monotonic() >= self._next_at:
                try:
                    await self.refresh()
                except asyncio.CancelledError:
                    raise
                except Exception:  # never let the refresher die
                    logger.exception("%s: JWKS refresh failed unexpectedly", self.label)
                    self._schedule_retry()

    def _drop_stale(self) -> None:
        removed = set(self.keyset.kids)
        self.keyset = KeySet(())
        self._drop_at = float("inf")  # empty anyway: key_for says jwt-no-keys
        logger.warning("%s: JWKS keys dropped: the issuer could not be reached for longer "
                       "than max_stale (%.0fs) after they expired", self.label, self.max_stale)
        self._notify(removed)

    def _notify(self, removed: set[str]) -> None:
        if removed and self.on_removed is not None:
            try:
                self.on_removed(removed)
            except Exception:
                logger.exception("%s: on_removed callback failed", self.label)

    def _schedule_retry(self) -> None:
        delay = self._retry * random.uniform(0.9, 1.1)  # noqa: S311 - jitter, not crypto
        self._next_at = time.monotonic() + delay
        self._retry = min(self._retry * 2, self.retry_max)
        self._wake.set()

    async def _fetch(self) -> bool:
        """One fetch (discovery if needed, then the JWKS); applies the keys on success."""
        try:
            entries, max_age = await asyncio.to_thread(self._fetch_blocking)
        except FetchError as exc:
            METRICS.jwks_refresh(self.metric_label, "failure")
            self._failed(str(exc))
            return False
        METRICS.jwks_refresh(self.metric_label, "success")
        self._apply(entries, max_age)
        return True

    def _failed(self, why: str) -> None:
        if self.discovery_url is not None:
            self.jwks_url = None  # rediscover next time: the jwks_uri may have moved
        stale = ""
        if len(self.keyset):
            stale = "; serving the last good keys"
        else:
            stale = "; its tokens fail (jwt-no-keys) until keys arrive"
        logger.warning("%s: JWKS fetch failed: %s%s", self.label, why, stale)
        self._schedule_retry()

    def _fetch_blocking(self) -> tuple[list[KeyEntry], float | None]:
        jwks_url = self.jwks_url
        if jwks_url is None:
            jwks_url = self._discover()
        document, headers = fetch_json(jwks_url, timeout=self.timeout, context=self.context)
        try:
            entries, skipped = parse_jwks(document)
        except ValueError as exc:
            raise FetchError(f"{safe_url(jwks_url)}: {exc}") from None
        entries = [e for e in entries if any(e.fits(a) for a in self.settings.algorithms)]
        if not entries:
            # an empty or all-foreign set is treated as a failed fetch: keep the last good
            # keys rather than locking every caller out on an IdP misconfiguration
            raise FetchError(f"{safe_url(jwks_url)}: no key usable with "
                             f"{list(self.settings.algorithms)}"
                             + (f" ({'; '.join(skipped[:5])})" if skipped else ""))
        self.jwks_url = jwks_url
        return entries, _max_age(headers.get("cache-control", ""))

    def _discover(self) -> str:
        """The `jwks_uri` of the issuer's discovery document, which must be for this very
        issuer (OIDC Discovery 4.3: `issuer` equals the configured value exactly)."""
        url = self.discovery_url
        assert url is not None  # only called with discovery on
        document, _ = fetch_json(url, timeout=self.timeout, context=self.context)
        if not isinstance(document, dict):
            raise FetchError(f"{safe_url(url)}: not a JSON object")
        if document.get("issuer") != self.settings.issuer:
            raise FetchError(f"{safe_url(url)}: discovery document is for another issuer "
                             "(OIDC Discovery 4.3)")
        jwks_uri = document.get("jwks_uri")
        if not isinstance(jwks_uri, str) or urlsplit(jwks_uri).scheme not in ("http", "https"):
            raise FetchError(f"{safe_url(url)}: no http(s) jwks_uri")
        if urlsplit(url).scheme == "https" and urlsplit(jwks_uri).scheme != "https":
            raise FetchError(f"{safe_url(url)}: jwks_uri downgrades https to http")
        return jwks_uri

    def _apply(self, entries: list[KeyEntry], max_age: float | None) -> None:
        """Swap in the new key set and schedule the next fetch: `max-age` clamped to
        [refresh_min, refresh_max] (none: refresh_min, so a removed key stops verifying
        within minutes), refetched at 90% of it, never sooner than refresh_min."""
        old = self.keyset
        self.keyset = KeySet(entries)
        now = time.monotonic()
        ttl = self.refresh_min if max_age is None else max_age
        ttl = min(max(ttl, self.refresh_min), self.refresh_max)
        self.ttl = ttl
        self.fetched_at = now
        self._drop_at = now + ttl + self.max_stale
        self._next_at = now + max(self.refresh_min, 0.9 * ttl)
        self._retry = self.retry_initial
        self._wake.set()
        if not len(old):
            logger.info("%s: %d signing key(s) loaded", self.label, len(self.keyset))
        self._notify(set(old.kids - self.keyset.kids))
