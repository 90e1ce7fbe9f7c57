"""`apishield probe` with several identities and several requests per attempt (issue 17):
BOLA replays, role calls and rate-limit bursts (probe/ownership.py, roles.py, bursts.py).

The target is the real gateway (`apishield serve`, conftest's `start_gateway`) in front of
the bundled demo API, with two API keys made by the real `keys` CLI: "alice" (subject 1,
role staff) and "bob" (subject 2, no role); the demo's users 1 and 2 own orders 1-2 and 3.
The probe always reads the sound policy (`probe.yaml`); the gateway runs either the same
policy, where every attempt is refused, or the same with one hole opened (an owner rule
removed, a role requirement removed, the limit raised), where exactly that attempt gets
through. The probe runs in-process through `apishield.cli.main.main`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from apishield.cli.main import main
from apishield.demo.api import DemoServer
from tests.conftest import RunningGateway, start_gateway
from tests.test_probe import (
    FAST,
    SARIF_SCHEMA,
    demo,
    got_through,
    probe,
    protected_contract,
)

__all__ = ["demo"]  # the fixture, used by name

ONLY = ["--only", "bola,roles,rate-limit"]
SOUND: dict[str, Any] = {
    "operations": {
        "getUser": {"owner": {"param": "path.userId", "equals": "subject"}},
        "listUserOrders": {"owner": {"param": "path.userId", "equals": "subject"}},
        "getOrder": {"owner": {"response": "body.user_id", "equals": "subject"}},
        "listPets": {"require": {"roles": ["staff"]}},
    },
    "rate_limiting": {"limits": [{"name": "pet-reads", "key": ["identity"], "rate": "5/m",
                                  "operations": ["getPet"]}]},
}
EVERY_ATTEMPT = {("probe-bola", "getUser"), ("probe-bola", "listUserOrders"),
                 ("probe-bola", "getOrder"), ("probe-role-escalation", "listPets"),
                 ("probe-rate-limit", "getPet")}


def contract(folder: Path) -> Path:
    """The demo's contract behind an API key, pets readable by anyone (a public catalog:
    no BOLA there, the rate limit's anonymous target)."""
    path = protected_contract(folder)
    document = yaml.safe_load(path.read_text())
    document["paths"]["/pets/{petId}"]["get"]["security"] = []
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


class Deployment:
    """Gateways started one after another on one state file (so the keys made once serve
    them all), in front of one demo API; and the probe's own config: the sound policy."""

    def __init__(self, folder: Path, demo: DemoServer,
                 probe_policy: dict[str, Any] = SOUND) -> None:
        self.folder = folder
        self.demo = demo
        self.contract = contract(folder)
        self.state = folder / "state.db"
        self.count = 0
        self.probe_config = folder / "probe.yaml"
        self.probe_config.write_text(yaml.safe_dump({"contract": self.contract.name,
                                                     **probe_policy}))
        self.keys: dict[str, str] = {}

    def start(self, policy: dict[str, Any]) -> RunningGateway:
        self.count += 1
        workdir = self.folder / f"gw{self.count}"
        workdir.mkdir()
        host, port = self.demo.server_address
        gateway = start_gateway(workdir, f"http://{host}:{port}",
                                {"state": str(self.state), **policy}, contract=self.contract)
        if not self.keys:
            self.keys = {"alice": self._key(gateway, "1", "staff"),
                         "bob": self._key(gateway, "2", None)}
        return gateway

    @staticmethod
    def _key(gateway: RunningGateway, subject: str, role: str | None) -> str:
        created = subprocess.run(
            [sys.executable, "-m", "apishield", "keys", "create", "--name", subject,
             "--config", str(gateway.config_path), *(["--role", role] if role else [])],
            capture_output=True, text=True, timeout=30, check=False)
        assert created.returncode == 0, created.stderr
        return created.stdout.splitlines()[0].strip()

    def identities(self, *, swapped: bool = False) -> list[str]:
        alice, bob = f"alice:staff={self.keys['alice']}", f"bob:={self.keys['bob']}"
        pair = [bob, alice] if swapped else [alice, bob]
        return [arg for identity in pair for arg in ("--identity", identity)]

    def run(self, capsys: pytest.CaptureFixture[str], gateway: RunningGateway,
            *argv: str, swapped: bool = False) -> tuple[int, dict[str, Any]]:
        code, report = probe(capsys, "--config", str(self.probe_config), "--target",
                             gateway.url, *self.identities(swapped=swapped), *ONLY,
                             "--format", "json", *FAST, *argv)
        assert isinstance(report, dict)
        return code, report


