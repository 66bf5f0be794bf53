"""Issue 21: the Kubernetes manifests (deploy/kubernetes/) are valid and agree with the gateway.

No cluster, kubectl, Helm or Docker here. Instead:

1. every manifest is validated against the API schemas of the current Kubernetes releases
   (kubernetes-validate, which bundles them: offline) in strict mode, and kustomization.yaml
   lists exactly the manifests present, each name it refers to resolving;
2. the manifests are checked against the gateway itself: the ConfigMap's JSON goes through
   mcpgw.config's parser with the Deployment's environment, every variable the Deployment sets is
   one that changes what the gateway parses, the Secret keys are the gateway's own secret
   variables, probe paths are resources the gateway serves on the ports it listens on, and the
   Ingress does for SSE and WebSocket what nginx/ does (a table, one row per nginx directive);
3. the Deployment's container command runs with its environment against a private redis-server:
   probes as kubelet sends them, the preStop hook's drain (/ready 503, new sessions refused, the
   current ones served, an in-flight call finished), exit after SIGTERM inside
   terminationGracePeriodSeconds, and the session a client had on that pod: 404 on another
   replica, initialize again there;
4. the image's user (Dockerfile) is the one the manifests name, and the gateway serves an SDK
   tools/call with the root filesystem read-only and only the declared writable paths (the two
   emptyDir mounts) writable, as that user: a private mount namespace (unshare -m).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate  # the test extra (setup.py): missing, the module fails rather than skips
import pytest
import yaml
from kubernetes_validate import utils as kv_utils

from mcpgw.config import PRIVATE_ENV, ConfigError, parse
from tests.gateway_process import FIXTURE_SERVER, pid_alive, wait_until
from tests.redis_server import REDIS_SERVER, RedisServer, free_port

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"
COMPONENTS = K8S / "components"
DOCKERFILE = ROOT / "Dockerfile"
NGINX = ROOT / "nginx"
#: Manifests in deploy/kubernetes/ that are examples, never applied (the user creates the Secret).
EXAMPLES = {"secret.example.yaml"}
#: The Secret every pod reads, created by the user (secret.example.yaml shows it).
SECRET_NAME = "mcpgw-secrets"
#: Variables a container gets for the process rather than for the gateway's config parser:
#: the read-only root filesystem leaves only the emptyDir mounts writable, so HOME and TMPDIR
#: must point into them (MCP servers started by npx or uvx keep caches under HOME).
PROCESS_ENV = {"HOME", "TMPDIR"}
#: Kinds whose schemas come from a CRD, not from the Kubernetes API (checked by hand below).
CRD_KINDS = {"ServiceMonitor"}
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


# -- reading the manifests -----------------------------------------------------------


def documents(path: Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def kustomization(directory: Path = K8S) -> dict[str, Any]:
    (doc,) = documents(directory / "kustomization.yaml")
    return doc


def resources() -> list[dict[str, Any]]:
    """Every object the base kustomization applies, in file order."""
    return [doc for name in kustomization()["resources"] for doc in documents(K8S / name)]


def component_resources(name: str = "servicemonitor") -> list[dict[str, Any]]:
    directory = COMPONENTS / name
    return [doc for file in kustomization(directory)["resources"] for doc in documents(directory / file)]


def find(kind: str, name: str, objects: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    for doc in resources() if objects is None else objects:
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise AssertionError(f"no {kind} {name!r} in deploy/kubernetes")


def workloads() -> list[dict[str, Any]]:
    return [doc for doc in resources() if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet")]


def gateway_deployment() -> dict[str, Any]:
    return find("Deployment", "mcpgw")


def container(workload: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    containers = workload["spec"]["template"]["spec"]["containers"]
    if name is None:
        (only,) = containers
        return only
    return next(c for c in containers if c["name"] == name)


def gateway_container() -> dict[str, Any]:
    return container(gateway_deployment(), "gateway")


def exporter_container() -> dict[str, Any]:
    return container(find("Deployment", "mcpgw-exporter"), "exporter")


def config_files() -> dict[str, str]:
    """The ConfigMap's files (gateway.json, drain.py), as mounted at /etc/mcpgw."""
    return dict(find("ConfigMap", "mcpgw-config")["data"])


def config_json() -> dict[str, Any]:
    return json.loads(config_files()["gateway.json"])


def example_secret() -> dict[str, Any]:
    (doc,) = documents(K8S / "secret.example.yaml")
    return doc


def fake_secrets() -> dict[str, str]:
    """Real values for every key of the example Secret (what `kubectl create secret` would hold)."""
    return {key: secrets.token_hex(24) for key in example_secret()["stringData"]}


def container_env(spec: dict[str, Any], secret_values: dict[str, str]) -> dict[str, str]:
    """A container's environment as the kubelet builds it: values, and Secret keys (optional ones
    left out when the Secret does not have them)."""
    env = {}
    for item in spec.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
            continue
        ref = item["valueFrom"]["secretKeyRef"]
        assert ref["name"] == SECRET_NAME, item
        if ref["key"] in secret_values:
            env[item["name"]] = secret_values[ref["key"]]
        else:
            assert ref.get("optional"), f"{item['name']}: Secret key {ref['key']} is required but missing"
    return env


def named_port(spec: dict[str, Any], port: int | str) -> int:
    """A probe's or Service's port: a number, or the name of one of the container's ports."""
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in spec["ports"] if p["name"] == port)


