"""Baseline load planning: how the published generation is copied into fresh regions at close to disk
speed, planned from the segment indexes alone (the copy itself is the baseline page source's,
sources/baseline.py):

* **plan** (``plan_load``): each segment's index, newest segment first, is cut
  into *copy runs*: consecutive pages of one region stored consecutively in
  one segment, so one read and one write each. A page that a newer segment
  holds is dropped from the older ones. Runs are found without visiting every
  entry: keys strictly increase and a data page's offset grows by exactly one
  page per data entry, so a stretch of entries is one run exactly when its two
  ends say so, and the longest run from an entry is found by galloping.
  ``LoadPlan.cut`` leaves out pages the caller writes from elsewhere.
* **spans**: runs of one region close together in a segment are read as one
  *span* (through the small gaps between them). Spans of different region
  files go to different *lanes*, taken in turns: a write into a region file
  holds its inode lock, so one writer per file is all the kernel allows.
* **split** (``LoadPlan.split_covered``): dirty runs fetched during a load, cut into the parts no
  span writes and those to write over once the spans under them are in.
"""
from __future__ import annotations

import logging
import sys
from array import array
from collections import deque
from dataclasses import dataclass, field, replace
from collections.abc import Callable, Iterator, Mapping

import xxhash

from . import PAGE_SIZE
from .errors import CorruptionError
from .pagemap import PageMaps, Run, unset_runs
from .regions import RegionSet
from .store.base import BaselineStore
from .store.format import ZERO_PAGE, Manifest, SegmentInfo, split_key
from .store.live import LiveMap

log = logging.getLogger(__name__)

SPAN_BYTES = 8 << 20            # one read; also the longest copy run
SPAN_GAP_BYTES = 256 << 10      # read through a gap this small rather than issue another read
LOAD_LANES = 2                  # writers, each into its own region files

# write(region id, byte offset, data): stores all of data; called from worker threads.
RegionWriter = Callable[[int, int, memoryview], None]


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
    lane: int = 0         # which writer copies it into the regions


@dataclass
class LoadResult:
    live: LiveMap
    corrupt: list[tuple[int, int, str]] = field(default_factory=list)   # (region id, page, segment name)
    bytes: int = 0


@dataclass
class LoadPlan:
    """How one published generation is copied into regions: its runs, spans and live map."""

    segments: list[SegmentInfo]            # newest first
    digests: list[memoryview]              # per segment: the index's digest column, as 'Q'
    region_pages: dict[int, int]
    runs: list[CopyRun]                    # in segment order, then data order
    live: LiveMap                          # the whole published generation, cut pages included
    covered: PageMaps = field(init=False)               # 1 for each page a copy run writes
    bytes: int = field(init=False)
    spans: list[Span] = field(init=False)               # the reads, in the order they are issued

    def __post_init__(self) -> None:
        self.covered = PageMaps()
        for run in self.runs:
            self.covered.mark(run.region_id, run.first_page, run.npages, self.region_pages[run.region_id])
        self.bytes = sum(run.npages for run in self.runs) * PAGE_SIZE
        self.spans = _interleave_lanes(list(self._make_spans()))

    def cut(self, skip: Mapping[int, bytearray]) -> LoadPlan:
        """The same plan without the pages marked in ``skip`` (region id -> one byte per page), which the
        caller writes from elsewhere. They stay in the live map: they are part of the baseline."""
        runs: list[CopyRun] = []
        for run in self.runs:
            marks = skip.get(run.region_id, b"")
            end = run.first_page + run.npages
            if run.first_page >= len(marks) or marks.find(1, run.first_page, end) < 0:
                runs.append(run)
                continue
            for a, b in unset_runs(marks, run.first_page, end):
                moved = a - run.first_page
                runs.append(replace(run, first_page=a, npages=b - a, data_offset=run.data_offset + moved * PAGE_SIZE,
                                    entry=run.entry + moved))
        return LoadPlan(self.segments, self.digests, self.region_pages, runs, self.live)

    def _make_spans(self) -> Iterator[Span]:
        """Runs grouped into reads of at most SPAN_BYTES of one region, in segment order."""
        group: list[CopyRun] = []
        for run in self.runs:
            if group:
                first, last = group[0], group[-1]
                end = run.data_offset + run.npages * PAGE_SIZE
                if (run.segment == first.segment and run.region_id == first.region_id
                        and end - first.data_offset <= SPAN_BYTES
                        and run.data_offset - (last.data_offset + last.npages * PAGE_SIZE) <= SPAN_GAP_BYTES):
                    group.append(run)
                    continue
                yield _span(group)
            group = [run]
        if group:
            yield _span(group)

    def split_covered(self, runs: list[Run]) -> tuple[list[Run],
                                                                      list[tuple[int, Run]]]:
        """Split (region id, first page, count) runs into the parts no copy run writes, and the rest, each
        tagged with the number of spans that must be copied before it may be written over."""
        span_of: dict[int, array] = {}
        for k, span in enumerate(self.spans):
            for run in span.runs:
                m = span_of.get(run.region_id)
                if m is None:
                    m = span_of[run.region_id] = array("l", [-1]) * len(self.covered[run.region_id])
                m[run.first_page:run.first_page + run.npages] = array("l", [k]) * run.npages
        free: list[Run] = []
        written: list[tuple[int, Run]] = []
        for region_id, first, n in runs:
            done = first
            for a, b in unset_runs(self.covered.get(region_id, b""), first, first + n):
                if a > done:
                    written.append((max(span_of[region_id][done:a]) + 1, (region_id, done, a - done)))
                free.append((region_id, a, b - a))
                done = b
            if done < first + n:
                written.append((max(span_of[region_id][done:first + n]) + 1, (region_id, done, first + n - done)))
        written.sort(key=lambda w: w[0])
        return free, written

    def check_regions(self, view_of: Callable[[int], memoryview],
                      exclude: Mapping[int, bytearray]) -> tuple[list[tuple[int, int]], int]:
        """Check the copied pages in the regions against their baseline checksums, leaving out the pages
        marked in ``exclude``. Returns the (region id, page) that differ and the number of pages checked."""
        bad: list[tuple[int, int]] = []
        checked = 0
        for run in self.runs:
            for a, b in unset_runs(exclude.get(run.region_id, b""), run.first_page, run.first_page + run.npages):
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


