"""The metrics, the Grafana dashboard and the alert rules, proven on a real 3-node mesh.

One mesh for the whole module (``scenario``): three real gunicorn nodes in three regions,
with Lua hooks and analytics webhooks on the first, scraped every second by a real
Prometheus (Debian's ``prometheus``) while traffic flows in two rounds (writes, reads, a
miss, multipart, gRPC, replication), then faults in two rounds: ``ap`` is killed (node
down, replication to it fails, the outbox of ``us`` fills up until writes get 429) and
``eu`` drains (not ready, 503). Then every dashboard panel's PromQL and every alert rule
runs through Prometheus's HTTP API, and every metric the README documents is looked for
on the nodes' own ``/metrics``.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest
import requests
import yaml

from app.replication.peer_client import target_label
from tests.mesh import MeshNode, make_mesh, quiescent, wait_until
from tests.ops import prometheus
from tests.ops.prometheus import Prometheus

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "helm" / "kura" / "dashboards" / "kura-cluster.json"
ALERTS = REPO / "ops" / "prometheus" / "alerts.yml"
README = REPO / "README.md"
REGIONS = {"us": "us-east", "eu": "eu-west", "ap": "ap-south"}
OUTBOX_MAX_DEPTH = 40
Q = "tenant_id=default&namespace_id=ios"
HOOKS = """
function authenticate(ctx)
  kura.http_json("hub", { method = "POST", path = "/auth", body = {} })
  return { anonymous = true }
