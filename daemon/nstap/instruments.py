"""The daemon's own instruments: counters and histograms its parts update as they work.

Per-container series are not here: the exporter builds those at scrape time from the latest
samples. These are the few things that have to be counted as they happen.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

SAMPLE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)


class LoopHistogram(Collector):
    """A histogram observed only from the event loop's thread, so without the locks of
    prometheus-client's Histogram (which take about 2 µs per observation, once per sample)."""

    def __init__(self, name: str, help: str, buckets: Sequence[float], registry: CollectorRegistry) -> None:
        self.name = name
        self.help = help
        self.bounds = tuple(buckets)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        registry.register(self)

    def observe(self, value: float) -> None:
        """Count one observation."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        """Observations so far."""
        return sum(self.counts)

    def collect(self) -> Iterator[Metric]:
        # Called from the metrics thread while the loop observes: copy first (one C-level copy
        # under the GIL), so the buckets, count and sum belong together.
        counts, total_sum = list(self.counts), self.sum
        cumulative = []
        total = 0
        for bound, n in zip((*self.bounds, float("inf")), counts):
            total += n
            cumulative.append((str(bound) if bound != float("inf") else "+Inf", total))
        yield HistogramMetricFamily(self.name, self.help, buckets=cumulative, sum_value=total_sum)


class Instruments:
    """Counters and histograms registered in one Prometheus registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.sample_duration = LoopHistogram(
            "nstap_sample_duration_seconds",
            "Wall time taken by one namespace sample (all samplers), excluding socket-table walks; _count is the number of samples.",
            SAMPLE_BUCKETS,
            registry,
        )
        self.walk_duration = LoopHistogram(
            "nstap_socket_walk_cpu_seconds",
            "CPU time of one per-state TCP socket-table walk (run in a worker thread).",
            (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1),
            registry,
        )
        self.tick_lag = LoopHistogram(
            "nstap_tick_lag_seconds",
            "How late each sampling tick started (event-loop lateness: anything that blocks the loop shows here).",
            (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry,
        )
        self.task_failures = Counter(
            "nstap_task_failures",
            "Failures of the daemon's supervised tasks and listeners (each logged with its traceback; services are restarted).",
            ["task"],
            registry=registry,
        )
        self.sampler_errors = Counter(
            "nstap_sampler_errors",
            "Samples or attaches in which a sampler failed (the container vanished, a read failed).",
            ["sampler"],
            registry=registry,
        )
        self.attaches = Counter(
            "nstap_watcher_attaches",
            "Namespace watchers attached.",
            registry=registry,
        )
        self.detaches = Counter(
            "nstap_watcher_detaches",
            "Namespace watchers detached.",
            registry=registry,
        )
