"""The detection pipeline: every sample of every watched namespace through its detectors."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import structlog

from ..registry import ContainerRegistry, WatchedNamespace
from ..samples import NamespaceSample, SampleStore
from ..supervisor import TaskSupervisor
from . import DETECTORS, LABEL_PREFIX, build_detectors
from .base import Detector
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

    def reconfigure(self, params: Mapping[str, Mapping[str, float]], enabled: Mapping[str, bool]) -> None:
        """New parameters (a configuration reload): every namespace's detectors are built again at
        its next sample (their baselines start afresh)."""
        self.params = params
        self.enabled = enabled
        self._detectors.clear()
        self._labels_of.clear()

    def start(self, samples: SampleStore) -> None:
        """Receive every sample from now on, and follow namespaces leaving the registry."""
        samples.subscribe(self.on_sample)
        self.registry.subscribe(self._forget_gone)

    def on_sample(self, sample: NamespaceSample) -> None:
        """Run the namespace's detectors over one sample."""
        ns = self.registry.namespaces().get(sample.netns)
        if ns is None:
            return
        detectors = self._detectors.get(sample.netns)
        if detectors is None:
            labels = self._labels_of[sample.netns] = detect_labels(ns)
            detectors = self._detectors[sample.netns] = build_detectors(self.params, self.enabled, labels, ns.owner.name)
            if self.held is not None:
                for detector in detectors:
                    if hasattr(detector, "held"):
                        detector.held = self._held_of(sample.netns)
        seen = set()
        previous = self._previous.get(sample.netns)
        self._previous[sample.netns] = sample
        for detector in detectors:
            try:
                finding = detector.observe(sample)
            except Exception as exc:  # noqa: BLE001 - one detector's bug must not stop sampling or the others
                key = (sample.netns, detector.kind)
                if key not in self._broken:  # logged once per namespace and kind, counted every time
                    self._broken.add(key)
                    self.supervisor.failed("detector", exc, kind=detector.kind, netns=sample.netns)
                else:
                    self.supervisor.count("detector")
                continue
            if finding is not None:
                seen.add(finding.kind)
                self.tracker.found(ns, finding, sample.taken_at, sample.interval, sample=sample, previous=previous)
        self.tracker.quiet(sample.netns, seen, sample.taken_at, DETECTORS)

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
