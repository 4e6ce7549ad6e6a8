"""deploy/prometheus/: promtool checks the config and rules and runs the rules' unit tests."""

import subprocess

import yaml

from tests.deploy.helpers import PROMETHEUS_DIR, RULE_FILES, alert_rules, recording_rules, tool

ISSUE_ALERTS = {"DSparkUserTokensPerSecondBelowSLA", "DSparkWaitingQueueGrowing",
                "DSparkKVCacheNearlyFull", "DSparkHighErrorRatio", "DSparkTargetDown"}


def promtool(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([tool("promtool"), *args], check=False, cwd=PROMETHEUS_DIR,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}{result.stderr}"
    return result


def test_check_config_finds_every_rule_file():
    out = promtool("check", "config", "prometheus.yml").stdout
    assert f"SUCCESS: {len(RULE_FILES)} rule files found" in out, out


def test_check_rules():
    promtool("check", "rules", *[str(p) for p in RULE_FILES])


def test_rule_unit_tests_pass():
    tests = sorted(str(p) for p in (PROMETHEUS_DIR / "tests").glob("*.yml"))
    assert tests
    promtool("test", "rules", *tests)


def test_issue_alerts_exist_with_severity_and_summary():
    assert set(alert_rules()) >= ISSUE_ALERTS
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if "alert" in rule:
                    assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
                    assert rule["annotations"]["summary"], rule["alert"]


def test_rule_names_cannot_be_taken_for_server_metrics():
    # The server's metrics are `dspark:*`; recorded series are `level:metric:operation`.
    for record in recording_rules():
        assert not record.startswith("dspark:"), record
        assert record.count(":") == 2, record
