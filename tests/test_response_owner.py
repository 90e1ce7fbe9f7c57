"""Ownership on the response side (issue 16, A6): an API that finds objects by title
leaked another user's object; the owner is only in the answer. Real gateway, real
upstream, API keys made by the real CLI (a key's name is its subject)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from apishield.config import ConfigError, Owner
from tests.conftest import DATA, RunningGateway


def things_contract(tmp_path: Path, owner: dict[str, Any], list_owner: dict[str, Any]) -> Path:
    contract = yaml.safe_load((DATA / "contract.yaml").read_text())
    secured = [{"apiKey": []}]
    thing = {"type": "object", "properties": {"title": {"type": "string"},
                                              "owner": {"type": "string"},
                                              "secret": {"type": "string"}}}
    contract["paths"]["/things/{title}"] = {"get": {
        "operationId": "getThing", "security": secured, "x-apishield": {"owner": owner},
        "parameters": [{"name": "title", "in": "path", "required": True,
                        "schema": {"type": "string"}}],
        "responses": {"200": {"description": "ok", "content": {
            "application/json": {"schema": thing}}}}}}
    contract["paths"]["/things"] = {"get": {
        "operationId": "listThings", "security": secured,
        "x-apishield": {"owner": list_owner},
        "responses": {"200": {"description": "ok", "content": {"application/json": {
            "schema": {"type": "object", "properties": {
                "items": {"type": "array", "items": thing}, "total": {"type": "integer"}}}}}}}}}
    path = tmp_path / "things.yaml"
    path.write_text(yaml.safe_dump(contract))
    return path


def key_for(gateway: RunningGateway, name: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "apishield", "keys", "create", "--name", name, *args,
         "--config", str(gateway.config_path)],
        capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()[0].strip()


@pytest.fixture
def things_gateway(tmp_path: Path, make_gateway: Any) -> RunningGateway:
    contract = things_contract(
        tmp_path, {"response": "body.owner", "bypass_roles": ["support"]},
        {"response": "body.items[].owner"})
    return make_gateway({"auth": {"roles": {"support": []}}}, contract=contract)


def test_another_users_object_is_a_404_with_nothing_of_it(things_gateway: RunningGateway):
    gateway = things_gateway
    alice = {"X-Api-Key": key_for(gateway, "alice")}
    bob = {"X-Api-Key": key_for(gateway, "bob")}
    mine = httpx.get(f"{gateway.url}/things/alpha", headers=alice)
    assert mine.status_code == 200 and mine.json()["secret"] == "alice's note"
    theirs = httpx.get(f"{gateway.url}/things/alpha", headers=bob)
    assert theirs.status_code == 404
    assert "alice" not in theirs.text and "note" not in theirs.text
    # apishield's generic 404, as for a path the contract does not declare
    undeclared = httpx.get(f"{gateway.url}/nowhere", headers=bob)
    assert {k: v for k, v in theirs.json().items() if k != "instance"} == \
        {k: v for k, v in undeclared.json().items() if k != "instance"}
    entry = gateway.log_entry(theirs.headers["x-request-id"])
    assert (entry["outcome"], entry["reason"]) == ("refused", "owner-mismatch")
    security = [line for line in gateway.stderr().splitlines() if "authz-denied" in line]
    assert any("owner-mismatch" in line and "bob" in line for line in security)
    # what cannot be checked is not sent
    unverifiable = httpx.get(f"{gateway.url}/things/not-json", headers=alice)
    assert unverifiable.status_code == 404 and "owner=alice" not in unverifiable.text


def test_a_list_keeps_only_the_callers_items(things_gateway: RunningGateway):
    gateway = things_gateway
    alice = {"X-Api-Key": key_for(gateway, "alice")}
    listed = httpx.get(f"{gateway.url}/things", headers=alice)
    assert listed.status_code == 200
    assert [t["title"] for t in listed.json()["items"]] == ["alpha", "gamma"]
    assert "bob" not in listed.text
    entry = gateway.log_entry(listed.headers["x-request-id"])
    assert entry["reason"] == "owner-filtered"


def test_a_bypass_role_sees_everything(things_gateway: RunningGateway):
    gateway = things_gateway
    support = {"X-Api-Key": key_for(gateway, "carol", "--role", "support")}
    assert httpx.get(f"{gateway.url}/things/beta", headers=support).json()["owner"] == "bob"


def test_a_403_when_asked_and_log_only_lets_it_through(tmp_path: Path, make_gateway: Any):
    contract = things_contract(tmp_path, {"response": "body.owner", "on_mismatch": 403},
                               {"response": "body.items[].owner"})
    gateway = make_gateway(contract=contract)
    bob = {"X-Api-Key": key_for(gateway, "bob")}
    assert httpx.get(f"{gateway.url}/things/alpha", headers=bob).status_code == 403
    shadow = make_gateway({"mode": "log-only"}, contract=contract)
    bob = {"X-Api-Key": key_for(shadow, "bob")}
    seen = httpx.get(f"{shadow.url}/things/alpha", headers=bob)
    assert seen.status_code == 200  # shadow mode: logged, not enforced
    entry = shadow.log_entry(seen.headers["x-request-id"])
    assert (entry["outcome"], entry["reason"]) == ("shadowed", "owner-mismatch")


@pytest.mark.parametrize(("owner", "problem"), [
    ({"response": "owner"}, "must be body.FIELD"),
    ({"response": "body[]"}, "must be body.FIELD"),
    ({"param": "path.id", "response": "body.owner"}, "give exactly one of `param`"),
])
def test_owner_rules_are_checked_at_load(owner: dict[str, Any], problem: str) -> None:
    from pydantic import ValidationError

    with pytest.raises((ValidationError, ConfigError)) as caught:
        Owner.model_validate(owner)
    assert problem in str(caught.value)
