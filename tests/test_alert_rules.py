"""The shipped Prometheus alert rules: valid, and firing exactly when alerts_test.yml says
(``promtool test rules``); the example Prometheus config is valid too."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml
from servers.prometheus import PROMTOOL

CONFIG = Path(__file__).resolve().parents[1] / "config" / "prometheus"

pytestmark = [
    pytest.mark.prometheus,
    pytest.mark.skipif(
        PROMTOOL is None, reason="promtool is not installed (Debian package: prometheus)"
    ),
]


def promtool(*args: str) -> str:
    assert PROMTOOL is not None
    proc = subprocess.run(
        [PROMTOOL, *args], cwd=CONFIG, capture_output=True, text=True, timeout=120
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    return out


def test_rules_are_valid() -> None:
    out = promtool("check", "rules", "alerts.yml")
    assert "SUCCESS: 9 rules found" in out


def test_rules_fire_as_specified() -> None:
    assert "SUCCESS" in promtool("test", "rules", "alerts_test.yml")


def test_example_prometheus_config_is_valid() -> None:
    promtool("check", "config", "prometheus.yml")


def test_every_alert_is_tested_and_documented() -> None:
    rules = [
        r for g in yaml.safe_load((CONFIG / "alerts.yml").read_text())["groups"] for r in g["rules"]
    ]
    tests = yaml.safe_load((CONFIG / "alerts_test.yml").read_text())["tests"]
    fired: set[str] = set()
    quiet: set[str] = set()
    for case in tests:
        for check in case["alert_rule_test"]:
            (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {r["alert"] for r in rules}
    assert names == fired, "every alert has a test where it fires"
    assert names == quiet, "every alert has a test where it does not fire"
    for r in rules:
        assert r["labels"]["severity"] in ("warning", "critical"), r["alert"]
        assert r["annotations"]["summary"] and r["annotations"]["description"], r["alert"]