end
function authorize(ctx, principal) return { allow = true } end
"""


class Receiver:
    """The hooks' HTTP service (``{}`` to anything) and the analytics webhook receiver, which
    answers 500 to the first batch (the breaker opens) and 202 to the others."""

    def __init__(self) -> None:
        self.batches = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers["Content-Length"]))
                body = b""
                if self.path.startswith("/webhooks/"):
                    receiver.batches += 1
                    self.send_response(500 if receiver.batches == 1 else 202)
                else:
                    body = b"{}"
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@dataclass
class Scenario:
    us: MeshNode
    eu: MeshNode
    ap: MeshNode
    prometheus: Prometheus | None
    # Each node's /metrics once its part is over (ap's just before it was killed).
    exposition: dict[str, str] = field(default_factory=dict)


def _traffic(s: Scenario, round_: int) -> None:
    """Writes, reads (through Flask with hooks on us, the fast path on eu and ap), a miss,
    a multipart upload, gRPC, and the replication all that causes."""
    from tests.reapi.reapi_client import Reapi

    us, eu, ap = s.us, s.eu, s.ap
    blob, big = os.urandom(200_000), os.urandom(100_000)
    assert us.session.post(f"{us.url}/api/cache/cas/cas-{round_}?{Q}", data=blob).status_code == 204
    assert us.get(f"/api/cache/cas/cas-{round_}?{Q}").content == blob
    assert us.get(f"/api/cache/cas/missing-{round_}?{Q}").status_code == 404
    assert us.put(f"/api/cache/keyvalue?{Q}", json.dumps(
        {"cas_id": f"kv-{round_}", "entries": [{"value": "v"}]}).encode()).status_code == 204
    # New credentials: the hooks' decisions are cached per credential, so they run again.
    assert us.get(f"/api/cache/keyvalue/kv-{round_}?{Q}",
                  headers={"authorization": f"Bearer round-{round_}"}).status_code == 200
    assert us.put(f"/api/cache/gradle/g-{round_}?{Q}", big).status_code == 201
    module = f"{Q}&hash=h{round_}&name=Mod"
    upload_id = us.session.post(f"{us.url}/api/cache/module/start?{module}").json()["upload_id"]
    assert us.session.post(f"{us.url}/api/cache/module/part?{Q}&upload_id={upload_id}&part_number=1",
                           data=b"m" * 1000).status_code == 204
    assert us.session.post(f"{us.url}/api/cache/module/complete?{Q}&upload_id={upload_id}",
                           json={"parts": [1]}).status_code == 204
    assert us.session.head(f"{us.url}/api/cache/module/x?{module}").status_code == 204
    reapi = Reapi.connect(int(us.node.env["KURA_GRPC_PORT"]))
    try:
        digest = reapi.upload(os.urandom(70_000), instance="ci")
        assert len(reapi.download(digest, instance="ci")) == 70_000
    finally:
        reapi.close()
    assert eu.put(f"/v1/cache/nx-{round_}", b"nx").status_code == 200
    assert ap.put(f"/api/metro/cache/metro-{round_}", b"metro").status_code == 200
    wait_until(lambda: quiescent([us, eu, ap]), 30, "replication of the round")
    for member in (eu, ap):  # replicated there: the download fast path
        assert member.get(f"/api/cache/cas/cas-{round_}?{Q}").content == blob
        assert member.get(f"/api/cache/gradle/g-{round_}?{Q}").content == big
        assert member.get(f"/v1/cache/nx-{round_}").content == b"nx"


def _faults(s: Scenario, round_: int) -> None:
    """eu (draining) answers 503; us writes until its outbox, full of rows for the dead ap,
    refuses them with 429."""
    assert s.eu.get(f"/api/cache/cas/cas-{round_}?{Q}").status_code == 503
    for i in range(2 * OUTBOX_MAX_DEPTH):
        status = s.us.put(f"/api/cache/keyvalue?{Q}", json.dumps(
            {"cas_id": f"late-{round_}-{i}", "entries": [{"value": "v"}]}).encode()).status_code
        if status == 429:
            break
        assert status == 204
    else:
        raise AssertionError("the outbox never filled up")


def _scraped(s: Scenario) -> None:
    """Until Prometheus has scraped every node after this moment (no-op without it)."""
    if s.prometheus is not None:
        s.prometheus.wait_for_scrapes(time.time())


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    base = tmp_path_factory.mktemp("observability")
    hooks = base / "allow.lua"
    hooks.write_text(HOOKS)
    receiver = Receiver()
    members = make_mesh(base, list(REGIONS), KURA_PEER_LOSS_TIMEOUT_MS="120000")
    by_name = {m.name: m for m in members}
    for name, member in by_name.items():
        member.node.env["KURA_REGION"] = REGIONS[name]
    by_name["us"].node.env.update({
        "KURA_EXTENSION_SCRIPT_PATH": str(hooks), "KURA_EXTENSION_HTTP_CLIENT_HUB_BASE_URL": receiver.url,
        "KURA_OUTBOX_MAX_DEPTH": str(OUTBOX_MAX_DEPTH),
        "KURA_ANALYTICS_SERVER_URL": receiver.url, "KURA_ANALYTICS_SIGNING_KEY": "k",
        "KURA_ANALYTICS_BATCH_TIMEOUT_MS": "100", "KURA_ANALYTICS_CIRCUIT_BREAKER_FAILURE_THRESHOLD": "1",
        "KURA_ANALYTICS_CIRCUIT_BREAKER_OPEN_MS": "100"})
    prom = None
    try:
        for member in members:
            member.node.start(wait=False)
        if prometheus.BINARY is not None:
            # Started with the nodes: Prometheus scrapes its first targets about 5 s after it starts.
            prom = Prometheus(base / "prometheus", {
                f"127.0.0.1:{m.node.port}": {"region": REGIONS[m.name]} for m in members}, [ALERTS])
            prom.wait_ready()
        for member in members:
            member.node.wait_ready(60)
        s = Scenario(by_name["us"], by_name["eu"], by_name["ap"], prom)
        _scraped(s)  # the baseline every rate is computed from
        _traffic(s, 1)
        _scraped(s)
        _traffic(s, 2)
        _scraped(s)
        s.exposition["ap"] = s.ap.get("/metrics").text
        s.ap.node.kill_all()
        assert s.eu.put("/v1/cache/nx-late", b"nx").status_code == 200  # rows for the dead ap
        s.eu.node.signal(signal.SIGUSR1)
        s.eu.node.wait_for(s.eu.url + "/ready", status=503, timeout=10)
        _faults(s, 1)
        _scraped(s)
        _faults(s, 2)
        dead = target_label(s.ap.advertised)
        for member in (s.us, s.eu):  # retried with backoff: the error rate is not zero
            wait_until(lambda m=member: m.metric("kura_replication_requests_total", target=dead,
                                                 result="error") >= 2, 15, "delivery failures")
        _scraped(s)
        for member in (s.us, s.eu):
            s.exposition[member.name] = member.get("/metrics").text
        yield s
    finally:
        if prom is not None:
            prom.stop()
        for member in members:  # all at once: each drains in parallel
            if member.node.process is not None and member.node.process.poll() is None:
                member.node.signal(signal.SIGTERM)
        for member in members:
            member.node.stop()
        receiver.server.shutdown()


# -- the metrics on the nodes themselves ---------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def samples(exposition: str) -> Iterator[tuple[str, dict[str, str], float]]:
    for line in exposition.splitlines():
        if line and not line.startswith("#"):
            match = _SAMPLE.match(line)
            assert match, line
            yield match[1], dict(_LABEL.findall(match[2] or "")), float(match[3])


def documented() -> dict[str, set[str]]:
    """README's metric table: every exported metric and its labels."""
    rows = re.findall(r"^\| `(kura_[a-z0-9_]+)` \| \w+ \| ([^|]*) \|", README.read_text(), re.M)
    assert len(rows) > 50, "README's metric table not found"
    return {name: set(re.findall(r"`([a-z_]+)`", labels)) for name, labels in rows}


