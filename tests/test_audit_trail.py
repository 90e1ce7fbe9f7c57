"""The tamper-evident audit trail (issue 14, F5; docs/audit-trail.md).

Real files, a real redis-server, real CLI and gateway processes: the CLI's changes and
the gateway's reloads and admin calls are chained; `audit-log verify` accepts the intact
chain and names the first record edited, swapped, deleted, cut, or keyed otherwise; two
processes appending at once keep one chain.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from apishield.cli.main import main
from apishield.config import ConfigError, config_from_dict
from apishield.observe.audit_trail import AuditTrail, AuditTrailError, FileSink
from apishield.observe.metrics import METRICS
from apishield.state.audit_stream import RedisAuditSink
from apishield.state.open import open_audit_trail
from tests.conftest import DATA, free_port, json_lines, wait_for
from tests.redis_server import RedisServer, running_redis

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "APISHIELD_TEST_PEPPER": "pepper-for-trail-tests",
       "APISHIELD_TEST_AUDIT_KEY": "audit-key-for-tests-0123456789"}
KEY = b"audit-key-for-tests-0123456789"


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with running_redis(Path(tmp_path_factory.mktemp("redis"))) as server:
        yield server


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "apishield", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=60, env=ENV, check=False)


def verify(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["audit-log", "verify", *args])
    out, err = capsys.readouterr()
    return code, out, err


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_trail(path: Path, count: int, key: bytes | None = None) -> list[str]:
    trail = AuditTrail(FileSink(path), key)
    for index in range(count):
        trail.append("ban-added", "alice", target="ip", value=f"203.0.113.{index}")
    trail.close()
    return path.read_text().splitlines(keepends=True)


def project(folder: Path, extra: str = "") -> Path:
    (folder / "contract.yaml").write_text((DATA / "contract.yaml").read_text())
    (folder / "paths.yaml").write_text((DATA / "paths.yaml").read_text())
    config = folder / "apishield.yaml"
    config.write_text(f"contract: contract.yaml\n{extra}")
    return config


# -- the CLI writes, verify reads ---------------------------------------------------------

def test_cli_changes_are_chained_beside_the_state_file_and_hold_no_secret(tmp_path, capsys):
    config = project(tmp_path)
    created = cli(config, "keys", "create", "--name", "ci", "--scope", "pets:read")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    key_id = json.loads(next(line for line in created.stderr.splitlines()
                             if line.startswith("{")))["key_id"]
    assert cli(config, "keys", "rotate", key_id, "--grace", "0").returncode == 0
    assert cli(config, "bans", "add", "--ip", "203.0.113.7", "--duration", "1h",
               "--reason", "scraping").returncode == 0
    assert cli(config, "bans", "remove", "--ip", "203.0.113.7").returncode == 0
    users = cli(config, "users", "create", "bob")
    assert users.returncode == 0, users.stderr

    trail = tmp_path / "apishield-state.db.audit.jsonl"
    text = trail.read_text()
    found = records(trail)
    assert [r["action"] for r in found] == [
        "api-key-created", "api-key-created", "api-key-rotated", "ban-added", "ban-removed",
        "basic-user-created"]
    assert found[5]["details"]["user"] == "bob"
    assert [r["seq"] for r in found] == list(range(1, len(found) + 1))
    assert found[0]["details"]["key_id"] == key_id and found[0]["details"]["scopes"] == [
        "pets:read"]
    assert found[3]["details"] == {"target": "ip", "value": "203.0.113.7", "rule": "manual",
                                   "until": found[3]["details"]["until"],
                                   "reason": "scraping", "replaced": False}
    assert all(r["actor"] for r in found)
    secret = key[len(f"ask_{key_id}_"):]  # (base64url: may itself hold '_')
    assert len(secret) == 43 and secret not in text  # never the key itself
    assert users.stdout.strip() and users.stdout.strip() not in text  # nor a password

    code, out, _ = verify(capsys, str(trail))
    assert code == 0
    assert out.startswith(f"intact: {len(found)} record(s)")
    assert found[-1]["hash"] in out
    code, out, _ = verify(capsys, "--config", str(config))
    assert code == 0 and found[-1]["hash"] in out


def test_a_change_the_trail_cannot_record_fails_and_changes_nothing(tmp_path):
    config = project(tmp_path, "audit_log: {path: missing-folder/trail.jsonl}\n")
    result = cli(config, "bans", "add", "--ip", "203.0.113.9", "--duration", "1h")
    assert result.returncode == 1
    assert "missing-folder" in result.stderr and "does not exist" in result.stderr
    listed = cli(config, "bans", "list", "--json")
    assert json.loads(listed.stdout or "[]") == []


def test_a_trail_ending_in_a_partial_record_takes_no_more(tmp_path, capsys):
    config = project(tmp_path, "audit_log: {path: trail.jsonl}\n")
    trail = tmp_path / "trail.jsonl"
    lines = write_trail(trail, 2)
    trail.write_text(lines[0] + lines[1][:40])
    result = cli(config, "bans", "add", "--ip", "203.0.113.9", "--duration", "1h")
    assert result.returncode == 1
    assert "ends in a partial record" in result.stderr
    assert trail.read_text() == lines[0] + lines[1][:40]  # nothing appended after it
    assert json.loads(cli(config, "bans", "list", "--json").stdout or "[]") == []  # no ban


def test_a_missing_key_is_a_config_error_naming_it(tmp_path):
    config = config_from_dict({"contract": "c.yaml",
                               "audit_log": {"key": {"env": "APISHIELD_NO_SUCH_VAR"}}},
                              source_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"audit_log\.key: environment variable "
                       r"APISHIELD_NO_SUCH_VAR is not set"):
        open_audit_trail(config)
    assert open_audit_trail(config.model_copy(update={"audit_log": config.audit_log.model_copy(
        update={"enabled": False})})) is None


def test_a_detail_that_names_a_secret_is_refused(tmp_path):
    trail = AuditTrail(FileSink(tmp_path / "t.jsonl"), None)
    with pytest.raises(ValueError, match="'key' would put a secret in the trail"):
        trail.append("api-key-created", "alice", key="ask_live_abc")
    assert not (tmp_path / "t.jsonl").exists()


# -- tampering ----------------------------------------------------------------------------

def _edit(lines: list[str]) -> list[str]:
    record = json.loads(lines[2])
    record["details"]["value"] = "198.51.100.1"
    return [*lines[:2], json.dumps(record, separators=(",", ":")) + "\n", *lines[3:]]


def _edit_and_rehash(lines: list[str]) -> list[str]:
    from apishield.observe.audit_trail import record_hash

    record = json.loads(lines[2])
    record["actor"] = "mallory"
    record["hash"] = record_hash(record, None)
    return [*lines[:2], json.dumps(record) + "\n", *lines[3:]]


TAMPERING = {
    "edited field": (_edit, "line 3 (seq 3): tampered: its hash does not match its content"),
    "edited and rehashed": (_edit_and_rehash, "line 4 (seq 4): reordered: its prev is not "
                            "the hash of the record before it"),
    "two lines swapped": (lambda lines: [lines[0], lines[2], lines[1], *lines[3:]],
                          "line 2 (seq 3): missing or reordered: seq 2 should follow seq 1"),
    "a line deleted": (lambda lines: [*lines[:2], *lines[3:]],
                       "line 3 (seq 4): missing or reordered: seq 3 should follow seq 2"),
    "the last line cut": (lambda lines: [*lines[:4], lines[4][:30]],
                          "line 5: truncated: a partial record with no line end"),
    "a record inserted twice": (lambda lines: [*lines[:3], lines[2], *lines[3:]],
                                "line 4 (seq 3): reordered: seq 3 comes after seq 3"),
}


@pytest.mark.parametrize("how", TAMPERING)
def test_verify_names_the_first_tampered_record(tmp_path, capsys, how):
    trail = tmp_path / "trail.jsonl"
    change, message = TAMPERING[how]
    trail.write_text("".join(change(write_trail(trail, 5))))
    code, out, err = verify(capsys, str(trail))
    assert code == 1, out
    assert message in err
    assert "BROKEN" in err and out == ""


def test_an_hmac_trail_needs_its_own_key(tmp_path, capsys, monkeypatch):
    trail = tmp_path / "trail.jsonl"
    write_trail(trail, 3, KEY)
    monkeypatch.setenv("APISHIELD_TEST_AUDIT_KEY", KEY.decode())
    assert verify(capsys, str(trail), "--key-env", "APISHIELD_TEST_AUDIT_KEY")[0] == 0
    (tmp_path / "wrong.key").write_text("another-key-entirely\n")
    code, _, err = verify(capsys, str(trail), "--key-file", str(tmp_path / "wrong.key"))
    assert code == 1
    assert ("line 1 (seq 1): tampered: its hash does not match its content (the record was "
            "changed, or the HMAC key is not the one it was written with)") in err
    code, _, err = verify(capsys, str(trail))
    assert code == 1 and "HMAC-keyed (hmac-sha256): give the key" in err
    # an unkeyed record slipped into a keyed trail is refused even with a good chain
    plain = tmp_path / "plain.jsonl"
    write_trail(plain, 1)
    code, _, err = verify(capsys, str(plain), "--key-env", "APISHIELD_TEST_AUDIT_KEY")
    assert code == 1 and "written without an HMAC key, but the trail is keyed" in err


def test_records_cut_from_the_end_show_against_a_noted_head(tmp_path, capsys):
    trail = tmp_path / "trail.jsonl"
    lines = write_trail(trail, 4)
    head = json.loads(lines[-1])["hash"]
    code, out, _ = verify(capsys, str(trail), "--expect-head", head)
    assert code == 0 and head in out
    trail.write_text("".join(lines[:3]))  # a whole record gone: the chain itself is fine
    assert verify(capsys, str(trail))[0] == 0
    code, _, err = verify(capsys, str(trail), "--expect-head", head)
    assert code == 1 and f"truncated: {head} (the expected head) is not in the chain" in err


def test_verify_of_a_missing_file_is_not_an_intact_chain(tmp_path, capsys):
    code, _, err = verify(capsys, str(tmp_path / "nope.jsonl"))
    assert code == 2 and "cannot read" in err


# -- concurrency --------------------------------------------------------------------------

WRITER = """
import sys
from pathlib import Path
from apishield.observe.audit_trail import AuditTrail, FileSink
from apishield.state.audit_stream import RedisAuditSink
where, name, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
sink = RedisAuditSink(where) if where.startswith("redis://") else FileSink(Path(where))
trail = AuditTrail(sink, b"k" * 32)
for index in range(count):
    trail.append("admin-call", name, method="GET", path=f"/config/{index}", status=200)
