"""What apishield logs from outside is redacted, truncated and kept on one line (F6)."""

import re
from typing import Any

import pytest

from apishield.observe.redact import redact


def test_secret_shapes_are_masked():
    text = ("password=hunter2 pwd: 'abc' api_key=K123 postgres://user:pw@db:5432/x "
            "Authorization: Bearer abcdefghijklmnop "
            "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhIn0.c2lnbmF0dXJl")
    out = redact(text)
    for secret in ("hunter2", "'abc'", "K123", "user:pw", "abcdefghijklmnop", "eyJhbGci"):
        assert secret not in out
    assert "postgres://<redacted>@db:5432/x" in out


def test_one_line_and_truncated():
    out = redact("a\nb\r\x1b[2J" + "x" * 1000, limit=20)
    assert "\n" not in out and "\r" not in out and "\x1b" not in out
    assert out.startswith("a\\nb\\r\\x1b[2J")
    assert out.endswith("...(truncated)")


def test_harmless_text_is_untouched():
    assert redact("SELECT 1 FROM users") == "SELECT 1 FROM users"


def test_api_keys_are_masked_wherever_they_appear():
    from apishield.auth.apikeys import generate_key

    _, key = generate_key()
    out = redact(f"lookup failed for {key} (truncated: {key[:-1]})")
    assert key not in out and key[:-1] not in out
    assert out.count("<redacted-api-key>") == 2


# -- every encoding of every secret kind (issue 11, item 5) ---------------------------------

