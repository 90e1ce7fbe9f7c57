"""The log scan of tests/secret_scan.py finds what it must, and reports no more than a prefix.

The files these tests plant secrets in live outside the session's base temp (`scratch`),
and the records they log do not reach the root logger: the session's own scan must not
find the planted secrets.
"""

from __future__ import annotations

import base64
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import jwt
import pytest

from apishield.auth.apikeys import generate_key
from tests import secret_scan
from tests.secret_scan import (
    RECORDS_FILE,
    REGISTRY,
    REGISTRY_FILE,
    SCAN_DIR,
    Registry,
    literal_secrets,
    log_files,
    scan,
)

PLANTED = "planted-S3cret-4f9a2c"


@pytest.fixture
def scratch() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="secret-scan-test-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _registry(*values: str, kind: str = "password") -> Registry:
    registry = Registry()
    for value in values:
        registry.add(value, kind, "test")
    return registry


def test_a_planted_secret_is_found_and_reported_by_prefix(scratch):
    log = scratch / "gw0" / "gateway.stderr"
    log.parent.mkdir()
    log.write_text(f"2026-01-01 WARNING apishield: login failed for password={PLANTED}\n")
    clean = scratch / "gw1" / "access.log"
    clean.parent.mkdir()
    clean.write_text('{"id":"abc","status":401,"reason":"auth-failed"}\n')
    hits, files = scan(log_files(scratch), _registry(PLANTED))
    assert files == 2
    assert [(Path(hit.where), hit.kind, hit.prefix, hit.length) for hit in hits] == [
        (log, "password", PLANTED[:5], len(PLANTED))]  # a quarter of it, at most 6
    assert PLANTED not in hits[0].describe() and PLANTED[:5] in hits[0].describe()


def test_encoded_spellings_are_found(scratch):
    secret = "s3cr3t:with/odd+chars"
    registry = _registry(secret)
    for name, text in (("percent", "x-secret%3A%20s3cr3t%3Awith%2Fodd%2Bchars"),
                       ("form", "password=s3cr3t%3Awith%2Fodd%2Bchars&x=1"),
                       ("json", json.dumps({"body": 'pw "s3cr3t:with/odd+chars"'}))):
        (scratch / f"{name}.log").write_text(text)
    hits, _ = scan(log_files(scratch), registry)
    assert sorted(Path(hit.where).name for hit in hits) == ["form.log", "json.log",
                                                            "percent.log"]


def test_api_keys_and_jwts_are_found_inside_other_text(scratch):
    _, key = generate_key()  # registered in REGISTRY by the hook, and here explicitly
    token = jwt.encode({"sub": "alice"}, "k" * 32, algorithm="HS256")
    assert key in REGISTRY and token in REGISTRY  # the automatic registration works
    registry = Registry()
    registry.add(key, "api key", "test")
    registry.add(token, "jwt", "test")
    (scratch / "a.log").write_text(f"GET /x?k={key}&t=1\n")  # glued to other characters
    (scratch / "b.log").write_bytes(b"Authorization: Bearer " + token.encode() + b"\r\n")
    (scratch / "c.log").write_text(f"key id {key[4:16]} only, and {token[:20]}\n")
    hits, files = scan(log_files(scratch), registry)
    assert files == 3
    assert sorted((Path(hit.where).name, hit.kind) for hit in hits) == [
        ("a.log", "api key"), ("b.log", "jwt")]


def test_short_and_repetitive_values_are_not_secrets():
    registry = _registry("hunter2", "x" * 43, "<redacted>", "abcdefgh")
    assert [value for value, _ in registry.items()] == ["abcdefgh"]


def test_only_log_files_are_read(scratch):
    for name in ("apishield.yaml", "contract.json", "state.db", "state.db.pepper", "key.pem",
                 "gateway.stderr", "access.log", "uvicorn.stderr", "events"):
        (scratch / name).write_text(PLANTED)
    (scratch / SCAN_DIR).mkdir()
    (scratch / SCAN_DIR / REGISTRY_FILE).write_text(json.dumps({PLANTED: ["x", "y"]}))
    (scratch / SCAN_DIR / RECORDS_FILE).write_text(PLANTED)
    names = sorted(path.name for path in log_files(scratch))
    assert names == ["access.log", "gateway.stderr", RECORDS_FILE, "uvicorn.stderr"]


def test_httpx_requests_register_the_credentials_they_carry():
    cookie = "session-Cookie-9d8e7f"
    basic_password = "basic-Pass-w0rd-xyz"
    request = httpx.Request("GET", "http://127.0.0.1:1/x?access_token=query-Token-1a2b3c",
                            headers={"Cookie": f"theme=dark; sid={cookie}",
                                     "Authorization": "Basic " + base64.b64encode(
                                         f"user:{basic_password}".encode()).decode(),
                                     "X-Api-Key": "header-Key-5e6f7a"})
    secret_scan._register_request(request)
    for value in (cookie, basic_password, "query-Token-1a2b3c", "header-Key-5e6f7a"):
        assert value in REGISTRY, value


