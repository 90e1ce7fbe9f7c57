"""Token verification core (issue 3, A1-A3): JWS verification and its attack regressions,
JWKS fetching/rotation/staleness against a real issuer on 127.0.0.1, the token cache and
RFC 7662 introspection."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from apishield.auth.authenticators import BearerAuthenticator
from apishield.auth.introspection import Introspector
from apishield.auth.jwks import KeySource, StaticKeys
from apishield.auth.jws import TokenVerifier, UnknownKey
from apishield.auth.principal import AuthFailure, Principal
from apishield.auth.token_cache import TokenCache
from apishield.config import ConfigError, Issuer, config_from_dict
from apishield.exchange import Exchange
from tests.issuer_server import (
    AUDIENCE,
    CLIENT_SECRET,
    HS_SECRET,
    IssuerServer,
    b64,
    forge,
    running_issuer,
    sign_raw,
)

ALGS = ("RS256", "PS256", "ES256", "EdDSA")
# refresh_min is long so background refetches do not disturb request counts; the tests
# about refreshing shorten it
FAST_JWKS = {"refresh_min": 30, "refresh_max": 60, "unknown_kid_cooldown": 0.3,
             "max_stale": 60, "fetch_timeout": 2}


def settings_for(server: IssuerServer, **overrides: Any) -> Issuer:
    data: dict[str, Any] = {
        "issuer": server.issuer,
        "audiences": [AUDIENCE],
        "algorithms": list(ALGS),
        "jwks_url": f"{server.url}/jwks.json",
        "jwks": dict(FAST_JWKS),
    }
    jwks = overrides.pop("jwks", {})
    data["jwks"].update(jwks)
    data.update(overrides)
    return Issuer.model_validate(data)


def signed(server: IssuerServer, alg: str, claims: dict[str, Any] | bytes,
           **header: Any) -> str:
    """A token signed by the issuer's current `alg` key over exactly these claims (PyJWT's
    encoder refuses some of the shapes the tests need)."""
    key = server.key(alg)
    return sign_raw({"alg": alg, "kid": key.kid, "typ": "JWT", **header}, claims,
                    key.private, alg)


def reason(excinfo: pytest.ExceptionInfo[AuthFailure]) -> str:
    return excinfo.value.reason


@pytest.fixture
def issuer() -> Iterator[IssuerServer]:
    with running_issuer() as server:
        yield server


class Keys:
    """A started KeySource with the kid sets it reported removed."""

    def __init__(self, server: IssuerServer, settings: Issuer, **kwargs: Any) -> None:
        self.removed: list[set[str]] = []
        self.source = KeySource(settings, on_removed=self.removed.append, **kwargs)
        self.verifier = TokenVerifier("idp", settings, self.source, "bearer")


@pytest.fixture
async def keys(issuer: IssuerServer) -> AsyncIterator[Keys]:
    k = Keys(issuer, settings_for(issuer))
    await k.source.start()
    yield k
    await k.source.close()


@pytest.fixture
async def verifier(keys: Keys) -> TokenVerifier:
    return keys.verifier


def fail(verifier: TokenVerifier, token: str, now: float | None = None) -> AuthFailure:
    with pytest.raises(AuthFailure) as excinfo:
        verifier.verify(token, time.time() if now is None else now)
    return excinfo.value


# -- valid tokens ---------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA"])
async def test_valid_token_each_family(issuer: IssuerServer, verifier: TokenVerifier,
                                       alg: str) -> None:
    token = issuer.mint(alg, roles=["admin", "ops"])
    principal = verifier.verify(token, time.time())
    assert principal.subject == "alice"
    assert principal.scopes == {"read", "write"}
    assert principal.roles == {"admin", "ops"}
    assert principal.issuer == "idp"
    assert principal.scheme == "bearer"
    assert principal.claims["aud"] == AUDIENCE
    assert principal.expires_at == principal.claims["exp"]


async def test_valid_ps256_and_ed448(issuer: IssuerServer) -> None:
    issuer.add_key("PS256", publish_alg=True)
    ed448 = issuer.add_key("Ed448")
    async with _keys(issuer, settings_for(issuer)) as k:
        assert k.verifier.verify(issuer.mint("PS256"), time.time()).subject == "alice"
        assert k.verifier.verify(issuer.mint(key=ed448), time.time()).subject == "alice"


async def test_hs256_shared_secret_from_env_and_file(issuer: IssuerServer, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_HS_SECRET", HS_SECRET.decode())
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "hs.key").write_bytes(HS_SECRET + b"\n")
    for secret in ({"env": "TEST_HS_SECRET"}, {"file": "secrets/hs.key"}):
        settings = Issuer.model_validate({"issuer": issuer.issuer, "audiences": [AUDIENCE],
                                          "algorithms": ["HS256"], "shared_secret": secret})
        verifier = TokenVerifier("hs", settings, None, "bearer", source_dir=tmp_path)
        good = sign_raw({"alg": "HS256", "typ": "JWT"}, issuer.claims(), HS_SECRET, "HS256")
        assert verifier.verify(good, time.time()).subject == "alice"
        wrong = sign_raw({"alg": "HS256"}, issuer.claims(), HS_SECRET[::-1], "HS256")
        assert fail(verifier, wrong).reason == "jwt-bad-signature"


def test_hs_secret_shorter_than_hash_is_a_build_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_HS_SHORT", "x" * 40)  # fine for HS256, short for HS512
    settings = Issuer.model_validate({"issuer": "https://idp", "audiences": ["a"],
                                      "algorithms": ["HS256", "HS512"],
                                      "shared_secret": {"env": "TEST_HS_SHORT"}})
    with pytest.raises(ConfigError) as caught:
        TokenVerifier("hs", settings, None, "bearer")
    # located at the issuer's secret, not at the scheme that uses it
    assert caught.value.problems[0].startswith(
        "auth.issuers.hs.shared_secret: is 40 bytes; HS512 needs at least 64 (the hash "
        "output size, RFC 7518 3.2)")
    assert "allow_weak_secret: true" in caught.value.problems[0]
    monkeypatch.delenv("TEST_HS_SHORT")
    with pytest.raises(ValueError, match="TEST_HS_SHORT is not set"):
        TokenVerifier("hs", settings, None, "bearer")


@pytest.mark.parametrize(("secret", "why"), [
    (b"secret6", "is 7 bytes; HS256 needs at least 32"),
    (b"a-string-secret-at-least-256-bits-long", "well-known secret"),
    (b"  A-String-Secret-At-Least-256-Bits-Long ", "well-known secret"),
    (b"ab" * 20, "repeats a few characters (about 40 bits estimated"),
])
def test_weak_hs_secrets_load_only_when_allowed(secret: bytes, why: str, tmp_path: Path,
                                                issuer: IssuerServer) -> None:
    (tmp_path / "hs.key").write_bytes(secret)
    base = {"issuer": issuer.issuer, "audiences": [AUDIENCE], "algorithms": ["HS256"],
            "shared_secret": {"file": "hs.key"}}
    with pytest.raises(ConfigError) as caught:
        TokenVerifier("legacy", Issuer.model_validate(base), None, "bearer",
                      source_dir=tmp_path)
    assert caught.value.problems[0].startswith("auth.issuers.legacy.shared_secret: ")
    assert why in caught.value.problems[0]
    verifier = TokenVerifier("legacy", Issuer.model_validate({**base, "allow_weak_secret": True}),
                             None, "bearer", source_dir=tmp_path)
    assert why in (getattr(verifier.keys, "weak", None) or "")
    # checked with the weak key: still a signature check, and a forged token still fails
    good = sign_raw({"alg": "HS256"}, issuer.claims(), secret, "HS256")
    assert verifier.verify(good, time.time()).subject == "alice"
    forged = sign_raw({"alg": "HS256"}, issuer.claims(), secret + b"x", "HS256")
    assert fail(verifier, forged).reason == "jwt-bad-signature"


def test_a_random_secret_is_not_weak() -> None:
    from apishield.auth.weak_secrets import weakness

    assert weakness(secrets.token_bytes(32), ("HS256",)) is None
    assert weakness(secrets.token_urlsafe(48).encode(), ("HS256", "HS384")) is None


def test_legacy_tokens_with_only_sub_and_exp(issuer: IssuerServer, tmp_path: Path) -> None:
    """As two real apps issue them: HS256, `sub` and `exp` only (no iss, aud, iat)."""
    secret = secrets.token_urlsafe(32).encode()  # a file secret loses one trailing newline
    (tmp_path / "hs.key").write_bytes(secret)
    strict = {"issuer": issuer.issuer, "audiences": [AUDIENCE], "algorithms": ["HS256"],
              "shared_secret": {"file": "hs.key"}}
    n = int(time.time())
    legacy = sign_raw({"alg": "HS256", "typ": "JWT"}, {"sub": "u1", "exp": n + 600}, secret,
                      "HS256")
    verifier = TokenVerifier("app", Issuer.model_validate(strict), None, "bearer",
                             source_dir=tmp_path)
    assert fail(verifier, legacy).reason == "jwt-missing-claim:iat"  # defaults stay strict
    relaxed = Issuer.model_validate({
        "algorithms": ["HS256"], "shared_secret": {"file": "hs.key"},
        "check_issuer": False, "check_audience": False,
        "required_claims": ["exp"], "max_lifetime": None})
    verifier = TokenVerifier("app", relaxed, None, "bearer", source_dir=tmp_path)
    assert verifier.verify(legacy, time.time()).subject == "u1"
    # what is still checked: the signature, exp, and an `aud` that is present (RFC 7519
    # 4.1.3: a token for another API is refused even when audiences are not configured)
    for claims, reason in (({"sub": "u1"}, "jwt-missing-claim:exp"),
                           ({"sub": "u1", "exp": n - 600}, "jwt-expired"),
                           ({"sub": "u1", "exp": n + 600, "aud": "other"},
                            "jwt-wrong-audience"),
                           ({"exp": n + 600}, "jwt-missing-claim:sub")):
        token = sign_raw({"alg": "HS256"}, claims, secret, "HS256")
        assert fail(verifier, token).reason == reason, claims
    # an `iss` is ignored with check_issuer: false (RFC 7519 4.1.1: application specific)
    with_iss = sign_raw({"alg": "HS256"}, {"sub": "u1", "exp": n + 600, "iss": "any"},
                        secret, "HS256")
    assert verifier.verify(with_iss, time.time()).subject == "u1"
    forged = sign_raw({"alg": "HS256"}, {"sub": "admin", "exp": n + 600}, b"k" * 32, "HS256")
    assert fail(verifier, forged).reason == "jwt-bad-signature"


@pytest.mark.parametrize(("settings", "problem"), [
    ({"algorithms": ["HS256"], "audiences": ["a"]},
     "issuer: required: the exact `iss` value of this issuer's tokens; for tokens that "
     "carry no `iss`, write check_issuer: false instead"),
    ({"issuer": "x", "check_issuer": False, "algorithms": ["HS256"], "audiences": ["a"]},
     "issuer: is never compared with check_issuer: false; remove one"),
    ({"issuer": "x", "algorithms": ["HS256"]},
     "audiences: required: a token minted for another API must not be accepted here (RFC "
     "7519 4.1.3); list this API's audience(s), or, for tokens that carry no `aud`, write "
     "check_audience: false"),
    ({"issuer": "x", "check_audience": False, "audiences": ["a"], "algorithms": ["HS256"]},
     "audiences: are never compared with check_audience: false; remove one"),
    ({"issuer": "x", "audiences": ["a"], "algorithms": ["HS256"], "required_claims": ["exp"]},
     "max_lifetime: needs iat in every token to measure exp - iat: add it to "
     "required_claims, or write max_lifetime: null for tokens without it"),
    ({"issuer": "x", "audiences": ["a"], "algorithms": ["RS256"], "keys": ["k.pem"],
      "allow_weak_secret": True},
     "allow_weak_secret: only applies to an HS* shared_secret"),
    ({"check_issuer": False, "audiences": ["a"], "algorithms": ["RS256"], "discovery": True},
     "check_issuer: false applies to JWTs verified with static keys, a jwks_url or a shared "
     "secret (introspection and discovery need `issuer`)"),
])
def test_relaxed_checks_must_be_written_and_consistent(settings: dict[str, Any],
                                                       problem: str) -> None:
    base = {"shared_secret": {"env": "UNUSED"}} if settings["algorithms"] == ["HS256"] else {}
    with pytest.raises(ConfigError) as caught:
        config_from_dict({"contract": "c.yaml", "auth": {"issuers": {"app": {
            **base, **settings}}}}, source_dir=Path("."))
    assert caught.value.problems == [f"auth.issuers.app.{problem}"]


def test_claims_mapping(issuer: IssuerServer, tmp_path: Path) -> None:
    rs = issuer.key("RS256")
    (tmp_path / "rs.pem").write_bytes(rs.public_pem())
    settings = Issuer.model_validate({
        "issuer": issuer.issuer, "audiences": ["other", AUDIENCE], "algorithms": ["RS256"],
        "keys": ["rs.pem"], "subject_claim": "oid", "scope_claims": ["scp", "scope"],
        "role_claims": ["realm_access.roles", "resource_access.api.roles", "group",
                        "https://example.test/roles"]})
    verifier = TokenVerifier("idp", settings, StaticKeys(settings, tmp_path), "bearer")
    token = issuer.mint(
        "RS256", oid="user-42", aud=["third", AUDIENCE], scp=["a", "b", 3], scope="ignored",
        realm_access={"roles": ["viewer"]}, resource_access={"api": {"roles": "editor"}},
        group="super admin", **{"https://example.test/roles": ["auditor"]})
    principal = verifier.verify(token, time.time())
    assert principal.subject == "user-42"
    assert principal.scopes == {"a", "b"}  # first present claim; non-strings ignored
    # union of every path; a string is ONE role (never split into "super" + "admin")
    assert principal.roles == {"viewer", "editor", "super admin", "auditor"}


# -- attack regressions ----------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
async def test_alg_none_refused(issuer: IssuerServer, verifier: TokenVerifier, alg: str) -> None:
    claims = issuer.claims(sub="admin")
    assert fail(verifier, forge({"alg": alg, "typ": "JWT"}, claims)).reason == \
        "jwt-alg-not-allowed"
    rs = issuer.key("RS256")
    with_sig = forge({"alg": alg, "kid": rs.kid}, claims, b"\x01" * 256)
    assert fail(verifier, with_sig).reason == "jwt-alg-not-allowed"


def test_alg_none_cannot_be_configured() -> None:
    with pytest.raises(Exception, match="never accepted"):
        Issuer.model_validate({"issuer": "x", "audiences": ["a"], "algorithms": ["none"],
                               "jwks_url": "https://x/jwks"})


async def test_rs256_to_hs256_key_confusion(issuer: IssuerServer, keys: Keys) -> None:
    rs = issuer.key("RS256")
    # HMAC keyed with the issuer's *public* RSA key, which anyone can download
    for secret in (rs.public_pem(), rs.public_pem().strip()):
        token = sign_raw({"alg": "HS256", "kid": rs.kid, "typ": "JWT"},
                         issuer.claims(sub="admin"), secret, "HS256")
        assert fail(keys.verifier, token).reason == "jwt-alg-not-allowed"
        # even if HS256 were allowed (config refuses mixing; bypassed here), the RSA key
        # is never handed to HMAC: its type does not fit the algorithm
        loose = keys.verifier.settings.model_copy(update={"algorithms": ("RS256", "HS256")})
        lenient = TokenVerifier("idp", loose, keys.source, "bearer")
        assert fail(lenient, token).reason == "jwt-alg-not-allowed"


@pytest.mark.parametrize("kid", [
    "../../../../../../dev/null", "/etc/passwd", "..\\..\\windows\\win.ini",
    "' OR '1'='1", "x'; DROP TABLE keys; --", "1 UNION SELECT 'secret'", "\x00",
    "kid\r\nX-Injected: 1", "${jndi:ldap://attacker/a}",
])
async def test_hostile_kid_is_only_a_lookup(issuer: IssuerServer, keys: Keys, kid: str) -> None:
    # signed by a real key of the issuer, but the kid names no key: never verified
    token = issuer.mint("RS256", kid=kid, sub="admin")
    with pytest.raises(UnknownKey) as excinfo:
        keys.verifier.verify(token, time.time())
    assert excinfo.value.reason == "jwt-unknown-kid"
    assert excinfo.value.kid == kid
    assert await keys.source.refresh_for_unknown(kid) is False


async def test_hostile_kid_is_not_a_path_with_static_keys(issuer: IssuerServer,
                                                          tmp_path: Path) -> None:
    es = issuer.key("ES256")
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "jwks.json").write_text(json.dumps({"keys": [es.jwk()]}))
    # the attacker's public key sits next to the config: a kid naming its path is ignored
    attacker = issuer.add_key("ES256")
    (tmp_path / "keys" / "attacker.json").write_text(json.dumps(attacker.jwk()))
    settings = Issuer.model_validate({"issuer": issuer.issuer, "audiences": [AUDIENCE],
                                      "algorithms": ["ES256"], "keys": ["keys/jwks.json"]})
    verifier = TokenVerifier("idp", settings, None, "bearer", source_dir=tmp_path)
    for kid in ("keys/attacker.json", "../keys/attacker.json", str(tmp_path / "keys")):
        token = issuer.mint(key=attacker, kid=kid, sub="admin")
        assert isinstance(fail(verifier, token), UnknownKey)
    assert verifier.verify(issuer.mint(key=es), time.time()).subject == "alice"


@pytest.mark.parametrize("header", ["jku", "x5u", "jwk", "x5c"])
async def test_key_material_in_header_refused(issuer: IssuerServer, verifier: TokenVerifier,
                                              header: str) -> None:
    with running_issuer() as attacker:
        evil = attacker.key("RS256")
        values = {
            "jku": f"{attacker.url}/jwks.json",
            "x5u": f"{attacker.url}/cert.pem",
            "jwk": {k: v for k, v in evil.jwk().items() if k != "kid"},
            "x5c": [b64(evil.public_pem())],
        }
        token = attacker.mint(key=evil, headers={header: values[header]},
                              iss=issuer.issuer, sub="admin")
        assert fail(verifier, token).reason == "jwt-header-key"
        # and with a kid the issuer really has: still refused, nothing fetched
        token = attacker.mint(key=evil, kid=issuer.key("RS256").kid,
                              headers={header: values[header]}, iss=issuer.issuer)
        assert fail(verifier, token).reason == "jwt-header-key"
        assert sum(attacker.counts.values()) == 0


@pytest.mark.parametrize("extra", [
    {"crit": ["exp"], "exp": 1},
    {"crit": ["b64"], "b64": False},
    {"crit": []},
    {"crit": ["http://example.test/unknown"], "http://example.test/unknown": True},
])
async def test_crit_refused(issuer: IssuerServer, verifier: TokenVerifier,
                            extra: dict[str, Any]) -> None:
    rs = issuer.key("RS256")
    token = sign_raw({"alg": "RS256", "kid": rs.kid, **extra}, issuer.claims(), rs.private,
                     "RS256")
    assert fail(verifier, token).reason == "jwt-crit-unsupported"


@pytest.mark.parametrize("typ,ok", [
    ("JWT", True), ("jwt", True), ("at+jwt", True), ("application/at+JWT", True),
    ("application/jwt", True), ("dpop+jwt", False), ("logout+jwt", False), ("JOSE", False),
    (["JWT"], False), ("", False),
])
async def test_typ(issuer: IssuerServer, verifier: TokenVerifier, typ: Any, ok: bool) -> None:
    token = signed(issuer, "ES256", issuer.claims(), typ=typ)
    if ok:
        assert verifier.verify(token, time.time()).subject == "alice"
    else:
        assert fail(verifier, token).reason == "jwt-bad-typ"


async def test_time_claims(issuer: IssuerServer, verifier: TokenVerifier) -> None:
    now = time.time()
    n = int(now)
    expired = issuer.mint("ES256", iat=n - 600, exp=n - 60, sub="bob")
    failure = fail(verifier, expired, now)
    assert failure.reason == "jwt-expired"
    assert failure.subject == "bob"  # well-signed: who it was is known, for the event
    # within the 30 s leeway
    assert verifier.verify(issuer.mint("ES256", iat=n - 600, exp=n - 10), now)
    assert fail(verifier, issuer.mint("ES256", nbf=n + 120), now).reason == "jwt-not-yet-valid"
    assert verifier.verify(issuer.mint("ES256", nbf=n + 20), now)
    assert fail(verifier, issuer.mint("ES256", iat=n + 120, exp=n + 400),
                now).reason == "jwt-issued-in-future"
    too_long = issuer.mint("ES256", iat=n, exp=n + 86400 + 60)
    assert fail(verifier, too_long, now).reason == "jwt-lifetime-too-long"
    assert fail(verifier, issuer.mint("ES256", exp=None), now).reason == "jwt-missing-claim:exp"
    assert fail(verifier, issuer.mint("ES256", iat=None), now).reason == "jwt-missing-claim:iat"
    assert fail(verifier, issuer.mint("ES256", exp="tomorrow"), now).reason == "jwt-malformed"
    assert fail(verifier, issuer.mint("ES256", exp=True), now).reason == "jwt-malformed"
    # the same token is judged by the caller's clock
    token = issuer.mint("ES256", iat=n, exp=n + 100)
    assert verifier.verify(token, now)
    assert fail(verifier, token, now + 200).reason == "jwt-expired"


async def test_wrong_issuer(issuer: IssuerServer, verifier: TokenVerifier) -> None:
    for iss in ("https://evil.example", issuer.issuer + "/", issuer.issuer.upper(),
                issuer.issuer[:-1], [issuer.issuer], 42):
        token = signed(issuer, "ES256", issuer.claims(iss=iss))
        assert fail(verifier, token).reason == "jwt-wrong-issuer"
    assert fail(verifier, issuer.mint("ES256", iss=None)).reason == "jwt-missing-claim:iss"


async def test_non_string_iss_is_a_wrong_issuer_with_several_issuers(
        issuer: IssuerServer, verifier: TokenVerifier) -> None:
    # A scheme served by several issuers picks the verifier by `iss`: a list or an object
    # there (unhashable) is a wrong issuer, not a TypeError and a 500.
    bearer = BearerAuthenticator("bearer", "api", {
        issuer.issuer: ("idp", verifier, None),
        "https://other.example": ("other", verifier, None),
    }, [], TokenCache())
    exchange = Exchange("GET", b"/", b"", [], "127.0.0.1")
    for iss in ([issuer.issuer], {"iss": issuer.issuer}):
        token = signed(issuer, "ES256", issuer.claims(iss=iss))
        with pytest.raises(AuthFailure) as excinfo:
            bearer.authenticate(token, exchange)
        assert reason(excinfo) == "jwt-wrong-issuer"


async def test_a_token_without_iss_goes_to_the_issuer_that_does_not_check_it(
        issuer: IssuerServer, verifier: TokenVerifier, tmp_path: Path) -> None:
    secret = secrets.token_urlsafe(32).encode()  # a file secret loses one trailing newline
    (tmp_path / "hs.key").write_bytes(secret)
    legacy = TokenVerifier("legacy", Issuer.model_validate({
        "algorithms": ["HS256"], "shared_secret": {"file": "hs.key"}, "check_issuer": False,
        "check_audience": False, "required_claims": ["exp"], "max_lifetime": None}),
        None, "bearer", source_dir=tmp_path)
    bearer = BearerAuthenticator("bearer", "api", {
        issuer.issuer: ("idp", verifier, None),
        None: ("legacy", legacy, None),
    }, [], TokenCache())
    exchange = Exchange("GET", b"/", b"", [], "127.0.0.1")
    n = int(time.time())
    no_iss = sign_raw({"alg": "HS256"}, {"sub": "old-app-user", "exp": n + 60}, secret, "HS256")
    assert bearer.authenticate(no_iss, exchange).issuer == "legacy"
    assert bearer.authenticate(issuer.mint("ES256"), exchange).issuer == "idp"
    # the configured issuer's `iss` never falls back: a token naming it is judged by it
    spoof = sign_raw({"alg": "HS256"}, {"sub": "x", "exp": n + 60, "iss": issuer.issuer},
                     secret, "HS256")
    with pytest.raises(AuthFailure) as excinfo:
        bearer.authenticate(spoof, exchange)
    assert reason(excinfo) == "jwt-alg-not-allowed"


async def test_wrong_audience(issuer: IssuerServer, verifier: TokenVerifier) -> None:
    # a token the same issuer minted for another API
    for aud in ("https://other-api.example.test", ["https://other-api.example.test"],
                AUDIENCE + "/", [AUDIENCE.upper()], [1, 2]):
        assert fail(verifier, issuer.mint("ES256", aud=aud)).reason == "jwt-wrong-audience"
    assert verifier.verify(issuer.mint("ES256", aud=["other", AUDIENCE]), time.time())
    assert fail(verifier, issuer.mint("ES256", aud=None)).reason == "jwt-missing-claim:aud"


async def test_psychic_signature(issuer: IssuerServer, verifier: TokenVerifier) -> None:
    # CVE-2022-21449: ECDSA r = s = 0 "verifies" anything on broken implementations
    es = issuer.key("ES256")
    token = forge({"alg": "ES256", "kid": es.kid, "typ": "JWT"},
                  issuer.claims(sub="admin"), b"\x00" * 64)
    assert fail(verifier, token).reason == "jwt-bad-signature"
    # r = s = n (the group order) is the same attack modulo n
    n = bytes.fromhex("FFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551")
    token = forge({"alg": "ES256", "kid": es.kid}, issuer.claims(sub="admin"), n + n)
    assert fail(verifier, token).reason == "jwt-bad-signature"


@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA"])
async def test_stripped_and_truncated_signature(issuer: IssuerServer, keys: Keys,
                                                alg: str) -> None:
    token = issuer.mint(alg)
    head, payload, signature = token.split(".")
    before = issuer.count("/jwks.json")
    assert fail(keys.verifier, f"{head}.{payload}.").reason == "jwt-bad-signature"
    assert fail(keys.verifier, f"{head}.{payload}").reason == "jwt-malformed"
    short = f"{head}.{payload}.{signature[:-8]}"
    assert fail(keys.verifier, short).reason in ("jwt-bad-signature", "jwt-malformed")
    # with a made-up kid: refused on the signature's size alone, no key lookup, so junk
    # cannot make the caller refetch the issuer's keys
    if alg != "RS256":  # an RSA signature's size depends on the key
        junk = signed(issuer, alg, issuer.claims(), kid="junk-kid").rsplit(".", 1)[0]
        for sig in ("", b64(b"\x01" * 10), b64(b"\x01" * 200)):
            assert fail(keys.verifier, f"{junk}.{sig}").reason == "jwt-bad-signature"
    assert issuer.count("/jwks.json") == before


async def test_duplicate_claims_refused(issuer: IssuerServer, verifier: TokenVerifier) -> None:
    rs = issuer.key("RS256")
    claims = json.dumps(issuer.claims())[:-1]
    payload = (claims + ',"sub":"admin"}').encode()  # {"...","sub":"alice",...,"sub":"admin"}
    token = sign_raw({"alg": "RS256", "kid": rs.kid}, payload, rs.private, "RS256")
    assert fail(verifier, token).reason == "jwt-duplicate-claim"
    nested = (claims + ',"realm_access":{"roles":["user"],"roles":["admin"]}}').encode()
    token = sign_raw({"alg": "RS256", "kid": rs.kid}, nested, rs.private, "RS256")
    assert fail(verifier, token).reason == "jwt-duplicate-claim"
    header = f'{{"alg":"RS256","kid":"{rs.kid}","alg":"none"}}'.encode()
    token = sign_raw(header, issuer.claims(), rs.private, "RS256")
    assert fail(verifier, token).reason == "jwt-duplicate-claim"


async def test_tampered_payload(issuer: IssuerServer, verifier: TokenVerifier) -> None:
    for alg in ("RS256", "ES256", "EdDSA"):
        head, _, signature = issuer.mint(alg).split(".")
        forged = b64(json.dumps(issuer.claims(sub="admin", scope="admin")).encode())
        assert fail(verifier, f"{head}.{forged}.{signature}").reason == "jwt-bad-signature"


async def test_malformed_tokens(issuer: IssuerServer, verifier: TokenVerifier) -> None:
    rs = issuer.key("RS256")
    good = issuer.mint("RS256")
    head, payload, signature = good.split(".")
    assert signature[-1] in "AQgw"  # 256 bytes: 2 leftover chars, low 4 bits unused
    non_canonical = signature[:-1] + chr(ord(signature[-1]) + 1)
    bad_utf8 = b'{"sub":"\xff\xfe"}'
    cases = [
        "", "abc", "a.b", "a.b.c.d", f"{head}.{payload}.{signature}.{signature}",
        f"{head}=.{payload}.{signature}", f"{head}.{payload}.{signature}==",
        f"{head}.{payload}.{signature[:-1]}+", f"{head}.{payload}!.{signature}",
        f"{head}.{payload}.{non_canonical}", " " + good, good + "\n",
        f"{b64(b'[1,2]')}.{payload}.{signature}",
        f"{head}.{b64(b'not json')}.{signature}",
        f"{head}.{b64(json.dumps(['a']).encode())}.{signature}",
        f"{head}.{b64(bad_utf8)}.{signature}",
        "a" * 20000 + f".{payload}.{signature}",
    ]
    for token in cases:
        assert fail(verifier, token).reason == "jwt-malformed", token[:80]
    # signed, but not JSON as RFC 8259 defines it, or not a usable NumericDate
    for exp in ("NaN", "Infinity", "-Infinity", "1e999"):
        claims = json.dumps(issuer.claims(exp=None))[:-1] + f',"exp":{exp}}}'
        assert fail(verifier, signed(issuer, "RS256", claims.encode())).reason == \
            "jwt-malformed", exp
    token = sign_raw({"alg": "RS256", "kid": 42}, issuer.claims(), rs.private, "RS256")
    assert fail(verifier, token).reason == "jwt-malformed"


async def test_key_type_must_fit_alg(issuer: IssuerServer) -> None:
    es = issuer.key("ES256")
    rs = issuer.key("RS256")
    unpinned = issuer.add_key("RS256", publish_alg=False)
    settings = settings_for(issuer, algorithms=["RS256", "PS256", "ES256", "ES384"])
    async with _keys(issuer, settings) as k:
        # ES256 signature, kid of the RSA key
        token = sign_raw({"alg": "ES256", "kid": rs.kid}, issuer.claims(), es.private, "ES256")
        assert fail(k.verifier, token).reason == "jwt-alg-not-allowed"
        # a P-256 key named for ES384
        es384 = issuer.add_key("ES384")
        token = sign_raw({"alg": "ES384", "kid": es.kid}, issuer.claims(), es384.private,
                         "ES384")
        assert fail(k.verifier, token).reason == "jwt-alg-not-allowed"
        # the JWK pins alg RS256: a PS256 token with that kid is refused...
        token = sign_raw({"alg": "PS256", "kid": rs.kid}, issuer.claims(), rs.private, "PS256")
        assert fail(k.verifier, token).reason == "jwt-alg-not-allowed"
        # ... while an RSA JWK without `alg` serves RS* and PS*
        token = sign_raw({"alg": "PS256", "kid": unpinned.kid}, issuer.claims(),
                         unpinned.private, "PS256")
        assert k.verifier.verify(token, time.time()).subject == "alice"


async def test_token_without_kid(issuer: IssuerServer) -> None:
    async with _keys(issuer, settings_for(issuer)) as k:
        # exactly one key per family: a kid-less token is matched by type
        assert k.verifier.verify(issuer.mint("ES256", kid=None), time.time())
    issuer.add_key("ES256")
    async with _keys(issuer, settings_for(issuer)) as k:
        # two candidate keys: no guessing
        failure = fail(k.verifier, issuer.mint("ES256", kid=None))
        assert failure.reason == "jwt-unknown-kid"
        assert not isinstance(failure, UnknownKey)


async def test_non_signing_keys_are_ignored(issuer: IssuerServer) -> None:
    es = issuer.key("ES256")
    enc = dict(es.jwk(), use="enc", kid="enc-key")
    ops = dict(es.jwk(), key_ops=["encrypt"], kid="ops-key")
    octet = {"kty": "oct", "k": b64(HS_SECRET), "kid": "oct-key"}
    # a curve that is not a string (unhashable) skips that key, not the whole set
    bad_crv = dict(es.jwk(), crv=["P-256"], kid="crv-key")
    issuer.jwks_override = (
        json.dumps({"keys": [es.jwk(), enc, ops, octet, bad_crv]}).encode(),
        "application/json")
    async with _keys(issuer, settings_for(issuer)) as k:
        assert k.source.kids == {es.kid}
        for kid in ("enc-key", "ops-key"):
            token = sign_raw({"alg": "ES256", "kid": kid}, issuer.claims(), es.private, "ES256")
            assert isinstance(fail(k.verifier, token), UnknownKey)


# -- static keys -------------------------------------------------------------------------------


def test_static_key_files(issuer: IssuerServer, tmp_path: Path) -> None:
    rs = issuer.key("RS256")
    es = issuer.key("ES256")
    (tmp_path / "rs.pem").write_bytes(rs.public_pem())
    (tmp_path / "es.jwk").write_text(json.dumps(es.jwk()))
    settings = Issuer.model_validate({"issuer": issuer.issuer, "audiences": [AUDIENCE],
                                      "algorithms": ["RS256", "ES256"],
                                      "keys": ["rs.pem", "es.jwk"]})
    verifier = TokenVerifier("idp", settings, StaticKeys(settings, tmp_path), "bearer")
    # a PEM key has no kid: the issuer's kid is a hint (RFC 7515 4.1.4), the type decides
    assert verifier.verify(issuer.mint("RS256"), time.time())
    assert verifier.verify(issuer.mint("ES256"), time.time())


@pytest.mark.parametrize("content,message", [
    (None, "cannot read key file"),
    (b"-----BEGIN PRIVATE KEY-----\nMII\n-----END PRIVATE KEY-----\n", "private key"),
    (b"-----BEGIN PUBLIC KEY-----\ngarbage\n-----END PUBLIC KEY-----\n", "not a PEM"),
    (b"{not json", "neither PEM nor JSON"),
    (b'{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}', "no usable signing key"),
    ("weak", "1024 bits"),
])
def test_static_key_errors_name_the_file(tmp_path: Path, content: bytes | str | None,
                                         message: str) -> None:
    path = tmp_path / "key.pem"
    if content == "weak":
        weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
        content = weak.public_key().public_bytes(serialization.Encoding.PEM,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)
    if content is not None:
        assert isinstance(content, bytes)
        path.write_bytes(content)
    settings = Issuer.model_validate({"issuer": "https://idp", "audiences": ["a"],
                                      "algorithms": ["RS256"], "keys": ["key.pem"]})
    with pytest.raises(ValueError, match=message) as excinfo:
        StaticKeys(settings, tmp_path)
    assert str(path) in str(excinfo.value)


# -- JWKS: fetching, rotation, cooldown, staleness ---------------------------------------------


@asynccontextmanager
async def _keys(server: IssuerServer, settings: Issuer, **kwargs: Any) -> AsyncIterator[Keys]:
    """`async with _keys(server, settings) as k`: a started KeySource, closed after."""
    k = Keys(server, settings, **kwargs)
    await k.source.start()
    try:
        yield k
    finally:
        await k.source.close()


async def test_oidc_discovery(issuer: IssuerServer) -> None:
    settings = settings_for(issuer, jwks_url=None, discovery=True)
    async with _keys(issuer, settings) as k:
        assert issuer.count("/.well-known/openid-configuration") == 1
        assert issuer.count("/jwks.json") == 1
        assert k.verifier.verify(issuer.mint("EdDSA"), time.time()).subject == "alice"
    # the scheme's openIdConnectUrl, given explicitly
    explicit = f"{issuer.url}/.well-known/openid-configuration"
    async with _keys(issuer, settings, discovery_url=explicit) as k:
        assert k.source.ready


async def test_discovery_for_another_issuer_is_refused(issuer: IssuerServer,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    issuer.discovery_issuer = "https://evil.example"
    settings = settings_for(issuer, jwks_url=None, discovery=True)
    with caplog.at_level(logging.WARNING, "apishield"):
        async with _keys(issuer, settings) as k:
            assert not k.source.ready
            assert issuer.count("/jwks.json") == 0
            assert fail(k.verifier, issuer.mint("RS256")).reason == "jwt-no-keys"
    assert "another issuer" in caplog.text


async def test_rotation_picked_up_through_refresh_for_unknown(issuer: IssuerServer) -> None:
    cache = TokenCache()
    async with _keys(issuer, settings_for(issuer)) as k:
        k.source.on_removed = lambda kids: (k.removed.append(kids),
                                            cache.evict_kids("idp", kids))
        old_token = issuer.mint("ES256")
        old_kid = issuer.key("ES256").kid
        cache.put(old_token, k.verifier.verify(old_token, time.time()), "idp", old_kid)
        old, new = issuer.rotate("ES256")
        assert old == old_kid
        token = issuer.mint("ES256")
        with pytest.raises(UnknownKey) as excinfo:
            k.verifier.verify(token, time.time())
        assert excinfo.value.kid == new
        assert await k.source.refresh_for_unknown(new) is True
        assert k.verifier.verify(token, time.time()).subject == "alice"
        assert k.removed == [{old}]
        # tokens signed with the removed key stop working now, cached or not
        assert cache.get(old_token, time.time()) is None
        assert isinstance(fail(k.verifier, old_token), UnknownKey)


async def test_unknown_kid_flood_is_bounded_by_cooldown(issuer: IssuerServer) -> None:
    async with _keys(issuer, settings_for(issuer, jwks={"unknown_kid_cooldown": 0.5})) as k:
        before = issuer.count("/jwks.json")
        junk = [f"junk-{i}" for i in range(200)]
        results = await asyncio.gather(*(k.source.refresh_for_unknown(kid) for kid in junk))
        assert not any(results)
        assert issuer.count("/jwks.json") == before + 1  # 200 callers, one shared fetch
        for kid in junk:
            assert await k.source.refresh_for_unknown(kid) is False
        assert issuer.count("/jwks.json") == before + 1  # within the cooldown: none
        await asyncio.sleep(0.55)
        await asyncio.gather(*(k.source.refresh_for_unknown(kid) for kid in junk))
        assert issuer.count("/jwks.json") == before + 2


async def test_issuer_down_last_good_keys_served(issuer: IssuerServer,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    async with _keys(issuer, settings_for(issuer)) as k:
        token = issuer.mint("RS256")
        for mode in (True, "close"):
            issuer.down = mode
            with caplog.at_level(logging.WARNING, "apishield"):
                assert await k.source.refresh() is False
            assert k.verifier.verify(token, time.time()).subject == "alice"
        assert "serving the last good keys" in caplog.text
        assert k.removed == []


async def test_stale_keys_dropped_after_max_stale(issuer: IssuerServer) -> None:
    settings = settings_for(issuer, jwks={"refresh_min": 0.1, "refresh_max": 0.1,
                                          "max_stale": 0.3})
    async with _keys(issuer, settings) as k:
        token = issuer.mint("RS256")
        assert k.verifier.verify(token, time.time())
        kids = set(k.source.kids)
        issuer.down = True
        await asyncio.sleep(0.25)  # expired (0.1) but within max_stale
        assert k.verifier.verify(token, time.time())
        await asyncio.sleep(0.35)
        assert fail(k.verifier, token).reason == "jwt-no-keys"
        assert k.removed == [kids]  # the cache is told: every key went
        # the issuer comes back: the background retry reloads the keys
        issuer.down = False
        for _ in range(40):
            if k.source.ready:
                break
            await asyncio.sleep(0.05)
        assert k.verifier.verify(token, time.time())


async def test_start_while_issuer_down_then_recovers(issuer: IssuerServer,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    issuer.down = True
    settings = settings_for(issuer, jwks={"refresh_min": 0.1})
    with caplog.at_level(logging.WARNING, "apishield"):
        async with _keys(issuer, settings) as k:
            token = issuer.mint("ES256")
            assert fail(k.verifier, token).reason == "jwt-no-keys"
            assert "until keys arrive" in caplog.text
            issuer.down = False
            for _ in range(40):
                if k.source.ready:
                    break
                await asyncio.sleep(0.05)
            assert k.verifier.verify(token, time.time())


@pytest.mark.parametrize("max_age,expected", [(3600, 2.0), (1, 1.0), (0, 0.5), (None, 0.5)])
async def test_cache_control_clamped(issuer: IssuerServer, max_age: int | None,
                                     expected: float) -> None:
    issuer.max_age = max_age
    settings = settings_for(issuer, jwks={"refresh_min": 0.5, "refresh_max": 2})
    async with _keys(issuer, settings) as k:
        assert k.source.ttl == expected


async def test_background_refresh(issuer: IssuerServer) -> None:
    settings = settings_for(issuer, jwks={"refresh_min": 0.1, "refresh_max": 0.1})
    async with _keys(issuer, settings) as k:
        old, _ = issuer.rotate("EdDSA")
        await asyncio.sleep(0.45)
        assert issuer.count("/jwks.json") >= 3
        assert {old} in k.removed  # noticed without any token asking for it


@pytest.mark.parametrize("body,content_type", [
    (json.dumps({"keys": [], "pad": "x" * (1024 * 1024 + 10)}).encode(), "application/json"),
    (b"{}", "text/html"),
    (b"[not json", "application/json"),
    (b'{"keys": "no"}', "application/json"),
])
@pytest.mark.parametrize("omit_length", [False, True])
async def test_refused_jwks_documents(issuer: IssuerServer, body: bytes, content_type: str,
                                      omit_length: bool) -> None:
    issuer.jwks_override = (body, content_type)
    issuer.omit_length = omit_length  # the size cap holds without a Content-Length too
    async with _keys(issuer, settings_for(issuer)) as k:
        assert not k.source.ready


async def test_redirects(issuer: IssuerServer) -> None:
    settings = settings_for(issuer, jwks_url=f"{issuer.url}/redirect")
    issuer.redirect_to = "file:///etc/passwd"
    async with _keys(issuer, settings) as k:
        assert not k.source.ready
    issuer.redirect_to = f"{issuer.url}/jwks.json"  # same scheme: followed
    async with _keys(issuer, settings) as k:
        assert k.source.ready


async def test_https_verified_and_no_downgrade_redirect(issuer: IssuerServer) -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    with running_issuer(server_context) as secure:
        settings = settings_for(secure)
        async with _keys(secure, settings, ssl_context=client_context) as k:
            assert k.verifier.verify(secure.mint("ES256"), time.time())
        # the default context: the throwaway CA is not trusted
        async with _keys(secure, settings) as k:
            assert not k.source.ready
        # https -> http redirect: refused even though the http side serves good keys
        redirecting = settings_for(secure, jwks_url=f"{secure.url}/redirect")
        secure.redirect_to = f"{issuer.url}/jwks.json"
        async with _keys(secure, redirecting, ssl_context=client_context) as k:
            assert not k.source.ready
        assert issuer.count("/jwks.json") == 0
        secure.redirect_to = f"{secure.url}/jwks.json"
        async with _keys(secure, redirecting, ssl_context=client_context) as k:
            assert k.source.ready


async def test_stale_keys_refused_without_the_background_task(issuer: IssuerServer) -> None:
    """key_for enforces max_stale itself: a stalled refresher cannot extend trust."""
    settings = settings_for(issuer, jwks={"refresh_min": 0.1, "refresh_max": 0.1,
                                          "max_stale": 0.1})
    async with _keys(issuer, settings) as k:
        task = k.source._task
        assert task is not None
        task.cancel()
        token = issuer.mint("RS256")
        assert k.verifier.verify(token, time.time())
        await asyncio.sleep(0.25)
        assert fail(k.verifier, token).reason == "jwt-no-keys"


async def test_fetch_timeout(issuer: IssuerServer) -> None:
    issuer.delay = 1.0
    settings = settings_for(issuer, jwks={"fetch_timeout": 0.2})
    started = time.monotonic()
    async with _keys(issuer, settings) as k:
        assert not k.source.ready
    assert time.monotonic() - started < 0.9


async def test_close_cancels_background_task(issuer: IssuerServer) -> None:
    k = Keys(issuer, settings_for(issuer))
    await k.source.start()
    task = k.source._task
    assert task is not None and not task.done()
    await k.source.close()
    assert task.done()


# -- token cache ------------------------------------------------------------------------------


def _principal(subject: str = "alice", expires_at: float | None = None) -> Principal:
    return Principal(scheme="bearer", subject=subject, issuer="idp", expires_at=expires_at)


def test_token_cache_hit_miss_expiry() -> None:
    cache = TokenCache()
    now = 1_000_000.0
    principal = _principal(expires_at=now + 60)
    assert cache.get("tok", now) is None
    cache.put("tok", principal, "idp", "k1", now=now)
    assert cache.get("tok", now) is principal
    assert cache.get("tok2", now) is None
    assert cache.get("tok", now + 60) is None  # expired: a miss...
    assert len(cache) == 0  # ... and gone
    # no exp: kept max_ttl at most
    cache.put("forever", _principal(), "idp", None, now=now)
    assert cache.get("forever", now + 299) is not None
    assert cache.get("forever", now + 301) is None


def test_token_cache_never_stores_raw_tokens() -> None:
    cache = TokenCache()
    token = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2ln"
    cache.put(token, _principal(expires_at=time.time() + 60), "idp", "k1")
    cache.put_failure(token + "x", "jwt-bad-signature", time.time())
    for table in (cache._entries, cache._failures):
        for key in table:
            assert isinstance(key, bytes) and len(key) == 32
            assert token.encode() not in key


def test_token_cache_bounded_lru() -> None:
    cache = TokenCache(max_entries=3)
    now = time.time()
    for i in range(3):
        cache.put(f"t{i}", _principal(f"u{i}", now + 60), "idp", None, now=now)
    assert cache.get("t0", now) is not None  # t0 used: t1 is now the oldest
    cache.put("t3", _principal("u3", now + 60), "idp", None, now=now)
    assert len(cache) == 3
    assert cache.get("t1", now) is None
    assert all(cache.get(t, now) is not None for t in ("t0", "t2", "t3"))
    for i in range(100):
        cache.put_failure(f"junk{i}", "jwt-bad-signature", now)
    assert len(cache._failures) == 3


def test_token_cache_failures() -> None:
    cache = TokenCache(failure_ttl=10.0)
    now = 1_000_000.0
    cache.put_failure("junk", "jwt-bad-signature", now)
    assert cache.failure("junk", now + 9) == "jwt-bad-signature"
    assert cache.failure("junk", now + 10) is None
    assert cache.failure("other", now) is None
    # key-set dependent reasons are not cached: the keys may arrive a moment later
    cache.put_failure("new-kid", "jwt-unknown-kid", now)
    cache.put_failure("no-keys", "jwt-no-keys", now)
    assert cache.failure("new-kid", now) is None
    assert cache.failure("no-keys", now) is None


def test_token_cache_evict_kids() -> None:
    cache = TokenCache()
    now = time.time()
    for token, issuer, kid in (("a", "idp", "k1"), ("b", "idp", "k2"), ("c", "other", "k1")):
        cache.put(token, _principal(expires_at=now + 60), issuer, kid)
    assert cache.evict_kids("idp", {"k1"}) == 1
    assert cache.get("a", now) is None
    assert cache.get("b", now) is not None
    assert cache.get("c", now) is not None  # same kid, another issuer


async def test_junk_token_costs_one_signature_check(issuer: IssuerServer,
                                                    verifier: TokenVerifier) -> None:
    """The way the authenticator combines them: a cached failure skips the verifier."""
    cache = TokenCache()
    head, _, signature = issuer.mint("RS256").split(".")
    junk = f"{head}.{b64(json.dumps(issuer.claims(sub='admin')).encode())}.{signature}"
    calls = 0
    real = verifier.keys.key_for

    def counting(kid: str | None, alg: str) -> Any:
        nonlocal calls
        calls += 1
        return real(kid, alg)

    verifier.keys.key_for = counting  # type: ignore[method-assign]
    for _ in range(5):
        now = time.time()
        if cache.failure(junk, now) is None:
            try:
                verifier.verify(junk, now)
            except AuthFailure as failure:
                cache.put_failure(junk, failure.reason, now)
    assert calls == 1
    assert cache.failure(junk, time.time()) == "jwt-bad-signature"


# -- introspection -----------------------------------------------------------------------------


def introspection_settings(server: IssuerServer, **overrides: Any) -> Issuer:
    config = {"url": f"{server.url}/introspect", "client_id": "gateway",
              "client_secret": {"env": "TEST_INTROSPECTION_SECRET"}, "timeout": 1,
              **overrides}
    return Issuer.model_validate({"issuer": server.issuer, "audiences": [AUDIENCE],
                                  "introspection": config})


@pytest.fixture
def introspector(issuer: IssuerServer, monkeypatch: pytest.MonkeyPatch) -> Introspector:
    monkeypatch.setenv("TEST_INTROSPECTION_SECRET", CLIENT_SECRET)
    return Introspector("idp", introspection_settings(issuer), "bearer", ".")


def _active(issuer: IssuerServer, **overrides: Any) -> dict[str, Any]:
    answer = {"active": True, "sub": "carol", "scope": "read", "iss": issuer.issuer,
              "aud": AUDIENCE, "exp": int(time.time()) + 600, "client_id": "app",
              "roles": ["auditor"]}
    answer.update(overrides)
    return {k: v for k, v in answer.items() if v is not None}


async def test_introspection_active(issuer: IssuerServer, introspector: Introspector) -> None:
    issuer.tokens["opaque-1"] = _active(issuer)
    now = time.time()
    assert introspector.cached("opaque-1", now) is None
    principal = await introspector.introspect("opaque-1", now)
    assert (principal.subject, principal.scopes, principal.roles, principal.issuer) == (
        "carol", {"read"}, {"auditor"}, "idp")
    assert introspector.cached("opaque-1", now + 1) is principal
    assert await introspector.introspect("opaque-1", now + 1) is principal
    assert issuer.count("/introspect") == 1
    assert issuer.introspected == ["opaque-1"]


async def test_introspection_inactive_is_cached_briefly(issuer: IssuerServer,
                                                        introspector: Introspector) -> None:
    now = time.time()
    for answer in ({"active": False}, {"active": "true", "sub": "x"}, {}):
        issuer.tokens["dead"] = answer
        introspector._inactive.clear()
        with pytest.raises(AuthFailure) as excinfo:
            await introspector.introspect("dead", now)
        assert reason(excinfo) == "token-inactive"
    count = issuer.count("/introspect")
    with pytest.raises(AuthFailure, match="token-inactive"):
        introspector.cached("dead", now + 5)
    with pytest.raises(AuthFailure, match="token-inactive"):
        await introspector.introspect("dead", now + 5)
    assert issuer.count("/introspect") == count
    assert introspector.cached("dead", now + 11) is None  # 10 s later: asked again


async def test_introspection_unavailable_fails_closed(issuer: IssuerServer,
                                                      introspector: Introspector,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    issuer.tokens["opaque-2"] = _active(issuer)
    with caplog.at_level(logging.WARNING, "apishield"):
        for mode in (True, "close"):
            issuer.down = mode
            with pytest.raises(AuthFailure) as excinfo:
                await introspector.introspect("opaque-2", time.time())
            assert reason(excinfo) == "introspection-unavailable"
        issuer.down = False
        issuer.delay = 1.5  # slower than the 1 s timeout
        with pytest.raises(AuthFailure, match="introspection-unavailable"):
            await introspector.introspect("opaque-2", time.time())
        issuer.delay = 0
        # wrong client credentials: the issuer answers 401
        monkeypatch.setenv("TEST_INTROSPECTION_SECRET", "not-the-secret-42")
        wrong = Introspector("idp", introspection_settings(issuer), "bearer")
        with pytest.raises(AuthFailure, match="introspection-unavailable"):
            await wrong.introspect("opaque-2", time.time())
    # an outage is not cached as an answer: once up, the token works
    assert (await introspector.introspect("opaque-2", time.time())).subject == "carol"
    assert "opaque-2" not in caplog.text
    assert "HTTP 401" in caplog.text
    assert CLIENT_SECRET not in caplog.text and "not-the-secret-42" not in caplog.text


async def test_introspection_cache_bounded_by_exp(issuer: IssuerServer,
                                                  introspector: Introspector) -> None:
    now = time.time()
    issuer.tokens["short"] = _active(issuer, exp=now + 2)
    await introspector.introspect("short", now)
    assert introspector.cached("short", now + 1.5) is not None
    assert introspector.cached("short", now + 2.5) is None  # cache_ttl is 300 s: exp wins


async def test_introspection_checks_iss_aud_exp(issuer: IssuerServer,
                                                introspector: Introspector) -> None:
    now = time.time()
    cases = {
        "t-iss": (_active(issuer, iss="https://evil.example"), "token-wrong-issuer"),
        "t-aud": (_active(issuer, aud=["https://other-api"]), "token-wrong-audience"),
        "t-exp": (_active(issuer, exp=int(now) - 120), "token-expired"),
        "t-sub": (_active(issuer, sub=None, client_id=None), "token-missing-subject"),
    }
    for token, (answer, expected) in cases.items():
        issuer.tokens[token] = answer
        with pytest.raises(AuthFailure) as excinfo:
            await introspector.introspect(token, now)
        assert reason(excinfo) == expected
    # absent iss / aud are fine (RFC 7662: optional); client_id stands in for sub
    issuer.tokens["t-min"] = {"active": True, "client_id": "service-a"}
    assert (await introspector.introspect("t-min", now)).subject == "service-a"


async def test_introspection_single_flight_and_bounded(issuer: IssuerServer,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_INTROSPECTION_SECRET", CLIENT_SECRET)
    introspector = Introspector("idp", introspection_settings(issuer), "bearer",
                                max_entries=2)
    issuer.tokens.update({f"t{i}": _active(issuer, sub=f"u{i}") for i in range(3)})
    issuer.delay = 0.2
    now = time.time()
    results = await asyncio.gather(*(introspector.introspect("t0", now) for _ in range(20)))
    assert {p.subject for p in results} == {"u0"}
    assert issuer.count("/introspect") == 1
    issuer.delay = 0
    await introspector.introspect("t1", now)
    await introspector.introspect("t2", now)
    assert introspector.cached("t0", now) is None  # evicted: bounded
    assert introspector.cached("t2", now) is not None
