"""The docs cannot drift from the code: config keys and problem types are checked both ways."""

from __future__ import annotations

import re
import typing
from pathlib import Path

from pydantic import BaseModel

from apishield.config import Config, OperationPolicy, config_from_dict
from apishield.contract.loader import load_contract
from apishield.pipeline import Pipeline
from apishield.problems import ALL_PROBLEMS

DOCS = Path(__file__).parent.parent / "docs"


def _model_of(annotation: object) -> type[BaseModel] | None:
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for name, field in model.model_fields.items():
        if field.exclude:
            continue
        if name == "operations" and not prefix:
            keys |= _keys(OperationPolicy, "operations.<operationId>.")
            continue
        nested = _model_of(field.annotation)
        if nested is not None and typing.get_origin(field.annotation) is dict:
            keys |= _keys(nested, f"{prefix}{name}.<name>.")  # e.g. auth.issuers.<name>.
        elif nested is not None:
            if typing.get_origin(field.annotation) is tuple:  # a list of models: the
                keys.add(prefix + name)  # list itself has a row, then each item's keys
            keys |= _keys(nested, f"{prefix}{name}.")
        else:
            keys.add(prefix + name)
    return keys


def test_configuration_reference_matches_the_models():
    text = (DOCS / "configuration.md").read_text()
    documented = set(re.findall(r"^\| `([^`]+)` \|", text, flags=re.MULTILINE))
    actual = _keys(Config)
    assert actual - documented == set(), "keys missing from docs/configuration.md"
    assert documented - actual == set(), "docs/configuration.md documents keys that do not exist"


def test_every_problem_type_is_documented():
    text = (DOCS / "problems.md").read_text()
    row = r"^\| (?:<a id=\"[a-z-]+\"></a>)?`([a-z-]+)` \| (\d{3}) \| (\w+) \|"
    documented = set(re.findall(row, text, flags=re.MULTILINE))
    actual = {(p.slug, str(p.status), p.practice) for p in ALL_PROBLEMS}
    assert documented == actual


def test_pipeline_order_is_the_documented_one():
    text = (DOCS / "architecture.md").read_text()
    data = Path(__file__).parent / "data"
    config = config_from_dict({"contract": "contract.yaml", "access_log": {"enabled": False}},
                              source_dir=data)
    for phase in Pipeline(config, load_contract(config)).order:
        assert " -> ".join(phase) in text


def _yaml_blocks() -> list[tuple[str, int, str]]:
    """(file, line, text) of every ```yaml block in the docs and the README."""
    blocks = []
    for path in [*sorted(DOCS.glob("*.md")), DOCS.parent / "README.md"]:
        lines = path.read_text().splitlines()
        start = None
        for number, line in enumerate(lines, 1):
            if start is None and line.strip() == "```yaml":
                start = number
            elif start is not None and line.strip() == "```":
                blocks.append((path.name, start, "\n".join(lines[start:number - 1])))
                start = None
    return blocks


def test_every_config_example_in_the_docs_loads_as_written():
    """A block whose keys are config keys is validated by the config loader exactly as
    written (a fragment without `contract:` gets one: the loader requires it, the example
    is about something else). Contract examples (`openapi:` or `paths:`) are skipped here:
    they are fragments of a document by nature."""
    import yaml

    from apishield.config import ConfigError
    from apishield.config.loading import YamlLoader

    fields = set(Config.model_fields)
    checked = 0
    for name, line, text in _yaml_blocks():
        data = yaml.load(text, Loader=YamlLoader)  # as apishield reads its config
        if not isinstance(data, dict) or "openapi" in data or "paths" in data:
            continue
        unknown = set(data) - fields
        assert not unknown, f"{name}:{line}: not config keys: {sorted(unknown)}"
        try:
            config_from_dict({"contract": "openapi.yaml", **data}, source_dir=DOCS)
        except ConfigError as exc:
            raise AssertionError(f"{name}:{line}: {exc.problems}") from None
        checked += 1
    assert checked >= 8


def test_every_metric_is_documented_with_its_type_and_labels():
    from apishield.observe.metrics import METRIC_SPECS

    text = (DOCS / "observability.md").read_text()
    row = r"^\| `(apishield_[a-z_]+)` \| (\w+) \|([^|]*)\|"
    documented = {name: (kind, tuple(re.findall(r"`(\w+)`", labels)))
                  for name, kind, labels in re.findall(row, text, flags=re.MULTILINE)}
    assert documented == {name: (spec.kind, spec.labels)
                          for name, spec in METRIC_SPECS.items()}
