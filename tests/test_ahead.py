"""Scrapes rendered ahead (api/ahead.py): the gzip body joined from two deflate streams, the
scrapers' cadence, and when a body made ahead is served. The daemon serving them to a real
Prometheus: tests/test_prometheus.py."""

from __future__ import annotations

import asyncio
import gzip
import math
import subprocess
import zlib

import pytest
from prometheus_client import CollectorRegistry

from nstap.api import ahead
from nstap.api.ahead import Cadence, Deflate, Part, RenderAhead, Tag


def deflate_part(text: bytes) -> Part:
    deflate = Deflate()
    deflate.write(text)
    return deflate.part()


def gzip_join(first: Part, rest: bytes) -> bytes:
    """The body a scrape served ahead gets: ``first`` (made ahead), then ``rest`` in the same member."""
    deflate = Deflate(first)
    deflate.write(rest)
    return deflate.gzip()


@pytest.mark.parametrize("first, rest", [(b"", b""), (b"a 1\n" * 50_000, b"b 2\n"), (bytes(range(256)) * 999, b"# tail\n" * 3000)])
def test_a_body_ahead_and_the_rest_are_one_gzip_member(first: bytes, rest: bytes) -> None:
    body = gzip_join(deflate_part(first), rest)
    # One member: a decoder that stops after the first (curl's) still gets all of it.
    decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
    assert decoder.decompress(body) == first + rest
    assert decoder.eof and decoder.unused_data == b""
    assert gzip.decompress(body) == first + rest
    assert subprocess.run(["gzip", "-dc"], input=body, capture_output=True, check=True).stdout == first + rest


def test_a_wrong_crc_is_caught_by_a_real_gzip() -> None:
    """The CRC chained over both streams is what gzip checks: one made over the rest alone fails."""
    part = deflate_part(b"x 1\n" * 1000)
    wrong = gzip_join(part._replace(crc=0), b"y 2\n")
    assert subprocess.run(["gzip", "-t"], input=wrong, capture_output=True).returncode != 0


def steady(cadence: Cadence, start: float, every: float, n: int = 4) -> None:
    for i in range(n):
        cadence.arrivals.append(start + i * every)


def test_the_next_scrape_is_expected_only_from_a_steady_cadence() -> None:
    c = Cadence()
    steady(c, 100.0, 15.0, 2)
    assert c.next() is None  # one interval: nothing to compare it with
    c.arrivals.append(130.2)
    assert c.next() == pytest.approx(130.2 + 30.2 / 2)
    c.arrivals.append(152.0)  # a scrape 6.8 s late: the cadence is broken until two intervals agree again
    assert c.next() is None
    c.arrivals.append(167.0)
    assert c.next() is None
    c.arrivals.append(182.0)
    assert c.next() == pytest.approx(197.0)


def tag(round_: int, generation: int = 1, compress: bool = True, namespaces: dict | None = None) -> Tag:
    return Tag(round_, generation, namespaces if namespaces is not None else {}, frozenset(), compress)


