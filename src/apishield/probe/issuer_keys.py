"""The issuer's public keys, as PEM text, for the key-confusion attack (RFC 8725 2.1).

A verifier that lets the token choose HS256 and hands its RSA or EC public key to the HMAC
check uses the key's PEM text as the HMAC secret (CVE-2016-10555 and its kin), so the
probe signs with that text. The probe contacts nothing but --target, so the keys come
from local files only: the issuer's `keys` in the config (the PEM file's bytes as written,
the text such a verifier reads; a JWK or a certificate as its SubjectPublicKeyInfo PEM),
or `--issuer-keys FILE`, a JWK Set (or PEM) the user downloaded from a `jwks_url` or
discovery issuer.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization

from apishield.auth.jwks import parse_key_data
from apishield.config.auth import Issuer

MAX_KEYS = 4  # key-confusion tokens per operation, at most

PemKey = tuple[str | None, bytes]  # (kid, PEM text)


def read_key_file(path: Path) -> list[PemKey]:
    """The public keys in a PEM, certificate, JWK or JWK Set file, read as the gateway
    reads its static `keys` (`parse_key_data`). Raises ValueError with a message for
    people."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    entries = parse_key_data(str(path), data)
    if b"-----BEGIN" in data and b"-----BEGIN CERTIFICATE-----" not in data:
        return [(None, data)]  # the PEM text as written: what a confused verifier keys with
    return [(entry.kid, _pem(entry.key)) for entry in entries][:MAX_KEYS]


def _pem(key: object) -> bytes:
    public_bytes = getattr(key, "public_bytes", None)
    if public_bytes is None:
        raise ValueError("not a public key")
    pem: bytes = public_bytes(serialization.Encoding.PEM,
                              serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem


def issuer_keys(issuer: Issuer, source_dir: str | Path) -> list[PemKey]:
    """The configured static keys of `issuer` (no fetching); unreadable files are left to
    `apishield check`: the probe plans without them."""
    found: list[PemKey] = []
    for file in issuer.keys:
        try:
            found.extend(read_key_file((Path(source_dir) / file).resolve()))
        except ValueError:
            continue
    return found[:MAX_KEYS]


def asymmetric(issuer: Issuer) -> bool:
    """Whether the issuer verifies with public keys (key confusion applies)."""
    return any(not name.startswith("HS") for name in issuer.algorithms) or (
        not issuer.algorithms and (issuer.discovery or issuer.jwks_url is not None
                                   or bool(issuer.keys)))
