"""Lazy residency in process: demand waits, priority over the background load, store faults."""
from __future__ import annotations

import errno
import logging
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from rmemfs import PAGE_SIZE
from rmemfs.loader import plan_load, view_writer
from rmemfs.pagemap import Run
from rmemfs.sources.base import FallbackSource, PageFailure
from rmemfs.sources.baseline import BaselineSource
from rmemfs.sources.lazy import CHUNK_PAGES, LANES, LazyLoader, Residency
from rmemfs.store.directory import DirectoryStore
from rmemfs.store.format import next_manifest

PAGES = 16 * CHUNK_PAGES


def page_bytes(p: int) -> bytes:
    return p.to_bytes(4, "little") * (PAGE_SIZE // 4)


def setup(tmp_path: Path) -> tuple[DirectoryStore, BaselineSource, Residency, bytearray, Path]:
    store = DirectoryStore(tmp_path / "backend")
    store.path.mkdir()
    m = store.create({}, regions={2: PAGES * PAGE_SIZE})
    w = store.new_segment(m.fsid, m.epoch, 1)
    for p in range(PAGES):
        if p % 97 != 5:                      # some zero pages: no copy run holds them
            w.add(2, p, memoryview(page_bytes(p)))
    info = w.finish()
    m2 = next_manifest(m, generation=1, segments=(info,))
    store.publish(m2, expect_epoch=m.epoch)
    region = bytearray(PAGES * PAGE_SIZE)
    source = BaselineSource(store, plan_load(store, m2), view_writer(lambda rid: memoryview(region)))
    return store, source, Residency({2: PAGES}), region, store.segdir / info.name


def expected(p: int) -> bytes:
    return bytes(PAGE_SIZE) if p % 97 == 5 else page_bytes(p)


def corrupt_page(source: BaselineSource, seg: Path, page: int) -> None:
    """Flip the first bytes of region 2's ``page`` in its segment: its checksum fails on load."""
    run = next(r for r in source.plan.runs if r.first_page <= page < r.first_page + r.npages)
    with seg.open("r+b") as f:
        f.seek(run.data_offset + (page - run.first_page) * PAGE_SIZE)
        f.write(b"\xff" * 16)


class Recording:
    def __init__(self, inner: BaselineSource) -> None:
        self.inner, self.calls = inner, []  # type: ignore[var-annotated]

    async def make_resident(self, runs: list[Run]) -> list[PageFailure]:
        self.calls.append(runs)
        return await self.inner.make_resident(runs)


@pytest.mark.parametrize("bulk", [True, False], ids=["bulk", "lanes"])
async def test_64_concurrent_readers_of_missing_pages_get_baseline_bytes(tmp_path: Path, bulk: bool) -> None:
    _, source, res, region, _ = setup(tmp_path)
    pages = [(i * 61 + 7) % PAGES for i in range(64)]
    assert len(set(pages)) == 64
    got: dict[int, bytes] = {}

    async def reader(p: int) -> None:
        await res.ensure(2, p, 1)
        got[p] = bytes(region[p * PAGE_SIZE:(p + 1) * PAGE_SIZE])     # no await since ensure

    loader = LazyLoader(res, source, bulk=source if bulk else None)
    async with trio.open_nursery() as nursery:
        for p in pages:
            nursery.start_soon(reader, p)
        nursery.start_soon(loader.run)
    assert all(got[p] == expected(p) for p in pages)
    assert res.complete and res.missing == 0 and loader.seconds is not None
    assert bytes(region) == b"".join(expected(p) for p in range(PAGES))
    assert res.is_resident(2, 0, PAGES)
    stats = loader.stats()
    assert stats["resident_pages"] == stats["total_pages"] == PAGES
    assert stats["demand_waits"] == len(res.wait_seconds) > 0 and stats["demand_wait_p99_s"] is not None


async def test_a_demand_is_served_before_the_rest_of_the_background_load(tmp_path: Path) -> None:
    _, source, res, region, _ = setup(tmp_path)
    rec = Recording(source)
    last = PAGES - 3
    async with trio.open_nursery() as nursery:
        nursery.start_soon(LazyLoader(res, rec).run)
        await res.ensure(2, last, 1)
        assert region[last * PAGE_SIZE:(last + 1) * PAGE_SIZE] == expected(last)
        assert not res.complete                  # the demand did not wait for the whole load
    served = next(i for i, runs in enumerate(rec.calls) if (2, last, 1) in runs)
    assert served <= LANES                       # at once, beside at most the chunks the lanes began with
    assert len(rec.calls) > 2 and len(res.wait_seconds) == 1


@pytest.mark.allow_log(r"lazy load: region 2 page 300 unreadable from .*checksum mismatch")
async def test_a_corrupt_baseline_page_fails_its_request_with_eio_and_the_load_retries(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store, source, res, region, seg = setup(tmp_path)
    plan = source.plan
    run = next(r for r in plan.runs if r.first_page <= 300 < r.first_page + r.npages)
    at = run.data_offset + (300 - run.first_page) * PAGE_SIZE
    with seg.open("r+b") as f:
        f.seek(at)
        f.write(b"\xff" * 16)
    loader = LazyLoader(res, source)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)
        with pytest.raises(OSError) as e:
            await res.ensure(2, 299, 3)
        assert e.value.errno == errno.EIO and "page 300" in str(e.value)
        await res.ensure(2, 299, 1)              # its neighbours are fine
        await res.ensure(2, 301, 1)
        while res.missing != 1:                  # everything else loads
            await res.changed()
        assert region[300 * PAGE_SIZE:301 * PAGE_SIZE] == bytes(PAGE_SIZE)    # never the corrupt bytes
        with seg.open("r+b") as f:               # the store recovers: the next request retries
            f.seek(at)
            f.write(page_bytes(300)[:16])
        await res.ensure(2, 300, 1)
        assert region[300 * PAGE_SIZE:301 * PAGE_SIZE] == page_bytes(300)
    assert res.complete and loader.seconds is not None
    assert len([r for r in caplog.records if "page 300 unreadable" in r.getMessage()]) == 1


class Patcher:
    """A stand-in for a reachable source (a unit seam): writes its own bytes, or is unreachable."""

    def __init__(self, region: bytearray, reachable: bool) -> None:
        self.region, self.reachable = region, reachable
        self.asked: list[Run] = []

    async def make_resident(self, runs: list[Run]) -> list[PageFailure]:
        if not self.reachable:
            raise OSError(errno.EHOSTUNREACH, "source unreachable")
        self.asked.extend(runs)
        for _, p, n in runs:
            for q in range(p, p + n):
                self.region[q * PAGE_SIZE:(q + 1) * PAGE_SIZE] = page_bytes(q)
        return []


@pytest.mark.parametrize("bulk", [True, False], ids=["bulk", "lanes"])
@pytest.mark.parametrize("reachable", [True, False])
@pytest.mark.allow_log(r"lazy load: region 2 page 300 unreadable")
async def test_a_corrupt_baseline_page_is_refetched_from_a_reachable_source(tmp_path: Path, reachable: bool,
                                                                            bulk: bool) -> None:
    _, source, res, region, seg = setup(tmp_path)
    corrupt_page(source, seg, 300)
    patcher = Patcher(region, reachable)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(LazyLoader(res, FallbackSource(source, patcher), bulk=source if bulk else None).run)
        if reachable:
            await res.ensure(2, 300, 1)
            assert patcher.asked == [(2, 300, 1)]
            assert region[300 * PAGE_SIZE:301 * PAGE_SIZE] == page_bytes(300)
        else:
            with pytest.raises(OSError) as e:
                await res.ensure(2, 300, 1)
            assert e.value.errno == errno.EIO and "page 300" in str(e.value)
        nursery.cancel_scope.cancel()


class HeldFirstCall:
    """Holds its first (background) load until released: a chunk stuck in flight."""

    def __init__(self, inner: BaselineSource) -> None:
        self.inner, self.release, self.first = inner, trio.Event(), True

    async def make_resident(self, runs: list[Run]) -> list[PageFailure]:
        if self.first:
            self.first = False
            await self.release.wait()
        return await self.inner.make_resident(runs)


async def test_a_page_in_flight_is_not_loaded_twice_so_a_write_after_it_survives(tmp_path: Path) -> None:
    _, source, res, region, _ = setup(tmp_path)
    held = HeldFirstCall(source)
    loader = LazyLoader(res, held)
    mine = b"\xab" * PAGE_SIZE

    async def release_later() -> None:
        await trio.sleep(0.05)
        held.release.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)
        await trio.testing.wait_all_tasks_blocked()       # the first lane holds chunk 0
        nursery.start_soon(release_later)
        await res.ensure(2, 10, 1)                         # page 10 is in the held chunk
        region[10 * PAGE_SIZE:11 * PAGE_SIZE] = mine       # a request writes it (no await since ensure)
    assert res.complete
    assert region[10 * PAGE_SIZE:11 * PAGE_SIZE] == mine