def without(policy: dict[str, Any], operation: str, key: str) -> dict[str, Any]:
    operations = {**policy["operations"],
                  operation: {k: v for k, v in policy["operations"][operation].items()
                              if k != key}}
    return {**policy, "operations": operations}


@pytest.fixture
def deployment(tmp_path: Path, demo: DemoServer) -> Deployment:
    return Deployment(tmp_path, demo)


def by_operation(report: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(a["rule"], a["operation"]): a for a in report["attempts"]}


def test_a_sound_policy_refuses_every_bola_role_and_burst_attempt(deployment, capsys):
    gateway = deployment.start(SOUND)
    try:
        code, report = deployment.run(capsys, gateway)
    finally:
        gateway.stop()
    attempts = by_operation(report)
    assert set(attempts) == EVERY_ATTEMPT
    assert {a["verdict"] for a in report["attempts"]} == {"refused"}, report["attempts"]
    assert code == 0
    # B asked for A's objects: the owner rules refused them (403 param side, 404 answer side)
    assert attempts[("probe-bola", "getUser")]["status"] == 403
    order = attempts[("probe-bola", "getOrder")]
    assert order["status"] == 404 and "bob may not read identity alice's" in order["detail"]
    # the order id came from alice's list of her orders, then alice read it, then bob
    assert [(r["step"], r["identity"], r["target"], r["status"]) for r in order["requests"]] \
        == [("list", "alice", "/users/1/orders", 200), ("owner", "alice", "/orders/1", 200),
            ("intruder", "bob", "/orders/1", 404)]
    # bob lacks the staff role listPets requires; alice holds it and makes no role attempt
    role = attempts[("probe-role-escalation", "listPets")]
    assert role["status"] == 403 and "identity bob" in role["what"]
    assert role["problem_type"].endswith("access-denied")
    # the burst: 5 admitted at once, the sixth refused with the limit's headers
    burst = attempts[("probe-rate-limit", "getPet")]
    assert burst["status"] == 429 and burst["problem_type"].endswith("rate-limited")
    assert [r["status"] for r in burst["requests"]] == [200] * 5 + [429]
    assert "pet-reads" in burst["detail"]
    # the report lists every request sent, and `sent` counts them: 3 + 2 + 2 + 1 + 6
    assert report["summary"]["sent"] == 14
    assert deployment.keys["alice"] not in json.dumps(report)
    assert deployment.keys["bob"] not in json.dumps(report)


@pytest.mark.parametrize("hole, expected", [
    (without(SOUND, "getUser", "owner"), ("probe-bola", "getUser")),
    (without(SOUND, "listPets", "require"), ("probe-role-escalation", "listPets")),
    ({**SOUND, "rate_limiting": {"limits": [{"name": "pet-reads", "key": ["identity"],
                                            "rate": "1000/m", "operations": ["getPet"]}]}},
     ("probe-rate-limit", "getPet")),
], ids=["owner-rule-removed", "role-requirement-removed", "limit-raised"])
def test_each_hole_opened_alone_is_exactly_what_gets_through(deployment, capsys, hole,
                                                             expected):
    gateway = deployment.start(hole)
    try:
        code, report = deployment.run(capsys, gateway)
    finally:
        gateway.stop()
    assert got_through(report) == {expected}, report["attempts"]
    assert code == 1
    [finding] = report["got_through"]
    assert finding["rule"] == expected[0]
    assert (finding["checklist"], finding["owasp"]) == {
        "probe-bola": ("A6", "API1"), "probe-role-escalation": ("A5", "API5"),
        "probe-rate-limit": ("D1", "API4")}[expected[0]]
    others = [a for a in report["attempts"] if (a["rule"], a["operation"]) != expected]
    assert {a["verdict"] for a in others} == {"refused"}


