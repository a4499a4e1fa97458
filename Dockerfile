# digit-service images, one target per role (all serve HTTP on 0.0.0.0:8000 and gRPC on 8001):
#   serve-cpu  CPU serving with ONNX Runtime, no torch        docker build --target serve-cpu -t digit-service:serve-cpu .
#   trainer    fine-tunes and trains (torch), exports ONNX     docker build --target trainer -t digit-service:trainer .
#   cuda       GPU serving with torch.compile                  docker build --target cuda -t digit-service:cuda .
# Here, offline from image registries: `make image` (a local Debian base, buildah; see README).
# The serving images need a registry with an active version mounted at /app/registry; the
# trainer image makes one (MNIST + base model) on its first start when there is none.
# PIP_CERT (optional, in every stage that runs pip): a CA bundle for pip behind a TLS-intercepting
# proxy, mounted at build time (buildah bud -v /etc/ssl/certs:/etc/ssl/certs:ro); a build arg,
# so not kept in the image.
ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------- shared: Python, the user, the code
FROM ${BASE_IMAGE} AS python-base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DIGITS_HOST=0.0.0.0 \
    DIGITS_PORT=8000 \
    DIGITS_REGISTRY=/app/registry \
    DIGITS_DATA_DIR=/app/data \
    PATH=/opt/venv/bin:$PATH

RUN python3 -m venv /opt/venv \
    && useradd --create-home --uid 10001 digits \
    && mkdir -p /app/registry /app/data \
    && chown -R digits:digits /app

WORKDIR /app
COPY pyproject.toml README.md ./
COPY model ./model
COPY service ./service
EXPOSE 8000 8001

# ---------------------------------------------------------------- CPU serving: ONNX Runtime, no torch
FROM python-base AS serve-cpu
ARG PIP_CERT
# Then what serving never runs: pip and setuptools, numpy's own test suite.
# hadolint ignore=DL3013  # every dependency is pinned exactly in pyproject.toml
RUN pip install '.[serve]' \
    && python -m pip uninstall --yes pip setuptools \
    && find /opt/venv -depth -type d -path '*/numpy/*' -name tests -exec rm -rf {} +
# The model runs in the API servers (ONNX Runtime); fine-tunes run in the trainer image.
ENV DIGITS_DEVICE=cpu \
    DIGITS_INFERENCE=api \
    DIGITS_RUNTIME=onnx \
    DIGITS_TRAINER_ENABLED=false
USER 10001
VOLUME ["/app/registry"]
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/ready', timeout=2).status != 200)"]
CMD ["python", "-m", "service"]

# ---------------------------------------------------------------- torch: the trainer
FROM python-base AS trainer
ARG PIP_CERT
# TORCH_INDEX: where the torch wheels come from: download.pytorch.org's CPU-only builds, a
# fraction of PyPI's x86_64 wheels, which are CUDA builds (`make image` here: PyPI, the only
# index reachable).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# hadolint ignore=DL3013  # pinned in pyproject.toml
RUN pip install --extra-index-url "${TORCH_INDEX}" torch==2.14.1 torchvision==0.29.1 \
    && pip install '.[serve,train]'
USER 10001
VOLUME ["/app/registry", "/app/data"]
# MNIST and the base model on a fresh volume (skipped when there), then the fine-tune trainer;
# every version it publishes carries model.onnx, so serve-cpu replicas can serve it.
CMD ["sh", "-c", "python -m model prepare-data && python -m model train --if-missing && exec python -m service.finetune.trainer"]

# ---------------------------------------------------------------- torch on CUDA: GPU serving
FROM python-base AS cuda
ARG PIP_CERT
# PyPI's torch wheels bring the CUDA libraries (nvidia-* wheels); the node brings the driver.
# hadolint ignore=DL3013  # pinned in pyproject.toml
RUN pip install '.[cuda]'
# CUDA batches in LitServe's inference workers, torch.compile (ONNX Runtime if compiling fails)
ENV DIGITS_DEVICE=cuda \
    DIGITS_RUNTIME=auto
USER 10001
VOLUME ["/app/registry", "/app/data"]
HEALTHCHECK --interval=15s --timeout=3s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/ready', timeout=2).status != 200)"]
CMD ["python", "-m", "service"]
