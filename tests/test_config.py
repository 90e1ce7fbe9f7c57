"""`apishield.yaml` -> validated models: every problem located, all reported at once."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from apishield.config import Config, ConfigError, config_from_dict, load_config


def write(tmp_path: Path, text: str, name: str = "apishield.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def load(tmp_path: Path, text: str) -> Config:
    return load_config(write(tmp_path, text))


def problems_of(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


def from_dict(data: dict) -> Config:
    return config_from_dict({"contract": "c.yaml", **data}, source_dir=Path("."))


def dict_problems(data: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        from_dict(data)
    return info.value.problems


# --- a valid config -------------------------------------------------------------------


def test_minimal_config_has_safe_defaults(tmp_path):
    config = load(tmp_path, "contract: c.yaml\n")
    assert config.contract == "c.yaml"
    assert config.upstream is None
    assert config.listen.host == "127.0.0.1" and config.listen.port == 8080
    assert config.limits.max_body_bytes == 1024 * 1024
    assert config.timeouts.header == 10.0
    assert config.trusted_proxies == ()
    assert config.websockets is False
    assert config.operations == {}
    assert config.source_dir == str(tmp_path.resolve())
    assert config.contract_path == (tmp_path / "c.yaml").resolve()


def test_full_config_loads(tmp_path):
    config = load(
        tmp_path,
        """
        contract: api/openapi.yaml
        base_path: /api/
        listen: {host: 0.0.0.0, port: 9000}
        upstream:
          url: http://127.0.0.1:9001
          connect_timeout: 500ms
          read_timeout: 2m
          max_connections: 16
          host_header: client
        limits: {max_body_bytes: 64KiB, max_header_bytes: 8KiB, max_header_count: 50,
                 max_url_length: 2048}
        timeouts: {header: 5s, body: 10, keepalive: 1.5, shutdown: 1m}
        headers: {hsts: always, content_security_policy: null, remove: [server]}
        trusted_proxies: [10.0.0.0/8, 192.168.1.1, "::1", "2001:db8::/32"]
        access_log: {enabled: false, path: /tmp/x.log}
        websockets: true
        operations:
          createPet: {limits: {max_body_bytes: 1MB}, public: true}
        """,
    )
    assert config.base_path == "/api"  # trailing slash stripped
    assert config.contract_path == (tmp_path / "api" / "openapi.yaml").resolve()
    assert config.listen.port == 9000
    assert config.upstream is not None
    assert config.upstream.connect_timeout == 0.5
    assert config.upstream.read_timeout == 120.0
    assert config.upstream.host_header == "client"
    assert config.limits.max_body_bytes == 65536
    assert config.limits.max_header_bytes == 8192
    assert config.timeouts.header == 5.0 and config.timeouts.body == 10.0
    assert config.timeouts.keepalive == 1.5 and config.timeouts.shutdown == 60.0
    assert config.headers.hsts == "always" and config.headers.content_security_policy is None
    assert config.headers.remove == ("server",)
    assert config.trusted_proxies == ("10.0.0.0/8", "192.168.1.1", "::1", "2001:db8::/32")
    assert config.access_log.enabled is False
    policy = config.operations["createPet"]
    assert policy.limits is not None and policy.limits.max_body_bytes == 1_000_000
    assert policy.public is True


def test_config_is_frozen(tmp_path):
    config = load(tmp_path, "contract: c.yaml\n")
    with pytest.raises(Exception, match="frozen"):
        config.contract = "other.yaml"  # type: ignore[misc]


# --- unknown keys ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ratelimit: 5", '(top level): unknown key "ratelimit"'),
        ("limits: {max_body: 5}", 'limits: unknown key "max_body"'),
        ("listen: {hots: x}", 'listen: unknown key "hots"'),
        ("upstream: {url: 'http://h', timeout: 3}", 'upstream: unknown key "timeout"'),
        ("timeouts: {idle: 3}", 'timeouts: unknown key "idle"'),
        ("headers: {hsts_maxage: 3}", 'headers: unknown key "hsts_maxage"'),
        ("access_log: {file: x}", 'access_log: unknown key "file"'),
        ("operations: {op: {ratelimit: 1}}", 'operations.op: unknown key "ratelimit"'),
        (
            "operations: {op: {limits: {max_body: 1}}}",
            'operations.op.limits: unknown key "max_body"',
        ),
    ],
)
def test_unknown_key_reported_with_dotted_location(tmp_path, text, expected):
    assert problems_of(tmp_path, f"contract: c.yaml\n{text}\n") == [expected]


def test_source_dir_cannot_be_set_by_users(tmp_path):
    assert problems_of(tmp_path, "contract: c.yaml\nsource_dir: /etc\n") == [
        'apishield.yaml: unknown key "source_dir"'
    ]


# --- bad types ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "location"),
    [
        ("listen: {port: http}", "listen.port"),
        ("listen: {port: 70000}", "listen.port"),
        ("listen: [a, b]", "listen"),
        ("websockets: maybe", "websockets"),
        ("limits: 5", "limits"),
        ("limits: {max_header_count: 0}", "limits.max_header_count"),
        ("upstream: {url: http://h, max_connections: many}", "upstream.max_connections"),
        ("upstream: {url: http://h, host_header: both}", "upstream.host_header"),
        ("headers: {hsts: sometimes}", "headers.hsts"),
        ("trusted_proxies: 10.0.0.0/8", "trusted_proxies"),
        ("operations: [a]", "operations"),
        ("operations: {op: {public: perhaps}}", "operations.op.public"),
        ("contract: [a]", "contract"),
        ("base_path: api", "base_path"),
    ],
)
def test_bad_type_reported_at_its_location(tmp_path, text, location):
    body = text if text.startswith("contract:") else f"contract: c.yaml\n{text}"
    problems = problems_of(tmp_path, body + "\n")
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{location}: "), problems


def test_missing_upstream_url_is_a_missing_key():
    assert dict_problems({"upstream": {}}) == ["upstream.url: required key is missing"]


# --- durations and sizes --------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("500ms", 0.5), ("10s", 10.0), ("2m", 120.0), ("1h", 3600.0), ("1.5s", 1.5),
     ("10", 10.0), (" 3s ", 3.0), (10, 10.0), (2.5, 2.5)],
)
def test_durations_parse(value, seconds):
    assert from_dict({"timeouts": {"header": value}}).timeouts.header == seconds


@pytest.mark.parametrize("value", ["10 sec", "5 minutes", "ms", "-1s", "1w", "1,5s", ""])
def test_bad_duration_says_what_to_write(value):
    assert dict_problems({"timeouts": {"body": value}}) == [
        f"timeouts.body: {value!r} is not a duration; write e.g. 10, 10s, 500ms, 2m or 90d"
    ]


@pytest.mark.parametrize("value", [0, "0s", -3])
def test_duration_must_be_positive(value):
    assert dict_problems({"upstream": {"url": "http://h", "read_timeout": value}}) == [
        "upstream.read_timeout: Input should be greater than 0"
    ]


@pytest.mark.parametrize(
    ("value", "size"),
    [("64KiB", 65536), ("1MB", 1_000_000), ("1MiB", 1048576), ("2kb", 2000),
     ("10 KB", 10_000), ("1GiB", 1024**3), ("512b", 512), ("100", 100), (4096, 4096),
     (0, 0)],
)
def test_sizes_parse(value, size):
    assert from_dict({"limits": {"max_body_bytes": value}}).limits.max_body_bytes == size


@pytest.mark.parametrize("value", ["1.5MB", "64 KiBs", "lots", "-1", "1TB", "KiB"])
def test_bad_size_says_what_to_write(value):
    assert dict_problems({"limits": {"max_header_bytes": value}}) == [
        f"limits.max_header_bytes: {value!r} is not a size; write e.g. 1048576, 64KiB or 1MB"
    ]


def test_size_must_not_be_negative_or_fractional():
    assert dict_problems({"limits": {"max_body_bytes": -1}}) == [
        "limits.max_body_bytes: Input should be greater than or equal to 0"
    ]
    problems = dict_problems({"limits": {"max_body_bytes": 1.5}})
    assert len(problems) == 1 and problems[0].startswith("limits.max_body_bytes: ")


@pytest.mark.parametrize(
    ("section", "key"),
    [("timeouts", "header"), ("limits", "max_body_bytes"), ("limits", "max_header_bytes")],
)
def test_booleans_are_not_durations_or_sizes(tmp_path, section, key):
    # `max_body_bytes: yes` is a typo, not "1 byte"; `header: true` is not "1 second".
    problems = problems_of(tmp_path, f"contract: c.yaml\n{section}: {{{key}: true}}\n")
    assert len(problems) == 1 and problems[0].startswith(f"{section}.{key}: "), problems


# --- upstream.url ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:9000", "https://api.internal", "http://[::1]:8080/base",
            "http://h:80/"]
)
def test_good_upstream_urls(url):
    config = from_dict({"upstream": {"url": url}})
    assert config.upstream is not None and config.upstream.url == url


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("127.0.0.1:9000", "must start with http:// or https://"),
        ("localhost", "must start with http:// or https://"),
        ("ftp://files.example.com", "must start with http:// or https://"),
        ("http://", "has no host; write e.g. http://127.0.0.1:9000"),
        ("http:///path", "has no host; write e.g. http://127.0.0.1:9000"),
        ("http://h/?debug=1", "must not carry a query or fragment"),
        ("http://h/#top", "must not carry a query or fragment"),
        ("http://h:99999", "has an invalid port"),
        ("http://h:port", "has an invalid port"),
    ],
)
def test_bad_upstream_urls(url, message):
    assert dict_problems({"upstream": {"url": url}}) == [f"upstream.url: {url!r} {message}"]


# --- trusted_proxies ------------------------------------------------------------------


@pytest.mark.parametrize(
    "cidr",
    ["10.0.0.0/8", "192.168.0.1", "172.16.0.0/12", "::1", "fd00::/8", "2001:db8::1/128",
     "10.1.2.3/8"],  # host bits set: accepted as the network (strict=False)
)
def test_good_trusted_proxies(cidr):
    assert from_dict({"trusted_proxies": [cidr]}).trusted_proxies == (cidr,)


@pytest.mark.parametrize(
    "cidr", ["garbage", "10.0.0.0/33", "300.1.1.1", "::1/129", "10.0.0.0/8/8", "", "gw.lan"]
)
def test_bad_trusted_proxies(cidr):
    assert dict_problems({"trusted_proxies": ["10.0.0.0/8", cidr]}) == [
        f"trusted_proxies: {cidr!r} is not an IP address or CIDR network"
    ]


# --- file-level problems --------------------------------------------------------------


def test_yaml_syntax_error_has_file_line_column(tmp_path):
    path = write(tmp_path, "contract: c.yaml\nlimits:\n  max_body_bytes: 10\n    oops: 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [
        f"{path}:4:9: invalid YAML: mapping values are not allowed in this context"
    ]


def test_yaml_tab_error_is_located(tmp_path):
    path = write(tmp_path, "contract: c.yaml\nlisten:\n\tport: 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    [problem] = info.value.problems
    assert problem.startswith(f"{path}:3:1: invalid YAML: ")


@pytest.mark.parametrize("text", ["- contract: c.yaml\n", "just a string\n", "", "42\n"])
def test_config_must_be_a_mapping(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [f"{path}: must be a mapping with at least a 'contract' key"]


def test_missing_contract(tmp_path):
    assert problems_of(tmp_path, "upstream: {url: 'http://h'}\n") == [
        "contract: required key is missing"
    ]


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [f"{path}: file not found"]


def test_not_utf8(tmp_path):
    path = tmp_path / "apishield.yaml"
    path.write_bytes(b"contract: \xff\xfe.yaml\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    [problem] = info.value.problems
    assert problem.startswith(f"{path}: cannot read: ")


def test_every_problem_is_reported_at_once(tmp_path):
    problems = problems_of(
        tmp_path,
        """
        ratelimit: 5
        listen: {port: http, hots: x}
        upstream: {url: "ftp://a", foo: 1}
        limits: {max_body: 3, max_body_bytes: lots}
        timeouts: {header: 5 minutes, body: 0}
        trusted_proxies: [10.0.0.0/8, "::1", garbage]
        websockets: maybe
        operations: {a: {limits: {max: 1}, public: perhaps}}
        """,
    )
    assert sorted(problems) == sorted(
        [
            '(top level): unknown key "ratelimit"',
            "contract: required key is missing",
            "listen.port: Input should be a valid integer, unable to parse string as an integer",
            'listen: unknown key "hots"',
            "upstream.url: 'ftp://a' must start with http:// or https://",
            'upstream: unknown key "foo"',
            'limits: unknown key "max_body"',
            "limits.max_body_bytes: 'lots' is not a size; write e.g. 1048576, 64KiB or 1MB",
            "timeouts.header: '5 minutes' is not a duration; write e.g. 10, 10s, 500ms, 2m or 90d",
            "timeouts.body: Input should be greater than 0",
            "trusted_proxies: 'garbage' is not an IP address or CIDR network",
            "websockets: Input should be a valid boolean, unable to interpret input",
            'operations.a.limits: unknown key "max"',
            "operations.a.public: Input should be a valid boolean, unable to interpret input",
        ]
    )


def test_yaml_1_2_booleans_only(tmp_path):
    """`on:` (a ban rule's key) and `off`/`yes`/`no` values stay strings, as in YAML 1.2;
    PyYAML's YAML 1.1 default made the documented ban rules fail to load."""
    from apishield.config import load_config
    from apishield.config.loading import read_yaml

    path = tmp_path / "apishield.yaml"
    path.write_text(
        "contract: openapi.yaml\n"
        "headers: {hsts: off}\n"
        "access_log: {enabled: no}\n"
        "rate_limiting:\n"
        "  bans:\n"
        "    rules:\n"
        "      - {name: stuffing, on: authn-failure, by: ip, threshold: 10, window: 1m,"
        " duration: 15m}\n")
    config = load_config(path)
    assert config.rate_limiting.bans.rules[0].on == ("authn-failure",)
    assert config.headers.hsts == "off"
    assert config.access_log.enabled is False
    enum = tmp_path / "enum.yaml"
    enum.write_text("enum: [yes, no, on, off, y, n, true, False]\n")
    assert read_yaml(enum) == {"enum": ["yes", "no", "on", "off", "y", "n", True, False]}
