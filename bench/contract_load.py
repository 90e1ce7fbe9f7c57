#!/usr/bin/env python3
"""How long `load_contract` takes on a large, realistic OpenAPI 3.0 document (stdlib only).

Generates a ~5 MB YAML contract (1500 paths, 3000 operations, 2000 nested component
schemas, some recursive, ~28 000 `$ref`s) and its JSON twin, then times
`load_config` + `load_contract` on each (and the bare file parse, for comparison): median
of `--repeat` runs (default 3).

    .venv/bin/python bench/contract_load.py [--repeat 3] [--keep DIR]

`tests/test_large_contract.py` loads the same document (it imports `build_document` and
`write_contract` from here) and checks the counts; this script only measures.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESOURCES = 750  # each: a collection path (GET, POST) and an item path (GET, PUT)
SCHEMAS = 2000
SERVICES = 15
RECURSIVE_EVERY = 10  # every 10th schema refers to itself (tree nodes)

_PLAIN = re.compile(r"^[A-Za-z][A-Za-z0-9_ ./-]*[A-Za-z0-9_.]$|^[A-Za-z]$")
_PLAIN_KEY = re.compile(r"^[A-Za-z$/][A-Za-z0-9_$/{}.-]*$")
_RESERVED = {"true", "false", "null", "yes", "no", "on", "off", "y", "n", "~"}

LOREM = (
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor "
    "incididunt ut labore et dolore magna aliqua. Ut enim ad minim veniam, quis nostrud "
    "exercitation ullamco laboris nisi ut aliquip ex ea commodo consequat."
)


def schema_ref(index: int) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/Schema{index % SCHEMAS:04d}"}


def _schema(index: int) -> dict[str, Any]:
    """An object schema with scalars, a nested object, arrays and refs to other schemas."""
    name = f"Schema{index:04d}"
    properties: dict[str, Any] = {
        "id": {"type": "integer", "format": "int64", "minimum": 1, "readOnly": True},
        "name": {"type": "string", "minLength": 1, "maxLength": 128,
                 "description": f"Display name of the {name} record."},
        "status": {"type": "string", "enum": ["active", "pending", "archived"]},
        "tags": {"type": "array", "maxItems": 20,
                 "items": {"type": "string", "maxLength": 32}},
        "attributes": {
            "type": "object",
            "description": "Free-form attributes, validated per key.",
            "properties": {
                "colour": {"type": "string", "pattern": "^#[0-9a-f]{6}$"},
                "weight": {"type": "number", "minimum": 0, "exclusiveMinimum": True},
            },
            "additionalProperties": False,
        },
        "owner": schema_ref(index * 7 + 3),
        "related": {"type": "array", "items": schema_ref(index * 13 + 5)},
        "variant": {"oneOf": [schema_ref(index + 1), schema_ref(index + 2)]},
    }
    if index % RECURSIVE_EVERY == 0:  # tree nodes: legal recursive schemas
        properties["parent"] = {"allOf": [schema_ref(index)], "nullable": True}
        properties["children"] = {"type": "array", "items": schema_ref(index)}
    return {
        "type": "object",
        "description": f"{name}: {LOREM[:56]}",
        "required": ["id", "name", "status"],
        "properties": properties,
    }


def _operation(verb: str, resource: int, kind: str) -> dict[str, Any]:
    base = f"res{resource}"
    operation: dict[str, Any] = {
        "operationId": f"{verb}{kind}{resource}",
        "summary": f"{verb} {kind.lower()} of {base}",
        "description": f"{verb.capitalize()} one {base} {kind.lower()}; see the service guide.",
        "tags": [f"svc{resource % SERVICES}"],
        "parameters": [{"$ref": "#/components/parameters/RequestId"}],
        "responses": {
            "200": {
                "description": "Success",
                "content": {"application/json": {"schema": schema_ref(resource * 2)}},
            },
            "400": {"$ref": "#/components/responses/BadRequest"},
            "401": {"$ref": "#/components/responses/Unauthorized"},
            "404": {"$ref": "#/components/responses/NotFound"},
        },
    }
    if kind == "Collection" and verb == "list":
        operation["parameters"] += [
            {"$ref": "#/components/parameters/Limit"},
            {"$ref": "#/components/parameters/Offset"},
        ]
        operation["responses"]["200"]["content"]["application/json"]["schema"] = {
            "type": "array", "items": schema_ref(resource * 2),
        }
    if verb in ("create", "replace"):
        operation["requestBody"] = {
            "required": True,
            "content": {
                "application/json": {"schema": schema_ref(resource * 2 + 1)},
                "application/merge-patch+json": {"schema": schema_ref(resource * 2 + 1)},
            },
        }
    if resource % 25 == 0:
        operation["x-apishield"] = {"limits": {"max_body_bytes": "64KiB"}}
    return operation


def build_document(resources: int = RESOURCES, schemas: int = SCHEMAS) -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for resource in range(resources):
        prefix = f"/svc{resource % SERVICES}/res{resource}"
        paths[prefix] = {
            "get": _operation("list", resource, "Collection"),
            "post": _operation("create", resource, "Collection"),
        }
        paths[f"{prefix}/{{res{resource}Id}}"] = {
            "parameters": [{
                "name": f"res{resource}Id", "in": "path", "required": True,
                "schema": {"type": "integer", "minimum": 1},
            }],
            "get": _operation("get", resource, "Item"),
            "put": _operation("replace", resource, "Item"),
        }
    error = {"description": "Error", "content": {"application/problem+json": {
        "schema": {"$ref": "#/components/schemas/Problem"}}}}
    components = {
        "parameters": {
            "Limit": {"name": "limit", "in": "query",
                      "schema": {"type": "integer", "minimum": 1, "maximum": 100}},
            "Offset": {"name": "offset", "in": "query", "schema": {"type": "integer"}},
            "RequestId": {"name": "X-Request-Id", "in": "header",
                          "schema": {"type": "string", "maxLength": 64}},
        },
        "responses": {"BadRequest": error, "Unauthorized": error, "NotFound": error},
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "Problem": {"type": "object", "properties": {
                "type": {"type": "string"}, "title": {"type": "string"},
                "status": {"type": "integer"}, "detail": {"type": "string"},
            }},
            **{f"Schema{i:04d}": _schema(i) for i in range(schemas)},
        },
    }
    return {
        "openapi": "3.0.3",
        "info": {"title": "Large generated API", "version": "1.0.0", "description": LOREM},
        "servers": [{"url": "https://api.example.com/v1"}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": components,
    }


def count_refs(node: Any) -> int:
    if isinstance(node, dict):
        return ("$ref" in node) + sum(count_refs(v) for v in node.values())
    if isinstance(node, list):
        return sum(count_refs(v) for v in node)
    return 0


def _scalar(value: Any) -> str:
    if value is True:
        return "true"
    if value is False:
        return "false"
    if value is None:
        return "null"
    if isinstance(value, int | float):
        return repr(value)
    if _PLAIN.match(value) and value.lower() not in _RESERVED and ": " not in value:
        return value
    return json.dumps(value)


def _key(key: str) -> str:
    if _PLAIN_KEY.match(key) and key.lower() not in _RESERVED:
        return key
    return json.dumps(key)


def _emit(node: Any, indent: int, out: list[str]) -> None:
    pad = " " * indent
    if isinstance(node, dict):
        for key, value in node.items():
            if isinstance(value, dict | list) and value:
                out.append(f"{pad}{_key(key)}:")
                _emit(value, indent + 2, out)
            elif isinstance(value, dict | list):
                out.append(f"{pad}{_key(key)}: {'{}' if isinstance(value, dict) else '[]'}")
            else:
                out.append(f"{pad}{_key(key)}: {_scalar(value)}")
    else:
        for item in node:
            if isinstance(item, dict) and item:
                start = len(out)
                _emit(item, indent + 2, out)
                out[start] = f"{pad}- {out[start].lstrip()}"
            elif isinstance(item, dict | list):
                raise ValueError("empty or nested collections in lists are not emitted")
            else:
                out.append(f"{pad}- {_scalar(item)}")


def to_yaml(document: dict[str, Any]) -> str:
    """Block-style YAML, as people write contracts (plain scalars where unambiguous)."""
    out: list[str] = ["# Generated by bench/contract_load.py"]
    _emit(document, 0, out)
    return "\n".join(out) + "\n"


def write_contract(directory: Path, fmt: str, document: dict[str, Any]) -> Path:
    """Write `openapi.<fmt>` and an `apishield.yaml` naming it; return the config path."""
    directory.mkdir(parents=True, exist_ok=True)
    name = f"openapi.{fmt}"
    text = to_yaml(document) if fmt == "yaml" else json.dumps(document, indent=2)
    (directory / name).write_text(text, encoding="utf-8")
    config = directory / "apishield.yaml"
    config.write_text(f"contract: {name}\nupstream: {{url: 'http://127.0.0.1:9'}}\n")
    return config


def _median_time(func: Any, repeat: int) -> tuple[float, list[float], Any]:
    times = []
    result = None
    for _ in range(repeat):
        result = None  # the previous result must not stay alive (it would slow the GC)
        gc.collect()
        t0 = time.perf_counter()
        result = func()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--keep", type=Path, help="write the documents here and keep them")
    args = parser.parse_args(argv)

    from apishield.config import load_config
    from apishield.contract.loader import load_contract, load_document

    started = time.perf_counter()
    document = build_document()
    refs = count_refs(document)
    paths, schemas = len(document["paths"]), len(document["components"]["schemas"])
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        configs = {fmt: write_contract(root / fmt, fmt, document) for fmt in ("yaml", "json")}
        del document  # millions of live objects would make every GC pass slower
        print(f"generated in {time.perf_counter() - started:.1f} s: {paths} paths, "
              f"{schemas} schemas, {refs} $refs")
        for fmt, config_path in configs.items():
            contract_path = config_path.parent / f"openapi.{fmt}"
            median, times, contract = _median_time(
                lambda c=config_path: load_contract(load_config(c)), args.repeat
            )
            operations = len(contract.operations)
            contract = None
            parse, _, _ = _median_time(lambda p=contract_path: load_document(p), args.repeat)
            print(f"{fmt:4}  {contract_path.stat().st_size / 1e6:5.2f} MB  "
                  f"{operations} operations  load_contract median {median:6.3f} s "
                  f"(runs: {', '.join(f'{t:.3f}' for t in times)}); "
                  f"of which parsing the file ~{parse:6.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
