"""What deploy/ ships for monitoring, held against the server: the Prometheus alert rules
(``promtool check rules`` and ``promtool test rules`` with their test file), the Grafana
dashboard (every metric its queries name is one a running server exports, and every query
parses), and the metrics they rest on (``appchat_ready``, broker publish failures,
uploads) counting what really happens."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from .backends import require
from .support import (
    InProcessServer,
    Server,
    TcpProxy,
    customer,
    eventually,
    metrics_text,
    staff,
    token,
)
from .test_uploads import form, png

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "appchat-alerts.yml"
RULES_TEST = ROOT / "deploy" / "prometheus" / "appchat-alerts.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana-dashboard.json"

# Words of PromQL that are not metric names.
PROMQL_WORDS = {
    "sum", "max", "min", "avg", "count", "by", "without", "and", "or", "unless", "on",
    "ignoring", "group_left", "group_right", "rate", "irate", "increase", "deriv", "delta",
    "histogram_quantile", "predict_linear", "vector", "offset", "bool", "label_values",
    "min_over_time", "max_over_time", "avg_over_time", "absent", "clamp_min", "inf", "nan",
}  # fmt: skip
# Scraped by node_exporter (job "node"), not by appchat: the upload store's disk.
NODE_EXPORTER = {"node_filesystem_avail_bytes", "node_filesystem_size_bytes"}


def promtool() -> str:
    """The path of promtool (Debian's prometheus package); under CI its absence fails."""
    found = shutil.which("promtool")
    if found:
        return found
    message = "promtool is not installed (apt-get install prometheus; .ci/run installs it)"
    if os.environ.get("CI"):
        pytest.fail(f"{message}: CI requires it")
    pytest.skip(f"SKIPPED LOUDLY: {message}")


def run_promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """The sample names a real server's ``/metrics`` declares (``# TYPE`` lines: a counter
    ``x_total``, a gauge ``x``, a histogram ``x_bucket``, ``x_sum``, ``x_count``), with
    webhooks configured so that their families are there too."""
    db = tmp_path_factory.mktemp("metrics") / "appchat.db"
    srv = InProcessServer(
        db,
        "--webhook-url",
        "http://127.0.0.1:9/hooks",
        "--webhook-secret",
        "w" * 32,
    ).start()
    try:
        text = metrics_text(srv)
    finally:
        srv.stop()
    return sample_names(text)


def sample_names(text: str) -> set[str]:
    names: set[str] = set()
    for line in text.splitlines():
        m = re.match(r"# TYPE (\S+) (\S+)", line)
        if m is None:
            continue
        name, kind = m.groups()
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        else:
            names.add(name)
    return names


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (Grafana's variables taken out)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings: label values
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)  # label lists
    expr = re.sub(r"\$\w+", "", expr)  # $__rate_interval, $job, ...
    words = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", expr))
    return {w for w in words if w not in PROMQL_WORDS and not re.fullmatch(r"[eE]\d*", w)}


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def dashboard_queries() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    queries = [
        target["expr"]
        for panel in doc["panels"]
        for target in panel.get("targets", [])
        if target.get("expr")
    ]
    for variable in doc["templating"]["list"]:
        if variable.get("type") == "query":
            inner = re.fullmatch(r"label_values\((.*),\s*\w+\)", variable["definition"])
            assert inner, variable["definition"]
            queries.append(inner.group(1))
    return queries


# --- alert rules --------------------------------------------------------------------------


def test_alert_rules_are_valid() -> None:
    out = run_promtool("check", "rules", RULES.name, cwd=RULES.parent)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(rules())} rules found" in out.stdout


def test_alert_rules_fire_and_stay_quiet_as_their_tests_say() -> None:
    out = run_promtool("test", "rules", RULES_TEST.name, cwd=RULES_TEST.parent)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_every_alert_is_tested_firing_and_quiet() -> None:
    """Each alert has at least one case where it fires and one where it must not."""
    fired: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load(RULES_TEST.read_text())["tests"]:
        for check in case["alert_rule_test"]:
            (fired if check["exp_alerts"] else quiet).add(check["alertname"])
    alerts = {rule["alert"] for rule in rules()}
    assert {
        "AppchatNoNodeReady",
        "AppchatWebhookDeliveriesFailing",
        "AppchatWebhookOutboxGrowing",
        "AppchatSlowConsumerClosesRising",
        "AppchatUploadDiskAlmostFull",
    } <= alerts
    assert fired == alerts and quiet == alerts


def test_alert_rules_use_metrics_the_server_exports(exported: set[str]) -> None:
    unknown = {
        name
        for rule in rules()
        for name in metric_names(rule["expr"])
        if name not in exported and name not in NODE_EXPORTER and name != "up"
    }
    assert unknown == set()


