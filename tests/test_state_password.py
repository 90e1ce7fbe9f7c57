"""The Redis password from an environment variable or a file (`state_password`, C4), with
a real redis-server that requires it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from apishield.config import ConfigError, config_from_dict
from apishield.config.redis_urls import with_password
from tests.redis_server import running_redis

PASSWORD = "redis-pass-for-tests/with:odd@chars"


def test_the_gateway_and_the_cli_reach_a_password_protected_redis(
        tmp_path: Path, make_gateway: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APISHIELD_TEST_REDIS_PASSWORD", PASSWORD)
    monkeypatch.setenv("APISHIELD_TEST_PEPPER", "p" * 40)
    with running_redis(tmp_path, PASSWORD) as redis:
        gateway = make_gateway({
            "state": redis.url,
            "state_password": {"env": "APISHIELD_TEST_REDIS_PASSWORD"},
            "auth": {"api_keys": {"pepper": {"env": "APISHIELD_TEST_PEPPER"}}},
            "rate_limiting": {"limits": [{"name": "tight", "key": ["ip"], "rate": "3/m",
                                          "operations": ["echoGet"]}]},
        })
        statuses = [httpx.get(f"{gateway.url}/echo").status_code for _ in range(6)]
        assert statuses[:3] == [200, 200, 200] and statuses[-1] == 429
        assert "rate-limit store" not in gateway.stderr()  # no outage: the AUTH worked
        keys = subprocess.run(
            [sys.executable, "-m", "apishield", "keys", "create", "--name", "svc",
             "--config", str(gateway.config_path)],
            capture_output=True, text=True, timeout=30, check=False, env=os.environ)
        assert keys.returncode == 0, keys.stderr
        assert PASSWORD not in gateway.stderr() + keys.stderr


def test_a_password_in_the_url_and_in_state_password_is_refused() -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_dict({"contract": "c.yaml", "state": "redis://:inline@127.0.0.1:6379/0",
                          "state_password": {"env": "X"}}, source_dir=Path("."))
    assert caught.value.problems == [
        "state: redis://:***@127.0.0.1:6379/0 holds a password and state_password gives one "
        "too; keep only state_password (write user:@host for a user name)"]
    with pytest.raises(ConfigError) as caught:
        config_from_dict({"contract": "c.yaml", "state_password": {"env": "X"}},
                         source_dir=Path("."))
    assert caught.value.problems[0].startswith("state_password: only applies to a Redis")


@pytest.mark.parametrize(("url", "expected"), [
    ("redis://127.0.0.1:6379/0", "redis://:p%2Fw%3A%40@127.0.0.1:6379/0"),
    ("redis://app:@127.0.0.1/2", "redis://app:p%2Fw%3A%40@127.0.0.1/2"),
    ("redis+sentinel://h1:26379,h2:26379/main/1",
     "redis+sentinel://:p%2Fw%3A%40@h1:26379,h2:26379/main/1"),
    ("rediss+cluster://h1:6379,h2:6379/?ssl_cert_reqs=required",
     "rediss+cluster://:p%2Fw%3A%40@h1:6379,h2:6379/?ssl_cert_reqs=required"),
])
def test_the_password_goes_into_every_kind_of_url(url: str, expected: str) -> None:
    assert with_password(url, "p/w:@") == expected
