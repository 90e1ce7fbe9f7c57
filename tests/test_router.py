"""Unit tests of the pure routing functions: `Router.match` and `paths.normalize_path`."""

from __future__ import annotations

import pytest

from apishield.config import ConfigError, OperationPolicy
from apishield.contract.loader import Operation
from apishield.contract.paths import normalize_path, split_target
from apishield.contract.router import Router
from apishield.problems import BadRequest


def op(method: str, path: str, operation_id: str | None = None) -> Operation:
    return Operation(
        method=method,
        path=path,
        operation_id=operation_id or f"{method} {path}",
        pointer="",
        media_types=(),
        body_required=False,
        security=None,
        policy=OperationPolicy(),
        spec={},
    )


def router(*templates: str, base_path: str = "", method: str = "GET") -> Router:
    return Router(tuple(op(method, t) for t in templates), base_path)


def match(r: Router, path: str) -> tuple[str, dict[str, str]] | None:
    found = r.match(path)
    if found is None:
        return None
    entry, params = found
    return entry.template, params


# --- Router.match ---------------------------------------------------------------------


def test_static_and_root():
    r = router("/", "/pets", "/pets/mine")
    assert match(r, "/") == ("/", {})
    assert match(r, "/pets") == ("/pets", {})
    assert match(r, "/pets/mine") == ("/pets/mine", {})
    assert match(r, "/pets/") is None  # a trailing slash is a different path
    assert match(r, "/pet") is None
    assert match(r, "/PETS") is None  # case-sensitive
    assert match(r, "") is None


def test_static_beats_templated():
    r = router("/pets/{id}", "/pets/mine")
    assert match(r, "/pets/mine") == ("/pets/mine", {})
    assert match(r, "/pets/42") == ("/pets/{id}", {"id": "42"})


def test_literal_segment_beats_parameter_deeper_in_the_tree():
    r = router("/users/{id}/orders", "/users/me/orders", "/users/{id}/orders/{orderId}")
    assert match(r, "/users/me/orders") == ("/users/me/orders", {})
    assert match(r, "/users/7/orders") == ("/users/{id}/orders", {"id": "7"})
    # no `/users/me/orders/{orderId}`: backtrack to the parameter branch
    assert match(r, "/users/me/orders/9") == (
        "/users/{id}/orders/{orderId}", {"id": "me", "orderId": "9"},
    )


def test_literal_first_then_backtrack():
    r = router("/a/{x}/c", "/a/b/{y}")
    assert match(r, "/a/b/c") == ("/a/b/{y}", {"y": "c"})  # the earlier literal wins
    assert match(r, "/a/b/d") == ("/a/b/{y}", {"y": "d"})
    assert match(r, "/a/z/c") == ("/a/{x}/c", {"x": "z"})
    assert match(r, "/a/z/d") is None
    r = router("/a/{x}/c", "/a/b/{y}/d")
    assert match(r, "/a/b/c") == ("/a/{x}/c", {"x": "b"})  # literal branch dead-ends
    assert match(r, "/a/b/c/d") == ("/a/b/{y}/d", {"y": "c"})


def test_failed_branch_leaves_no_parameters_behind():
    r = router("/a/{x}/{y}/end", "/a/{z}/other")
    assert match(r, "/a/1/other") == ("/a/{z}/other", {"z": "1"})
    assert match(r, "/a/1/2/end") == ("/a/{x}/{y}/end", {"x": "1", "y": "2"})


def test_parameter_fills_exactly_one_segment():
    r = router("/files/{name}")
    assert match(r, "/files/a") == ("/files/{name}", {"name": "a"})
    assert match(r, "/files/a/b") is None
    assert match(r, "/files") is None


def test_patterned_segments():
    r = router("/reports/{name}.json", "/reports/{id}", "/tiles/{z}-{x}")
    assert match(r, "/reports/q1.json") == ("/reports/{name}.json", {"name": "q1"})
    assert match(r, "/reports/a.b.json") == ("/reports/{name}.json", {"name": "a.b"})
    assert match(r, "/reports/q1.txt") == ("/reports/{id}", {"id": "q1.txt"})
    assert match(r, "/reports/.json") == ("/reports/{id}", {"id": ".json"})  # empty name
    assert match(r, "/reports/q1.jsonx") == ("/reports/{id}", {"id": "q1.jsonx"})
    assert match(r, "/tiles/3-4") == ("/tiles/{z}-{x}", {"z": "3", "x": "4"})
    assert match(r, "/tiles/34") is None


