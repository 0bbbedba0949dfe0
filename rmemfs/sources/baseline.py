"""The baseline page source: a published generation's pages, read from the store by the load plan's
copy runs and checked against their XXH3 before they are written into the regions.

Three ways in, one copy pipeline (``_pipeline``: reads on threads of their own, the checks on the
calling thread, one writer per lane of region files, all three overlapping):

* ``load``: an eager load, the whole plan in its spans (reads through small gaps, several at once
  where the store wants it), before anything is served;
* ``stream``: a lazy load's bulk pass, chunks in the order the loader gives them, paused by its gate
  for demands, with no trip through the event loop per chunk;
* ``make_resident``: a few runs at a time (a lazy load's demands), found by bisection in the runs
  indexed per region (sorted by first page) instead of re-planning.

Pages no run holds are zero in the baseline, which a fresh region already is. A page whose checksum
fails is reported for the caller to fetch elsewhere; once requests are served (a lazy load) it is
never written, so no bad copy lands where one may read.
"""
from __future__ import annotations

import bisect
import functools
import logging
import mmap
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import trio

from .. import PAGE_SIZE
from ..errors import CorruptionError
from ..loader import LOAD_LANES, CopyRun, LoadPlan, LoadResult, RegionWriter, Span, _page_digests, plan_load
from ..store.base import BaselineStore, SegmentReader
from ..store.format import Manifest
from ..pagemap import Run
from .base import PageFailure

log = logging.getLogger(__name__)


READ_AHEAD = 2           # chunks queued for the read thread in ``stream``: it never waits for the next
LOAD_READ_AHEAD = 5      # spans queued for each ``load`` read thread, beyond the first

# A piece of a unit's buffer: the copy run holding it, its first page, its page count and where it sits.
_Piece = tuple[CopyRun, int, int, int]
_Unit = TypeVar("_Unit")        # what one read of the pipeline fills a buffer with: a chunk or a span
_UnitRead = tuple[list[_Piece], list[PageFailure]]     # a read's pieces, and the pages it could not read


class _Readers:
    """Segment readers opened on first use and closed together, one per (lane, segment): each lane reads
    its segments sequentially on descriptors of its own (their read-ahead is theirs)."""

    def __init__(self, store: BaselineStore, plan: LoadPlan, *, sequential: bool) -> None:
        self.store, self.plan, self.sequential = store, plan, sequential
        self._open: dict[tuple[int, int], SegmentReader] = {}
        self._lock = threading.Lock()

    def get(self, lane: int, segment: int) -> SegmentReader:
        with self._lock:
            reader = self._open.get((lane, segment))
            if reader is None:
                name = self.plan.segments[segment].name
                reader = self._open[lane, segment] = self.store.open_segment(name, sequential=self.sequential)
            return reader

    def close(self) -> None:
        with self._lock:
            for reader in self._open.values():
                reader.close()
            self._open.clear()