def test_a_body_is_rendered_once_per_expected_scrape_and_served_only_while_it_holds() -> None:
    async def run() -> None:
        counts: list[str] = []
        a = RenderAhead(counts.append)
        who = ("127.0.0.1", "Prometheus/2.42.0")
        for i in range(1, 4):
            a.scraped(who, 100.0 + 15 * i, True)  # the next expected at 160
        a.round_done(150.0, 1.0)
        assert a.due(now=150.0, period=1.0) is None  # not before the next round ends
        assert a.due(now=159.5, period=1.0) is True  # gzip, as it asked
        loop = asyncio.get_running_loop()
        body: asyncio.Future[Part] = loop.create_future()
        a.started(tag(a.round), body)
        assert a.due(now=159.5, period=1.0) is None  # a body is there
        a.scraped(who, 160.0, True)  # it comes
        assert a.body(tag(a.round, compress=False)) is None  # another encoding
        assert a.body(tag(a.round, generation=2)) is None  # a namespace came or went
        assert a.body(tag(a.round, namespaces={5: "renamed"})) is None  # names or owners changed
        assert a.body(tag(a.round)) is body and a.body(tag(a.round)) is body  # every scrape of this round
        assert a.serve(tag(a.round)) and a.serve(tag(a.round))
        assert not a.serve(tag(a.round, generation=2))
        a.round_done(160.5, 1.0)  # served: not held, whatever the time
        assert not a.serve(tag(a.round - 1)) and a.body(tag(a.round - 1)) is None
        assert not a.serve(tag(a.round)) and a.body(tag(a.round)) is None
        assert a.due(now=160.5, period=1.0) is None  # it came: the next is expected at 175
        # That one does not come. Its first body is made 1 + EARLY periods before it is expected,
        # made again from the round that ends more than EARLY before, held over the round that
        # ends as it is expected, and no third is made.
        assert a.due(now=173.7, period=1.0) is None  # 1.3 periods before it is expected
        assert a.due(now=173.9, period=1.0) is True  # within 1 + EARLY periods
        a.started(tag(a.round), loop.create_future())
        a.round_done(174.75, 1.0)  # a round late by 0.05: more than EARLY before the scrape
        assert counts == ["served", "unused"]
        assert a.due(now=174.75, period=1.0) is True  # not come by the next round: once more
        body = loop.create_future()
        a.started(tag(a.round), body)
        a.round_done(175.4, 1.0)  # a round that ends as it is expected (0.4 after): held
        assert counts == ["served", "unused"]
        assert a.body(tag(a.round)) is body and a.body(tag(a.round - 1)) is body
        assert a.due(now=175.4, period=1.0) is None  # RENDERS at most (and it holds one)
        a.round_done(175.45, 1.0)  # held over one round at most (a late round and the next one can both end then)
        assert counts == ["served", "unused", "unused"]
        assert a.body(tag(a.round)) is None and a.body(tag(a.round - 1)) is None
        # Long gone: a scrape expected more than half a period ago is not rendered for.
        assert a.due(now=176.4, period=1.0) is None
        a.scraped(who, 176.4, True)
        assert counts == ["served", "unused", "unused", "missed"]  # expected, and found no body
        assert a.due(now=190.6, period=1.0) is None

    asyncio.run(run())


def arrivals(a: RenderAhead, who: tuple[str, str], times: list[float]) -> None:
    for t in times:
        a.scraped(who, t, True)


@pytest.mark.parametrize("late", [0.0, 0.03, 0.08, 0.13])
@pytest.mark.parametrize("phase", [i / 20 for i in range(20)])
def test_every_scrape_of_a_steady_cadence_finds_a_body_when_its_arrivals_were_seen_late(late: float, phase: float) -> None:
    """Prometheus scrapes at 0, 15, 30, 45 s; the event loop saw the third arrival ``late``
    (busy with a round: tens of milliseconds at 1,000 containers), so it expects the fourth up to
    1.5 x ``late`` after it comes. Rounds end every second at ``phase``: whichever round comes
    just before the scrape, a body made for it is there when it arrives, and one or two are made.
    (Before EARLY: for 8 of these 80 cases the round that would have made it ended just after
    the scrape, as for one of the four scrapes of a 1,000-container bench run at 3f7b83d.)"""

    async def run() -> None:
        counts: list[str] = []
        a = RenderAhead(counts.append)
        loop = asyncio.get_running_loop()
        who = ("127.0.0.1", "Prometheus/2.42.0")
        arrivals(a, who, [0.0, 15.0, 30.0 + late])
        renders = 0
        for now in [40.0 + phase + i for i in range(8)]:
            if now > 45.0 and counts[-1:] != ["served"]:
                arrivals(a, who, [45.0])
                assert a.serve(tag(a.round)), (now, counts)
            a.round_done(now, 1.0)
            if a.due(now, 1.0) is not None:
                renders += 1
                a.started(tag(a.round), loop.create_future())
        assert "missed" not in counts and counts.count("served") == 1
        assert 1 <= renders <= ahead.RENDERS

    asyncio.run(run())


def expecting_at_45() -> tuple[RenderAhead, list[str], tuple[str, str]]:
    """A RenderAhead whose one scraper came at 0, 15 and 30 s (the next expected at 45); what it
    counts; the scraper."""
    counts: list[str] = []
    a = RenderAhead(counts.append)
    who = ("127.0.0.1", "Prometheus/2.42.0")
    arrivals(a, who, [0.0, 15.0, 30.0])
    return a, counts, who


