"""The deployment files name only what exists in the code.

No cluster runs here (``make lint`` checks the manifests against the Kubernetes schemas), so
these tests check what schemas cannot: every ``DIGITS_*`` variable in ``deploy/k8s`` is a
setting with a valid value, every probe path a route of the real app, every ``python -m``
module importable, and the Grafana dashboard and Prometheus configs use the metrics that
service/metrics.py defines, in queries and configs that Prometheus's own ``promtool`` accepts.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from service import metrics
from service.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
NON_DIGITS_ENV = {"HOME"}  # the only other variable the manifests set: caches go to the scratch volume
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")


def manifests() -> list[tuple[Path, dict]]:
    return [(path, doc) for path in sorted(K8S.rglob("*.yaml"))
            for doc in yaml.safe_load_all(path.read_text()) if doc]


def mappings(node: object) -> Iterator[dict]:
    """Every mapping inside a YAML document, depth first."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from mappings(value)
    elif isinstance(node, list):
        for item in node:
            yield from mappings(item)


def containers() -> list[tuple[str, dict]]:
    """(where, container) for every container and init container, overlay patches included."""
    found = []
    for path, doc in manifests():
        for node in mappings(doc):
            for key in ("initContainers", "containers"):
                for container in node.get(key, []):
                    found.append((f"{path.relative_to(K8S)}:{doc['metadata']['name']}:{container['name']}", container))
    return found


def config_maps() -> dict[str, dict[str, str]]:
    return {doc["metadata"]["name"]: doc.get("data", {}) for _, doc in manifests() if doc.get("kind") == "ConfigMap"}


