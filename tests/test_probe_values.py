"""The probe's value and token generators, in-process: what they send is what they claim
(a format break the gateway's engine refuses, a pattern miss that really misses, a bounded
walk of recursive schemas, tokens whose signatures are what each attack needs)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import jsonschema_rs
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from apishield.contract.loader import RefResolver
from apishield.probe.bodies import MAX_DEPTH, MAX_VARIANTS, variants
from apishield.probe.issuer_keys import read_key_file
from apishield.probe.tokens import (
    JKU,
    X5U,
    attack_tokens,
    decode_jwt,
    key_confusion_tokens,
    probe_key,
)
from apishield.probe.values import Schemas, pattern_miss

HERE = Path(".")


def _b64(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


@pytest.mark.parametrize("fmt", ["email", "uuid", "date", "date-time", "time", "ipv4", "ipv6",
                                 "uri", "hostname"])
def test_each_format_break_is_refused_by_the_gateways_engine(fmt):
    [broken] = [b for b in Schemas(None).breaks({"type": "string", "format": fmt}, HERE)
                if b.rule == "probe-schema-format"]
    validator = jsonschema_rs.Draft202012Validator({"type": "string", "format": fmt},
                                                   validate_formats=True)
    assert not validator.is_valid(broken.value)


def test_a_format_break_that_would_also_break_a_length_is_not_planned():
    breaks = Schemas(None).breaks({"type": "string", "format": "email", "maxLength": 5}, HERE)
    assert "probe-schema-format" not in {b.rule for b in breaks}


@pytest.mark.parametrize("pattern, node, expected", [
    ("^[A-Z]{3}$", {}, "!"),
    ("^[a-z!~0 -]+$", {}, "A"),  # the first candidates match: a later one is used
    (".*", {}, None),  # matches everything: no attempt
    ("(", {}, None),  # does not compile: the gateway refuses the contract anyway
    ("^[A-Z]+$", {"minLength": 3, "maxLength": 5}, "probe"),  # within the length bounds
])
def test_pattern_miss_really_misses_and_keeps_the_length_valid(pattern, node, expected):
    miss = pattern_miss(pattern, node)
    assert miss == expected
    if miss is not None:
        assert not jsonschema_rs.Draft202012Validator({"pattern": pattern}).is_valid(miss)


def test_min_length_break_only_where_nothing_else_would_break():
    plain = Schemas(None).breaks({"type": "string", "minLength": 3}, HERE)
    assert [(b.rule, b.value) for b in plain] == [("probe-schema-bounds", "pp")]
    formatted = Schemas(None).breaks({"type": "string", "minLength": 30, "format": "email"},
                                     HERE)
    assert "shorter than minLength 30" not in {b.what for b in formatted}


def _walk(tmp_path: Path, document: dict[str, Any], schema_name: str) -> list[Any]:
    path = tmp_path / "contract.json"
    path.write_text(json.dumps(document))
    schema = {"$ref": f"#/components/schemas/{schema_name}"}
    return list(variants(Schemas(RefResolver(path, document)), schema, path,
                         "/paths/~1x/post/requestBody/content/application~1json/schema"))


def test_a_recursive_schema_is_walked_to_a_bounded_depth(tmp_path):
    node = {"type": "object", "required": ["name"], "properties": {
        "name": {"type": "string", "maxLength": 8},
        "child": {"$ref": "#/components/schemas/Node"}}}
    found = _walk(tmp_path, {"components": {"schemas": {"Node": node}}}, "Node")
    deepest = max(found, key=lambda v: v.what.count("child."))
    assert deepest.what.count("child.") == MAX_DEPTH
    assert len(found) < MAX_VARIANTS
    # each variant changes one thing: the body at its path is broken, the rest valid
    assert all(v.at[1].startswith("/components/schemas/Node") for v in found)


def test_wide_schemas_stop_at_the_variant_cap(tmp_path):
    wide = {"type": "object", "properties": {
        f"p{i}": {"type": "object", "properties": {
            f"q{j}": {"type": "integer", "minimum": 0, "maximum": 9} for j in range(20)}}
        for i in range(20)}}
    assert len(_walk(tmp_path, {"components": {"schemas": {"Wide": wide}}}, "Wide")) == \
        MAX_VARIANTS


def test_key_confusion_token_is_hmac_of_the_public_key_pem(tmp_path):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    jwks = tmp_path / "jwks.json"
    jwk = jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    jwks.write_text(json.dumps({"keys": [{**jwk, "kid": "k1", "use": "sig"}]}))
    assert read_key_file(jwks) == [("k1", pem)]  # a JWK becomes its SPKI PEM
    real = jwt.encode({"sub": "alice", "aud": "api"}, key, algorithm="RS256",
                      headers={"kid": "k1"})
    [(what, token)] = key_confusion_tokens(real, None, None, "RS256",
                                           [("k0", b"other"), ("k1", pem)])
    assert "kid k1" in what  # the real token's kid picked its key
    header, claims, signature = decode_jwt(token) or ({}, {}, "")
    assert header == {"alg": "HS256", "typ": "JWT", "kid": "k1"}
    assert claims == {"sub": "alice", "aud": "api"}
    signing_input = token.rsplit(".", 1)[0].encode()
    assert _b64(signature) == hmac.new(pem, signing_input, hashlib.sha256).digest()


@pytest.mark.parametrize("alg, length", [("RS256", 64), ("ES256", 64), ("ES384", 96),
                                         ("ES512", 132)])
def test_psychic_signature_is_all_zero_bytes_of_the_algorithms_length(alg, length):
    _what, token = attack_tokens(None, "https://issuer.test", "api", alg)[
        "probe-jwt-psychic-signature"]
    header, claims, signature = decode_jwt(token) or ({}, {}, "")
    assert header["alg"] == ("ES256" if alg == "RS256" else alg)
    assert _b64(signature) == bytes(length)
    assert claims["iss"] == "https://issuer.test" and claims["aud"] == "api"


def test_self_signed_tokens_verify_with_the_key_their_header_names():
    tokens = attack_tokens(None, None, None, "ES256")
    jwk_token = tokens["probe-jwt-embedded-jwk"][1]
    header = jwt.get_unverified_header(jwk_token)
    key = jwt.PyJWK(header["jwk"], algorithm="ES256").key
    assert jwt.api_jws.PyJWS().decode(jwk_token, key, algorithms=["ES256"])
    assert jwt.get_unverified_header(tokens["probe-jwt-jku"][1])["jku"] == JKU
    assert jwt.get_unverified_header(tokens["probe-jwt-x5u"][1])["x5u"] == X5U
    assert JKU.startswith("https://apishield-probe.invalid/")


def test_ec_probe_keys_are_the_same_every_run():
    first = probe_key("ES256").private_numbers().private_value
    probe_key.cache_clear()
    assert probe_key("ES256").private_numbers().private_value == first
    assert isinstance(probe_key("ES384"), ec.EllipticCurvePrivateKey)
