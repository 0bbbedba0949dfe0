"""Lazy residency: which pages of the regions are in, waits for the missing ones, and the loader.

``Residency`` holds one byte per page of each region (1 = resident). ``complete`` is the fast path
every request takes once the load is done (and from the start for regions fetched eagerly). A
request touching a missing page calls ``ensure``, which queues a demand and waits; the
``LazyLoader`` serves demands at once, on a task of their own, and pauses its background load
meanwhile, so a demand competes at most with the background chunks already in flight.

Atomicity (trio: only awaits break it). ``ensure`` returns right after a check that found every
page resident, with no await in between; the caller must read or write the region with no await
between ``ensure`` returning and that use. The filesystem core (sync) raises ``NotResident`` before
it changes anything when an operation needs the old contents of a missing page (a read, a write or
truncate that covers part of a page); its caller awaits ``ensure`` and runs the operation again.

A page that is about to be overwritten whole, zeroed or freed needs no old contents: ``claim`` marks
it resident at once. The loader writes through ``guarded`` under the same lock and only into pages
still missing, so a claimed page never gets a late baseline copy written over it.
"""
from __future__ import annotations

import bisect
import errno
import logging
import threading
import time
from collections import deque
from functools import partial
from collections.abc import Callable, Iterator

import trio

from .. import PAGE_SIZE
from ..loader import RegionWriter
from ..regions import set_runs, unset_runs
from .base import BulkSource, PageFailure, PageSource

log = logging.getLogger(__name__)

CHUNK_PAGES = 256          # a lane's read: 1 MiB
BULK_CHUNK_PAGES = 256     # a bulk pass's read: 1 MiB; a demand waits behind the few in flight
BULK_LANES = 2             # region files the bulk pass writes at once (one writer each: the inode lock)
RETRY_SECONDS = 1.0        # pause before a pass over the pages that failed
# The bulk pass resumes once no demand came for DEMAND_QUIET (a faulting reader asks again within a
# millisecond or so: resuming between its faults would put a chunk on the disk ahead of each), but
# under a steady stream of demands it still reads one chunk every BULK_SHARE_EVERY, so that it ends.
DEMAND_QUIET = 0.01
BULK_SHARE_EVERY = 0.05
LANES = 2                  # chunks in flight: one thread reads and checks while another writes


_FLIP = bytes([1, 0] + [0] * 254)


class NotResident(Exception):
    """An operation needs the old contents of pages not loaded yet: await ``ensure`` and run it again."""

    def __init__(self, region_id: int, first: int, n: int) -> None:
        super().__init__(region_id, first, n)
        self.region_id, self.first, self.n = region_id, first, n


