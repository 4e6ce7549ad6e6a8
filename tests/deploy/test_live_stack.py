"""The monitoring stack for real: `dspark serve` with the default model, a Prometheus (the Debian
package's binary) scraping it every second with deploy/prometheus's config and rules, a little
traffic, then every recording rule, alert and dashboard query through Prometheus' HTTP API."""

import math
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

from server.process import ServerProcess
from tests.deploy.helpers import (
    PROMETHEUS_DIR,
    alert_rules,
    dashboards,
    free_port,
    missing_metrics,
    panel_targets,
    recording_rules,
    to_promql,
    tool,
    variable_queries,
)
from tests.deploy.test_metric_names import exported_names
from tests.server.helpers import parse_sse

pytestmark = pytest.mark.slow

# Panels that must show data once requests have finished (all of their queries).
NONEMPTY_PANELS = {"Per-user tokens/s (p50)", "Per-user tokens/s (p50, p90)",
                   "Generation throughput", "Aggregate throughput",
                   "Time to first token (p50)", "Time to first token"}
NUM_CLIENTS = 4
MAX_TOKENS = 16
RATE_WINDOW = "60s"  # stands in for Grafana's $__rate_interval: covers the whole traffic phase


class Prometheus:
    """`prometheus` on a loopback port with deploy/prometheus/prometheus.yml, rewritten to scrape
    `target` every second and to load the rule files from this checkout."""

    def __init__(self, target: str, workdir: Path) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
        config["global"].update(scrape_interval="1s", scrape_timeout="1s",
                                evaluation_interval="1s")
        config["rule_files"] = [str(PROMETHEUS_DIR / f) for f in config["rule_files"]]
        targets = {"dspark": target, "prometheus": f"127.0.0.1:{port}"}
        for job in config["scrape_configs"]:
            job["static_configs"] = [{"targets": [targets[job["job_name"]]]}]
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log_path = workdir / "prometheus.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - written by the child until stop()
        self.proc = subprocess.Popen(
            [tool("prometheus"), f"--config.file={workdir / 'prometheus.yml'}",
             f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
            stdout=self._log, stderr=subprocess.STDOUT)
        self.client = httpx.Client(base_url=self.url, timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_until(self, what: str, predicate, timeout: float = 60) -> None:
        """Poll `predicate()` (errors count as False) every 0.25 s until it is true."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"prometheus exited:\n{self.log()}"
            try:
                if predicate():
                    return
            except (httpx.TransportError, KeyError, IndexError, ValueError):
                pass
            time.sleep(0.25)
        raise TimeoutError(f"prometheus: {what} not within {timeout} s\n{self.log()[-3000:]}")

    def query(self, promql: str) -> dict:
        """The JSON answer of an instant query (status "success" or "error")."""
        return self.client.post("/api/v1/query", data={"query": promql}).json()

    def value(self, promql: str) -> float:
        (sample,) = self.query(promql)["data"]["result"]
        return float(sample["value"][1])

    def stop(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("deploy-server") / "server.log"
    proc = ServerProcess(["--device", "cpu", "--kv-cache-bytes", str(256 << 20),
                          "--max-num-seqs", "16"], log)
    try:
        proc.wait_healthy(timeout=300)
        # /v1/models answers once the model is loaded and its metrics are labelled.
        deadline = time.monotonic() + 300
        while httpx.get(f"{proc.url}/v1/models", timeout=10).status_code != 200:
            assert proc.proc.poll() is None and time.monotonic() < deadline, \
                f"the model did not load:\n{proc.log()}"
            time.sleep(0.2)
        yield proc
    finally:
        proc.terminate()


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory) -> Iterator[Prometheus]:
    tool("prometheus")
    prom = Prometheus(server.url.removeprefix("http://"), tmp_path_factory.mktemp("prometheus"))
    try:
        prom.wait_until("ready", lambda: prom.client.get("/-/ready").status_code == 200)
        prom.wait_until("the dspark target up", lambda: prom.value('up{job="dspark"}') == 1)
        yield prom
    finally:
        prom.stop()


def chat(url: str, model: str, i: int, stream: bool) -> None:
    body = {"model": model, "max_tokens": MAX_TOKENS, "stream": stream, "temperature": 0,
            "messages": [{"role": "user", "content": f"Count from {i} to {i + 40}."}]}
    with httpx.Client(base_url=url, timeout=300) as client:
        if not stream:
            r = client.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] > 1
            return
        with client.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200, r.read()
            events, done = parse_sse(list(r.iter_lines()))
            assert done and len(events) > 2


@pytest.fixture(scope="module")
def traffic(server, prometheus) -> str:
    """2 * NUM_CLIENTS requests, half of them streamed, NUM_CLIENTS at a time; then wait until
    Prometheus has scraped them all and evaluated the rules on them. Returns the model name."""
    model = httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"][0]["id"]
    with ThreadPoolExecutor(NUM_CLIENTS) as pool:
        jobs = [pool.submit(chat, server.url, model, i, stream=i % 2 == 0)
                for i in range(2 * NUM_CLIENTS)]
        for job in jobs:
            job.result()
    n = 2 * NUM_CLIENTS
    prometheus.wait_until(f"{n} finished requests scraped",
                          lambda: prometheus.value("sum(dspark:request_success_total)") == n)
    prometheus.wait_until("the throughput rule evaluated on them", lambda: prometheus.value(
        "sum(model_name:dspark_generation_tokens:rate1m)") > 0)
    return model


def test_live_metrics_cover_dashboards_and_rules(server):
    exported = exported_names(httpx.get(f"{server.url}/metrics", timeout=10).text)
    problems = missing_metrics(exported)
    assert not problems, "\n".join(problems)


def test_rules_load_and_evaluate(prometheus, traffic):
    groups = prometheus.client.get("/api/v1/rules").json()["data"]["groups"]
    loaded = {r["name"]: r for g in groups for r in g["rules"]}
    assert set(loaded) == set(recording_rules()) | set(alert_rules())
    for name, rule in loaded.items():
        assert rule["health"] == "ok", (name, rule.get("lastError"))
    failures = []
    for name, expr in {**recording_rules(), **alert_rules()}.items():
        answer = prometheus.query(expr)
        if answer["status"] != "success":
            failures.append(f"{name}: {answer.get('error')}")
    assert not failures, "\n".join(failures)
    # What the rules recorded from the traffic.
    for record in ("model_name:dspark_request_output_tokens_per_second:p50_1m",
                   "model_name:dspark_request_output_tokens_per_second:p90_1m",
                   "model_name:dspark_generation_tokens:rate1m"):
        value = prometheus.value(f'{record}{{model_name="{traffic}"}}')
        assert math.isfinite(value) and value > 0, (record, value)
    assert prometheus.value("dspark_sla:user_output_tokens_per_second:p50_min") > 0


def test_every_dashboard_query_runs(prometheus, traffic):
    failures, empty = [], []
    for file, dashboard in dashboards().items():
        for title, ref, expr in panel_targets(dashboard):
            where = f"{file}: {title!r} {ref}"
            answer = prometheus.query(to_promql(expr, model_name=traffic, interval=RATE_WINDOW))
            if answer["status"] != "success":
                failures.append(f"{where}: {answer.get('error')}")
            elif title in NONEMPTY_PANELS:
                values = [float(s["value"][1]) for s in answer["data"]["result"]]
                if not any(math.isfinite(v) for v in values):
                    empty.append(f"{where}: {values}\n  {expr}")
    assert not failures, "queries Prometheus rejects:\n" + "\n".join(failures)
    assert not empty, "panels without data after traffic:\n" + "\n".join(empty)
    titles = {title for d in dashboards().values() for title, _, _ in panel_targets(d)}
    assert NONEMPTY_PANELS <= titles


def test_model_variable_lists_the_served_model(prometheus, traffic):
    for dashboard in dashboards().values():
        for selector, label in variable_queries(dashboard).values():
            params = {"match[]": selector} if selector else {}
            values = prometheus.client.get(f"/api/v1/label/{label}/values", params=params).json()
            assert values["status"] == "success" and traffic in values["data"], values
