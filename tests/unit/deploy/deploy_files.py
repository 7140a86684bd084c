"""The files under deploy/ and the PromQL they hold: loaders and a small PromQL reader for the deploy tests.

The reader is not a PromQL parser: it finds metric names, selector labels and grouping labels in the expressions
this project writes (promtool checks their syntax). `test_promql_reader.py` pins what it finds on known expressions.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[3]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
PROMETHEUS_DIR = DEPLOY / "prometheus"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
ALERTS_TEST = PROMETHEUS_DIR / "alerts_test.yml"
GRAFANA_DIR = DEPLOY / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "embedserve.json"
DATASOURCES = GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = GRAFANA_DIR / "provisioning" / "dashboards" / "embedserve.yml"
KUBERNETES = DEPLOY / "kubernetes" / "embedserve.yaml"

PROMETHEUS_SYNTHETIC = frozenset({"up"})
"""Series that Prometheus writes itself for every scrape target, so no server exposes them."""

TARGET_LABELS = frozenset({"job", "instance"})
"""Labels that Prometheus attaches to every scraped series."""

GRAFANA_RATE_WINDOW = "5m"
"""What `$__rate_interval` stands for when a dashboard query is checked outside Grafana."""


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_yaml_documents(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels(dash: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel that shows data: rows are containers, their nested panels count."""
    for panel in dash.get("panels", []):
        if panel.get("type") == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def dashboard_queries(dash: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target; template variables' `label_values(...)` give their selector."""
    queries = []
    for panel in dashboard_panels(dash):
        for target in panel.get("targets", []):
            queries.append((f"panel {panel.get('title')!r} target {target.get('refId')}", target.get("expr", "")))
    for var in dash.get("templating", {}).get("list", []):
        query = var.get("query")
        text = query.get("query", "") if isinstance(query, dict) else str(query or "")
        match = re.fullmatch(r"\s*label_values\((.*),\s*([A-Za-z_]\w*)\s*\)\s*", text)
        if match:
            queries.append((f"variable {var.get('name')!r}", match.group(1)))
    return queries


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]]


def rule_queries() -> list[tuple[str, str]]:
    return [(f"rule {rule.get('alert') or rule.get('record')}", rule["expr"]) for rule in alert_rules()]


def grafana_to_promql(expr: str) -> str:
    """A dashboard query as plain PromQL: Grafana's range variables become a fixed window, others match all."""
    expr = re.sub(r"\$__(rate_)?interval|\$__range", GRAFANA_RATE_WINDOW, expr)
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


# -- a small PromQL reader ---------------------------------------------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_SELECTOR = re.compile(r"(?<![\w:])([A-Za-z_:][\w:]*)?\s*\{([^}]*)\}")
_MATCHER = re.compile(r'([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*("(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\')')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_RANGE = re.compile(r"\[[^\]]*\]")
_IDENT = re.compile(r"(?<![\w.:$])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()")
_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"})
_KEYWORDS |= frozenset({"and", "or", "unless", "inf", "nan", "Inf", "NaN"})


@dataclass(frozen=True, slots=True)
class Matcher:
    label: str
    op: str
    value: str

    def literal_values(self) -> list[str] | None:
        """The label values this matcher names: the value of `=`/`!=`, the alternatives of a plain `a|b` regex.

        None when the value is a real regular expression or a Grafana variable (nothing checkable).
        """
        if self.op in ("=", "!="):
            return [self.value]
        if re.fullmatch(r"[\w+\-]+(\|[\w+\-]+)*", self.value):
            return self.value.split("|")
        return None


@dataclass
class PromQL:
    """What `read_promql` found in one expression."""

    metrics: set[str] = field(default_factory=set)
    selectors: list[tuple[str, list[Matcher]]] = field(default_factory=list)
    """(metric, its label matchers) for every `metric{...}`."""
    grouping: set[str] = field(default_factory=set)
    """Labels named in by / without / on / ignoring / group_left / group_right."""


def read_promql(expr: str) -> PromQL:
    """The metric names, label matchers and grouping labels of a PromQL expression."""
    found = PromQL()
    for name, body in _SELECTOR.findall(expr):
        matchers = [Matcher(label, op, value[1:-1]) for label, op, value in _MATCHER.findall(body)]
        found.selectors.append((name, matchers))
    stripped = _SELECTOR.sub(lambda m: f" {m.group(1) or ''} ", expr)
    stripped = _STRING.sub(" ", stripped)
    for labels in _GROUPING.findall(stripped):
        found.grouping |= {label.strip() for label in labels.split(",") if label.strip()}
    stripped = _GROUPING.sub(" ", stripped)
    stripped = _RANGE.sub(" ", stripped)
    found.metrics = {name for name in _IDENT.findall(stripped) if name not in _KEYWORDS}
    return found


# -- what a server exposes ---------------------------------------------------------------------------------------

_TYPE_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("_sum", "_count"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
}


def exposed_series(families: Iterable[Any]) -> dict[str, dict[str, set[str]] | None]:
    """Series name -> {label: values seen} from parsed `prometheus_client` families; None for a name that a declared
    family implies but that has no sample yet (a labelled metric no label set of which was used)."""
    exposed: dict[str, dict[str, set[str]] | None] = {}
    for family in families:
        for suffix in _TYPE_SUFFIXES.get(family.type, ("",)):
            exposed.setdefault(family.name + suffix, None)
        for sample in family.samples:
            labels = exposed.get(sample.name) or {}
            for key, value in sample.labels.items():
                labels.setdefault(key, set()).add(value)
            exposed[sample.name] = labels
    return exposed
