"""Tokens as real apps issue them (issue 16, A1), through a real gateway: HS256 with only
`sub` and `exp`, a secret too short to be safe, and what `check` says about it."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import DATA

SHORT_SECRET = "s3cr6t"  # 6 bytes, as one of the apps had


def hs256(claims: dict[str, Any], secret: bytes) -> str:
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims).encode())
    signature = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(signature)}"


def bearer_contract(tmp_path: Path) -> Path:
    contract = yaml.safe_load((DATA / "contract.yaml").read_text())
    contract["components"]["securitySchemes"]["bearer"] = {"type": "http", "scheme": "bearer"}
    contract["paths"]["/echo"]["get"]["security"] = [{"bearer": []}]
    path = tmp_path / "bearer-contract.yaml"
    path.write_text(yaml.safe_dump(contract))
    return path


LEGACY_ISSUER = {"algorithms": ["HS256"], "shared_secret": {"env": "APISHIELD_TEST_APP_SECRET"},
                 "check_issuer": False, "check_audience": False, "required_claims": ["exp"],
                 "max_lifetime": None}


def test_a_short_secret_is_refused_where_it_is_configured(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APISHIELD_TEST_APP_SECRET", SHORT_SECRET)
    contract = bearer_contract(tmp_path)
    for name in ("paths.yaml",):
        (tmp_path / name).write_text((DATA / name).read_text())
    config = tmp_path / "apishield.yaml"
    config.write_text(yaml.safe_dump({
        "contract": contract.name, "upstream": {"url": "http://127.0.0.1:9"},
        "auth": {"issuers": {"app": LEGACY_ISSUER}}}))
    result = subprocess.run([sys.executable, "-m", "apishield", "check", "--config",
                             str(config)], capture_output=True, text=True, timeout=30,
                            check=False)
    assert result.returncode == 2
    assert "  auth.issuers.app.shared_secret: is 6 bytes; HS256 needs at least 32" in \
        result.stderr
    assert SHORT_SECRET not in result.stderr
    config.write_text(yaml.safe_dump({
        "contract": contract.name, "upstream": {"url": "http://127.0.0.1:9"},
        "auth": {"issuers": {"app": {**LEGACY_ISSUER, "allow_weak_secret": True}}}}))
    result = subprocess.run([sys.executable, "-m", "apishield", "check", "--config",
                             str(config)], capture_output=True, text=True, timeout=30,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert ("warning: auth.issuers.app: its shared secret is 6 bytes; HS256 needs at least "
            "32 (the hash output size, RFC 7518 3.2); accepted because the issuer sets "
            "allow_weak_secret") in result.stderr


def test_legacy_tokens_are_checked_not_waved_through(
        tmp_path: Path, make_gateway: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APISHIELD_TEST_APP_SECRET", SHORT_SECRET)
    gateway = make_gateway(
        {"auth": {"issuers": {"app": {**LEGACY_ISSUER, "allow_weak_secret": True}}}},
        contract=bearer_contract(tmp_path))
    secret = SHORT_SECRET.encode()
    n = int(time.time())
    good = hs256({"sub": "user-7", "exp": n + 600}, secret)
    response = httpx.get(f"{gateway.url}/echo", headers={"authorization": f"Bearer {good}"})
    assert response.status_code == 200
    assert dict((k.lower(), v) for k, v in response.json()["headers"])[
        "x-apishield-subject"] == "user-7"
    refused = {
        "forged": hs256({"sub": "admin", "exp": n + 600}, b"another-secret"),
        "no exp": hs256({"sub": "user-7"}, secret),
        "expired": hs256({"sub": "user-7", "exp": n - 600}, secret),
    }
    reasons = {}
    for what, token in refused.items():
        response = httpx.get(f"{gateway.url}/echo", headers={"authorization": f"Bearer {token}"})
        assert response.status_code == 401, what
        reasons[what] = gateway.log_entry(response.headers["x-request-id"])["reason"]
    assert reasons == {"forged": "jwt-bad-signature", "no exp": "jwt-missing-claim:exp",
                       "expired": "jwt-expired"}
    assert "accepted because the issuer sets allow_weak_secret" in gateway.stderr()
    assert SHORT_SECRET not in gateway.stderr()
