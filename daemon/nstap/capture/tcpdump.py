"""tcpdump, run inside a container's network namespace and supervised.

The container is never touched: ``nsenter --net`` puts tcpdump (the host's binary) into the
namespace, and tcpdump writes pcap to its stdout, which nstap reads. nsenter enters through a
descriptor of the namespace that nstap holds and passes to it (``--net=/proc/self/fd/N``), never
through ``/proc/<pid>/ns/net``: a pid can be reused by a process of another namespace (the host's,
another container's), and a path resolved again by pid would capture that one instead. Every
tcpdump is started under ``setpriv --pdeathsig KILL`` and stays root (``-Z root``; dropping to
another user would clear the parent-death signal): if the daemon is killed, its tcpdumps die with
it instead of holding namespaces open. tcpdump only writes raw packets (``-w -``), it never
dissects them, so staying root adds nothing a packet can reach. The expression is passed
after ``--`` as one argument, so nothing in it can be taken for an option, and it is compiled
with ``tcpdump -d`` before any capture uses it. tcpdump runs in its own session and is stopped
with SIGTERM, then SIGKILL if it does not go. Its kernel-drop count comes from its statistics
(printed on SIGUSR1 and at exit).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from ..subprocesses import reap, spawn
from .pcap import PcapHeader, Record, StreamParser

MAX_FILTER_LEN = 1024
_STATS = {
    "captured": re.compile(r"(\d+) packets? captured"),
    "received": re.compile(r"(\d+) packets? received by filter"),
    "dropped": re.compile(r"(\d+) packets? dropped by kernel"),
}


class CaptureToolMissing(RuntimeError):
    """tcpdump, nsenter or setpriv is not installed."""


class FilterError(ValueError):
    """A capture filter that tcpdump does not accept, or a filtering run that failed."""


FILTER_TIMEOUT = 120.0  # seconds tcpdump may take to filter one capture's packets (a ring of 4 GiB at most)


@dataclass(frozen=True)
class Tools:
    """Where tcpdump, nsenter and setpriv are, and how tcpdump is run."""

    tcpdump: str
    nsenter: str
    setpriv: str
    snaplen: int
    buffer_kib: int

    @classmethod
    def find(cls, snaplen: int, buffer_kib: int, tcpdump: str = "tcpdump", nsenter: str = "nsenter", setpriv: str = "setpriv") -> Tools:
        """Resolve the binaries on PATH (and /usr/sbin, /sbin); CaptureToolMissing if absent."""
        path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin:/usr/bin"
        found = {name: shutil.which(name, path=path) for name in (tcpdump, nsenter, setpriv)}
        missing = [name for name, where in found.items() if where is None]
        if missing:
            raise CaptureToolMissing(f"{' and '.join(missing)} not found (install tcpdump and util-linux)")
        return cls(found[tcpdump], found[nsenter], found[setpriv], snaplen, buffer_kib)  # type: ignore[arg-type]

    def argv(self, netns_fd: int, bpf: str = "", interface: str = "any") -> list[str]:
        """The command that captures ``interface`` (by default every interface) of the namespace
        behind ``netns_fd`` to stdout.

        The child must inherit ``netns_fd`` under the same number (``pass_fds``).
        """
        argv = [
            self.setpriv, "--pdeathsig", "KILL", "--",
            self.nsenter, f"--net=/proc/self/fd/{netns_fd}", "--",
            self.tcpdump,
            "-Z", "root",
            "-i", interface,
            "-s", str(self.snaplen),
            "-B", str(self.buffer_kib),
            "-n",
            "-U",
            "--immediate-mode",
            "-w", "-",
        ]
        if bpf:
            argv += ["--", bpf]
        return argv

    async def check_filter(self, bpf: str) -> None:
        """Compile ``bpf`` with ``tcpdump -d``; FilterError with tcpdump's message if it is refused."""
        if not isinstance(bpf, str) or len(bpf) > MAX_FILTER_LEN:
            raise FilterError(f"filter must be a string of at most {MAX_FILTER_LEN} characters")
        if any(ord(c) < 32 for c in bpf):
            raise FilterError("filter must not contain control characters")
        if not bpf.strip():
            return
        proc = await spawn(
            self.tcpdump, "-i", "any", "-d", "--", bpf,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
        )
        try:
            _, err = await asyncio.wait_for(proc.communicate(), 10)
        except asyncio.TimeoutError:
            await reap(proc)
            raise FilterError("filter took too long to compile") from None
        except asyncio.CancelledError:  # the request went away: so does tcpdump
            await reap(proc)
            raise
        if proc.returncode != 0:
            lines = [line for line in err.decode(errors="replace").splitlines() if "data link type" not in line]
            raise FilterError((lines[-1] if lines else "invalid filter").removeprefix("tcpdump: "))

    async def filter_file(self, src: Path, dst: Path, bpf: str, timeout: float = FILTER_TIMEOUT) -> None:
        """Write the packets of pcap ``src`` that match ``bpf`` to ``dst`` (tcpdump -r ... -w ...);
        FilterError if tcpdump fails or takes longer than ``timeout`` (it is killed)."""
        proc = await spawn(
            self.tcpdump, "-Z", "root", "-r", str(src), "-w", str(dst), "--", bpf,  # -Z: the file stays root's
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
        )
        try:
            _, err = await asyncio.wait_for(proc.communicate(), timeout)
        except asyncio.TimeoutError:
            await reap(proc)
            raise FilterError(f"tcpdump -r took longer than {timeout:g}s") from None
        except asyncio.CancelledError:  # the daemon stops: so does tcpdump
            await reap(proc)
            raise
        if proc.returncode != 0:
            raise FilterError(err.decode(errors="replace").strip().splitlines()[-1] if err else "tcpdump -r failed")