def _secret_kinds() -> list[tuple[str, str, str]]:
    """(kind, text as an upstream would write it, the secret in it): the credentials the
    suite sends (tokens from tests/issuer_server.py, keys from `keys create`, the headers
    of test_proxy_e2e) in the places they end up in error bodies."""
    import base64

    from apishield.auth.apikeys import generate_key

    def b64url(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    jwt = ".".join((b64url(b'{"alg":"RS256","kid":"k1","typ":"JWT"}'),
                    b64url(b'{"sub":"alice","scope":"read write","exp":1893456000}'),
                    b64url(bytes(range(200, 256)))))
    _, key = generate_key()
    basic = base64.b64encode(b"alice:s3cr>?t~~pass").decode()  # holds `+`, `/`, `=`
    assert {"+", "/", "="} <= set(basic)
    return [
        ("jwt", f"token {jwt} rejected", jwt),
        ("bearer-jwt", f"Authorization: Bearer {jwt}", jwt),
        ("bearer-jwt-bare", f"got Bearer {jwt} from client", jwt),
        ("bearer-opaque", "Bearer SECRET-TOKEN-0123456789", "SECRET-TOKEN-0123456789"),
        ("bearer-base64", "auth=Bearer abc+def/ghi+jkl/mno== end", "abc+def/ghi+jkl/mno=="),
        ("basic", f"Authorization: Basic {basic}", basic),
        ("api-key", f"lookup failed for {key}", key),
        ("x-api-key", f"x-api-key: {key}", key),
        ("x-api-key-opaque", "X-Api-Key: SECRET-KEY-0123456789", "SECRET-KEY-0123456789"),
        ("api-key-query", "GET /echo?api_key=SECRET-QUERY-0123456789&x=1",
         "SECRET-QUERY-0123456789"),
        ("password", "password=hunter2-S3cret rejected", "hunter2-S3cret"),
        ("password-json", '{"user": "alice", "password": "hunter2-S3cret"}', "hunter2-S3cret"),
        ("password-quoted", "WHERE pwd='hunter2-S3cret'", "hunter2-S3cret"),
        ("url-credentials", "connect postgres://admin:s3cr3t-Passw0rd@db:5432/app failed",
         "s3cr3t-Passw0rd"),
        ("cookie", "Cookie: theme=dark; session=SESSION-abcdef0123456789",
         "SESSION-abcdef0123456789"),
        ("cookie-first", "Cookie: s=SECRET-COOKIE-0123456789", "SECRET-COOKIE-0123456789"),
        ("set-cookie", "Set-Cookie: sid=SID-abcdef0123456789; HttpOnly; Path=/",
         "SID-abcdef0123456789"),
        ("session", "session_id=SESSION-0123456789abcdef", "SESSION-0123456789abcdef"),
        ("access-token", "access_token=AT-0123456789abcdef&token_type=bearer",
         "AT-0123456789abcdef"),
        ("client-secret", "client_secret: CS-0123456789abcdef", "CS-0123456789abcdef"),
    ]


def _encodings() -> dict[str, Any]:
    """Every way a logged body writes text: plain, percent-encoded (upper and lower hex,
    every byte, twice), form-encoded, as a JSON string (plain, `\\u`-escaped, `\\/`, JSON in
    JSON) and the mixes (percent-encoded JSON, JSON holding a percent-encoded value)."""
    import json
    from urllib.parse import quote, quote_plus

    def percent(text: str) -> str:
        return quote(text, safe="")

    def lower(text: str) -> str:
        return re.sub(r"%[0-9A-F]{2}", lambda m: m.group().lower(), text)

    def every_byte(text: str) -> str:
        return "".join(f"%{byte:02X}" for byte in text.encode())

    def json_string(text: str) -> str:
        return json.dumps({"error": text})

    def json_u(text: str, spec: str = "04x") -> str:
        return '{"error": "' + "".join(
            c if c.isalnum() else f"\\u{ord(c):{spec}}" for c in text) + '"}'

    return {
        "plain": lambda s: s,
        "percent": percent,
        "percent-lower": lambda s: lower(percent(s)),
        "percent-every-byte": every_byte,
        "percent-twice": lambda s: percent(percent(s)),
        "percent-twice-lower": lambda s: lower(percent(percent(s))),
        "percent-thrice": lambda s: percent(percent(percent(s))),
        "form": quote_plus,
        "form-twice": lambda s: quote_plus(quote_plus(s)),
        "json": json_string,
        "json-u": json_u,
        "json-u-upper": lambda s: json_u(s, "04X"),
        "json-slash": lambda s: json_string(s).replace("/", "\\/"),
        "json-in-json": lambda s: json.dumps({"body": json_string(s)}),
        "json-then-percent": lambda s: percent(json_string(s)),
        "json-then-form": lambda s: quote_plus(json_string(s)),
        "percent-then-json": lambda s: json_string(percent(s)),
        "form-then-json-u": lambda s: json_u(quote_plus(s)),
    }


def _readings(text: str) -> set[str]:
    """`text` and what it decodes to, for every encoding above (decoded independently of
    the redactor, with the standard library)."""
    from urllib.parse import unquote, unquote_plus

    def json_unescape(value: str) -> str:
        value = re.sub(r"\\u([0-9a-fA-F]{4})", lambda m: chr(int(m.group(1), 16)), value)
        return re.sub(r"\\([\"\\/])", r"\1", value)

    readings = {text}
    for _ in range(3):
        readings |= {f(r) for r in readings for f in (unquote, unquote_plus, json_unescape)}
    return readings


SECRET_KINDS = _secret_kinds()
ENCODINGS = _encodings()


@pytest.mark.parametrize("encoding", list(ENCODINGS))
@pytest.mark.parametrize(("kind", "text", "secret"), SECRET_KINDS,
                         ids=[kind for kind, _, _ in SECRET_KINDS])
def test_every_encoding_of_every_secret_is_masked(kind, text, secret, encoding):
    encoded = ENCODINGS[encoding](text)
    out = redact(f"upstream said: {encoded} (request 42)", limit=100_000)
    assert out.startswith("upstream said: ")
    if not re.search(r"(?i)authorization|cookie", text):  # those mask to the end of the line
        assert out.endswith(" (request 42)")
    windows = {secret[i:i + 8] for i in range(len(secret) - 7)}
    for reading in _readings(out):
        leaked = [w for w in windows if w in reading]
        assert not leaked, f"{kind} as {encoding}: {leaked[0]!r} in {reading!r}"


@pytest.mark.parametrize("text", [
    "GET /search?q=rust%20regex&page=2 404",
    '{"message": "not found: \\/users\\/42", "code": "E\\u0031"}',
    "a+b=c, x%2By=z",
    "tokens%3A%203 of 5 used; keyboard: qwerty",
    "ask_me_anything",
])
def test_harmless_encoded_text_is_untouched(text):
    assert redact(text) == text


def test_masks_keep_the_encoding_around_them():
    from apishield.auth.apikeys import generate_key

    _, key = generate_key()
    jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhIn0.c2lnbmF0dXJl"
    out = redact(f"x-api-key%3A%20{key}%0AAuthorization%3A%20Bearer%20{jwt}")
    assert out == "x-api-key%3A%20<redacted-api-key>%0AAuthorization%3A%20<redacted>"
    assert redact(f"Bearer%20{jwt}") == "Bearer%20<redacted-jwt>"
    assert redact(f"x%3D{jwt}") == "x%3D<redacted-jwt>"


def test_only_the_logged_prefix_is_scanned_and_the_cut_is_marked():
    out = redact("x" * 100 + " password=hunter2-S3cret", limit=20)
    assert out == "x" * 20 + "...(truncated)"
    assert redact("a" * 70, limit=20).endswith("...(truncated)")  # cut before the scan too


@pytest.mark.parametrize("text", [
    "upstream failed: x-api-key%3A%20ask_abcdefghijkl_ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abc",
    "store redis://user:***@127.0.0.1:6379/0 is unavailable",
    'form: token=abc123456 "password": "x y z" cookie: a=b; c=d',
    "Authorization%3A%20Basic dXNlcjpwYXNzd29yZA== then postgres://u:pw@db/x",
])
def test_redacting_twice_changes_nothing(text):
    """A log line holding already-redacted text (an upstream body in a message that the
    JSON formatter redacts again) keeps what the first pass left readable."""
    once = redact(text)
    assert redact(once) == once
    assert "<redacted" in once or "***" in once


def test_configured_field_names_are_masked_in_every_encoding():
    from apishield.observe.redact import protect, protected

    name = "x-test-only-field"  # the set only grows in a process: a name no other test uses
    assert redact(f"{name}: v4lue-one") == f"{name}: v4lue-one"
    protect([name.upper()])
    assert name in protected()
    for text in (f"{name}: v4lue-one", f'{{"{name}": "v4lue-one"}}',
                 f"{name}%3Dv4lue-one", f"a&{name}=v4lue-one&b=1"):
        out = redact(text)
        assert "v4lue-one" not in out and "<redacted>" in out, text
    assert redact(f"not-{name}x: keep") == f"not-{name}x: keep"  # the name stands alone