class Residency:
    def __init__(self, region_pages: dict[int, int], *, resident: bool = False) -> None:
        fill = 1 if resident else 0
        self.maps = {rid: bytearray(bytes([fill]) * n) for rid, n in region_pages.items()}
        self.total = sum(region_pages.values())
        self.missing = 0 if resident else self.total
        self.complete = self.missing == 0
        self.to_load = self.missing          # missing at the start: what the load brings in
        # Held by the loader's writes (worker threads) and by claim (event loop): a claimed page
        # is never written by the loader afterwards.
        self.lock = threading.Lock()
        # Before the mount (journal replay, nothing else running): a synchronous loader for what the
        # replay needs; None once serving, when a missing page raises NotResident instead.
        self.fill_now: Callable[[list[tuple[int, int, int]]], list[PageFailure]] | None = None
        self._changed = trio.Event()
        self.demands: deque[tuple[int, int, int]] = deque()
        self.demanded = trio.Event()
        self.failed: dict[tuple[int, int], PageFailure] = {}    # pages whose last load failed
        self.wait_seconds: list[float] = []                     # one per ensure that had to wait

    @classmethod
    def missing_only(cls, covered: dict[int, bytearray], region_pages: dict[int, int],
                     resident: dict[int, bytearray] | None = None) -> Residency:
        """Residency of regions whose pages are all in except those marked in ``covered`` (what a load
        writes) and not marked in ``resident`` (written already, e.g. fetched from the source)."""
        res = cls(region_pages, resident=True)
        for rid, m in res.maps.items():
            c = covered.get(rid)
            if c is None:
                continue
            c = c[:len(m)]
            m[:len(c)] = c.translate(_FLIP)
            written = (resident or {}).get(rid)
            if written is not None and written.find(1) >= 0:     # both one 0/1 byte per page: OR as integers
                w = bytes(written[:len(c)]).ljust(len(c), b"\0")
                m[:len(c)] = (int.from_bytes(m[:len(c)], "little") | int.from_bytes(w, "little")).to_bytes(len(c), "little")
            res.missing += len(c) - m[:len(c)].count(1)
        res.complete = res.missing == 0
        res.to_load = res.missing
        return res

    def is_resident(self, region_id: int, first: int, n: int) -> bool:
        if self.complete:
            return True
        m = self.maps.get(region_id)
        return m is None or m.find(0, first, first + n) < 0

    def mark(self, region_id: int, first: int, n: int) -> None:
        """Pages first..first+n-1 are in (written by the loader, or fetched eagerly)."""
        m = self.maps.get(region_id)
        if m is None:
            return
        n = max(0, min(n, len(m) - first))
        with self.lock:
            was = m[first:first + n].count(1)
            m[first:first + n] = b"\x01" * n
            self.missing -= n - was
            self.complete = self.missing == 0
        if self.failed:
            for page in range(first, first + n):
                self.failed.pop((region_id, page), None)
        self._wake()

    def claim(self, region_id: int, first: int, n: int) -> None:
        """Pages about to be overwritten whole, zeroed or freed: resident now, never loaded."""
        if not self.complete:
            self.mark(region_id, first, n)

    def require(self, region_id: int, first: int, n: int) -> None:
        """Raise NotResident unless pages first..first+n-1 are in (before the mount: load them now)."""
        if self.is_resident(region_id, first, n):
            return
        if self.fill_now is None:
            raise NotResident(region_id, first, n)
        runs = self.missing_runs(region_id, first, n)
        bad = self.fill_now(runs)
        if bad:
            f = bad[0]
            raise OSError(errno.EIO, f"region {f.region_id} page {f.page} could not be loaded from {f.where}: "
                                     f"{f.why}")
        for rid, a, k in runs:
            self.mark(rid, a, k)

    def guarded(self, write: RegionWriter) -> RegionWriter:
        """``write`` for the loader: only into pages still missing, under the lock (see the module doc)."""
        def guarded_write(region_id: int, offset: int, data: memoryview) -> None:
            m = self.maps.get(region_id)
            if m is None:
                write(region_id, offset, data)
                return
            first, n = offset // PAGE_SIZE, len(data) // PAGE_SIZE
            with self.lock:
                for a, b in unset_runs(m, first, first + n):
                    write(region_id, a * PAGE_SIZE, data[(a - first) * PAGE_SIZE:(b - first) * PAGE_SIZE])
        return guarded_write

    def fail(self, failure: PageFailure) -> None:
        self.failed[failure.region_id, failure.page] = failure
        self._wake()

    async def changed(self) -> None:
        """Wait for the next page to become resident or fail."""
        await self._changed.wait()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def ensure(self, region_id: int, first: int, n: int) -> None:
        """Return once pages first..first+n-1 are resident (see the module doc on atomicity).

        Raises OSError(EIO) when the loader could not deliver one of them; the next request retries."""
        if self.is_resident(region_id, first, n):
            return
        t = time.monotonic()
        for page in range(first, first + n):       # an earlier failure is retried, not reported again
            self.failed.pop((region_id, page), None)
        self.demands.append((region_id, first, n))
        self.demanded.set()
        while not self.is_resident(region_id, first, n):
            bad = next((f for p in range(first, first + n) if (f := self.failed.get((region_id, p)))), None)
            if bad is not None:
                self.failed.pop((bad.region_id, bad.page), None)
                raise OSError(errno.EIO, f"region {bad.region_id} page {bad.page} could not be loaded from "
                                         f"{bad.where}: {bad.why}")
            await self._changed.wait()
        self.wait_seconds.append(time.monotonic() - t)

    def missing_runs(self, region_id: int, first: int, n: int) -> list[tuple[int, int, int]]:
        m = self.maps.get(region_id)
        if m is None:
            return []
        return [(region_id, a, b - a) for a, b in unset_runs(m, first, min(first + n, len(m)))]