async def test_remote_source_refetches_a_corrupt_page_over_the_software_transport(tmp_path: Path) -> None:
    from functools import partial

    from rmemfs.sources.remote import RemoteSource
    from rmemfs.transport import software as sw
    from rmemfs.transport.base import Catalog, ExportedRegion, RegionRole

    _, source, res, region, seg = setup(tmp_path)
    corrupt_page(source, seg, 300)
    exported = bytearray(b"".join(page_bytes(p + 1) for p in range(PAGES)))     # the source's own bytes
    backend = sw.SoftwareExportBackend()
    backend.register(ExportedRegion(2, "data-0002.rgn", RegionRole.DATA, memoryview(exported), 0x7F0000000000))
    regions = tuple(backend._by_id[i] for i in sorted(backend._by_id))
    async with trio.open_nursery() as nursery:
        port = await nursery.start(partial(sw.serve, host="127.0.0.1", port=0, fsid="fs-lazy", secret=b"s" * 16,
                                           export=backend, catalog=lambda t: Catalog("fs-lazy", t, regions)))
        conn = await sw.connect("127.0.0.1", port, fsid="fs-lazy", secret=b"s" * 16, timeout=5.0)
        catalog = await conn.register()
        remote = RemoteSource(conn, catalog, view_writer(lambda rid: memoryview(region)), "hostA")
        nursery.start_soon(LazyLoader(res, FallbackSource(source, remote)).run)
        await res.ensure(2, 299, 3)
        assert region[300 * PAGE_SIZE:301 * PAGE_SIZE] == page_bytes(301)      # from the source
        assert region[299 * PAGE_SIZE:300 * PAGE_SIZE] == expected(299)        # from the baseline
        assert remote.bytes_read == PAGE_SIZE
        await conn.aclose()
        nursery.cancel_scope.cancel()


