# syntax=docker/dockerfile:1
# apishield container image (docs/deploy.md).
#
#   docker build -t apishield .
#   docker run --rm -v "$PWD/deploy:/etc/apishield:ro" -p 8080:8080 apishield
#
# Two stages. `builder` turns the project and its pinned dependencies into wheels; it
# needs a C compiler because libinjection-python ships no binary wheel. The final stage
# installs those wheels into a plain python slim image, runs as an unprivileged user and
# holds no compiler, no source tree and no wheel files (they are bind-mounted from the
# builder for the one `pip install`, never copied into a layer).
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
COPY deploy/constraints.txt ./deploy/constraints.txt
COPY pyproject.toml README.md LICENSE ./
COPY src ./src
# --constraint pins every transitive dependency too (deploy/constraints.txt).
RUN pip wheel --no-cache-dir --constraint deploy/constraints.txt --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="apishield" \
      org.opencontainers.image.description="Contract-first API security gateway" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# A fixed numeric uid/gid so that orchestrators can check runAsNonRoot and volume owners
# can be set ahead; /var/lib/apishield is where a SQLite `state:` file can live.
RUN groupadd --system --gid 10001 apishield \
    && useradd --system --uid 10001 --gid apishield --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin apishield \
    && install -d -o apishield -g apishield -m 0750 /var/lib/apishield \
    && install -d -m 0755 /etc/apishield
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels /wheels/apishield-*.whl
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