def test_patterned_segment_alone_does_not_match_other_suffixes():
    r = router("/echo/{id}/files/{name}.json", "/echo/static/files/{name}.json")
    assert match(r, "/echo/42/files/report.json") == (
        "/echo/{id}/files/{name}.json", {"id": "42", "name": "report"},
    )
    assert match(r, "/echo/42/files/report.txt") is None
    assert match(r, "/echo/static/files/a.json") == (
        "/echo/static/files/{name}.json", {"name": "a"},
    )


def test_pattern_metacharacters_are_literal():
    r = router("/v/{name}.(x)+")
    assert match(r, "/v/a.(x)+") == ("/v/{name}.(x)+", {"name": "a"})
    assert match(r, "/v/a.xx") is None


def test_empty_segments_never_fill_a_parameter():
    r = router("/pets/{id}", "/{a}/{b}", "/x/{y}/z")
    assert match(r, "/pets/") is None
    assert match(r, "/pets//") is None
    assert match(r, "//b") is None
    assert match(r, "/a/") is None
    assert match(r, "/x//z") is None


def test_base_path_is_stripped():
    r = router("/pets", "/pets/{id}", base_path="/api/v1")
    assert match(r, "/api/v1/pets") == ("/pets", {})
    assert match(r, "/api/v1/pets/3") == ("/pets/{id}", {"id": "3"})
    assert match(r, "/pets") is None
    assert match(r, "/api/pets") is None
    assert match(r, "/api/v1") is None  # "/" is not declared


def test_base_path_alone_is_the_root():
    r = router("/", base_path="/api")
    assert match(r, "/api") == ("/", {})
    assert match(r, "/api/") == ("/", {})


def test_base_path_must_end_at_a_segment_boundary():
    # `/apiX/...` is not under `/api`: stripping 4 characters would hand the router
    # `X/pets` and route a path the upstream sees as `/apiX/pets`.
    r = router("/pets", "/{id}", "/{a}/{b}", base_path="/api")
    assert match(r, "/apiX/pets") is None
    assert match(r, "/api2/7") is None
    assert match(r, "/apifoo") is None
    assert match(r, "/api/7") == ("/{id}", {"id": "7"})


def test_head_added_for_get_in_allow():
    r = Router((op("GET", "/pets"), op("POST", "/pets"), op("DELETE", "/pets/{id}")))
    entry, _ = r.match("/pets")
    assert entry.allow == b"GET, HEAD, POST"
    assert entry.operations["HEAD"] is entry.operations["GET"]
    entry, _ = r.match("/pets/1")
    assert entry.allow == b"DELETE"
    assert "HEAD" not in entry.operations


def test_explicit_head_is_kept():
    head = op("HEAD", "/pets", "headPets")
    r = Router((op("GET", "/pets"), head))
    entry, _ = r.match("/pets")
    assert entry.operations["HEAD"] is head
    assert entry.allow == b"GET, HEAD"


def test_methods_of_one_template_share_an_entry():
    r = Router((op("GET", "/p/{id}"), op("PUT", "/p/{id}"), op("PATCH", "/p/{id}")))
    entry, params = r.match("/p/1")
    assert set(entry.operations) == {"GET", "HEAD", "PUT", "PATCH"}
    assert entry.allow == b"GET, HEAD, PATCH, PUT"
    assert params == {"id": "1"}


@pytest.mark.parametrize(
    ("first", "second"),
    [("/pets/{a}", "/pets/{b}"), ("/f/{a}.json", "/f/{b}.json"), ("/x/{a}/y/{b}", "/x/{c}/y/{d}")],
)
def test_templates_differing_only_in_parameter_names_are_refused(first, second):
    with pytest.raises(ConfigError) as info:
        router(first, second)
    assert info.value.problems == [
        f"paths: {second!r} and {first!r} are the same path with different parameter "
        "names; requests could match either"
    ]


def test_similar_but_distinct_templates_are_accepted():
    r = router("/pets/{a}", "/pets/{a}.json", "/pets/{a}/toys")
    assert match(r, "/pets/1.json") == ("/pets/{a}.json", {"a": "1"})
    assert match(r, "/pets/1") == ("/pets/{a}", {"a": "1"})


def test_unicode_and_decoded_characters_match_literally():
    r = router("/café/{x}")
    assert match(r, "/café/a b") == ("/café/{x}", {"x": "a b"})


