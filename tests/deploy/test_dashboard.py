"""deploy/grafana/: the dashboard is Grafana 10+ JSON that imports anywhere (data source picked by
a variable, nothing instance-specific), has the panels the issue lists, and every PromQL
expression in it parses (promtool; tests/deploy/test_live_stack.py runs them on real data)."""

import json
import re
import subprocess

import pytest
import yaml

from tests.deploy.helpers import (
    DASHBOARD_FILES,
    dashboards,
    metric_names,
    panel_targets,
    panels,
    to_promql,
    tool,
    variable_queries,
)

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
ISSUE_PANELS = [  # the issue's list, by title
    "Per-user tokens/s (p50, p90)", "Aggregate throughput", "Time to first token",
    "Inter-token latency", "Running and waiting requests", "KV cache usage", "Acceptance length",
    "Verify budget per request vs running requests", "Draft vs verify time per step",
    "Error rate",
]
BUILTIN_PANEL_TYPES = {"timeseries", "stat", "gauge", "table", "bargauge", "text", "row"}

pytestmark = pytest.mark.parametrize("name", [p.name for p in DASHBOARD_FILES])


def test_grafana_10_format(name):
    d = dashboards()[name]
    assert d["schemaVersion"] >= 38  # Grafana 10.0 writes 38, 10.4 and 11 write 39+
    assert d["id"] is None and re.fullmatch(r"[a-z0-9-]{1,40}", d["uid"]) and d["title"]
    assert "__inputs" not in d  # provisioning has no import step to fill them in
    ids = [p["id"] for p in d["panels"]] + [p["id"] for r in d["panels"] for p in r.get("panels", [])]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for panel in d["panels"]:
        assert panel["type"] in BUILTIN_PANEL_TYPES, panel["type"]  # no plugin to install
        grid = panel["gridPos"]
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]


def test_data_source_is_a_variable(name):
    d = dashboards()[name]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    assert variables["model_name"]["datasource"] == DATASOURCE
    assert variable_queries(d)["model_name"] == ("dspark:num_requests_running", "model_name")
    for panel in panels(d):
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, (panel["title"], target["refId"])
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]


def test_nothing_instance_specific(name):
    text = (DASHBOARD_FILES[0].parent / name).read_text()
    for word in ("localhost", "127.0.0.1", "${DS_", "instance=", "instance!", "dspark:8000",
                 "SmolLM2"):
        assert word not in text, word
    for title, ref, expr in panel_targets(dashboards()[name]):
        # Every selector of a server metric follows the model variable.
        for selector in re.findall(r"dspark:\w+(\{[^}]*\})?", expr):
            assert 'model_name=~"$model_name"' in selector, (title, ref, expr)


def test_has_the_issue_panels(name):
    titles = [p["title"] for p in panels(dashboards()[name])]
    for title in ISSUE_PANELS:
        assert title in titles, title
    # Fig. 8: the verify budget per request plotted with the number of running requests.
    (fig8,) = [p for p in panels(dashboards()[name]) if p["title"] == ISSUE_PANELS[7]]
    used = set().union(*(metric_names(t["expr"]) for t in fig8["targets"]))
    assert {"dspark:spec_decode_verify_tokens_per_request_sum",
            "dspark:num_requests_running"} <= used


def test_every_expression_parses(name, tmp_path):
    """Each panel query becomes a recording rule, so `promtool check rules` parses it."""
    targets = panel_targets(dashboards()[name])
    rules = [{"record": f"dashboard_check:panel:{i}", "expr": to_promql(expr)}
             for i, (_, _, expr) in enumerate(targets)]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([tool("promtool"), "check", "rules", str(path)], check=False,
                            capture_output=True, text=True, timeout=60)
    index = "\n".join(f"  dashboard_check:panel:{i} = {title!r} {ref}"
                      for i, (title, ref, _) in enumerate(targets))
    assert result.returncode == 0, f"{result.stdout}{result.stderr}where\n{index}"
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def test_json_is_canonical(name):
    """2-space indent and a final newline, so diffs of hand edits and UI exports stay small."""
    text = (DASHBOARD_FILES[0].parent / name).read_text()
    assert text == json.dumps(json.loads(text), indent=2) + "\n"
