"""The DNS collector inside the daemon: loaded once by a child process, attached in every watched
namespace, read once per sampling round.

``dns.mode: auto`` loads it when everything it needs is there and otherwise logs one line saying
what is missing and how to fix it (``nstap_collector_up{collector="dns"} 0``; the rest of the
daemon runs unchanged); ``on`` makes a missing prerequisite stop the daemon (exit code 2); ``off``
never loads it. Attaching (entering a namespace), reading the maps and deleting entries run in
one thread of the collector's own, never on the event loop or in a sampling thread: the cost of
a container's lookups is not charged to any container's sample.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import structlog

from ..ebpf.collector import EbpfUnavailable
from ..ebpf.loader import LOAD_TIMEOUT, LOADER, Handover, load_in_child
from ..ebpf.maps import BpfMap
from ..samples import NamespaceSample
from ..threads import QuickJob, WorkerThread
from . import tcx
from .lookups import HISTORY_EVERY, Lookups, Tally, to_json
from .program import FUNCTIONS, MAPS, cookie_of

FLIGHTS, NAMES, SERVERS = 0, 1, 2  # what the daemon releases (tally.release)
FIRST = bytes(4)  # the key of a one-element array
ARRAYS = ("dns_lost", "dns_changes")  # one counter for all namespaces each

log = structlog.get_logger("nstap.dns")

RESCAN_EVERY = 300.0  # seconds between looks at every namespace for interfaces it gained (besides a change its samples show)


async def probe(loader: Sequence[str] = (*LOADER, "--program", "dns")) -> dict[str, str]:
    """Load the DNS program as the daemon would and make one TCX link in a scratch namespace
    (``nstap doctor``): what worked, by step; EbpfUnavailable (or tcx.NoTcx) naming what did not."""
    started = time.monotonic()
    handover = await load_in_child(loader)
    try:
        egress = handover.fds.get("prog:dns_egress")
        if egress is None:
            raise EbpfUnavailable(f"the DNS loader handed over {sorted(handover.fds)}")
        loaded = f"compiled and verified in {time.monotonic() - started:.1f} s (bpf_get_netns_cookie allowed in tc programs)"
        cookie = await asyncio.to_thread(tcx.try_links, egress)
        return {"DNS program": loaded, "TCX links": f"a link on lo of a scratch namespace (cookie {cookie}) made and closed"}
    finally:
        handover.close()


class DnsService:
    """Owns the DNS program's links and maps; the latest :class:`Lookups` by namespace inode."""

    def __init__(self, mode: str, timeout: float = 5.0, loader: Sequence[str] = (*LOADER, "--program", "dns"),
                 load_timeout: float = LOAD_TIMEOUT, proc_root: Path = Path("/proc")) -> None:
        self.mode = mode
        self.loader = tuple(loader)
        self.load_timeout = load_timeout
        self.up = 0
        self.error = ""
        self.lookups: Mapping[int, Lookups] = {}  # inode -> the namespace's DNS as last read
        self.tally = Tally(timeout)
        self.attach_errors = 0
        self.read_errors = 0
        self.timeouts_total = 0
        self.lost = 0  # entries the program could not make: a map of all namespaces was full
        self._progs: dict[str, int] = {}
        self._maps: dict[str, BpfMap] = {}
        self._links: dict[int, tcx.NamespaceLinks] = {}  # inode -> links (the thread's)
        self._ns_fds: dict[int, int] = {}  # inode -> our duplicate of the watcher's namespace descriptor (the thread's)
        self._cookies: dict[int, int] = {}  # inode -> cookie, for the loop
        self._wanted: set[int] = set()
        self._interfaces: dict[int, int] = {}  # inode -> interfaces in its last sample (a change: compared with its links)
        self._rescan_soon: set[int] = set()  # namespaces whose interfaces changed (added on the loop, taken by the thread)
        self._rescan_lock = threading.Lock()
        self._thread = WorkerThread("nstap-dns")
        self._read_job = QuickJob(self._thread, self._read)  # on the loop's thread while quick, never rescanning (nstap.threads)
        self._home_fd = os.open(proc_root / "thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self._reading: asyncio.Future | None = None
        self._names_at = float("-inf")
        self._rescanned_at = time.monotonic()
        self._failed_before = -1
        self._changes_seen = -1  # dns_changes at the last read
        self._waiting = 0  # lookups awaiting their answer at the last read of dns_inflight
        self._listed_entries = 0  # failing names and servers in the maps at their last read
        self._failing = False
        self._closed = False
        self._boot_offset = time.time() - time.monotonic()

    # -- loading ---------------------------------------------------------------------------------

    async def load(self) -> None:
        """Compile in a child process and take the program and maps; EbpfUnavailable only in mode ``on``."""
        if self.mode == "off":
            self.error = "dns.mode: off in the configuration"
            return
        started = time.monotonic()
        try:
            self._take(await load_in_child(self.loader, self.load_timeout))
        except EbpfUnavailable as exc:
            self.error = str(exc)
            if self.mode == "on":
                raise
            log.warning("dns_unavailable", collector="dns", error=self.error)
            return
        if self._closed:
            self._release()
            return
        self.up = 1
        log.info("dns_loaded", collector="dns", load_seconds=round(time.monotonic() - started, 3))

    def _take(self, handover: Handover) -> None:
        fds = dict(handover.fds)
        try:
            progs = {name: fds.pop(f"prog:{name}") for name in FUNCTIONS}
            maps = {}
            try:
                for name in MAPS:
                    maps[name] = BpfMap.from_fd(fds.pop(f"map:{name}"), name)
                    if (maps[name].key_size, maps[name].value_size) != MAPS[name]:
                        raise EbpfUnavailable(f"the loader's {name} map has {maps[name].key_size}-byte keys and "
                                              f"{maps[name].value_size}-byte values, not {MAPS[name]}")
            except BaseException:
                for bpf_map in maps.values():
                    bpf_map.close()
                for fd in progs.values():
                    os.close(fd)
                raise
        except (KeyError, ValueError, OSError) as exc:
            handover.close()
            raise EbpfUnavailable(f"the DNS loader handed over something else than expected: {type(exc).__name__}: {exc}") from None
        except EbpfUnavailable:
            handover.close()
            raise
        handover.fds = fds
        handover.close()
        self._progs, self._maps = progs, maps

    def _release(self) -> None:
        for bpf_map in self._maps.values():
            with contextlib.suppress(OSError):
                bpf_map.close()
        for fd in self._progs.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._maps, self._progs = {}, {}

    # -- namespaces ------------------------------------------------------------------------------

    def follow(self, watched: Mapping[int, int | None]) -> None:
        """The watched namespaces now, with the descriptor each watcher holds (valid now, on the
        loop: duplicated here). New ones get links, gone ones lose them and their map entries."""
        if not self.up or self._closed:
            return
        new = {}
        for inode, fd in watched.items():
            if inode not in self._wanted and fd is not None:
                with contextlib.suppress(OSError):
                    new[inode] = os.dup(fd)
        gone = self._wanted - set(watched)
        self._wanted = (self._wanted - gone) | set(new)
        for inode in gone:
            self._cookies.pop(inode, None)
            self._interfaces.pop(inode, None)
        if new or gone:
            job = self._thread.submit(self._follow, new, gone)
            job.add_done_callback(self._followed)

    def _follow(self, new: dict[int, int], gone: set[int]) -> tuple[dict[int, int], set[int]]:
        """In the thread: attach in the new namespaces, detach and forget the gone ones; the new
        cookies, and the namespaces that could not be attached (tried again at the next change)."""
        cookies: dict[int, int] = {}
        # Each link attached or closed waits out an RCU grace period (8 ms here): once the daemon
        # stops, what is left is closed by close(), all at once.
        detached = {cookie for cookie in (self._detach(inode) for inode in gone if not self._closed) if cookie is not None}
        if detached:
            self._forget(detached)  # one pass over the maps for all of them
        pending = dict(new)
        try:
            for inode, fd in new.items():
                if self._closed:  # some 30 ms each: 1,000 new namespaces took 40 s
                    break
                del pending[inode]
                try:
                    links = tcx.attach_namespace(fd, self._home_fd, inode, self._progs["dns_egress"], self._progs["dns_ingress"])
                except OSError as exc:
                    self.attach_errors += 1
                    os.close(fd)
                    if isinstance(exc, tcx.NoTcx):
                        raise
                    log.info("dns_attach_skipped", netns=inode, error=f"{type(exc).__name__}: {exc}")
                    continue
                self._ns_fds[inode] = fd
                self._links[inode] = links
                cookies[inode] = links.cookie
                if links.skipped:
                    log.info("dns_interfaces_skipped", netns=inode, skipped=links.skipped, linked=len(links.links))
        finally:
            for fd in pending.values():  # not reached (no TCX on this kernel, or closing): nothing holds them
                os.close(fd)
        return cookies, set(new) - set(cookies)

    def _followed(self, job: asyncio.Future) -> None:
        if job.cancelled():
            return
        exc = job.exception()
        if isinstance(exc, tcx.NoTcx):
            self.error = str(exc)
            self.up = 0
            log.warning("dns_unavailable", collector="dns", error=self.error)
            return
        if exc is not None:
            log.warning("dns_attach_failed", error=f"{type(exc).__name__}: {exc}")
            return
        cookies, failed = job.result()
        for inode, cookie in cookies.items():
            if inode in self._wanted:
                self._cookies[inode] = cookie
        self._wanted -= failed

    def _detach(self, inode: int) -> int | None:
        """Close the namespace's links and descriptor; its cookie (None if it had no links)."""
        links = self._links.pop(inode, None)
        fd = self._ns_fds.pop(inode, None)
        if fd is not None:
            os.close(fd)
        if links is None:
            return None
        links.close()
        return links.cookie

    def _forget(self, cookies: set[int]) -> int:
        """Delete every map entry of ``cookies`` (every key starts with the cookie); how many went."""
        gone = 0
        for name, bpf_map in self._maps.items():
            if name in ARRAYS:  # nobody's
                continue
            for key, value in bpf_map.items():
                if cookie_of(name, key, value) in cookies and bpf_map.delete(key):
                    gone += 1
        self.tally.forget(cookies)
        return gone

    def observe(self, sample: NamespaceSample) -> None:
        """A sample stored (a SampleStore listener, on the loop): a namespace whose interfaces
        changed (``docker network connect``) gets links on the new ones at the next read."""
        interfaces = sample.interfaces
        if interfaces is None or sample.netns not in self._cookies:
            return
        count = len(interfaces)
        if count == self._interfaces.get(sample.netns):
            return
        self._interfaces[sample.netns] = count
        # (against the links made, not the sample before: an interface added before the first
        # sample after the attach is a change too)
        if sum(1 for i in interfaces if i.side == "container") != self.interfaces_of(sample.netns):
            with self._rescan_lock:
                self._rescan_soon.add(sample.netns)

    # -- reading ---------------------------------------------------------------------------------

    def new_round(self) -> asyncio.Future | None:
        """Read the maps, unless the last read is still going; the samples take the latest read
        done. In the collector's thread, or on the loop's thread while the reads are quick and the
        thread idle (QuickJob); a read that is to look for namespaces' new interfaces (it attaches
        links inside them) always in the thread. Returns the read started (the ticker times it:
        Ticker.lead)."""
        if not self.up or self._closed or (self._reading is not None and not self._reading.done()):
            return None
        if self._rescan_soon or time.monotonic() - self._rescanned_at >= RESCAN_EVERY:
            self._reading = self._thread.submit(self._read, True)
        else:
            self._reading = self._read_job.start(False)
        self._reading.add_done_callback(self._read_done)
        return self._reading

    async def refresh(self) -> None:
        """Read everything now and wait for it (for the API, the evidence and tests): a read
        under way may have begun before what the caller wants seen, so it is waited for first."""
        if self._reading is not None and not self._reading.done():
            await asyncio.gather(self._reading, return_exceptions=True)
        self._names_at = float("-inf")  # names and servers too
        self._changes_seen = -1  # and everything else
        self.new_round()
        if self._reading is not None:
            await asyncio.gather(self._reading, return_exceptions=True)

    def _read(self, rescan: bool = True) -> dict[int, Lookups]:
        """Read what changed. The program counts the DNS packets it handled in dns_changes: a
        round with none, no lookup awaiting its answer and no listing due reads that one counter
        only (a batched read walks all of a hash map's buckets, used or not: about 30 us a map).
        With ``rescan`` (in the thread only), namespaces are also given links for the interfaces
        they gained, when that is due."""
        maps, tally = self._maps, self.tally
        live = {links.cookie for links in self._links.values()}
        stale: set[int] = set()
        now, now_ns = time.monotonic(), time.monotonic_ns()

        def items(name: str) -> list[tuple[bytes, bytes]]:
            out = []
            for key, value in maps[name].items():
                cookie = cookie_of(name, key, value)
                if cookie in live:
                    out.append((key, value))
                else:
                    stale.add(cookie)  # counted after its namespace's links closed
            return out

        changes = int.from_bytes(maps["dns_changes"].lookup(FIRST) or bytes(8), "little")
        changed, self._changes_seen = changes != self._changes_seen, changes  # (read first: a change during the reads is seen next round)
        if changed:
            tally.counts(items("dns_counts"))
            tally.latencies(items("dns_latency"))
            tally.budgets(items("dns_budget"))
            self.lost = int.from_bytes(maps["dns_lost"].lookup(FIRST) or bytes(8), "little")
        if changed or self._waiting:
            flights = items("dns_inflight")
            expired = tally.expired(flights, now_ns, time.time())
            self._delete("dns_inflight", expired, FLIGHTS)
            self.timeouts_total += len(expired)
            self._waiting = len(flights) - len(expired)
        failed = sum(n for per in tally.requests.values() for (rcode, _), n in per.items() if rcode != "NOERROR") + self.timeouts_total
        due = now - self._names_at >= HISTORY_EVERY and (changed or self._listed_entries)
        if failed != self._failed_before or due:
            self._failed_before, self._names_at = failed, now
            names, servers = items("dns_names"), items("dns_servers")
            self._listed_entries = len(names) + len(servers)
            self._delete("dns_names", tally.failing(names, self._boot_offset, time.time()), NAMES)
            self._delete("dns_servers", tally.server_list(servers, now_ns), SERVERS)
        for key, value in tally.released_changed():
            maps["dns_released"].update(key, value)
        if stale:
            self._forget(stale)
        if rescan and now - self._rescanned_at >= RESCAN_EVERY:
            self._rescanned_at = now
            self._rescan(set(self._links))
        elif rescan and self._rescan_soon:
            with self._rescan_lock:  # (a swap without it could lose the loop's addition made meanwhile)
                soon, self._rescan_soon = self._rescan_soon, set()
            self._rescan(soon)
        return {inode: tally.lookups(links.cookie) for inode, links in self._links.items()}

    def _delete(self, name: str, entries: list[tuple[int, bytes]], what: int) -> None:
        """Delete entries of a map the daemon prunes, giving their namespace its room back (an
        entry the program deleted first, an answered lookup, is not released twice)."""
        bpf_map = self._maps[name]
        for cookie, key in entries:
            if bpf_map.delete(key):
                self.tally.release(cookie, what)

    def _rescan(self, inodes: set[int]) -> None:
        """Give the interfaces the namespaces ``inodes`` gained since their attach their links."""
        for inode in inodes:
            links, fd = self._links.get(inode), self._ns_fds.get(inode)
            if links is None or fd is None:
                continue
            try:
                tcx.attach_namespace(fd, self._home_fd, inode, self._progs["dns_egress"], self._progs["dns_ingress"], links)
            except OSError as exc:
                self.attach_errors += 1
                log.info("dns_rescan_skipped", netns=inode, error=f"{type(exc).__name__}: {exc}")

    def _read_done(self, reading: asyncio.Future) -> None:
        if reading.cancelled():
            return
        exc = reading.exception()
        if exc is not None:
            self.read_errors += 1
            if not self._failing:
                self._failing = True
                log.warning("dns_read_failed", error=f"{type(exc).__name__}: {exc}")
            return
        self._failing = False
        self.lookups = reading.result()

    def of(self, inode: int) -> Lookups | None:
        """The namespace's DNS as last read (None without the collector, or before its first read)."""
        return self.lookups.get(inode) if self.up else None

    async def evidence(self, inode: int) -> dict:
        """The namespace's DNS now, as the evidence document holds it (read afresh)."""
        if not self.up:
            return {"error": self.error or "not loaded"}
        await self.refresh()
        return to_json(self.of(inode)) or {"error": "no lookups seen since its links were made"}

    def interfaces_of(self, inode: int) -> int:
        """How many of the namespace's interfaces have links (0: not attached)."""
        links = self._links.get(inode)  # (the thread's: a count read from the loop may be a round old)
        return len(links.links) if links is not None else 0

    def attached_to(self, inode: int) -> bool:
        """Whether the namespace has its links (lookups before that were not seen)."""
        return inode in self._cookies

    def stop_following(self) -> None:
        """The daemon stops: the attach or detach under way is the last (the watchers' detaches
        that follow change nothing; :meth:`close` closes every link left at once). Following the
        1,000 watchers' detaches closed 4,000 links one by one: 43 s."""
        self._closed = True

    def close(self) -> None:
        """Detach everywhere (close the links) once a read under way is done, and let the maps go."""
        self._closed = True
        self._thread.shutdown(wait=True)
        if len(self._links) >= 100:  # about 10 ms a link (the kernel's rtnl lock and an RCU grace period each)
            log.info("dns_detaching", namespaces=len(self._links), links=sum(len(fds) for links in self._links.values() for fds in links.links.values()))
        tcx.close_all(self._links.values())
        self._links = {}
        for fd in self._ns_fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._ns_fds = {}
        self._release()
        with contextlib.suppress(OSError):
            os.close(self._home_fd)
        self.up = 0