class LazyLoader:
    """Makes every missing page resident: demands at once, the rest in order in the background.

    Demands are served by a task of their own as they come, through ``source``, and the background
    load pauses while they are (it yields to demand). With a ``bulk`` source the background load is
    one pipelined pass in worker threads (``BulkSource.stream``), with no trip through the event loop
    per chunk. What that pass could not deliver goes through ``source`` (whose fallback may be the
    failed host) right away; what is still missing after it, and everything when there is no bulk
    source, is loaded in chunks through ``source`` by LANES lanes, again every RETRY_SECONDS until in.
    """

    def __init__(self, residency: Residency, source: PageSource, *, bulk: BulkSource | None = None,
                 rate_bytes: float = 0.0, on_progress: Callable[[int, int], None] | None = None,
                 share_every: float = BULK_SHARE_EVERY) -> None:
        self.residency, self.source, self.bulk = residency, source, bulk
        self.share_every = share_every
        self.rate_bytes = rate_bytes                # background load limit, bytes/s (0: none); demands are not
        self.on_progress = on_progress              # (resident pages, total pages), after each chunk
        self.loaded_pages = 0
        self.started = time.monotonic()
        self.seconds: float | None = None          # the background load's duration, once complete
        self._logged: set[tuple[int, int]] = set()  # pages whose failure was logged: one line each
        # 1 = the bulk pass (a chunk it took) or a lane is loading the page: nothing else loads it too, or
        # its late baseline write could land after the first marked the page resident and a request wrote it.
        self.inflight = {rid: bytearray(len(m)) for rid, m in residency.maps.items()}
        self._go = threading.Event()                # cleared while demands are served: the bulk pass waits
        self._go.set()
        self._stop = threading.Event()              # the bulk pass ends (the load was cancelled)
        self._last_demand = 0.0                     # when the last demand was served (monotonic)
        self._order: _BulkOrder | None = None       # the bulk pass's, while it runs
        self._refetch: deque[tuple[int, int, int]] = deque()    # pages the bulk pass failed: through source

    def _claim(self, region_id: int, first: int, n: int) -> list[tuple[int, int, int]]:
        """The parts of a missing run no lane is loading, now claimed (a waiter on the rest waits for
        the lane that has them)."""
        m = self.inflight[region_id]
        out: list[tuple[int, int, int]] = []
        for a, b in unset_runs(m, first, first + n):     # marking [a, b) does not move the scan past b
            m[a:b] = b"\x01" * (b - a)
            out.append((region_id, a, b - a))
        return out

    def stats(self) -> dict[str, float | int | None]:
        """What ``rmemfs-ctl stats`` and the JSON report show of the load."""
        res = self.residency
        return {"resident_pages": res.total - res.missing, "total_pages": res.total,
                "missing_pages": res.missing, "to_load_pages": res.to_load,
                "load_pages_per_s": self.rate(), "load_seconds": self.seconds,
                "demand_waits": len(res.wait_seconds), "demand_wait_p50_s": percentile(res.wait_seconds, 0.5),
                "demand_wait_p99_s": percentile(res.wait_seconds, 0.99)}

    def rate(self) -> float:
        """Pages per second so far."""
        return self.loaded_pages / max(1e-9, (self.seconds or time.monotonic() - self.started))

    def _landed(self, region_id: int, first: int, n: int, bad: set[int]) -> None:
        """Pages first..first+n-1 are in, but for the pages in ``bad``."""
        page = first
        for stop in sorted(p for p in bad if first <= p < first + n) + [first + n]:
            if stop > page:
                self.residency.mark(region_id, page, stop - page)
                self.loaded_pages += stop - page
            page = stop + 1

    def _progress(self) -> None:
        if self.on_progress is not None:
            res = self.residency
            self.on_progress(res.total - res.missing, res.total)

    async def _load(self, runs: list[tuple[int, int, int]], demand: bool) -> None:
        res = self.residency
        runs = [m for r in runs for m in res.missing_runs(*r) for m in self._claim(*m)]
        if not runs:
            return
        try:
            failures = await self.source.make_resident(runs)
        finally:
            for region_id, first, n in runs:
                self.inflight[region_id][first:first + n] = bytes(n)
        bad: dict[int, set[int]] = {}
        for f in failures:
            bad.setdefault(f.region_id, set()).add(f.page)
        for region_id, first, n in runs:
            self._landed(region_id, first, n, bad.get(region_id, set()))
        for f in failures:
            res.fail(f)
            if (f.region_id, f.page) in self._logged:
                continue
            self._logged.add((f.region_id, f.page))
            log.error("lazy load: region %d page %d unreadable from %s (%s)%s", f.region_id, f.page, f.where,
                      f.why, ": the request gets EIO" if demand else ": retried later")

    def _sequential(self, demands: list[tuple[int, int, int]]) -> bool:
        """Whether a burst of demands reads on from where reading was (a reader following the load's front,
        or reading a file from its start) rather than at random: each starts after a page that is resident,
        in flight (the kernel's read-ahead sends the next requests before the last is answered), or the
        end of another demand of the burst."""
        res = self.residency
        ends = {(rid, first + n) for rid, first, n in demands}

        def follows(rid: int, first: int) -> bool:
            if first == 0 or (rid, first) in ends or res.is_resident(rid, first - 1, 1):
                return True
            m = self.inflight.get(rid)
            return m is not None and first - 1 < len(m) and m[first - 1] == 1

        return all(follows(rid, first) for rid, first, _ in demands)

    async def _serve_demands(self) -> None:
        """Serve demands (and the bulk pass's failures) as they come.

        Random demands pause the bulk pass (see DEMAND_QUIET). A sequential burst does not: the pass jumps
        to it instead, so it loads just ahead of the reader, and the reader waits for its chunks in flight
        rather than reading them a second time."""
        res = self.residency
        while True:
            if not res.demands and not self._refetch:
                res.demanded = trio.Event()
                if not res.demands and not self._refetch:       # no await since the check: none is missed
                    await res.demanded.wait()
                continue
            demands = list(res.demands)
            res.demands.clear()
            if demands and self._order is not None and self._sequential(demands):
                rid, first, _ = max(demands)
                self._order.jump(rid, first)
                await self._load(demands, demand=True)
                self._progress()
                continue
            self._go.clear()
            try:
                while demands or res.demands or self._refetch:
                    if demands or res.demands:
                        demands += res.demands
                        res.demands.clear()
                        await self._load(demands, demand=True)
                        demands = []
                    else:
                        again = list(self._refetch)
                        self._refetch.clear()
                        await self._load(again, demand=False)
                    self._progress()
            finally:
                self._last_demand = time.monotonic()
                self._go.set()

    def _ahead_of_rate(self, loaded_bytes: int) -> float:
        """Seconds the load is ahead of ``load_rate`` after ``loaded_bytes`` (0 or less: not ahead)."""
        if not self.rate_bytes:
            return 0.0
        return loaded_bytes / self.rate_bytes - (time.monotonic() - self.started)

    async def _lane(self, pending: deque[tuple[int, int, int]]) -> None:
        while pending:
            await self._load([pending.popleft()], demand=False)
            ahead = self._ahead_of_rate(self.loaded_pages * PAGE_SIZE)
            if ahead > 0:
                await trio.sleep(ahead)
            self._progress()
            await trio.lowlevel.checkpoint()          # let the waiters run before the next chunk

    async def _bulk_pass(self, bulk: BulkSource) -> None:
        res = self.residency
        token = trio.lowlevel.current_trio_token()
        size = BULK_CHUNK_PAGES if not self.rate_bytes else _rate_chunk(self.rate_bytes, BULK_CHUNK_PAGES)
        order = self._order = _BulkOrder([c for rid in sorted(res.maps)
                                          for c in _chunks(res.missing_runs(rid, 0, len(res.maps[rid])), size)],
                                         BULK_LANES)
        passed = 0                                    # bytes taken, for the rate limit

        def chunks() -> Iterator[tuple[int, int, int]]:     # the stream's thread, after the gate
            nonlocal passed
            while (chunk := order.take()) is not None:
                rid, first, n = chunk
                if res.maps[rid].find(0, first, first + n) < 0:
                    continue                          # brought in by demands meanwhile
                self.inflight[rid][first:first + n] = b"\x01" * n     # a demand for these waits for the pass
                passed += n * PAGE_SIZE
                yield chunk

        def gate(wait: bool) -> bool:                 # the stream's thread, before each chunk
            held_since: float | None = None
            while not self._stop.is_set():
                now = time.monotonic()
                quiet_in = self._last_demand + DEMAND_QUIET - now
                if not self._go.is_set() or quiet_in > 0:           # demands: wait, but not past our share
                    held_since = now if held_since is None else held_since
                    share_in = held_since + self.share_every - now
                    if share_in > 0:
                        if not wait:
                            return False
                        if self._go.is_set():
                            self._stop.wait(min(quiet_in, share_in))
                        else:
                            self._go.wait(share_in)
                        continue
                ahead = self._ahead_of_rate(passed)
                if ahead > 0:
                    if not wait:
                        return False
                    self._stop.wait(min(ahead, 0.05))
                    continue
                return True
            return False

        def landed(chunk: tuple[int, int, int], failed: list[PageFailure]) -> None:    # the event loop
            rid, first, n = chunk
            self.inflight[rid][first:first + n] = bytes(n)
            self._landed(*chunk, {f.page for f in failed})
            if failed:
                self._refetch.extend((f.region_id, f.page, 1) for f in failed)
                res.demanded.set()
            self._progress()

        arrived: deque[tuple[tuple[int, int, int], list[PageFailure]]] = deque()
        posted = threading.Lock()            # held from posting a drain until it ran: one wake-up at a time

        def drain() -> None:                  # the event loop
            posted.release()
            while arrived:
                landed(*arrived.popleft())

        def done(chunk: tuple[int, int, int], failed: list[PageFailure]) -> None:      # the stream's thread
            arrived.append((chunk, failed))
            if posted.acquire(blocking=False):    # else a drain is on its way and takes this one too
                try:
                    token.run_sync_soon(drain)
                except trio.RunFinishedError:
                    posted.release()

        async def stop_when_cancelled() -> None:
            try:
                await trio.sleep_forever()
            finally:
                self._stop.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(stop_when_cancelled)
            try:
                await trio.to_thread.run_sync(partial(bulk.stream, chunks(), size, gate, done, lanes=BULK_LANES))
            except Exception as e:        # a store failing as a whole: the lanes go on with what is missing
                log.error("lazy load: the bulk pass failed (%r); loading the rest page by page", e)
                for rid, m in self.inflight.items():  # what it took but did not land: requests may wait for it
                    self._refetch.extend(r for a, b in set_runs(m, 0, len(m)) for r in res.missing_runs(rid, a, b - a))
                    m[:] = bytes(len(m))
                res.demanded.set()
            finally:
                self._order = None
            nursery.cancel_scope.cancel()

    async def run(self) -> None:
        """Load until every page is resident."""
        res = self.residency
        self.started = time.monotonic()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._serve_demands)
            if self.bulk is not None and not res.complete:
                await self._bulk_pass(self.bulk)
            while not res.complete:
                size = CHUNK_PAGES if not self.rate_bytes else _rate_chunk(self.rate_bytes, CHUNK_PAGES)
                pending = deque(c for rid in sorted(res.maps)
                                for c in _chunks(res.missing_runs(rid, 0, len(res.maps[rid])), size))
                async with trio.open_nursery() as lanes:
                    for _ in range(LANES):
                        lanes.start_soon(self._lane, pending)
                with trio.move_on_after(RETRY_SECONDS):      # pages failed: retry after a pause
                    while not res.complete:
                        await res.changed()
            nursery.cancel_scope.cancel()
        self.seconds = time.monotonic() - self.started
        log.info("lazy load complete: %d pages in %.2f s (%.0f pages/s)", self.loaded_pages, self.seconds,
                 self.rate())


