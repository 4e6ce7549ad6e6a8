"""deploy/kubernetes/: every built-in resource validates offline against the Kubernetes API's own
schemas (kubernetes-validate, strict: unknown fields fail), and the manifests agree with each
other and with the server (labels and selectors, ports, probe paths, drain timing, the metric the
autoscaler scales on)."""

import re

import pytest
import yaml
from prometheus_client import generate_latest

from tests.deploy.helpers import DEPLOY
from tests.deploy.test_metric_names import exported_names

kubernetes_validate = pytest.importorskip("kubernetes_validate")

K8S = DEPLOY / "kubernetes"
MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name != "prometheus-adapter-values.yaml")
# the oldest release the manifests target (the preStop `sleep` action is on by default from 1.30)
# and the newest the validator knows
VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
CRD_KINDS = {"ServiceMonitor"}  # the Prometheus Operator's: no schema in the Kubernetes API
# (test_service_monitor_scrapes_the_server checks it)


def resources() -> list[dict]:
    return [doc for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]


def one(kind: str, name: str) -> dict:
    (found,) = [r for r in resources() if r["kind"] == kind and r["metadata"]["name"] == name]
    return found


def container(deployment: dict) -> dict:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("resource", [r for r in resources() if r["kind"] not in CRD_KINDS],
                         ids=lambda r: f"{r['kind']}/{r['metadata']['name']}")
def test_resource_validates_against_the_api_schema(resource, version):
    kubernetes_validate.validate(resource, version, strict=True)


def test_every_manifest_kind_is_checked():
    """A kind without an API schema is a CRD this file checks by hand."""
    kinds = {r["kind"] for r in resources()}
    assert kinds & CRD_KINDS == CRD_KINDS
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"} <= kinds


def test_validator_rejects_a_broken_resource():
    """The schema check above can fail: a misspelt field and a wrong type are both caught."""
    bad = one("Deployment", "dspark-serve")
    bad = yaml.safe_load(yaml.safe_dump(bad))
    bad["spec"]["replica"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, VERSIONS[-1], strict=True)
    bad = yaml.safe_load(yaml.safe_dump(one("Service", "dspark-serve")))
    bad["spec"]["ports"][0]["port"] = "eight thousand"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, VERSIONS[-1], strict=True)


def test_server_deployment_probes_drain_and_gpu():
    deployment = one("Deployment", "dspark-serve")
    pod = deployment["spec"]["template"]["spec"]
    c = container(deployment)
    assert deployment["spec"]["selector"]["matchLabels"].items() <= deployment["spec"]["template"][
        "metadata"]["labels"].items()
    (port,) = c["ports"]
    assert port["containerPort"] == 8000 and c["args"][-2:] == ["--port", "8000"]
    # readiness is "can take traffic": the server's /health (503 while loading or draining)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": port["name"]}, probe
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    # the grace period covers the preStop pause and the whole drain
    env = {e["name"]: e.get("value") for e in c["env"]}
    drain = float(env["DSPARK_DRAIN_TIMEOUT"])
    pause = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > pause + drain
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 10001


@pytest.mark.parametrize("name", ["dspark-serve", "dspark-router"])
def test_services_select_their_pods_by_port_name(name):
    service = one("Service", name)
    labels = one("Deployment", name)["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    names = {p["name"] for p in container(one("Deployment", name))["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= names


def test_router_discovers_the_server_pods():
    router = one("Deployment", "dspark-router")
    args = container(router)["args"]
    selector_args = args[args.index("--selector") + 1:]
    selector_args = selector_args[:next((i for i, a in enumerate(selector_args) if a.startswith("--")),
                                        len(selector_args))]
    selector = dict(a.split("=", 1) for a in selector_args)
    server_labels = one("Deployment", "dspark-serve")["spec"]["template"]["metadata"]["labels"]
    router_labels = router["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= server_labels.items()
    assert not selector.items() <= router_labels.items()  # it must not route to itself
    assert args[args.index("--service-discovery-port") + 1] == "8000"
    assert args[args.index("--health-check-endpoint") + 1] == "/health"
    # $(POD_NAMESPACE) is expanded by Kubernetes from the container's env
    assert "$(POD_NAMESPACE)" in args and "POD_NAMESPACE" in {e["name"] for e in container(router)["env"]}
    # it may read pods, and is bound to the account it runs as
    role, binding = one("Role", "dspark-router"), one("RoleBinding", "dspark-router")
    (rule,) = role["rules"]
    assert rule["resources"] == ["pods"] and {"list", "watch"} <= set(rule["verbs"])
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"][0]["name"] == router["spec"]["template"]["spec"]["serviceAccountName"]
    assert image_version(container(router)["image"]) == router_version()


def image_version(image: str) -> str:
    return image.rsplit(":", 1)[1]


def router_version() -> str:
    text = (DEPLOY.parent / "docker" / "Dockerfile.router").read_text()
    found = re.search(r"^ARG SGLANG_ROUTER_VERSION=(\S+)$", text, re.MULTILINE)
    assert found
    return found.group(1)


def test_autoscaler_scales_the_server_on_a_metric_it_exports():
    hpa = one("HorizontalPodAutoscaler", "dspark-serve")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": "dspark-serve"}
    (metric,) = hpa["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    (rule,) = yaml.safe_load((K8S / "prometheus-adapter-values.yaml").read_text())["rules"]["custom"]
    assert rule["name"]["as"] == name
    series = re.match(r"^([\w:]+)\{", rule["seriesQuery"]).group(1)
    assert re.fullmatch(rule["name"]["matches"], series)

    from server.metrics import Metrics

    metrics = Metrics()
    metrics.bind_model("m")
    assert series in exported_names(generate_latest(metrics.registry).decode())
    assert hpa["spec"]["minReplicas"] >= one("PodDisruptionBudget", "dspark-serve")["spec"]["maxUnavailable"] + 1


def test_service_monitor_scrapes_the_server():
    monitor = one("ServiceMonitor", "dspark-serve")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    service = one("Service", "dspark-serve")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme", "honorLabels"}