def test_missing_only_leaves_out_pages_the_load_does_not_write_and_pages_already_written() -> None:
    covered = {1: bytearray([1, 1, 1, 0, 1, 1]), 2: bytearray([1, 1])}
    fetched = {1: bytearray([0, 1, 0, 0, 0, 1, 0, 0]), 2: bytearray(2)}
    res = Residency.missing_only(covered, {1: 8, 2: 2, 3: 4}, resident=fetched)
    assert res.maps == {1: bytearray([0, 1, 0, 1, 0, 1, 1, 1]), 2: bytearray(2), 3: bytearray([1] * 4)}
    assert (res.missing, res.to_load, res.complete) == (5, 5, False)
    assert not res.is_resident(1, 0, 1) and res.is_resident(1, 5, 3) and res.is_resident(3, 0, 4)


async def _exporter(nursery: trio.Nursery, exported: bytearray, port: int = 0,
                    **serve_kw: float) -> tuple[int, trio.CancelScope]:
    """A real software-transport server exporting ``exported`` as region 2; cancel the scope to stop it."""
    from rmemfs.transport import software as sw
    from rmemfs.transport.base import Catalog, ExportedRegion, RegionRole

    backend = sw.SoftwareExportBackend()             # fresh rkeys, as a restarted exporter has
    backend.register(ExportedRegion(2, "data-0002.rgn", RegionRole.DATA, memoryview(exported), 0x7F0000000000))
    regions = tuple(backend._by_id.values())
    scope = trio.CancelScope()

    async def run(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            await sw.serve(host="127.0.0.1", port=port, fsid="fs-lazy", secret=b"s" * 16, export=backend,
                           catalog=lambda t: Catalog("fs-lazy", t, regions), task_status=task_status, **serve_kw)
    return await nursery.start(run), scope


async def test_reconnecting_source_remakes_a_connection_the_restarted_exporter_dropped(tmp_path: Path) -> None:
    from rmemfs.recovery import ReconnectingSource

    region = bytearray(64 * PAGE_SIZE)
    first = bytearray(b"".join(page_bytes(p + 1) for p in range(64)))
    second = bytearray(b"".join(page_bytes(p + 1000) for p in range(64)))
    async with trio.open_nursery() as nursery:
        port, stop = await _exporter(nursery, first)
        src = ReconnectingSource("software", "127.0.0.1", port, "fs-lazy", b"s" * 16, 5.0,
                                 view_writer(lambda rid: memoryview(region)))
        assert await src.make_resident([(2, 0, 4)]) == []
        assert region[:4 * PAGE_SIZE] == first[:4 * PAGE_SIZE]
        stop.cancel()                                    # the exporter restarts on the same port
        await trio.testing.wait_all_tasks_blocked()
        await _exporter(nursery, second, port)
        assert await src.make_resident([(2, 8, 2)]) == []     # reconnected first, with the new catalog's rkeys
        assert region[8 * PAGE_SIZE:10 * PAGE_SIZE] == second[8 * PAGE_SIZE:10 * PAGE_SIZE]
        await src.aclose()
        nursery.cancel_scope.cancel()


@pytest.mark.allow_log(r"lazy load: region 2 page 300 unreadable from .*: retried later")
async def test_the_bulk_pass_hands_a_corrupt_page_to_the_fallback_and_loads_everything(tmp_path: Path) -> None:
    _, source, res, region, seg = setup(tmp_path)
    corrupt_page(source, seg, 300)
    patcher = Patcher(region, reachable=True)
    loader = LazyLoader(res, FallbackSource(Recording(source), patcher), bulk=source)
    await loader.run()                                    # nobody asks: the pass itself hands page 300 on
    assert patcher.asked == [(2, 300, 1)]
    assert bytes(region) == b"".join(page_bytes(p) if p == 300 else expected(p) for p in range(PAGES))
    assert res.complete and loader.loaded_pages >= res.to_load and source.bytes_read >= res.to_load * PAGE_SIZE


async def test_the_bulk_pass_never_writes_over_a_page_claimed_after_it_began(tmp_path: Path) -> None:
    _, plain, res, region, _ = setup(tmp_path)
    source = BaselineSource(plain.store, plain.plan, res.guarded(view_writer(lambda rid: memoryview(region))))
    mine = b"\xab" * PAGE_SIZE
    claimed = threading.Event()

    class HeldBulk:
        """The bulk source, its first chunk (pages 0-255, planned before the claim) held until page 10 is claimed."""

        def stream(self, chunks, chunk_pages, gate, done, lanes=1):  # type: ignore[no-untyped-def]
            def held_gate(wait: bool) -> bool:
                claimed.wait(5)
                return gate(wait)
            source.stream(chunks, chunk_pages, held_gate, done, lanes)

    loader = LazyLoader(res, source, bulk=HeldBulk())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)
        await trio.sleep(0.05)
        res.claim(2, 10, 1)                               # a request overwrites page 10 whole
        region[10 * PAGE_SIZE:11 * PAGE_SIZE] = mine
        claimed.set()
    assert res.complete and region[10 * PAGE_SIZE:11 * PAGE_SIZE] == mine
    assert bytes(region) == b"".join(mine if p == 10 else expected(p) for p in range(PAGES))


