"""Load an OpenAPI 3.0/3.1 document into the immutable list of operations it declares.

The contract is the allow-list (checklist A7): what it does not declare is refused, so the
loader is strict and reports every problem with its location
(`openapi.yaml#/paths/~1pets/get/x-apishield: unknown key "ratelimit"`).

Large real-world contracts (megabytes, thousands of `$ref`s) load in seconds because
references are never inlined: the loader follows a `$ref` only where it needs the target
(path items, parameters, request bodies) and checks every other `$ref` once, memoized
per (file, pointer). Refs to sibling files are read once each; remote (`http:`) refs are
refused, since fetching at load would let the contract pull code from the network.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import orjson
from pydantic import ValidationError

from apishield.config import (
    Config,
    ConfigError,
    OperationPolicy,
    format_validation_error,
    read_yaml,
)
from apishield.exchange import media_type

HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
_TEMPLATE_PARAM = re.compile(r"\{([^{}/]+)\}")
_SUPPORTED_VERSION = re.compile(r"^3\.[01]\.\d+")


@dataclass(frozen=True)
class Parameter:
    """A declared parameter (path-item and operation level merged), located for messages."""

    name: str
    location: str  # path | query | header | cookie
    required: bool
    style: str
    explode: bool
    schema: Any  # the raw Schema Object (may hold $refs), or None
    file: Path  # the file the schema's $refs are relative to
    pointer: str  # where it is declared


_DEFAULT_STYLE = {"path": "simple", "query": "form", "header": "simple", "cookie": "form"}


@dataclass(frozen=True)
class Operation:
    """One declared (method, path) with what the foundation steps need, compiled."""

    method: str  # upper case
    path: str  # the template as written in the contract
    operation_id: str | None
    pointer: str  # where it is declared, for messages
    media_types: tuple[str, ...]  # declared request media types, lower case; () = no body
    body_required: bool
    security: tuple[dict[str, Any], ...] | None  # effective requirement list (None: unset)
    policy: OperationPolicy
    spec: dict[str, Any] = field(repr=False, compare=False)  # the raw operation object
    parameters: tuple[Parameter, ...] = ()
    # (media type, raw schema, file its $refs are relative to, pointer) per declared type
    bodies: tuple[tuple[str, Any, Path, str], ...] = field(default=(), compare=False)
    # (status key as written: "200", "2XX", "default"; media type; raw schema; file)
    responses: tuple[tuple[str, str, Any, Path], ...] = field(default=(), compare=False)

    @cached_property
    def label(self) -> str:
        """How metrics name it: the operationId, else `METHOD /path/{template}` (bounded
        by the contract, never a concrete path)."""
        return self.operation_id or f"{self.method} {self.path}"

    @property
    def public_over_security(self) -> bool:
        """`public: true` written over a security requirement the contract declares: the
        policy opens what the contract says is protected (a `check` warning, an `audit`
        finding)."""
        return self.policy.public is True and any(self.security or ())

    @cached_property
    def public(self) -> bool:
        """Explicitly public: `security: []` or `x-apishield: {public: true}`. Cached: the
        security-headers step asks on every response (issue 18)."""
        if self.policy.public is not None:
            return self.policy.public
        return self.security is not None and len(self.security) == 0


@dataclass(frozen=True)
class Contract:
    source: Path
    version: str
    operations: tuple[Operation, ...]
    resolver: RefResolver | None = field(default=None, repr=False, compare=False)
    # components.securitySchemes, $refs followed: name -> Security Scheme Object
    security_schemes: dict[str, dict[str, Any]] = field(default_factory=dict, compare=False)
    # the prefix of every path: `base_path` when the config writes it, else the path the
    # `servers` share (contract/servers.py)
    base_path: str = ""

    @property
    def openapi30(self) -> bool:
        return self.version.startswith("3.0")


class RefError(ValueError):
    """A `$ref` that cannot be followed. `dangling`: it points at nothing (or off-machine),
    which `_check_all_refs` reports once; a cycle is reported where it is followed."""

    def __init__(self, message: str, *, dangling: bool) -> None:
        super().__init__(message)
        self.dangling = dangling


def escape_pointer(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


class RefResolver:
    """Resolves `$ref`s across the root document and sibling files, with memoization."""

    def __init__(self, root_path: Path, root_doc: Any) -> None:
        self.root_path = root_path
        self.docs: dict[Path, Any] = {root_path: root_doc}
        self._cache: dict[tuple[Path, str], tuple[Any, Path]] = {}

    def document(self, path: Path) -> Any:
        if path not in self.docs:
            self.docs[path] = load_document(path)
        return self.docs[path]

    def resolve_ref(self, ref: str, base: Path) -> tuple[Any, Path]:
        """Return (target node, file it lives in); raise ValueError with a reason."""
        file_part, _, fragment = ref.partition("#")
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", file_part):
            raise RefError(f"remote reference {ref!r} is not supported; vendor the file",
                           dangling=True)
        target_file = (base.parent / unquote(file_part)).resolve() if file_part else base
        key = (target_file, fragment)
        if key in self._cache:
            return self._cache[key]
        try:
            node = self.document(target_file)
        except ConfigError as exc:
            raise RefError(f"{ref!r}: {exc.problems[0]}", dangling=True) from None
        if fragment:
            if not fragment.startswith("/"):
                raise RefError(f"{ref!r}: the fragment must be a JSON pointer (#/...)",
                               dangling=True)
            for raw_token in fragment[1:].split("/"):
                token = unquote(raw_token).replace("~1", "/").replace("~0", "~")
                if isinstance(node, dict) and token in node:
                    node = node[token]
                elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
                    node = node[int(token)]
                else:
                    raise RefError(f"{ref!r} points at nothing", dangling=True)
        self._cache[key] = (node, target_file)
        return node, target_file

    def deref(self, node: Any, base: Path) -> tuple[Any, Path, str | None]:
        """Follow a chain of `$ref`s to a concrete node, refusing cycles.

        Returns (node, the file it is in, its JSON pointer there if a `$ref` was followed).
        """
        seen: set[tuple[Path, str]] = set()
        pointer = None
        while isinstance(node, dict) and isinstance(node.get("$ref"), str):
            ref = node["$ref"]
            if (base, ref) in seen:
                raise RefError(f"{ref!r} is part of a reference cycle", dangling=False)
            seen.add((base, ref))
            node, base = self.resolve_ref(ref, base)
            pointer = ref.partition("#")[2] or ""
        return node, base, pointer


def load_document(path: Path) -> Any:
    """JSON through orjson (fast), anything else through libyaml."""
    if path.suffix.lower() == ".json":
        try:
            return orjson.loads(path.read_bytes())
        except FileNotFoundError:
            raise ConfigError([f"{path}: file not found"]) from None
        except orjson.JSONDecodeError as exc:
            raise ConfigError([f"{path}: invalid JSON: {exc}"]) from None
    return read_yaml(path)


class _Problems:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.items: list[str] = []

    def add(self, file: Path, pointer: str, message: str) -> None:
        name = os.path.relpath(file, self.root.parent)
        self.items.append(f"{name}#{pointer}: {message}")


def load_contract(config: Config) -> Contract:
    """Load, check and compile the contract named by the config; ConfigError on problems."""
    path = config.contract_path
    doc = load_document(path)
    problems = _Problems(path)
    if not isinstance(doc, dict):
        raise ConfigError([f"{path.name}: an OpenAPI document must be a mapping"])
    if "swagger" in doc:
        raise ConfigError(
            [
                f"{path.name}#/swagger: Swagger/OpenAPI 2.0 is not supported; convert the "
                "document to OpenAPI 3 first, e.g. `npx swagger2openapi "
                f"{path.name} -o openapi3.yaml` (the maintained converter; Python has none "
                "that works offline), then point `contract` at the result"
            ]
        )
    version = str(doc.get("openapi", ""))
    if not _SUPPORTED_VERSION.match(version):
        raise ConfigError(
            [f"{path.name}#/openapi: version {version or '(missing)'!r} is not supported; "
             "apishield reads OpenAPI 3.0.x and 3.1.x"]
        )
    resolver = RefResolver(path, doc)
    _check_all_refs(resolver, problems)
    operations = _collect_operations(doc, resolver, problems, config)
    _check_config_operations(config, operations, problems)
    schemes = _security_schemes(doc, resolver, problems)
    _check_security(path, operations, schemes, problems)
    base_path = config.base_path
    if "base_path" not in config.model_fields_set:
        from apishield.contract.servers import AmbiguousServers, servers_base_path

        try:
            base_path = servers_base_path(doc.get("servers"))
        except AmbiguousServers as exc:
            problems.add(path, "/servers", f"{exc}, so the prefix of the paths is unclear: "
                         "write base_path in the config (the one this gateway serves, e.g. "
                         "base_path: /v1, or base_path: \"\" for none)")
    if problems.items:
        raise ConfigError(problems.items)
    return Contract(source=path, version=version, operations=tuple(operations),
                    resolver=resolver, security_schemes=schemes, base_path=base_path)


_SCHEME_TYPES = ("apiKey", "http", "oauth2", "openIdConnect", "mutualTLS")


def _security_schemes(
    doc: dict[str, Any], resolver: RefResolver, problems: _Problems
) -> dict[str, dict[str, Any]]:
    """`components.securitySchemes` with $refs followed and each scheme's shape checked;
    what apishield can enforce is decided later, by the auth compiler."""
    root = resolver.root_path
    components = doc.get("components")
    raw = components.get("securitySchemes") if isinstance(components, dict) else None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        problems.add(root, "/components/securitySchemes", "must be a mapping")
        return {}
    schemes: dict[str, dict[str, Any]] = {}
    for name, entry in raw.items():
        where = "/components/securitySchemes/" + escape_pointer(str(name))
        followed = _deref_reporting(resolver, entry, root, where, problems)
        if followed is None:
            continue
        scheme = followed[0]
        if not isinstance(scheme, dict) or scheme.get("type") not in _SCHEME_TYPES:
            problems.add(root, where, "a security scheme needs a `type`: one of "
                         + ", ".join(_SCHEME_TYPES))
            continue
        kind = scheme["type"]
        if kind == "apiKey" and (not isinstance(scheme.get("name"), str)
                                 or scheme.get("in") not in ("header", "query", "cookie")):
            problems.add(root, where, "an apiKey scheme needs `name` and `in` "
                         "(header, query or cookie)")
            continue
        if kind == "http" and not isinstance(scheme.get("scheme"), str):
            problems.add(root, where, "an http scheme needs `scheme` (e.g. bearer)")
            continue
        schemes[str(name)] = scheme
    return schemes


def _check_security(
    root: Path, operations: list[Operation], schemes: dict[str, dict[str, Any]],
    problems: _Problems,
) -> None:
    """Every requirement names a declared scheme (a typo must not make an operation
    unreachable or, worse, silently public); each is a mapping of name -> scope list."""
    for operation in operations:
        if not operation.security:
            continue
        for index, requirement in enumerate(operation.security):
            where = f"{operation.pointer}/security/{index}"
            if not isinstance(requirement, dict):
                problems.add(root, where, "a security requirement must be a mapping of "
                             "scheme name -> list of scopes")
                continue
            for name, scopes in requirement.items():
                if name not in schemes:
                    problems.add(root, f"{where}/{escape_pointer(str(name))}",
                                 f"no security scheme named {name!r} in "
                                 "components.securitySchemes")
                elif not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
                    problems.add(root, f"{where}/{escape_pointer(str(name))}",
                                 "must be a list of scope names")


def _deref_reporting(
    resolver: RefResolver, node: Any, file: Path, where: str, problems: _Problems
) -> tuple[Any, Path, str | None] | None:
    """`resolver.deref`, or None after reporting a cycle (a dangling `$ref` was already
    reported, once, by `_check_all_refs`)."""
    try:
        return resolver.deref(node, file)
    except RefError as exc:
        if not exc.dangling:
            problems.add(file, where, str(exc))
        return None


def _check_all_refs(resolver: RefResolver, problems: _Problems) -> None:
    """Every `$ref` in every reachable file must resolve (checked once per target)."""
    pending = [resolver.root_path]
    visited: set[Path] = set()
    while pending:
        file = pending.pop()
        if file in visited:
            continue
        visited.add(file)
        stack: list[tuple[Any, str]] = [(resolver.document(file), "")]
        while stack:
            node, pointer = stack.pop()
            if isinstance(node, dict):
                ref = node.get("$ref")
                if isinstance(ref, str):
                    try:
                        _, target_file = resolver.resolve_ref(ref, file)
                    except RefError as exc:
                        problems.add(file, pointer + "/$ref", str(exc))
                    else:
                        if target_file not in visited:
                            pending.append(target_file)
                for key, value in node.items():
                    if isinstance(value, dict | list):
                        stack.append((value, f"{pointer}/{escape_pointer(str(key))}"))
            elif isinstance(node, list):
                for index, value in enumerate(node):
                    if isinstance(value, dict | list):
                        stack.append((value, f"{pointer}/{index}"))


def _collect_operations(
    doc: dict[str, Any], resolver: RefResolver, problems: _Problems, config: Config
) -> list[Operation]:
    root = resolver.root_path
    paths = doc.get("paths") or {}
    if not isinstance(paths, dict):
        problems.add(root, "/paths", "must be a mapping of path templates")
        return []
    top_security = doc.get("security")
    seen_ids: dict[str, str] = {}
    shapes: dict[str, str] = {}
    operations: list[Operation] = []
    for template, raw_item in paths.items():
        item_pointer = "/paths/" + escape_pointer(str(template))
        if not isinstance(template, str) or not template.startswith("/"):
            problems.add(root, item_pointer, "a path template must start with '/'")
            continue
        followed = _deref_reporting(resolver, raw_item, root, item_pointer, problems)
        if followed is None:
            continue
        item, item_file, item_ref_pointer = followed
        # where the path item is written, for messages (a sibling file, if it was $ref'd)
        item_location = item_pointer if item_ref_pointer is None else item_ref_pointer
        if not isinstance(item, dict):
            problems.add(root, item_pointer, "a path item must be a mapping")
            continue
        _check_template(template, root, item_pointer, problems)
        shape = _TEMPLATE_PARAM.sub("{}", template)
        if shape in shapes:
            # OpenAPI 3.0.3 and 3.1.0, Paths Object: "Templated paths with the same
            # hierarchy but different templated names MUST NOT exist as they are identical."
            problems.add(root, item_pointer, f"{template!r} and {shapes[shape]!r} are the same "
                         "path with different parameter names; requests could match either "
                         "(the OpenAPI Paths Object forbids it): give both the same "
                         "parameter names and merge them into one path item")
            continue
        shapes[shape] = template
        item_parameters = _parameters(item.get("parameters"), item_file, item_location,
                                      resolver, problems)
        for method in HTTP_METHODS:
            raw_op = item.get(method)
            if raw_op is None:
                continue
            op_pointer = f"{item_pointer}/{method}"
            location = f"{item_location}/{method}"
            if not isinstance(raw_op, dict):
                problems.add(item_file, location, "an operation must be a mapping")
                continue
            operation = _compile_operation(
                method, template, raw_op, op_pointer, (item_file, location), resolver,
                problems, top_security, config, item_parameters,
            )
            if operation.operation_id:
                if operation.operation_id in seen_ids:
                    problems.add(  # located where the duplicate path is declared
                        root, op_pointer + "/operationId",
                        f"duplicate operationId {operation.operation_id!r} "
                        f"(also at {seen_ids[operation.operation_id]})",
                    )
                seen_ids[operation.operation_id] = op_pointer
            operations.append(operation)
    return operations


def _check_template(template: str, file: Path, pointer: str, problems: _Problems) -> None:
    stripped = _TEMPLATE_PARAM.sub("x", template)
    if "{" in stripped or "}" in stripped:
        problems.add(file, pointer, f"malformed path template {template!r}")
    names = _TEMPLATE_PARAM.findall(template)
    if len(names) != len(set(names)):
        problems.add(file, pointer, f"path template {template!r} repeats a parameter name")


def _compile_operation(
    method: str,
    template: str,
    raw: dict[str, Any],
    pointer: str,
    where: tuple[Path, str],
    resolver: RefResolver,
    problems: _Problems,
    top_security: Any,
    config: Config,
    item_parameters: dict[tuple[str, str], Parameter],
) -> Operation:
    file, location = where  # for messages: the file and pointer where it is written
    # OAS 3: operation-level parameters override path-level ones with the same name + in
    parameters = {**item_parameters,
                  **_parameters(raw.get("parameters"), file, location, resolver, problems)}
    bodies: list[tuple[str, Any, Path, str]] = []
    operation_id = raw.get("operationId")
    if operation_id is not None and not isinstance(operation_id, str):
        problems.add(file, location + "/operationId", "must be a string")
        operation_id = None
    media_types: tuple[str, ...] = ()
    body_required = False
    if "requestBody" in raw:
        followed = _deref_reporting(resolver, raw["requestBody"], file,
                                    location + "/requestBody", problems)
        body, body_file, body_pointer = followed or ({}, file, None)
        if isinstance(body, dict):
            content = body.get("content") or {}
            media_types = tuple(media_type(str(key)) for key in content)
            body_required = bool(body.get("required", False))
            where_body = body_pointer if body_pointer is not None else location + "/requestBody"
            for key, media in content.items():
                if isinstance(media, dict) and "schema" in media:
                    name = media_type(str(key))
                    bodies.append((name, media["schema"], body_file,
                                   f"{where_body}/content/{escape_pointer(str(key))}/schema"))
    security = raw.get("security", top_security)
    if security is not None and not isinstance(security, list):
        problems.add(file, location + "/security", "must be a list of requirement objects")
        security = None
    policy = _operation_policy(raw, operation_id, location, file, problems, config)
    operation = Operation(
        method=method.upper(),
        path=template,
        operation_id=operation_id,
        pointer=pointer,
        media_types=media_types,
        body_required=body_required,
        security=tuple(security) if security is not None else None,
        policy=policy,
        spec=raw,
        parameters=tuple(parameters.values()),
        bodies=tuple(bodies),
        responses=tuple(_responses(raw.get("responses"), file, resolver)),
    )
    if operation.public and (policy.require is not None or policy.owner is not None):
        # rules about the caller on an operation nobody authenticates for: every request
        # would be a 401 credentials-missing (a trap new users fell into, issue 16)
        rules = " and ".join(name for name, rule in (("require", policy.require),
                                                     ("owner", policy.owner)) if rule)
        source = (f"operations.{operation_id}" if operation_id and operation_id in
                  config.operations else "x-apishield")
        why = "public: true" if policy.public else "security: []"
        problems.add(file, location, f"is public ({why}) but {source} sets {rules}, which "
                     "needs an authenticated caller: every request would be refused 401. Remove "
                     f"{rules} to keep it public, or give it a security requirement (and "
                     "no public: true) so callers authenticate")
    return operation


def _responses(raw: Any, file: Path, resolver: RefResolver) -> list[tuple[str, str, Any, Path]]:
    """Declared response schemas; unresolvable entries were reported by the ref check."""
    found: list[tuple[str, str, Any, Path]] = []
    if not isinstance(raw, dict):
        return found
    for status, entry in raw.items():
        try:
            response, response_file, _ = resolver.deref(entry, file)
        except RefError:
            continue
        content = response.get("content") if isinstance(response, dict) else None
        if not isinstance(content, dict):
            continue
        for media, body in content.items():
            if isinstance(body, dict) and "schema" in body:
                name = media_type(str(media))
                found.append((str(status).upper(), name, body["schema"], response_file))
    return found


def _parameters(
    raw: Any, file: Path, location: str, resolver: RefResolver, problems: _Problems
) -> dict[tuple[str, str], Parameter]:
    """Parameter Objects (following $refs) keyed by (name, in)."""
    found: dict[tuple[str, str], Parameter] = {}
    if raw is None:
        return found
    if not isinstance(raw, list):
        problems.add(file, location + "/parameters", "must be a list")
        return found
    for index, entry in enumerate(raw):
        where = f"{location}/parameters/{index}"
        followed = _deref_reporting(resolver, entry, file, where, problems)
        if followed is None:
            continue
        param, param_file, ref_pointer = followed
        if ref_pointer is not None:
            where = ref_pointer
        if not isinstance(param, dict) or not isinstance(param.get("name"), str) or \
                param.get("in") not in _DEFAULT_STYLE:
            problems.add(param_file, where, "a parameter needs a `name` and `in` "
                         "(path, query, header or cookie)")
            continue
        kind = param["in"]
        name = param["name"] if kind != "header" else param["name"].lower()
        style = param.get("style", _DEFAULT_STYLE[kind])
        schema = param.get("schema")
        if schema is None and isinstance(param.get("content"), dict):
            media = next(iter(param["content"].values()), None)
            schema = media.get("schema") if isinstance(media, dict) else None
        found[(name, kind)] = Parameter(
            name=name,
            location=kind,
            required=bool(param.get("required", kind == "path")),
            style=style,
            explode=bool(param.get("explode", style == "form")),
            schema=schema,
            file=param_file,
            pointer=where,
        )
    return found


def _operation_policy(
    raw: dict[str, Any],
    operation_id: str | None,
    pointer: str,
    file: Path,
    problems: _Problems,
    config: Config,
) -> OperationPolicy:
    """`x-apishield` on the operation, overlaid by `operations.<id>` from the YAML."""
    merged: dict[str, Any] = {}
    extension = raw.get("x-apishield")
    if extension is not None:
        if not isinstance(extension, dict):
            problems.add(file, pointer + "/x-apishield", "must be a mapping")
        else:
            try:
                merged = OperationPolicy.model_validate(extension).model_dump(exclude_unset=True)
            except ValidationError as exc:
                for line in format_validation_error(exc):
                    location, _, message = line.partition(": ")
                    suffix = "" if location == "(top level)" else "/" + location.replace(".", "/")
                    problems.add(file, f"{pointer}/x-apishield{suffix}", message)
    if operation_id and operation_id in config.operations:
        override = config.operations[operation_id].model_dump(exclude_unset=True)
        for key, value in override.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
    return OperationPolicy.model_validate(merged)


def _check_config_operations(
    config: Config, operations: list[Operation], problems: _Problems
) -> None:
    known = {op.operation_id for op in operations if op.operation_id}
    for operation_id in config.operations:
        if operation_id not in known:
            problems.items.append(
                f"operations.{operation_id}: no operation with this operationId in the contract"
            )
