"""Traps new users fell into (issue 16, part 4): a contradiction is a load error that says
which rule needs what; an override that opens a secured operation is a check warning."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from apishield.config import ConfigError, config_from_dict
from apishield.contract.loader import load_contract
from tests.conftest import DATA


def contract_dir(tmp_path: Path) -> Path:
    contract = yaml.safe_load((DATA / "contract.yaml").read_text())
    contract["components"]["securitySchemes"]["bearer"] = {"type": "http", "scheme": "bearer"}
    contract["paths"]["/echo"]["get"]["security"] = [{"apiKey": []}]
    (tmp_path / "contract.yaml").write_text(yaml.safe_dump(contract))
    (tmp_path / "paths.yaml").write_text((DATA / "paths.yaml").read_text())
    return tmp_path


@pytest.mark.parametrize("rule", [{"require": {"roles": ["admin"]}},
                                  {"owner": {"param": "path.id"}}])
def test_public_with_caller_rules_is_a_load_error(tmp_path: Path, rule: dict) -> None:
    folder = contract_dir(tmp_path)
    # echoItem is public through the contract's top-level `security: []`
    config = config_from_dict({"contract": "contract.yaml",
                               "operations": {"echoItem": rule}}, source_dir=folder)
    with pytest.raises(ConfigError) as caught:
        load_contract(config)
    (name,) = rule
    assert caught.value.problems == [
        f"contract.yaml#/paths/~1echo~1{{id}}/get: is public (security: []) but "
        f"operations.echoItem sets {name}, which needs an authenticated caller: every "
        f"request would be refused 401. Remove {name} to keep it public, or give it a "
        "security requirement (and no public: true) so callers authenticate"]


def test_public_true_over_a_secured_operation_is_a_check_warning(tmp_path: Path) -> None:
    folder = contract_dir(tmp_path)
    config = folder / "apishield.yaml"
    config.write_text(yaml.safe_dump({
        "contract": "contract.yaml", "upstream": {"url": "http://127.0.0.1:9"},
        "operations": {"echoGet": {"public": True}}}))
    result = subprocess.run([sys.executable, "-m", "apishield", "check", "--config",
                             str(config)], capture_output=True, text=True, timeout=30,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert ("warning: contract.yaml#/paths/~1echo/get: public: true overrides the contract's "
            "security requirement, so anyone can call it without a credential") in result.stderr


def test_an_explicitly_open_body_in_strict_mode_is_reported_once(tmp_path: Path) -> None:
    from apishield.contract.review import open_in_strict_mode

    document = {
        "openapi": "3.1.0", "info": {"title": "t", "version": "1"}, "security": [],
        "components": {"schemas": {"Profile": {
            "type": "object", "properties": {"bio": {"type": "string"}},
            "additionalProperties": True}}},
        "paths": {
            "/a": {"post": {"operationId": "a", "responses": {"200": {"description": "ok"}},
                            "requestBody": {"content": {"application/json": {"schema": {
                                "type": "object", "properties": {
                                    "profile": {"$ref": "#/components/schemas/Profile"}}}}}}}},
            "/b": {"post": {"operationId": "b", "responses": {"200": {"description": "ok"}},
                            "requestBody": {"content": {"application/json": {"schema": {
                                "$ref": "#/components/schemas/Profile"}}}}}},
            "/c": {"post": {"operationId": "c", "responses": {"200": {"description": "ok"}},
                            "x-apishield": {"strict": False},
                            "requestBody": {"content": {"application/json": {"schema": {
                                "type": "object", "unevaluatedProperties": True}}}}}},
        },
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(document))
    config = config_from_dict({"contract": "c.yaml"}, source_dir=tmp_path)
    found = open_in_strict_mode(load_contract(config), config)
    # the shared schema once (not once per operation); /c said strict: false itself
    assert found == [
        "c.yaml#/components/schemas/Profile: additionalProperties: true keeps undeclared "
        "properties although strict mode is on (mass assignment stays possible here); "
        "remove it to close the object, or write strict: false on the operations that rely "
        "on it (x-apishield or operations.<operationId>) to say so"]
    relaxed = config_from_dict({"contract": "c.yaml", "validation": {"strict": False}},
                               source_dir=tmp_path)
    assert open_in_strict_mode(load_contract(relaxed), relaxed) == []
