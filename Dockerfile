# syntax=docker/dockerfile:1
#
# celery-resultstore images, built from this repository (see docs/install.md):
#
#   docker build -t celery-resultstore:0.1.0 .                        # operator (default target)
#   docker build --target worker -t celery-resultstore-worker:0.1.0 . # Celery worker base
#
# The default image runs the operator (`resultstore-operator`) and is also the image of the
# cleanup CronJob (`resultstore cleanup --config-dir DIR`): both entry points are on PATH and
# there is no ENTRYPOINT, so a pod's `command` or `args` alone picks what runs.
# The `worker` target holds the base install and the Redis transport (no kopf/kubernetes): build
# your worker image FROM it and add your Celery app.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# Must equal [project].version in pyproject.toml (tests/unit/test_manifests_dockerfile.py checks).
ARG RESULTSTORE_VERSION=0.1.0

# ---------------------------------------------------------------------------------------------
# builder: wheels for the project and every dependency, so the runtime stages need neither a
# compiler nor network access to an index (and carry no build tooling).
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# The product only: devtools/ is its own distribution (development tooling), never in an image.
COPY pyproject.toml README.md LICENSE ./
COPY backend/ backend/
COPY operator/ operator/
RUN pip wheel --wheel-dir /wheels ".[operator,redis]"

# ---------------------------------------------------------------------------------------------
# worker: the base install plus the Redis broker transport (what a Celery worker needs, and
# what manifests/examples use), as an unprivileged user.
FROM ${PYTHON_IMAGE} AS worker
ARG RESULTSTORE_VERSION
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/tmp
# A fixed numeric UID/GID so `runAsNonRoot: true` can be verified by the kubelet without a
# `runAsUser` in the pod spec.
RUN groupadd --system --gid 10001 resultstore \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin resultstore
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels "celery-resultstore[redis]==${RESULTSTORE_VERSION}"
WORKDIR /app
USER 10001:10001
CMD ["celery", "--help"]

# ---------------------------------------------------------------------------------------------
# operator (default): adds the `operator` extra (kopf, kubernetes client, cryptography).
# Runs with a read-only root filesystem: byte code is compiled at install time and nothing is
# written outside /tmp (an emptyDir in the manifests and the chart).
FROM worker AS operator
ARG RESULTSTORE_VERSION
USER 0
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels "celery-resultstore[operator]==${RESULTSTORE_VERSION}"
USER 10001:10001
EXPOSE 8080 9443
CMD ["resultstore-operator"]