def environment(container: dict) -> dict[str, str]:
    """What the container's process sees: its ConfigMaps, then its own env (which wins)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(config_maps()[source["configMapRef"]["name"]])
    env.update({var["name"]: var["value"] for var in container.get("env", []) if "value" in var})
    return env


def workload(name: str) -> dict:
    [doc] = [doc for _, doc in manifests() if doc.get("kind") == "Deployment" and doc["metadata"]["name"] == name
             and "selector" in doc["spec"]]  # the full manifest, not an overlay's patch of it
    return doc


def test_manifests_name_only_known_settings() -> None:
    known = {f"DIGITS_{name.upper()}" for name in Settings.model_fields}
    named = {key for data in config_maps().values() for key in data}
    named |= {var["name"] for _, container in containers() for var in container.get("env", [])}
    assert {"DIGITS_REGISTRY", "DIGITS_RUN_DIR", "DIGITS_TRAINER_ENABLED", "DIGITS_ADMIN_TOKEN_FILE"} <= named
    assert {name for name in named if name.startswith("DIGITS_")} - known == set()
    assert {name for name in named if not name.startswith("DIGITS_")} <= NON_DIGITS_ENV


@pytest.mark.parametrize("where,container", containers(), ids=[where for where, _ in containers()])
def test_every_container_gets_valid_settings(where: str, container: dict, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    env = environment(container)
    if "DIGITS_ADMIN_TOKEN_FILE" in env:  # the Secret's file; Settings reads it
        (tmp_path / "token").write_text("s3cret\n")
        env["DIGITS_ADMIN_TOKEN_FILE"] = str(tmp_path / "token")
    for name in [name for name in os.environ if name.startswith("DIGITS_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    Settings()  # raises a ValidationError naming any bad value


WRITTEN_PATHS = ("DIGITS_REGISTRY", "DIGITS_DATA_DIR", "DIGITS_RUN_DIR", "HOME")


def test_paths_the_service_writes_are_on_writable_volumes() -> None:
    """The root filesystem is read-only: the registry, data, scratch and caches need a volume."""
    checked = 0
    for where, container in containers():
        if "volumeMounts" not in container:
            continue  # an overlay's patch: its base container is checked
        assert container["securityContext"]["readOnlyRootFilesystem"] is True, where
        writable = [Path(m["mountPath"]) for m in container["volumeMounts"] if not m.get("readOnly")]
        for name, value in environment(container).items():
            if name in WRITTEN_PATHS:
                assert any(Path(value).is_relative_to(mount) for mount in writable), (where, name, value)
                checked += 1
    assert checked >= 4 * len(WRITTEN_PATHS) - 1  # four containers; the init container has no HOME


def test_serving_runs_no_trainer_and_exactly_one_trainer_runs() -> None:
    serving, trainer = workload("digit-service"), workload("digit-service-trainer")
    [server] = serving["spec"]["template"]["spec"]["containers"]
    assert environment(server)["DIGITS_TRAINER_ENABLED"] == "false"
    [train] = trainer["spec"]["template"]["spec"]["containers"]
    assert train["command"] == ["python", "-m", "service.finetune.trainer"]
    assert trainer["spec"]["replicas"] == 1 and trainer["spec"]["strategy"]["type"] == "Recreate"


def test_admin_token_file_is_where_the_secret_is_mounted() -> None:
    spec = workload("digit-service")["spec"]["template"]["spec"]
    [server] = spec["containers"]
    token_file = Path(environment(server)["DIGITS_ADMIN_TOKEN_FILE"])
    secrets = {volume["name"]: volume["secret"] for volume in spec["volumes"] if "secret" in volume}
    [mount] = [m for m in server["volumeMounts"] if m["name"] in secrets]
    assert token_file.parent == Path(mount["mountPath"])
    items = secrets[mount["name"]].get("items")
    assert items is None or token_file.name in {item["path"] for item in items}


def test_python_modules_in_commands_exist() -> None:
    modules = {module for _, container in containers()
               for module in re.findall(r"python -m ([\w.]+)", " ".join(container.get("command", [])))}
    assert {"service", "service.finetune.trainer", "model"} <= modules
    assert [m for m in sorted(modules) if importlib.util.find_spec(m) is None] == []


@pytest.fixture(scope="module")
def app_routes(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """The route table of the real app, built with service.server.build_server in a fresh
    interpreter (its own metrics directory; nothing served)."""
    scratch = tmp_path_factory.mktemp("routes")
    code = (
        "import json, sys\nfrom pathlib import Path\nfrom service.settings import Settings\n"
        "from service.inference.placement import decide\nfrom service.server import build_server\n"
        "settings = Settings(run_dir=Path(sys.argv[1]) / 'run', registry=Path(sys.argv[1]) / 'registry')\n"
        "app = build_server(settings, decide(settings)).app\n"
        "print(json.dumps(sorted(app.openapi()['paths'])))\n"
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(scratch)}
    out = subprocess.run([sys.executable, "-c", code, str(scratch)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_probe_and_scrape_paths_are_routes_on_named_ports(app_routes: set[str]) -> None:
    assert {"/ready", "/health", "/predict"} <= app_routes  # the table is the app's
    probed = []
    for where, container in containers():
        ports = {port["name"] for port in container.get("ports", [])}
        for probe in (container[key] for key in PROBES if key in container):
            probed.append(probe["httpGet"]["path"])
            assert probe["httpGet"]["port"] in ports, where
    scraped = [doc["spec"]["template"]["metadata"].get("annotations", {}).get("prometheus.io/path")
               for _, doc in manifests() if doc.get("kind") == "Deployment" and "selector" in doc["spec"]]
    paths = set(probed) | {path for path in scraped if path}
    assert {"/ready", "/health", "/metrics"} <= paths
    assert paths - app_routes == set()


def test_every_manifest_is_in_a_kustomization() -> None:
    """`make lint` validates what the kustomizations render; a file outside them would escape it."""
    listed = set()
    for path in K8S.rglob("kustomization.yaml"):
        spec = yaml.safe_load(path.read_text())
        for entry in [*spec.get("resources", []), *(patch["path"] for patch in spec.get("patches", []))]:
            listed.add((path.parent / entry).resolve())
    files = {path.resolve() for path in K8S.rglob("*.yaml") if path.name != "kustomization.yaml"}
    assert files and files - listed == set()


def exposed_metric_names() -> set[str]:
    """The series names service/metrics.py's metrics appear under in /metrics."""
    suffixes = {"counter": ("_total", "_created"), "gauge": ("",),
                "histogram": ("_bucket", "_sum", "_count", "_created")}
    return {metric._name + suffix for metric in vars(metrics).values() if isinstance(metric, MetricWrapperBase)
            for suffix in suffixes[metric._type]}


