"""`multipart/form-data` bodies: read strictly, typed like urlencoded forms, validated like
JSON bodies. Through the real gateway in front of the test upstream (`/echo/...` echoes
what reached it) and through the middleware in front of a real Starlette app that parses
the form itself.

Bodies are written by hand so each test controls every byte.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from apishield import ApiShieldMiddleware
from apishield.config import config_from_dict

DATA = Path(__file__).parent / "data" / "multipart"
CONTRACT = DATA / "contract.yaml"
BOUNDARY = b"----apishieldTestBoundary7MA4YWxk"
# A binary file that is not UTF-8 and holds a line that looks like a delimiter but is not
# (a different boundary): it must reach the upstream unchanged.
BINARY = b"\x89PNG\r\n\x1a\n\x00\xff\xfe\r\n------other\r\n" + bytes(range(256))

Part = tuple[list[bytes], bytes]


def field(name: str, value: bytes, *headers: bytes) -> Part:
    return ([b'Content-Disposition: form-data; name="%s"' % name.encode(), *headers], value)


def upload(name: str, data: bytes, filename: bytes = b"f.bin",
           content_type: bytes = b"application/octet-stream") -> Part:
    return ([b'Content-Disposition: form-data; name="%s"; filename="%s"' % (name.encode(),
                                                                             filename),
             b"Content-Type: " + content_type], data)


def body(*parts: Part, boundary: bytes = BOUNDARY) -> bytes:
    out = b""
    for headers, data in parts:
        out += b"--" + boundary + b"\r\n" + b"".join(h + b"\r\n" for h in headers)
        out += b"\r\n" + data + b"\r\n"
    return out + b"--" + boundary + b"--\r\n"


def minimal(*extra: Part) -> bytes:
    """A valid form (the required fields) plus `extra` parts."""
    return body(field("title", b"holiday"), upload("file", BINARY), *extra)


CONTENT_TYPE = b"multipart/form-data; boundary=" + BOUNDARY


def post(gw, payload: bytes, path: str = "/echo/upload",
         content_type: bytes = CONTENT_TYPE) -> httpx.Response:
    return httpx.post(f"{gw.url}{path}", content=payload,
                      headers={"content-type": content_type.decode()})


@pytest.fixture(scope="module")
def gw(tmp_path_factory, upstream_url):
    from tests.conftest import start_gateway

    running = start_gateway(tmp_path_factory.mktemp("mp"), upstream_url,
                            {"validation": {"max_parts": 12, "max_file_bytes": 4096}},
                            contract=CONTRACT)
    yield running
    running.stop()


def refused(response: httpx.Response, status: int, pointer: str, reason: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert {"pointer": pointer, "reason": reason} in response.json()["errors"], response.text


# -- what passes ------------------------------------------------------------------------------


def test_full_form_reaches_upstream_byte_identical(gw, upstream):
    payload = body(
        field("title", "Ferien am Meer \u2600".encode()),
        field("count", b"3"),
        field("agree", b"true"),
        field("tags", b"sea"),
        field("tags", b"sun"),  # an array property: repeated parts collect
        field("meta", b'{"a": 1}', b"Content-Type: application/json"),
        upload("file", BINARY),
        upload("avatar", b"\x89PNG fake", b"me.png", b"image/png"),
        upload("attachments", b"one"),
        upload("attachments", b"\xff\xfe two"),
    )
    response = post(gw, payload)
    assert response.status_code == 200, response.text
    seen = upstream.last_request
    assert seen["path"] == "/echo/upload"
    assert seen["body"].encode("latin-1") == payload
    assert dict((k.lower(), v) for k, v in seen["headers"])["content-type"] == \
        CONTENT_TYPE.decode()


def test_client_library_encoding_passes(gw):
    response = httpx.post(f"{gw.url}/echo/upload", data={"title": "x", "tags": ["a", "b"]},
                          files={"file": ("a.bin", BINARY, "application/octet-stream")})
    assert response.status_code == 200, response.text


def test_quoted_boundary_and_a_file_for_a_text_property(gw):
    # a filename on a string property makes it a file: not decoded (this is not UTF-8)
    payload = body(upload("title", b"\xff\xfe"), upload("file", b""), boundary=b"a b'c")
    response = post(gw, payload, content_type=b'multipart/form-data; boundary="a b\'c"')
    assert response.status_code == 200, response.text


# -- malformed: 400 ---------------------------------------------------------------------------


@pytest.mark.parametrize(("content_type", "reason"), [
    (b"multipart/form-data", "boundary-missing"),
    (b"multipart/form-data; boundary=", "content-type-invalid"),
    (b"multipart/form-data; boundary=" + b"x" * 71, "boundary-invalid"),   # RFC 2046: <= 70
    (b'multipart/form-data; boundary="ends with space "', "boundary-invalid"),
    (b"multipart/form-data; boundary=a; boundary=b", "content-type-invalid"),  # ambiguous
])
def test_bad_boundary_is_400(gw, upstream, content_type, reason):
    before = upstream.request_count
    response = post(gw, minimal(), content_type=content_type)
    refused(response, 400, "/header/content-type", reason)
    assert response.json()["type"].endswith("bad-request")
    assert upstream.request_count == before


@pytest.mark.parametrize(("part", "pointer", "reason"), [
    (([b"Content-Type: text/plain"], b"x"), "/body", "content-disposition-missing"),
    (([b"Content-Disposition: attachment; name=\"count\""], b"1"), "/body",
     "content-disposition-invalid"),
    (([b"Content-Disposition: form-data; filename=\"a\""], b"1"), "/body",
     "content-disposition-invalid"),  # no name
    (([b"Content-Disposition: form-data; name=\"count\"; name*=UTF-8''agree"], b"1"),
     "/body", "content-disposition-extended"),  # RFC 7578 4.2: two names for one part
    (([b'Content-Disposition: form-data; name="count"',
       b'Content-Disposition: form-data; name="agree"'], b"1"), "/body",
     "part-header-repeated"),
    (field("count", b"MQ==", b"Content-Transfer-Encoding: base64"), "/body/count",
     "part-transfer-encoding"),  # checked encoded, used decoded
    (field("count", b"1", b"Content-Type: nonsense"), "/body/count",
     "part-content-type-invalid"),
])
def test_bad_part_headers_are_400(gw, upstream, part, pointer, reason):
    before = upstream.request_count
    refused(post(gw, minimal(part)), 400, pointer, reason)
    assert upstream.request_count == before


def test_truncated_body_and_preamble_are_400(gw):
    refused(post(gw, minimal()[:-30]), 400, "/body", "truncated")
    refused(post(gw, b"preamble\r\n" + minimal()), 400, "/body", "malformed")


def test_too_many_parts_is_400(gw):
    tags = [field("tags", b"t") for _ in range(11)]  # 2 required + 11 > 12
    refused(post(gw, minimal(*tags)), 400, "/body", "max-parts")


def test_oversized_file_part_is_413(gw, upstream):
    before = upstream.request_count
    response = post(gw, body(field("title", b"x"), upload("file", b"z" * 5000)))
    refused(response, 413, "/body/file", "max-file-bytes")
    assert upstream.request_count == before
    assert post(gw, body(field("title", b"x"), upload("file", b"z" * 4000))).status_code == 200


def test_bad_utf8_text_field_is_400(gw):
    refused(post(gw, body(field("title", b"caf\xe9"), upload("file", b""))), 400,
            "/body/title", "utf-8")
    latin = field("title", b"caf\xe9", b"Content-Type: text/plain; charset=iso-8859-1")
    refused(post(gw, body(latin, upload("file", b""))), 400, "/body/title", "charset")


def test_malformed_json_part_is_400(gw):
    refused(post(gw, minimal(field("meta", b'{"a": 1, "a": 2}'))), 400, "/body/meta", "json")


# -- breaks the schema: 422 -------------------------------------------------------------------


@pytest.mark.parametrize(("extra", "pointer", "reason"), [
    (field("count", b"abc"), "/body/count", "type"),
    (field("count", b"+5"), "/body/count", "type"),        # typed like parameters
    (field("count", b"-1"), "/body/count", "minimum"),
    (field("agree", b"yes"), "/body/agree", "type"),
    (field("title", b"again"), "/body/title", "repeated"),  # not an array: once only
    (field("meta", b'{"a": "x"}'), "/body/meta/a", "type"),
    (field("tags", b"much-too-long-tag"), "/body/tags/0", "max-length"),
    (upload("avatar", b"GIF89a", b"a.gif", b"image/gif"), "/body/avatar", "content-type"),
    (field("avatar", b"text"), "/body/avatar", "content-type"),  # text/plain by default
])
def test_schema_breaks_are_422(gw, upstream, extra, pointer, reason):
    before = upstream.request_count
    response = post(gw, minimal(extra))
    refused(response, 422, pointer, reason)
    assert response.json()["type"].endswith("invalid-body")
    assert upstream.request_count == before


def test_undeclared_field_is_refused_in_strict_mode_without_echoing_it(gw):
    response = post(gw, minimal(field("is_admin", b"yes-please")))
    # named, so the client can fix the request (issue 16); its value is never echoed
    refused(response, 422, "/body/is_admin", "additional-property")
    assert "yes-please" not in response.text
    assert post(gw, minimal(field("is_admin", b"true")), "/echo/loose").status_code == 200


def test_missing_required_file_is_422(gw):
    refused(post(gw, body(field("title", b"x"))), 422, "/body", "required")


def test_payload_in_text_field_is_refused(gw):
    response = post(gw, body(field("title", b"<script>alert(1)</script>"),
                             upload("file", b"<script>in a file is data</script>")))
    assert response.status_code == 400
    assert response.json()["errors"] == [{"pointer": "/body/title", "reason": "xss"}]


def test_log_only_lets_contract_refusals_through(gw):
    response = post(gw, minimal(field("is_admin", b"true")), "/echo/shadow")
    assert response.status_code == 200
    entry = gw.log_entry(response.headers["x-request-id"])
    assert entry["outcome"] == "shadowed" and entry["reason"] == "body-schema"
    # a part over max_file_bytes is a size limit: enforced in every mode
    big = post(gw, body(field("title", b"x"), upload("file", b"z" * 5000)), "/echo/shadow")
    assert big.status_code == 413


# -- through the middleware, in front of a real Starlette app ---------------------------------


async def receive_form(request: Request) -> JSONResponse:
    """What Starlette (python-multipart underneath) makes of the form."""
    seen: dict[str, list] = {}
    async with request.form() as form:  # closes the uploads' spooled temporary files
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                seen.setdefault(name, []).append({"filename": value.filename,
                                                  "size": len(await value.read())})
            else:
                seen.setdefault(name, []).append(value)
    return JSONResponse(seen)


@pytest.fixture
async def client():
    app = Starlette(routes=[Route("/echo/upload", receive_form, methods=["POST"])])
    config = config_from_dict({"contract": str(CONTRACT), "access_log": {"enabled": False}},
                              source_dir=DATA)
    wrapped = ApiShieldMiddleware(app, config=config)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=wrapped),
                                 base_url="http://t") as c:
        yield c


async def test_middleware_app_sees_the_form_it_was_sent(client):
    payload = minimal(field("tags", b"a"), field("tags", b"b"), field("count", b"7"))
    response = await client.post("/echo/upload", content=payload,
                                 headers={"content-type": CONTENT_TYPE.decode()})
    assert response.status_code == 200, response.text
    assert response.json() == {"title": ["holiday"], "tags": ["a", "b"], "count": ["7"],
                               "file": [{"filename": "f.bin", "size": len(BINARY)}]}


async def test_middleware_refuses_before_the_app(client):
    response = await client.post("/echo/upload", content=minimal(field("count", b"x")),
                                 headers={"content-type": CONTENT_TYPE.decode()})
    refused(response, 422, "/body/count", "type")
    missing = await client.post("/echo/upload", content=minimal(),
                                headers={"content-type": "multipart/form-data"})
    refused(missing, 400, "/header/content-type", "boundary-missing")


def test_large_upload_is_read_whole_and_forwarded_unchanged(make_gateway, upstream):
    # over the 64 KiB a body is streamed from: validated bodies are read whole first
    gw = make_gateway({"limits": {"max_body_bytes": "512KiB"}}, contract=CONTRACT)
    payload = minimal(upload("attachments", BINARY * 700))  # ~240 KB, default file cap
    response = post(gw, payload)
    assert response.status_code == 200, response.text
    assert upstream.last_request["body"].encode("latin-1") == payload
    before = upstream.request_count
    too_big = post(gw, minimal(upload("attachments", BINARY * 2000)))  # ~690 KB
    assert too_big.status_code == 413 and upstream.request_count == before
