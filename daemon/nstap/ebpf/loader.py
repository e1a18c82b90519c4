"""Compile, load and attach the eBPF program in a short-lived child, and hand the result to the daemon.

Importing bcc and running LLVM costs about 200 MiB of memory that a process never gives back, and
compiling holds the GIL for a second. So the daemon starts ``python -m nstap.ebpf.loader`` with one
end of a unix socket pair. The child checks the prerequisites, compiles, attaches both tracepoints
and sends one message back: a JSON report (reason names by number, compile seconds, the names of
the descriptors) with the descriptors themselves (``SCM_RIGHTS``): the two tracepoints' perf
events (a program stays attached as long as a descriptor of its perf event is open) and the two
maps. It then leaves with ``os._exit``: bcc's exit handler would issue ``PERF_EVENT_IOC_DISABLE``
on the perf events, which are the daemon's now too (on this 6.18 kernel a tracepoint's BPF
program runs on regardless, measured, but the event is not the child's to touch any more).

A missing prerequisite is reported as ``{"ok": false, "error": ...}`` (exit code 3) and raised in
the daemon as the same :class:`EbpfUnavailable`; a child that crashes, or runs past the timeout
(killed with its process group), is an :class:`EbpfUnavailable` with the tail of its output.
The daemon never imports bcc: it reads the maps with :mod:`nstap.ebpf.maps`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import signal
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, Any

from ..subprocesses import reap, spawn
from . import mibs
from .collector import TRACEPOINTS, EbpfUnavailable, check_prerequisites, need_bcc, need_headers, need_offsets, need_root, program_text, reason_names

LOADER = (sys.executable, "-m", "nstap.ebpf.loader")
LOAD_TIMEOUT = 60.0  # seconds: compiling takes one to three
REPORT_BYTES = 1 << 18  # the report is a few KiB (the reason names)
MAX_FDS = 16
OUTPUT_TAIL = 2000  # characters of the child's output kept for the error message
EXIT_UNAVAILABLE = 3
LOADER_NICE = 10  # the child's CPU priority below the daemon's
PR_SET_PDEATHSIG = 1


@dataclass
class Handover:
    """What the loader child handed over: descriptors by name (the caller owns them), its report."""

    fds: dict[str, int]
    report: dict[str, Any]
    pid: int

    def close(self) -> None:
        """Close every descriptor not taken."""
        for fd in self.fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = {}


# -- the daemon's side ---------------------------------------------------------------------------


async def load_in_child(command: Sequence[str] = LOADER, timeout: float = LOAD_TIMEOUT) -> Handover:
    """Run the loader child and take what it sends; EbpfUnavailable with its reason or output if it
    fails, crashes or hangs (then it is killed with its process group). The child is reaped
    before this returns or raises, cancelled or not."""
    # Its output goes to an unlinked file, not a pipe: nothing to read while it runs, no transport
    # left open if the wait is cancelled, and a grandchild holding it open delays nothing.
    try:
        output = tempfile.TemporaryFile()
    except OSError as exc:
        raise EbpfUnavailable(f"cannot start the eBPF loader: no temporary file for its output ({exc.strerror or exc})") from None
    try:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    except OSError as exc:
        output.close()
        raise EbpfUnavailable(f"cannot start the eBPF loader: socketpair: {exc.strerror or exc}") from None
    try:
        try:
            proc = await spawn(
                *command, "--socket-fd", str(theirs.fileno()), "--parent", str(os.getpid()),
                stdin=asyncio.subprocess.DEVNULL, stdout=output, stderr=asyncio.subprocess.STDOUT,
                pass_fds=(theirs.fileno(),), start_new_session=True,
            )
        except OSError as exc:
            raise EbpfUnavailable(f"cannot start the eBPF loader {' '.join(command)}: {exc.strerror or exc}") from None
        finally:
            theirs.close()
        hung = False
        try:
            async with asyncio.timeout(timeout):
                await proc.wait()
        except TimeoutError:
            hung = True
        finally:  # also when cancelled (the daemon stopping): no loader outlives the call
            if proc.returncode is None:
                # Hung: it holds nothing that needs a clean exit, and a bpftool it started must go
                # too: its whole process group, at once.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            await reap(proc)
        tail = _tail(output)
        if hung:
            raise EbpfUnavailable(f"the eBPF loader did not finish in {timeout:g} s and was killed; its output: {tail}")
        return _receive(ours, proc.pid, proc.returncode, tail)
    finally:
        output.close()
        ours.close()  # descriptors still queued in it (a report not taken) are closed with it


def _tail(output: IO[bytes]) -> str:
    """The end of the child's output, on one line."""
    output.seek(0, os.SEEK_END)
    output.seek(max(0, output.tell() - OUTPUT_TAIL * 4))
    text = output.read().decode(errors="replace")
    text = " | ".join(line.strip() for line in text.strip().splitlines() if line.strip())
    return ("..." + text[-OUTPUT_TAIL:] if len(text) > OUTPUT_TAIL else text) or "(no output)"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