@pytest.mark.parametrize("ends", [44.85, 45.0, 45.3, 45.5])
def test_a_scrape_that_comes_late_is_served_the_body_held_for_it(ends: float) -> None:
    """The round after the body was made ends as the scrape is expected (at ``ends``: from EARLY
    before to LATE after): the scrape is on its way or queued behind the round. Made again from
    that round, the scrape waited for it (201 ms of a 249 ms scrape at 1,000 containers); the body
    made for it is held over that round instead, and served when it comes. Not over another."""

    async def run() -> None:
        a, counts, who = expecting_at_45()
        loop = asyncio.get_running_loop()
        a.round_done(ends - 1.0, 1.0)
        assert a.due(ends - 1.0, 1.0) is True
        body = loop.create_future()
        a.started(tag(a.round), body)
        a.round_done(ends, 1.0)  # it has not come: held
        assert counts == [] and a.due(ends, 1.0) is None
        arrivals(a, who, [ends + 0.03])
        assert a.body(tag(a.round)) is body and a.serve(tag(a.round))
        assert counts == ["served"]
        a.round_done(ends + 1.0, 1.0)
        assert a.body(tag(a.round)) is None and a.body(tag(a.round - 1)) is None

    asyncio.run(run())


def test_a_body_is_made_again_from_a_round_that_ends_early_enough_and_then_held() -> None:
    """A round that ends more than EARLY before the scrape (rounds late, or a body made early)
    makes the body again from its samples, the fresher; the round after that holds it."""

    async def run() -> None:
        a, counts, who = expecting_at_45()
        loop = asyncio.get_running_loop()
        a.round_done(43.85, 1.0)
        assert a.due(43.85, 1.0) is True
        a.started(tag(a.round), loop.create_future())
        a.round_done(44.7, 1.0)  # 0.3 periods before: made again
        assert counts == ["unused"] and a.due(44.7, 1.0) is True
        body = loop.create_future()
        a.started(tag(a.round), body)
        a.round_done(45.3, 1.0)  # it has not come: held
        arrivals(a, who, [45.35])
        assert a.body(tag(a.round)) is body and a.serve(tag(a.round))
        assert counts == ["unused", "served"]

    asyncio.run(run())


def test_the_scrapers_kept_are_bounded() -> None:
    a = RenderAhead()
    for i in range(10 * ahead.SCRAPERS):
        a.scraped((f"10.0.0.{i}", "x"), float(i), False)
    assert len(a._scrapers) == ahead.SCRAPERS
    assert ("10.0.0.%d" % (10 * ahead.SCRAPERS - 1), "x") in a._scrapers  # the most recent stay


def test_the_sample_store_counts_namespaces_that_come_or_go() -> None:
    """A body ahead is served only while the store's generation holds: a new namespace's first
    sample (or one gone) changes it, another sample of one already there does not."""
    from test_exporter import sample

    from nstap.samples import SampleStore

    store = SampleStore()
    store.put(sample(5))
    first = store.generation
    store.put(sample(5))
    assert store.generation == first
    store.put(sample(6))
    assert store.generation == first + 1
    store.drop(6)
    store.drop(6)
    assert store.generation == first + 2


def test_the_room_before_the_next_scrape_counts_one_overdue_as_none() -> None:
    """What a full collection may take after a round (RenderAhead.quiet): the time to the next
    expected scrape; none for a scrape expected up to LATE periods ago that has not come (the
    event loop may not have read it yet); a scraper gone for longer no longer counts."""
    a = RenderAhead()
    who = ("127.0.0.1", "Prometheus/2.42.0")
    assert a.quiet(100.0, 1.0) == math.inf  # no scraper
    arrivals(a, who, [115.0, 130.0])
    assert a.quiet(140.0, 1.0) == math.inf  # no steady cadence yet
    arrivals(a, who, [145.0])  # the next expected at 160
    assert a.quiet(150.0, 1.0) == pytest.approx(10.0)
    assert a.quiet(159.9, 1.0) == pytest.approx(0.1)
    assert a.quiet(160.4, 1.0) == 0.0  # overdue by less than LATE periods
    assert a.quiet(160.4, 0.5) == math.inf  # by more: gone
    arrivals(a, ("10.0.0.2", "Prometheus/2.42.0"), [101.0, 131.0, 161.0])  # another, expected at 191
    arrivals(a, who, [160.4])
    assert a.quiet(161.0, 1.0) == pytest.approx(14.6)  # the nearer of the two (175.6: 15.2 s after the last)


