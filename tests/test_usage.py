"""Usage per identity and operation (F4) and authentication metrics, through a real
gateway with API keys made by the real CLI, then the bounds of the in-memory table."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from apishield.observe.usage import OTHER, Usage
from tests.conftest import RunningGateway, free_port, start_gateway
from tests.issuer_server import IssuerServer
from tests.test_admin import scrape, value
from tests.test_auth_e2e import _auth_config, _write_contract, create_key, issuer

__all__ = ["issuer"]  # the module-scoped issuer fixture, shared with test_auth_e2e


@pytest.fixture(scope="module")
def keyed_gateway(tmp_path_factory: pytest.TempPathFactory, upstream_url: str,
                  issuer: IssuerServer) -> Iterator[tuple[RunningGateway, str]]:
    workdir = tmp_path_factory.mktemp("usagegw")
    secret_file = workdir / "introspection.secret"
    secret_file.write_text("usage-test-client-secret")
    port = free_port()
    running = start_gateway(workdir, upstream_url,
                            {"auth": _auth_config(issuer, secret_file),
                             "admin": {"port": port}},
                            contract=_write_contract(workdir, issuer))
    yield running, f"http://127.0.0.1:{port}"
    running.stop()


def test_usage_and_auth_attempts_per_key(keyed_gateway: tuple[RunningGateway, str]) -> None:
    gateway, admin = keyed_gateway
    key, key_id = create_key(gateway, "--name", "billing", "--scope", "reports")
    other, other_id = create_key(gateway, "--name", "reporting", "--scope", "reports")
    before = scrape(admin)
    for _ in range(3):
        assert httpx.get(f"{gateway.url}/echo/key", headers={"X-Api-Key": key}).status_code \
            == 200
    assert httpx.get(f"{gateway.url}/echo/key", headers={"X-Api-Key": other}).status_code \
        == 200
    forged = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
    assert httpx.get(f"{gateway.url}/echo/key",
                     headers={"X-Api-Key": forged}).status_code == 401
    assert httpx.get(f"{gateway.url}/echo/key").status_code == 401
    after = scrape(admin)

    def delta(**labels: str) -> float:
        return (value(after, "apishield_auth_attempts_total", **labels)
                - value(before, "apishield_auth_attempts_total", **labels))

    # every check counts, cache hits included (the first verification fills the cache)
    assert delta(outcome="success", reason="ok") == 4
    assert delta(outcome="failure", reason="api-key-mismatch") == 1
    assert delta(scheme="none", outcome="failure", reason="credentials-missing") == 1

    report = httpx.get(f"{admin}/usage").json()
    rows = {(row["identity"], row["operation"]): row for row in report["current"]["top"]}
    operation = next(op for identity, op in rows if identity == key_id)
    assert rows[(key_id, operation)] == {"identity": key_id, "operation": operation,
                                         "requests": 3, "refusals": 0}
    assert rows[(other_id, operation)]["requests"] == 1
    assert rows[("anonymous", operation)]["refusals"] == 2  # forged and missing: no identity
    # the busiest first; ?top cuts the list and sums the rest
    top1 = httpx.get(f"{admin}/usage?top=1").json()["current"]
    assert len(top1["top"]) == 1
    assert top1["rest"]["requests"] == sum(r["requests"] for r in rows.values()) - \
        top1["top"][0]["requests"]
    assert httpx.get(f"{admin}/usage?top=zero").status_code == 400


def test_usage_table_is_bounded_and_rolls_over() -> None:
    now = 6000.0  # the start of an interval
    usage = Usage(interval=60.0, max_pairs=3, now=now)
    for identity in ("a", "b", "c", "d", "e"):
        usage.count(identity, "op", refused=identity == "e", now=now)
    usage.count("a", "op", refused=False, now=now + 1)
    report: dict[str, Any] = usage.report(top=10, now=now + 2)
    rows = {row["identity"]: row for row in report["current"]["top"]}
    assert set(rows) == {"a", "b", "c", OTHER}  # at most 3 pairs, then `other`
    assert rows["a"]["requests"] == 2
    assert rows[OTHER] == {"identity": OTHER, "operation": "op", "requests": 2, "refusals": 1}
    assert report["previous"] is None
    # the next interval: the current one becomes the previous one
    usage.count("z", "op", refused=False, now=now + 61)
    report = usage.report(top=10, now=now + 62)
    assert [row["identity"] for row in report["current"]["top"]] == ["z"]
    assert report["previous"]["pairs"] == 4
    # idle for more than a whole interval: nothing is "previous" any more
    report = usage.report(top=10, now=now + 200)
    assert report["current"]["pairs"] == 0
    assert report["previous"]["pairs"] == 0
