"""Detectors, registered by kind with their parameters and the values each accepts.

Each namespace gets its own detector instances, with the parameters of the config
(``detect.detectors.<kind>``) overridden per container by the label ``nstap.detect.<kind>``:

* ``off`` (or ``false``, ``no``, ``disabled``: the vocabulary of every nstap switch) switches the
  detector off for that container; ``on`` changes nothing (a detector the operator switched off
  stays off: labels are the container's, the host's configuration wins);
* a number sets the detector's main parameter (its threshold);
* ``name=value,name=value`` sets named parameters.

Config and labels go through the same validation (:func:`check_params`): a value that is not a
finite number in the parameter's range is refused — by the config with exit code 2, in a label by
ignoring the label (logged once). The ranges exclude every value that would make a detector trip
on a healthy, idle namespace, so a container cannot make itself trip endlessly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import structlog

from .. import labels as nstap_labels
from . import (
    accept_stall, collapse, dns_failures, interface_down, interface_errors, kernel_drops, listen_overflows, resets, retransmits, syn_recv,
    syn_sent, udp_buffers,
)
from .base import Detector, Finding, Param

log = structlog.get_logger("nstap.detect")

LABEL_PREFIX = nstap_labels.DETECT_PREFIX


@dataclass(frozen=True)
class DetectorSpec:
    """A detector's registration: kind, parameters (defaults and ranges), the one a bare number sets."""

    kind: str
    params: Mapping[str, Param]
    main: str | None
    help: str
    factory: Callable[..., Detector]
    extras: Mapping[str, Callable[[object], object]] = field(default_factory=dict)  # config-only parameters that are not numbers
    @property
    def defaults(self) -> dict[str, float]:
        """Every parameter's default."""
        return {name: p.default for name, p in self.params.items()}


DETECTORS: dict[str, DetectorSpec] = {
    spec.kind: spec
    for spec in (
        DetectorSpec(retransmits.KIND, retransmits.PARAMS, "threshold", "TCP retransmission rate over a window", retransmits.RetransmitDetector),
        DetectorSpec(listen_overflows.KIND, listen_overflows.PARAMS, "min_increase", "listen overflows or drops", listen_overflows.ListenOverflowDetector),
        DetectorSpec(interface_errors.KIND, interface_errors.PARAMS, "min_increase", "interface errors or drops, either veth end", interface_errors.InterfaceErrorDetector),
        DetectorSpec(resets.KIND, resets.PARAMS, "factor", "RSTs sent against the namespace's baseline", resets.ResetSpikeDetector),
        DetectorSpec(interface_down.KIND, interface_down.PARAMS, None, "an interface went down", interface_down.InterfaceDownDetector),
        DetectorSpec(syn_sent.KIND, syn_sent.PARAMS, "seconds", "sockets stuck in SYN_SENT", syn_sent.SynSentDetector),
        DetectorSpec(syn_recv.KIND, syn_recv.PARAMS, "min_retransmits", "SYN-ACKs retransmitted, handshakes not completed", syn_recv.HalfOpenDetector),
        DetectorSpec(accept_stall.KIND, accept_stall.PARAMS, "seconds", "a listener that stopped accepting", accept_stall.AcceptStallDetector),
        DetectorSpec(collapse.KIND, collapse.PARAMS, "fall", "traffic that collapsed while retransmissions or drops went on", collapse.CollapseDetector),
        DetectorSpec(udp_buffers.KIND, udp_buffers.PARAMS, "min_increase", "UDP receive-buffer errors", udp_buffers.UdpBufferDetector),
        DetectorSpec(
            kernel_drops.KIND, kernel_drops.PARAMS, "min_increase", "kernel drops by reason (eBPF)", kernel_drops.KernelDropDetector,
            {"reasons": kernel_drops.check_reasons},
        ),
        DetectorSpec(dns_failures.KIND, dns_failures.PARAMS, "threshold", "failed or unanswered DNS lookups against the baseline (eBPF)",
                     dns_failures.DnsFailureDetector),
    )
}


class LabelError(ValueError):
    """A ``nstap.detect.*`` label value that makes no sense."""


def check_params(spec: DetectorSpec, params: Mapping[str, object]) -> dict[str, float]:
    """The parameters as floats if every name is known and every value allowed; ValueError otherwise."""
    out = {}
    for name, value in params.items():
        if name in spec.extras:
            out[name] = spec.extras[name](value)  # type: ignore[assignment]
            continue
        param = spec.params.get(name)
        if param is None:
            raise ValueError(f"{spec.kind}: unknown parameter {name!r} (known: {', '.join(spec.params) or 'none'})")
        out[name] = param.check(f"{spec.kind}.{name}", value)  # type: ignore[arg-type]
    return out


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise LabelError(f"{text.strip()!r} is not a number") from None


def parse_override(spec: DetectorSpec, value: str) -> tuple[bool | None, dict[str, float]]:
    """Parse one label value into (enabled or None for unchanged, checked parameter overrides)."""
    on = nstap_labels.switch(value)
    if on is not None:
        return on, {}
    text = value.strip().lower()
    if "=" not in text:
        if spec.main is None:
            raise LabelError(f"{spec.kind} takes no parameter: only on or off")
        params: dict[str, object] = {spec.main: _number(text)}
    else:
        params = {}
        for part in text.split(","):
            key, sep, raw = part.partition("=")
            if not sep:
                raise LabelError(f"{spec.kind}: expected name=value, not {part.strip()!r}")
            params[key.strip()] = _number(raw)
    try:
        return True, check_params(spec, params)
    except ValueError as exc:
        raise LabelError(str(exc)) from None


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
                # A label tunes a detector or switches it off; it never switches on one the
                # operator switched off (detect.disabled): that decision is the host's.
                on = on and override_on is not False
                params.update(overrides)
        if on:
            out.append(spec.factory(**params))
    return out


__all__ = ["DETECTORS", "Detector", "DetectorSpec", "Finding", "LabelError", "Param", "build_detectors", "check_params", "parse_override"]