class _BulkOrder:
    """The bulk pass's chunks, taken one at a time from a cursor. Within a region they are in page order;
    regions of different lanes (id modulo ``lanes``) take turns, so that their files are written at once.
    A sequential reader moves the cursor to where it reads (``jump``), so that the pass loads just ahead
    of it; the chunks a jump skipped are taken once the end is reached."""

    def __init__(self, chunks: list[tuple[int, int, int]], lanes: int) -> None:
        queues: list[deque[tuple[int, int, int]]] = [deque() for _ in range(lanes)]
        for chunk in sorted(chunks):
            queues[chunk[0] % lanes].append(chunk)
        self.chunks: list[tuple[int, int, int]] = []
        while any(queues):
            for q in queues:
                if q:
                    self.chunks.append(q.popleft())
        per_region: dict[int, list[tuple[int, int]]] = {}
        for i, (rid, first, _) in enumerate(self.chunks):
            per_region.setdefault(rid, []).append((first, i))
        self._firsts = {rid: [f for f, _ in v] for rid, v in per_region.items()}    # sorted: queues kept order
        self._index = {rid: [i for _, i in v] for rid, v in per_region.items()}
        self.taken = bytearray(len(self.chunks))
        self.cursor = 0
        self.lock = threading.Lock()                 # take: the stream's thread; jump: the event loop

    def take(self) -> tuple[int, int, int] | None:
        with self.lock:
            i = self.taken.find(0, self.cursor)
            if i < 0:
                i = self.taken.find(0)
                if i < 0:
                    return None
            self.taken[i] = 1
            self.cursor = i + 1
            return self.chunks[i]

    def jump(self, region_id: int, page: int) -> None:
        """Take next the chunk holding ``page`` (or the first one after it not taken yet)."""
        firsts = self._firsts.get(region_id)
        if not firsts:
            return
        k = max(0, bisect.bisect_right(firsts, page) - 1)
        with self.lock:
            self.cursor = self._index[region_id][k]


def _rate_chunk(rate_bytes: float, most: int) -> int:
    """Pages per chunk under a rate limit: about 50 ms of it, so that the load is smooth at any rate."""
    return max(1, min(most, int(rate_bytes / 20 / PAGE_SIZE)))


def _chunks(runs: list[tuple[int, int, int]], size: int = CHUNK_PAGES) -> list[tuple[int, int, int]]:
    return [(rid, p, min(size, first + n - p)) for rid, first, n in runs for p in range(first, first + n, size)]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
