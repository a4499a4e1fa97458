# digit-service image: serves the active model on 0.0.0.0:8000.
#   CPU (default):  docker build -t digit-service .
#   CUDA:           docker build -t digit-service:cuda \
#                     --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#                     --build-arg TORCH_INDEX=https://pypi.org/simple .
#   Here, offline from image registries: `make image` (a local Debian base, buildah; see README).
# Mount a registry at /app/registry to serve existing versions; with none, the first start
# prepares MNIST and trains the base model (a few minutes).
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

# TORCH_INDEX: where the torch wheels come from (CPU-only builds on download.pytorch.org).
# PIP_CERT (optional): a CA bundle for pip behind a TLS-intercepting proxy, mounted at build
# time (buildah bud -v /etc/ssl/certs:/etc/ssl/certs:ro); a build arg, so not kept in the image.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG PIP_CERT
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DIGITS_HOST=0.0.0.0 \
    DIGITS_PORT=8000 \
    DIGITS_REGISTRY=/app/registry \
    DIGITS_DATA_DIR=/app/data \
    PATH=/opt/venv/bin:$PATH

# CUDA base images have no Python 3.11; install the distribution's Python there.
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null 2>&1 || ! python3 -m venv --help >/dev/null 2>&1; then \
        apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv \
    && useradd --create-home --uid 10001 digits

WORKDIR /app
COPY pyproject.toml README.md ./
COPY model ./model
COPY service ./service
RUN pip install --extra-index-url "${TORCH_INDEX}" torch==2.14.1 torchvision==0.29.1 \
    && pip install . \
    && mkdir -p /app/registry /app/data \
    && chown -R digits:digits /app

USER 10001
EXPOSE 8000
VOLUME ["/app/registry", "/app/data"]
HEALTHCHECK --interval=15s --timeout=3s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/ready', timeout=2).status != 200)"]
CMD ["sh", "-c", "python -m model prepare-data && python -m model train --if-missing && exec python -m service"]