@pytest.mark.parametrize("share_every", [10.0, 0.2])
async def test_the_bulk_pass_pauses_while_a_demand_is_served_but_for_its_share(tmp_path: Path,
                                                                               share_every: float) -> None:
    _, source, res, region, _ = setup(tmp_path)
    held = HeldFirstCall(source)                          # through ``source`` come only the demands
    rate = 64 * PAGE_SIZE                                 # the pass: 3-page chunks, 20 a second
    loader = LazyLoader(res, held, bulk=source, rate_bytes=rate, share_every=share_every)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)
        await trio.sleep(0.2)
        nursery.start_soon(res.ensure, 2, PAGES - 1, 1)   # held: the demand is being served for 0.5 s
        await trio.sleep(0.05)
        before = res.missing
        await trio.sleep(0.5)
        landed = before - res.missing                     # unpaused: about 10 chunks, 30 pages
        held.release.set()
        with trio.move_on_after(0.3):
            while res.missing > before - landed - 6:      # and it goes on once the demand is served
                await res.changed()
        resumed = before - landed - res.missing
        nursery.cancel_scope.cancel()
    if share_every > 1:
        assert landed <= 2 * 3, landed                    # only what was in flight when the demand came
    else:
        assert 2 * 3 <= landed <= (2 + 0.5 / share_every + 1) * 3, landed   # and a chunk every share_every
    assert resumed >= 6, resumed


