"""A contract whose schemas chain through `$ref` (each referring to the next) deeper than
start-up's depth-first walks can follow is refused with a clear, located ConfigError, never
a RecursionError traceback; realistic depths compile. Found with bench/contract_load.py's
generated contract (a 2,000-deep chain through `oneOf`), which `apishield check` used to
answer with a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from apishield.config import ConfigError, load_config
from apishield.gateway import build_gateway


def _chain_contract(directory: Path, depth: int) -> Path:
    schemas = {f"S{i}": {"type": "object", "properties": {
        "name": {"type": "string"}, "next": {"$ref": f"#/components/schemas/S{i + 1}"}}}
        for i in range(depth)}
    schemas[f"S{depth}"] = {"type": "object", "properties": {"name": {"type": "string"}}}
    body = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/S0"}}}}
    document = {
        "openapi": "3.0.3", "info": {"title": "chain", "version": "1"},
        "paths": {"/items": {"post": {
            "operationId": "create", "requestBody": {"required": True, **body},
            "responses": {"200": {"description": "ok", **body}}}}},
        "components": {"schemas": schemas},
    }
    path = directory / "openapi.json"
    path.write_text(json.dumps(document))
    (directory / "apishield.yaml").write_text(
        "contract: openapi.json\nupstream: {url: 'http://127.0.0.1:9'}\n"
        "responses: {mode: filter}\n")
    return path


def _config(directory: Path):
    return load_config(directory / "apishield.yaml")  # as `_chain_contract` wrote it


def test_a_realistic_chain_compiles(tmp_path):
    _chain_contract(tmp_path, 40)
    gateway = build_gateway(_config(tmp_path))
    assert gateway.pipeline.response_filter.reads_bodies  # the response shape was built


def test_a_chain_too_deep_to_walk_is_a_clear_config_error(tmp_path):
    _chain_contract(tmp_path, 400)
    with pytest.raises(ConfigError) as caught:
        build_gateway(_config(tmp_path))
    assert caught.value.problems == [
        "openapi.json#/paths/~1items/post/requestBody/content/application~1json/schema: "
        "schemas nest too deeply through $ref (a chain of more than about 100 "
        "schemas, each referring to the next); flatten the chain"]


def test_check_reports_the_deep_chain_without_a_traceback(tmp_path):
    _chain_contract(tmp_path, 400)
    done = subprocess.run([sys.executable, "-m", "apishield", "check", "--config",
                           str(tmp_path / "apishield.yaml")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "schemas nest too deeply through $ref" in done.stderr
    assert "Traceback" not in done.stderr and "RecursionError" not in done.stderr