class BaselineSource:
    def __init__(self, store: BaselineStore, plan: LoadPlan, write: RegionWriter) -> None:
        self.store, self.plan, self.write = store, plan, write
        self._local = threading.local()              # readers per worker thread: calls may overlap
        self._all: list[SegmentReader] = []
        self._lock = threading.Lock()
        self.bytes_read = 0

    @functools.cached_property
    def _by_region(self) -> dict[int, tuple[list[CopyRun], list[int]]]:
        """Per region: its copy runs sorted by first page, and their first pages (built on first use: an
        eager load needs none)."""
        runs: dict[int, list[CopyRun]] = {}
        for run in self.plan.runs:
            runs.setdefault(run.region_id, []).append(run)
        out = {}
        for rid, of_region in runs.items():
            of_region.sort(key=lambda r: r.first_page)
            out[rid] = (of_region, [r.first_page for r in of_region])
        return out

    def _pieces(self, region_id: int, first: int, n: int) -> list[tuple[CopyRun, int, int]]:
        """(run, first page, count) of each copy run's part inside [first, first + n)."""
        runs, firsts = self._by_region.get(region_id, ([], []))
        i = max(0, bisect.bisect_right(firsts, first) - 1)
        out = []
        while i < len(runs) and runs[i].first_page < first + n:
            run = runs[i]
            a, b = max(first, run.first_page), min(first + n, run.first_page + run.npages)
            if a < b:
                out.append((run, a, b - a))
            i += 1
        return out

    def _reader(self, segment: int) -> SegmentReader:
        readers: dict[int, SegmentReader] | None = getattr(self._local, "readers", None)
        if readers is None:
            readers = self._local.readers = {}
        reader = readers.get(segment)
        if reader is None:
            reader = readers[segment] = self.store.open_segment(self.plan.segments[segment].name)
            with self._lock:
                self._all.append(reader)
        return reader

    def _copy(self, runs: list[Run]) -> list[PageFailure]:
        failed: list[PageFailure] = []
        for region_id, first, n in runs:
            for run, a, m in self._pieces(region_id, first, n):
                name = self.plan.segments[run.segment].name
                buf = memoryview(bytearray(m * PAGE_SIZE))
                try:
                    self._reader(run.segment).readinto(run.data_offset + (a - run.first_page) * PAGE_SIZE, buf)
                except (CorruptionError, OSError) as e:
                    failed.extend(PageFailure(region_id, a + k, name, str(e)) for k in range(m))
                    continue
                good: list[tuple[int, int, memoryview]] = []
                failed.extend(self._check(run, a, m, buf, good))
                for rid, offset, data in good:
                    self.write(rid, offset, data)
                with self._lock:
                    self.bytes_read += m * PAGE_SIZE
        return failed

    async def make_resident(self, runs: list[Run]) -> list[PageFailure]:
        return await trio.to_thread.run_sync(self._copy, runs)

    def stream(self, chunks: Iterator[Run], chunk_pages: int, gate: Callable[[bool], bool],
               done: Callable[[Run, list[PageFailure]], None], lanes: int = 1) -> None:
        """Make every chunk (region id, first page, count of at most ``chunk_pages``) resident, in the order
        ``chunks`` yields them (taken one by one, so the order may change as it goes); blocks (a worker thread).

        ``gate(wait)`` is asked before each chunk is taken: with ``wait`` it may block (a lazy load pauses
        for demands, or keeps to its rate), and it is only asked so when every chunk taken is in; False
        stops the stream (or, without ``wait``, says not yet). ``done(chunk, failures)`` follows each chunk:
        all of it is in but the failed pages (read errors, checksum mismatches), which are not written, so
        no bad copy lands where a request may read. Chunks of region ids equal modulo ``lanes`` are written
        by one thread (a write holds its file's inode lock: two files are written at once)."""
        # Not ``sequential``: its deeper read-ahead queues megabytes on the disk ahead of a demand's read
        # (measured here: p99 of a 4 KiB read beside 1 MiB reads 6 ms by default, 84 ms).
        readers = _Readers(self.store, self.plan, sequential=False)

        def read(chunk: Run, buf: memoryview) -> _UnitRead:
            pieces: list[_Piece] = []
            failed: list[PageFailure] = []
            at = 0
            for run, a, m in self._pieces(*chunk):
                try:
                    reader = readers.get(0, run.segment)
                    offset = run.data_offset + (a - run.first_page) * PAGE_SIZE
                    reader.readinto(offset, buf[at:at + m * PAGE_SIZE])
                    # Copied once into the regions: a cached copy would only add to the memory the load needs.
                    reader.done_with(offset, m * PAGE_SIZE)
                except (CorruptionError, OSError) as e:
                    failed.extend(PageFailure(run.region_id, a + k, self.plan.segments[run.segment].name, str(e))
                                  for k in range(m))
                    continue
                pieces.append((run, a, m, at))
                at += m * PAGE_SIZE
            return pieces, failed

        def landed(chunk: Run, failed: list[PageFailure]) -> None:
            with self._lock:
                self.bytes_read += chunk[2] * PAGE_SIZE
            done(chunk, failed)

        try:
            self._pipeline(chunks, read, lambda chunk: chunk[0] % lanes, lanes=lanes, read_threads=1,
                           read_ahead=READ_AHEAD, buffer_bytes=chunk_pages * PAGE_SIZE, gate=gate, done=landed,
                           check_first=True)
        finally:
            readers.close()

    def load(self, progress: Callable[[int, int], None] | None = None,
             spans_done: Callable[[int], None] | None = None) -> LoadResult:
        """Make the whole plan resident, span by span in plan order (an eager load); blocks (a worker thread).

        The plan's spans are read through their small gaps, ``store.load_reads_in_flight`` at once, each
        lane's on descriptors of its own (sequential: their read-ahead is theirs). A read error raises
        (the store is unusable); a page whose checksum fails is written as read (nothing is served yet)
        and returned in ``corrupt``, for the caller to fetch over it from elsewhere. ``spans_done(n)``:
        the first ``n`` spans are in the regions."""
        result = LoadResult(self.plan.live)
        spans = self.plan.spans
        if not spans:
            return result
        in_flight = max(1, self.store.load_reads_in_flight)
        readers = _Readers(self.store, self.plan, sequential=True)
        copied = 0

        def read(span: Span, buf: memoryview) -> _UnitRead:
            readers.get(span.lane, span.segment).readinto(span.start, buf[:span.end - span.start])
            return [(run, run.first_page, run.npages, run.data_offset - span.start) for run in span.runs], []

        def landed(span: Span, failed: list[PageFailure]) -> None:
            nonlocal copied
            copied += 1
            result.corrupt.extend((f.region_id, f.page, f.where) for f in failed)
            npages = sum(run.npages for run in span.runs)
            result.bytes += npages * PAGE_SIZE
            if spans_done:
                spans_done(copied)
            if progress:
                progress(npages * PAGE_SIZE, npages)

        try:
            self._pipeline(iter(spans), read, lambda span: span.lane, lanes=LOAD_LANES, read_threads=in_flight,
                           read_ahead=LOAD_READ_AHEAD + in_flight - 1,
                           buffer_bytes=max(span.end - span.start for span in spans),
                           gate=lambda wait: True, done=landed, check_first=False)
        finally:
            readers.close()
        return result

    def _pipeline(self, units: Iterator[_Unit], read: Callable[[_Unit, memoryview], _UnitRead],
                  lane_of: Callable[[_Unit], int], *, lanes: int, read_threads: int, read_ahead: int,
                  buffer_bytes: int, gate: Callable[[bool], bool],
                  done: Callable[[_Unit, list[PageFailure]], None], check_first: bool) -> None:
        """The one copy pipeline of both loads: three stages overlap, each on threads of its own.

        ``read(unit, buf)`` (``read_threads`` at once, up to ``read_ahead`` units ahead) fills a buffer and
        says which copy-run pieces it holds; this thread checks the XXH3 of every page; one writer per lane
        writes the pages. With ``check_first`` only the good ones, once checked (requests are served: no bad
        copy may land); without, the reader queues the write as soon as its read is in, and the check runs
        beside it (nothing is served yet; 5-7 % faster, in interleaved pairs here). Units are checked, and
        ``done``, in the order they were taken, whichever read ends first. ``gate`` is as in ``stream``."""
        free = [memoryview(mmap.mmap(-1, buffer_bytes)) for _ in range(read_ahead + lanes + 1)]
        pool = ThreadPoolExecutor(read_threads, thread_name_prefix="baseline-read")
        writers = [ThreadPoolExecutor(1, thread_name_prefix=f"baseline-write-{i}") for i in range(lanes)]
        pending: deque[tuple[_Unit, memoryview, list[PageFailure], Future[None]]] = deque()      # being written
        reads: deque[tuple[_Unit, memoryview, Future[tuple[_UnitRead, Future[None] | None]]]] = deque()

        def write(pieces: list[tuple[int, int, memoryview]]) -> None:
            for region_id, offset, data in pieces:
                self.write(region_id, offset, data)

        def read_stage(unit: _Unit, buf: memoryview) -> tuple[_UnitRead, Future[None] | None]:
            got = read(unit, buf)
            if check_first:
                return got, None
            unchecked = [(run.region_id, a * PAGE_SIZE, buf[at:at + m * PAGE_SIZE]) for run, a, m, at in got[0]]
            return got, writers[lane_of(unit) % lanes].submit(write, unchecked)

        def start(wait: bool) -> tuple[_Unit, memoryview, Future[tuple[_UnitRead, Future[None] | None]]] | None:
            unit = next(units, None) if free and gate(wait) else None
            if unit is None:
                return None
            buf = free.pop()
            return unit, buf, pool.submit(read_stage, unit, buf)

        def retire() -> None:
            unit, buf, failed, fut = pending.popleft()
            fut.result()
            done(unit, failed)
            free.append(buf)

        def fill_reads() -> None:           # never waits: the readers always have the next reads queued
            while len(reads) < read_ahead and (ahead := start(False)) is not None:
                reads.append(ahead)

        try:
            if (first := start(True)) is not None:
                reads.append(first)
            fill_reads()
            while reads or pending:
                if not reads:               # held (demands) or out of buffers: land what is written first,
                    retire()                # and block in the gate only once all of it is in
                    if (r := start(not pending)) is not None:
                        reads.append(r)
                    continue
                unit, buf, fut = reads.popleft()
                (pieces, failed), written = fut.result()
                fill_reads()
                good: list[tuple[int, int, memoryview]] = []
                for run, a, m, at in pieces:
                    failed.extend(self._check(run, a, m, buf[at:at + m * PAGE_SIZE], good))
                if written is None:
                    written = writers[lane_of(unit) % lanes].submit(write, good)
                pending.append((unit, buf, failed, written))
                while pending and (pending[0][3].done() or not free):
                    retire()
                fill_reads()
                if not reads and not pending and (r := start(True)) is not None:
                    reads.append(r)         # nothing in flight: wait in the gate (else the loop would end)
        finally:
            for _unit, _buf, fut in reads:
                fut.cancel()
            pool.shutdown(cancel_futures=True)          # waits for a read in progress: then close its readers
            for w in writers:
                w.shutdown()

    def _check(self, run: CopyRun, first: int, n: int, buf: memoryview,
               good: list[tuple[int, int, memoryview]]) -> list[PageFailure]:
        """Pages first..first+n-1 of ``run``, read into ``buf``: the stretches whose XXH3 is right are added
        to ``good`` as (region id, byte offset, data) to write; those whose XXH3 is wrong are returned."""
        got = _page_digests(buf, 0, n)
        entry = run.entry + first - run.first_page
        want = self.plan.digests[run.segment]
        bad = [] if memoryview(got) == want[entry:entry + n] else [k for k in range(n) if got[k] != want[entry + k]]
        start = 0
        for k in bad + [n]:                 # the good stretches between bad pages
            if k > start:
                good.append((run.region_id, (first + start) * PAGE_SIZE, buf[start * PAGE_SIZE:k * PAGE_SIZE]))
            start = k + 1
        name = self.plan.segments[run.segment].name
        return [PageFailure(run.region_id, first + k, name, "checksum mismatch") for k in bad]

    def copy_now(self, runs: list[Run]) -> list[PageFailure]:
        """``make_resident`` in the calling thread (before the mount, when nothing else runs)."""
        return self._copy(runs)

    def close(self) -> None:
        with self._lock:
            for reader in self._all:
                reader.close()
            self._all.clear()
        self._local = threading.local()


def load_baseline(store: BaselineStore, manifest: Manifest, write: RegionWriter,
                  progress: Callable[[int, int], None] | None = None) -> LoadResult:
    """Plan and load the whole published generation (a clean reload, tests)."""
    source = BaselineSource(store, plan_load(store, manifest), write)
    try:
        return source.load(progress)
    finally:
        source.close()
