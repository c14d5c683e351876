# syntax=docker/dockerfile:1
#
# atp-gateway image: `gateway serve` on :8080 as a non-root user; the same image runs
# `gateway migrate` and `gateway erp-sim` (docker-compose.yml runs all three).
#
#   docker build -t atp-gateway .
#   docker run --rm -p 8080:8080 \
#     -e GATEWAY_REDIS_URL=redis://redis:6379/0 \
#     -e GATEWAY_POSTGRES_DSN=postgresql://atp:PASSWORD@postgres:5432/atp \
#     -e GATEWAY_API_KEYS=storefront:...,feed:...,ops:... atp-gateway
#
# Two stages: `build` makes the gateway's wheel and a wheel of every dependency, pinned by
# requirements.lock; `runtime` installs them into /opt/venv from those wheels alone (no index, no
# compiler, no source tree in the final image). tests/test_stack_files.py runs these same pip
# steps (wheel, venv, install with the lock) and starts the result; it must change with them.

# The interpreter the lock was made and tested with is CPython 3.11; bump both together.
ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

# --- build: wheels ---------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /src
# The metadata first (hatchling needs the readme the project names), then the package.
COPY requirements.lock pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip wheel --wheel-dir /wheels --constraint requirements.lock .

# --- runtime ---------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="atp-gateway" \
      org.opencontainers.image.description="Available-to-promise gateway between storefronts and the ERP"

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONFAULTHANDLER=1 \
    PATH=/opt/venv/bin:$PATH \
    GATEWAY_HOST=0.0.0.0 \
    GATEWAY_PORT=8080

RUN groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid gateway --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin gateway

# The wheels are mounted for this step only, never a layer. pip compiles the .pyc files now
# (root, at build time), so the non-root process never needs to write them.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    --mount=type=bind,from=build,source=/src/requirements.lock,target=/tmp/requirements.lock \
    python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-index --find-links /wheels --constraint /tmp/requirements.lock atp-gateway \
    && /opt/venv/bin/gateway --help > /dev/null

USER 10001:10001
EXPOSE 8080

# No curl in slim images: probe /healthz with the interpreter (bypassing any proxy settings).
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:' + os.environ.get('GATEWAY_PORT', '8080') + '/healthz', timeout=2)"]

# On SIGTERM the gateway stops intake, drains (GATEWAY_SHUTDOWN_TIMEOUT_SECONDS) and exits;
# under --workers the parent passes the signal to every worker and waits for each drain.
STOPSIGNAL SIGTERM
ENTRYPOINT ["gateway"]
CMD ["serve"]