def family(sample_name: str, names: set[str]) -> str | None:
    if sample_name in names:
        return sample_name
    for suffix in _HISTOGRAM_SUFFIXES:
        if sample_name.endswith(suffix) and sample_name[:-len(suffix)] in names:
            return sample_name[:-len(suffix)]
    return None


def test_every_documented_metric_is_on_a_real_node_with_its_labels(scenario: Scenario) -> None:
    table = documented()
    seen: dict[str, set[frozenset[str]]] = {}
    undocumented = set()
    for text in scenario.exposition.values():
        for name, labels, _ in samples(text):
            if name.endswith("_total_total"):
                continue  # Kura's scraped names for the counters (next test)
            found = family(name, set(table))
            if found is None:
                undocumented.add(name)
            else:
                seen.setdefault(found, set()).add(frozenset(labels) - {"le"})
    assert sorted(set(table) - set(seen)) == [], "documented but on no node"
    assert sorted(undocumented) == [], "on a node but not in README's metric table"
    assert {name: sets for name, sets in seen.items() if sets != {frozenset(table[name])}} == {}


def test_every_counter_is_also_under_kuras_scraped_name(scenario: Scenario) -> None:
    """Kura's Rust client exposes counter ``kura_x_total`` as ``kura_x_total_total``."""
    counters = set(re.findall(r"^# TYPE (kura_\w+_total) counter$", scenario.exposition["us"], re.M))
    values = {(name, tuple(sorted(labels.items()))): value
              for name, labels, value in samples(scenario.exposition["us"])}
    singles = {key: v for key, v in values.items() if key[0] in counters and not key[0].endswith("_total_total")}
    doubled = {(name[:-len("_total")], labels): v for (name, labels), v in values.items()
               if name.endswith("_total_total")}
    assert len(singles) > 50
    assert doubled == singles


def test_kura_label_values(scenario: Scenario) -> None:
    """Kura's label values: reads ok / not_found, writes ok, bytes by result, the unmatched
    route, 5xx counted as exceptions, egress by result, multipart parts."""
    us = {(n, tuple(sorted(labels.items()))) for n, labels, _ in samples(scenario.exposition["us"])}
    eu = {(n, tuple(sorted(labels.items()))) for n, labels, _ in samples(scenario.exposition["eu"])}
    for expected in (
        ("kura_artifact_reads_total", (("producer", "xcode"), ("result", "ok"))),
        ("kura_artifact_reads_total", (("producer", "xcode"), ("result", "not_found"))),
        ("kura_artifact_writes_total", (("producer", "module"), ("result", "ok"))),
        ("kura_artifact_writes_total", (("producer", "xcode"), ("result", "rejected"))),
        ("kura_artifact_read_bytes_total", (("producer", "reapi"), ("result", "ok"))),
        ("kura_artifact_write_bytes_total", (("producer", "gradle"), ("result", "ok"))),
        ("kura_artifact_egress_bytes_total", (("producer", "xcode"), ("result", "ok"))),
        ("kura_artifact_egress_bytes_total", (("producer", "reapi"), ("result", "ok"))),
        ("kura_multipart_parts_total", (("result", "ok"),)),
        ("kura_backpressure_rejections_total", (("budget", "outbox"),)),
    ):
        assert expected in us, expected
    assert ("kura_http_exceptions_total", (("kind", "server_error"), ("route", "/api/cache/cas/{id}"))) in eu
    assert ("kura_artifact_egress_bytes_total", (("producer", "gradle"), ("result", "ok"))) in eu  # fast path
    requests.get(scenario.us.url + "/no/such/route", timeout=5)
    assert 'kura_http_requests_total{route="/_unmatched",status="404"}' in scenario.us.get("/metrics").text