def mounts(workload: dict[str, Any], spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """mountPath -> {"volume": the volume, "readOnly": bool} of one container."""
    volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"].get("volumes", [])}
    return {m["mountPath"]: {"volume": volumes.get(m["name"], {"name": m["name"]}), "readOnly": m.get("readOnly", False)}
            for m in spec.get("volumeMounts", [])}


def writable_mounts(workload: dict[str, Any], spec: dict[str, Any]) -> set[str]:
    return {path for path, m in mounts(workload, spec).items() if not m["readOnly"]}


# -- 1. API schemas and the kustomization ------------------------------------------------


def supported_versions() -> list[str]:
    """The three newest minor releases kubernetes-validate bundles (the ones upstream supports)."""
    minors = sorted({kv_utils.major_minor(v) for v in kv_utils.all_versions()}, key=lambda v: tuple(map(int, v.split("."))))
    return minors[-3:]


def every_manifest() -> list[tuple[str, int, dict[str, Any]]]:
    """(file, index, object) for every object in deploy/kubernetes, examples and components included,
    but those of a CRD's kind (no bundled schema: test_servicemonitor_component checks it)."""
    found = []
    for path in sorted(K8S.rglob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for i, doc in enumerate(documents(path)):
            if doc["kind"] not in CRD_KINDS:
                found.append((str(path.relative_to(K8S)), i, doc))
    return found


@pytest.mark.parametrize("version", supported_versions())
@pytest.mark.parametrize("file,index,doc", every_manifest(), ids=lambda v: v if isinstance(v, str) else None)
def test_manifest_validates_strictly(file: str, index: int, doc: dict[str, Any], version: str):
    """Each object validates against the Kubernetes API schema of a current release; strict mode
    refuses any field the API does not define (a misspelt key would otherwise be dropped silently)."""
    kubernetes_validate.validate(doc, version, strict=True)


def test_strict_validation_refuses_unknown_fields():
    """The validator as used above is strict: a misspelt probe key fails, and passes without strict."""
    deployment = json.loads(json.dumps(gateway_deployment()))
    gateway = next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "gateway")
    gateway["readinesProbe"] = gateway.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(deployment, supported_versions()[-1], strict=True)
    kubernetes_validate.validate(deployment, supported_versions()[-1], strict=False)


def test_kustomization_lists_exactly_the_manifests_present():
    """`kubectl apply -k deploy/kubernetes` applies every manifest of the directory but the examples,
    and nothing that is not there; the optional component does the same for its own directory."""
    listed = kustomization()["resources"]
    assert len(listed) == len(set(listed)), "a file is listed twice"
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"} - EXAMPLES
    assert set(listed) == present
    assert kustomization()["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization()["kind"] == "Kustomization"
    assert "components" not in kustomization(), "the ServiceMonitor component is optional (needs the Prometheus Operator CRDs)"
    for directory in COMPONENTS.iterdir():
        component = kustomization(directory)
        assert component["apiVersion"] == "kustomize.config.k8s.io/v1alpha1" and component["kind"] == "Component"
        assert set(component["resources"]) == {p.name for p in directory.glob("*.yaml")} - {"kustomization.yaml"}
        # The line kustomization.yaml tells the user to uncomment names this directory.
        assert f"#   - components/{directory.name}" in (K8S / "kustomization.yaml").read_text()


def test_names_are_unique_and_the_namespace_is_the_kustomizations():
    keys = [(doc["kind"], doc["metadata"]["name"]) for doc in resources() + component_resources()]
    assert len(keys) == len(set(keys)), keys
    namespace = kustomization()["namespace"]
    assert find("Namespace", namespace)
    for doc in resources() + component_resources():
        assert doc["metadata"].get("namespace") in (None, namespace), doc["metadata"]
    assert example_secret()["metadata"]["namespace"] == namespace
    # Pod Security Admission: the API server itself refuses a pod that breaks the restricted profile.
    assert find("Namespace", namespace)["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", selector).items())


def pod_labels() -> list[dict[str, str]]:
    return [w["spec"]["template"]["metadata"]["labels"] for w in workloads()]


def test_every_reference_resolves():
    """What the objects name exists: Services select pods and target their named ports, the Ingress's
    backend and the HPA's and PDB's targets are the gateway, volumes name the ConfigMap, every
    Secret reference is a key of the example Secret, NetworkPolicies select pods and their ports."""
    for workload in workloads():
        spec = workload["spec"]
        assert selects(spec["selector"], spec["template"]["metadata"]["labels"]), workload["metadata"]["name"]
        pod = spec["template"]["spec"]
        if "serviceAccountName" in pod:
            find("ServiceAccount", pod["serviceAccountName"])
        for volume in pod.get("volumes", []):
            if "configMap" in volume:
                find("ConfigMap", volume["configMap"]["name"])
            assert set(volume) <= {"name", "configMap", "emptyDir"}, f"{volume['name']}: only ConfigMap and emptyDir volumes"
        for c in pod["containers"]:
            for item in c.get("env", []):
                ref = item.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == SECRET_NAME and ref["key"] in example_secret()["stringData"], item
    for service in (d for d in resources() if d["kind"] == "Service"):
        matched = [w for w in workloads() if selects(service["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])]
        assert len(matched) == 1, f"Service {service['metadata']['name']} selects {len(matched)} workloads"
        for port in service["spec"]["ports"]:
            assert any(named_port(c, port["targetPort"]) for c in matched[0]["spec"]["template"]["spec"]["containers"])
    ingress = find("Ingress", "mcpgw")
    for rule in ingress["spec"]["rules"]:
        for path in rule["http"]["paths"]:
            backend = path["backend"]["service"]
            service = find("Service", backend["name"])
            assert backend["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}
    assert find("HorizontalPodAutoscaler", "mcpgw")["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1", "kind": "Deployment", "name": "mcpgw"}
    gateway_labels = gateway_deployment()["spec"]["template"]["metadata"]["labels"]
    assert selects(find("PodDisruptionBudget", "mcpgw")["spec"]["selector"], gateway_labels)
    for policy in (d for d in resources() if d["kind"] == "NetworkPolicy"):
        targets = [w for w in workloads() if selects(policy["spec"]["podSelector"], w["spec"]["template"]["metadata"]["labels"])]
        assert len(targets) == 1, policy["metadata"]["name"]
        names = {p["name"] for c in targets[0]["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
        for rule in policy["spec"]["ingress"]:
            for port in rule["ports"]:
                assert port["port"] in names, (policy["metadata"]["name"], port)


def test_network_policies_admit_only_the_intended_peers():
    """HTTP port: the ingress controller only; metrics: Prometheus only; Redis: the gateways and the
    exporter only (and the gateway's egress stays open: its MCP servers reach what their tools need)."""
    def peers(policy: str) -> dict[str, list[dict[str, Any]]]:
        found: dict[str, list[dict[str, Any]]] = {}
        for rule in find("NetworkPolicy", policy)["spec"]["ingress"]:
            for port in rule["ports"]:
                found.setdefault(port["port"], []).extend(rule["from"])
        return found

    gateway = peers("mcpgw")
    assert set(gateway) == {"http", "metrics"}
    assert [p["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] for p in gateway["http"]] == ["ingress-nginx"]
    assert [p["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] for p in gateway["metrics"]] == ["monitoring"]
    assert set(peers("mcpgw-exporter")) == {"metrics"}
    redis = peers("mcpgw-redis")
    assert set(redis) == {"redis"}
    assert sorted(p["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for p in redis["redis"]) == ["exporter", "gateway"]
    for peer in redis["redis"]:
        assert "namespaceSelector" not in peer  # the namespace's own pods only
    assert find("NetworkPolicy", "mcpgw")["spec"]["policyTypes"] == ["Ingress"]


@pytest.mark.parametrize("workload", ["Deployment/mcpgw", "Deployment/mcpgw-exporter", "StatefulSet/mcpgw-redis"])
def test_pod_meets_the_restricted_pod_security_standard(workload: str):
    """The restricted profile (what the namespace enforces), plus a read-only root filesystem and
    resource requests and limits on every container."""
    kind, name = workload.split("/")
    pod = find(kind, name)["spec"]["template"]["spec"]
    context = pod["securityContext"]
    assert context["runAsNonRoot"] is True and context["runAsUser"] > 0
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod.get("automountServiceAccountToken") is False
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod.get(key)
    for c in pod["containers"]:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc.get("privileged", False) is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["readOnlyRootFilesystem"] is True
        assert "runAsUser" not in sc or sc["runAsUser"] > 0
        for kind_ in ("requests", "limits"):
            assert set(c["resources"][kind_]) >= {"cpu", "memory"}, (c["name"], kind_)


def test_gateway_rollout_settings():
    """Rolling updates never reduce capacity; the HPA owns the replica count (3 and up); the PDB lets
    one pod go at a time; pods spread over nodes."""
    spec = gateway_deployment()["spec"]
    assert spec["strategy"]["type"] == "RollingUpdate"
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    # A replicas field would be re-applied by every `kubectl apply -k`, undoing the HPA's count.
    assert "replicas" not in spec
    hpa = find("HorizontalPodAutoscaler", "mcpgw")["spec"]
    assert hpa["minReplicas"] == 3 and hpa["maxReplicas"] > hpa["minReplicas"]
    (metric,) = hpa["metrics"]
    assert metric["resource"]["name"] == "cpu" and metric["resource"]["target"]["type"] == "Utilization"
    assert find("PodDisruptionBudget", "mcpgw")["spec"]["maxUnavailable"] == 1
    spread = spec["template"]["spec"]["topologySpreadConstraints"]
    assert "kubernetes.io/hostname" in {c["topologyKey"] for c in spread}


def test_servicemonitor_component():
    """The ServiceMonitor (a Prometheus Operator CRD, no schema bundled: checked by hand) scrapes the
    metrics port of both metrics Services: the gateway pods' (headless) and the exporter's."""
    (monitor,) = component_resources()
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["kind"] == "ServiceMonitor"
    assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(monitor["spec"]) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}
    selected = [s for s in resources() if s["kind"] == "Service" and selects(monitor["spec"]["selector"], s["metadata"]["labels"])]
    assert sorted(s["metadata"]["name"] for s in selected) == ["mcpgw-exporter", "mcpgw-metrics"]
    assert find("Service", "mcpgw-metrics")["spec"]["clusterIP"] == "None"  # one target per pod
    # The CRD's duration pattern for interval and scrapeTimeout.
    duration = re.compile(r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$")
    for endpoint in monitor["spec"]["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout"}
        assert endpoint["path"] == "/metrics"
        assert duration.match(endpoint["interval"]) and duration.match(endpoint["scrapeTimeout"])
        for service in selected:
            assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}


# -- 2. the manifests against the gateway ---------------------------------------------------


def parsed_config(env: dict[str, str]) -> Any:
    """The ConfigMap's gateway.json through the gateway's own parser, with a container's environment."""
    return parse(config_json(), {"PATH": os.environ["PATH"], **env})


def test_configmap_config_loads_through_the_gateways_parser():
    """The config the pods start with: every interface (probes, the ingress controller and
    Prometheus reach the pod IP), the container's ports, Redis, the admin API for the drain."""
    env = container_env(gateway_container(), fake_secrets())
    config = parsed_config(env)
    assert config.host == "0.0.0.0"
    # metrics.host follows host unless set (and the config has no metrics.host).
    assert getattr(config.metrics, "host", config.host) == "0.0.0.0"
    assert config.port == named_port(gateway_container(), "http")
    assert config.metrics.enabled and config.metrics.port == named_port(gateway_container(), "metrics")
    assert config.redis is not None and config.redis.url == env["REDIS_URL"] and config.redis.password == env["REDIS_PASSWORD"]
    assert config.admin.enabled
    assert config.session.secret == env["SESSION_SECRET"]
    assert config.logFormat == "json"
    assert config.limits.maxSessions is not None  # the memory limit's bound (test_memory_limit_...)
    # The exporter reads the same file: its redis section, host and metrics.port.
    exporter = parsed_config(container_env(exporter_container(), fake_secrets()))
    assert exporter.redis is not None and exporter.host == "0.0.0.0"
    assert exporter.metrics.port == named_port(exporter_container(), "metrics")


@pytest.mark.parametrize("which", ["gateway", "exporter"])
def test_every_environment_variable_is_one_the_gateway_reads(which: str):
    """Each variable the container sets changes what the gateway parses (a misspelt name would
    not), except HOME and TMPDIR, which point into the writable emptyDir mounts."""
    spec = gateway_container() if which == "gateway" else exporter_container()
    workload = gateway_deployment() if which == "gateway" else find("Deployment", "mcpgw-exporter")
    env = container_env(spec, fake_secrets())
    full = parsed_config(env)
    for name in env:
        if name in PROCESS_ENV:
            assert any(env[name] == path or env[name].startswith(path + "/") for path in writable_mounts(workload, spec)), name
            continue
        try:
            without = parsed_config({k: v for k, v in env.items() if k != name})
        except ConfigError:
            continue  # the config is refused without it: read all the same
        assert without != full, f"{name} does not change the gateway's config: not a variable it reads"


def test_secret_keys_are_the_gateways_own_secret_variables():
    """The example Secret holds exactly the keys the pods read, each the name of the variable it
    becomes, and each one of the variables the gateway keeps for itself (never passed to a child)."""
    refs = {}
    for workload in workloads():
        for c in workload["spec"]["template"]["spec"]["containers"]:
            for item in c.get("env", []):
                ref = item.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    refs[item["name"]] = ref["key"]
    assert all(name == key for name, key in refs.items()), refs
    assert set(refs) == set(example_secret()["stringData"])
    assert set(refs) <= PRIVATE_ENV, set(refs) - PRIVATE_ENV


def test_example_secret_placeholders_stop_the_gateway():
    """The example's values are placeholders the gateway refuses, each with a config error naming
    its key: an example applied unchanged starts no gateway."""
    from mcpgw.tap import check_secrets

    placeholders = example_secret()["stringData"]
    good = fake_secrets()
    env = container_env(gateway_container(), good)
    config = parsed_config({**env, "SESSION_SECRET": placeholders["SESSION_SECRET"]})
    with pytest.raises(ConfigError) as refused:
        check_secrets(config, None, insecure_dev=False)  # on 0.0.0.0, as in the pod
    assert refused.value.key == "session.secret"
    for name, key in (("MCPGW_ADMIN_TOKEN", "MCPGW_ADMIN_TOKEN"), ("MCPGW_AUTH_TOKENS", "MCPGW_AUTH_TOKENS")):
        with pytest.raises(ConfigError) as refused:
            parsed_config({**env, name: placeholders[name]})
        assert refused.value.key.startswith(key), refused.value


def built_gateway_paths(admin: bool = True) -> set[str]:
    """The top-level paths a gateway built from the ConfigMap serves (in memory, nothing listens)."""
    from twisted.internet.testing import MemoryReactorClock

    from mcpgw import Gateway

    env = container_env(gateway_container(), fake_secrets())
    if not admin:
        env.pop("MCPGW_ADMIN_TOKEN")
    gateway = Gateway(parsed_config(env), MemoryReactorClock())
    return {name.decode() for name in gateway.resource.children}


def test_probes_ask_the_gateway_on_its_port():
    """Startup and liveness ask /health, readiness /ready (503 while draining), all on the port the
    gateway listens on, with a Host the gateway accepts whatever allowedHosts holds."""
    spec = gateway_container()
    paths = built_gateway_paths()
    config = parsed_config(container_env(spec, fake_secrets()))
    expected = {"startupProbe": "/health", "livenessProbe": "/health", "readinessProbe": "/ready"}
    for probe, path in expected.items():
        get = spec[probe]["httpGet"]
        assert get["path"] == path and path.lstrip("/") in paths
        assert named_port(spec, get["port"]) == config.port
        assert get["httpHeaders"] == [{"name": "Host", "value": "localhost"}]
    # The exporter serves /metrics on the metrics port only.
    exporter = exporter_container()
    for probe in ("readinessProbe", "livenessProbe"):
        get = exporter[probe]["httpGet"]
        assert get["path"] == "/metrics" and named_port(exporter, get["port"]) == config.metrics.port
    # A ServiceMonitor or Prometheus scrapes the gateway's metrics port by name.
    assert {p["targetPort"] for p in find("Service", "mcpgw-metrics")["spec"]["ports"]} == {"metrics"}


def test_ingress_routes_the_mcp_endpoints_and_nothing_else():
    """The Ingress routes every public endpoint the gateway serves (/mcp, /sse, /messages, /ws,
    /servers/...) and neither the probes nor /admin and /console (the admin token's API)."""
    served = built_gateway_paths(admin=True)
    internal = {"health", "ready", "admin", "console"}
    assert internal <= served, served  # the admin API exists in the pod: the drain uses it
    (rule,) = find("Ingress", "mcpgw")["spec"]["rules"]
    routed = {p["path"].strip("/") for p in rule["http"]["paths"]}
    assert all(p["pathType"] == "Prefix" for p in rule["http"]["paths"])
    assert routed == served - internal


#: What the project's nginx does for the gateway, one row per directive, and what the Ingress
#: does for it on ingress-nginx. (file, directive as written there, how, detail):
#: - "annotation": the Ingress carries annotation `detail[0]` with value `detail[1]`;
#: - "builtin": ingress-nginx does it on every location by itself; the annotations in `detail`
#:   would change that and must be absent;
#: - "backend" / "not-routed" / "kubernetes": done by the Ingress's backend, left out of it, or done
#:   by Kubernetes instead (detail says what).
A = "nginx.ingress.kubernetes.io/"
NGINX_TO_INGRESS: list[tuple[str, str, str, tuple[str, ...]]] = [
    ("snippets/mcp-proxy.conf", "proxy_pass http://mcp_gateway", "backend", ("mcpgw", "http")),
    ("snippets/mcp-proxy.conf", "proxy_http_version 1.1", "annotation", (A + "proxy-http-version", "1.1")),
    ("snippets/mcp-proxy.conf", "proxy_set_header Host $host", "builtin", (A + "upstream-vhost",)),
    ("snippets/mcp-proxy.conf", "proxy_set_header X-Real-IP $remote_addr", "builtin", ()),
    ("snippets/mcp-proxy.conf", "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for", "builtin", ()),
    ("snippets/mcp-proxy.conf", "proxy_set_header X-Forwarded-Proto $scheme", "builtin", ()),
    ("snippets/mcp-proxy.conf", "proxy_set_header X-Forwarded-Host $host", "builtin", ()),
    # WebSocket upgrade: ingress-nginx sends both headers on every location.
    ("snippets/mcp-proxy.conf", "proxy_set_header Upgrade $http_upgrade", "builtin", ()),
    ("snippets/mcp-proxy.conf", "proxy_set_header Connection $connection_upgrade", "builtin", (A + "connection-proxy-header",)),
    ("nginx.conf", "map $http_upgrade $connection_upgrade", "builtin", (A + "connection-proxy-header",)),
    # SSE: every event goes out as it comes.
    ("snippets/mcp-proxy.conf", "proxy_buffering off", "annotation", (A + "proxy-buffering", "off")),
    ("snippets/mcp-proxy.conf", "proxy_cache off", "builtin", ()),
    ("snippets/mcp-proxy.conf", "proxy_connect_timeout 10s", "annotation", (A + "proxy-connect-timeout", "10")),
    # Day-long SSE streams and WebSockets (the gateway pings idle ones every 15 s / 30 s).
    ("snippets/mcp-locations.conf", "proxy_read_timeout 86400s", "annotation", (A + "proxy-read-timeout", "86400")),
    ("snippets/mcp-locations.conf", "proxy_send_timeout 86400s", "annotation", (A + "proxy-send-timeout", "86400")),
    # /health and /ready (10 s timeouts): kubelet's probes ask the pod itself.
    ("snippets/mcp-locations.conf", "location = /health", "not-routed", ("health",)),
    ("snippets/mcp-locations.conf", "location = /ready", "not-routed", ("ready",)),
    ("nginx.conf", "client_max_body_size 16m", "annotation", (A + "proxy-body-size", "16m")),
    ("nginx.conf", "client_body_buffer_size 1m", "annotation", (A + "client-body-buffer-size", "1m")),
    ("nginx.conf", "tcp_nodelay on", "builtin", ()),
    # gzip is the controller's (use-gzip, off by default); never for text/event-stream.
    ("nginx.conf", "gzip_types application/json", "builtin", ()),
    # No stickiness (sessions are shared through Redis); ingress-nginx has no least_conn.
    ("conf.d/default.conf", "least_conn", "builtin", (A + "upstream-hash-by", A + "affinity")),
    ("conf.d/default.conf", "server mcp-gateway:3000 max_fails=3 fail_timeout=10s", "kubernetes",
     ("readinessProbe takes a failing pod out of the endpoints",)),
    ("conf.d/default.conf", "keepalive 64", "builtin", ()),
    ("conf.d/ssl.conf", "ssl_certificate certs/server.crt", "kubernetes", ("spec.tls[].secretName",)),
    ("conf.d/ssl.conf", "ssl_protocols TLSv1.2 TLSv1.3", "builtin", (A + "ssl-ciphers",)),
]


def nginx_statements(file: str) -> list[str]:
    """The directives of one nginx file, comments dropped, whitespace collapsed, `;` and `{` cut."""
    text = re.sub(r"#.*", "", (NGINX / file).read_text())
    return [" ".join(s.split()) for s in re.split(r"[;{}]", text) if s.strip()]


@pytest.mark.parametrize("file,directive,how,detail", NGINX_TO_INGRESS, ids=[r[1] for r in NGINX_TO_INGRESS])
def test_ingress_does_what_nginx_does(file: str, directive: str, how: str, detail: tuple[str, ...]):
    statements = nginx_statements(file)
    assert any(s == directive or s.startswith(directive + " ") for s in statements), f"{file} no longer says {directive!r}"
    ingress = find("Ingress", "mcpgw")
    annotations = ingress["metadata"].get("annotations", {})
    (rule,) = ingress["spec"]["rules"]
    if how == "annotation":
        assert annotations.get(detail[0]) == detail[1], f"{directive}: {detail[0]} should be {detail[1]!r}"
    elif how == "builtin":
        for key in detail:
            assert key not in annotations, f"{key} would undo ingress-nginx's own {directive!r}"
    elif how == "backend":
        assert {(p["backend"]["service"]["name"], p["backend"]["service"]["port"]["name"]) for p in rule["http"]["paths"]} == {detail}
    elif how == "not-routed":
        assert detail[0] not in {p["path"].strip("/") for p in rule["http"]["paths"]}
    else:
        assert how == "kubernetes", how
        if detail == ("spec.tls[].secretName",):
            assert ingress["spec"]["tls"][0]["secretName"] and ingress["spec"]["tls"][0]["hosts"] == [rule["host"]]
        else:
            assert "readinessProbe" in gateway_container()


def test_the_table_covers_every_proxy_directive():
    """Every directive of the proxy snippet and of `location /`, and every http-level setting that
    touches a request or a stream, has a row above: a directive added to nginx/ needs one."""
    rows = {(file, directive) for file, directive, _, _ in NGINX_TO_INGRESS}
    for statement in nginx_statements("snippets/mcp-proxy.conf"):
        assert ("snippets/mcp-proxy.conf", statement) in rows, f"no row for {statement!r}"
    locations = nginx_statements("snippets/mcp-locations.conf")
    root = locations[locations.index("location /") + 1:]
    for statement in root:
        if statement.startswith("include"):
            continue
        assert ("snippets/mcp-locations.conf", statement) in rows, f"no row for {statement!r}"
    for statement in nginx_statements("nginx.conf"):
        if statement.split()[0] in ("client_max_body_size", "client_body_buffer_size", "tcp_nodelay", "gzip_types", "map"):
            assert ("nginx.conf", statement) in rows or ("nginx.conf", " ".join(statement.split()[:3])) in rows, statement
    # No configuration snippets: ingress-nginx refuses them unless the cluster allows them.
    assert not [k for k in find("Ingress", "mcpgw")["metadata"]["annotations"] if k.endswith("-snippet")]


def test_image_matches_the_gateways_version():
    """Both gateway-image containers run the same image, tagged with the package's version."""
    from mcpgw import __version__

    assert gateway_container()["image"] == exporter_container()["image"] == f"mcpgw:{__version__}"


def test_command_is_the_images_entrypoint():
    """The Deployment spells out the Dockerfile's ENTRYPOINT (the process test runs it)."""
    (entry,) = [args for kw, args in dockerfile_instructions() if kw == "ENTRYPOINT"]
    assert gateway_container()["command"] == json.loads(entry)
    assert exporter_container()["command"] == json.loads(entry)[:3] + ["mcpgw-exporter"] + json.loads(entry)[4:]
    assert mounts(gateway_deployment(), gateway_container())["/etc/mcpgw"]["readOnly"] is True


def test_grace_period_covers_the_drain_and_the_shutdown():
    """terminationGracePeriodSeconds >= the preStop hook's longest wait plus the gateway's shutdown
    budget (children: 2 x stopGrace each, in parallel; then a few Redis operations of redis.timeout),
    which test_drain_and_shutdown_as_kubernetes_does measures against."""
    pod = gateway_deployment()["spec"]["template"]["spec"]
    grace = pod["terminationGracePeriodSeconds"]
    hook = prestop_argv()
    longest = float(hook[hook.index("--max") + 1])
    config = parsed_config(container_env(gateway_container(), fake_secrets()))
    stop_children = 2 * max(s.stopGrace for s in config.servers.values())
    redis_ops = 3 * config.redis.timeout  # the records' removal, the heartbeat's, the connection's close
    assert grace >= longest + shutdown_budget(), (grace, longest)
    assert shutdown_budget() >= stop_children + redis_ops + 5  # and room for the process to exit


def prestop_argv() -> list[str]:
    return gateway_container()["lifecycle"]["preStop"]["exec"]["command"]


def shutdown_budget() -> float:
    """What the grace period leaves the gateway after the preStop hook's longest wait."""
    hook = prestop_argv()
    return gateway_deployment()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] - float(hook[hook.index("--max") + 1])


# -- 3. the Deployment's container, run -------------------------------------------------------


def localize(argv: list[str], paths: dict[str, str]) -> list[str]:
    """An image command as it runs here: this interpreter for python3 and twistd, mount paths mapped."""
    out = []
    for arg in argv:
        for container_path in sorted(paths, key=len, reverse=True):  # the deepest mount holds the path
            if arg == container_path or arg.startswith(container_path + "/"):
                arg = paths[container_path] + arg[len(container_path):]
                break
        out.append(arg)
    if out[0] == "twistd":
        return [*TWISTD, *out[1:]]
    if out[0] in ("python3", "python"):
        return [sys.executable, *out[1:]]
    return out


class Pod:
    """One gateway container, run as the Deployment runs it: its command, its environment (the
    Secret's keys filled with test values), the ConfigMap's files at its mount path.

    What differs, and why: ports are free ones (in gateway.json, as a ConfigMap edit would set
    them), REDIS_URL names the private redis-server (no cluster DNS here), the mount paths are
    temporary directories, and `wrap` may run the command in a private mount namespace (item 4).
    """

    def __init__(self, redis: RedisServer, secret_values: dict[str, str], *, extra_servers: dict[str, Any] | None = None,
                 wrap: Any = None, cwd: str | None = None, root: Path | None = None):
        self.spec = gateway_container()
        self.dir = Path(tempfile.mkdtemp(prefix="mcpgw-pod-", dir=root))
        os.chmod(self.dir, 0o755)  # the pod's uid reads the ConfigMap's files (item 4)
        self.port, self.metrics_port = free_port(), free_port()
        config = config_json()
        config["port"], config["metrics"]["port"] = self.port, self.metrics_port
        config["mcpServers"].update(extra_servers or {})
        self.paths = {}
        for path in mounts(gateway_deployment(), self.spec):
            local = self.dir / path.strip("/").replace("/", "-")
            local.mkdir()
            self.paths[path] = str(local)
        etc = Path(self.paths["/etc/mcpgw"])
        for name, text in config_files().items():
            (etc / name).write_text(json.dumps(config) if name == "gateway.json" else text)
        env = container_env(self.spec, secret_values)
        env["REDIS_URL"] = redis.url
        for name in PROCESS_ENV:
            env[name] = localize([env[name]], self.paths)[0]
        self.env = {"PATH": os.environ["PATH"], **dockerfile_env(), **env}
        self.url = f"http://127.0.0.1:{self.port}"
        self.cwd = cwd or self.paths["/home/mcpgw"]
        argv = localize(self.spec["command"], self.paths)
        self.argv = wrap(argv, self) if wrap else argv
        self.log_path = self.dir / "gateway.log"
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(self.argv, env=self.env, cwd=self.cwd,
                                         stdout=out, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def probe(self, name: str) -> httpx.Response:
        """The container's probe as kubelet sends it (its path and headers, to the container's port)."""
        get = self.spec[name]["httpGet"]
        port = {named_port(self.spec, "http"): self.port, named_port(self.spec, "metrics"): self.metrics_port}[
            named_port(self.spec, get["port"])]
        headers = {h["name"]: h["value"] for h in get.get("httpHeaders", [])}
        return httpx.get(f"http://127.0.0.1:{port}{get['path']}", headers=headers, timeout=self.spec[name].get("timeoutSeconds", 1))

    def wait_started(self) -> None:
        """The startup probe's budget: periodSeconds x failureThreshold."""
        probe = self.spec["startupProbe"]

        def started() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"the gateway exited with {self.proc.returncode}:\n{self.log()}")
            try:
                return self.probe("startupProbe").status_code == 200
            except httpx.TransportError:
                return False

        assert wait_until(started, timeout=probe["periodSeconds"] * probe["failureThreshold"], interval=0.1), self.log()

    def ready(self) -> httpx.Response:
        return self.probe("readinessProbe")

    def prestop(self) -> subprocess.Popen[bytes]:
        """The preStop hook's command, in the container's environment (as kubelet's exec runs it)."""
        return subprocess.Popen(localize(prestop_argv(), self.paths), env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)

    def children(self) -> list[int]:
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.proc.pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


class McpSession:
    """A raw Streamable HTTP client session (MCP 2025-06-18, basic/transports): initialize,
    then requests with Mcp-Session-Id; answers as JSON or as an SSE stream."""

    VERSION = "2025-06-18"

    def __init__(self, url: str, token: str):
        self.url = url
        self.headers = {"Accept": "application/json, text/event-stream", "Authorization": f"Bearer {token}"}
        self.id: str | None = None
        self._next = 0

    def initialize(self, base: str | None = None) -> httpx.Response:
        response = self.post({"jsonrpc": "2.0", "id": self._id(), "method": "initialize", "params": {
            "protocolVersion": self.VERSION, "capabilities": {}, "clientInfo": {"name": "k8s-test", "version": "1"}}},
            base=base, session=False)
        if response.status_code == 200:
            self.id = response.headers["mcp-session-id"]
            self.post({"jsonrpc": "2.0", "method": "notifications/initialized"}, base=base)
        return response

    def call(self, tool: str, arguments: dict[str, Any], base: str | None = None, timeout: float = 30) -> tuple[int, Any]:
        response = self.post({"jsonrpc": "2.0", "id": self._id(), "method": "tools/call",
                              "params": {"name": tool, "arguments": arguments}}, base=base, timeout=timeout)
        return response.status_code, self.result(response)

    def post(self, message: dict[str, Any], base: str | None = None, session: bool = True, timeout: float = 30) -> httpx.Response:
        headers = dict(self.headers)
        if session and self.id:
            headers |= {"Mcp-Session-Id": self.id, "MCP-Protocol-Version": self.VERSION}
        return httpx.post(base or self.url, json=message, headers=headers, timeout=timeout)

    @staticmethod
    def result(response: httpx.Response) -> Any:
        if response.status_code != 200:
            return None
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            for line in response.text.splitlines():
                if line.startswith("data:"):
                    message = json.loads(line[5:])
                    if "result" in message or "error" in message:
                        return message
            return None
        return response.json()

    def _id(self) -> int:
        self._next += 1
        return self._next


def require_redis() -> None:
    if REDIS_SERVER is None:
        pytest.skip("no redis-server binary (.ci/run installs it)")


@pytest.mark.integration
def test_drain_and_shutdown_as_kubernetes_does():
    """A rollout's end of one pod, with a second replica beside it (both on one Redis):

    the probes as kubelet sends them; the preStop hook's drain: /ready 503, a new session refused
    (503), the current session served on its pod and through the other replica, a tool call in
    flight finished before the hook returns; SIGTERM: exit within what terminationGracePeriodSeconds
    leaves after the hook; then the session that pod owned is 404 on the other replica, and the
    client initializes again there (MCP basic/transports, session management: 404 -> new session).
    """
    require_redis()
    secret_values = fake_secrets()
    token = secret_values["MCPGW_AUTH_TOKENS"]
    redis = RedisServer(password=secret_values["REDIS_PASSWORD"])
    # The conformance fixture beside the ConfigMap's server, for a tool call that takes a while.
    fixture = {"fixture": {"command": sys.executable, "args": [str(FIXTURE_SERVER)]}}
    pods: list[Pod] = []
    try:
        pods = [Pod(redis, secret_values, extra_servers=fixture) for _ in range(2)]
        leaving, staying = pods
        for pod in pods:
            pod.wait_started()
        for name in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert leaving.probe(name).status_code == 200, (name, leaving.probe(name).text)

        current = McpSession(leaving.url + "/mcp", token)
        assert current.initialize().status_code == 200
        status, answer = current.call("get_current_time", {"timezone": "UTC"})
        assert status == 200 and json.loads(answer["result"]["content"][0]["text"])["timezone"] == "UTC"

        # A call in flight when the drain starts: the hook waits for it.
        slow = McpSession(leaving.url + "/servers/fixture/mcp", token)
        assert slow.initialize().status_code == 200
        slow_seconds = 8
        slow_result: list[tuple[int, Any, float]] = []
        caller = threading.Thread(target=lambda: slow_result.append(
            (*slow.call("sleep", {"seconds": slow_seconds}, timeout=60), time.monotonic())), daemon=True)
        admin = {"Authorization": f"Bearer {secret_values['MCPGW_ADMIN_TOKEN']}"}

        def in_flight() -> int:
            servers = httpx.get(leaving.url + "/admin/servers", headers=admin, timeout=5).json()["servers"]
            return sum(s["inFlight"] for s in servers)

        caller.start()
        assert wait_until(lambda: in_flight() == 1, timeout=10)

        started = time.monotonic()
        hook = leaving.prestop()
        assert wait_until(lambda: leaving.ready().status_code == 503, timeout=5), leaving.ready().text
        assert "draining" in leaving.ready().json()["problems"]
        assert staying.ready().status_code == 200
        # New sessions are refused here (the endpoints and the ingress send them to other pods) ...
        refused = McpSession(leaving.url + "/mcp", token).initialize()
        assert refused.status_code == 503 and refused.headers.get("retry-after"), refused.text
        # ... the current ones are served, here and through the other replica (routed over Redis).
        for base in (leaving.url + "/mcp", staying.url + "/mcp"):
            status, answer = current.call("get_current_time", {"timezone": "UTC"}, base=base)
            assert status == 200 and "result" in answer, (base, answer)
        hook_out, _ = hook.communicate(timeout=60)
        hook_seconds = time.monotonic() - started
        assert hook.returncode == 0, hook_out
        caller.join(10)
        (status, answer, finished) = slow_result[0]
        assert status == 200 and answer["result"]["content"][0]["text"] == f"slept {slow_seconds}", answer
        hook_args = prestop_argv()
        shortest, longest = (float(hook_args[hook_args.index(k) + 1]) for k in ("--min", "--max"))
        # It waited for the call (past --min), and returned soon after the call ended.
        assert finished - started - 0.5 <= hook_seconds <= finished - started + 3, (hook_seconds, finished - started)
        assert shortest <= hook_seconds < longest

        # SIGTERM, as kubelet sends it after the hook: the gateway ends what is left and exits.
        children = leaving.children()
        assert children, "the sessions' MCP servers run in the pod"
        signalled = time.monotonic()
        leaving.proc.send_signal(signal.SIGTERM)
        leaving.proc.wait(shutdown_budget())
        shutdown_seconds = time.monotonic() - signalled
        grace = gateway_deployment()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert hook_seconds + shutdown_seconds <= grace
        assert leaving.proc.returncode in (0, -signal.SIGTERM), leaving.log()
        assert "Main loop terminated." in leaving.log()
        assert not [pid for pid in children if pid_alive(pid)], "children outlived the pod"
        print(f"preStop {hook_seconds:.1f} s (call in flight: {finished - started:.1f} s), "
              f"shutdown after SIGTERM {shutdown_seconds:.2f} s, grace {grace} s")

        # The session lived on the pod that is gone: 404 on the other replica, then a new session there.
        status, _ = current.call("get_current_time", {"timezone": "UTC"}, base=staying.url + "/mcp")
        assert status == 404
        again = McpSession(staying.url + "/mcp", token)
        assert again.initialize().status_code == 200
        status, answer = again.call("get_current_time", {"timezone": "UTC"})
        assert status == 200 and "result" in answer
    finally:
        for pod in pods:
            pod.stop()
        redis.close()


@pytest.mark.integration
def test_prestop_without_sessions_returns_after_the_minimum():
    """No session, nothing in flight: the hook drains and returns once --min has passed."""
    require_redis()
    secret_values = fake_secrets()
    redis = RedisServer(password=secret_values["REDIS_PASSWORD"])
    pod = None
    try:
        pod = Pod(redis, secret_values)
        pod.wait_started()
        started = time.monotonic()
        hook = pod.prestop()
        out, _ = hook.communicate(timeout=60)
        took = time.monotonic() - started
        args = prestop_argv()
        assert hook.returncode == 0, out
        assert float(args[args.index("--min") + 1]) <= took < float(args[args.index("--min") + 1]) + 3
        assert pod.ready().status_code == 503
    finally:
        if pod is not None:
            pod.stop()
        redis.close()


# -- 4. the image's user, and a read-only root filesystem -----------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile's last stage and before: comments dropped, lines joined."""
    out: list[tuple[str, str]] = []
    current = ""
    for raw in DOCKERFILE.read_text().splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not current):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        keyword, _, args = current.strip().partition(" ")
        out.append((keyword.upper(), args.strip()))
        current = ""
    return out


def runtime_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (kw, _) in enumerate(instructions) if kw == "FROM")
    return instructions[last_from:]


def dockerfile_env() -> dict[str, str]:
    """The runtime stage's ENV (KEY=VALUE pairs)."""
    env = {}
    for kw, args in runtime_stage():
        if kw == "ENV":
            for pair in shlex.split(args):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def image_user() -> dict[str, Any]:
    """The user the image runs as: USER, and the uid, gid and home useradd/groupadd gave it."""
    stage = runtime_stage()
    (user,) = [args for kw, args in stage if kw == "USER"]
    run = " ".join(args for kw, args in stage if kw == "RUN")
    useradd = re.search(r"useradd\s+(.*?)(?:&&|$)", run)
    groupadd = re.search(r"groupadd\s+(.*?)(?:&&|$)", run)
    assert useradd and groupadd, "the runtime stage creates no user"
    user_args, group_args = shlex.split(useradd.group(1)), shlex.split(groupadd.group(1))
    workdir = [args for kw, args in stage if kw == "WORKDIR"][-1]
    return {
        "USER": user,
        "name": user_args[-1],
        "uid": int(user_args[user_args.index("--uid") + 1]),
        "gid": int(group_args[group_args.index("--gid") + 1]),
        "group": group_args[-1],
        "home": user_args[user_args.index("--home-dir") + 1],
        "workdir": workdir,
    }


@pytest.mark.parametrize("workload", ["mcpgw", "mcpgw-exporter"])
def test_pods_run_as_the_images_user(workload: str):
    """The Dockerfile creates `mcpgw` with the uid and gid the manifests name, and USER is that
    uid numerically (Kubernetes' runAsNonRoot can only check a numeric USER)."""
    user = image_user()
    assert user["USER"] == f"{user['uid']}:{user['gid']}"
    assert user["uid"] != 0 and user["gid"] != 0 and user["name"] == "mcpgw"
    context = find("Deployment", workload)["spec"]["template"]["spec"]["securityContext"]
    assert (context["runAsUser"], context["runAsGroup"], context["fsGroup"]) == (user["uid"], user["gid"], user["gid"])
    assert context["runAsNonRoot"] is True


def test_writable_paths_are_the_emptydirs_home_and_tmp():
    """With a read-only root filesystem the gateway writes only to its emptyDir mounts: TMPDIR and
    HOME (the image's home and WORKDIR) are exactly those."""
    user = image_user()
    writable = writable_mounts(gateway_deployment(), gateway_container())
    assert writable == {"/tmp", user["home"]}
    for path, mount in mounts(gateway_deployment(), gateway_container()).items():
        if path in writable:
            assert "emptyDir" in mount["volume"] and mount["volume"]["emptyDir"]["sizeLimit"]
    env = container_env(gateway_container(), fake_secrets())
    assert env["HOME"] == user["home"] == user["workdir"] and env["TMPDIR"] == "/tmp"


def read_only_root(argv: list[str], pod: Pod) -> list[str]:
    """``argv`` in a private mount namespace whose root filesystem is read-only, with a fresh tmpfs
    at each writable mount (the emptyDirs), run as the manifest's uid and gid."""
    context = gateway_deployment()["spec"]["template"]["spec"]["securityContext"]
    writable = writable_mounts(gateway_deployment(), pod.spec)
    # The namespace's own copy of the root mount, read-only (no stacked bind: setns(2), as nsenter
    # uses it below, would land on the top-most mount of / rather than on the process's root).
    script = ["mount -o remount,bind,ro /", *interpreter_visible(pod)]
    for path in sorted(writable):
        script.append(f"mount -t tmpfs -o mode=1777,size=64m tmpfs {shlex.quote(pod.paths[path])}")
    # Into the working directory again: one entered before the mounts would still be writable.
    script.append(f"cd {shlex.quote(pod.cwd)}")
    script.append("exec setpriv --reuid={} --regid={} --clear-groups -- {}".format(
        context["runAsUser"], context["runAsGroup"], shlex.join(argv)))
    return ["unshare", "--mount", "--propagation", "private", "sh", "-ec", "; ".join(script)]


def interpreter_visible(pod: Pod) -> list[str]:
    """Mount commands that let the pod's uid run this interpreter when it lives under a directory
    only root may enter (pyenv under /root here; the image's is /usr/local/bin): a read-only tmpfs
    over that directory, with the interpreter's prefix bound back into it, read-only."""
    prefix = os.path.realpath(sys.base_prefix)
    closed = next((str(p) for p in reversed(Path(prefix).parents) if p != Path("/") and not os.stat(p).st_mode & 0o001), None)
    if closed is None:
        return []
    stash = pod.dir / "interpreter"
    stash.mkdir()
    q = shlex.quote
    return [f"mount --bind {q(prefix)} {q(str(stash))}", f"mount -t tmpfs -o mode=755,size=1m tmpfs {q(closed)}",
            f"mkdir -p {q(prefix)}", f"mount --bind {q(str(stash))} {q(prefix)}", f"mount -o remount,bind,ro {q(prefix)}",
            f"mount -o remount,ro {q(closed)}"]


def writable_paths(pod: Pod) -> set[str]:
    return {pod.paths[path] for path in writable_mounts(gateway_deployment(), pod.spec)}


def writable_in(pid: int, directory: str) -> bool:
    """Whether a file can be created in ``directory`` as the process ``pid`` sees the filesystem."""
    probe = os.path.join(directory, ".mcpgw-write-probe")
    ran = subprocess.run(["nsenter", "--target", str(pid), "--mount", "--", "sh", "-c",
                          f"touch {shlex.quote(probe)} && rm {shlex.quote(probe)}"], capture_output=True, text=True)
    return ran.returncode == 0


def can_unshare_mounts() -> bool:
    if not (shutil.which("unshare") and shutil.which("setpriv") and shutil.which("nsenter")):
        return False
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-ec",
                            "mount -o remount,bind,ro / && ! touch /.mcpgw-ro-probe 2>/dev/null"],
                           capture_output=True)
    return probe.returncode == 0


def anon_kib(pid: int) -> int:
    """Anonymous resident memory (RssAnon): what a process costs the pod's memory cgroup beyond shared files."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))


@pytest.mark.integration
def test_gateway_serves_with_a_read_only_root_filesystem():
    """The Deployment's command as the manifest's uid, root filesystem read-only, only the emptyDir
    mounts (HOME, TMPDIR) writable, the working directory read-only: /ready, then the official SDK
    client's tools/call to the ConfigMap's server through Streamable HTTP. Also measures the memory
    the memory limit is sized by (docs/deploy.md): the gateway's and one session's child's."""
    require_redis()
    if not can_unshare_mounts():
        pytest.skip("no private mount namespaces here (unshare -m needs CAP_SYS_ADMIN)")
    import anyio
    from mcp.client.client import Client
    from mcp.client.streamable_http import streamable_http_client

    secret_values = fake_secrets()
    redis = RedisServer(password=secret_values["REDIS_PASSWORD"])
    # Under /tmp, readable by the pod's uid; read-only inside the namespace like everything else.
    workdir = Path(tempfile.mkdtemp(prefix="mcpgw-ro-"))
    os.chmod(workdir, 0o755)
    pod = None
    try:
        pod = Pod(redis, secret_values, wrap=read_only_root, cwd=str(workdir), root=workdir)
        pod.wait_started()
        assert pod.ready().status_code == 200, pod.ready().text

        async def call() -> Any:
            headers = {"Authorization": f"Bearer {secret_values['MCPGW_AUTH_TOKENS']}"}
            http = httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(30.0))
            async with http, Client(streamable_http_client(pod.url + "/mcp", http_client=http)) as client:
                result = await client.call_tool("get_current_time", {"timezone": "UTC"})
                children = pod.children()
                return result, children, [anon_kib(pid) for pid in children]

        result, children, child_kib = anyio.run(call)
        assert not result.is_error and json.loads(result.content[0].text)["timezone"] == "UTC"
        # The process really is the manifest's user, in a namespace where / is read-only.
        with open(f"/proc/{pod.proc.pid}/status") as f:
            uids = next(line.split()[1:] for line in f if line.startswith("Uid:"))
        assert set(uids) == {str(gateway_deployment()["spec"]["template"]["spec"]["securityContext"]["runAsUser"])}
        # In the gateway's mount namespace: only the emptyDir mounts take a write.
        assert os.readlink(f"/proc/{pod.proc.pid}/cwd") == str(workdir)
        local = {pod.paths[path]: path for path in pod.paths}
        checked = {**{d: d in writable_paths(pod) for d in local}, str(workdir): False, "/": False,
                   os.path.dirname(sys.executable): False}
        assert {d: writable_in(pod.proc.pid, d) for d in checked} == checked
        assert "Unable to write" not in pod.log() and "Read-only file system" not in pod.log(), pod.log()
        check_memory_limit(anon_kib(pod.proc.pid), max(child_kib))
    finally:
        if pod is not None:
            pod.stop()
        redis.close()
        shutil.rmtree(workdir, ignore_errors=True)


#: Heap glibc keeps after large messages (mcpgw.upstream.stdio.tune_allocator: M_TRIM_THRESHOLD
#: 64 MiB, docs/performance.md). An idle stream costs the gateway 12.8 KiB (docs/performance.md):
#: negligible beside a session's child, so it is not counted apart.
RETAINED_HEAP_KIB = 64 * 1024


def memory_limit_kib() -> int:
    value = gateway_container()["resources"]["limits"]["memory"]
    number, unit = re.fullmatch(r"(\d+)(Mi|Gi)", value).groups()
    return int(number) * {"Mi": 1024, "Gi": 1024 * 1024}[unit]


def check_memory_limit(gateway_kib: int, child_kib: int) -> None:
    """The pod's memory limit holds the gateway (as measured, plus the heap it may keep) and
    limits.maxSessions sessions, each its child (as measured) and its SSE replay buffer at most."""
    config = parsed_config(container_env(gateway_container(), fake_secrets()))
    sessions = config.limits.maxSessions
    replay_kib = getattr(config.sse, "replayBytes", 4 * 1024 * 1024) // 1024
    needed = gateway_kib + RETAINED_HEAP_KIB + sessions * (child_kib + replay_kib)
    print(f"gateway {gateway_kib / 1024:.0f} MiB, one child {child_kib / 1024:.0f} MiB, replay {replay_kib / 1024:.0f} MiB "
          f"per session; {sessions} sessions need {needed / 1024:.0f} MiB of {memory_limit_kib() / 1024:.0f} MiB")
    assert needed <= memory_limit_kib()
    # Request = limit: the scheduler places a pod where its whole limit fits.
    assert gateway_container()["resources"]["requests"]["memory"] == gateway_container()["resources"]["limits"]["memory"]
