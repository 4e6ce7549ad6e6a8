"""Every metric the dashboards and rules use is one the server exports (or is listed in
PENDING_METRICS). Checked here against the server's metrics registry, and against a live
/metrics in tests/deploy/test_live_stack.py."""

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.helpers import PENDING_METRICS, metric_names, missing_metrics, used_metric_names


def exported_names(metrics_text: str) -> set[str]:
    return {s.name for family in text_string_to_metric_families(metrics_text)
            for s in family.samples}


def test_registry_exports_every_used_metric():
    from server.metrics import Metrics

    metrics = Metrics()
    metrics.bind_model("m")
    exported = exported_names(generate_latest(metrics.registry).decode())
    assert not missing_metrics(exported), "\n".join(missing_metrics(exported))


def test_pending_metrics_are_used_and_few():
    used = used_metric_names()
    for base in PENDING_METRICS:
        assert any(name.startswith(base) for name in used), f"{base} is pending but unused"
    assert len(PENDING_METRICS) <= 3


def test_metric_names_parser():
    expr = ('histogram_quantile(0.9, sum by (model_name, le) (rate(a:b_bucket{x=~"$v|y:z"}[5m])))'
            ' / on () group_left () ignoring(q) sla:c:d and up{job="dspark"} offset 1m > bool 0')
    assert metric_names(expr) == {"a:b_bucket", "sla:c:d", "up"}