def _cached_bytes(path: Path) -> int:
    """How much of the file is in the page cache (util-linux fincore, which asks mincore)."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)], check=True,
                         capture_output=True, text=True).stdout
    return int(out.split()[0])


@pytest.mark.skipif(shutil.which("fincore") is None, reason="needs util-linux fincore")
async def test_the_bulk_pass_drops_what_it_copied_from_the_page_cache(tmp_path: Path) -> None:
    """A lazy load copies each baseline page once: its page-cache copy would double the memory the load needs
    (at 8 GiB beside the failed host's 8 GiB on a 24 GiB machine, reclaiming it stalled the demand reads)."""
    _, source, res, region, seg = setup(tmp_path)
    seg.read_bytes()                                      # all of it cached, as if just written or read
    if _cached_bytes(seg) < seg.stat().st_size // 2:
        pytest.skip("this filesystem does not keep the segment in the page cache (tmpfs?)")
    await LazyLoader(res, source, bulk=source).run()
    assert res.complete and all(region[p * PAGE_SIZE:(p + 1) * PAGE_SIZE] == expected(p) for p in range(PAGES))
    assert _cached_bytes(seg) <= seg.stat().st_size // 4, (_cached_bytes(seg), seg.stat().st_size)


async def test_cancelling_the_load_stops_the_bulk_pass_before_it_is_done(tmp_path: Path) -> None:
    _, source, res, region, _ = setup(tmp_path)
    loader = LazyLoader(res, source, bulk=source, rate_bytes=64 * PAGE_SIZE)    # 16 chunks/s: about 4 s
    with trio.move_on_after(0.3):
        await loader.run()
    assert not res.complete and loader.seconds is None
    written = bytes(region)
    await trio.sleep(0.3)                                 # the stream's thread is gone: nothing lands later
    assert bytes(region) == written and 0 < res.total - res.missing < PAGES


async def test_a_sequential_reader_moves_the_bulk_pass_to_where_it_reads(tmp_path: Path) -> None:
    _, source, res, region, _ = setup(tmp_path)
    taken: list[int] = []

    class Recorded:
        def stream(self, chunks, chunk_pages, gate, done, lanes=1):  # type: ignore[no-untyped-def]
            def recorded() -> Iterator[Run]:
                for chunk in chunks:
                    taken.append(chunk[1])
                    yield chunk
            source.stream(recorded(), chunk_pages, gate, done, lanes)

    loader = LazyLoader(res, source, bulk=Recorded(), rate_bytes=64 * PAGE_SIZE)   # 3-page chunks, 20 a second
    middle = PAGES // 2
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)
        await trio.sleep(0.2)
        await res.ensure(2, middle, 1)                    # at random: the pass pauses, stays where it is
        before = len(taken)
        for p in range(middle + 1, middle + 4):           # reading on: the pass jumps there
            await res.ensure(2, p, 1)
        await trio.sleep(0.3)
        after = taken[before:]
        nursery.cancel_scope.cancel()
    assert all(p < middle for p in taken[:before]), taken[:before]
    assert after and after[-1] > middle, after
    assert all(first >= middle for first in after[1:]), after    # the one in flight, then on from the reader


