"""The daemon's own instruments: counters and histograms its parts update as they work.

Per-container series are not here: the exporter builds those at scrape time from the latest
samples. These are the few things that have to be counted as they happen.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

SAMPLE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)


class Instruments:
    """Counters and histograms registered in one Prometheus registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.sample_duration = Histogram(
            "nstap_sample_duration_seconds",
            "Wall time taken by one namespace sample (all samplers), excluding socket-table walks.",
            buckets=SAMPLE_BUCKETS,
            registry=registry,
        )
        self.walk_duration = Histogram(
            "nstap_socket_walk_cpu_seconds",
            "CPU time of one per-state TCP socket-table walk (run in a worker thread).",
            buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1),
            registry=registry,
        )
        self.sampler_errors = Counter(
            "nstap_sampler_errors",
            "Samples or attaches in which a sampler failed (the container vanished, a read failed).",
            ["sampler"],
            registry=registry,
        )
        self.samples = Counter(
            "nstap_samples",
            "Namespace samples taken.",
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
