"""The Kubernetes manifests in ``deploy/kubernetes``: valid objects that fit the server.

Every object is checked against the Kubernetes JSON schemas of :data:`K8S_VERSION` (strict:
unknown fields fail) with ``kubernetes-validate``, whose package ships the schemas, so nothing
is fetched. The other tests check what a schema cannot: that the probes, Service, autoscaler,
user, flags and settings agree with the Dockerfile, the server's argument parser, and each
other. They read files only (``kubectl kustomize`` runs too where kubectl is installed).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from server.main import build_parser
from server.settings import OutputKind, check_state_url

kubernetes_validate = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "kubernetes"
K8S_VERSION = "1.32.0"
HEALTH = {"readinessProbe": "/v2/health/ready", "livenessProbe": "/v2/health/live"}
PART_OF = {"app.kubernetes.io/part-of": "reprogram"}
VAR = re.compile(r"\$\((\w+)\)")


def _load() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc is not None:
                out.append((path.name, doc))
    return out


OBJECTS = _load()
RESOURCES = [(f, o) for f, o in OBJECTS if o["kind"] != "Kustomization"]


def _one(kind: str, name: str) -> dict[str, Any]:
    found = [o for _, o in RESOURCES if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name!r}, got {len(found)}"
    return found[0]


def _all(kind: str) -> list[dict[str, Any]]:
    return [o for _, o in RESOURCES if o["kind"] == kind]


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, "expected one container per pod"
    return containers[0]


def _port(container: dict[str, Any], ref: int | str) -> int:
    """The container port that a probe or Service names (by number or by name)."""
    for p in container["ports"]:
        if ref in (p["containerPort"], p.get("name")):
            return int(p["containerPort"])
    raise AssertionError(f"port {ref!r} is not one of {container['name']}'s ports")


def _settings() -> dict[str, str]:
    return dict(_one("ConfigMap", "reprogram-settings")["data"])


def _server_args() -> list[str]:
    """The server's args with each ``$(NAME)`` replaced as the kubelet does it."""
    env = _settings()
    return [VAR.sub(lambda m: env[m[1]], a) for a in _container(SERVER)["args"]]


def _flag(args: list[str], flag: str) -> str:
    assert flag in args, f"expected {flag} in the server's args"
    return args[args.index(flag) + 1]


def _dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text(encoding="utf-8")


SERVER = _one("Deployment", "reprogram-server")
REDIS = _one("Deployment", "reprogram-redis")


def test_schemas_ship_with_the_package() -> None:
    """The schemas of the version used are package data: validation needs no network."""
    from importlib.resources import files

    schemas = files("kubernetes_validate") / "kubernetes-json-schema"
    folder = schemas / f"v{K8S_VERSION}-local-strict"
    assert (folder / "deployment-apps-v1.json").is_file()
    assert (folder / "_definitions.json").is_file()


@pytest.mark.parametrize(("name", "obj"), RESOURCES,
                         ids=[f"{f}:{o['kind']}" for f, o in RESOURCES])
def test_manifest_matches_the_kubernetes_schema(name: str, obj: dict[str, Any]) -> None:
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{name}: {obj['kind']} {obj['metadata']['name']}: {exc.message}")


def test_kustomization_lists_every_file() -> None:
    kustomizations = [o for _, o in OBJECTS if o["kind"] == "Kustomization"]
    assert len(kustomizations) == 1
    listed = kustomizations[0]["resources"]
    on_disk = {p.name for p in DEPLOY.iterdir()} - {"kustomization.yaml"}
    assert sorted(listed) == sorted(on_disk)
    assert len(listed) == len(set(listed))


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_kustomize_renders_every_object() -> None:
    out = subprocess.run(["kubectl", "kustomize", str(DEPLOY)], check=True, timeout=60,
                         capture_output=True, text=True).stdout
    rendered = [d for d in yaml.safe_load_all(out) if d]
    key = sorted((o["kind"], o["metadata"]["name"]) for o in rendered)
    assert key == sorted((o["kind"], o["metadata"]["name"]) for _, o in RESOURCES)
    images = [c["image"] for o in rendered if o["kind"] == "Deployment"
              for c in o["spec"]["template"]["spec"]["containers"]]
    assert f"reprogram-server:{_version()}" in images


def _version() -> str:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    return str(meta["project"]["version"])


def test_images_are_pinned() -> None:
    for dep in _all("Deployment"):
        image = _container(dep)["image"]
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest" and "/" not in tag, image
    assert _container(SERVER)["image"] == f"reprogram-server:{_version()}"
    kustomization = next(o for _, o in OBJECTS if o["kind"] == "Kustomization")
    assert {"name": "reprogram-server", "newTag": _version()} in kustomization["images"]


def test_deployments_probe_the_health_routes_on_the_served_port() -> None:
    container = _container(SERVER)
    port = int(_flag(_server_args(), "--port"))
    assert f"EXPOSE {port}" in _dockerfile()
    for probe, path in HEALTH.items():
        get = container[probe]["httpGet"]
        assert get["path"] == path, probe
        assert _port(container, get["port"]) == port, probe
    for dep in _all("Deployment"):
        c = _container(dep)
        assert "readinessProbe" in c and "livenessProbe" in c, dep["metadata"]["name"]


