"""A page source reading a published generation's pages from the store, by page, with checksums.

The load plan's copy runs are indexed per region (sorted by first page), so a request for a few
pages finds its runs by bisection instead of re-planning. Pages no run holds are zero in the
baseline, which a fresh region already is.
"""
from __future__ import annotations

import bisect
import logging
import threading

import trio
import xxhash

from .. import PAGE_SIZE
from ..errors import CorruptionError
from ..loader import CopyRun, LoadPlan, RegionWriter
from ..store.base import BaselineStore, SegmentReader
from .base import PageFailure

log = logging.getLogger(__name__)


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

    def copy_now(self, runs: list[tuple[int, int, int]]) -> list[PageFailure]:
        """``make_resident`` in the calling thread (before the mount, when nothing else runs)."""
        return self._copy(runs)

    def close(self) -> None:
        with self._lock:
            for reader in self._all:
                reader.close()
            self._all.clear()
        self._local = threading.local()