def test_a_burst_is_sent_back_to_back_whatever_the_rate(tmp_path, demo, capsys):
    """10/s with a burst of 3 refills one request every 100 ms: at --rate 2 (one request
    every 500 ms) the limit would refill between requests and never answer 429; the burst
    ignores --rate, so it outruns the limit."""
    fast = {**SOUND, "rate_limiting": {"limits": [
        {"name": "pet-reads", "key": ["identity"], "rate": "10/s", "burst": 3,
         "operations": ["getPet"]}]}}
    deployment = Deployment(tmp_path, demo, fast)
    gateway = deployment.start(fast)
    try:
        code, report = deployment.run(capsys, gateway, "--only", "rate-limit", "--rate", "2")
    finally:
        gateway.stop()
    [burst] = report["attempts"]
    assert burst["verdict"] == "refused" and burst["status"] == 429, burst
    assert code == 0


def test_a_limit_removed_from_the_gateway_lets_the_whole_burst_through(deployment,
                                                                       capsys):
    gateway = deployment.start({**SOUND, "rate_limiting": {"limits": []}})
    try:
        code, report = deployment.run(capsys, gateway)
    finally:
        gateway.stop()
    assert got_through(report) == {("probe-rate-limit", "getPet")}
    burst = by_operation(report)[("probe-rate-limit", "getPet")]
    assert [r["status"] for r in burst["requests"]] == [200] * 7  # limit 5, + 2
    assert code == 1
    # SARIF: the finding is located at the operation, valid against the official schema
    out = deployment.folder / "probe.sarif"
    gateway = deployment.start({**SOUND, "rate_limiting": {"limits": []}})
    try:
        assert main(["probe", "--config", str(deployment.probe_config), "--target",
                     gateway.url, *deployment.identities(), *ONLY, "--format", "sarif",
                     "--output", str(out), *FAST]) == 1
    finally:
        gateway.stop()
    document = json.loads(out.read_text())
    [result] = document["runs"][0]["results"]
    assert result["ruleId"] == "probe-rate-limit"
    assert result["locations"][0]["logicalLocations"][0]["fullyQualifiedName"] == \
        "/paths/~1pets~1{petId}/get"
    checked = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--schemafile", str(SARIF_SCHEMA),
         str(out)], capture_output=True, text=True, timeout=60, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_an_identity_that_is_not_authenticated_proves_nothing(deployment, capsys):
    """mallory's key is not a key: her 401s are neither refusals of her roles nor of her
    reach into alice's objects."""
    gateway = deployment.start(SOUND)
    try:
        code, report = probe(capsys, "--config", str(deployment.probe_config), "--target",
                             gateway.url, "--identity", f"alice:staff={deployment.keys['alice']}",
                             "--identity", "mallory:=apishield-not-a-key", *ONLY,
                             "--format", "json", *FAST)
    finally:
        gateway.stop()
    attempts = by_operation(report)
    for kind in (("probe-bola", "getUser"), ("probe-role-escalation", "listPets")):
        assert attempts[kind]["verdict"] == "inconclusive", attempts[kind]
        assert attempts[kind]["status"] == 401
        assert attempts[kind]["detail"].startswith("identity mallory was not authenticated")
    assert attempts[("probe-rate-limit", "getPet")]["verdict"] == "refused"
    assert got_through(report) == set() and code == 0


def test_when_a_cannot_read_its_own_object_the_replay_is_inconclusive(deployment, capsys):
    """bob first: the schema's id is user 1's, so bob's own read is refused and there is
    nothing to replay; that is neither a pass nor a hole, and does not fail the run."""
    gateway = deployment.start(SOUND)
    try:
        code, report = deployment.run(capsys, gateway, swapped=True)
        _code, text = probe(capsys, "--config", str(deployment.probe_config), "--target",
                            gateway.url, *deployment.identities(swapped=True), "--only",
                            "bola", *FAST)
    finally:
        gateway.stop()
    attempts = by_operation(report)
    user = attempts[("probe-bola", "getUser")]
    assert user["verdict"] == "inconclusive"
    assert user["detail"].startswith("identity bob could not read GET /users/1 (403")
    assert [r["step"] for r in user["requests"]] == ["owner"]  # alice was never sent
    assert report["summary"]["inconclusive"] == 3
    assert got_through(report) == set() and code == 0
    assert "inconclusive     GET /users/{userId}" not in text  # the real target is shown
    assert "inconclusive 403 GET /users/1  [probe-bola]" in text
    assert ", 3 inconclusive" in text