async def test_reconnecting_source_remakes_a_connection_the_exporter_dropped_as_idle(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The drop is seen before the next batch is sent: that batch goes over a fresh connection and
    fails nothing (no EIO for the page that waited on it)."""
    from rmemfs.recovery import ReconnectingSource

    caplog.set_level(logging.INFO, logger="rmemfs.recovery")
    region = bytearray(64 * PAGE_SIZE)
    exported = bytearray(b"".join(page_bytes(p + 1) for p in range(64)))
    async with trio.open_nursery() as nursery:
        port, _ = await _exporter(nursery, exported, idle_timeout=0.2)
        src = ReconnectingSource("software", "127.0.0.1", port, "fs-lazy", b"s" * 16, 5.0,
                                 view_writer(lambda rid: memoryview(region)))
        assert await src.make_resident([(2, 0, 4)]) == []
        first = src.conn
        await trio.sleep(1.0)                            # the store delivers for a while: the exporter drops us
        assert await src.make_resident([(2, 8, 2)]) == []     # reconnected first, nothing failed
        assert src.conn is not None and src.conn is not first
        assert region[:10 * PAGE_SIZE] == exported[:4 * PAGE_SIZE] + bytes(4 * PAGE_SIZE) + exported[8 * PAGE_SIZE:10 * PAGE_SIZE]
        assert [r.getMessage() for r in caplog.records if "reconnecting" in r.getMessage()] == [
            f"source 127.0.0.1:{port}: the exporter closed the connection; reconnecting"]
        await src.aclose()
        nursery.cancel_scope.cancel()


@pytest.mark.allow_log(r"lazy load: the bulk pass failed .*loading the rest page by page")
async def test_a_bulk_pass_that_fails_as_a_whole_leaves_the_rest_to_the_lanes(tmp_path: Path) -> None:
    _, source, res, region, _ = setup(tmp_path)
    taken = threading.Event()
    go_on = threading.Event()

    class Broken:
        """Takes its first chunk (pages 0-255 in flight, so a request for them waits for it), then fails."""

        def stream(self, chunks, chunk_pages, gate, done, lanes=1):  # type: ignore[no-untyped-def]
            next(chunks)
            taken.set()
            go_on.wait(5)
            raise OSError(errno.EIO, "store gone")

    loader = LazyLoader(res, source, bulk=Broken())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader.run)
        await trio.to_thread.run_sync(taken.wait, 5)
        nursery.start_soon(res.ensure, 2, 10, 1)          # waits for the pass, which then fails
        await trio.sleep(0.05)
        go_on.set()
        with trio.fail_after(5):
            await res.ensure(2, 10, 1)
    assert res.complete and bytes(region) == b"".join(expected(p) for p in range(PAGES))