def _receive(sock: socket.socket, pid: int, code: int, tail: str) -> Handover:
    """The child's report and descriptors, queued in ``sock`` (the child has exited)."""
    sock.setblocking(False)
    try:
        data, fds, flags, _ = socket.recv_fds(sock, REPORT_BYTES, MAX_FDS, socket.MSG_CMSG_CLOEXEC)
    except (BlockingIOError, ConnectionError):
        data, fds, flags = b"", [], 0
    try:
        try:
            report = json.loads(data) if data else None
        except ValueError:
            report = None
        if not isinstance(report, dict):
            how = f"was killed by signal {_signal_name(-code)}" if code < 0 else f"exited with code {code}"
            raise EbpfUnavailable(f"the eBPF loader {how} without a report; its output: {tail}")
        if not report.get("ok"):
            raise EbpfUnavailable(str(report.get("error") or f"the eBPF loader failed (exit code {code}): {tail}"))
        names = report.get("fds") or []
        if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC) or len(set(names)) != len(fds) or len(names) != len(fds) or code != 0:
            raise EbpfUnavailable(f"the eBPF loader's report is incomplete ({len(fds)} descriptors for {names}, exit code {code}): {tail}")
        handover = Handover(dict(zip(names, fds)), report, pid)
        fds = []
        return handover
    finally:
        for fd in fds:
            os.close(fd)


# -- the child's side ----------------------------------------------------------------------------


def attach() -> tuple[Any, dict[str, Any], dict[str, int]]:
    """Check, compile and attach: (the bcc.BPF objects, the report, the MIB pass's descriptor if
    it loaded); EbpfUnavailable if anything the drop program needs is missing. The MIB pass
    (:mod:`nstap.ebpf.mibs`) is extra: if it cannot load, the report says why and the daemon
    reads the protocol counters from the files."""
    bcc, tracing, btf = check_prerequisites()
    reasons = reason_names(tracing)
    text = program_text(tracing, need_offsets(btf))
    started = time.monotonic()
    try:
        program = bcc.BPF(text=text)
        for tracepoint, function in TRACEPOINTS:
            program.attach_tracepoint(tp=tracepoint, fn_name=function)
    except Exception as exc:  # noqa: BLE001 - bcc raises plain Exception on a failed compile or load
        raise EbpfUnavailable(f"the eBPF program did not compile or load: {exc}") from None
    report = {
        "ok": True,
        "reasons": {str(number): name for number, name in reasons.items()},
        "compile_seconds": time.monotonic() - started,
        "bcc_version": getattr(bcc, "__version__", ""),
    }
    extra: dict[str, int] = {}
    started = time.monotonic()
    try:
        mib_program, extra, report["mib_batch"], socket_keys, sockets_error = mibs.load(bcc, btf, *mib_counters())
    except mibs.MibUnavailable as exc:
        report["mibs_error"] = str(exc)
        mib_program = None
    else:
        report["mib_keys"] = mib_counters()[1]
        report["mib_socket_keys"] = list(socket_keys)
        if sockets_error:
            report["mib_sockets_error"] = sockets_error
        report["mibs_seconds"] = time.monotonic() - started
    return (program, mib_program), report, extra


