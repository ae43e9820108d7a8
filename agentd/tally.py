"""Metrics counted with a plain addition on the reactor's thread, read when Prometheus collects.

prometheus_client takes a lock for every increment and observation, so that any thread may
count, and checks on every call that the metric is not a parent of labelled children. The
metrics agentd counts for every prompt and every message are only ever counted by the reactor's
thread, where no two increments interleave, and always through a bound child: those are kept
here as plain numbers, and handed to the registry when it collects, as prometheus_client's own
metrics of the same kind would be (the same families, names, labels, buckets and ``_created``
samples).

The scrape runs in the reactor's thread pool and reads each number as it is (a read of one
attribute is atomic), so a scrape during a prompt sees that prompt counted or not, as with
prometheus_client. Nothing here may be counted from another thread.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Iterator, Sequence
from typing import Generic, Protocol, TypeVar

from prometheus_client import CollectorRegistry
from prometheus_client import metrics as _prometheus_metrics
from prometheus_client.metrics import Histogram as _PrometheusHistogram
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import INF, floatToGoString

DEFAULT_BUCKETS = _PrometheusHistogram.DEFAULT_BUCKETS


class Increments(Protocol):
    """A counter series of either kind: this module's, or a prometheus_client child."""

    def inc(self, amount: float = 1) -> None: ...


def _use_created() -> bool:
    # prometheus_client's own switch (disable_created_metrics()), so both kinds agree.
    return bool(getattr(_prometheus_metrics, "_use_created", True))


class CounterValue:
    """One counter series."""

    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        self.value += amount


class GaugeValue:
    """One gauge series."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        self.value += amount

    def dec(self, amount: float = 1) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = float(value)


class HistogramValue:
    """One histogram series: the count in each bucket (not cumulative) and the sum."""

    __slots__ = ("_bounds", "counts", "created", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self._bounds = bounds
        self.counts = [0.0] * len(bounds)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, amount: float) -> None:
        # The first bucket whose upper bound is at least the amount, as prometheus_client's.
        self.counts[bisect.bisect_left(self._bounds, amount)] += 1
        self.sum += amount


V = TypeVar("V", CounterValue, GaugeValue, HistogramValue)


class _Family(Collector, Generic[V]):
    """A metric and its labelled series, registered in ``registry``."""

    # What prometheus_client leaves off the family's name (a counter's "_total").
    _suffix = ""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        registry: CollectorRegistry,
    ) -> None:
        self.name = name.removesuffix(self._suffix)
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], V] = {}
        if not self.labelnames:
            self._children[()] = self._series()
        registry.register(self)

    def labels(self, *values: object) -> V:
        """The series of these label values (created at 0 on first use)."""
        if len(values) != len(self.labelnames) or not values:
            raise ValueError(f"{self.name} takes label values for {self.labelnames}")
        key = tuple(str(value) for value in values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._series()
        return child

    def only(self) -> V:
        """The one series of a metric without labels."""
        if self.labelnames:
            raise ValueError(f"{self.name} has labels {self.labelnames}")
        return self._children[()]

    def describe(self) -> Iterator[Metric]:
        yield self._family()

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for key, child in list(self._children.items()):
            self._add(family, key, child)
        yield family

    def _series(self) -> V:
        raise NotImplementedError

    def _family(self) -> Metric:
        raise NotImplementedError

    def _add(self, family: Metric, key: tuple[str, ...], child: V) -> None:
        raise NotImplementedError


class Counter(_Family[CounterValue]):
    """A counter, as ``prometheus_client.Counter`` exports it."""

    _suffix = "_total"

    def _series(self) -> CounterValue:
        return CounterValue()

    def _family(self) -> Metric:
        return CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def _add(self, family: Metric, key: tuple[str, ...], child: CounterValue) -> None:
        created = child.created if _use_created() else None
        assert isinstance(family, CounterMetricFamily)
        family.add_metric(key, child.value, created=created)


class Gauge(_Family[GaugeValue]):
    """A gauge, as ``prometheus_client.Gauge`` exports it."""

    def _series(self) -> GaugeValue:
        return GaugeValue()

    def _family(self) -> Metric:
        return GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def _add(self, family: Metric, key: tuple[str, ...], child: GaugeValue) -> None:
        assert isinstance(family, GaugeMetricFamily)
        family.add_metric(key, child.value)


class Histogram(_Family[HistogramValue]):
    """A histogram, as ``prometheus_client.Histogram`` exports it (cumulative buckets, +Inf
    last, count and sum)."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        registry: CollectorRegistry,
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> None:
        bounds = sorted(float(b) for b in buckets)
        if not bounds or bounds[-1] != INF:
            bounds.append(INF)
        self._bounds = tuple(bounds)
        # The label values prometheus_client writes for them ("0.005", "+Inf").
        self._names = tuple(floatToGoString(b) for b in self._bounds)  # type: ignore[no-untyped-call]
        super().__init__(name, documentation, labelnames, registry=registry)

    def _series(self) -> HistogramValue:
        return HistogramValue(self._bounds)

    def _family(self) -> Metric:
        return HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def _add(self, family: Metric, key: tuple[str, ...], child: HistogramValue) -> None:
        assert isinstance(family, HistogramMetricFamily)
        counts, total, cumulative = list(child.counts), child.sum, 0.0
        buckets = []
        for name, count in zip(self._names, counts, strict=True):
            cumulative += count
            buckets.append((name, cumulative))
        family.add_metric(key, buckets, total)
        if _use_created():
            labels = dict(zip(self.labelnames, key, strict=True))
            family.samples.append(Sample(self.name + "_created", labels, child.created))
