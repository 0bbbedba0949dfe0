"""A page source reading a published generation's pages from the store, by page, with checksums.

The load plan's copy runs are indexed per region (sorted by first page), so a request for a few
pages finds its runs by bisection instead of re-planning. Pages no run holds are zero in the
baseline, which a fresh region already is.

``make_resident`` serves a few runs at a time (a lazy load's demands). ``stream`` is the bulk
path of a lazy load: the whole remaining baseline in order, pipelined like the eager load (a
reader thread reads ahead, the calling thread checks the XXH3 of every page, a writer thread
writes), with no trip through the event loop per chunk.
"""
from __future__ import annotations

import bisect
import logging
import mmap
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import trio
import xxhash

from .. import PAGE_SIZE
from ..errors import CorruptionError
from ..loader import CopyRun, LoadPlan, RegionWriter, _page_digests
from ..store.base import BaselineStore, SegmentReader
from .base import PageFailure

log = logging.getLogger(__name__)

STREAM_BUFFERS = 4      # chunks in flight in ``stream``: read ahead, checked, written; a demand waits behind these

# A piece of a chunk: the copy run holding it, its first page, its page count and where it sits in the buffer.
_Piece = tuple[CopyRun, int, int, int]


class BaselineSource:
    def __init__(self, store: BaselineStore, plan: LoadPlan, write: RegionWriter) -> None:
        self.store, self.plan, self.write = store, plan, write
        self._runs: dict[int, list[CopyRun]] = {}
        for run in plan.runs:
            self._runs.setdefault(run.region_id, []).append(run)
        self._firsts: dict[int, list[int]] = {}
        for rid, runs in self._runs.items():
            runs.sort(key=lambda r: r.first_page)
            self._firsts[rid] = [r.first_page for r in runs]
        self._local = threading.local()              # readers per worker thread: calls may overlap
        self._all: list[SegmentReader] = []
        self._lock = threading.Lock()
        self.bytes_read = 0

    def _pieces(self, region_id: int, first: int, n: int) -> list[tuple[CopyRun, int, int]]:
        """(run, first page, count) of each copy run's part inside [first, first + n)."""
        runs, firsts = self._runs.get(region_id, []), self._firsts.get(region_id, [])
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

    def _copy(self, runs: list[tuple[int, int, int]]) -> list[PageFailure]:
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
                want = self.plan.digests[run.segment]
                entry = run.entry + a - run.first_page
                bad = [k for k in range(m)
                       if xxhash.xxh3_64_intdigest(buf[k * PAGE_SIZE:(k + 1) * PAGE_SIZE]) != want[entry + k]]
                good_from = 0
                for k in bad + [m]:          # write the good stretches between bad pages
                    if k > good_from:
                        self.write(region_id, (a + good_from) * PAGE_SIZE, buf[good_from * PAGE_SIZE:k * PAGE_SIZE])
                    good_from = k + 1
                failed.extend(PageFailure(region_id, a + k, name, "checksum mismatch") for k in bad)
                with self._lock:
                    self.bytes_read += m * PAGE_SIZE
        return failed

    async def make_resident(self, runs: list[tuple[int, int, int]]) -> list[PageFailure]:
        return await trio.to_thread.run_sync(self._copy, runs)

    def stream(self, chunks: list[tuple[int, int, int]], gate: Callable[[int], bool],
               done: Callable[[tuple[int, int, int], list[PageFailure]], None]) -> None:
        """Make every chunk (region id, first page, count) resident, in order; blocks (a worker thread).

        ``gate(nbytes)`` is called before each chunk is read and may block (a lazy load pauses for
        demands, or keeps to its rate); False stops the stream once the chunks in flight are in.
        ``done(chunk, failures)`` is called after each chunk is written: every page of it but the
        failed ones (read errors, checksum mismatches: not written) is in the regions. Nothing is raised
        for a page; a failure of the store as a whole fails its chunks' pages."""
        size = max((n for _, _, n in chunks), default=0) * PAGE_SIZE
        if not size:
            return
        free = [memoryview(mmap.mmap(-1, size)) for _ in range(STREAM_BUFFERS)]
        readers: dict[int, SegmentReader] = {}          # the read thread's own: its own read-ahead
        todo = iter(chunks)

        def read(chunk: tuple[int, int, int], buf: memoryview) -> tuple[list[_Piece], list[PageFailure]]:
            pieces: list[_Piece] = []
            failed: list[PageFailure] = []
            at = 0
            for run, a, m in self._pieces(*chunk):
                try:
                    reader = readers.get(run.segment)
                    if reader is None:
                        # Not ``sequential``: its deeper read-ahead queues megabytes on the disk ahead of a demand's
                        # read (measured here: p99 of a 4 KiB read beside 1 MiB reads 6 ms by default, 84 ms).
                        reader = readers[run.segment] = self.store.open_segment(self.plan.segments[run.segment].name)
                    reader.readinto(run.data_offset + (a - run.first_page) * PAGE_SIZE, buf[at:at + m * PAGE_SIZE])
                except (CorruptionError, OSError) as e:
                    failed.extend(PageFailure(run.region_id, a + k, self.plan.segments[run.segment].name, str(e))
                                  for k in range(m))
                    continue
                pieces.append((run, a, m, at))
                at += m * PAGE_SIZE
            return pieces, failed

        def write(pieces: list[tuple[int, int, memoryview]]) -> None:
            for region_id, offset, data in pieces:
                self.write(region_id, offset, data)

        in_flight: deque[tuple[tuple[int, int, int], memoryview, Future[tuple[list[_Piece], list[PageFailure]]]]] = deque()
        writes: deque[tuple[tuple[int, int, int], memoryview, list[PageFailure], Future[None]]] = deque()

        def submit_read() -> None:
            chunk = next(todo, None)
            if chunk is not None and gate(chunk[2] * PAGE_SIZE):
                buf = free.pop()
                in_flight.append((chunk, buf, reader_pool.submit(read, chunk, buf)))

        def retire_write() -> None:
            chunk, buf, failed, fut = writes.popleft()
            fut.result()
            with self._lock:
                self.bytes_read += chunk[2] * PAGE_SIZE
            done(chunk, failed)
            free.append(buf)

        reader_pool = ThreadPoolExecutor(1, thread_name_prefix="lazy-read")
        writer_pool = ThreadPoolExecutor(1, thread_name_prefix="lazy-write")
        try:
            submit_read()
            while in_flight:
                chunk, buf, fut = in_flight.popleft()
                if free:
                    submit_read()        # the next read overlaps this chunk's check and write
                pieces, failed = fut.result()
                good: list[tuple[int, int, memoryview]] = []
                for run, a, m, at in pieces:
                    # Check before writing: a page whose checksum fails is never written, so no copy of it
                    # lands in a page a request may read once something else delivered it.
                    got = _page_digests(buf, at, m)
                    want = self.plan.digests[run.segment]
                    entry = run.entry + a - run.first_page
                    bad = ([] if memoryview(got) == want[entry:entry + m]
                           else [k for k in range(m) if got[k] != want[entry + k]])
                    start = 0
                    for k in bad + [m]:
                        if k > start:
                            good.append((run.region_id, (a + start) * PAGE_SIZE,
                                         buf[at + start * PAGE_SIZE:at + k * PAGE_SIZE]))
                        start = k + 1
                    failed.extend(PageFailure(run.region_id, a + k, self.plan.segments[run.segment].name,
                                              "checksum mismatch") for k in bad)
                writes.append((chunk, buf, failed, writer_pool.submit(write, good)))
                while writes and (writes[0][3].done() or not free):
                    retire_write()
                if free and not in_flight:
                    submit_read()
            while writes:
                retire_write()
        finally:
            reader_pool.shutdown(cancel_futures=True)       # waits for a read in progress: then close its readers
            writer_pool.shutdown()
            for r in readers.values():
                r.close()

    def copy_now(self, runs: list[tuple[int, int, int]]) -> list[PageFailure]:
        """``make_resident`` in the calling thread (before the mount, when nothing else runs)."""
        return self._copy(runs)

    def close(self) -> None:
        with self._lock:
            for reader in self._all:
                reader.close()
            self._all.clear()
        self._local = threading.local()
