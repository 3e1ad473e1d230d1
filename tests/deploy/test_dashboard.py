"""deploy/grafana/dashboards/mind.json names only metrics that exist: the worker's from the
prometheus_client registry (after importing every module that defines some), the candidate view's by
scraping the /metrics of a real `mind view` (its metrics live in a registry of its own), Triton's by
scraping the real tritonserver the test session runs (tests/conftest.py), GPU-only ones from a short
documented list."""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
import yaml
from deploykit import DEPLOY
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from viewkit import running_view

from stream.schemas import dump_recall
from stream.settings import Settings

DASHBOARD = DEPLOY / "grafana" / "dashboards" / "mind.json"

# Triton reports these only when it sees a GPU (Triton metrics docs, "GPU Metrics"); this machine has
# none, so they cannot be scraped here. The cpu profile shows the panel empty.
TRITON_GPU_ONLY = {"nv_gpu_utilization", "nv_gpu_memory_used_bytes", "nv_gpu_memory_total_bytes"}
PROMETHEUS_BUILTIN = {"up"}

_PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
    "offset", "inf", "nan",
}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, keywords, label names
    (inside {...} or by/without (...)), range or duration literals, or strings."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges, [$__rate_interval]
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for m in re.finditer(r"(?<![\w$.])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\()?", text):
        word, call = m.group(1), m.group(2)
        if call or word.lower() in _PROMQL_WORDS:
            continue
        names.add(word)
    return names


SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "gauge": ("",),
    "info": ("_info",),
}


def exported_names() -> set[str]:
    """Sample names the worker's registry can produce (counter _total, histogram _bucket/_sum/_count)."""
    import stream.metrics  # noqa: F401 - registers the worker's metrics
    import stream.recall  # noqa: F401 - the version guard's counter

    out: set[str] = set()
    for family in REGISTRY.collect():
        out.update(family.name + s for s in SUFFIXES.get(family.type, ("",)))
    return out