trail.close()
"""


def _two_writers(where: str, count: int) -> None:
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, where, name, str(count)],
                                env=ENV, stderr=subprocess.PIPE)
               for name in ("gateway-a", "cli-b")]
    for writer in writers:
        _, err = writer.communicate(timeout=120)
        assert writer.returncode == 0, err.decode()


def test_two_processes_appending_at_once_keep_one_chain(tmp_path, capsys):
    trail = tmp_path / "trail.jsonl"
    (tmp_path / "k").write_bytes(b"k" * 32)
    _two_writers(str(trail), 60)
    found = records(trail)
    assert len(found) == 120
    assert {r["actor"] for r in found} == {"gateway-a", "cli-b"}
    code, out, err = verify(capsys, str(trail), "--key-file", str(tmp_path / "k"))
    assert code == 0, err
    assert out.startswith("intact: 120 record(s)")


def test_redis_stream_two_writers_one_chain_and_verify(redis_server, tmp_path, capsys):
    url = redis_server.url.replace("/0", "/7")
    redis.Redis.from_url(url).flushdb()
    (tmp_path / "k").write_bytes(b"k" * 32)
    _two_writers(url, 40)
    config = project(tmp_path, f"state: {url}\naudit_log: {{key: {{file: k}}}}\n")
    code, out, err = verify(capsys, "--config", str(config))
    assert code == 0, err
    assert out.startswith("intact: 80 record(s) in the Redis stream apishield:audit")

    client = redis.Redis.from_url(url)
    entries = client.xrange("apishield:audit")
    client.xdel("apishield:audit", entries[-1][0])  # the last record removed
    code, _, err = verify(capsys, "--config", str(config))
    assert code == 1
    assert "truncated: the chain ends at seq 79" in err and "head says seq 80" in err

    first = json.loads(entries[0][1][b"record"])
    first["actor"] = "mallory"  # rewritten in place: the stream rebuilt with it first
    client.delete("apishield:audit")
    for _, values in [(None, {b"record": json.dumps(first).encode()}), *entries[1:]]:
        client.xadd("apishield:audit", values)
    code, _, err = verify(capsys, "--config", str(config))
    assert code == 1 and "(seq 1): tampered: its hash does not match" in err
    client.close()


def test_cli_changes_go_to_the_redis_stream(redis_server, tmp_path, capsys):
    url = redis_server.url.replace("/0", "/8")
    redis.Redis.from_url(url).flushdb()
    config = project(tmp_path, f"state: {url}\n"
                     "auth: {api_keys: {pepper: {env: APISHIELD_TEST_PEPPER}}}\n")
    assert cli(config, "bans", "add", "--subject", "bob", "--duration", "1h").returncode == 0
    assert cli(config, "bans", "remove", "--subject", "bob").returncode == 0
    sink = RedisAuditSink(url)
    try:
        found = [json.loads(entry.text) for entry in sink.entries()]
    finally:
        sink.close()
    assert [r["action"] for r in found] == ["ban-added", "ban-removed"]
    assert not (tmp_path / "apishield-state.db.audit.jsonl").exists()
    assert verify(capsys, "--config", str(config))[0] == 0


# -- the gateway --------------------------------------------------------------------------

def test_gateway_records_start_reload_and_admin_calls_not_probes(make_gateway, capsys):
    port = free_port()
    gateway = make_gateway({"admin": {"host": "127.0.0.1", "port": port},
                            "audit_log": {"path": "trail.jsonl"}})
    admin = f"http://127.0.0.1:{port}"
    trail = gateway.config_path.parent / "trail.jsonl"
    assert httpx.get(f"{admin}/healthz").status_code == 200
    assert httpx.get(f"{admin}/metrics").status_code == 200
    assert httpx.get(f"{admin}/config").status_code == 200
    gateway.config_path.write_text(gateway.config_path.read_text() + "headers: {hsts: 'off'}\n")
    assert httpx.post(f"{admin}/reload").json()["outcome"] == "succeeded"
    found = wait_for(lambda: (r := records(trail) if trail.exists() else [])
                     and len(r) >= 4 and r)
    actions = [(r["action"], r["actor"]) for r in found]
    assert actions[0] == ("gateway-started", "gateway")
    assert ("admin-call", "127.0.0.1") in actions
    reload = next(r for r in found if r["action"] == "config-reloaded")
    assert reload["details"]["config_sha256"] == hashlib.sha256(
        gateway.config_path.read_bytes()).hexdigest()
    assert reload["details"]["trigger"] == "admin"
    assert len(reload["details"]["contract_sha256"]) == 64
    calls = [r["details"] for r in found if r["action"] == "admin-call"]
    assert {(c["method"], c["path"], c["status"]) for c in calls} >= {
        ("GET", "/config", 200), ("POST", "/reload", 200)}
    assert all(c["path"] not in ("/healthz", "/readyz", "/metrics") for c in calls)
    assert verify(capsys, str(trail))[0] == 0


def test_gateway_keeps_serving_when_the_trail_cannot_be_written(make_gateway):
    port = free_port()
    gateway = make_gateway({"admin": {"host": "127.0.0.1", "port": port},
                            "audit_log": {"path": "no-such-folder/trail.jsonl"}})
    admin = f"http://127.0.0.1:{port}"
    assert httpx.get(f"{admin}/config").status_code == 200
    assert httpx.get(f"{gateway.url}/echo").status_code == 200

    def errors() -> float:
        text = httpx.get(f"{admin}/metrics").text
        return sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith("apishield_audit_log_errors_total"))

    assert wait_for(lambda: errors() >= 2)  # gateway-started and GET /config
    failed = wait_for(lambda: [line for line in json_lines(gateway.stderr(), "audit")
                               if line["event"] == "audit-trail-failed"])
    assert failed[0]["kind"] == "audit" and failed[0]["level"] == "error"
    assert "no-such-folder" in failed[0]["error"]
    assert gateway.process.poll() is None


def test_the_writer_thread_counts_a_failure_instead_of_raising(tmp_path):
    from apishield.observe.audit_trail import BackgroundAuditTrail

    before = METRICS.audit_errors
    writer = BackgroundAuditTrail(AuditTrail(FileSink(tmp_path / "gone" / "t.jsonl"), None))
    writer.submit("alert-fired", "gateway", rule="failed-logins")
    assert writer.flush()
    writer.close()
    assert METRICS.audit_errors == before + 1
    with pytest.raises(AuditTrailError, match="gone"):
        AuditTrail(FileSink(tmp_path / "gone" / "t.jsonl"), None).append("x", None)


def test_a_deleted_head_key_is_reported(redis_server, tmp_path, capsys):
    url = redis_server.url.replace("/0", "/9")
    client = redis.Redis.from_url(url)
    client.flushdb()
    trail = AuditTrail(RedisAuditSink(url), None)
    trail.append("alert-fired", "gateway", rule="failed-logins")
    trail.close()
    config = project(tmp_path, f"state: {url}\n")
    assert verify(capsys, "--config", str(config))[0] == 0
    client.delete("apishield:audit:head")
    code, _, err = verify(capsys, "--config", str(config))
    assert code == 1 and "head key is missing" in err
    client.close()


def test_check_reports_an_unreadable_audit_key_with_its_location(tmp_path):
    config = project(tmp_path, 'upstream: {url: "http://127.0.0.1:9"}\n'
                     "audit_log: {key: {file: no-such.key}}\n")
    result = subprocess.run([sys.executable, "-m", "apishield", "check", "--config",
                             str(config)], capture_output=True, text=True, timeout=60,
                            env=ENV, check=False)
    assert result.returncode == 2
    assert "audit_log.key: cannot read" in result.stderr and "no-such.key" in result.stderr


def test_a_gateway_with_redis_state_records_into_the_shared_stream(redis_server, make_gateway,
                                                                  capsys, monkeypatch):
    url = redis_server.url.replace("/0", "/10")
    client = redis.Redis.from_url(url)
    client.flushdb()
    port = free_port()
    monkeypatch.setenv("APISHIELD_TEST_PEPPER", ENV["APISHIELD_TEST_PEPPER"])  # the child's
    gateway = make_gateway({"state": url, "admin": {"host": "127.0.0.1", "port": port},
                            "auth": {"api_keys": {"pepper": {"env": "APISHIELD_TEST_PEPPER"}}}})
    assert httpx.get(f"http://127.0.0.1:{port}/config").status_code == 200

    def actions() -> list[str]:
        return [json.loads(values[b"record"])["action"]
                for _, values in client.xrange("apishield:audit")]

    assert wait_for(lambda: len(actions()) >= 2)
    assert actions() == ["gateway-started", "admin-call"]
    assert not list(gateway.config_path.parent.glob("*.audit.jsonl"))
    code, out, err = verify(capsys, "--config", str(gateway.config_path))
    assert code == 0, err
    assert out.startswith("intact: 2 record(s) in the Redis stream apishield:audit")
    client.close()
