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
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import trio

from .. import PAGE_SIZE
from ..errors import CorruptionError
from ..loader import CopyRun, LoadPlan, RegionWriter, _page_digests
from ..store.base import BaselineStore, SegmentReader
from ..pagemap import Run
from .base import PageFailure

log = logging.getLogger(__name__)


READ_AHEAD = 2           # chunks queued for the read thread in ``stream``: it never waits for the next

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

        Three stages overlap: a reader thread reads the next chunk while this thread checks the XXH3 of every
        page of the last one, and ``lanes`` writer threads (one per region id modulo ``lanes``) write the good
        ones. ``gate(wait)`` is asked before each chunk is taken:
        with ``wait`` it may block (a lazy load pauses for demands, or keeps to its rate), and it is only
        asked so when every chunk taken is in; False stops the stream (or, without ``wait``, says not yet).
        ``done(chunk, failures)`` follows each chunk: all of it is in but the failed pages (read errors,
        checksum mismatches), which are not written, so no bad copy lands where a request may read."""
        free = [memoryview(mmap.mmap(-1, chunk_pages * PAGE_SIZE)) for _ in range(READ_AHEAD + lanes + 1)]
        readers: dict[int, SegmentReader] = {}          # the read thread's own: its own read-ahead

        def read(chunk: Run, buf: memoryview) -> tuple[list[_Piece], list[PageFailure]]:
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

        Read = tuple[Run, memoryview, Future[tuple[list[_Piece], list[PageFailure]]]]
        Written = tuple[Run, memoryview, list[PageFailure], Future[None]]
        pool = ThreadPoolExecutor(1, thread_name_prefix="lazy-read")
        # One writer per lane of region files: a write holds its file's inode lock, so writes into two
        # files go on at once (the chunks come interleaved by lane, as the eager load's spans do).
        writers = [ThreadPoolExecutor(1, thread_name_prefix=f"lazy-write-{i}") for i in range(lanes)]
        pending: deque[Written] = deque()

        def start(wait: bool) -> Read | None:
            chunk = next(chunks, None) if free and gate(wait) else None
            if chunk is None:
                return None
            buf = free.pop()
            return chunk, buf, pool.submit(read, chunk, buf)

        def write(pieces: list[tuple[int, int, memoryview]]) -> None:
            for region_id, offset, data in pieces:
                self.write(region_id, offset, data)

        def retire() -> None:
            chunk, buf, failed, fut = pending.popleft()
            fut.result()
            with self._lock:
                self.bytes_read += chunk[2] * PAGE_SIZE
            done(chunk, failed)
            free.append(buf)

        reads: deque[Read] = deque()

        def read_ahead() -> None:           # never waits: the reader thread always has the next read queued
            while len(reads) < READ_AHEAD and (ahead := start(False)) is not None:
                reads.append(ahead)

        try:
            if (first := start(True)) is not None:
                reads.append(first)
            while reads or pending:
                if not reads:               # held (demands) or out of buffers: land what is written first,
                    retire()                # and block in the gate only once all of it is in
                    if (r := start(not pending)) is not None:
                        reads.append(r)
                    continue
                chunk, buf, fut = reads.popleft()
                pieces, failed = fut.result()
                read_ahead()
                good: list[tuple[int, int, memoryview]] = []
                for run, a, m, at in pieces:
                    failed.extend(self._check(run, a, m, buf[at:at + m * PAGE_SIZE], good))
                pending.append((chunk, buf, failed, writers[chunk[0] % lanes].submit(write, good)))
                while pending and (pending[0][3].done() or not free):
                    retire()
                read_ahead()
                if not reads and not pending and (r := start(True)) is not None:
                    reads.append(r)         # nothing in flight: wait in the gate (else the loop would end)
        finally:
            pool.shutdown(cancel_futures=True)          # waits for a read in progress: then close its readers
            for w in writers:
                w.shutdown()
            for reader in readers.values():
                reader.close()

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