@pytest.mark.parametrize("base_path", ["", "/api"])
def test_static_targets_answer_as_normalize_and_match_do(base_path):
    """The route step's shortcut (one dict probe on the raw path) must give exactly what
    decoding and matching give; paths that need decoding or are refused are left out."""
    r = router("/", "/pets", "/pets/", "/a b", "/café", "/x/.hidden", "/100%", "/a;v=1",
               "/pets/{id}", base_path=base_path)
    table = r.static_targets()
    for raw, (path, entry) in table.items():
        assert normalize_path(raw) == path
        found = r.match(path)
        assert found is not None and found[0] is entry and found[1] == {}
    expected = {b"/", b"/pets", b"/pets/", b"/a;v=1"}
    if base_path:
        expected = {b"/api"} | {b"/api" + p for p in expected - {b"/"}}
    assert set(table) == expected


# --- paths.normalize_path -------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        (b"/", "/"),
        (b"/pets/1", "/pets/1"),
        (b"/pets/", "/pets/"),  # trailing slash kept (a different path, not refused)
        (b"/a%20b", "/a b"),
        (b"/caf%C3%A9", "/café"),
        (b"/caf%c3%a9", "/café"),
        (b"/caf\xc3\xa9", "/café"),
        (b"/a%25", "/a%"),  # one decoding: %25 is a literal percent sign
        (b"/a%2e", "/a."),
        (b"/a/...", "/a/..."),
        (b"/a/.b", "/a/.b"),
        (b"/a/b..", "/a/b.."),
        (b"/%7Euser", "/~user"),
        (b"/a/b;v=1", "/a/b;v=1"),
        (b"/a/...;x", "/a/...;x"),
    ],
)
def test_normalize_accepts(raw, path):
    assert normalize_path(raw) == path


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"/a\\b", "path-backslash"),
        (b"/a%5Cb", "path-encoded-separator-or-control"),
        (b"/a%5cb", "path-encoded-separator-or-control"),
        (b"/a%2Fb", "path-encoded-separator-or-control"),
        (b"/a%2fb", "path-encoded-separator-or-control"),
        (b"/a%00", "path-encoded-separator-or-control"),
        (b"/a%0A", "path-encoded-separator-or-control"),
        (b"/a%0d%0aX", "path-encoded-separator-or-control"),
        (b"/a%1F", "path-encoded-separator-or-control"),
        (b"/a%7F", "path-encoded-separator-or-control"),
        (b"/a%", "path-bad-percent-encoding"),
        (b"/a%4", "path-bad-percent-encoding"),
        (b"/a%zz", "path-bad-percent-encoding"),
        (b"/a%%41", "path-bad-percent-encoding"),
        (b"/a%2541", "path-double-encoded"),
        (b"/a%252F", "path-double-encoded"),
        (b"/a%252e%252e/b", "path-double-encoded"),
        (b"/a%FF", "path-invalid-utf8"),
        (b"/a%C3", "path-invalid-utf8"),
        (b"/\xff", "path-invalid-utf8"),
        (b"/a%C0%AF", "path-invalid-utf8"),  # overlong '/'
        (b"/a/./b", "path-dot-segment"),
        (b"/a/../b", "path-dot-segment"),
        (b"/a/..", "path-dot-segment"),
        (b"/..", "path-dot-segment"),
        (b"/a/%2e%2e/b", "path-dot-segment"),
        (b"/a/%2E/b", "path-dot-segment"),
        (b"/a/.%2e/b", "path-dot-segment"),
        (b"/a/..;x/b", "path-dot-segment"),  # servlet containers read `..;x` as `..`
        (b"/a/.;/b", "path-dot-segment"),
        (b"/a/%2e%2e;jsessionid=1/b", "path-dot-segment"),
        (b"/%2e%2e", "path-dot-segment"),
        (b"/a//b", "path-empty-segment"),
        (b"//", "path-empty-segment"),
        (b"//a", "path-empty-segment"),
    ],
)
def test_normalize_refuses(raw, reason):
    with pytest.raises(BadRequest) as info:
        normalize_path(raw)
    assert info.value.reason == reason
    assert info.value.status == 400


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (b"/pets?limit=1", (b"/pets", b"limit=1")),
        (b"/pets", (b"/pets", b"")),
        (b"/p?a=1?b=2", (b"/p", b"a=1?b=2")),
        (b"/p%3Fx", (b"/p%3Fx", b"")),  # an encoded ? is part of the path
    ],
)
def test_split_target(target, expected):
    assert split_target(target) == expected


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        (b"http://evil/pets", "target-not-origin-form"),
        (b"*", "target-not-origin-form"),
        (b"pets", "target-not-origin-form"),
        (b"/pets#frag", "target-has-fragment"),
    ],
)
def test_split_target_refuses(target, reason):
    with pytest.raises(BadRequest) as info:
        split_target(target)
    assert info.value.reason == reason
    assert info.value.close is True
