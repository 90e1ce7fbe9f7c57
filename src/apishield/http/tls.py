"""TLS: the server context (termination, reload, mutual TLS) and the upstream client context.

Checklist C1/C2. The server profiles follow Mozilla's Server Side TLS guidelines (v5.7,
https://wiki.mozilla.org/Security/Server_Side_TLS):

- `intermediate`: TLS 1.2 and 1.3; for TLS 1.2 only ECDHE key exchange with AES-GCM or
  ChaCha20-Poly1305 (forward secrecy and AEAD, no CBC, no RSA key exchange, no SHA-1 MACs).
  Mozilla's list also has three DHE suites; they are left out because the `ssl` module
  cannot configure RFC 7919 ffdhe groups, and every client of the last decade has ECDHE.
- `modern`: TLS 1.3 only (its suites are all AEAD with forward secrecy; OpenSSL's default
  TLS 1.3 list is exactly Mozilla's).

Every problem with the files (missing, unreadable, not PEM, key not matching, encrypted
without or with a wrong passphrase, expired) is a `ConfigError` located at the config key,
so `apishield check` lists it and `serve` refuses to start.

Reload (SIGHUP, or the files changed): the new chain is loaded into a scratch context first
and only then into the live one, from the same bytes, so a bad certificate never touches
the live context; new handshakes use the new certificate, established connections keep
theirs (OpenSSL copies the certificate into each connection when it is created).
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import stat
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict
from urllib.parse import quote, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from apishield.config import Config, ConfigError, Tls
from apishield.exchange import Headers
from apishield.observe.logjson import fields

logger = logging.getLogger("apishield")

# Mozilla intermediate v5.7 without the DHE suites (see the module docstring), in its order.
INTERMEDIATE_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
))
# OpenSSL's SSL_OP_PRIORITIZE_CHACHA (not exported by `ssl`): with server preference on,
# still pick ChaCha20 for a client that lists it first (phones without AES hardware), which
# is why Mozilla otherwise leaves the choice to the client.
OP_PRIORITIZE_CHACHA = 1 << 21
ALPN = ["http/1.1"]
POLL_INTERVAL = 2.0  # seconds between two looks at the certificate files' metadata
EXPIRY_WARNING_DAYS = 14

@dataclass(frozen=True)
class CertInfo:
    """What the logs and warnings say about a certificate: nothing secret."""

    serial: str
    not_before: float
    not_after: float
    key_type: str

    def describe(self) -> str:
        expires = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(self.not_after))
        return f"serial {self.serial}, {self.key_type} key, expires {expires}"


# -- reading certificates ---------------------------------------------------------------

_KEY_TYPES = (
    (rsa.RSAPublicKey, "RSA"),
    (ec.EllipticCurvePublicKey, "EC"),
    (ed25519.Ed25519PublicKey, "Ed25519"),
    (ed448.Ed448PublicKey, "Ed448"),
)


def cert_info(pem: bytes) -> CertInfo:
    """Serial, validity and key type of the first certificate of a PEM chain (read with
    `cryptography`, which the JWT work needs anyway). Raises ValueError when there is no
    parseable certificate."""
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        raise ValueError("holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
    try:
        certificate = x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise ValueError("holds a damaged or unsupported certificate") from None
    public_key = certificate.public_key()
    key_type = next((name for kind, name in _KEY_TYPES if isinstance(public_key, kind)),
                    type(public_key).__name__)
    return CertInfo(
        serial=f"{certificate.serial_number:X}",
        not_before=certificate.not_valid_before_utc.timestamp(),
        not_after=certificate.not_valid_after_utc.timestamp(),
        key_type=key_type,
    )


def _read(path: Path, where: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigError([f"{where}: file not found: {path}"]) from None
    except OSError as exc:
        raise ConfigError([f"{where}: cannot read {path}: {exc.strerror or exc}"]) from None


@contextmanager
def _as_paths(*blobs: bytes) -> Iterator[list[str]]:
    """Paths OpenSSL can open that hold exactly `blobs`, read once by us.

    `load_cert_chain` takes paths only; loading the live context from the bytes that were
    validated closes the window where the files change between the check and the load
    (a certbot renewal, a Kubernetes secret swap). In memory (memfd) where Linux allows,
    so key material is never copied to disk; else in a private temporary folder."""
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fds: list[int] = []
        try:
            for blob in blobs:
                fd = os.memfd_create("apishield-tls", os.MFD_CLOEXEC)
                fds.append(fd)
                view = memoryview(blob)
                while view:
                    view = view[os.write(fd, view):]
            yield [f"/proc/self/fd/{fd}" for fd in fds]
        finally:
            for fd in fds:
                os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="apishield-tls-") as folder:  # mode 0700
        paths = []
        for index, blob in enumerate(blobs):
            path = Path(folder) / str(index)
            path.touch(mode=0o600)
            path.write_bytes(blob)
            paths.append(str(path))
        yield paths


class _Passphrase:
    """The password callback: never lets OpenSSL prompt on the terminal (a service would
    hang), and records whether the key asked for one so the error can say what to do."""

    def __init__(self, value: bytes | None) -> None:
        self.value = value
        self.asked = False

    def __call__(self) -> bytes:
        self.asked = True
        return self.value if self.value is not None else b""


def _load_chain(
    context: ssl.SSLContext,
    cert_pem: bytes,
    key_pem: bytes | None,
    passphrase: bytes | None,
    where: str,
    passphrase_key: str | None = None,
) -> None:
    """`load_cert_chain` from bytes, each failure turned into a located message."""
    callback = _Passphrase(passphrase)
    blobs = (cert_pem,) if key_pem is None else (cert_pem, key_pem)
    with _as_paths(*blobs) as paths:
        try:
            context.load_cert_chain(paths[0], paths[1] if len(paths) > 1 else None,
                                    password=callback)
            return
        except ssl.SSLError as exc:
            error = exc
    key = f"{where}key" if key_pem is not None else f"{where}cert"
    if error.reason == "KEY_VALUES_MISMATCH":
        raise ConfigError([f"{where}key: does not match the certificate in {where}cert"])
    if callback.asked and passphrase is None:
        if passphrase_key is None and where != "tls.":
            raise ConfigError([f"{key}: the key is encrypted; use an unencrypted key here"])
        raise ConfigError([f"{key}: the key is encrypted; give its passphrase with "
                           f"{where}passphrase_env or {where}passphrase_file"])
    if callback.asked:
        # The passphrase itself is never part of a message (C4, F6).
        raise ConfigError([f"{key}: cannot be decrypted with the passphrase from "
                           f"{passphrase_key} (wrong passphrase?)"])
    raise ConfigError([f"{key}: not a usable PEM private key ({error.reason or error})"])


def _check_cert(cert_pem: bytes, path: Path, where: str) -> CertInfo:
    try:
        info = cert_info(cert_pem)
    except ValueError as exc:
        raise ConfigError([f"{where}cert: {path} {exc}"]) from None
    if info.not_after < time.time():
        expired = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(info.not_after))
        raise ConfigError([f"{where}cert: expired on {expired} (serial {info.serial}); "
                           "every client would refuse it"])
    return info


# -- the server side ----------------------------------------------------------------------

def _server_context(profile: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    if profile == "modern":
        context.minimum_version = ssl.TLSVersion.TLSv1_3
    else:
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_ciphers(INTERMEDIATE_CIPHERS)  # TLS 1.2; 1.3 suites are OpenSSL's
    context.options |= (
        ssl.OP_NO_COMPRESSION  # CRIME
        | ssl.OP_NO_RENEGOTIATION  # client-initiated renegotiation is a CPU DoS lever
        | ssl.OP_CIPHER_SERVER_PREFERENCE
        | OP_PRIORITIZE_CHACHA
        # Mozilla: session tickets off. The ticket key lives as long as the process and
        # never rotates, so one leak would decrypt every TLS 1.2 session it sealed (no
        # forward secrecy); resumption still works through the server-side session cache.
        | ssl.OP_NO_TICKET
    )
    context.set_alpn_protocols(ALPN)
    return context


class ServerTls:
    """The listener's SSLContext, built from `tls:` and reloadable in place."""

    def __init__(self, settings: Tls, config: Config) -> None:
        self.settings = settings
        self.cert_path = config.resolve(settings.cert)
        self.key_path = config.resolve(settings.key)
        self.passphrase_path = (
            config.resolve(settings.passphrase_file) if settings.passphrase_file else None
        )
        self.context = _server_context(settings.profile)
        problems: list[str] = []
        if settings.client_ca is not None:
            try:
                self._load_client_ca(config.resolve(settings.client_ca))
            except ConfigError as exc:
                problems += exc.problems
        self._failed: tuple[object, ...] | None = None
        self._stamp = self._stat()
        try:
            self.info = self._load(self.context)
        except ConfigError as exc:
            raise ConfigError(exc.problems + problems) from None
        if problems:
            raise ConfigError(problems)

    def _load_client_ca(self, path: Path) -> None:
        pem = _read(path, "tls.client_ca")
        try:
            self.context.load_verify_locations(cadata=pem.decode("ascii", "replace"))
        except (ssl.SSLError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise ConfigError([f"tls.client_ca: {path} holds no usable PEM CA certificate "
                               f"({reason})"]) from None
        self.context.verify_mode = (
            ssl.CERT_REQUIRED if self.settings.client_cert == "required" else ssl.CERT_OPTIONAL
        )

    def _passphrase(self) -> tuple[bytes | None, str | None]:
        settings = self.settings
        if settings.passphrase_env is not None:
            value = os.environ.get(settings.passphrase_env)
            if value is None:
                raise ConfigError([f"tls.passphrase_env: the environment variable "
                                   f"{settings.passphrase_env} is not set"])
            return value.encode(), f"tls.passphrase_env ({settings.passphrase_env})"
        if self.passphrase_path is not None:
            raw = _read(self.passphrase_path, "tls.passphrase_file")
            return raw.removesuffix(b"\n").removesuffix(b"\r"), "tls.passphrase_file"
        return None, None

    def _load(self, live: ssl.SSLContext, *, key_type: str | None = None) -> CertInfo:
        """Validate the files on a scratch context, then load the same bytes into `live`."""
        cert_pem = _read(self.cert_path, "tls.cert")
        key_pem = _read(self.key_path, "tls.key")
        info = _check_cert(cert_pem, self.cert_path, "tls.")
        if key_type is not None and info.key_type != key_type:
            # OpenSSL keeps one certificate per key type: loading an EC certificate into a
            # context serving an RSA one keeps BOTH, and clients could go on getting the old.
            raise ConfigError([f"tls.cert: the new certificate has a {info.key_type} key, the "
                               f"running one {key_type}; restart apishield to change key type"])
        passphrase, source = self._passphrase()
        scratch = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        _load_chain(scratch, cert_pem, key_pem, passphrase, "tls.", source)
        _load_chain(live, cert_pem, key_pem, passphrase, "tls.", source)
        return info

    def _stat(self) -> tuple[object, ...]:
        """What changes when a file is rewritten or swapped (stat follows symlinks, so a
        Kubernetes `..data` swap shows as a new inode)."""
        stamps: list[object] = []
        for path in (self.cert_path, self.key_path, self.passphrase_path):
            if path is None:
                continue
            try:
                st = path.stat()
            except OSError:
                stamps.append(None)
            else:
                stamps.append((st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev))
        return tuple(stamps)

    def reload(self, trigger: str = "SIGHUP") -> bool:
        """Load the files again into the live context; on any problem keep the old chain."""
        stamp = self._stat()
        try:
            info = self._load(self.context, key_type=self.info.key_type)
        except ConfigError as exc:
            self._failed = stamp
            logger.error("tls: new certificate not loaded (%s), keeping the running one "
                         "(%s): %s", trigger, self.info.describe(), "; ".join(exc.problems),
                         extra=fields("lifecycle", event="reload", what="tls",
                                      trigger=trigger, outcome="failed"))
            return False
        self._stamp = stamp
        self._failed = None
        self.info = info
        logger.info("tls: certificate reloaded (%s): %s", trigger, info.describe(),
                    extra=fields("lifecycle", event="reload", what="tls", trigger=trigger,
                                 outcome="loaded"))
        return True

    async def watch(self, interval: float = POLL_INTERVAL) -> None:
        """Reload when the files change: metadata polled, no watcher dependency.

        A change is loaded once the files have stayed the same for one interval, so a
        deployment that writes the certificate and then the key is not caught half-way."""
        seen = self._stamp
        while True:
            await asyncio.sleep(interval)
            now = self._stat()
            if now in (self._stamp, self._failed):
                seen = now
                continue
            if now != seen:
                seen = now  # still changing: look again next time
                continue
            self.reload("files changed")

    def warnings(self) -> list[str]:
        found = []
        days = (self.info.not_after - time.time()) / 86400
        if days < EXPIRY_WARNING_DAYS:
            found.append(f"tls.cert: expires in {days:.0f} day(s) ({self.info.describe()}); "
                         "renew it, then send SIGHUP or replace the files (reloaded within "
                         f"{POLL_INTERVAL * 2:.0f} s)")
        if self.info.not_before > time.time():
            found.append("tls.cert: not valid yet (notBefore is in the future; clock skew?)")
        try:
            mode = self.key_path.stat().st_mode
        except OSError:
            mode = 0
        if mode & stat.S_IROTH:
            found.append(f"tls.key: {self.key_path} is readable by every user on this host "
                         f"(mode {stat.S_IMODE(mode):o}); chmod 600 or 640")
        return found


def server_tls(config: Config) -> ServerTls | None:
    """The listener's TLS, or None for plain HTTP (raises ConfigError)."""
    return ServerTls(config.tls, config) if config.tls is not None else None


# -- mutual TLS: the verified client certificate, for the upstream ------------------------

# Visible ASCII except `%` (the escape) and `,` (the SAN list separator): a CN or SAN holding
# anything else is percent-encoded (UTF-8), so no value can break a header or the list.
_HEADER_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) not in "%,")
_SAN_TYPES = {"DNS": "DNS", "IP Address": "IP", "email": "email", "URI": "URI"}