# -- the dashboard and the alert rules against Prometheus ----------------------------------

needs_prometheus = pytest.mark.skipif(prometheus.BINARY is None or prometheus.PROMTOOL is None,
                                      reason="the prometheus package is not installed")
# Counters whose rate is zero in this scenario (nothing is evicted in a test mesh).
RATE_MAY_BE_ZERO = {"sum by (region) (rate(kura_eviction_segments_total[5m]))"}


# The core panels of Kura's own dashboard (tuist/tuist kura/ops/grafana/dashboards/
# kura-cluster.json), each with Kura's query, character for character: they must stay
# unchanged so Kura's dashboard and this one show the same series.
KURA_PANELS = {
    ("Nodes Up", "count(kura_node_info)"),
    ("Process Memory", "kura_process_resident_memory_bytes"),
    ("Process Memory", "kura_process_virtual_memory_bytes"),
    ("Outbox Depth", "kura_outbox_messages"),
    ("Outbox Depth", "kura_outbox_capacity"),
    ("Process Uptime", "time() - kura_process_start_time_seconds"),
    ("HTTP Request Rate", "sum by (region, route) (rate(kura_http_requests_total[5m]))"),
    ("HTTP Request Rate", "sum by (region, path) (rate(kura_artifact_serving_paths_total[5m]))"),
    ("HTTP p95 Latency",
     "histogram_quantile(0.95, sum by (le, region) (rate(kura_http_request_duration_seconds_bucket[5m])))"),
    ("HTTP Exceptions", "sum by (region, route, kind) (rate(kura_http_exceptions_total[5m]))"),
    ("Artifact Write Throughput",
     "sum by (region, producer, result) (rate(kura_artifact_write_bytes_total[5m]))"),
    ("Artifact Read Throughput",
     "sum by (region, producer, result) (rate(kura_artifact_read_bytes_total[5m]))"),
    ("Replication Requests",
     "sum by (region, target, operation, result) (rate(kura_replication_requests_total[5m]))"),
    ("Replication p95 Latency", "histogram_quantile(0.95, sum by (le, region, operation) "
     "(rate(kura_replication_request_duration_seconds_bucket[5m])))"),
    ("Replication Errors",
     'sum by (region, target, operation) (rate(kura_replication_requests_total{result="error"}[5m]))'),
}


def test_the_dashboard_keeps_kuras_core_panels_and_queries() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "kura-cluster"
    assert KURA_PANELS - set(dashboard_targets()) == set()


def dashboard_targets() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"]
            for target in panel["targets"] if panel["datasource"]["type"] == "prometheus"]


@needs_prometheus
def test_every_dashboard_panel_shows_data(scenario: Scenario) -> None:
    assert scenario.prometheus is not None
    targets = dashboard_targets()
    assert len({title for title, _ in targets}) >= 20
    empty, flat = [], []
    for title, expr in targets:
        result = scenario.prometheus.query(expr)
        values = [float(s["value"][1]) for s in result]
        if not result:
            empty.append((title, expr))
        elif "rate(" in expr and expr not in RATE_MAY_BE_ZERO and not any(v > 0 for v in values):
            flat.append((title, expr, result))
    assert empty == [], "panels that show nothing"
    assert flat == [], "rates that stay at zero although the scenario made them move"
    assert float(scenario.prometheus.query("count(kura_node_info)")[0]["value"][1]) == 2  # ap is down


