"""Teaching in refusals (issue 15, checklist G5): every problem type links to its page.

The renderer's bytes are checked against a plain `orjson.dumps` of the same members (the
pre-rendered parts must never drift from what a straightforward rendering gives), the
docs page is checked for an anchor and a fix per type, and a real gateway's refusal is
read to see the link arrive.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from apishield.config import ConfigError, config_from_dict
from apishield.problems import (
    ALL_PROBLEMS,
    InvalidBody,
    NotFound,
    ProblemRenderer,
    UpstreamFailure,
)

DOCS = Path(__file__).parent.parent / "docs"
BASE = "https://docs.example.com/problems"
ROW = re.compile(r'^\| <a id="([a-z-]+)"></a>`([a-z-]+)` \|([^|]*)\|([^|]*)\|([^|]*)\|([^|]*)\|$',
                 re.MULTILINE)


def _expected(problem: Any, request_id: str, docs: str | None) -> dict[str, Any]:
    document: dict[str, Any] = {
        "type": "urn:apishield:problem:" + problem.slug, "title": problem.title,
        "status": problem.status, "detail": problem.detail,
        "instance": "urn:apishield:request:" + request_id, "practice": problem.practice}
    if docs is not None:
        document["docs"] = f"{docs}#{problem.slug}"
    if problem.errors:
        document["errors"] = problem.errors
    return document


@pytest.mark.parametrize("docs", [None, BASE])
def test_every_problem_renders_as_a_plain_rendering_would(docs: str | None) -> None:
    renderer = ProblemRenderer(docs)
    for cls in ALL_PROBLEMS:
        for request_id in ("0" * 32, "f" * 32):  # the second call reads the cache
            problem = cls("some-reason")
            body = renderer.render(problem, request_id)
            assert body == orjson.dumps(_expected(problem, request_id, docs))
            assert b"some-reason" not in body  # the reason is never sent


def test_errors_and_per_instance_status_are_kept() -> None:
    renderer = ProblemRenderer(BASE)
    invalid = InvalidBody("body-schema")
    invalid.errors = [{"pointer": "/body/name", "reason": "type"}]
    assert orjson.loads(renderer.render(invalid, "ab" * 16)) == _expected(invalid, "ab" * 16,
                                                                           BASE)
    for status in (502, 503, 500):  # one cache entry per status: never a stale one
        failure = UpstreamFailure("upstream-5xx-masked")
        failure.status = status
        assert orjson.loads(renderer.render(failure, "cd" * 16))["status"] == status


def test_no_link_unless_configured() -> None:
    assert "docs" not in orjson.loads(ProblemRenderer().render(NotFound("route-not-declared"),
                                                               "0" * 32))
    config = config_from_dict({"contract": "contract.yaml"},
                              source_dir=Path(__file__).parent / "data")
    assert config.responses.problem_docs is None


@pytest.mark.parametrize("value", ["docs.example.com/problems", "https://x.example/p#frag",
                                   "https://x.example/p?q=1", "ftp://x.example/p"])
def test_a_base_url_that_cannot_take_an_anchor_is_refused(value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_dict({"contract": "contract.yaml", "responses": {"problem_docs": value}},
                         source_dir=Path(__file__).parent / "data")
    assert caught.value.problems[0].startswith("responses.problem_docs: ")
    assert "https://docs.example.com/problems" in caught.value.problems[0]


def test_every_type_has_an_anchor_a_practice_and_a_fix() -> None:
    rows = {anchor: (slug, practice.strip(), why.strip(), fix.strip())
            for anchor, slug, _status, practice, why, fix in
            ROW.findall((DOCS / "problems.md").read_text())}
    assert set(rows) == {cls.slug for cls in ALL_PROBLEMS}
    for anchor, (slug, practice, why, fix) in rows.items():
        assert anchor == slug, f"{slug}: its anchor is {anchor!r}"
        assert re.fullmatch(r"[A-G]\d+", practice), f"{slug}: no practice"
        assert why, f"{slug}: no explanation"
        assert len(fix) > 10, f"{slug}: no fix in docs/problems.md"


def test_a_real_refusal_carries_its_link(make_gateway: Any) -> None:
    gateway = make_gateway({"responses": {"problem_docs": BASE}})
    response = httpx.get(f"{gateway.url}/not-declared", timeout=5)
    assert response.status_code == 404
    body = response.json()
    assert body["type"] == "urn:apishield:problem:route-not-found"
    assert body["docs"] == f"{BASE}#route-not-found"
    assert body["instance"] == "urn:apishield:request:" + response.headers["x-request-id"]
    assert int(response.headers["content-length"]) == len(response.content)