def mib_counters() -> tuple[list[tuple[str, str]], list[str], set[tuple[str, str]]]:
    """The protocol counters the MIB pass reads: (section, field)s, nstap's names, the gauges."""
    from ..samplers.protocols import PROTOCOL_COUNTERS  # noqa: PLC0415 - only this child's mode needs it

    return ([(c.section, c.field) for c in PROTOCOL_COUNTERS], [c.key for c in PROTOCOL_COUNTERS],
            {(c.section, c.field) for c in PROTOCOL_COUNTERS if c.gauge})


def handed_fds(program: Any) -> dict[str, int]:
    """The descriptors the daemon needs, by name: the perf events and the maps."""
    fds = {f"perf:{tracepoint}": program.tracepoint_fds[tracepoint.encode()] for tracepoint, _ in TRACEPOINTS}
    fds.update({f"map:{name}": program[name].get_fd() for name in ("drops", "retrans", "lost")})
    return fds


def load_dns() -> tuple[Any, dict[str, int], dict[str, Any]]:
    """Check, compile and load the DNS program (:mod:`nstap.dns.program`): the bcc.BPF object
    (which must outlive the send: the descriptors close with it), its two entry points' and its
    maps' descriptors, and the report. The daemon attaches it (TCX links, per namespace)."""
    from ..dns import program as dns  # noqa: PLC0415 - only this child's mode needs it

    need_root()
    bcc = need_bcc()
    need_headers()
    started = time.monotonic()
    try:
        program = bcc.BPF(text=dns.program_text())
        functions = {name: program.load_func(name, bcc.BPF.SCHED_CLS) for name in dns.FUNCTIONS}
    except Exception as exc:  # noqa: BLE001 - bcc raises plain Exception on a failed compile or load
        text = str(exc)
        if "get_netns_cookie" in text or "unknown func" in text:
            text = "this kernel does not let tc programs call bpf_get_netns_cookie (Linux 6.14 or later does)"
        raise EbpfUnavailable(f"the DNS program did not compile or load: {text}") from None
    fds = {f"prog:{name}": function.fd for name, function in functions.items()}
    fds.update({f"map:{name}": program[name].get_fd() for name in dns.MAPS})
    report = {"ok": True, "compile_seconds": time.monotonic() - started, "bcc_version": getattr(bcc, "__version__", "")}
    return program, fds, report


def _peak_rss_kib() -> int:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    """The child: attach, send the report and descriptors, leave without bcc's clean-up."""
    parser = argparse.ArgumentParser(prog="nstap.ebpf.loader")
    parser.add_argument("--socket-fd", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--program", choices=("drops", "dns"), default="drops")
    args = parser.parse_args(argv)
    # A daemon killed meanwhile takes the loader with it.
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    # Compiling is a few seconds of CPU that can wait: the daemon's samples cannot.
    os.nice(LOADER_NICE)
    if os.getppid() != args.parent:
        os._exit(1)
    sock = socket.socket(fileno=args.socket_fd)
    try:
        try:
            if args.program == "dns":
                program, fds, report = load_dns()
            else:
                program, report, extra = attach()
                fds = handed_fds(program[0]) | extra
        except EbpfUnavailable as exc:
            sock.send(json.dumps({"ok": False, "error": str(exc)}).encode())
            code = EXIT_UNAVAILABLE
        else:
            report.update(fds=list(fds), peak_rss_kib=_peak_rss_kib())
            socket.send_fds(sock, [json.dumps(report).encode()], list(fds.values()))
            code = 0
    except BaseException:  # noqa: BLE001 - anything else: say what on the output the daemon keeps
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    # Not sys.exit: bcc's atexit clean-up would disable the perf events the daemon now shares. The
    # kernel closes this process's descriptors; the daemon's keep the program attached.
    os._exit(code)


if __name__ == "__main__":
    main()
