"""Detectors, registered by kind with their parameters and defaults.

Each namespace gets its own detector instances, with the parameters of the config
(``detect.detectors.<kind>``) overridden per container by the label ``nstap.detect.<kind>``:

* ``off`` (or ``false``, ``no``, ``disabled``) switches the detector off for that container,
  ``on`` back on;
* a number sets the detector's main parameter (its threshold);
* ``name=value,name=value`` sets named parameters.

A label that cannot be understood is ignored (and logged once), never fatal.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import structlog

from . import interface_down, interface_errors, listen_overflows, resets, retransmits, syn_sent, udp_buffers
from .base import Detector, Finding

log = structlog.get_logger("nstap.detect")

LABEL_PREFIX = "nstap.detect."
OFF = {"off", "false", "no", "disabled"}
ON = {"on", "true", "yes", "enabled"}


@dataclass(frozen=True)
class DetectorSpec:
    """A detector's registration: kind, parameters with defaults, the one a bare number sets."""

    kind: str
    defaults: Mapping[str, float]
    main: str | None
    help: str
    factory: Callable[..., Detector]


DETECTORS: dict[str, DetectorSpec] = {
    spec.kind: spec
    for spec in (
        DetectorSpec(retransmits.KIND, retransmits.DEFAULTS, "threshold", "TCP retransmission rate over a window", retransmits.RetransmitDetector),
        DetectorSpec(listen_overflows.KIND, listen_overflows.DEFAULTS, "min_increase", "listen overflows or drops", listen_overflows.ListenOverflowDetector),
        DetectorSpec(interface_errors.KIND, interface_errors.DEFAULTS, "min_increase", "interface errors or drops, either veth end", interface_errors.InterfaceErrorDetector),
        DetectorSpec(resets.KIND, resets.DEFAULTS, "factor", "RSTs sent against the namespace's baseline", resets.ResetSpikeDetector),
        DetectorSpec(interface_down.KIND, interface_down.DEFAULTS, None, "an interface went down", interface_down.InterfaceDownDetector),
        DetectorSpec(syn_sent.KIND, syn_sent.DEFAULTS, "seconds", "sockets stuck in SYN_SENT", syn_sent.SynSentDetector),
        DetectorSpec(udp_buffers.KIND, udp_buffers.DEFAULTS, "min_increase", "UDP receive-buffer errors", udp_buffers.UdpBufferDetector),
    )
}


class LabelError(ValueError):
    """A ``nstap.detect.*`` label value that makes no sense."""


def parse_override(spec: DetectorSpec, value: str) -> tuple[bool | None, dict[str, float]]:
    """Parse one label value into (enabled or None for unchanged, parameter overrides)."""
    text = value.strip().lower()
    if text in OFF:
        return False, {}
    if text in ON:
        return True, {}
    try:
        number = float(text)
    except ValueError:
        pass
    else:
        if spec.main is None:
            raise LabelError(f"{spec.kind} takes no number")
        return True, {spec.main: number}
    params = {}
    for part in text.split(","):
        key, sep, raw = part.partition("=")
        key = key.strip()
        if not sep or key not in spec.defaults:
            raise LabelError(f"{spec.kind}: unknown parameter {key!r} (known: {', '.join(spec.defaults) or 'none'})")
        try:
            params[key] = float(raw)
        except ValueError:
            raise LabelError(f"{spec.kind}: {key} must be a number") from None
    return True, params


def build_detectors(
    config: Mapping[str, Mapping[str, float]],
    enabled: Mapping[str, bool],
    labels: Mapping[str, str],
    container: str = "",
) -> list[Detector]:
    """The detectors of one namespace: config parameters, then its owner's label overrides."""
    out = []
    for kind, spec in DETECTORS.items():
        on = enabled.get(kind, True)
        params = {**spec.defaults, **config.get(kind, {})}
        label = labels.get(LABEL_PREFIX + kind)
        if label is not None:
            try:
                override_on, overrides = parse_override(spec, label)
            except LabelError as exc:
                log.warning("detector_label_ignored", container=container, label=LABEL_PREFIX + kind, value=label, error=str(exc))
            else:
                on = on if override_on is None else override_on
                params.update(overrides)
        if on:
            out.append(spec.factory(**params))
    return out


__all__ = ["DETECTORS", "Detector", "DetectorSpec", "Finding", "LabelError", "build_detectors", "parse_override"]