# How each alert rule is checked. The scenario makes real faults: ap is killed (down, and the
# target of failing deliveries), eu drains (not ready, 503), the outbox of us fills up to
# KURA_OUTBOX_MAX_DEPTH (429). A rule whose threshold the scenario reaches is evaluated as
# written; one whose threshold needs hours or a full disk is evaluated with the threshold
# relaxed (RELAXED: text in the rule, its replacement), which still proves every metric name
# and label it joins on: the result must be exactly the nodes in FIRING.
#   KuraNodeDown              as written: ap's scrape fails, up{job="kura"} == 0 for ap only.
#   KuraNodeNotReady          as written: kura_ready_state == 0 for the draining eu only.
#   KuraOutboxGrowing         "> 1000" relaxed to "> 0": rows for the dead ap wait on us and eu,
#                             and deriv() over them is positive (the outbox grew).
#   KuraOutboxNearCapacity    as written: us's outbox is at KURA_OUTBOX_MAX_DEPTH (capacity gauge).
#   KuraReplicationFailing    as written: deliveries from us and eu to ap fail.
#   KuraBootstrapStalled      "<" relaxed to "<=": both peer gauges exist with the same labels on
#                             every live node (a stall needs 30 min without progress).
#   KuraDiskNearCapacity      "< 0.1" relaxed to "< 1": the free and size gauges divide on every
#                             live node (a disk under 10 % free cannot be made here).
#   KuraHighServerErrorRate   "> 0.05" relaxed to "> 0": eu's 503s while draining are counted in
#                             kura_http_exceptions_total on a cache route (their share of all
#                             traffic depends on the scenario's mix).
RELAXED = {
    "KuraOutboxGrowing": ("kura_outbox_messages > 1000", "kura_outbox_messages > 0"),
    "KuraBootstrapStalled": ("<", "<="),
    "KuraDiskNearCapacity": ("< 0.1", "< 1"),
    "KuraHighServerErrorRate": ("> 0.05", "> 0"),
}
FIRING = {  # the nodes each rule, as evaluated, must find (and no other)
    "KuraNodeDown": {"ap"}, "KuraNodeNotReady": {"eu"}, "KuraOutboxGrowing": {"us", "eu"},
    "KuraOutboxNearCapacity": {"us"}, "KuraReplicationFailing": {"us", "eu"},
    "KuraBootstrapStalled": {"us", "eu"}, "KuraDiskNearCapacity": {"us", "eu"},
    "KuraHighServerErrorRate": {"eu"},
}


@needs_prometheus
def test_alert_rules_are_valid_and_find_the_faults(scenario: Scenario) -> None:
    assert scenario.prometheus is not None
    check = subprocess.run([str(prometheus.PROMTOOL), "check", "rules", str(ALERTS)],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    rules = {rule["alert"]: rule for group in yaml.safe_load(ALERTS.read_text())["groups"]
             for rule in group["rules"]}
    assert set(rules) == set(FIRING)
    loaded = {rule["name"]: rule for rule in scenario.prometheus.rules()}
    assert {name: rule["health"] for name, rule in loaded.items()} == {name: "ok" for name in FIRING}
    instance = {f"127.0.0.1:{m.node.port}": m.name for m in (scenario.us, scenario.eu, scenario.ap)}
    for name, rule in rules.items():
        expr = " ".join(rule["expr"].split())
        if name in RELAXED:
            written, relaxed = RELAXED[name]
            assert written in expr, (name, expr)
            expr = expr.replace(written, relaxed)
        found = {instance[s["metric"]["instance"]] for s in scenario.prometheus.query(expr)}
        assert found == FIRING[name], (name, expr)


@needs_prometheus
def test_kuras_own_alert_on_its_scraped_counter_names(scenario: Scenario) -> None:
    """Tuist's alert on Kura's 5xx (it queries Kura's ``kura_http_requests_total_total``)."""
    assert scenario.prometheus is not None
    result = scenario.prometheus.query(
        'sum by (instance, route) (rate(kura_http_requests_total_total{'
        'route!~"/_internal/.*|/up|/ready|/status/rollout|/metrics|/_unmatched", status=~"5.."}[5m]))')
    assert {s["metric"]["instance"] for s in result} == {f"127.0.0.1:{scenario.eu.node.port}"}
    assert all(float(s["value"][1]) > 0 for s in result)
