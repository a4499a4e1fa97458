# digit-service: `make run` serves on 127.0.0.1:8000, `make test` runs the tests.
# Every target sets up what it needs (venv, data, base model) and skips what is done.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DATA_DIR ?= data
REGISTRY ?= registry
export DIGITS_DATA_DIR := $(DATA_DIR)
export DIGITS_REGISTRY := $(REGISTRY)

.PHONY: install data fonts train retrain run replicas replicas-tools test browser lint loadtest bench bench-finetune bench-runtimes bench-preprocess bench-hostile soak demo-loop gpu-bench image image-base image-smoke clean protos

$(STAMP): pyproject.toml
	@echo "==> creating $(VENV) and installing digit-service with its dev tools (torch is ~5 GB: a few minutes)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check --progress-bar on -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

data: install
	@echo "==> MNIST in $(DATA_DIR)"
	$(PY) -m model --data-dir $(DATA_DIR) prepare-data

train: data fonts
	@echo "==> base model in $(REGISTRY) (trained only if the registry has no active version)"
	$(PY) -m model --data-dir $(DATA_DIR) --registry $(REGISTRY) train --if-missing

retrain: data fonts
	$(PY) -m model --data-dir $(DATA_DIR) --registry $(REGISTRY) train

run: train
	@echo "==> serving on http://127.0.0.1:8000 (Ctrl+C stops it)"
	$(PY) -m service