def test_services_select_their_pods_and_target_a_container_port() -> None:
    for service in _all("Service"):
        selector = service["spec"]["selector"]
        matches = [d for d in _all("Deployment")
                   if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert len(matches) == 1, f"Service {service['metadata']['name']} selects {len(matches)}"
        assert selector == matches[0]["spec"]["selector"]["matchLabels"]
        for p in service["spec"]["ports"]:
            _port(_container(matches[0]), p["targetPort"])


def test_hpa_scales_the_server_deployment_on_cpu() -> None:
    (hpa,) = _all("HorizontalPodAutoscaler")
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"]) == ("apps/v1", "Deployment")
    assert _one("Deployment", ref["name"]) is SERVER
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization"
    assert "cpu" in _container(SERVER)["resources"]["requests"]  # utilisation is of requests
    assert hpa["spec"]["minReplicas"] >= 2
    assert "replicas" not in SERVER["spec"]  # the HPA owns it; a fixed count would fight it


def test_server_runs_as_the_dockerfile_user() -> None:
    text = _dockerfile()
    users = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert users, "expected a USER in the Dockerfile"
    uid = re.search(rf"useradd\b[^\n]*--uid\s+(\d+)\s+{re.escape(users[-1])}\b", text)
    assert uid, f"expected useradd --uid N {users[-1]} in the Dockerfile"
    pod = SERVER["spec"]["template"]["spec"]["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert pod["runAsUser"] == int(uid[1])


def test_pods_are_locked_down() -> None:
    for dep in _all("Deployment"):
        spec = dep["spec"]["template"]["spec"]
        c = _container(dep)
        assert spec["automountServiceAccountToken"] is False
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
        assert {"requests", "limits"} <= c["resources"].keys()
        for volume in spec.get("volumes", []):  # volume-free: no PersistentVolume, no host path
            assert volume.keys() & {"emptyDir", "secret", "configMap"}, volume["name"]


def test_labels_are_consistent() -> None:
    for _, obj in RESOURCES:
        labels = obj["metadata"]["labels"]
        assert PART_OF.items() <= labels.items(), obj["metadata"]["name"]
        assert labels["app.kubernetes.io/name"].startswith("reprogram-")
    for dep in _all("Deployment"):
        pod = dep["spec"]["template"]["metadata"]["labels"]
        assert dep["spec"]["selector"]["matchLabels"].items() <= pod.items()
        assert pod == dep["metadata"]["labels"]


def test_server_command_and_flags_are_the_servers() -> None:
    """Each flag exists and each value parses, with the ConfigMap's settings filled in."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert _container(SERVER)["command"] == ["reprogram-server"]
    assert "reprogram-server" in scripts["project"]["scripts"]
    parser = build_parser()
    known = {s for action in parser._actions for s in action.option_strings}
    args = _server_args()
    for arg in args:
        assert not arg.startswith("--") or arg in known, f"unknown flag {arg}"
    ns = parser.parse_args(args)  # exits (SystemExit) on a bad value
    OutputKind.parse(ns.output)
    assert check_state_url(ns.state) == ns.state and ns.state.startswith("redis://")
    assert ns.prompts_dir is None  # with Redis the prompts live there, not in a folder


def test_configmap_settings_are_all_used_and_all_defined() -> None:
    env_from = _container(SERVER)["envFrom"]
    assert env_from == [{"configMapRef": {"name": "reprogram-settings"}}]
    used = {m for a in _container(SERVER)["args"] for m in VAR.findall(a)}
    assert used == set(_settings())


def test_state_url_names_the_redis_service() -> None:
    url = urlsplit(_flag(_server_args(), "--state"))
    service = _one("Service", "reprogram-redis")
    assert url.scheme == "redis"
    assert url.hostname == service["metadata"]["name"]
    assert url.port in [p["port"] for p in service["spec"]["ports"]]


def test_api_keys_file_comes_from_the_secret() -> None:
    path = _flag(_server_args(), "--api-keys-file")
    spec = SERVER["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    for mount in _container(SERVER)["volumeMounts"]:
        secret = volumes[mount["name"]].get("secret")
        if secret and path.startswith(mount["mountPath"].rstrip("/") + "/"):
            rel = path[len(mount["mountPath"].rstrip("/")) + 1:]
            assert rel in [item["path"] for item in secret["items"]]
            assert mount["readOnly"] is True
            return
    pytest.fail(f"--api-keys-file {path} is not in a mounted Secret")


def test_grace_period_covers_drain_and_shutdown() -> None:
    args = _server_args()
    needed = float(_flag(args, "--drain-seconds")) + float(_flag(args, "--shutdown-timeout"))
    assert SERVER["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > needed


def test_redis_keeps_an_append_only_file_on_its_data_volume() -> None:
    c = _container(REDIS)
    args = c["args"]
    assert _flag(args, "--appendonly") == "yes"
    assert _flag(args, "--appendfsync") == "always"  # acknowledged means written to disk
    assert [m["mountPath"] for m in c["volumeMounts"]] == [_flag(args, "--dir")]
    assert REDIS["spec"]["replicas"] == 1
    assert REDIS["spec"]["strategy"]["type"] == "Recreate"
