"""The daemon's own instruments: counters and histograms its parts update as they work.

Per-container series are not here: the exporter builds those at scrape time from the latest
samples. These are the few things that have to be counted as they happen.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
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


def open_fds(fd_dir: str = "/proc/self/fd") -> int:
    """How many descriptors the process holds: the size the kernel reports for its fd directory
    (Linux 6.2 and later count the open descriptors there, in constant time); where that is 0 (an
    older kernel), the directory's entries, counted one by one."""
    size = os.stat(fd_dir).st_size
    return size if size > 0 else len(os.listdir(fd_dir))


class ProcessCollector(Collector):
    """The standard ``process_*`` families of prometheus-client's ProcessCollector (same names, help
    and values), with ``process_open_fds`` counted by :func:`open_fds`. prometheus-client lists
    ``/proc/self/fd``: beside 1,000 containers the daemon holds about 7,000 descriptors, and that
    listing took 40 ms of each scrape there (it gives up the GIL at every entry and waits for it
    back behind the sampling round)."""

    def __init__(self, registry: CollectorRegistry, proc: str = "/proc/self") -> None:
        self.proc = proc
        self.ticks = os.sysconf("SC_CLK_TCK")
        self.pagesize = os.sysconf("SC_PAGE_SIZE")
        with open("/proc/stat", "rb") as stat:
            self.btime = next(float(line.split()[1]) for line in stat if line.startswith(b"btime "))
        registry.register(self)

    def collect(self) -> Iterator[Metric]:
        try:
            with open(f"{self.proc}/stat", "rb") as stat:
                parts = stat.read().rsplit(b")", 1)[-1].split()
            with open(f"{self.proc}/limits", "rb") as limits:
                max_fds = next(float(line.split()[3]) for line in limits if line.startswith(b"Max open file"))
            fds = open_fds(f"{self.proc}/fd")
        except (OSError, StopIteration, IndexError, ValueError):
            return
        yield GaugeMetricFamily("process_virtual_memory_bytes", "Virtual memory size in bytes.", value=float(parts[20]))
        yield GaugeMetricFamily("process_resident_memory_bytes", "Resident memory size in bytes.", value=float(parts[21]) * self.pagesize)
        yield GaugeMetricFamily(
            "process_start_time_seconds", "Start time of the process since unix epoch in seconds.", value=float(parts[19]) / self.ticks + self.btime
        )
        yield CounterMetricFamily(
            "process_cpu_seconds", "Total user and system CPU time spent in seconds.", value=(float(parts[11]) + float(parts[12])) / self.ticks
        )
        yield GaugeMetricFamily("process_open_fds", "Number of open file descriptors.", value=fds)
        yield GaugeMetricFamily("process_max_fds", "Maximum number of open file descriptors.", value=max_fds)


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
        self.walks_deferred = Counter(
            "nstap_socket_walks_deferred",
            "Samples at which a namespace's per-state TCP socket walk was due but waited for the host's walk budget "
            "(socket_walk.budget_ms per container-sample, held at every round; see nstap.walks).",
            registry=registry,
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
        self.renders_ahead = Counter(
            "nstap_metrics_renders_ahead",
            "Bodies of /metrics rendered after a sampling round for a scrape expected before the next one ended (metrics.render_ahead), "
            "by what became of each: served, or unused (the scrape came later, asked another encoding, or a namespace came or went); "
            "and missed: a scrape expected from a steady cadence that came when no body was made for it (rendered at once).",
            ["result"],
            registry=registry,
        )
        for result in ("served", "unused", "missed"):
            self.renders_ahead.labels(result=result)
