"""The provisioned Grafana dashboard: valid panel layout, and PromQL that names only exported metrics.

A renamed metric would leave a dashboard panel silently empty; this test makes it fail loudly.
The exported names come from the metric objects ``tileserver.metrics`` builds, not from a
copy of the list; tests/test_prometheus_integration.py checks the same queries against a live
server scraped by a real Prometheus.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tileserver import metrics

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "tileserver.json"

# Series names a metric family exposes, by type (the suffixes Prometheus' text format adds).
SERIES_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
    "stateset": ("",),
    "unknown": ("",),
}
# Series that only ever grow: the ones rate()/increase() are meaningful on.
COUNTER_LIKE = {("counter", "_total"), ("histogram", "_bucket"), ("histogram", "_sum"), ("histogram", "_count")}

PROMQL_KEYWORDS = {"and", "or", "unless", "bool", "by", "without", "on", "ignoring", "group_left", "group_right"}
PROMQL_KEYWORDS |= {"offset", "inf", "nan", "start", "end"}
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", re.IGNORECASE)
TOKEN = re.compile(
    r"(?P<num>(?<![\w:.])(?:0x[0-9a-fA-F]+|\d+\.?\d*(?:[eE][+-]?\d+)?|\.\d+))|(?P<ident>[a-zA-Z_:][\w:]*)"
)


def grafana_to_promql(expr: str, interval: str = "30s") -> str:
    """``expr`` with Grafana's variables ($__rate_interval, ${var}, $var) replaced by ``interval``."""
    return re.sub(r"\$\{?\w+\}?", interval, expr)


def metric_names(expr: str) -> set[str]:
    """Names of the series a PromQL expression selects.

    Drops what cannot be a metric name (strings, label matchers, ranges, grouping clauses,
    numbers, keywords, function names) and keeps the identifiers left, plus any
    ``{__name__="..."}`` matcher.
    """
    names = set(re.findall(r"__name__\s*=\s*\"([^\"]+)\"", expr))
    text = grafana_to_promql(expr)
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', text)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = GROUPING.sub(" ", text)
    text = re.sub(r"\b(offset\s+-?\w+|@\s*\S+)", " ", text)
    for match in TOKEN.finditer(text):
        word = match.group("ident")
        if word is None or word.lower() in PROMQL_KEYWORDS:
            continue
        if re.match(r"\s*\(", text[match.end() :]):
            continue  # a function or aggregation
        names.add(word)
    return names


def rate_arguments(expr: str) -> set[str]:
    """Series names used directly inside rate()/irate()/increase()."""
    text = grafana_to_promql(expr)
    return set(re.findall(r"\b(?:rate|irate|increase)\s*\(\s*([a-zA-Z_:][\w:]*)", text))


def dashboard() -> dict[str, Any]:
    with DASHBOARD.open(encoding="utf-8") as fh:
        data = json.load(fh)
    assert isinstance(data, dict)
    return data


def panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p.get("type") != "row"]


def expressions() -> list[tuple[str, str]]:
    """(panel title / refId, expr) for every query in the dashboard."""
    return [(f"{p['title']}/{t['refId']}", t["expr"]) for p in panels() for t in p["targets"]]


def exported_families() -> dict[str, str]:
    """Metric family name -> type, for every metric object the server builds (``tileserver.metrics.Metrics``).

    Read from the objects themselves rather than a registry's output, so the answer does not
    depend on whether an earlier test switched prometheus_client to multiprocess mode.
    """
    families: dict[str, str] = {}
    for fld in dataclasses.fields(metrics.Metrics):
        for family in getattr(metrics.get(), fld.name).describe():
            families[family.name] = family.type
    assert families, "tileserver.metrics exports no metric"
    return families


def exported_series() -> dict[str, tuple[str, str]]:
    """Series name -> (family type, suffix) for everything the server exports."""
    out: dict[str, tuple[str, str]] = {}
    for name, kind in exported_families().items():
        for suffix in SERIES_SUFFIXES[kind]:
            out[name + suffix] = (kind, suffix)
    return out


def exported_labels() -> dict[str, set[str]]:
    """Metric family name -> its label names, from the metric objects the server builds."""
    out: dict[str, set[str]] = {}
    for fld in dataclasses.fields(metrics.Metrics):
        metric = getattr(metrics.get(), fld.name)
        # prometheus_client keeps label names only privately; a family without samples shows none in the text.
        labels = set(metric._labelnames)
        for family in metric.describe():
            out[family.name] = labels
    return out