# The printed slice of model/slices.py renders digits in the faces of Debian's font packages.
FONT_FILES := /usr/share/fonts/truetype/dejavu/DejaVuSerif.ttf /usr/share/fonts/truetype/liberation/LiberationSerif-Regular.ttf /usr/share/fonts/truetype/freefont/FreeSerif.ttf
fonts:
	@ls $(FONT_FILES) >/dev/null 2>&1 || { echo "==> installing DejaVu, Liberation and FreeFont for the printed slice (apt)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fonts-dejavu-core fonts-liberation fonts-freefont-ttf >/dev/null; }

# The browser test drives Debian's Chromium (never a test tool's own browser download).
browser:
	@command -v chromium >/dev/null || { echo "==> installing Chromium for the browser test (apt)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

# The replicas topology and its test drive Debian's nginx and Prometheus: their own instances, on 127.0.0.1.
replicas-tools:
	@command -v nginx >/dev/null || test -x /usr/sbin/nginx || { echo "==> installing nginx (apt)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null; }
	@command -v prometheus >/dev/null || { echo "==> installing Prometheus (apt)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }

replicas: train replicas-tools
	@echo "==> nginx on http://127.0.0.1:8000 in front of 3 replicas and a trainer on a copy of $(REGISTRY)"
	$(PY) -m devtools.replicas

test: train browser replicas-tools fonts
	@echo "==> tests"
	$(PY) -m pytest -ra

# Kubernetes manifests, validated offline against the API schemas kubernetes-validate ships:
# every plain manifest, then every kustomization as rendered (overlays' patches included).
K8S_MANIFESTS := $(filter-out %/kustomization.yaml,$(wildcard deploy/k8s/base/*.yaml))
K8S_KUSTOMIZATIONS := $(patsubst %/kustomization.yaml,%,$(wildcard deploy/k8s/*/kustomization.yaml))

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/hadolint Dockerfile
	$(VENV)/bin/shellcheck deploy/image/*.sh
	$(VENV)/bin/kubernetes-validate --strict --quiet $(K8S_MANIFESTS)
	@command -v kubectl >/dev/null || { echo "kubectl is needed to render the kustomizations in deploy/k8s"; exit 1; }
	@rendered=$$(mktemp --suffix=.yaml); trap 'rm -f "$$rendered"' EXIT; \
	for dir in $(K8S_KUSTOMIZATIONS); do \
	  echo "kubectl kustomize $$dir | kubernetes-validate --strict"; \
	  kubectl kustomize "$$dir" > "$$rendered" && $(VENV)/bin/kubernetes-validate --strict --quiet "$$rendered" || exit 1; \
	done
	@# KServe: its Kubernetes kinds as above, the InferenceService against KServe's own CRD (deploy/kserve/crd)
	@rendered=$$(mktemp --suffix=.yaml); trap 'rm -f "$$rendered"' EXIT; \
	echo "kubectl kustomize deploy/kserve | kubernetes-validate --strict, validate_crd.py"; \
	kubectl kustomize deploy/kserve > "$$rendered" && $(VENV)/bin/kubernetes-validate --strict --quiet "$$rendered" \
	  && $(PY) deploy/kserve/validate_crd.py "$$rendered"

loadtest: train
	$(PY) -m loadtest.run_locust

bench: train
	@command -v hey >/dev/null || (echo "==> installing the load generator hey" && apt-get install -y hey)
	$(PY) -m loadtest.bench

bench-finetune: train
	@command -v hey >/dev/null || (echo "==> installing the load generator hey" && apt-get install -y hey)
	$(PY) -m loadtest.finetune_bench

bench-hostile: train
	@command -v hey >/dev/null || (echo "==> installing the load generator hey" && apt-get install -y hey)
	$(PY) -m loadtest.hostile_bench

# Memory over time: mixed traffic for a few minutes (at most 10), each process's RSS and its slope.
# Learning from traffic, end to end on a private registry copy: outline-style digits as traffic, the review
# queue, a scripted reviewer, a fine-tune on the reviewed items, the gate; at most 3 minutes.
demo-loop: train
	$(PY) -m devtools.demo_loop

soak: train
	$(PY) -m loadtest.soak

bench-runtimes: train
	$(PY) -m loadtest.runtime_bench

bench-preprocess: data fonts
	$(PY) -m loadtest.preprocess_bench

gpu-bench:
	bash loadtest/gpu_bench.sh

# The container images by role (Dockerfile targets), built with buildah from a base made here
# (no image registry is reachable): mmdebstrap's Debian bookworm + Python 3.11, imported with
# podman. serve-cpu has no torch; trainer and cuda get torch from PyPI (its x86_64 wheels are
# CUDA builds; download.pytorch.org's CPU-only ones, the trainer's default elsewhere, are not
# reachable here). The CA bundle is mounted for pip at build time, never copied in.
IMAGE_NAME ?= localhost/digit-service
IMAGE_ROLES := serve-cpu trainer cuda
BASE_IMAGE ?= localhost/digit-service-base:bookworm
IMAGE_TORCH_INDEX ?= https://pypi.org/simple
image: $(addprefix image-,$(IMAGE_ROLES))

image-base:
	deploy/image/make-base.sh $(BASE_IMAGE)

image-%: image-base
	@echo "==> building $(IMAGE_NAME):$* with buildah (with torch: 10+ minutes)"
	@started=$$(date +%s); \
	nice -n 10 buildah bud --isolation chroot --layers --target $* -t $(IMAGE_NAME):$* \
	  --build-arg BASE_IMAGE=$(BASE_IMAGE) --build-arg TORCH_INDEX=$(IMAGE_TORCH_INDEX) \
	  --build-arg PIP_CERT=/etc/ssl/certs/ca-certificates.crt -v /etc/ssl/certs:/etc/ssl/certs:ro . \
	  && echo "==> $(IMAGE_NAME):$* built in $$(($$(date +%s) - started)) s"
	buildah images $(IMAGE_NAME):$*

# Once, by hand (not in CI): serve a copy of the registry from serve-cpu as its non-root user
# (and time container start -> /ready 200), then as the Kubernetes serving pod would (read-only
# root, the manifests' environment).
image-smoke:
	deploy/image/smoke.sh $(IMAGE_NAME):serve-cpu $(REGISTRY)
	deploy/image/pod-smoke.sh $(IMAGE_NAME):serve-cpu $(REGISTRY) $(PY)

clean:
	rm -rf reports .pytest_cache

# The gRPC stubs are generated from the Open Inference Protocol's .proto and committed;
# tests/test_v2.py checks that regenerating gives the committed files.
protos: install
	$(PY) -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. service/v2/protos/grpc_predict_v2.proto
