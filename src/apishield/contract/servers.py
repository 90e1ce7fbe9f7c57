"""The base path a contract's `servers` give its paths (OpenAPI 3.x, Server Object).

A contract whose `servers` say `https://api.example.com/v1` serves `/pets` at `/v1/pets`:
the paths are relative to the server URL. apishield takes the path part of the servers as
its `base_path` when the config does not write one, so a real contract works as written
(issue 16). Variables are replaced by their defaults (the spec makes a default mandatory);
relative URLs (`/v1`) count as paths. Servers that disagree (`/v1` and `/v2`, or a path
variable with several allowed values) are ambiguous: then the config must say which one
this gateway serves, and the error says so.
"""

from __future__ import annotations

import re
from typing import Any

_VARIABLE = re.compile(r"\{([^{}]+)\}")


class AmbiguousServers(ValueError):
    """The servers do not agree on one base path; the message says why."""


def servers_base_path(servers: Any) -> str:
    """The path every server shares ("" for none or `/`); AmbiguousServers otherwise."""
    if not isinstance(servers, list) or not servers:
        return ""  # OpenAPI: an absent or empty list means one server at "/"
    paths: dict[str, int] = {}
    for index, server in enumerate(servers):
        if not isinstance(server, dict) or not isinstance(server.get("url"), str):
            raise AmbiguousServers(f"servers/{index} has no url")
        paths.setdefault(_path_of(server, index), index)
    if len(paths) > 1:
        shown = ", ".join(repr(path or "/") for path in paths)
        raise AmbiguousServers(f"the servers declare different base paths ({shown})")
    return next(iter(paths))


def first_server_path(servers: Any) -> str:
    """The first server's path, its variables at their defaults ("" when it has none or
    cannot be read): `apishield init`'s pick when the servers disagree."""
    if not isinstance(servers, list):
        return ""
    for index, server in enumerate(servers):
        if isinstance(server, dict) and isinstance(server.get("url"), str):
            try:
                return _path_of(server, index, pick_default=True)
            except AmbiguousServers:
                return ""
    return ""


def _path_of(server: dict[str, Any], index: int, *, pick_default: bool = False) -> str:
    url: str = server["url"].split("?", 1)[0].split("#", 1)[0]
    variables = server.get("variables")
    if "://" in url:  # absolute: the part after the host (variables still in place)
        rest = url.split("://", 1)[1]
        path = rest[rest.find("/"):] if "/" in rest else ""
    else:  # relative to where the document is served: its path is the base path
        path = "/" + url.lstrip("./")

    def default(match: re.Match[str]) -> str:
        name = match.group(1)
        variable = variables.get(name) if isinstance(variables, dict) else None
        if not isinstance(variable, dict) or not isinstance(variable.get("default"), str):
            raise AmbiguousServers(f"servers/{index}: variable {{{name}}} in the path has "
                                   "no default")
        enum = variable.get("enum")
        if isinstance(enum, list) and len(enum) > 1 and not pick_default:
            raise AmbiguousServers(f"servers/{index}: the path variable {{{name}}} may be "
                                   f"any of {', '.join(map(str, enum))}")
        return str(variable["default"])

    return _VARIABLE.sub(default, path).rstrip("/")