def label_names(expr: str) -> set[str]:
    """Label names an expression groups by or matches on."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', grafana_to_promql(expr))
    names: set[str] = set()
    for clause in re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", text):
        names |= {w.strip() for w in clause.split(",") if w.strip()}
    for matchers in re.findall(r"\{([^}]*)\}", text):
        names |= set(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", matchers))
    return names


# --------------------------------------------------------------------------- PromQL against the server


@pytest.mark.parametrize(("where", "expr"), expressions(), ids=[w for w, _ in expressions()])
def test_expression_names_only_exported_metrics(where: str, expr: str) -> None:
    names = metric_names(expr)
    assert names, f"{where}: no metric found in {expr!r}"
    unknown = names - set(exported_series())
    assert not unknown, f"{where}: {sorted(unknown)} not exported by the server"


@pytest.mark.parametrize(("where", "expr"), expressions(), ids=[w for w, _ in expressions()])
def test_expression_uses_only_labels_its_metrics_have(where: str, expr: str) -> None:
    series = exported_series()
    families = exported_labels()
    available = {"le", "job", "instance", "__name__"}  # le: histogram buckets; job, instance: added by the scrape
    for name in metric_names(expr) & series.keys():  # unknown names fail test_expression_names_only_exported_metrics
        _, suffix = series[name]
        available |= families[name.removesuffix(suffix) if suffix else name]
    unknown = label_names(expr) - available
    assert not unknown, f"{where}: labels {sorted(unknown)} are not on {sorted(metric_names(expr))}"


@pytest.mark.parametrize(("where", "expr"), expressions(), ids=[w for w, _ in expressions()])
def test_rate_is_taken_only_of_counters_and_histogram_series(where: str, expr: str) -> None:
    series = exported_series()
    for name in rate_arguments(expr):
        assert series.get(name) in COUNTER_LIKE, f"{where}: rate() of {name}, a {series.get(name)} series"


@pytest.mark.parametrize(("where", "expr"), expressions(), ids=[w for w, _ in expressions()])
def test_quantiles_aggregate_buckets_by_le(where: str, expr: str) -> None:
    for inner in re.findall(r"histogram_quantile\(\s*[\d.]+\s*,(.*)\)", expr):
        assert re.search(r"\bby\s*\([^)]*\ble\b", inner), f"{where}: histogram_quantile without 'by (le, ...)'"
        assert all(n.endswith("_bucket") for n in metric_names(inner)), where


def test_dashboard_covers_the_issue_panels() -> None:
    exprs = " ".join(e for _, e in expressions())
    for needed in (
        "rate(tileserver_tile_seconds_bucket",  # tile latency
        "rate(tileserver_decode_seconds_bucket",  # decode batch latency
        "rate(tileserver_decode_batch_size_sum",  # average batch size
        "rate(tileserver_decode_queue_seconds_bucket",  # queue wait
        "rate(tileserver_cache_hits_total",  # hit ratio
        "rate(tileserver_tile_requests_total",  # requests per second by source
        'tileserver_http_requests_total{status=~"5.."}',  # error rate
    ):
        assert needed in exprs, needed
    quantiles = set(re.findall(r"histogram_quantile\((0\.\d+), sum by \(le, source\)", exprs))
    assert quantiles == {"0.5", "0.95", "0.99"}


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian package prometheus) not installed")
def test_promtool_parses_every_expression(tmp_path: Path) -> None:
    # promtool has no "check expression"; a recording rule per expression gets the same parser.
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:expr_{i}", "expr": grafana_to_promql(e)}
                    for i, (_, e) in enumerate(expressions())
                ],
            }
        ]
    }
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules), encoding="utf-8")
    result = subprocess.run(
        ["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------- Grafana schema


def test_dashboard_top_level_fields() -> None:
    data = dashboard()
    assert data["uid"] == "tileserver"
    assert data["title"]
    assert isinstance(data["schemaVersion"], int)
    assert isinstance(data["panels"], list) and data["panels"]
    assert data["templating"]["list"] == [] or all("name" in v for v in data["templating"]["list"])


def test_panel_ids_are_unique() -> None:
    ids = [p["id"] for p in dashboard()["panels"]]
    assert len(ids) == len(set(ids))


def test_panels_lie_on_the_24_column_grid_without_overlapping() -> None:
    taken: set[tuple[int, int]] = set()
    for panel in dashboard()["panels"]:
        pos = panel["gridPos"]
        assert all(isinstance(pos[k], int) for k in ("x", "y", "w", "h")), panel["title"]
        assert 0 <= pos["x"] and pos["w"] > 0 and pos["x"] + pos["w"] <= 24 and pos["h"] > 0, panel["title"]
        cells = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells


@pytest.mark.parametrize("panel", panels(), ids=lambda p: p["title"])
def test_panel_has_type_title_and_queries(panel: dict[str, Any]) -> None:
    assert panel["type"] in {"timeseries", "stat", "gauge", "bargauge", "table", "heatmap"}
    assert panel["title"]
    assert panel["datasource"]["type"] == "prometheus"
    ref_ids = [t["refId"] for t in panel["targets"]]
    assert ref_ids and len(ref_ids) == len(set(ref_ids))
    assert all(t["expr"].strip() for t in panel["targets"])


# --------------------------------------------------------------------------- the extractor itself


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("histogram_quantile(0.95, sum by (le, source) (rate(a_bucket[$__rate_interval])))", {"a_bucket"}),
        ('(sum(rate(h_total{status=~"5.."}[5m])) or vector(0)) / sum(rate(h_total[1m]))', {"h_total"}),
        ("sum without (instance) (g) > bool 1e3", {"g"}),
        ("x offset 5m + on (job) group_left (a) y", {"x", "y"}),
        ('{__name__="by_name", job="j"}', {"by_name"}),
        ("max by (version, torch, device) (build_info2)", {"build_info2"}),
        ("rate(c_total[5m:1m]) * 0x10 - Inf", {"c_total"}),
    ],
)
def test_metric_names_extractor(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_label_names_extractor() -> None:
    expr = 'sum by (le, source) (rate(a_bucket{status=~"5..", kind!="x"}[1m])) / on (job) b'
    assert label_names(expr) == {"le", "source", "status", "kind", "job"}


def test_exported_series_follow_prometheus_suffix_rules() -> None:
    series = exported_series()
    assert series["tileserver_tile_requests_total"] == ("counter", "_total")
    assert series["tileserver_tile_seconds_bucket"] == ("histogram", "_bucket")
    assert "tileserver_tile_seconds" not in series  # a histogram has no bare series
    assert "tileserver_cache_bytes_total" not in series  # a gauge has no _total
