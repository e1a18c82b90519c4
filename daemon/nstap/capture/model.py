"""What a capture is asked with and answered with: its target, the settings it runs under, a
refusal, and the read model the exporter scrapes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ..registry import WatchedNamespace

SIDES = ("container", "host")


class CaptureRefused(Exception):
    """A capture that cannot start now (limits, no tcpdump); ``status`` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class CaptureSettings:
    """Limits and defaults of captures and flight recorders."""

    snaplen: int = 256
    buffer_kib: int = 4096
    pre_seconds: float = 10.0
    post_seconds: float = 10.0
    max_pre_seconds: float = 60.0  # how far before the trigger an anomaly's window may start
    max_seconds: float = 120.0
    max_bytes: int = 20 * 1024 * 1024
    max_concurrent: int = 4
    max_per_container_per_hour: int = 6
    ring: str = "labeled"  # "off", "labeled" (nstap.capture=ring), "all"
    ring_bytes: int = 8 * 1024 * 1024
    ring_segments: int = 16
    ring_seconds: float = 60.0  # the reach a ring should have; a shorter one is logged
    evidence: bool = True


@dataclass(frozen=True)
class CaptureTarget:
    """The namespace to capture, and the container whose name the capture carries."""

    container: str
    container_id: str
    runtime: str
    netns: int

    @classmethod
    def of(cls, namespace: WatchedNamespace) -> CaptureTarget:
        """The target for a watched namespace (named after its owner)."""
        owner = namespace.owner
        return cls(owner.name, owner.short_id, owner.runtime, namespace.inode)


@dataclass(frozen=True)
class CaptureStats:
    """What the exporter reads of the capture layer, at one moment (:meth:`CaptureEngine.stats`)."""

    reach: list[tuple[int, float]]  # (netns inode, seconds its running flight recorder reaches back)
    total: dict[tuple[str, str, str, str], int]  # (container, id, runtime, reason) -> captures started
    refused: dict[str, int]
    bytes: int
    kernel_drops: int
    failed: int
    running: int
    store_bytes: int
    store_max_bytes: int
    index_bytes: int
    index_pruned: int
    recent: list[tuple[str, list[tuple[str, str, str, str, str, float]]]]
    rings: int
    ring_restarts: int
    ring_lost: int
    ring_backlog: int
    pumps_cut: int


class CaptureReadModel(Protocol):
    """What the exporter needs of the capture layer (the engine): its counters, now."""

    def stats(self) -> CaptureStats: ...
