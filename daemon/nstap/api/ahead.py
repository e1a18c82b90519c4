"""Scrapes rendered ahead: the per-container exposition made right after the sampling round that
precedes an expected scrape, so that the scrape finds it made.

At 1,000 containers a scrape renders about 10 MB of text and gzips it: 100–130 ms of CPU, which on a
host whose two CPUs are busy (the sampling round beside the containers themselves) took about
300 ms of wall time. Prometheus scrapes a target at a fixed interval, so each scraper's next
scrape is known to a few milliseconds: the cadence of each (its address and User-Agent: the last
arrivals) is learnt here, and after every sampling round, if a scraper's next scrape falls before
the next round ends, the render thread makes the body from the state at the end of that round.

An arrival is taken when the event loop gets to it (tens of milliseconds late at 1,000
containers), so the next is expected that late too: a scrape that came just before the round that
would have rendered for it ended found no body (one of the four in a 1,000-container bench run at
3f7b83d). So the body is made at the last round that ends at least :data:`EARLY` of a period before the scrape is
expected, and if the next round ends and the scrape has not come, it is made again from that
round (at most :data:`RENDERS` bodies per expected scrape) - unless that round ended as the
scrape was expected (from EARLY before to :data:`LATE` after): then the scrape is on its way, or
waits in the listener's queue for the event loop, and the body is held over that round for it.
(Made again, the scrape waited for it: 201 ms of a 249 ms scrape at 1,000 containers, the body's
63 ms of CPU on two busy cores.) A scrape from a steady cadence that finds no body made for it
counts as missed.

Only the families made from the namespaces' samples are rendered ahead (the exporter's
``SAMPLES`` part: 81 lines a container, nearly all of a scrape); the rest (the containers' list,
anomalies, captures, NAT, the daemon's own) is rendered at the scrape, from the state then. What a
scrape gets is what a render at its arrival would give, but for the samples of the sampling round
in progress (or of the one before, for a body held over it): a body is served only while no later
round has completed (but the one it was held over), no namespace has come or
gone (a new container's first sample shows as soon as before), the containers' names and owners
are the same and the families disabled and the encoding are those it was made with. Otherwise the
scrape renders everything at once, as without this, and the body counts as unused.

Anyone who reaches the metrics listener is a scraper: what one can cost is bounded. At most one
body is rendered per sampling round, whoever it is for; a scraper that breaks its cadence wastes
at most :data:`RENDERS` renders per three of its own scrapes (each rendered at once anyway); the cadences kept
are the most recent :data:`SCRAPERS`, so one that sprays from many addresses only pushes the
others back to a render at arrival, as without this.

gzip: the body ahead is raw deflate ended by a full flush; the scrape's part follows it in a deflate
stream of its own, in one gzip member whose CRC is chained over both (:class:`Deflate`): a client
that reads one member only (curl) gets it all. Both are compressed as the exporter hands over its
families, never joined into one text first.
"""

from __future__ import annotations

import asyncio
import math
import struct
import zlib
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Protocol

from ..exporter import SAMPLES, STATE

SCRAPERS = 8  # scrapers whose cadence is kept (the most recent ones)
ARRIVALS = 3  # arrivals kept per scraper: two intervals, which agree for a steady cadence
TOLERANCE = 0.1  # the intervals of a cadence agree to this share of their mean
LATE = 0.5  # a scrape expected this many sampling periods ago and not come yet is still rendered for
EARLY = 0.2  # the body is made at a round that ends at least this many sampling periods before the scrape is expected
RENDERS = 2  # bodies made per expected scrape at most (the first, and one from the next round if the scrape has not come)
GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # deflate, no name, no time, unknown OS (RFC 1952)
CHUNK = 4 << 20  # bytes of text compressed at a time (but the last): see Deflate
LEVEL = 1  # zlib level (as the render at scrape time: 2 MB of text in ~10 ms, about 15 times smaller)


class Part(NamedTuple):
    """The body rendered ahead: text (``crc`` 0), or raw deflate ended by a full flush with the text's CRC-32; ``size``: the text's length."""

    data: bytes
    crc: int
    size: int


class Tag(NamedTuple):
    """What a body ahead was made from: served only while all of it still holds."""

    round: int
    generation: int  # the sample store's: namespaces come or go
    namespaces: Mapping[int, Any]  # the registry's (replaced on a change: the containers' names and owners)
    disabled: frozenset[str]
    compress: bool