async def test_no_full_collection_runs_while_a_scrape_is_answered() -> None:
    """A full collection holds the event loop's thread (50-200 ms at 1,000 containers): one that
    ran after a round while a scrape's body was joined held its response back (261 ms, against
    80-145 ms for the others of that run). A real listener answers a scrape whose render is held
    in the render thread: meanwhile the server leaves no room (ApiServer.quiet) and a due
    collection waits; once answered, it runs."""
    import threading
    import urllib.request

    from nstap.api.server import ApiServer
    from nstap.app import collect_after_rounds
    from nstap.exporter import ContainerCollector
    from nstap.heap import FullCollections
    from nstap.registry import ContainerRegistry
    from nstap.samples import SampleStore
    from nstap.watcher import Ticker

    from conftest import free_port

    registry = ContainerRegistry()
    server = ApiServer(f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}", CollectorRegistry(), ContainerCollector(registry, SampleStore(), []), registry, set, "token")
    held, rendering = threading.Event(), threading.Event()
    render = server._render

    def slow_render(*args):  # fault injection: a render that takes until the test lets it go
        rendering.set()
        held.wait(10)
        return render(*args)

    server._render = slow_render  # type: ignore[method-assign]
    now = [100.0]
    fc = FullCollections(every=10.0, clock=lambda: now[0])
    fc.take_over()
    now[0] = 110.0
    fc.after_round()  # the first: how long one takes is known from now on
    assert fc.runs == 1 and fc.need() > 0.0
    ticker = Ticker(1.0)  # not started: no tick armed, so only the scrape stands in the way
    collect_after_rounds(fc, ticker, server)  # as the daemon hooks its collections (app.py)

    def round_done() -> None:
        for hook in ticker.done_hooks:
            hook()

    await server.start()
    try:
        port = server.metrics_listen[1]
        loop = asyncio.get_running_loop()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={"Accept-Encoding": "gzip"})
        scrape = loop.run_in_executor(None, lambda: urllib.request.urlopen(request, timeout=10).read())
        assert await loop.run_in_executor(None, rendering.wait, 10)
        assert server.quiet(1.0) == 0.0
        now[0] = 120.0  # the next is due
        round_done()
        assert fc.runs == 1 and fc.deferred == 1
        held.set()
        assert gzip.decompress(await scrape).startswith(b"# HELP")
        assert server.quiet(1.0) == math.inf  # one arrival: no cadence, and none under way
        round_done()
        assert fc.runs == 2
    finally:
        held.set()
        fc.give_back()
        await server.stop()


def test_a_scrapes_gzip_body_is_its_text_made_ahead_or_at_once() -> None:
    """The bodies the server sends (samples_body, scrape_body), compressed as the exporter hands its
    families over: a real gzip reads back exactly the text an uncompressed scrape gets, whether the samples' part was
    made ahead or not."""
    from test_exporter import fleet_collector

    collector = fleet_collector(30)
    scrape, own = collector.snapshot(), b"# HELP own x\n# TYPE own gauge\nown 1\n"
    whole = ahead.scrape_body(collector, scrape, False, own)
    assert whole == own + collector.exposition(scrape)
    made_ahead = ahead.scrape_body(collector, scrape, False, own, ahead.samples_body(collector, scrape, False))
    assert made_ahead == collector.exposition(scrape, "samples") + own + collector.exposition(scrape, "state")
    for body, text in (
        (ahead.scrape_body(collector, scrape, True, own), whole),
        (ahead.scrape_body(collector, scrape, True, own, ahead.samples_body(collector, scrape, True)), made_ahead),
    ):
        assert subprocess.run(["gzip", "-dc"], input=body, capture_output=True, check=True).stdout == text


def test_a_body_is_compressed_in_chunks_not_piece_by_piece(monkeypatch) -> None:
    """zlib gives up the GIL at every call, and the render thread waits for it back each time (up
    to 5 ms beside a busy event loop): a body's many small pieces (two per family) go to zlib in
    chunks of ahead.CHUNK, and the gzip still reads back as the text."""
    calls = []
    real = zlib.compressobj

    class Counting:  # the real compressor, its calls counted
        def __init__(self, *args) -> None:
            self.inner = real(*args)

        def compress(self, data):
            calls.append(len(data))
            return self.inner.compress(data)

        def flush(self, *args):
            return self.inner.flush(*args)

    monkeypatch.setattr(ahead.zlib, "compressobj", Counting)
    monkeypatch.setattr(ahead, "CHUNK", 64 << 10)
    pieces = [b"# HELP f%d x\n" % i + b"f%d{a=\"b\"} 1\n" % i * (i % 50) for i in range(2000)]
    deflate = ahead.Deflate()
    for piece in pieces:
        deflate.write(piece)
    text = b"".join(pieces)
    assert gzip.decompress(deflate.gzip()) == text
    assert sum(calls) == len(text) and len(calls) <= len(text) // (64 << 10) + 1, (len(calls), len(text))
    assert all(n >= 64 << 10 for n in calls[:-1])