@pytest.fixture(scope="module")
def view_scrape(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A real `mind view` over one recall message, asked a few things, then its /metrics scraped:
    {"names": every sample name its families can produce, "samples": {(name, labels): value}}."""
    tag = f"d{time.time_ns():x}"[-9:]
    msg = dump_recall(
        "u1", "e1", time.time(), "m-1", "i-1", [("a", 1.0, 0)], produced_at=time.time(), check=True
    )
    with running_view(
        kafka_bootstrap, [(b"u1", msg), (b"u2", b"not json")], tmp_path_factory.mktemp("dview"), tag,
        lambda h: h["consumed"] >= 2,
    ) as v:  # fmt: skip
        for path in ("/users/u1/candidates", "/users/nobody/candidates", "/users/u1"):
            try:
                urllib.request.urlopen(v.url + path, timeout=30).read()
            except urllib.error.HTTPError as exc:
                assert exc.code == 404
        text = urllib.request.urlopen(v.url + "/metrics", timeout=10).read().decode()
    names: set[str] = set()
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        names.update(family.name + s for s in SUFFIXES.get(family.type, ("",)))
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return {"names": names, "samples": samples}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def targets(dash: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expr) of every query, rows' nested panels included."""
    out = []
    for panel in dash["panels"]:
        for p in [panel, *panel.get("panels", [])]:
            out.extend((p["title"], t["expr"]) for t in p.get("targets", []))
    return out


@pytest.fixture(scope="module")
def triton_names(triton: Any) -> set[str]:
    """Metric names the real tritonserver exposes with a model loaded (names are the same on the
    official image of the same Triton line)."""
    url = f"http://127.0.0.1:{triton.server.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and line[0] != "#"}


def test_promql_extraction() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, stage) (rate(mind_worker_stage_seconds_bucket{job="w"}'
        "[$__rate_interval]))) / ignoring(x) sum(up) offset 5m"
    )
    assert metric_names(expr) == {"mind_worker_stage_seconds_bucket", "up"}
    assert metric_names('sum(rate(nv_inference_count{model="a b"}[1m])) / 1000') == {"nv_inference_count"}


def test_every_query_names_an_exported_metric(
    dashboard: dict[str, Any], triton_names: set[str], view_scrape: dict[str, Any]
) -> None:
    mine = exported_names()
    assert "mind_worker_e2e_latency_seconds_bucket" in mine and "mind_worker_dlq_total" in mine
    assert "nv_inference_request_success" in triton_names
    assert "mind_view_request_seconds_bucket" in view_scrape["names"]
    known = mine | view_scrape["names"] | triton_names | TRITON_GPU_ONLY | PROMETHEUS_BUILTIN
    unknown = {(title, n) for title, expr in targets(dashboard) for n in metric_names(expr) - known}
    assert not unknown, f"metrics no code exports: {sorted(unknown)}"


def test_dashboard_shows_what_the_issue_asks_for(dashboard: dict[str, Any]) -> None:
    used = {n for _, expr in targets(dashboard) for n in metric_names(expr)}
    exprs = " ".join(expr for _, expr in targets(dashboard))
    assert {
        "mind_worker_consumer_lag",
        "mind_worker_e2e_latency_seconds_bucket",
        "mind_worker_stage_seconds_bucket",
        "mind_worker_dlq_total",
        "nv_inference_request_success",
        "nv_inference_queue_duration_us",
        "nv_inference_compute_infer_duration_us",
    } <= used
    assert "histogram_quantile(0.99, sum by (le) (rate(mind_worker_e2e_latency_seconds_bucket" in exprs
    # the candidate view: request rate and latency by status, table size, consumed and rejected messages,
    # freshness of answered lists
    assert {
        "mind_view_request_seconds_count",
        "mind_view_request_seconds_bucket",
        "mind_view_users",
        "mind_view_messages_consumed_total",
        "mind_view_messages_rejected_total",
        "mind_view_freshness_seconds_bucket",
    } <= used
    assert "sum by (status) (rate(mind_view_request_seconds_count" in exprs
    assert "histogram_quantile(0.99, sum by (le, status) (rate(mind_view_request_seconds_bucket" in exprs


def test_the_view_counts_what_it_did(view_scrape: dict[str, Any]) -> None:
    """The scraped values say what happened: one user stored, one invalid message, two answered lists
    (the API and the user page), a 404, and the view's routes as labels (never the raw path)."""
    got = view_scrape["samples"]

    def value(name: str, **labels: str) -> float:
        return got.get((name, tuple(sorted(labels.items()))), 0.0)

    assert value("mind_view_users") == 1 and value("mind_view_ready") == 1
    assert value("mind_view_messages_consumed_total") == 2
    assert value("mind_view_messages_rejected_total", reason="invalid") == 1
    assert value("mind_view_messages_rejected_total", reason="stale") == 0
    route = "/users/{user_id}/candidates"
    assert value("mind_view_request_seconds_count", route=route, status="200") == 1
    assert value("mind_view_request_seconds_count", route=route, status="404") == 1
    assert value("mind_view_request_seconds_count", route="/users/{user_id}", status="200") == 1
    assert value("mind_view_freshness_seconds_count") == 2
    assert value("process_resident_memory_bytes") > 0
    routes = {dict(labels)["route"] for (name, labels) in got if name == "mind_view_request_seconds_count"}
    assert routes == {route, "/users/{user_id}", "/healthz"}  # healthz: the test's wait for the view


def test_triton_panels_select_the_settings_model(dashboard: dict[str, Any]) -> None:
    model = Settings.model_construct().triton_model
    models = {m for _, expr in targets(dashboard) for m in re.findall(r'model="([^"]*)"', expr)}
    assert models == {model}


def test_panels_use_the_provisioned_datasource(dashboard: dict[str, Any]) -> None:
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = ds["datasources"][0]["uid"]
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert panels and all(p["datasource"]["uid"] == uid for p in panels)
    assert all(t["datasource"]["uid"] == uid for p in panels for t in p["targets"])
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and dashboard["uid"] == "mind-stream"
