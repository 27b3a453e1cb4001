# syntax=docker/dockerfile:1
#
# kura-py node image.
#
#   docker build -t kura-py .
#   docker run -p 4000:4000 -p 50051:50051 -p 7443:7443 -v kura-data:/data kura-py
#
# The node keeps its memory-mapped per-run files (node state, Prometheus samples) on a
# memory filesystem, /dev/shm by default (KURA_RUN_DIR to change it), never on /data:
# a full data disk must not crash it. Docker's default 64 MiB /dev/shm holds about 200
# processes' worth; the node checks the room at start and says what it needs.
#
# Two stages: "build" installs the package and its dependencies into a
# self-contained virtualenv (/opt/venv); "runtime" copies only that venv and
# gunicorn.conf.py onto a clean python:3.11-slim, so no compiler, pip cache or
# source tree ends up in the image.

ARG PYTHON_IMAGE=python:3.11-slim

############################ build ############################
FROM ${PYTHON_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# A C toolchain, only for dependencies that have no wheel for the target
# platform (lmdb, lupa and gevent build from source on some architectures).
# It stays in this stage, so its exact Debian version does not matter.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
# pyproject.toml names README.md as the package readme: the build needs it.
COPY pyproject.toml README.md ./
COPY app ./app
# Build a wheel of the project and of every dependency, then install from
# those wheels only (no network, no source tree) into the venv.
# (pip builds the project in an isolated env with setuptools from pyproject;
# dependency versions are bounded there, not here.)
# hadolint ignore=DL3013
RUN pip wheel --wheel-dir /wheels . \
 && pip install --no-index --find-links /wheels kura-py \
 && python -c "import app, gevent, grpc, lmdb, lupa, flask, gunicorn"

############################ runtime ############################
FROM ${PYTHON_IMAGE} AS runtime

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    KURA_DATA_DIR=/data

# Unprivileged user with a fixed uid/gid (10001) so Kubernetes can check
# runAsNonRoot and fsGroup can make the volume writable.
RUN groupadd --system --gid 10001 kura \
 && useradd --system --uid 10001 --gid kura --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin kura \
 && mkdir -p /data \
 && chown kura:kura /data

COPY --from=build /opt/venv /opt/venv

# gunicorn.conf.py is read from the working directory by the CMD below.
WORKDIR /app
COPY gunicorn.conf.py ./

USER 10001:10001

VOLUME ["/data"]
# HTTP cache API, REAPI gRPC, internal peer API (/_internal/*).
EXPOSE 4000 50051 7443

# SIGTERM (and SIGUSR1) start the drain: /ready turns 503, in-flight requests
# finish within KURA_DRAIN_COMPLETION_TIMEOUT_MS. Give `docker stop -t` enough.
STOPSIGNAL SIGTERM

# Liveness only (/up); readiness (/ready) is 503 while joining or draining,
# which is not "unhealthy". The slim image has no curl, so use Python.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:%s/up' % os.environ.get('KURA_PORT', '4000'), timeout=4).status == 200 else 1)"]

# Exec form: gunicorn is PID 1 and receives the stop signal itself; it reaps
# its workers and starts/stops the REAPI process and the replicator.
CMD ["gunicorn", "-c", "gunicorn.conf.py"]
