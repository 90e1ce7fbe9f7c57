"""What apishield logs from outside is redacted, truncated and kept on one line (F6)."""

from apishield.redact import redact


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
