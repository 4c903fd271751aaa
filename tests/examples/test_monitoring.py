"""examples/monitoring: the Grafana dashboard and the Prometheus alert rules parse, and every
metric they name is one falhook exports; `promtool check rules` passes where installed."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from falhook.receiver.metrics import Metrics
from falhook.receiver.models import State

MONITORING = Path(__file__).resolve().parents[2] / "examples" / "monitoring"
DASHBOARD = MONITORING / "grafana-dashboard.json"
ALERTS = MONITORING / "prometheus-alerts.yml"
_METRIC = re.compile(r"\bfalhook_[a-z0-9_]+")
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def exported_series() -> set[str]:
    """Every series name falhook's registry exposes (counters with _total, histograms'
    _bucket/_sum/_count), the store gauges included."""
    metrics = Metrics()
    metrics.watch_store(lambda: dict.fromkeys(State, 0), lambda: 0.0, lambda: (0, 0))
    names: set[str] = set()
    for family in metrics.registry.collect():
        names.update(family.name + suffix for suffix in _SUFFIXES[family.type])
    return names


def dashboard_exprs() -> list[str]:
    document = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in document["panels"] for t in p.get("targets", [])]
    assert exprs and all(isinstance(e, str) and e for e in exprs)
    return exprs


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text())
    rules: list[dict[str, Any]] = [r for g in document["groups"] for r in g["rules"]]
    assert rules
    return rules


def test_the_registry_is_what_the_check_reads() -> None:
    names = exported_series()
    assert {"falhook_deliveries", "falhook_callback_outcomes_total"} <= names
    assert "falhook_ack_latency_seconds_bucket" in names and "falhook_dispatch_paused" in names


def test_dashboard_names_only_exported_metrics() -> None:
    exported = exported_series()
    named = {m for e in dashboard_exprs() for m in _METRIC.findall(e)}
    assert named - exported == set()
    # What an operator looks at first, all there.
    for needed in (
        "falhook_deliveries",
        "falhook_oldest_pending_age_seconds",
        "falhook_deliveries_received_total",
        "falhook_jwks_fetch_failures_total",
        "falhook_ack_latency_seconds_bucket",
        "falhook_dispatch_paused",
    ):
        assert needed in named, needed
    document = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in document["panels"]]
    assert len(ids) == len(set(ids))


def test_alert_rules_name_only_exported_metrics() -> None:
    exported = exported_series()
    rules = alert_rules()
    for rule in rules:
        assert {"alert", "expr", "labels", "annotations"} <= set(rule), rule
        named = set(_METRIC.findall(rule["expr"]))
        assert named and named <= exported, (rule["alert"], named - exported)
    alerts = {r["alert"] for r in rules}
    assert {
        "FalhookDeliveriesDead",
        "FalhookOldestPendingTooOld",
        "FalhookRejectionSpike",
        "FalhookJwksFetchFailing",
        "FalhookAckLatencyHigh",
    } <= alerts


def test_promtool_checks_the_rules() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package prometheus): rules not checked")
    result = subprocess.run(
        [promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
