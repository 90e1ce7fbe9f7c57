# syntax=docker/dockerfile:1
# apishield container image (docs/deploy.md).
#
#   docker build -t apishield .
#   docker run --rm -v "$PWD/deploy:/etc/apishield:ro" -p 8080:8080 apishield
#
# Two stages. `builder` installs the locked dependencies into a virtual environment,
# /opt/apishield: every file pip downloads must match a sha256 of requirements.lock
# (`--require-hashes`), the transitive dependencies included, then the project itself
# without dependencies. It needs a C compiler because libinjection-python ships no binary
# wheel (its sdist is hash-checked like the rest). The final stage is a plain python slim
# image that copies that environment and nothing else: no compiler, no source tree, no
# wheel, and it runs as an unprivileged user.
# Checked by tests/test_deploy.py: hadolint (from PyPI, pinned in the test extras) and
# structural checks; no image is built by the test suite (no container engine runs there).

# The Python the test suite runs on (3.11, requires-python's floor) on Debian 12.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
# Builder only: nothing installed here reaches the final image, and these follow the
# Debian release the base image tag pins.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# The lock first: this layer is rebuilt only when a dependency changes (docs/deploy.md,
# "Supply chain"). pip refuses a file whose hash is not in the lock, and a dependency the
# lock does not pin.
COPY requirements.lock ./
RUN python -m venv /opt/apishield \
    && /opt/apishield/bin/pip install --no-cache-dir --require-hashes -r requirements.lock
COPY pyproject.toml setup.py MANIFEST.in mypy.ini README.md LICENSE ./
COPY build_backend ./build_backend
COPY src ./src
# The project alone: its dependencies are the locked ones installed above. Pure Python by
# default; `--build-arg APISHIELD_COMPILE=1` compiles the request path's modules with mypyc
# (docs/performance.md: about 40% less CPU per proxied request; the build then also fetches
# mypy and the runtime pins into pip's isolated build environment, which takes minutes).
ARG APISHIELD_COMPILE=0
RUN APISHIELD_COMPILE=${APISHIELD_COMPILE} /opt/apishield/bin/pip install --no-cache-dir --no-deps .

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="apishield" \
      org.opencontainers.image.description="Contract-first API security gateway" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH="/opt/apishield/bin:${PATH}"
# A fixed numeric uid/gid so that orchestrators can check runAsNonRoot and volume owners
# can be set ahead; /var/lib/apishield is where a SQLite `state:` file can live.
RUN groupadd --system --gid 10001 apishield \
    && useradd --system --uid 10001 --gid apishield --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin apishield \
    && install -d -o apishield -g apishield -m 0750 /var/lib/apishield \
    && install -d -m 0755 /etc/apishield
# The environment the builder installed and verified, at the same path (its scripts name
# /opt/apishield/bin/python), read-only for the apishield user (root owns it).
COPY --from=builder /opt/apishield /opt/apishield
USER 10001:10001
WORKDIR /etc/apishield
# 8080: the gateway (listen.port); 9901: the admin listener (admin.port: /healthz,
# /readyz, /metrics). Both must match the config the container is given.
EXPOSE 8080 9901
# No curl in a slim image: Python's urllib asks the admin listener's /healthz, which
# answers without a token (it tells nothing), so no secret is sent; a non-2xx answer or no
# answer raises, and the command exits 1. APISHIELD_HEALTHCHECK_URL overrides the
# address. Proxy variables are ignored: the check is always local.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.build_opener(u.ProxyHandler({})).open(os.environ.get('APISHIELD_HEALTHCHECK_URL', 'http://127.0.0.1:9901/healthz'), timeout=4)"]
ENTRYPOINT ["apishield"]
CMD ["serve", "--config", "/etc/apishield/apishield.yaml"]
