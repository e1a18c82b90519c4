"""The capture files on disk: ``<id>.pcap``, ``<id>.unfiltered`` (a filtered flight-recorder
capture's packets before filtering), ``<id>.evidence.json`` and its ``.tmp`` while written.

Every file is made 0600 in a 0700 directory; what they hold in bytes is counted here, the one
place that knows which names are capture files. Blocking: called in the index's thread by the
store, which keeps files and rows in step.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

from .pcap import PcapError, read_file, sha256_file

UNFILTERED, TMP = ".unfiltered", ".tmp"
COUNTED = ("*.pcap", "*.evidence.json", "*" + UNFILTERED)  # what takes room in the byte budget


class FileSummary(NamedTuple):
    """What a pcap file holds."""

    bytes: int
    packets: int
    sha256: str


class CaptureFiles:
    """The captures directory."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def make_dirs(self) -> None:
        """The directory and its parent, 0700 (tightened if an older daemon left them wider)."""
        for directory in (self.dir.parent, self.dir):
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(directory, 0o700)

    def path(self, name: str) -> Path:
        return self.dir / name

    @staticmethod
    def pcap_name(capture_id: str) -> str:
        return f"{capture_id}.pcap"

    @staticmethod
    def evidence_name(capture_id: str) -> str:
        return f"{capture_id}.evidence.json"

    def unfiltered_path(self, pcap_name: str) -> Path:
        """Where a filtered flight-recorder capture's packets wait to be filtered into ``pcap_name``."""
        return (self.dir / pcap_name).with_suffix(UNFILTERED)

    def create(self, name: str) -> Path:
        """A new empty 0600 file; FileExistsError if it exists."""
        path = self.dir / name
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        return path

    def create_unfiltered(self, pcap_name: str) -> Path:
        """The (emptied) 0600 file a filtered flight-recorder capture writes its raw packets to."""
        path = self.unfiltered_path(pcap_name)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600))
        return path

    def write_whole(self, name: str, data: bytes) -> None:
        """Write ``name`` whole or not at all (through ``name.tmp``, synced, renamed)."""
        tmp = self.dir / (name + TMP)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        os.replace(tmp, self.dir / name)

    def unfiltered(self) -> list[Path]:
        """The ``*.unfiltered`` files, by name."""
        return sorted(self.dir.glob("*" + UNFILTERED))

    def pcaps(self) -> list[Path]:
        """The ``*.pcap`` files, by name."""
        return sorted(self.dir.glob("*.pcap"))

    def remove_half_written(self) -> int:
        """Delete every ``*.tmp`` (a write a crash cut short); returns how many."""
        gone = 0
        for tmp in self.dir.glob("*" + TMP):
            tmp.unlink(missing_ok=True)
            gone += 1
        return gone

    def remove(self, names: Iterable[str | None]) -> None:
        for name in names:
            if name:
                (self.dir / name).unlink(missing_ok=True)

    def summary(self, name: str | None) -> FileSummary:
        """Size, packets and sha256 of a pcap file (zeros if it is not there)."""
        path = self.dir / name if name else None
        if path is None or not path.exists():
            return FileSummary(0, 0, "")
        try:
            packets = len(read_file(path)[1])
        except PcapError:
            packets = 0
        return FileSummary(path.stat().st_size, packets, sha256_file(path))

    def size(self, names: Iterable[str | None]) -> int:
        """Bytes the named files hold (those that exist)."""
        total = 0
        for name in names:
            try:
                total += (self.dir / name).stat().st_size if name else 0
            except OSError:
                pass
        return total

    def disk_bytes(self) -> int:
        """Bytes of every capture file in the directory (what counts against the budget)."""
        total = 0
        for pattern in COUNTED:
            for p in self.dir.glob(pattern):
                try:
                    total += p.stat().st_size
                except OSError:
                    pass  # evicted meanwhile
        return total