def parse_stats(text: str) -> dict[str, int]:
    """tcpdump's statistics from its stderr text (the last value of each)."""
    out = {}
    for key, pattern in _STATS.items():
        found = pattern.findall(text)
        if found:
            out[key] = int(found[-1])
    return out


class TcpdumpProcess:
    """One running tcpdump: its records as they come, its statistics, and a clean stop."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.proc: asyncio.subprocess.Process | None = None
        self.parser = StreamParser()
        self.stats: dict[str, int] = {}
        self._stderr: list[str] = []
        self._stderr_task: asyncio.Task | None = None
        self._stats_event = asyncio.Event()
        # tcpdump says "listening on" once its signal handlers are set: SIGUSR1 before that (or
        # to nsenter, before it has exec'ed tcpdump) would kill it instead of asking for stats.
        self.listening = False

    async def start(self, stdout: int | None = None, pass_fds: tuple[int, ...] = ()) -> None:
        """Start tcpdump (OSError if it cannot be executed).

        Its output goes to an asyncio stream read with :meth:`records`, or to ``stdout`` (the
        write end of a pipe the caller reads itself). ``pass_fds`` are inherited by the child.
        """
        self.proc = await spawn(
            *self.argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=stdout if stdout is not None else asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
            pass_fds=pass_fds,
        )
        self._stderr_task = asyncio.create_task(self._read_stderr())

    async def _read_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            text = line.decode(errors="replace").rstrip()
            self._stderr.append(text)
            del self._stderr[:-50]
            if "listening on " in text:
                self.listening = True
            found = parse_stats(text)
            if found:
                self.stats.update(found)
                self._stats_event.set()

    @property
    def header(self) -> PcapHeader | None:
        """The pcap header, once tcpdump has written it."""
        return self.parser.header

    async def records(self) -> AsyncIterator[list[Record]]:
        """Batches of records until tcpdump's output ends (when started without ``stdout``)."""
        async for chunk in self.chunks():
            batch = self.parser.feed(chunk)
            if batch or self.parser.header is not None:
                yield batch

    async def chunks(self) -> AsyncIterator[bytes]:
        """tcpdump's output as it comes, up to 64 KiB at a time, unparsed (for :attr:`parser` to
        parse elsewhere: a worker thread)."""
        assert self.proc is not None and self.proc.stdout is not None
        while chunk := await self.proc.stdout.read(1 << 16):
            yield chunk

    async def request_stats(self, timeout: float = 1.0) -> dict[str, int]:
        """Ask a running tcpdump for its statistics (SIGUSR1); the latest known ones if it does not
        answer, or has not said yet that it listens (until then the signal would kill it)."""
        if self.proc is None or self.proc.returncode is not None or not self.listening:
            return dict(self.stats)
        self._stats_event.clear()
        try:
            os.killpg(self.proc.pid, signal.SIGUSR1)
        except ProcessLookupError:
            return dict(self.stats)
        try:
            await asyncio.wait_for(self._stats_event.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        return dict(self.stats)

    def error_text(self) -> str:
        """What tcpdump (or nsenter) said last, for an error message (not its statistics)."""
        lines = [
            line for line in self._stderr
            if line and "listening on" not in line and "data link type" not in line and not parse_stats(line)
        ]
        return "; ".join(lines[-3:])

    async def stop(self, grace: float = 3.0) -> int | None:
        """SIGTERM, wait up to ``grace`` seconds, SIGKILL; returns the exit code."""
        proc = self.proc
        if proc is None:
            return None
        if proc.returncode is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                await asyncio.wait_for(proc.wait(), grace)
            except (asyncio.TimeoutError, asyncio.CancelledError) as exc:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                await reap(proc)  # cancelled (the daemon stops): still reaped before the loop goes
                if isinstance(exc, asyncio.CancelledError):
                    raise
        if self._stderr_task is not None:
            await asyncio.gather(self._stderr_task, return_exceptions=True)
        return proc.returncode
