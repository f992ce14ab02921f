# syntax=docker/dockerfile:1.7
#
# MergeSearch images, one Dockerfile, two targets:
#
#   docker build --target operator -t mergesearch-operator:0.1.0 .
#   docker build --target runner   -t mergesearch-runner:0.1.0 .
#   docker build --target runner --build-arg INSTALL_VLLM=true -t mergesearch-runner:0.1.0-vllm .
#
# Versions: Python packages are constrained by requirements/dev.lock (the same pins the tests
# run with; PyPI's Linux torch wheels bundle CUDA through the nvidia-* packages pinned there, so
# the runner needs no CUDA base image: the driver comes from the node). vLLM is optional and
# pinned by VLLM_VERSION, at least what the pinned lm-eval's `vllm` extra asks for (checked by
# tests/unit/test_dockerfile.py); it brings its own pins of torch, transformers and fastapi, so
# that image is built without the lock's constraints on those. Both images run as an unprivileged user (65532) and keep nothing writable
# outside /tmp and the runner's cache (emptyDirs on a cluster; the root file system is
# read-only). The commands are mergesearch.entrypoints' (tests/unit/test_dockerfile.py).

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# ----------------------------------------------------------------------------- common base
FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN groupadd --gid 65532 mergesearch \
    && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /tmp \
        --shell /usr/sbin/nologin mergesearch

# ----------------------------------------------------------------------------- sources
FROM base AS source
WORKDIR /src
COPY pyproject.toml README.md ./
COPY requirements/dev.lock requirements/dev.lock
COPY operator/ operator/
COPY runner/ runner/

# ----------------------------------------------------------------------------- operator build
FROM source AS operator-build
RUN python -m venv /opt/venv \
    && pip install --no-cache-dir -c requirements/dev.lock ".[operator]"

# ----------------------------------------------------------------------------- runner build
FROM source AS runner-build
ARG INSTALL_VLLM=false
ARG VLLM_VERSION=0.33.0
RUN python -m venv /opt/venv \
    && if [ "$INSTALL_VLLM" = "true" ]; then \
         grep -v -E '^(torch|torchvision|torchaudio|triton|nvidia-[a-z0-9-]+|transformers|fastapi)==' \
           requirements/dev.lock > /tmp/constraints.txt \
         && pip install --no-cache-dir -c /tmp/constraints.txt ".[runner]" "vllm==${VLLM_VERSION}"; \
       else \
         pip install --no-cache-dir -c requirements/dev.lock ".[runner]"; \
       fi

# ----------------------------------------------------------------------------- what both images share
FROM base AS image
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/mergesearch/mergesearch" \
      org.opencontainers.image.vendor="MergeSearch"

# ----------------------------------------------------------------------------- operator image
FROM image AS operator
LABEL org.opencontainers.image.title="mergesearch-operator" \
      org.opencontainers.image.description="MergeSearch operator: CMA-ES search over linear merges of LLM checkpoints on Kubernetes"
COPY --from=operator-build /opt/venv /opt/venv
USER 65532:65532
WORKDIR /tmp
# kopf's liveness endpoint and the Prometheus metrics (mergesearch.entrypoints).
EXPOSE 8080 9090
ENTRYPOINT ["python", "-m", "mergesearch.operator"]
CMD ["--all-namespaces"]

# ----------------------------------------------------------------------------- runner image
FROM image AS runner
LABEL org.opencontainers.image.title="mergesearch-runner" \
      org.opencontainers.image.description="MergeSearch trial runner: fetch checkpoints, merge, evaluate with lm-evaluation-harness"
COPY --from=runner-build /opt/venv /opt/venv
# Models and datasets come from the trial's object store and the task YAMLs, never the Hub.
ENV HF_HUB_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1 \
    HF_HOME=/tmp/huggingface \
    MERGERUNNER_CACHE_DIR=/var/cache/mergerunner
USER 65532:65532
WORKDIR /tmp
ENTRYPOINT ["mergerunner", "run"]