def test_a_burst_that_does_not_fit_the_budget_is_not_sent_at_all(deployment, capsys):
    gateway = deployment.start(SOUND)
    try:
        code, report = deployment.run(capsys, gateway, "--max-requests", "10")
    finally:
        gateway.stop()
    burst = by_operation(report)[("probe-rate-limit", "getPet")]
    assert burst["verdict"] == "not-sent" and burst["requests"] == []
    assert "do not fit the rest of --max-requests" in burst["detail"]
    # the other attempts (2 + 2 + 3 + 1 requests) went, and nothing of the burst
    assert report["summary"]["sent"] == 8
    assert not any(r.path.startswith("/pets/") for r in deployment.demo.received())
    assert code == 0


def test_one_identity_plans_no_bola_and_unknown_roles_no_role_attempt(tmp_path, capsys):
    config = tmp_path / "probe.yaml"
    huge = {"name": "everything", "key": ["ip"], "rate": "5000/m"}
    config.write_text(yaml.safe_dump({
        "contract": contract(tmp_path).name, **SOUND,
        "rate_limiting": {"limits": [*SOUND["rate_limiting"]["limits"], huge]}}))
    code, text = probe(capsys, "--config", str(config), "--target", "http://127.0.0.1:1",
                       "--identity", "ci=k-1", *ONLY, "--dry-run")
    assert code == 0
    assert "note: rate limit everything: admits 5000 requests at once, over 1000" in text
    assert "note: 1 --identity: no BOLA attempts on the 3 operation(s)" in text
    assert "note: identity ci: its roles are unknown" in text
    assert "[probe-bola]" not in text and "[probe-role-escalation]" not in text
    # the burst needs no identity: getPet is public
    assert "GET /pets/1  [probe-rate-limit] a burst of 7 requests or more" in text


def test_a_tokens_roles_come_from_the_claim_its_issuer_names(tmp_path, capsys):
    """A JWT identity needs no `:roles`: the probe reads the issuer's `role_claims`."""
    document = yaml.safe_load(contract(tmp_path).read_text())
    document["components"]["securitySchemes"] = {"key": {"type": "http", "scheme": "bearer"}}
    (tmp_path / "bearer.yaml").write_text(yaml.safe_dump(document))
    (tmp_path / "issuer.pem").write_text("unused by a dry run")
    config = tmp_path / "probe.yaml"
    config.write_text(yaml.safe_dump({
        "contract": "bearer.yaml", **SOUND,
        "auth": {"issuers": {"idp": {"issuer": "https://idp.test", "audiences": ["api"],
                                     "algorithms": ["RS256"], "keys": ["issuer.pem"],
                                     "role_claims": ["realm_access.roles"]}}}}))

    def token(roles: list[str]) -> str:
        import base64

        def part(value: dict[str, Any]) -> str:
            return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

        return ".".join((part({"alg": "RS256"}), part(
            {"iss": "https://idp.test", "sub": "1", "realm_access": {"roles": roles}}),
            "c2ln"))

    code, text = probe(capsys, "--config", str(config), "--target", "http://127.0.0.1:1",
                       "--identity", f"staffer={token(['staff'])}", "--identity",
                       f"reader={token(['reader'])}", "--only", "roles", "--dry-run")
    assert code == 0
    assert "identity reader (roles: reader) calls listPets, which requires one of the " \
           "roles staff" in text
    assert "identity staffer" not in text and "its roles are unknown" not in text


@pytest.mark.parametrize("identity, message", [
    ("a:st aff=k", "role 'st aff' is not a role name"),
    (":staff=k", "write NAME:ROLE,...=CREDENTIAL"),
    ("a:staff,,x=k", "role '' is not a role name"),
])
def test_malformed_roles_are_usage_errors(tmp_path, capsys, identity, message):
    config = tmp_path / "probe.yaml"
    config.write_text(yaml.safe_dump({"contract": contract(tmp_path).name}))
    code = main(["probe", "--config", str(config), "--target", "http://127.0.0.1:1",
                 "--identity", identity, "--dry-run"])
    assert code == 2
    assert message in capsys.readouterr().err


def test_an_identity_named_twice_is_a_usage_error(tmp_path, capsys):
    config = tmp_path / "probe.yaml"
    config.write_text(yaml.safe_dump({"contract": contract(tmp_path).name}))
    code = main(["probe", "--config", str(config), "--target", "http://127.0.0.1:1",
                 "--identity", "a=k1", "--identity", "a=k2", "--dry-run"])
    assert code == 2
    assert "--identity a: given twice" in capsys.readouterr().err