# --- the Grafana dashboard ----------------------------------------------------------------


def test_dashboard_queries_use_metrics_the_server_exports(exported: set[str]) -> None:
    doc = json.loads(DASHBOARD.read_text())
    assert doc["title"] and doc["panels"]
    used = {name for query in dashboard_queries() for name in metric_names(query)}
    assert used - exported == set()
    # and it shows all of appchat's own (the _created twins of counters aside)
    shown = {n for n in exported if n.startswith("appchat_") and not n.endswith("_created")}
    assert shown - used == set()


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """promtool parses each query, as a recording rule, with Grafana's variables filled in."""
    filled = [
        query.replace("$__rate_interval", "5m").replace("$job", "appchat")
        .replace("$instance", ".*").replace("$event", "Event.SendMessage")
        for query in dashboard_queries()
    ]  # fmt: skip
    doc = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [{"record": f"dashboard:q{n}", "expr": q} for n, q in enumerate(filled)],
            }
        ]
    }
    (tmp_path / "dashboard.yml").write_text(yaml.safe_dump(doc))
    out = run_promtool("check", "rules", "dashboard.yml", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dashboard_panels_have_ids_and_do_not_overlap() -> None:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not (mine & cells), p["title"]
        cells |= mine


# --- the metrics the alerts and the dashboard rest on --------------------------------------


def sample(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    key = f"{name}{{{want}}}" if want else name
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.split()[1])
    raise AssertionError(f"{key} not in /metrics")


def readyz(srv: Server) -> int:
    try:
        with urllib.request.urlopen(srv.http("/readyz"), timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


async def test_ready_and_publish_failures_follow_the_broker(tmp_path: Path) -> None:
    """appchat_ready is 0 while the broker is cut off (as /readyz says 503), and the pushes
    that could not be published are counted."""
    require("Redis", "127.0.0.1", 6379)
    proxy = await TcpProxy(6379).start()
    srv = await asyncio.to_thread(
        InProcessServer(
            tmp_path / "appchat.db",
            "--broker",
            f"redis://127.0.0.1:{proxy.port}/0",
            "--channel-prefix",
            f"monitoring-{os.getpid()}",
        ).start
    )
    try:
        text = await asyncio.to_thread(metrics_text, srv)
        assert sample(text, "appchat_ready") == 1
        assert sample(text, "appchat_broker_publish_failures_total", kind="push") == 0
        async with staff(srv, 1) as s, customer(srv, 300, 2) as c:
            await c.ok("Event.AddConversation", {"application_id": 300})
            await s.ok("Event.AddConversation", {"application_id": 300})
            await proxy.stop()
            await s.ok("Event.SendMessage", {"session_channel": "300", "content": "while cut"})
            text = await asyncio.to_thread(metrics_text, srv)
            assert sample(text, "appchat_ready") == 0
            assert await asyncio.to_thread(readyz, srv) == 503

            async def counted() -> bool:
                text = await asyncio.to_thread(metrics_text, srv)
                return sample(text, "appchat_broker_publish_failures_total", kind="push") >= 1

            await eventually(counted, timeout=20, interval=0.2, what="a publish failure counted")
            await proxy.start()

            async def ready_again() -> bool:
                text = await asyncio.to_thread(metrics_text, srv)
                return sample(text, "appchat_ready") == 1

            await eventually(ready_again, timeout=30, interval=0.2, what="ready once back")
    finally:
        await asyncio.to_thread(srv.stop)
        await proxy.stop()


@pytest.fixture
def plain_server(tmp_path: Path) -> Iterator[Server]:
    srv = InProcessServer(tmp_path / "appchat.db").start()
    yield srv
    srv.stop()


async def test_uploads_are_counted_by_status_and_bytes(plain_server: Server) -> None:
    srv = plain_server
    image = png(64, 48)
    async with customer(srv, 301, 3) as c:
        await c.ok("Event.AddConversation", {"application_id": 301})
    tok = token(request_id=301, sid=3)
    async with aiohttp.ClientSession() as http:
        headers = {"Authorization": f"Bearer {tok}"}
        async with http.post(srv.http("/upload"), data=form(301, image), headers=headers) as r:
            assert r.status == 201
        async with http.post(srv.http("/upload"), data=form(301, image)) as r:
            assert r.status == 401
    text = await asyncio.to_thread(metrics_text, srv)
    assert sample(text, "appchat_uploads_total", status="201") == 1
    assert sample(text, "appchat_uploads_total", status="401") == 1
    assert sample(text, "appchat_upload_bytes_total") == len(image)
