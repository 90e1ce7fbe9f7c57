"""`apishield policy show` and the admin API's `GET /policy` (issue 15, checklist G3).

The CLI runs as a subprocess on tests/data/policy/ (a contract with one operation per kind
of access, a config that sets every field the policy shows); the admin endpoint is read
from a real gateway. Both must show what the compiled pipeline enforces, so each test
pins a value that only the merge of contract, `x-apishield`, `operations.<id>` and the
global config gives.
"""

from __future__ import annotations

import json
from typing import Any

import httpx

from tests.conftest import DATA, free_port
from tests.test_cli import run

POLICY = DATA / "policy" / "apishield.yaml"


def _policy(*args: str) -> dict[str, Any]:
    result = run("policy", "show", "--config", str(POLICY), "--format", "json", *args)
    assert result.returncode == 0, result.stderr
    document: dict[str, Any] = json.loads(result.stdout)
    return document


def _by_id(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {op["operation"]: op for op in document["operations"]}


def test_json_shows_who_may_call_each_operation() -> None:
    document = _policy()
    assert document["version"] == 1 and document["contract"] == "contract.yaml"
    ops = _by_id(document)
    assert list(ops) == ["getOrder", "addThing", "health", "orphan"]  # contract order
    order = ops["getOrder"]["access"]
    assert order["alternatives"] == [
        [{"scheme": "apiKey", "kind": "apiKey", "mode": "verify", "scopes": []}],
        [{"scheme": "oauth", "kind": "oauth2", "mode": "delegate", "scopes": ["orders:read"]}],
    ]
    assert order["require"] == {"roles": ["clerk"], "permissions": ["orders:read"]}
    assert order["owner"] == {"param": "path.id", "response": None, "equals": "subject",
                              "bypass_roles": ["admin"], "on_mismatch": 403}
    assert (order["public"], order["refused"], order["anonymous"]) == (False, False, False)
    assert ops["addThing"]["access"]["anonymous"] is True
    assert ops["health"]["access"]["public"] is True
    orphan = ops["orphan"]["access"]
    assert orphan["refused"] is True and "not-public" in orphan["why"]


def test_json_shows_limits_and_the_per_operation_overrides() -> None:
    ops = _by_id(_policy())
    order, thing = ops["getOrder"], ops["addThing"]
    # `login` is filtered to getOrder and runs before authentication; `gold` applies to all
    assert order["rate_limits"] == [
        {"name": "login", "key": ["ip"], "rate": "5/60s", "burst": 5, "pre_auth": True,
         "roles": []},
        {"name": "gold", "key": ["identity"], "rate": "100/1s", "burst": 100,
         "pre_auth": False, "roles": ["gold"]}]
    assert [limit["name"] for limit in thing["rate_limits"]] == ["gold"]
    assert thing["quotas"] == [{"name": "daily", "key": ["identity"], "limit": 1000,
                                "period": "day", "roles": []}]
    assert order["quotas"] == []
    assert order["concurrency"] == {"max_in_flight": 50, "per_identity": 4,
                                    "queue_timeout": 0.0}
    # operations.addThing overrides strictness, injection, body limit, responses, mode, ip
    assert thing["validation"] == {"strict": False, "injection": []}
    assert order["validation"] == {"strict": True, "injection": ["shell", "sql", "xss"]}
    assert thing["body"] == {"max_bytes": 2048, "media_types": ["application/json"],
                             "required": True}
    assert order["body"]["max_bytes"] == 1048576
    assert thing["responses"] == {"mode": "validate", "mask_errors": True}
    assert order["responses"]["mode"] == "filter"
    assert (thing["mode"], order["mode"]) == ("log-only", "enforce")
    assert thing["ip"] == {"allow": ["192.0.2.0/24"], "deny": ["10.0.0.0/8"]}
    assert order["ip"] == {"allow": [], "deny": ["10.0.0.0/8"]}
    assert order["cors"] == {"allow_origins": ["https://app.example.com"],
                             "allow_methods": ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"],
                             "allow_credentials": False}


def test_text_is_one_block_per_operation_and_filters() -> None:
    result = run("policy", "show", "--config", str(POLICY), "--operation", "getOrder")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert text.startswith("getOrder  GET /orders/{id}\n")
    assert "addThing" not in text
    assert "who:         apiKey (apiKey) | oauth (oauth2, delegated; scopes orders:read)" in text
    assert "require:     a role of clerk; permissions orders:read" in text
    assert "owner:       request path.id == caller subject (bypass: admin)" in text
    assert "rate limit:  login 5/60s burst 5 per ip pre-auth" in text
    everything = run("policy", "show", "--config", str(POLICY)).stdout
    assert everything.count("\n\n") == 3  # four blocks
    assert "mode:        log-only" in everything
    assert "who:         nobody: declares no security" in everything


def test_an_unknown_operation_or_a_broken_config_exits_2(tmp_path: Any) -> None:
    result = run("policy", "show", "--config", str(POLICY), "--operation", "nope")
    assert result.returncode == 2
    assert "no operation 'nope'" in result.stderr
    broken = tmp_path / "apishield.yaml"
    broken.write_text("contract: missing.yaml\n")
    result = run("policy", "show", "--config", str(broken))
    assert result.returncode == 2
    assert "missing.yaml" in result.stderr


def test_the_bundled_test_config_shows_its_operation_limit() -> None:
    result = run("policy", "show", "--config", str(DATA / "apishield.yaml"),
                 "--operation", "echoSmall", "--format", "json")
    assert result.returncode == 0, result.stderr
    (small,) = json.loads(result.stdout)["operations"]
    assert small["body"]["max_bytes"] == 16
    assert small["access"]["public"] is True


def test_admin_api_serves_the_same_policy(make_gateway: Any) -> None:
    port = free_port()
    make_gateway({"admin": {"host": "127.0.0.1", "port": port},
                  "rate_limiting": {"limits": [{"name": "slow", "rate": "2/s",
                                                "operations": ["slow"]}]}})
    admin = f"http://127.0.0.1:{port}"
    everything = httpx.get(f"{admin}/policy", timeout=5)
    assert everything.status_code == 200, everything.text
    ops = {op["operation"]: op for op in everything.json()["operations"]}
    assert ops["echoSmall"]["body"]["max_bytes"] == 16
    assert [limit["name"] for limit in ops["slow"]["rate_limits"]] == ["slow"]
    assert ops["echoGet"]["rate_limits"] == []
    one = httpx.get(f"{admin}/policy", params={"operation": "slow"}, timeout=5).json()
    assert [op["operation"] for op in one["operations"]] == ["slow"]
    missing = httpx.get(f"{admin}/policy", params={"operation": "nope"}, timeout=5)
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/problem+json"


async def test_the_middleware_serves_its_policy_under_the_admin_path(tmp_path: Any) -> None:
    from tests.middleware_app import create_app
    from tests.test_middleware_admin import write_config

    app = create_app(write_config(tmp_path, "{path: /_ops}"))
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        response = await client.get("/_ops/policy", params={"operation": "getItem"})
        assert response.status_code == 200, response.text
        (item,) = response.json()["operations"]
        assert (item["operation"], item["method"]) == ("getItem", "GET")
