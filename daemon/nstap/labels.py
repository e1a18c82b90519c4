"""The container labels nstap reads, and how their values are understood.

Labels are set by whoever starts the container, so they are hostile input: only ``nstap.*`` and the
compose labels are kept at all (a container with ten thousand labels costs no more than one with
none), each value at most MAX_VALUE characters. ``nstap.enable``, ``nstap.capture`` and the compose
labels are always kept; of the others, at most MAX_KEPT ``nstap.detect.*`` and MAX_KEPT other
``nstap.*`` ones (so no number of junk labels can push an opt-out out). Every switch speaks the
same vocabulary: ``off``/``false``/``no``/``disabled`` and ``on``/``true``/``yes``/``enabled``,
in any case; anything else is not a switch.

* ``nstap.enable=off``: the container is not watched (listed only).
* ``nstap.capture=off``: its network namespace is never captured nor recorded;
  ``nstap.capture=ring``: it gets a flight recorder.
* ``nstap.probe=off``: its published ports are not probed.
* ``nstap.detect.<kind>=...``: per-container detector overrides (see :mod:`nstap.detect`).
"""

from __future__ import annotations

from collections.abc import Mapping

PREFIX = "nstap."
ENABLE = "nstap.enable"
CAPTURE = "nstap.capture"
PROBE = "nstap.probe"
DETECT_PREFIX = "nstap.detect."
COMPOSE_PROJECT = "com.docker.compose.project"
COMPOSE_SERVICE = "com.docker.compose.service"
PODMAN_COMPOSE_PROJECT = "io.podman.compose.project"
PODMAN_COMPOSE_SERVICE = "io.podman.compose.service"
ALWAYS_KEPT = frozenset({ENABLE, CAPTURE, PROBE, COMPOSE_PROJECT, COMPOSE_SERVICE, PODMAN_COMPOSE_PROJECT, PODMAN_COMPOSE_SERVICE})

OFF = frozenset({"off", "false", "no", "disabled"})
ON = frozenset({"on", "true", "yes", "enabled"})
MAX_KEPT = 64
MAX_VALUE = 256
RING = "ring"


def switch(value: str | None) -> bool | None:
    """True or False for a switch word, None for anything else (or no value)."""
    if value is None:
        return None
    text = value.strip().lower()
    if text in ON:
        return True
    if text in OFF:
        return False
    return None


def kept(labels: Mapping[object, object]) -> dict[str, str]:
    """The labels nstap uses, out of all of a container's labels, bounded in number and size."""
    out: dict[str, str] = {}
    detect = other = 0
    for key, value in labels.items():
        if not isinstance(key, str) or not isinstance(value, str) or len(value) > MAX_VALUE or len(key) > MAX_VALUE:
            continue
        if key in ALWAYS_KEPT:
            out[key] = value
        elif key.startswith(DETECT_PREFIX):
            if detect < MAX_KEPT:
                out[key] = value
                detect += 1
        elif key.startswith(PREFIX) and other < MAX_KEPT:
            out[key] = value
            other += 1
    return out


def watch_enabled(labels: Mapping[str, str]) -> bool:
    """False when the container opted out of watching (``nstap.enable=off``)."""
    return switch(labels.get(ENABLE)) is not False


def capture_opted_out(labels: Mapping[str, str]) -> bool:
    """True for a container labelled ``nstap.capture=off``: its packets are never captured."""
    return switch(labels.get(CAPTURE)) is False


def probe_opted_out(labels: Mapping[str, str]) -> bool:
    """True for a container labelled ``nstap.probe=off``: its published ports are never probed."""
    return switch(labels.get(PROBE)) is False


def wants_ring(labels: Mapping[str, str]) -> bool:
    """True for a container labelled ``nstap.capture=ring``."""
    return labels.get(CAPTURE, "").strip().lower() == RING
