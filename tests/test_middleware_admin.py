"""The admin API mounted by the ASGI middleware under `admin.path`: in-process, and
under a real uvicorn server with its real client addresses."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import free_port, wait_for_port
from tests.middleware_app import create_app

DATA = Path(__file__).parent / "data"
TOKEN = "middleware-admin-token-0123456789"


def write_config(tmp_path: Path, admin: str) -> Path:
    shutil.copy(DATA / "middleware_contract.yaml", tmp_path / "middleware_contract.yaml")
    config = tmp_path / "middleware.yaml"
    config.write_text("contract: middleware_contract.yaml\naccess_log: {enabled: false}\n"
                      f"admin: {admin}\n")
    return config


def requests_of(text: str, operation: str) -> float:
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples
               if sample.name == "apishield_requests_total"
               and sample.labels["operation"] == operation)


async def test_metrics_and_health_under_the_admin_path(tmp_path: Path) -> None:
    app = create_app(write_config(tmp_path, "{path: /_ops}"))
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        before = await client.get("/_ops/metrics")
        assert (await client.get("/items/7")).status_code == 200
        after = await client.get("/_ops/metrics")
        assert after.status_code == 200
        # metrics are per process: other tests' requests are in them too, hence the delta
        assert requests_of(after.text, "getItem") - requests_of(before.text, "getItem") == 1
        assert (await client.get("/_ops/healthz")).json() == {"status": "alive"}
        assert (await client.get("/_ops/readyz")).json() == {"status": "ready"}
        assert (await client.get("/_ops/config")).json()["admin"]["path"] == "/_ops"
        # reload is the gateway's: the middleware says so instead of pretending
        assert (await client.post("/_ops/reload")).status_code == 501
        # the mount is exact: a sibling path is the app's (and not in the contract)
        assert (await client.get("/_opsx/metrics")).status_code == 404


async def test_without_a_token_only_loopback_clients(tmp_path: Path) -> None:
    app = create_app(write_config(tmp_path, "{}"))
    transport = httpx.ASGITransport(app=app, client=("203.0.113.9", 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        response = await client.get("/_apishield/metrics")
        assert response.status_code == 403
        assert response.headers["content-type"] == "application/problem+json"
        assert "loopback clients only" in response.json()["detail"]


@pytest.fixture
def uvicorn_with_token(tmp_path: Path):
    config = write_config(tmp_path, "{token_env: APISHIELD_TEST_MW_TOKEN}")
    app_module = tmp_path / "admin_app.py"
    app_module.write_text("from tests.middleware_app import create_app\n"
                          f"app = create_app({str(config)!r})\n")
    port = free_port()
    env = {**os.environ, "APISHIELD_TEST_MW_TOKEN": TOKEN,
           "PYTHONPATH": os.pathsep.join([str(tmp_path), str(Path.cwd())])}
    with subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "admin_app:app", "--port", str(port),
         "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
    ) as process:
        try:
            wait_for_port(port, process)
            yield f"http://127.0.0.1:{port}"
        finally:
            process.terminate()
            process.wait(10)


def test_under_uvicorn_the_token_is_required(uvicorn_with_token: str) -> None:
    url = uvicorn_with_token
    assert httpx.get(f"{url}/_apishield/metrics").status_code == 401
    assert httpx.get(f"{url}/_apishield/metrics",
                     headers={"authorization": "Bearer not-it"}).status_code == 401
    assert httpx.get(f"{url}/items/1").status_code == 200
    response = httpx.get(f"{url}/_apishield/metrics",
                         headers={"authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200
    assert requests_of(response.text, "getItem") == 1  # a process of its own
    assert httpx.get(f"{url}/_apishield/healthz").status_code == 200