class Deflate:
    """Text compressed as it is written, piece by piece (the exporter's families: the whole text of
    a scrape, ~10 MB at 1,000 containers, is never joined into one buffer), after ``first``'s if
    given: raw deflate at :data:`LEVEL`, with the CRC-32 and length of all the text so far.

    Pieces are gathered into chunks of :data:`CHUNK` bytes before they are compressed. zlib gives
    up the GIL for every call (crc32 for any piece over 5 KB), and the render thread gets it back
    only when the event loop's thread lets it go: beside a busy loop, up to the interpreter's 5 ms
    switch interval each time. ``bench/bench_render.py --containers 1000`` (a body beside a thread
    busy with Python as the loop is in a round; medians of four runs of 21 bodies): compressed as
    they came (~160 pieces), 68 ms median and 455 ms at most; in 4 MiB chunks 67 / 124 ms; the
    text joined and compressed at once, as before, 71 / 186 ms.
    """

    __slots__ = ("_compressor", "_out", "_pending", "crc", "size")

    def __init__(self, first: Part | None = None) -> None:
        self._compressor = zlib.compressobj(LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS)
        self._out = [first.data] if first is not None else []
        self._pending = bytearray()
        self.crc, self.size = (first.crc, first.size) if first is not None else (0, 0)

    def write(self, text: bytes | bytearray) -> None:
        pending = self._pending
        pending += text
        if len(pending) >= CHUNK:
            self._compress()

    def _compress(self) -> None:
        pending = self._pending
        if pending:
            self._out.append(self._compressor.compress(pending))
            self.crc = zlib.crc32(pending, self.crc)
            self.size += len(pending)
            del pending[:]

    def part(self) -> Part:
        """What was written, ended by a full flush: another deflate stream may follow it."""
        self._compress()
        return Part(b"".join((*self._out, self._compressor.flush(zlib.Z_FULL_FLUSH))), self.crc, self.size)

    def gzip(self) -> bytes:
        """What was written, as one gzip member."""
        self._compress()
        trailer = struct.pack("<II", self.crc, self.size & 0xFFFFFFFF)
        return b"".join((GZIP_HEADER, *self._out, self._compressor.flush(), trailer))


def samples_body(collector: Exposition, scrape: Any, compress: bool) -> Part:
    """The body rendered ahead: the exporter's SAMPLES part, as text or raw deflate."""
    if not compress:
        text = collector.exposition(scrape, SAMPLES)
        return Part(text, 0, len(text))
    deflate = Deflate()
    collector.write(deflate.write, scrape, SAMPLES)
    return deflate.part()


def scrape_body(collector: Exposition, scrape: Any, compress: bool, own: bytes, ahead: Part | None = None) -> bytes:
    """A scrape's whole body: ``ahead`` (the SAMPLES part made ahead, in the same encoding) if
    given, then ``own`` (the daemon's own metrics) and the exporter's families (the STATE part
    after ``ahead``, all of them without). gzip at :data:`LEVEL`: at 200 containers 2 MB of text
    in ~10 ms instead of ~40 ms at the default level, still about 15 times smaller."""
    part = STATE if ahead is not None else None
    if not compress:
        return b"".join((ahead.data if ahead is not None else b"", own, collector.exposition(scrape, part)))
    deflate = Deflate(ahead)
    deflate.write(own)
    collector.write(deflate.write, scrape, part)
    return deflate.gzip()


class Exposition(Protocol):
    """What the bodies are made from (nstap.exporter.ContainerCollector)."""

    def exposition(self, scrape: Any, part: str | None = None) -> bytes: ...

    def write(self, sink: Callable[[bytes | bytearray], Any], scrape: Any, part: str | None = None) -> None: ...


class Cadence:
    """One scraper's last arrivals, and the scrape it is expected to make next."""

    __slots__ = ("arrivals", "compress", "rendered_for", "renders")

    def __init__(self) -> None:
        self.arrivals: deque[float] = deque(maxlen=ARRIVALS)
        self.compress = False
        self.rendered_for: float | None = None  # the expected arrival bodies were rendered for
        self.renders = 0  # how many

    def next(self) -> float | None:
        """When the next scrape is expected, if the last ones came at a steady interval."""
        if len(self.arrivals) < ARRIVALS:
            return None
        a = self.arrivals
        gaps = [a[i + 1] - a[i] for i in range(len(a) - 1)]
        mean = sum(gaps) / len(gaps)
        if mean <= 0 or max(gaps) - min(gaps) > TOLERANCE * mean:
            return None
        return a[-1] + mean


