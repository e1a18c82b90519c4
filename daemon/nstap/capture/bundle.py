"""A capture's bundle: the pcap, its evidence and a short text summary in one ``.tar.gz``.

What an on-call engineer attaches to the incident: everything about one capture in one file that
unpacks anywhere (``tar xzf``), with a summary that answers the first questions without a tool:
what tripped, when it started, when it was detected, what the capture holds.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import re
import tarfile
import threading
import time
from pathlib import Path
from typing import BinaryIO

from ..index import AnomalyRow, CaptureRow


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) + f".{int((ts % 1) * 1000):03d} UTC"


def summary_text(row: CaptureRow, anomaly: AnomalyRow | None) -> str:
    """The bundle's SUMMARY.txt."""
    lines = [f"nstap capture {row.id}", ""]
    lines.append(f"container:     {row.container} ({row.container_id}, {row.runtime}), network namespace {row.netns}")
    if anomaly is not None:
        lines += [
            f"anomaly:       {anomaly.kind} ({anomaly.id})",
            f"what tripped:  {anomaly.summary}",
            f"why:           {anomaly.cause}" + (f": {anomaly.cause_text}" if anomaly.cause_text else ""),
            f"started:       {_when(anomaly.started_at)}",
            f"detected:      {_when(anomaly.first_seen)}"
            + (f" ({anomaly.first_seen - anomaly.started_at:.1f} s after it started)" if anomaly.started_at is not None else ""),
            f"last seen:     {_when(anomaly.last_seen)}",
            f"resolved:      {_when(anomaly.resolved_at)}",
        ]
        for key, value in sorted(anomaly.numbers.items()):
            lines.append(f"  {key}: {value}")
    else:
        lines.append(f"reason:        {row.reason}")
    lines += [
        "",
        f"capture:       {row.state}, {row.packets} packets ({row.pre_packets} before the trigger), {row.bytes} bytes, {row.mode} mode, {row.side} side"
        + (f" ({row.interface})" if row.interface else ""),
        f"window:        {_when(row.window_start)} .. {_when(row.window_end)}",
        f"trigger:       {_when(row.trigger_at)}",
    ]
    if row.pre_truncated:
        lines.append("               the flight recorder no longer reached back to the window's start (pre_truncated)")
    if row.kernel_drops:
        lines.append(f"               {row.kernel_drops} packets dropped by the kernel during the capture")
    if row.error:
        lines.append(f"note:          {row.error}")
    if row.filter:
        lines.append(f"filter:        {row.filter}")
    lines += ["", f"sha256:        {row.sha256}", "", "capture.pcap   the packets (tcpdump -r capture.pcap, or Wireshark)",
              "evidence.json  sockets, interfaces of both veth ends, routes, neighbours, firewall, counter deltas", ""]
    return "\n".join(lines)


def build_bundle(row: CaptureRow, anomaly: AnomalyRow | None, pcap: Path | None, evidence: Path | None) -> bytes:
    """The bundle's bytes in memory (blocking; the API streams them with :func:`write_bundle`)."""
    buf = io.BytesIO()
    write_bundle(buf, row, anomaly, pcap, evidence)
    return buf.getvalue()


def write_bundle(out: BinaryIO, row: CaptureRow, anomaly: AnomalyRow | None, pcap: Path | None, evidence: Path | None) -> None:
    """Write the bundle to ``out`` as it is made (blocking: run it in a worker thread), the same
    bytes for the same capture; files that are gone are left out."""
    prefix = f"nstap-{row.id}"
    stamp = int(row.finished_at or row.created_at)
    # The gzip header's time too is the capture's: the same capture always gives the same bytes.
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=6, mtime=stamp) as gz, tarfile.open(fileobj=gz, mode="w") as tar:

        def add(name: str, data: bytes | None = None, path: Path | None = None) -> None:
            info = tarfile.TarInfo(f"{prefix}/{name}")
            info.mtime = stamp
            info.mode = 0o600
            if path is not None:
                try:
                    with open(path, "rb") as f:
                        info.size = path.stat().st_size
                        tar.addfile(info, f)
                except OSError:
                    return
            else:
                assert data is not None
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))

        add("SUMMARY.txt", summary_text(row, anomaly).encode())
        if pcap is not None:
            add("capture.pcap", path=pcap)
        if evidence is not None:
            add("evidence.json", path=evidence)


def bundle_name(row: CaptureRow) -> str:
    """The download's file name (the container's name is the container's: only safe characters)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", row.container)[:64].lstrip(".") or "capture"
    return f"nstap-{safe}-{row.id}.tar.gz"



class ChunkSink(io.RawIOBase):
    """A writable file whose chunks go to an asyncio queue on ``loop`` (None at the end), with at
    most ``window`` chunks in flight: a bundle is streamed to its client as it is made, never held
    whole in memory. ``abandon()`` (the client went) makes the writer's next write fail."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, window: int = 4) -> None:
        super().__init__()
        self._loop, self._queue = loop, queue
        self._slots = threading.Semaphore(window)
        self._abandoned = False

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:  # type: ignore[override]
        self._slots.acquire()
        if self._abandoned:
            raise BrokenPipeError("the client is gone")
        self._loop.call_soon_threadsafe(self._queue.put_nowait, bytes(data))
        return len(data)

    def taken(self) -> None:
        """One chunk was sent: room for another."""
        self._slots.release()

    def end(self) -> None:
        """No more chunks (from the writer's thread)."""
        self._loop.call_soon_threadsafe(self._queue.put_nowait, None)

    def abandon(self) -> None:
        """Stop the writer (from the loop): its next write raises."""
        self._abandoned = True
        self._slots.release()
