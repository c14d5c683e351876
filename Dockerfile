# syntax=docker/dockerfile:1
#
# atp-gateway image: `gateway serve` on :8080, as a non-root user.
#
#   docker build -t atp-gateway .
#   docker run --rm -p 8080:8080 \
#     -e GATEWAY_REDIS_URL=redis://redis:6379/0 \
#     -e GATEWAY_POSTGRES_DSN=postgresql://atp:atp@postgres:5432/atp \
#     -e GATEWAY_API_KEYS=storefront:...,feed:...,ops:... atp-gateway
#
# `serve` applies pending migrations at start; `docker run ... atp-gateway migrate` applies them
# alone. docker-compose.yml runs the whole stack.

ARG PYTHON_IMAGE=python:3.11-slim

# --- build: the project and its dependencies into a virtual environment -----------------------
FROM ${PYTHON_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
# The metadata first: hatchling needs the readme the project names.
COPY pyproject.toml README.md ./
COPY gateway ./gateway
# A wheel, not an editable install: the runtime stage gets site-packages and nothing of /src.
# The check fails the build if a non-Python file the gateway loads at run time was left out.
RUN pip install . \
    && python -c "import gateway.app; from importlib.resources import files as f; assert f('gateway.atp').joinpath('apply_events.lua').is_file() and f('gateway.migrations').joinpath('0001_location_config.sql').is_file() and f('gateway.http').joinpath('openapi.yaml').is_file()"

# --- runtime -----------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="atp-gateway" \
      org.opencontainers.image.description="Available-to-promise gateway between storefronts and the ERP"

RUN groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid gateway --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin gateway

COPY --from=build /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    GATEWAY_HOST=0.0.0.0 \
    GATEWAY_PORT=8080

WORKDIR /app
USER 10001:10001
EXPOSE 8080

# No curl in slim images: probe /healthz with the interpreter (bypassing any proxy settings).
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:' + os.environ.get('GATEWAY_PORT', '8080') + '/healthz', timeout=2)"]

# On SIGTERM aiohttp stops accepting, drains in-flight requests (up to
# GATEWAY_SHUTDOWN_TIMEOUT_SECONDS) and the Kafka consumer commits what it applied.
STOPSIGNAL SIGTERM
ENTRYPOINT ["gateway"]
CMD ["serve"]