class RenderAhead:
    """The scrapers' cadences and the body rendered ahead (on the event loop only)."""

    def __init__(self, count: Callable[[str], None] = lambda result: None) -> None:
        self.count = count  # "served" or "unused", once per body
        self.round = 0  # sampling rounds completed
        self._scrapers: OrderedDict[tuple[str, str], Cadence] = OrderedDict()
        self._body: tuple[Tag, asyncio.Future[Part]] | None = None
        self._served = False
        self._for: float | None = None  # the arrival the body was made for
        self._held = False  # the body was kept over the round that ended as its scrape was expected

    def scraped(self, scraper: tuple[str, str], now: float, compress: bool) -> None:
        """A scrape arrived (monotonic ``now``)."""
        cadence = self._scrapers.pop(scraper, None) or Cadence()
        self._scrapers[scraper] = cadence  # the most recent last
        while len(self._scrapers) > SCRAPERS:
            self._scrapers.popitem(last=False)
        if cadence.next() is not None and self._body is None:
            self.count("missed")  # expected, and nothing made for it (or dropped before it came)
        cadence.arrivals.append(now)
        cadence.compress = compress

    def quiet(self, now: float, period: float) -> float:
        """Seconds until the next scrape of a steady cadence is expected (0 for one expected at most
        :data:`LATE` periods ago that has not come yet: it may be waiting for the event loop
        already); infinite if none is. Work that would hold up the event loop's thread for long
        (a full garbage collection) waits for a round that leaves it this much room."""
        room = math.inf
        for cadence in self._scrapers.values():
            at = cadence.next()
            if at is not None and at >= now - LATE * period:
                room = min(room, max(at - now, 0.0))
        return room

    def round_done(self, now: float, period: float) -> None:
        """A sampling round completed (at monotonic ``now``): the body made before it is out of
        date, but for a body not served yet whose scrape was expected from :data:`EARLY` periods
        before ``now`` to :data:`LATE` periods after: that scrape is on its way, or in the
        listener's queue while the event loop finishes a round, and is served that body (from
        the round before this one) rather than waiting for another. Held over one round at most."""
        self.round += 1
        at = self._for
        if (
            self._body is not None and not self._served and not self._held and at is not None
            and at - EARLY * period < now <= at + LATE * period
        ):
            self._held = True
            return
        self._drop()

    def due(self, now: float, period: float) -> bool | None:
        """Whether a body is to be rendered now for a scrape expected before the next round ends
        and :data:`EARLY` after (``now`` + (1 + EARLY) sampling periods), or expected at most
        :data:`LATE` periods ago and not come yet: the encoding it asks for, or None. At most
        :data:`RENDERS` times per expected scrape."""
        if self._body is not None:
            return None
        expected = []
        for cadence in self._scrapers.values():
            at = cadence.next()
            if at is None or not now - LATE * period <= at < now + (1 + EARLY) * period:
                continue
            if cadence.rendered_for == at and cadence.renders >= RENDERS:
                continue
            expected.append((at, cadence))
        if not expected:
            return None
        at, cadence = min(expected, key=lambda e: e[0])
        cadence.renders = cadence.renders + 1 if cadence.rendered_for == at else 1
        cadence.rendered_for = at
        self._for = at
        return cadence.compress

    def started(self, tag: Tag, body: asyncio.Future[Part]) -> None:
        """The render of a body for ``tag`` is under way (for the arrival :meth:`due` chose)."""
        at = self._for
        self._drop()
        self._body, self._served, self._for = (tag, body), False, at

    def _holds(self, tag: Tag) -> bool:
        """Whether the body may be served to a scrape that would be rendered as ``tag``."""
        if self._body is None:
            return False
        made = self._body[0]
        return made == tag or (self._held and made == tag._replace(round=tag.round - 1))

    def body(self, tag: Tag) -> asyncio.Future[Part] | None:
        """The body (made, or being made) that a scrape which would be rendered as ``tag`` may be served from."""
        return self._body[1] if self._body is not None and self._holds(tag) else None

    def serve(self, tag: Tag) -> bool:
        """Whether the body made as ``tag`` may be served still (no round completed since, or only
        the one it was held over; nothing changed); counted as served the first time."""
        if not self._holds(tag):
            return False
        if not self._served:
            self._served = True
            self.count("served")
        return True

    def _drop(self) -> None:
        if self._body is not None and not self._served:
            self.count("unused")
        self._body, self._for, self._held = None, None, False
