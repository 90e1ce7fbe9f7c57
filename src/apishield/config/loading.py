"""`apishield.yaml` on disk -> a validated `Config`, every problem reported at once.

Separate from the models so that they stay plain data and so that the contract loader
can reuse `read_yaml` (same located YAML errors, same fast parser) for OpenAPI files.
YAML is parsed with libyaml when the wheel has it, with cyclic GC paused: a large file
makes many small objects and the GC passes dominated load time.
"""

from __future__ import annotations

import gc
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from apishield.config.errors import ConfigError, format_validation_error
from apishield.config.root import Config

try:  # libyaml's parser (the constructor stays Python); PyYAML wheels ship it
    from yaml import CSafeLoader as _BaseLoader
except ImportError:  # pragma: no cover - pure-Python fallback
    # a sibling class, not a subclass: mypy types the name by the first import
    from yaml import SafeLoader as _BaseLoader  # type: ignore[assignment]


class YamlLoader(_BaseLoader):
    """PyYAML's safe loader with YAML 1.2's booleans: only true/false (any case) are.

    PyYAML resolves plain scalars by YAML 1.1, where `on`, `off`, `yes`, `no`, `y`, `n`
    are booleans too: a ban rule written `{on: authn-failure}` (docs/rate-limiting.md)
    became `{True: authn-failure}` and did not load, and a contract's `enum: [yes, no]`
    would have become booleans. YAML 1.2 (2009; the version OpenAPI 3.1 names) drops them,
    so here they stay strings; a boolean config key still accepts `yes`/`on` (the models
    read those strings as true)."""


YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in _BaseLoader.yaml_implicit_resolvers.items()
}
YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"))


def read_yaml(path: Path) -> Any:
    """Parse a YAML file, turning syntax errors into located messages."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{path}: file not found"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: cannot read: {exc}"]) from None
    collecting = gc.isenabled()
    gc.disable()  # the constructor makes ~100k objects a MB: cyclic GC passes tripled load time
    try:
        return yaml.load(text, Loader=YamlLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{where}: invalid YAML: {problem}"]) from None
    finally:
        if collecting:
            gc.enable()


def load_config(path: str | Path) -> Config:
    """Read and validate `apishield.yaml`; raise ConfigError listing every problem."""
    path = Path(path)
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: must be a mapping with at least a 'contract' key"])
    return config_from_dict(data, source_dir=path.parent.resolve(), origin=path.name)


def config_from_dict(data: dict[str, Any], *, source_dir: Path, origin: str = "config") -> Config:
    if "source_dir" in data:
        raise ConfigError([f'{origin}: unknown key "source_dir"'])
    try:
        return Config.model_validate({**data, "source_dir": str(source_dir)})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None
