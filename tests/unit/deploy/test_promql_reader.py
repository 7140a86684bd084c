"""The PromQL reader of the deploy tests finds exactly the metrics and labels of expressions with a known answer."""

from __future__ import annotations

from tests.unit.deploy.deploy_files import Matcher, grafana_to_promql, read_promql


def test_metrics_inside_functions_aggregations_and_binary_operators() -> None:
    found = read_promql(
        'histogram_quantile(0.99, sum by (job, instance, method, le) (rate(a_seconds_bucket{method="Embed"}[5m]))) > 5'
        ' or sum(rate(b_total[1m])) / sum without (code) (rate(c_total{code!~"OK|CANCELLED"}[$__rate_interval]))'
    )
    assert found.metrics == {"a_seconds_bucket", "b_total", "c_total"}
    assert found.grouping == {"job", "instance", "method", "le", "code"}
    assert found.selectors == [
        ("a_seconds_bucket", [Matcher("method", "=", "Embed")]),
        ("c_total", [Matcher("code", "!~", "OK|CANCELLED")]),
    ]


def test_keywords_numbers_durations_and_strings_are_not_metrics() -> None:
    found = read_promql('x > 32 * 1024 and on (job, collection) y offset 5m unless bool z{l="a b(c) d"} == 1e3 or inf')
    assert found.metrics == {"x", "y", "z"}
    assert found.grouping == {"job", "collection"}
    assert found.selectors == [("z", [Matcher("l", "=", "a b(c) d")])]


def test_a_bare_metric_and_a_name_that_starts_like_a_function() -> None:
    assert read_promql("up == 0").metrics == {"up"}
    assert read_promql("summary_count + rate_total").metrics == {"summary_count", "rate_total"}


def test_literal_values_of_matchers() -> None:
    assert Matcher("code", "=~", "UNKNOWN|INTERNAL").literal_values() == ["UNKNOWN", "INTERNAL"]
    assert Matcher("le", "=", "+Inf").literal_values() == ["+Inf"]
    assert Matcher("instance", "=~", "$instance").literal_values() is None
    assert Matcher("method", "=~", "Get.*").literal_values() is None


def test_grafana_variables_become_plain_promql() -> None:
    expr = 'rate(m_total{instance=~"$instance",job="${job}"}[$__rate_interval])'
    assert grafana_to_promql(expr) == 'rate(m_total{instance=~".*",job=".*"}[5m])'