class PeerCert(TypedDict, total=False):
    """The parts of `SSLSocket.getpeercert()` read here (typeshed types it as one
    dict of unions for every key)."""

    subject: tuple[tuple[tuple[str, str], ...], ...]  # RDNs of (attribute, value) pairs
    subjectAltName: tuple[tuple[str, str], ...]  # (type, value) pairs


def client_identity(peercert: PeerCert | None) -> tuple[tuple[bytes, bytes], ...]:
    """`X-Apishield-Client-Subject` (CN) and `-San` for a verified client certificate.

    `peercert` is what `getpeercert()` returns: non-empty only when a certificate was
    presented and verified against `tls.client_ca` (the handshake fails otherwise)."""
    if not peercert:
        return ()
    headers: Headers = []
    names = [value for rdn in peercert.get("subject", ())
             for key, value in rdn if key == "commonName"]
    if names:
        headers.append((b"x-apishield-client-subject",
                        quote(names[-1], safe=_HEADER_SAFE).encode("ascii")))
    sans = [f"{_SAN_TYPES[kind]}:{quote(value, safe=_HEADER_SAFE)}"
            for kind, value in peercert.get("subjectAltName", ())
            if kind in _SAN_TYPES]
    if sans:
        headers.append((b"x-apishield-client-san", ", ".join(sans).encode("ascii")))
    return tuple(headers)


