"""The base path from the contract's `servers` (issue 16): inferred when the config does
not write one, refused with a clear message when the servers disagree."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from apishield.config import ConfigError, config_from_dict
from apishield.contract.loader import load_contract
from apishield.contract.servers import AmbiguousServers, servers_base_path
from tests.conftest import DATA


@pytest.mark.parametrize(("servers", "base"), [
    (None, ""),
    ([], ""),
    ([{"url": "/"}], ""),
    ([{"url": "https://api.example.com"}], ""),
    ([{"url": "https://api.example.com/v1"}], "/v1"),
    ([{"url": "https://api.example.com/v1/"}, {"url": "http://localhost:8080/v1"}], "/v1"),
    ([{"url": "/api/v2"}], "/api/v2"),
    ([{"url": "v3"}], "/v3"),
    ([{"url": "{scheme}://api.example.com/{version}",
       "variables": {"scheme": {"default": "https"}, "version": {"default": "v2"}}}], "/v2"),
    # a variable of the host may take several values: the path is the same
    ([{"url": "https://{region}.example.com/api",
       "variables": {"region": {"default": "eu", "enum": ["eu", "us"]}}}], "/api"),
])
def test_base_path_from_servers(servers: Any, base: str) -> None:
    assert servers_base_path(servers) == base


@pytest.mark.parametrize(("servers", "why"), [
    ([{"url": "/v1"}, {"url": "https://x.example/v2"}],
     "the servers declare different base paths ('/v1', '/v2')"),
    ([{"url": "https://x.example/{v}", "variables": {"v": {"default": "v1",
                                                            "enum": ["v1", "v2"]}}}],
     "servers/0: the path variable {v} may be any of v1, v2"),
    ([{"url": "https://x.example/{v}"}], "servers/0: variable {v} in the path has no default"),
])
def test_ambiguous_servers(servers: Any, why: str) -> None:
    with pytest.raises(AmbiguousServers) as caught:
        servers_base_path(servers)
    assert str(caught.value) == why


def contract_with(tmp_path: Path, servers: Any) -> Path:
    contract = yaml.safe_load((DATA / "contract.yaml").read_text())
    contract["servers"] = servers
    (tmp_path / "contract.yaml").write_text(yaml.safe_dump(contract))
    (tmp_path / "paths.yaml").write_text((DATA / "paths.yaml").read_text())
    return tmp_path


def test_the_config_decides_when_the_servers_disagree(tmp_path: Path) -> None:
    folder = contract_with(tmp_path, [{"url": "/v1"}, {"url": "/v2"}])
    with pytest.raises(ConfigError) as caught:
        load_contract(config_from_dict({"contract": "contract.yaml"}, source_dir=folder))
    assert caught.value.problems == [
        "contract.yaml#/servers: the servers declare different base paths ('/v1', '/v2'), "
        "so the prefix of the paths is unclear: write base_path in the config (the one this "
        'gateway serves, e.g. base_path: /v1, or base_path: "" for none)']
    for written in ("/v2", ""):
        config = config_from_dict({"contract": "contract.yaml", "base_path": written},
                                  source_dir=folder)
        assert load_contract(config).base_path == written


def test_the_gateway_serves_the_contract_under_its_server_path(
        tmp_path: Path, make_gateway: Any) -> None:
    folder = contract_with(tmp_path, [{"url": "https://api.example.com/v1"}])
    gateway = make_gateway(contract=folder / "contract.yaml")
    # routed to echoGet and forwarded as the client sent it (the test upstream only
    # knows /echo, so it answers this one 404 itself)
    served = httpx.get(f"{gateway.url}/v1/echo")
    entry = gateway.log_entry(served.headers["x-request-id"])
    assert (entry["operation"], entry["status"]) == ("echoGet", 404)
    outside = httpx.get(f"{gateway.url}/echo")
    assert outside.status_code == 404
    assert gateway.log_entry(outside.headers["x-request-id"])["reason"] == \
        "route-not-declared"
