"""Baseline load: copy the published generation into fresh regions at close to disk speed.

A load is planned from the segment indexes alone, then copied:

* **plan** (``plan_load``): each segment's index, newest segment first, is cut
  into *copy runs*: consecutive pages of one region stored consecutively in
  one segment, so one read and one write each. A page that a newer segment
  holds is dropped from the older ones, and pages the caller fills itself
  (``skip``) are cut out. Runs are found without visiting every entry: keys
  strictly increase and a data page's offset grows by exactly one page per
  data entry, so a stretch of entries is one run exactly when its two ends
  say so, and the longest run from an entry is found by galloping.
* **copy** (``LoadPlan.copy``): worker threads read *spans* of a segment
  (nearby runs, read through the small gaps between them) into reusable
  buffers and write each run into its region (``pwrite`` into the region
  file: both calls release the GIL), while the calling thread checks the
  XXH3 of every page in the buffer as it comes back. A page whose checksum
  fails is left as read and reported, so the caller can fetch it elsewhere.
"""
from __future__ import annotations

import logging
import mmap
import os
import sys
from array import array
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator

import xxhash

from . import PAGE_SIZE
from .baseline import ZERO_PAGE, Backend, LiveMap, Manifest, SegmentInfo, split_key
from .errors import CorruptionError
from .regions import RegionSet

log = logging.getLogger(__name__)

SPAN_BYTES = 8 << 20            # one worker read; also the longest copy run
SPAN_GAP_BYTES = 256 << 10      # read through a gap this small rather than issue another read
MAX_RUN_PAGES = SPAN_BYTES // PAGE_SIZE
LOAD_WORKERS = 2

# write(region id, byte offset, data) -> bytes written; called from worker threads.
RegionWriter = Callable[[int, int, memoryview], int]


@dataclass(frozen=True)
class CopyRun:
    """``npages`` pages of one region, stored consecutively in one segment."""
    segment: int          # index into LoadPlan.segments
    region_id: int
    first_page: int
    npages: int
    data_offset: int      # byte offset of the first page in the segment
    entry: int            # index entry of the first page (its digest)


@dataclass(frozen=True)
class Span:
    """One read: a stretch of a segment holding one or more copy runs."""
    segment: int
    start: int
    end: int
    runs: tuple[CopyRun, ...]


@dataclass
class LoadResult:
    live: LiveMap
    corrupt: list[tuple[int, int, str]] = field(default_factory=list)   # (region id, page, segment name)
    bytes: int = 0


