"""The OpenAPI loader: small contracts written to tmp_path, loaded like `apishield check`."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from apishield.config import ConfigError, load_config
from apishield.contract.loader import Contract, Operation, load_contract

OK = {"200": {"description": "ok"}}


def write_files(root: Path, files: dict[str, str | dict[str, Any]]) -> None:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, dict):
            text = (json.dumps(content) if name.endswith(".json")
                    else yaml.safe_dump(content, sort_keys=False))
        else:
            text = textwrap.dedent(content)
        path.write_text(text, encoding="utf-8")


def load(
    tmp_path: Path,
    files: dict[str, str | dict[str, Any]],
    config: str = "",
    contract: str = "contract.yaml",
) -> Contract:
    write_files(tmp_path, files)
    config_path = tmp_path / "apishield.yaml"
    config_path.write_text(f"contract: {contract}\n" + textwrap.dedent(config))
    return load_contract(load_config(config_path))


def problems(tmp_path: Path, files: dict[str, str | dict[str, Any]], config: str = "",
             contract: str = "contract.yaml") -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, files, config, contract)
    return info.value.problems


def by_id(contract: Contract) -> dict[str, Operation]:
    return {op.operation_id: op for op in contract.operations if op.operation_id}


def doc(version: str = "3.0.3", **extra: Any) -> dict[str, Any]:
    return {"openapi": version, "info": {"title": "t", "version": "1"}, **extra}


# --- versions and formats -------------------------------------------------------------


def pets_document(version: str) -> dict[str, Any]:
    return doc(
        version,
        security=[{"bearer": []}],
        paths={
            "/pets": {
                "get": {"operationId": "listPets", "security": [], "responses": OK},
                "post": {
                    "operationId": "createPet",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json; charset=utf-8": {"schema": {"type": "object"}},
                            "Application/XML": {},
                        },
                    },
                    "responses": OK,
                },
            },
            "/pets/{petId}": {
                "parameters": [{"name": "petId", "in": "path", "required": True,
                                "schema": {"type": "integer"}}],
                "get": {"operationId": "getPet", "responses": OK},
                "put": {
                    "operationId": "putPet",
                    "x-apishield": {"public": True},
                    "requestBody": {"content": {"application/json": {}}},
                    "responses": OK,
                },
                "delete": {"responses": OK},
                "summary": "not an operation",
            },
        },
        components={"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    )


@pytest.mark.parametrize("version", ["3.0.0", "3.0.3", "3.1.0", "3.1.1"])
@pytest.mark.parametrize("name", ["contract.yaml", "contract.json", "openapi.yml"])
def test_versions_and_formats_load(tmp_path, version, name):
    contract = load(tmp_path, {name: pets_document(version)}, contract=name)
    assert contract.version == version
    assert contract.source == (tmp_path / name).resolve()
    assert [(op.method, op.path, op.operation_id) for op in contract.operations] == [
        ("GET", "/pets", "listPets"),
        ("POST", "/pets", "createPet"),
        ("GET", "/pets/{petId}", "getPet"),
        ("PUT", "/pets/{petId}", "putPet"),
        ("DELETE", "/pets/{petId}", None),
    ]
    ops = by_id(contract)
    assert ops["listPets"].media_types == () and ops["listPets"].body_required is False
    assert ops["listPets"].security == () and ops["listPets"].public is True
    assert ops["listPets"].pointer == "/paths/~1pets/get"
    create = ops["createPet"]
    assert create.media_types == ("application/json", "application/xml")
    assert create.body_required is True
    assert create.security == ({"bearer": []},) and create.public is False
    assert ops["getPet"].public is False
    put = ops["putPet"]
    assert put.media_types == ("application/json",) and put.body_required is False
    assert put.public is True  # x-apishield: {public: true} despite the top-level security
    assert put.pointer == "/paths/~1pets~1{petId}/put"
    assert put.spec["x-apishield"] == {"public": True}


def test_no_top_level_security_means_unset(tmp_path):
    contract = load(tmp_path, {"contract.yaml": doc(paths={"/x": {"get": {"responses": OK}}})})
    [operation] = contract.operations
    assert operation.security is None and operation.public is False


def test_swagger_2_is_refused_with_how_to_convert(tmp_path):
    assert problems(tmp_path, {"contract.yaml": {"swagger": "2.0", "paths": {}}}) == [
        "contract.yaml#/swagger: Swagger/OpenAPI 2.0 is not supported; convert the document "
        "to OpenAPI 3 first, e.g. `npx swagger2openapi contract.yaml -o openapi3.yaml` (the "
        "maintained converter; Python has none that works offline), then point `contract` "
        "at the result"
    ]


@pytest.mark.parametrize(
    ("text", "shown"),
    [("openapi: 4.0.0", "'4.0.0'"), ("openapi: 2.0.0", "'2.0.0'"), ("openapi: 3.0", "'3.0'"),
     ("openapi: '3.2'", "'3.2'"), ("openapi: 3.10.0", "'3.10.0'"),
     ("info: {title: t}", "'(missing)'")],
)
def test_unsupported_or_missing_version(tmp_path, text, shown):
    assert problems(tmp_path, {"contract.yaml": text + "\npaths: {}\n"}) == [
        f"contract.yaml#/openapi: version {shown} is not supported; apishield reads "
        "OpenAPI 3.0.x and 3.1.x"
    ]


@pytest.mark.parametrize("text", ["- a\n- b\n", "hello\n", ""])
def test_document_must_be_a_mapping(tmp_path, text):
    assert problems(tmp_path, {"contract.yaml": text}) == [
        "contract.yaml: an OpenAPI document must be a mapping"
    ]


def test_contract_file_not_found(tmp_path):
    assert problems(tmp_path, {}, contract="nope.yaml") == [
        f"{(tmp_path / 'nope.yaml').resolve()}: file not found"
    ]


def test_contract_yaml_syntax_error_is_located(tmp_path):
    [problem] = problems(
        tmp_path, {"contract.yaml": "openapi: 3.0.3\npaths:\n  /x: {get: {}\n"}
    )
    assert problem.startswith(f"{(tmp_path / 'contract.yaml').resolve()}:4:1: invalid YAML: ")


def test_contract_json_syntax_error(tmp_path):
    [problem] = problems(tmp_path, {"contract.json": '{"openapi": "3.1.0",'},
                         contract="contract.json")
    assert problem.startswith(f"{(tmp_path / 'contract.json').resolve()}: invalid JSON: ")


# --- $ref resolution ------------------------------------------------------------------


def test_local_refs_to_path_item_parameter_and_request_body(tmp_path):
    contract = load(
        tmp_path,
        {
            "contract.yaml": """
            openapi: 3.0.3
            info: {title: t, version: "1"}
            paths:
              /pets/{petId}:
                parameters: [{$ref: "#/components/parameters/PetId"}]
                get:
                  operationId: getPet
                  parameters: [{$ref: "#/components/parameters/Verbose"}]
                  responses: {"200": {$ref: "#/components/responses/Pet"}}
                put:
                  operationId: putPet
                  requestBody: {$ref: "#/components/requestBodies/Pet"}
                  responses: {"200": {$ref: "#/components/responses/Pet"}}
              /shared:
                $ref: "#/components/x-pathItems/Shared"
              /chained:
                post:
                  operationId: chained
                  requestBody: {$ref: "#/components/requestBodies/Alias"}
                  responses: {}
            components:
              parameters:
                PetId: {name: petId, in: path, required: true, schema: {type: integer}}
                Verbose: {name: verbose, in: query, schema: {type: boolean}}
              requestBodies:
                Pet:
                  required: true
                  content: {application/json: {schema: {$ref: "#/components/schemas/Pet"}}}
                Alias: {$ref: "#/components/requestBodies/Pet"}
              responses:
                Pet:
                  description: a pet
                  content: {application/json: {schema: {$ref: "#/components/schemas/Pet"}}}
              schemas:
                Pet: {type: object, properties: {id: {type: integer}}}
              x-pathItems:
                Shared:
                  get: {responses: {}}
            """
        },
    )
    assert [(op.method, op.path, op.operation_id) for op in contract.operations] == [
        ("GET", "/pets/{petId}", "getPet"), ("PUT", "/pets/{petId}", "putPet"),
        ("GET", "/shared", None), ("POST", "/chained", "chained"),
    ]
    ops = contract.operations
    assert ops[1].media_types == ("application/json",) and ops[1].body_required is True
    assert ops[3].media_types == ("application/json",) and ops[3].body_required is True


def test_two_paths_sharing_one_path_item_duplicate_its_operation_ids(tmp_path):
    # the target is found through a percent-encoded pointer (`{` -> %7B)
    found = problems(tmp_path, {"contract.yaml": doc(paths={
        "/pets/{petId}": {"get": {"operationId": "getPet", "responses": OK}},
        "/animals/{petId}": {"$ref": "#/paths/~1pets~1%7BpetId%7D"},
    })})
    assert found == [
        "contract.yaml#/paths/~1animals~1{petId}/get/operationId: duplicate operationId "
        "'getPet' (also at /paths/~1pets~1{petId}/get)"
    ]


def test_refs_into_sibling_files_resolve_relative_to_the_referencing_file(tmp_path):
    contract = load(
        tmp_path,
        {
            "contract.yaml": """
            openapi: 3.1.0
            info: {title: t, version: "1"}
            paths:
              /pets:
                $ref: "sub/paths.yaml#/Pets"
              /owners:
                $ref: "sub/paths.json#/Owners"
            """,
            "sub/paths.yaml": """
            Pets:
              post:
                operationId: createPet
                requestBody: {$ref: "deeper/bodies.yaml#/NewPet"}
                responses: {"200": {description: ok}}
              get:
                operationId: listPets
                parameters: [{$ref: "#/Limit"}]
                responses: {"200": {description: ok}}
            Limit: {name: limit, in: query, schema: {type: integer}}
            """,
            "sub/paths.json": {
                "Owners": {"get": {"operationId": "listOwners",
                                   "requestBody": {"$ref": "deeper/bodies.yaml#/Form"},
                                   "responses": OK}},
            },
            "sub/deeper/bodies.yaml": """
            NewPet:
              required: true
              content:
                application/json: {schema: {$ref: "../../schemas.yaml#/Pet"}}
            Form: {$ref: "#/Real"}
            Real:
              content: {application/x-www-form-urlencoded: {}}
            """,
            "schemas.yaml": """
            Pet:
              type: object
              properties:
                owner: {$ref: "sub/paths.yaml#/Limit/schema"}
                kids: {type: array, items: {$ref: "#/Pet"}}
            """,
        },
    )
    ops = by_id(contract)
    assert set(ops) == {"createPet", "listPets", "listOwners"}
    assert ops["createPet"].media_types == ("application/json",)
    assert ops["createPet"].body_required is True
    assert ops["listOwners"].media_types == ("application/x-www-form-urlencoded",)
    assert ops["createPet"].path == "/pets" and ops["createPet"].pointer == "/paths/~1pets/post"


def test_json_pointer_escapes_and_percent_encoding(tmp_path):
    contract = load(
        tmp_path,
        {
            "contract.yaml": """
            openapi: 3.0.3
            info: {title: t, version: "1"}
            paths:
              /slash:
                $ref: "#/x-items/a~1b"
              /tilde:
                $ref: "#/x-items/c~0d"
              /tilde-one:
                $ref: "#/x-items/e~01"
              /space:
                $ref: "#/x-items/with%20space~1and~0more"
              /encoded-escape:
                $ref: "#/x-items/f%7E1g"
              /index:
                $ref: "#/x-list/1"
              /file:
                $ref: "dir%20one/items.yaml#/caf%C3%A9"
            x-items:
              a/b: {get: {operationId: slash, responses: {}}}
              c~d: {get: {operationId: tilde, responses: {}}}
              f/g: {get: {operationId: encodedEscape, responses: {}}}
              e~1: {get: {operationId: tildeOne, responses: {}}}
              with space/and~more: {get: {operationId: space, responses: {}}}
            x-list:
              - {}
              - {get: {operationId: index, responses: {}}}
            """,
            "dir one/items.yaml": "café: {get: {operationId: cafe, responses: {}}}\n",
        },
    )
    assert [(op.path, op.operation_id) for op in contract.operations] == [
        ("/slash", "slash"), ("/tilde", "tilde"), ("/tilde-one", "tildeOne"),
        ("/space", "space"), ("/encoded-escape", "encodedEscape"), ("/index", "index"),
        ("/file", "cafe"),
    ]


def test_dangling_refs_are_reported_at_the_ref(tmp_path):
    found = problems(
        tmp_path,
        {
            "contract.yaml": """
            openapi: 3.0.3
            info: {title: t, version: "1"}
            paths:
              /pets:
                get:
                  parameters: [{$ref: "#/components/parameters/Nope"}]
                  responses:
                    "200":
                      description: ok
                      content:
                        application/json: {schema: {$ref: "#/components/schemas/Missing"}}
              /a~b/c:
                post:
                  requestBody: {$ref: "other.yaml#/Bodies/Nope"}
                  responses: {}
              /gone:
                $ref: "gone.yaml#/Item"
            components:
              schemas:
                Pet: {properties: {x: {$ref: "#/components/schemas/Nope"}}}
            """,
            "other.yaml": "Bodies: {Pet: {content: {application/json: {}}}}\n",
        },
    )
    gone = (tmp_path / "gone.yaml").resolve()
    for expected in [
        "contract.yaml#/paths/~1pets/get/parameters/0/$ref: "
        "'#/components/parameters/Nope' points at nothing",
        "contract.yaml#/paths/~1pets/get/responses/200/content/application~1json/schema/$ref: "
        "'#/components/schemas/Missing' points at nothing",
        "contract.yaml#/paths/~1a~0b~1c/post/requestBody/$ref: "
        "'other.yaml#/Bodies/Nope' points at nothing",
        f"contract.yaml#/paths/~1gone/$ref: 'gone.yaml#/Item': {gone}: file not found",
        "contract.yaml#/components/schemas/Pet/properties/x/$ref: "
        "'#/components/schemas/Nope' points at nothing",
    ]:
        assert expected in found, found


@pytest.mark.parametrize(
    ("item", "ref_pointer"),
    [
        ({"$ref": "#/components/pathItems/Nope"}, "/paths/~1pets/$ref"),
        ({"post": {"requestBody": {"$ref": "#/components/requestBodies/Nope"}, "responses": OK}},
         "/paths/~1pets/post/requestBody/$ref"),
    ],
)
def test_a_dangling_ref_is_reported_once(tmp_path, item, ref_pointer):
    found = problems(tmp_path, {"contract.yaml": doc(paths={"/pets": item})})
    assert len(found) == 1, found
    assert found[0].startswith(f"contract.yaml#{ref_pointer}: ")
    assert found[0].endswith(" points at nothing")


def test_dangling_ref_inside_a_sibling_file_names_that_file(tmp_path):
    found = problems(
        tmp_path,
        {
            "contract.yaml": doc(paths={"/pets": {"$ref": "sub/paths.yaml#/Pets"}}),
            "sub/paths.yaml": """
            Pets:
              get:
                parameters: [{$ref: "#/Params/Nope"}]
                responses: {}
            Params: {}
            """,
        },
    )
    message = "#/Pets/get/parameters/0/$ref: '#/Params/Nope' points at nothing"
    sibling = (tmp_path / "sub" / "paths.yaml").resolve()
    assert f"sub/paths.yaml{message}" in found or f"{sibling}{message}" in found, found


@pytest.mark.parametrize(
    "ref",
    ["http://example.com/api.yaml#/Pets", "https://example.com/api.yaml",
     "file:///etc/passwd#/x", "HTTP://example.com/x.yaml#/A"],
)
def test_remote_refs_are_refused(tmp_path, ref):
    found = problems(tmp_path, {"contract.yaml": doc(paths={"/pets": {"$ref": ref}})})
    assert (
        f"contract.yaml#/paths/~1pets/$ref: remote reference {ref!r} is not supported; "
        "vendor the file"
    ) in found


def test_fragment_must_be_a_json_pointer(tmp_path):
    found = problems(tmp_path, {"contract.yaml": doc(paths={"/pets": {"$ref": "#Pets"}})})
    assert (
        "contract.yaml#/paths/~1pets/$ref: '#Pets': the fragment must be a JSON pointer (#/...)"
        in found
    )


@pytest.mark.timeout(10)
def test_request_body_ref_cycle_is_reported_not_a_hang(tmp_path):
    found = problems(
        tmp_path,
        {
            "contract.yaml": """
            openapi: 3.0.3
            info: {title: t, version: "1"}
            paths:
              /pets:
                post:
                  operationId: createPet
                  requestBody: {$ref: "#/components/requestBodies/A"}
                  responses: {}
            components:
              requestBodies:
                A: {$ref: "#/components/requestBodies/B"}
                B: {$ref: "#/components/requestBodies/A"}
            """
        },
    )
    assert found == [
        "contract.yaml#/paths/~1pets/post/requestBody: "
        "'#/components/requestBodies/A' is part of a reference cycle"
    ]


@pytest.mark.timeout(10)
def test_path_item_ref_cycle_across_files_is_reported(tmp_path):
    found = problems(
        tmp_path,
        {
            "contract.yaml": doc(paths={"/loop": {"$ref": "a.yaml#/Item"}}),
            "a.yaml": "Item: {$ref: 'b.yaml#/Item'}\n",
            "b.yaml": "Item: {$ref: 'a.yaml#/Item'}\n",
        },
    )
    assert len(found) == 1, found
    assert found[0] in (
        "contract.yaml#/paths/~1loop: 'a.yaml#/Item' is part of a reference cycle",
        "contract.yaml#/paths/~1loop: 'b.yaml#/Item' is part of a reference cycle",
    ), found


@pytest.mark.timeout(10)
def test_recursive_schemas_are_legal(tmp_path):
    contract = load(
        tmp_path,
        {
            "contract.yaml": """
            openapi: 3.1.0
            info: {title: t, version: "1"}
            paths:
              /trees:
                post:
                  operationId: createTree
                  requestBody:
                    content: {application/json: {schema: {$ref: "#/components/schemas/Node"}}}
                  responses:
                    "200":
                      description: ok
                      content:
                        application/json: {schema: {$ref: "schemas.yaml#/Person"}}
            components:
              schemas:
                Node:
                  type: object
                  properties:
                    value: {type: string}
                    parent: {$ref: "#/components/schemas/Node"}
                    children: {type: array, items: {$ref: "#/components/schemas/Node"}}
                    other: {$ref: "#/components/schemas/Forest"}
                Forest:
                  type: array
                  items: {allOf: [{$ref: "#/components/schemas/Node"}]}
            """,
            "schemas.yaml": """
            Person:
              type: object
              properties:
                friends: {type: array, items: {$ref: "#/Person"}}
                pet: {$ref: "pets.yaml#/Pet"}
            """,
            "pets.yaml": "Pet: {properties: {owner: {$ref: 'schemas.yaml#/Person'}}}\n",
        },
    )
    [operation] = contract.operations
    assert operation.operation_id == "createTree"
    assert operation.media_types == ("application/json",)


# --- x-apishield and the config's operations ------------------------------------------


def pets_with_extension(extension: Any) -> dict[str, Any]:
    return doc(paths={"/pets": {"get": {"operationId": "listPets", "x-apishield": extension,
                                        "responses": OK}}})


def test_unknown_x_apishield_key_is_reported_exactly(tmp_path):
    found = problems(tmp_path, {"contract.yaml": pets_with_extension({"ratelimit": 5})})
    assert found == ['contract.yaml#/paths/~1pets/get/x-apishield: unknown key "ratelimit"']


def test_nested_unknown_x_apishield_key(tmp_path):
    found = problems(tmp_path, {"contract.yaml": pets_with_extension({"limits": {"max": 1}})})
    assert found == ['contract.yaml#/paths/~1pets/get/x-apishield/limits: unknown key "max"']


def test_bad_x_apishield_values(tmp_path):
    found = problems(
        tmp_path,
        {"contract.yaml": pets_with_extension({"limits": {"max_body_bytes": "lots"},
                                               "public": "perhaps"})},
    )
    assert found == [
        "contract.yaml#/paths/~1pets/get/x-apishield/limits/max_body_bytes: 'lots' is not a "
        "size; write e.g. 1048576, 64KiB or 1MB",
        "contract.yaml#/paths/~1pets/get/x-apishield/public: Input should be a valid boolean, "
        "unable to interpret input",
    ]


def test_x_apishield_max_body_bytes_of_the_wrong_type(tmp_path):
    found = problems(
        tmp_path, {"contract.yaml": pets_with_extension({"limits": {"max_body_bytes": [1]}})}
    )
    assert len(found) == 1
    assert found[0].startswith(
        "contract.yaml#/paths/~1pets/get/x-apishield/limits/max_body_bytes: "
    )


def test_x_apishield_must_be_a_mapping(tmp_path):
    found = problems(tmp_path, {"contract.yaml": pets_with_extension(["public"])})
    assert found == ["contract.yaml#/paths/~1pets/get/x-apishield: must be a mapping"]


def test_x_apishield_problem_in_a_sibling_file_points_at_the_right_node(tmp_path):
    # The pointer must exist in the file it is paired with: either the logical location
    # in the root document, or the real location in the sibling file.
    found = problems(
        tmp_path,
        {
            "contract.yaml": doc(paths={"/pets": {"$ref": "paths.yaml#/Pets"}}),
            "paths.yaml": {"Pets": {"get": {"x-apishield": {"ratelimit": 1}, "responses": OK}}},
        },
    )
    assert len(found) == 1, found
    assert found[0] in (
        'contract.yaml#/paths/~1pets/get/x-apishield: unknown key "ratelimit"',
        'paths.yaml#/Pets/get/x-apishield: unknown key "ratelimit"',
    ), found


def test_config_operations_must_name_existing_operation_ids(tmp_path):
    found = problems(
        tmp_path,
        {"contract.yaml": pets_with_extension({})},
        config="operations:\n  listPet: {public: true}\n  listPets: {public: true}\n",
    )
    assert found == ["operations.listPet: no operation with this operationId in the contract"]


def test_duplicate_operation_ids(tmp_path):
    found = problems(
        tmp_path,
        {"contract.yaml": doc(paths={
            "/pets": {"get": {"operationId": "pets", "responses": OK}},
            "/animals": {"get": {"operationId": "pets", "responses": OK},
                         "post": {"operationId": "pets", "responses": OK}},
        })},
    )
    assert found == [
        "contract.yaml#/paths/~1animals/get/operationId: duplicate operationId 'pets' "
        "(also at /paths/~1pets/get)",
        "contract.yaml#/paths/~1animals/post/operationId: duplicate operationId 'pets' "
        "(also at /paths/~1animals/get)",
    ]


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("/pets/{id", "malformed path template '/pets/{id'"),
        ("/pets/id}", "malformed path template '/pets/id}'"),
        ("/pets/{{id}}", "malformed path template '/pets/{{id}}'"),
        ("/pets/{}", "malformed path template '/pets/{}'"),
        ("/pets/{id}/{id}", "path template '/pets/{id}/{id}' repeats a parameter name"),
        ("pets", "a path template must start with '/'"),
    ],
)
def test_bad_path_templates(tmp_path, template, message):
    found = problems(tmp_path, {"contract.yaml": doc(paths={template: {"get": {"responses": OK}}})})
    pointer = template.replace("~", "~0").replace("/", "~1")
    assert found == [f"contract.yaml#/paths/{pointer}: {message}"]


def test_templates_differing_only_in_parameter_names_are_refused_at_load(tmp_path):
    # reported by the loader, located, together with every other contract problem
    found = problems(tmp_path, {"contract.yaml": doc(paths={
        "/pets/{a}": {"get": {"operationId": "a", "responses": OK}},
        "/pets/{b}": {"delete": {"operationId": "b", "responses": OK}},
    })})
    assert found == [
        "contract.yaml#/paths/~1pets~1{b}: '/pets/{b}' and '/pets/{a}' are the same path "
        "with different parameter names; requests could match either (the OpenAPI Paths "
        "Object forbids it): give both the same parameter names and merge them into one "
        "path item"
    ]


def test_structural_problems(tmp_path):
    found = problems(
        tmp_path,
        {"contract.yaml": doc(paths={
            "/a": [],
            "/b": {"get": "nope"},
            "/c": {"get": {"operationId": 5, "security": {"x": []}, "responses": OK}},
        })},
    )
    assert found == [
        "contract.yaml#/paths/~1a: a path item must be a mapping",
        "contract.yaml#/paths/~1b/get: an operation must be a mapping",
        "contract.yaml#/paths/~1c/get/operationId: must be a string",
        "contract.yaml#/paths/~1c/get/security: must be a list of requirement objects",
    ]
    assert problems(tmp_path, {"contract.yaml": doc(paths=["/a"])}) == [
        "contract.yaml#/paths: must be a mapping of path templates"
    ]


def test_many_problems_in_one_contract_are_all_reported(tmp_path):
    found = problems(
        tmp_path,
        {
            "contract.yaml": """
            openapi: 3.0.3
            info: {title: t, version: "1"}
            paths:
              /pets:
                get:
                  operationId: listPets
                  x-apishield: {ratelimit: 5}
                  responses: {}
                post:
                  operationId: createPet
                  x-apishield: {limits: {max_body_bytes: lots}}
                  requestBody: {$ref: "#/components/requestBodies/A"}
                  responses: {}
              /pets/{id:
                get: {operationId: listPets, responses: {}}
              /pets/{petId}:
                get:
                  operationId: getPet
                  parameters: [{$ref: "#/components/parameters/Nope"}]
                  responses: {}
              /remote:
                $ref: "http://example.com/x.yaml#/A"
            components:
              requestBodies:
                A: {$ref: "#/components/requestBodies/B"}
                B: {$ref: "#/components/requestBodies/A"}
            """
        },
        config="operations: {nope: {public: true}}\n",
    )
    for expected in [
        'contract.yaml#/paths/~1pets/get/x-apishield: unknown key "ratelimit"',
        "contract.yaml#/paths/~1pets/post/x-apishield/limits/max_body_bytes: 'lots' is not "
        "a size; write e.g. 1048576, 64KiB or 1MB",
        "contract.yaml#/paths/~1pets/post/requestBody: '#/components/requestBodies/A' is "
        "part of a reference cycle",
        "contract.yaml#/paths/~1pets~1{id: malformed path template '/pets/{id'",
        "contract.yaml#/paths/~1pets~1{id/get/operationId: duplicate operationId 'listPets' "
        "(also at /paths/~1pets/get)",
        "contract.yaml#/paths/~1pets~1{petId}/get/parameters/0/$ref: "
        "'#/components/parameters/Nope' points at nothing",
        "contract.yaml#/paths/~1remote/$ref: remote reference "
        "'http://example.com/x.yaml#/A' is not supported; vendor the file",
        "operations.nope: no operation with this operationId in the contract",
    ]:
        assert expected in found, (expected, found)


def test_policy_merge_config_wins_per_key(tmp_path):
    contract = load(
        tmp_path,
        {"contract.yaml": doc(paths={"/pets": {
            "get": {"operationId": "listPets", "responses": OK,
                    "x-apishield": {"limits": {"max_body_bytes": "1KiB"}, "public": False}},
            "post": {"operationId": "createPet", "responses": OK,
                     "x-apishield": {"limits": {"max_body_bytes": 100}, "public": True}},
            "put": {"operationId": "putPet", "responses": OK,
                    "x-apishield": {"public": True}},
            "delete": {"operationId": "deletePet", "responses": OK},
            "patch": {"operationId": "patchPet", "responses": OK,
                      "x-apishield": {"limits": {"max_body_bytes": 7}}},
        }})},
        config="""
        operations:
          listPets: {public: true}
          createPet: {limits: {max_body_bytes: 2KiB}}
          putPet: {limits: {max_body_bytes: 5}}
          deletePet: {public: true, limits: {max_body_bytes: 0}}
        """,
    )
    ops = by_id(contract)
    policy = {k: (o.policy.limits.max_body_bytes if o.policy.limits else None, o.policy.public)
              for k, o in ops.items()}
    assert policy == {
        "listPets": (1024, True),  # limits from x-apishield, public from the config
        "createPet": (2048, True),  # limits from the config, public from x-apishield
        "putPet": (5, True),
        "deletePet": (0, True),
        "patchPet": (7, None),  # no config entry: x-apishield alone
    }
    assert ops["listPets"].public is True
    assert ops["patchPet"].public is False