def test_literals_in_sources_are_registered():
    source = '''
PASSWORD = "pw-literal-123abc"
client = make(password="kw-literal-456def", name="not-a-secret-name")
headers = {"Authorization": "Bearer hdr-Token-789aaa", "Cookie": "s=ck-Value-12ab34"}
body = "login failed: password=inline-Pw-5678zz"
label = "just a string of text"
KEY = "ask_abcdefghijkl_0123456789012345678901234567890123456789abc"
'''
    found = {value for _, value in literal_secrets(source)}
    assert {"pw-literal-123abc", "kw-literal-456def", "hdr-Token-789aaa", "ck-Value-12ab34",
            "inline-Pw-5678zz"} <= found
    assert "not-a-secret-name" not in found and "just a string of text" not in found
    assert "ask_abcdefghijkl_0123456789012345678901234567890123456789abc" in found


def test_log_records_of_the_pytest_process_are_kept_for_the_scan(scratch):
    handler = secret_scan._Records(scratch / SCAN_DIR / RECORDS_FILE)
    logger = logging.getLogger("tests.secret_scan.demo")
    logger.addHandler(handler)
    logger.propagate = False  # not into the session's own record log
    try:
        try:
            raise ValueError(f"boom with {PLANTED}")
        except ValueError:
            logger.error("failed", exc_info=True)  # the secret is in the traceback only
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    client = logging.getLogger("httpx")  # a test's HTTP client, logging what it requested
    client.addHandler(handler)
    try:
        client.warning("HTTP Request: GET http://127.0.0.1/x?api_key=client-Sent-42abcd")
    finally:
        client.removeHandler(handler)
    handler.close()
    hits, _ = scan(log_files(scratch), _registry(PLANTED, "client-Sent-42abcd"))
    assert len(hits) == 1 and hits[0].where.endswith(RECORDS_FILE)
    assert hits[0].prefix == PLANTED[:5]


def test_worker_registries_are_merged(scratch):
    """xdist: each worker dumps its registry under its basetemp; the controller merges."""
    for worker, secret in (("popen-gw0", "worker0-Secret-aa11"), ("popen-gw1",
                                                                  "worker1-Secret-bb22")):
        _registry(secret).dump(scratch / worker / SCAN_DIR / REGISTRY_FILE)
        (scratch / worker / "gw0").mkdir(parents=True)
        (scratch / worker / "gw0" / "gateway.stderr").write_text(f"oops {secret}\n")
    merged = Registry()
    for path in scratch.rglob(f"{SCAN_DIR}/{REGISTRY_FILE}"):
        merged.load(path)
    hits, _ = scan(log_files(scratch), merged)
    assert sorted(hit.prefix for hit in hits) == ["work", "work"]
    assert {Path(hit.where).parts[-3] for hit in hits} == {"popen-gw0", "popen-gw1"}


LEAKY_SUITE = '''
import logging

from tests.secret_scan import register_secret


def test_a_gateway_log_leaks(tmp_path):
    register_secret("leaked-Secret-0a1b2c3d", "password", "the leaky suite")
    (tmp_path / "gw0").mkdir()
    (tmp_path / "gw0" / "gateway.stderr").write_text("login failed: leaked-Secret-0a1b2c3d")


def test_a_log_record_leaks():
    register_secret("record-Secret-9z8y7x", "token", "the leaky suite")
    logging.getLogger("apishield").warning("token record-Secret-9z8y7x refused")
'''


def test_a_session_with_a_leak_fails(scratch):
    """The plugin in a pytest session of its own: a leak fails a green session and is
    reported by prefix (this very session shows the clean case: "secret scan: 0 hits")."""
    import os
    import subprocess
    import sys

    suite = scratch / "suite"
    suite.mkdir()
    (suite / "test_leaky.py").write_text(LEAKY_SUITE)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "-p", "tests.secret_scan", "--basetemp", str(scratch / "base"), str(suite)],
        capture_output=True, text=True, timeout=120, cwd=scratch,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent),
             "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"},  # its startup: 1 s, not 10
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "2 passed" in output and "secret scan: 2 hit(s)" in output
    assert "gateway.stderr: a password (leake... 22 chars" in output
    assert "pytest-logging.log: a token (recor... 20 chars" in output
    assert "leaked-Secret-0a1b2c3d" not in output and "record-Secret-9z8y7x" not in output