@dataclass
class LoadPlan:
    segments: list[SegmentInfo]
    digests: list[memoryview]             # per segment: the index's digest column, as 'Q'
    runs: list[CopyRun]
    live: LiveMap                          # the whole published generation, skipped pages included
    covered: dict[int, bytearray]          # region id -> 1 for each page a copy run writes
    bytes: int = 0

    def spans(self) -> Iterator[Span]:
        """Runs grouped into reads of at most SPAN_BYTES, in segment order."""
        group: list[CopyRun] = []
        for run in self.runs:
            if group:
                first, last = group[0], group[-1]
                end = run.data_offset + run.npages * PAGE_SIZE
                if (run.segment == first.segment and end - first.data_offset <= SPAN_BYTES
                        and run.data_offset - (last.data_offset + last.npages * PAGE_SIZE) <= SPAN_GAP_BYTES):
                    group.append(run)
                    continue
                yield _span(group)
            group = [run]
        if group:
            yield _span(group)

    def split_covered(self, runs: list[tuple[int, int, int]]) -> tuple[list[tuple[int, int, int]],
                                                                      list[tuple[int, int, int]]]:
        """Split (region id, first page, count) runs into the parts no copy run writes, and the rest."""
        free: list[tuple[int, int, int]] = []
        written: list[tuple[int, int, int]] = []
        for region_id, first, n in runs:
            done = first
            for a, b in _clear_ranges(self.covered.get(region_id, b""), first, first + n):
                if a > done:
                    written.append((region_id, done, a - done))
                free.append((region_id, a, b - a))
                done = b
            if done < first + n:
                written.append((region_id, done, first + n - done))
        return free, written

    def copy(self, backend: Backend, write: RegionWriter, progress: Callable[[int, int], None] | None = None,
             workers: int = LOAD_WORKERS) -> LoadResult:
        """Copy every planned run into the regions through ``write``, checking each page's XXH3."""
        result = LoadResult(self.live)
        fds: list[int] = []
        try:
            for info in self.segments:
                fd = os.open(backend.segment_path(info.name), os.O_RDONLY)
                fds.append(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            self._copy(backend, fds, write, progress, max(1, workers), result)
        except FileNotFoundError as e:
            raise CorruptionError(f"baseline segment {e.filename} is missing") from None
        finally:
            for fd in fds:
                os.close(fd)
        return result

    def _copy(self, backend: Backend, fds: list[int], write: RegionWriter,
              progress: Callable[[int, int], None] | None, workers: int, result: LoadResult) -> None:
        free_buffers = [memoryview(mmap.mmap(-1, SPAN_BYTES)) for _ in range(workers + 1)]

        def read_and_write(span: Span, buf: memoryview) -> None:
            want = span.end - span.start
            got = 0
            while got < want:
                n = os.preadv(fds[span.segment], [buf[got:want]], span.start + got)
                if n == 0:
                    raise CorruptionError(f"{backend.segment_path(self.segments[span.segment].name)}: "
                                          f"short read at offset {span.start + got}")
                got += n
            for run in span.runs:
                at = run.data_offset - span.start
                data = buf[at:at + run.npages * PAGE_SIZE]
                done, offset = 0, run.first_page * PAGE_SIZE
                while done < len(data):
                    done += write(run.region_id, offset + done, data[done:])

        pending: deque[tuple[Span, memoryview, Future[None]]] = deque()
        spans = iter(self.spans())
        with ThreadPoolExecutor(workers, thread_name_prefix="baseline-load") as pool:
            try:
                def submit() -> None:
                    span = next(spans, None)
                    if span is not None:
                        buf = free_buffers.pop()
                        pending.append((span, buf, pool.submit(read_and_write, span, buf)))

                for _ in range(len(free_buffers)):
                    submit()
                while pending:
                    span, buf, done = pending.popleft()
                    done.result()
                    self._check(span, buf, result)
                    free_buffers.append(buf)
                    submit()
                    if progress:
                        nbytes = sum(r.npages for r in span.runs) * PAGE_SIZE
                        progress(nbytes, nbytes // PAGE_SIZE)
            finally:
                for _span_, _buf, fut in pending:
                    fut.cancel()

    def _check(self, span: Span, buf: memoryview, result: LoadResult) -> None:
        digests = self.digests[span.segment]
        for run in span.runs:
            got = _page_digests(buf, run.data_offset - span.start, run.npages)
            want = digests[run.entry:run.entry + run.npages]
            if memoryview(got) != want:
                name = self.segments[span.segment].name
                result.corrupt.extend((run.region_id, run.first_page + i, name)
                                      for i in range(run.npages) if got[i] != want[i])
            result.bytes += run.npages * PAGE_SIZE

    def check_regions(self, view_of: Callable[[int], memoryview],
                      exclude: dict[int, bytearray]) -> tuple[list[tuple[int, int]], int]:
        """Check the copied pages in the regions against their baseline checksums, leaving out the pages
        marked in ``exclude``. Returns the (region id, page) that differ and the number of pages checked."""
        bad: list[tuple[int, int]] = []
        checked = 0
        for run in self.runs:
            for a, b in _clear_ranges(exclude.get(run.region_id, b""), run.first_page, run.first_page + run.npages):
                got = _page_digests(view_of(run.region_id), a * PAGE_SIZE, b - a)
                entry = run.entry + a - run.first_page
                want = self.digests[run.segment][entry:entry + b - a]
                if memoryview(got) != want:
                    bad.extend((run.region_id, a + i) for i in range(b - a) if got[i] != want[i])
                checked += b - a
        return bad, checked


def _page_digests(view: memoryview, start: int, npages: int) -> array:
    digest_of = xxhash.xxh3_64_intdigest
    return array("Q", map(digest_of, [view[p:p + PAGE_SIZE]
                                      for p in range(start, start + npages * PAGE_SIZE, PAGE_SIZE)]))


def _span(runs: list[CopyRun]) -> Span:
    last = runs[-1]
    return Span(runs[0].segment, runs[0].data_offset, last.data_offset + last.npages * PAGE_SIZE, tuple(runs))


def plan_load(backend: Backend, manifest: Manifest, skip: dict[int, bytearray] | None = None) -> LoadPlan:
    """Read and verify every segment index of the published generation and plan the copy.

    Pages marked in ``skip`` (region id -> one byte per page) are left out of
    the copy but stay in the live map: they are in the baseline, the caller
    just writes them from elsewhere.
    """
    segments = sorted(manifest.segments, key=lambda s: s.generation, reverse=True)
    pages_of = {rid: length // PAGE_SIZE for rid, length in manifest.regions.items()}
    seen = {rid: bytearray(n) for rid, n in pages_of.items()}     # 1 = a newer segment has this page
    plan = LoadPlan(segments, [], [], LiveMap(), {})
    skip = skip or {}
    for seg_no, info in enumerate(segments):
        raw, data_end = backend.read_index_raw(info)
        words = array("Q", raw)
        if sys.byteorder != "little":
            words.byteswap()                        # the index is little-endian on disk
        q = memoryview(words)
        keys, offsets = q[0::3], q[2::3]
        plan.digests.append(q[1::3])
        path = backend.segment_path(info.name)
        for entry, n, is_data in _stretches(keys, offsets):
            region_id, first = split_key(keys[entry])
            taken = seen.get(region_id)
            if taken is None or first + n > len(taken):
                raise CorruptionError(f"{path}: page {first}+{n} lies outside region {region_id}")
            if not is_data:
                taken[first:first + n] = b"\x01" * n       # now all zeros: a fresh region already is
                continue
            start = offsets[entry]
            if start < PAGE_SIZE or start + n * PAGE_SIZE > data_end:
                raise CorruptionError(f"{path}: data of region {region_id} page {first} lies outside the segment")
            for a, b in _clear_ranges(taken, first, first + n):
                plan.live.set_range(region_id, a, b - a)
                for c, d in _clear_ranges(skip.get(region_id, b""), a, b):
                    plan.runs.append(CopyRun(seg_no, region_id, c, d - c, start + (c - first) * PAGE_SIZE,
                                             entry + (c - first)))
                    cov = plan.covered.setdefault(region_id, bytearray(len(taken)))
                    cov[c:d] = b"\x01" * (d - c)
                    plan.bytes += (d - c) * PAGE_SIZE
            taken[first:first + n] = b"\x01" * n
    return plan


def _stretches(keys: memoryview, offsets: memoryview) -> Iterator[tuple[int, int, bool]]:
    """(first entry, count, is data) for each maximal copy run of an index, or zero-page entry."""
    total = len(keys)
    i = 0
    while i < total:
        k0, o0 = keys[i], offsets[i]
        if o0 == ZERO_PAGE:
            yield i, 1, False
            i += 1
            continue

        def one_run(n: int) -> bool:
            last = i + n - 1
            return keys[last] - k0 == n - 1 and offsets[last] - o0 == (n - 1) * PAGE_SIZE

        limit = min(total - i, MAX_RUN_PAGES)
        good, bad = 1, None
        while good < limit:                       # gallop, then bisect between good and bad
            probe = min(good * 2, limit)
            if one_run(probe):
                good = probe
            else:
                bad = probe
                break
        if bad is not None:
            while bad - good > 1:
                mid = (good + bad) // 2
                if one_run(mid):
                    good = mid
                else:
                    bad = mid
        yield i, good, True
        i += good


def _clear_ranges(marks: bytes | bytearray, start: int, end: int) -> Iterator[tuple[int, int]]:
    """[a, b) sub-ranges of [start, end) where ``marks`` holds no 1 (beyond its end counts as clear)."""
    page = start
    while page < end:
        hit = marks.find(1, page, end) if page < len(marks) else -1
        stop = end if hit < 0 else hit
        if stop > page:
            yield page, stop
        if hit < 0:
            return
        nxt = marks.find(0, hit, end)
        page = nxt if nxt >= 0 else min(end, len(marks))


def load(backend: Backend, manifest: Manifest, write: RegionWriter,
         progress: Callable[[int, int], None] | None = None) -> LoadResult:
    """Plan and copy the whole published generation."""
    return plan_load(backend, manifest).copy(backend, write, progress)


def live_map(backend: Backend, manifest: Manifest) -> LiveMap:
    """Which pages the published generation holds with non-zero content, from the indexes alone."""
    return plan_load(backend, manifest).live


def region_file_writer(regions: RegionSet) -> RegionWriter:
    """A RegionWriter into the region files: the kernel copies, and the GIL is released meanwhile."""
    fds = {region_id: regions.file_fd(region_id) for region_id in regions.regions}   # workers only look up

    def write(region_id: int, offset: int, data: memoryview) -> int:
        return os.pwrite(fds[region_id], data, offset)
    return write


def view_writer(view_of: Callable[[int], memoryview]) -> RegionWriter:
    """A RegionWriter into memory views (in-process tests)."""
    def write(region_id: int, offset: int, data: memoryview) -> int:
        view_of(region_id)[offset:offset + len(data)] = data
        return len(data)
    return write