def _interleave_lanes(spans: list[Span]) -> list[Span]:
    """Give the spans of different regions to different writers, and take them in turns.

    A write into a region file holds that file's inode lock, so one writer per
    file is all the kernel allows; writers on different files copy in parallel.
    Each lane keeps its spans in segment order, so each is read sequentially.
    """
    regions = sorted({span.runs[0].region_id for span in spans})
    lane_of = {region_id: i % LOAD_LANES for i, region_id in enumerate(regions)}
    lanes: list[deque[Span]] = [deque() for _ in range(LOAD_LANES)]
    for span in spans:
        lane = lane_of[span.runs[0].region_id]
        lanes[lane].append(replace(span, lane=lane))
    out: list[Span] = []
    while any(lanes):
        for queue in lanes:
            if queue:
                out.append(queue.popleft())
    return out


def _span(runs: list[CopyRun]) -> Span:
    last = runs[-1]
    return Span(runs[0].segment, runs[0].data_offset, last.data_offset + last.npages * PAGE_SIZE, tuple(runs))


def plan_load(store: BaselineStore, manifest: Manifest) -> LoadPlan:
    """Read and verify every segment index of the published generation and plan its copy."""
    segments = sorted(manifest.segments, key=lambda s: s.generation, reverse=True)
    region_pages = {rid: length // PAGE_SIZE for rid, length in manifest.regions.items()}
    seen = PageMaps({rid: bytearray(n) for rid, n in region_pages.items()})    # 1 = a newer segment has it
    digests: list[memoryview] = []
    runs: list[CopyRun] = []
    live = LiveMap()
    for seg_no, info in enumerate(segments):
        raw, data_end = store.read_index_raw(info)
        if sys.byteorder == "little":
            q = memoryview(raw).cast("Q")           # no copy: the plan keeps the index's buffer
        else:
            words = array("Q", raw)
            words.byteswap()                        # the index is little-endian on disk
            q = memoryview(words)
        keys, offsets = q[0::3], q[2::3]
        digests.append(q[1::3])
        path = store.describe(info.name)
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
            for a, b in unset_runs(taken, first, first + n):
                live.set_range(region_id, a, b - a)
                runs.append(CopyRun(seg_no, region_id, a, b - a, start + (a - first) * PAGE_SIZE, entry + (a - first)))
            taken[first:first + n] = b"\x01" * n
    return LoadPlan(segments, digests, region_pages, runs, live)


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

        def one_run(n: int) -> bool:  # noqa: B023 - called only within this iteration
            last = i + n - 1  # noqa: B023
            return keys[last] - k0 == n - 1 and offsets[last] - o0 == (n - 1) * PAGE_SIZE  # noqa: B023

        limit = min(total - i, SPAN_BYTES // PAGE_SIZE)        # a run fits one read
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


def live_map(store: BaselineStore, manifest: Manifest) -> LiveMap:
    """Which pages the published generation holds with non-zero content, from the indexes alone."""
    return plan_load(store, manifest).live


def region_file_writer(regions: RegionSet) -> RegionWriter:
    """A RegionWriter into the region files (``Region.write``: the kernel copies, the GIL is released)."""
    def write(region_id: int, offset: int, data: memoryview) -> None:
        regions[region_id].write(offset, data)
    return write


def view_writer(view_of: Callable[[int], memoryview]) -> RegionWriter:
    """A RegionWriter into memory views (in-process tests)."""
    def write(region_id: int, offset: int, data: memoryview) -> None:
        view_of(region_id)[offset:offset + len(data)] = data
    return write
