"""A ~5 MB generated contract (the one bench/contract_load.py times) loads completely.

Only correctness is asserted here (counts, compiled fields, YAML and JSON agree); how long
it takes is measured by `bench/contract_load.py`, hence a generous timeout, not a timing.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from apishield.config import ConfigError, load_config
from apishield.contract.loader import Contract, load_contract
from apishield.contract.router import Router

BENCH = Path(__file__).resolve().parent.parent / "bench" / "contract_load.py"


def _generator() -> Any:
    spec = importlib.util.spec_from_file_location("bench_contract_load", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


gen = _generator()


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return gen.build_document()


def test_generated_document_has_the_intended_shape(document):
    assert document["openapi"] == "3.0.3"
    assert len(document["paths"]) == 1500
    assert sum(
        1 for item in document["paths"].values() for key in item if key in ("get", "put", "post")
    ) == 3000
    schemas = document["components"]["schemas"]
    assert len(schemas) == 2001  # 2000 generated + Problem
    assert gen.count_refs(document) > 20000
    recursive = [name for name, schema in schemas.items()
                 if "children" in schema.get("properties", {})]
    assert len(recursive) == 200
    assert schemas["Schema0010"]["properties"]["children"]["items"] == {
        "$ref": "#/components/schemas/Schema0010"
    }


def _check(contract: Contract) -> None:
    operations = contract.operations
    assert len(operations) == 3000
    assert len({op.path for op in operations}) == 1500
    ids = [op.operation_id for op in operations]
    assert len(set(ids)) == 3000 and None not in ids
    by_method: dict[str, int] = {}
    for op in operations:
        by_method[op.method] = by_method.get(op.method, 0) + 1
        assert op.public is False  # top-level security applies everywhere
        if op.method in ("POST", "PUT"):
            assert op.media_types == ("application/json", "application/merge-patch+json")
            assert op.body_required is True
        else:
            assert op.media_types == () and op.body_required is False
    assert by_method == {"GET": 1500, "POST": 750, "PUT": 750}
    limited = [op for op in operations if op.policy.limits is not None]
    assert len(limited) == 4 * 30  # every 25th resource, all four operations
    assert {op.policy.limits.max_body_bytes for op in limited} == {65536}

    router = Router(operations)
    entry, params = router.match("/svc3/res18/42")
    assert entry.template == "/svc3/res18/{res18Id}" and params == {"res18Id": "42"}
    assert entry.allow == b"GET, HEAD, PUT"
    entry, params = router.match("/svc14/res749")
    assert entry.template == "/svc14/res749" and params == {}
    assert router.match("/svc3/res19/42") is None  # res19 lives under svc4


def _summary(contract: Contract) -> list[tuple[Any, ...]]:
    return [(op.method, op.path, op.operation_id, op.pointer, op.media_types,
             op.body_required, op.security, op.policy) for op in contract.operations]


@pytest.mark.timeout(120)
def test_large_yaml_and_json_contracts_load(tmp_path, document):
    loaded = {}
    for fmt in ("yaml", "json"):
        config_path = gen.write_contract(tmp_path / fmt, fmt, document)
        contract_file = config_path.parent / f"openapi.{fmt}"
        if fmt == "yaml":
            assert 4_000_000 < contract_file.stat().st_size < 7_000_000
        contract = load_contract(load_config(config_path))
        assert contract.version == "3.0.3"
        _check(contract)
        loaded[fmt] = _summary(contract)
    assert loaded["yaml"] == loaded["json"]


@pytest.mark.timeout(120)
def test_problems_in_a_large_contract_are_located(tmp_path, document):
    broken = json.loads(json.dumps(document))
    schemas = broken["components"]["schemas"]
    schemas["Schema1999"]["properties"]["owner"] = {"$ref": "#/components/schemas/Nope"}
    get = broken["paths"]["/svc9/res699/{res699Id}"]["get"]
    get["x-apishield"] = {"ratelimit": 1}
    config_path = gen.write_contract(tmp_path, "json", broken)
    with pytest.raises(ConfigError) as info:
        load_contract(load_config(config_path))
    assert sorted(info.value.problems) == [
        "openapi.json#/components/schemas/Schema1999/properties/owner/$ref: "
        "'#/components/schemas/Nope' points at nothing",
        'openapi.json#/paths/~1svc9~1res699~1{res699Id}/get/x-apishield: unknown key '
        '"ratelimit"',
    ]
