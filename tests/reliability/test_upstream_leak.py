"""No response crosses between clients (issue 11, must-fix 1).

Bytes an upstream sends after a complete response (a second response, more body than its
Content-Length, a body to HEAD or on a 204), in the same packet or a little later, must never
be read as the next request's response: the pooled connection that got them is closed and
never reused. Each case runs in the three response modes, on the fast (callback) path and on
the async path, against a real gateway process limited to one upstream connection so that
reuse would be certain.
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator

import pytest

from tests.conftest import RunningGateway, start_gateway
from tests.reliability.rogue_upstream import CONTRACT, LATE, RogueUpstream


@pytest.fixture(scope="module")
def rogue() -> Iterator[RogueUpstream]:
    server = RogueUpstream()
    yield server
    server.close()


@pytest.fixture(scope="module", params=["filter", "validate", "off"])
def gw(request, tmp_path_factory, rogue) -> Iterator[RunningGateway]:
    workdir = tmp_path_factory.mktemp(f"rogue-{request.param}")
    contract = workdir / "rogue.yaml"
    contract.write_text(CONTRACT)
    running = start_gateway(
        workdir, rogue.url,
        {"upstream": {"max_connections": 1}, "responses": {"mode": request.param}},
        contract=contract,
    )
    yield running
    running.stop()


def fetch(port: int, path: str, method: str = "GET") -> http.client.HTTPResponse:
    """One request on a new client connection (another client each time)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request(method, path)
    response = conn.getresponse()
    response.body = response.read()  # type: ignore[attr-defined]
    conn.close()
    return response


def assert_own_response(port: int) -> None:
    """The next client gets exactly its own answer: its request id, nothing injected."""
    for _ in range(3):
        response = fetch(port, "/ok/now")
        assert response.status == 200, response.body
        assert response.getheader("X-Injected") is None
        body = json.loads(response.body)
        assert body == {"who": "ok", "id": response.getheader("X-Request-Id")}


CASES = [
    ("GET", "second-response"),
    ("GET", "overlong"),
    ("HEAD", "head-body"),
    ("GET", "no-content"),
]


@pytest.mark.parametrize("timing", ["now", "late"])
@pytest.mark.parametrize(("method", "case"), CASES)
def test_bytes_after_a_response_never_reach_another_client(gw, rogue, method, case, timing):
    for warm in (True, False):  # fast path on a pooled connection, then the async path
        if warm:
            assert fetch(gw.port, "/ok/now").status == 200
        connections = rogue.connections
        first = fetch(gw.port, f"/{case}/{timing}", method)
        assert first.status in (200, 204)
        assert first.getheader("X-Injected") is None
        if method == "HEAD" or first.status == 204:
            assert first.body == b""
        else:
            assert b"injected" not in first.body and b"overflow" not in first.body
        time.sleep(LATE * 3)  # the late bytes have arrived on the pooled connection
        assert_own_response(gw.port)
        # the connection that received stray bytes was closed, not reused
        assert rogue.connections > connections
    stderr = gw.stderr()
    assert "s3cr3t-of-another-client" not in stderr


def test_a_correct_head_response_keeps_the_connection(gw, rogue):
    """The fix must not cost correct upstreams their keep-alive."""
    assert fetch(gw.port, "/ok/now").status == 200
    connections = rogue.connections
    for _ in range(3):
        head = fetch(gw.port, "/ok/now", "HEAD")
        assert head.status == 200 and head.body == b""
        assert_own_response(gw.port)
    assert rogue.connections == connections
