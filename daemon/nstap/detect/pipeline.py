"""The detection pipeline: every sample of every watched namespace through its detectors."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence

import structlog

from ..registry import ContainerRegistry, WatchedNamespace
from ..samples import NamespaceSample, SampleStore
from ..supervisor import TaskSupervisor
from . import DETECTORS, LABEL_PREFIX, build_detectors
from .base import Detector, Finding
from .incidents import IncidentTracker

log = structlog.get_logger("nstap.detect")


def detect_labels(ns: WatchedNamespace) -> dict[str, str]:
    """The namespace's ``nstap.detect.*`` labels, from every member (the owner's win)."""
    return {k: v for m in reversed(ns.members) for k, v in m.labels.items() if k.startswith(LABEL_PREFIX)}


class DetectionPipeline:
    """Keeps detector instances per namespace and hands their findings to the incident tracker."""

    def __init__(
        self,
        registry: ContainerRegistry,
        tracker: IncidentTracker,
        params: Mapping[str, Mapping[str, float]],
        enabled: Mapping[str, bool],
        supervisor: TaskSupervisor | None = None,
        held: Callable[[WatchedNamespace, float], str] | None = None,
    ) -> None:
        self.registry = registry
        self.held = held  # what keeps a namespace's processes from running ("" if nothing): for detectors that ask
        self.tracker = tracker
        self.params = params
        self.enabled = enabled
        self.supervisor = supervisor or TaskSupervisor()
        self._detectors: dict[int, list[Detector]] = {}
        self._labels_of: dict[int, dict[str, str]] = {}  # the labels each namespace's detectors were built with
        self._previous: dict[int, NamespaceSample] = {}  # each namespace's sample before the latest: an anomaly's cause is measured from it
        self._broken: set[tuple[int, str]] = set()  # (netns, kind) whose failure was logged already
        self._pending: list[NamespaceSample] = []  # stored since the last look: one turn of the event loop's worth

    def reconfigure(self, params: Mapping[str, Mapping[str, float]], enabled: Mapping[str, bool]) -> None:
        """New parameters (a configuration reload): every namespace's detectors are built again at
        its next sample (their baselines start afresh)."""
        self.params = params
        self.enabled = enabled
        self._detectors.clear()
        self._labels_of.clear()

    def start(self, samples: SampleStore) -> None:
        """Receive every sample from now on, and follow namespaces leaving the registry."""
        samples.subscribe(self._queue)
        self.registry.subscribe(self._forget_gone)

    def _queue(self, sample: NamespaceSample) -> None:
        """A sample was stored: it is looked at with the others stored in the same turn of the event
        loop (a slice of the sampling round, at most Ticker.SLICE long), right after it."""
        pending = self._pending
        pending.append(sample)
        if len(pending) == 1:
            try:
                asyncio.get_running_loop().call_soon(self._flush)
            except RuntimeError:  # stored outside the event loop: looked at now
                self._flush()

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        try:
            self.on_samples(batch)
        except Exception as exc:  # noqa: BLE001 - as the sample store does for each of its subscribers
            self.supervisor.failed("sample-listener", exc)

    def on_sample(self, sample: NamespaceSample) -> None:
        """Run the namespace's detectors over one sample."""
        self.on_samples((sample,))

    def on_samples(self, samples: Sequence[NamespaceSample]) -> None:
        """Run each sample's detectors over it, then hand each namespace's findings to the tracker.

        The detectors run one kind over every sample of the batch, then the next kind (each
        namespace's own instances, each in its order): the interpreter's code for one kind stays in
        the CPU's caches from one namespace to the next, where each namespace's twelve in turn
        found it evicted by the others' (bench/bench_detectors.py: about a third cheaper, cold).
        They are not part of the CPU a namespace's sample is charged for (NamespaceWatcher.account):
        what they go over is bounded by the samplers (interfaces, listening ports, drop reasons) and
        by the parameters' ranges (windows), and the budget slows only a namespace that makes its
        samplers read more than an ordinary one, which is not what makes a detector cost.
        """
        namespaces = self.registry.namespaces()
        batch: list[tuple[WatchedNamespace, NamespaceSample, NamespaceSample | None, list[Detector], list[Finding]]] = []
        for sample in samples:
            ns = namespaces.get(sample.netns)
            if ns is None:
                continue
            detectors = self._detectors.get(sample.netns)
            if detectors is None:
                try:
                    detectors = self._build(sample.netns, ns)
                except Exception as exc:  # noqa: BLE001 - one namespace's detectors must not stop the batch's others
                    self._failed(sample.netns, "build", exc)
                    continue
            previous = self._previous.get(sample.netns)
            self._previous[sample.netns] = sample
            batch.append((ns, sample, previous, detectors, []))
        for k in range(max((len(entry[3]) for entry in batch), default=0)):
            for _ns, sample, _previous, detectors, findings in batch:
                if k >= len(detectors):
                    continue
                detector = detectors[k]
                try:
                    finding = detector.observe(sample)
                except Exception as exc:  # noqa: BLE001 - one detector's bug must not stop sampling or the others
                    self._failed(sample.netns, detector.kind, exc)
                    continue
                if finding is not None:
                    findings.append(finding)
        for ns, sample, previous, _detectors, findings in batch:
            try:
                seen = set()
                for finding in findings:
                    seen.add(finding.kind)
                    self.tracker.found(ns, finding, sample.taken_at, sample.interval, sample=sample, previous=previous)
                self.tracker.quiet(sample.netns, seen, sample.taken_at, DETECTORS)
            except Exception as exc:  # noqa: BLE001 - as the sample store does for each of its subscribers
                self.supervisor.failed("sample-listener", exc, netns=sample.netns)

    def _failed(self, netns: int, kind: str, exc: Exception) -> None:
        """A detector of ``netns`` failed (``kind`` "build": building them did): logged once per
        namespace and kind, counted every time."""
        key = (netns, kind)
        if key not in self._broken:
            self._broken.add(key)
            self.supervisor.failed("detector", exc, kind=kind, netns=netns)
        else:
            self.supervisor.count("detector")

    def _build(self, netns: int, ns: WatchedNamespace) -> list[Detector]:
        labels = self._labels_of[netns] = detect_labels(ns)
        detectors = self._detectors[netns] = build_detectors(self.params, self.enabled, labels, ns.owner.name)
        if self.held is not None:
            for detector in detectors:
                if hasattr(detector, "held"):
                    detector.held = self._held_of(netns)
        return detectors

    def _held_of(self, netns: int) -> Callable[[], str]:
        def held() -> str:
            ns = self.registry.namespaces().get(netns)
            return self.held(ns, time.time()) if ns is not None and self.held is not None else ""
        return held

    def _forget_gone(self) -> None:
        namespaces = self.registry.namespaces()
        for netns in [n for n in self._detectors if n not in namespaces]:
            del self._detectors[netns]
            self._labels_of.pop(netns, None)
            self._previous.pop(netns, None)
            self.tracker.forget(netns)
        # A member's nstap.detect.* labels changed (a container that joined, one that left, or a
        # runtime that relabels): its detectors are built again at its next sample.
        for netns, ns in namespaces.items():
            if netns in self._detectors and detect_labels(ns) != self._labels_of.get(netns, {}):
                del self._detectors[netns]
        self._broken = {key for key in self._broken if key[0] in namespaces}
        for netns in [n for n in self._previous if n not in namespaces]:
            del self._previous[netns]
        self.tracker.prune({r.short_id for r in self.registry.containers()})