def dashboard_queries() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def test_dashboard_uses_the_service_metrics() -> None:
    used = {name for expr in dashboard_queries() for name in re.findall(r"\bdigits_\w+", expr)}
    assert used - exposed_metric_names() == set()
    for shown in ("digits_http_requests_total", "digits_http_request_duration_seconds_bucket",
                  "digits_batch_size_bucket", "digits_queue_wait_seconds_bucket", "digits_model_info",
                  "digits_finetune_jobs_total", "digits_review_captured_total", "digits_review_dropped_total",
                  "digits_prediction_confidence_bucket"):
        assert shown in used


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool (Debian's prometheus package) is not installed")
    return path


def test_dashboard_queries_parse_as_promql(tmp_path: Path) -> None:
    grafana = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h", "$instance": ".*", "$route": ".*"}
    rules = []
    for number, expr in enumerate(dashboard_queries()):
        for variable, value in grafana.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, expr
        rules.append({"record": f"dashboard:query{number}", "expr": expr})
    (tmp_path / "rules.yml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = subprocess.run([promtool(), "check", "rules", str(tmp_path / "rules.yml")], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_prometheus_configs_pass_promtool(tmp_path: Path) -> None:
    check = [promtool(), "check", "config"]
    out = subprocess.run([*check, str(DEPLOY / "prometheus.yml")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    # Debian's Prometheus is built without Kubernetes discovery: check the rest of the
    # Kubernetes config (its relabelling) with a static target in place of pod discovery.
    config = yaml.safe_load((DEPLOY / "prometheus-kubernetes.yml").read_text())
    for job in config["scrape_configs"]:
        assert job.pop("kubernetes_sd_configs") == [{"role": "pod"}]
        job["static_configs"] = [{"targets": ["10.0.0.1:8000"]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    out = subprocess.run([*check, str(tmp_path / "prometheus.yml")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def dockerfile_targets() -> set[str]:
    return set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", (ROOT / "Dockerfile").read_text(), re.MULTILINE | re.IGNORECASE))


def image_tags() -> dict[str, str]:
    """Image name in the manifests -> the tag the kustomizations give it."""
    return {entry["name"]: entry["newTag"] for path in K8S.rglob("kustomization.yaml")
            for entry in yaml.safe_load(path.read_text()).get("images", [])}


def test_each_role_runs_its_own_image_a_dockerfile_target() -> None:
    """Serving runs serve-cpu (no torch), the trainer the trainer image, the GPU overlay cuda."""
    tags = image_tags()
    assert set(tags.values()) <= dockerfile_targets()
    images = {where: tags[container["image"]] for where, container in containers() if "image" in container}
    assert images == {
        "base/serving-deployment.yaml:digit-service:wait-for-model": "serve-cpu",
        "base/serving-deployment.yaml:digit-service:server": "serve-cpu",
        "base/trainer-deployment.yaml:digit-service-trainer:prepare": "trainer",
        "base/trainer-deployment.yaml:digit-service-trainer:trainer": "trainer",
        "gpu/serving-gpu.yaml:digit-service:server": "cuda",
    }


# ------------------------------------------------------------------ KServe (deploy/kserve)

KSERVE = DEPLOY / "kserve"


@pytest.fixture(scope="module")
def crd_check():
    """deploy/kserve/validate_crd.py, the validator `make lint` runs."""
    spec = importlib.util.spec_from_file_location("validate_crd", KSERVE / "validate_crd.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def inference_service() -> dict:
    return yaml.safe_load((KSERVE / "inferenceservice.yaml").read_text())


def test_the_inference_service_passes_kserves_own_crd_schema(crd_check) -> None:
    assert crd_check.problems(inference_service()) == []
    broken = inference_service()
    broken["spec"]["predictor"]["minReplica"] = 2  # a typo the API server would drop silently
    broken["spec"]["predictor"]["containers"][0]["ports"][0]["containerPort"] = "8000"
    broken["spec"]["predictor"]["scaleMetric"] = "gpu"
    found = " | ".join(crd_check.problems(broken))
    assert "'minReplica' was unexpected" in found and "containerPort" in found and "'gpu' is not one of" in found


def test_the_stored_crd_is_the_one_its_readme_names() -> None:
    crd = KSERVE / "crd" / "serving.kserve.io_inferenceservices.yaml"
    digest = hashlib.sha256(crd.read_bytes()).hexdigest()
    readme = (KSERVE / "crd" / "README.md").read_text()
    assert f"`{digest}`" in readme and "kserve/kserve" in readme and "v0.20.0" in readme


def test_the_predictor_serves_v2_on_http_and_grpc_from_serve_cpu(app_routes: set[str], tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    predictor = inference_service()["spec"]["predictor"]
    [container] = predictor["containers"]
    # KServe's Service exposes the first port on 80 and gives a port named grpc appProtocol h2c
    assert [(p["name"], p["containerPort"]) for p in container["ports"]] == [
        ("http", Settings.model_fields["port"].default), ("grpc", Settings.model_fields["grpc_port"].default)]
    probes = {key: container[key]["httpGet"] for key in PROBES}
    assert {probe["port"] for probe in probes.values()} == {"http"}
    assert probes["readinessProbe"]["path"] == "/v2/health/ready"
    assert probes["livenessProbe"]["path"] == "/v2/health/live"
    assert {probe["path"] for probe in probes.values()} <= app_routes
    kustomization = yaml.safe_load((KSERVE / "kustomization.yaml").read_text())
    assert {entry["name"]: entry["newTag"] for entry in kustomization["images"]}[container["image"]] == "serve-cpu"
    claims = {volume["persistentVolumeClaim"]["claimName"] for volume in predictor["volumes"]
              if "persistentVolumeClaim" in volume}
    assert claims == {doc["metadata"]["name"] for _, doc in manifests() if doc.get("kind") == "PersistentVolumeClaim"}
    env = environment(container)
    assert env["DIGITS_TRAINER_ENABLED"] == "false" and set(env) - NON_DIGITS_ENV <= {
        f"DIGITS_{name.upper()}" for name in Settings.model_fields}
    (tmp_path / "token").write_text("s3cret\n")
    for name in [name for name in os.environ if name.startswith("DIGITS_")]:
        monkeypatch.delenv(name)
    for name, value in {**env, "DIGITS_ADMIN_TOKEN_FILE": str(tmp_path / "token")}.items():
        monkeypatch.setenv(name, value)
    Settings()