# -- the upstream side --------------------------------------------------------------------

def upstream_context(config: Config) -> ssl.SSLContext | None:
    """The client context for an `https://` upstream (raises ConfigError), or None.

    Verification (chain and host name) is on unless `upstream.tls.verify: false` was
    written; a custom `ca` replaces the system store, pinning a private CA."""
    upstream = config.upstream
    if upstream is None or urlsplit(upstream.url).scheme != "https":
        return None
    settings = upstream.tls
    problems: list[str] = []
    context = ssl.create_default_context()  # TLS 1.2+, check_hostname, CERT_REQUIRED
    if settings.ca is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # the same defaults, no system CAs
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        path = config.resolve(settings.ca)
        try:
            pem = _read(path, "upstream.tls.ca")
            context.load_verify_locations(cadata=pem.decode("ascii", "replace"))
        except ConfigError as exc:
            problems += exc.problems
        except (ssl.SSLError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or exc
            problems.append(f"upstream.tls.ca: {path} holds no usable PEM CA certificate "
                            f"({reason})")
    if not settings.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if settings.cert is not None:
        cert_path = config.resolve(settings.cert)
        try:
            cert_pem = _read(cert_path, "upstream.tls.cert")
            key_pem = (_read(config.resolve(settings.key), "upstream.tls.key")
                       if settings.key is not None else None)
            _check_cert(cert_pem, cert_path, "upstream.tls.")
            _load_chain(context, cert_pem, key_pem, None, "upstream.tls.")
        except ConfigError as exc:
            problems += exc.problems
    if problems:
        raise ConfigError(problems)
    context.set_alpn_protocols(ALPN)
    return context
