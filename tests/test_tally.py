"""agentd's reactor-thread metrics export exactly what prometheus_client's own would.

Each test counts the same things into a prometheus_client metric and into its ``agentd.tally``
twin, each in a registry of its own, and compares what a scrape of each reads: the text
format and OpenMetrics, every sample, with only the ``_created`` timestamps told apart.
"""

from __future__ import annotations

import re

import prometheus_client
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest

from agentd import metrics, tally


def scraped(registry: CollectorRegistry) -> tuple[str, str]:
    """Both expositions, with every ``_created`` value written as 0."""
    text = prometheus_client.generate_latest(registry).decode()
    open_metrics = openmetrics_latest(registry).decode()
    created = re.compile(r"^(\S+_created(?:\{[^}]*\})?) \S+$", re.M)
    return created.sub(r"\1 0", text), created.sub(r"\1 0", open_metrics)


def twins() -> tuple[CollectorRegistry, CollectorRegistry]:
    return CollectorRegistry(auto_describe=True), CollectorRegistry(auto_describe=True)


def test_a_counter_exports_as_prometheus_clients_does() -> None:
    theirs, ours = twins()
    args = ("demo_messages_total", "Messages relayed, by direction", ["direction"])
    reference = prometheus_client.Counter(*args, registry=theirs)
    counter = tally.Counter(*args, registry=ours)
    for direction, amounts in (("to_client", (1, 4, 0.5)), ("to_agent", ()), ("other", (7,))):
        reference.labels(direction)
        counter.labels(direction)
        for amount in amounts:
            reference.labels(direction).inc(amount)
            counter.labels(direction).inc(amount)
    assert scraped(ours) == scraped(theirs)
    assert ours.get_sample_value("demo_messages_total", {"direction": "to_client"}) == 5.5


def test_a_counter_without_labels_and_its_created_samples() -> None:
    theirs, ours = twins()
    reference = prometheus_client.Counter("demo_total", "Things", registry=theirs)
    counter = tally.Counter("demo_total", "Things", registry=ours)
    reference.inc(3)
    counter.only().inc(3)
    assert scraped(ours) == scraped(theirs)
    assert ours.get_sample_value("demo_created") == pytest.approx(
        theirs.get_sample_value("demo_created"), abs=5
    )
    prometheus_client.disable_created_metrics()
    try:
        assert scraped(ours) == scraped(theirs)
        assert "_created" not in scraped(ours)[0]
    finally:
        prometheus_client.enable_created_metrics()


def test_a_gauge_exports_as_prometheus_clients_does() -> None:
    theirs, ours = twins()
    args = ("demo_in_flight", "Queries in flight", ["agent"])
    reference = prometheus_client.Gauge(*args, registry=theirs)
    gauge = tally.Gauge(*args, registry=ours)
    for g in (reference, gauge):
        g.labels("echo").inc()
        g.labels("echo").inc(2)
        g.labels("echo").dec()
        g.labels("claude").set(7)
        g.labels("claude").dec(0.25)
    assert scraped(ours) == scraped(theirs)


def test_a_histogram_puts_each_value_in_prometheus_clients_bucket() -> None:
    theirs, ours = twins()
    buckets = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
    args = ("demo_latency_seconds", "Latency by operation", ["operation"])
    reference = prometheus_client.Histogram(*args, buckets=buckets, registry=theirs)
    histogram = tally.Histogram(*args, buckets=buckets, registry=ours)
    # Below the first bound, on bounds (a value equal to a bound is in its bucket), between
    # them, and above the last (+Inf).
    values = (0.0, 0.0001, 0.0005, 0.0007, 0.001, 0.025, 0.0999, 1, 1.0001, 30, 1e9)
    for value in values:
        reference.labels("prompt_gate").observe(value)
        histogram.labels("prompt_gate").observe(value)
    reference.labels("ping")
    histogram.labels("ping")
    assert scraped(ours) == scraped(theirs)
    gate = {"operation": "prompt_gate"}
    assert ours.get_sample_value("demo_latency_seconds_count", gate) == len(values)
    assert ours.get_sample_value("demo_latency_seconds_bucket", {**gate, "le": "0.001"}) == 5


def test_a_histogram_with_default_buckets_or_an_explicit_inf() -> None:
    theirs, ours = twins()
    reference = prometheus_client.Histogram("demo_seconds", "Durations", registry=theirs)
    histogram = tally.Histogram("demo_seconds", "Durations", registry=ours)
    explicit = (1, 5, float("inf"))
    reference_inf = prometheus_client.Histogram(
        "demo_inf", "Inf", buckets=explicit, registry=theirs
    )
    histogram_inf = tally.Histogram("demo_inf", "Inf", buckets=explicit, registry=ours)
    for value in (0.003, 0.2, 4, 11, 100):
        reference.observe(value)
        histogram.only().observe(value)
        reference_inf.observe(value)
        histogram_inf.only().observe(value)
    assert scraped(ours) == scraped(theirs)


def test_wrong_use_is_refused_as_prometheus_client_refuses_it() -> None:
    registry = CollectorRegistry(auto_describe=True)
    counter = tally.Counter("demo_total", "Things", ["kind"], registry=registry)
    with pytest.raises(ValueError):
        counter.labels()
    with pytest.raises(ValueError):
        counter.labels("a", "b")
    with pytest.raises(ValueError):
        counter.only()
    with pytest.raises(ValueError):
        counter.labels("a").inc(-1)
    assert registry.get_sample_value("demo_total", {"kind": "a"}) == 0
    # A name taken in the registry is refused, whichever kind took it.
    with pytest.raises(ValueError):
        tally.Counter("demo_total", "Again", registry=registry)
    with pytest.raises(ValueError):
        prometheus_client.Counter("demo", "Again", registry=registry)


def test_agentds_per_prompt_metrics_are_tallies_in_its_registry() -> None:
    """The metrics counted for every prompt are this module's; scraping them works."""
    for metric in (metrics.MESSAGES, metrics.BYTES, metrics.QUERIES, metrics.REDIS_LATENCY):
        assert isinstance(metric, tally.Counter | tally.Histogram)
    text = prometheus_client.generate_latest(metrics.REGISTRY).decode()
    assert "# TYPE agentd_messages_total counter" in text
    assert "# TYPE agentd_redis_latency_seconds histogram" in text
