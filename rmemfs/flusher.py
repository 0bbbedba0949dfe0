"""Incremental baselines: swap the dirty lists, write the dirty pages as a segment, publish.

A flush:

1. (event loop, no await: atomic for the trio scheduler) swaps the lists, so
   every later mark lands on the new current list, and installs a
   copy-on-write ``Snapshot`` of the pages to write. The baseline is thus the
   filesystem exactly as it was at the swap, even though writers go on.
2. (worker thread) copies each page out of the snapshot, hashes it and appends
   it to a new segment file; temp + fsync + rename + directory fsync.
3. (worker thread) publishes the new manifest: the store's ``publish`` is a
   compare-and-swap on the epoch (``store/base.py``), so once a recovered
   owner has taken the backend this raises FencedError and nothing of ours
   replaces its generation. The live map is updated on a copy that replaces
   ``self.live`` only once the publish succeeded.
4. (event loop) clears the flushed list. Only now, with its baseline durable
   and published, are its marks dropped. A failure anywhere before keeps them:
   the next attempt folds the current list into the flushing one and
   snapshots both, with backoff, warning each time.

Awaits that break atomicity in ``flush``: the two ``to_thread`` calls. Marks
and copy-on-write saves may run between them; that is the point.

Crash points (``RMEMFS_FAULT``): flush.swapped, flush.segment-partial,
flush.segment-written, flush.published, flush.cleared.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from . import PAGE_SIZE, faults
from .dirty import merge_runs
from .errors import FencedError
from .pagemap import PageMaps, Run
from .regions import CTL_REGION_ID, RegionSet
from .store.base import BaselineStore
from .store.format import ZERO_BYTES, Manifest, SegmentInfo, next_manifest
from .store.live import LiveMap

if TYPE_CHECKING:
    from .core import Filesystem

log = logging.getLogger(__name__)

BATCH_PAGES = 256                 # pages copied per snapshot lock hold (1 MiB)
FULL_FLUSH_GARBAGE_RATIO = 2.0    # rewrite everything once segments hold 2x the live bytes
FULL_FLUSH_MIN_GARBAGE = 64 << 20
MAX_SEGMENTS = 64


class Snapshot:
    """Copy-on-write capture of a set of pages, frozen when it is created.

    The event loop calls ``preserve`` before changing pages; the flush thread
    calls ``capture``. A page is copied exactly once, by whichever comes first.
    Pages in free extents are zeros and are never read: reading a punched-out
    page through the mapping would allocate it again.
    """

    def __init__(self, runs: list[Run] | PageMaps, regions: RegionSet) -> None:
        """``runs``: the pages to capture, as runs or as page maps (taken over, not copied)."""
        self.regions = regions
        self.lock = threading.Lock()
        self.pending = PageMaps()      # pages still to be captured
        self.zero = PageMaps()         # pages of free extents: zeros, never read
        self.saved: dict[tuple[int, int], bytes] = {}
        # On the event loop, inside the flush's atomic section: per free stretch of a region, not per run
        # (20,000 scattered runs took 0.1 s here, a stall every request and the heartbeat saw).
        if isinstance(runs, PageMaps):
            self.pending = runs
        else:
            for region_id, first, n in runs:
                self.pending.mark(region_id, first, n, regions[region_id].pages)
        for region_id, pending in self.pending.items():
            for a, b in regions.free_page_ranges(region_id, 0, len(pending)):
                if pending.find(1, a, b) >= 0:
                    self.zero.map(region_id, len(pending))[a:b] = pending[a:b]
                    pending[a:b] = bytes(b - a)

    def preserve(self, region_id: int, first_page: int, npages: int) -> None:
        p = self.pending.get(region_id)
        end = min(first_page + npages, len(p)) if p is not None else 0
        if p is None or p.find(1, first_page, end) < 0:
            return
        view = self.regions[region_id].view
        with self.lock:
            for page in range(first_page, end):
                if p[page]:
                    self.saved[(region_id, page)] = bytes(view[page * PAGE_SIZE:(page + 1) * PAGE_SIZE])
                    p[page] = 0

    def capture(self, region_id: int, first_page: int, npages: int, out: memoryview) -> None:
        """Copy pages as of the snapshot into ``out`` (npages * PAGE_SIZE bytes)."""
        p = self.pending[region_id]
        z = self.zero.get(region_id, b"")
        view = self.regions[region_id].view
        end = first_page + npages
        with self.lock:
            if p.find(0, first_page, end) < 0:
                out[:] = view[first_page * PAGE_SIZE:end * PAGE_SIZE]
                p[first_page:end] = bytes(npages)
            elif end <= len(z) and z.find(0, first_page, end) < 0:
                out[:] = bytes(len(out))             # a freed file: zeros, without reading them
            else:
                for i, page in enumerate(range(first_page, end)):
                    if p[page]:
                        out[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] = view[page * PAGE_SIZE:(page + 1) * PAGE_SIZE]
                        p[page] = 0
                    elif page < len(z) and z[page]:
                        out[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] = ZERO_BYTES
                    else:
                        out[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] = self.saved.pop((region_id, page))


@dataclass(frozen=True)
class FlushStats:
    generation: int
    generation_time_ns: int
    flushes: int
    failures: int
    last_duration_s: float
    last_pages: int
    last_bytes: int
    last_full: bool
    total_bytes: int
    last_error: str
    segments: int
    segment_bytes: int
    live_pages: int
    fenced: bool
    longest_atomic_s: float = 0.0      # the longest atomic section (list swap to snapshot): one loop step
    last_atomic_entries: int = 0       # the entries of the list it swapped out, at the last flush


class Flusher:
    """Background task: flush every ``interval`` seconds, or at once when asked."""

    def __init__(self, fs: Filesystem, backend: BaselineStore, manifest: Manifest, live: LiveMap,
                 interval: float) -> None:
        self.fs = fs
        self.backend = backend
        self.manifest = manifest
        self.live = live
        self.interval = interval
        self.lock = trio.Lock()
        self.kick = trio.Event()
        self.done = trio.Condition()
        self.completed = 0          # flushes that finished (successfully or not)
        self.fenced = False
        self._stop = False
        self._stats: dict[str, Any] = dict(flushes=0, failures=0, last_duration_s=0.0, last_pages=0, last_bytes=0,
                           last_full=False, total_bytes=0, last_error="", longest_atomic_s=0.0,
                           last_atomic_entries=0)
        self._failures_in_row = 0
        self._rearm = False         # a flush failed: the loop's wait becomes the failure backoff

    # --- service ------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while not self._stop and not self.fenced:
            delay = self.interval if self._failures_in_row == 0 else min(
                self.interval, 0.5 * 2 ** min(self._failures_in_row, 5))
            with trio.move_on_after(delay):
                await self.kick.wait()
            self.kick = trio.Event()
            if self._stop:
                break
            if self._rearm:         # woken by a failure (maybe of a flush asked for by rmemfs-ctl): the
                self._rearm = False  # retry waits the backoff, not what was left of flush_interval
                continue
            tracker = self.fs.tracker
            if not tracker.current.count and not tracker.flushing.count:
                continue   # nothing changed since the last generation
            try:
                await self.flush()
            except FencedError as e:
                log.error("flushing stopped: %s", e)
            except Exception as e:   # keep the marks, warn, retry with backoff
                log.warning("flush failed, dirty marks kept, will retry: %s", e)

    def stop(self) -> None:
        self._stop = True
        self.kick.set()

    def trigger(self) -> None:
        self.kick.set()

    # --- one flush --------------------------------------------------------
    async def flush(self, *, full: bool = False, state: str | None = None) -> int:
        """Flush now; returns the generation published. ``state`` changes the manifest state."""
        async with self.lock:
            start = time.monotonic()
            try:
                gen = await self._flush_locked(full, state)
            except BaseException as e:
                self._stats["failures"] += 1
                self._stats["last_error"] = str(e)
                self._failures_in_row += 1
                if isinstance(e, Exception) and not isinstance(e, FencedError):
                    self._rearm = True
                    self.kick.set()
                raise
            finally:
                self.completed += 1
                async with self.done:
                    self.done.notify_all()
            self._failures_in_row = 0
            self._stats["flushes"] += 1
            self._stats["last_duration_s"] = time.monotonic() - start
            self._stats["last_error"] = ""
            return gen

    async def publish(self, manifest: Manifest, *, expect_epoch: int) -> None:
        """Publish a manifest change that writes no pages (ownership, state) as the next generation."""
        async with self.lock:
            new = next_manifest(manifest, generation=self.manifest.generation + 1)
            await trio.to_thread.run_sync(lambda: self.backend.publish(new, expect_epoch=expect_epoch))
            self.manifest = new

    def _want_full(self) -> bool:
        if self.fs.residency is not None and not self.fs.residency.complete:
            return False
        m = self.manifest
        garbage = m.segment_bytes() - self.live.count * PAGE_SIZE
        return (garbage > FULL_FLUSH_MIN_GARBAGE and garbage > FULL_FLUSH_GARBAGE_RATIO * self.live.count * PAGE_SIZE
                ) or len(m.segments) >= MAX_SEGMENTS

    async def _flush_locked(self, full: bool, state: str | None) -> int:
        if self.fenced or self.fs.note_fenced():
            self.fenced = True
            raise FencedError("this filesystem was fenced by a newer owner; it no longer publishes")
        fs, tracker = self.fs, self.fs.tracker
        # --- atomic section: no await until the snapshot is installed ---------
        atomic_start = time.perf_counter()
        fs.sync_times()                # so the baseline has them (the ones that do not fit come later)
        if tracker.flushing.count:
            tracker.fold_current_into_flushing()
        else:
            tracker.swap()
        flushing = tracker.flushing
        res = fs.residency
        if full and res is not None and not res.complete:
            # A full flush rewrites every live page from memory: not before the lazy load brought them in.
            log.info("full flush deferred until the background load is complete; flushing what is dirty")
            full = False
        full = full or self._want_full()
        regions = {rid: r.length for rid, r in fs.regions.regions.items() if rid != CTL_REGION_ID}
        named = flushing.pages_named()
        runs: list[Run] | None = None
        if named is not None:
            # The list's own page maps, copied: what its sorted entries would give, without sorting 100,000
            # scattered entries on the loop (0.37 s here); the runs are taken from them in the thread. A full
            # flush adds the live map's pages the same way: merging and clipping its runs on the loop held
            # it for 60-80 ms (130,000 live pages, tools/soak_standby.py).
            for rid in [rid for rid, m in named.items() if rid not in regions]:
                del named[rid]
            if full:
                for rid, m in self.live.maps.items():
                    if rid in regions:
                        named.grow(rid, regions[rid] // PAGE_SIZE)     # the region may have grown since marked
                        _or_into(named.map(rid, regions[rid] // PAGE_SIZE), m)
            for rid, m in named.items():
                del m[regions[rid] // PAGE_SIZE:]
            snapshot = Snapshot(named.copy(), fs.regions)
        else:
            runs = flushing.runs()
            if full:
                runs = merge_runs(runs + self.live.runs())
            runs = _clipped(runs, regions)
            snapshot = Snapshot(runs, fs.regions)
        tracker.preserver = snapshot
        self._stats["longest_atomic_s"] = max(self._stats["longest_atomic_s"], time.perf_counter() - atomic_start)
        self._stats["last_atomic_entries"] = flushing.count
        # --- end of atomic section ---------------------------------------------
        faults.point("flush.swapped")
        prev = self.manifest
        generation = prev.generation + 1
        info: SegmentInfo | None = None
        updates: list[tuple[int, int, list[bool]]] = []
        try:
            if runs is None:
                assert named is not None
                runs = await trio.to_thread.run_sync(named.runs)
            if runs:
                info, updates = await trio.to_thread.run_sync(self._write_segment, snapshot, runs, generation)
        finally:
            tracker.preserver = None
        faults.point("flush.segment-written")
        new_segments = () if info is None else (info,)
        segments = new_segments if full else prev.segments + new_segments
        # The new live map (self.live once published), built on a copy in a worker thread: per batch of
        # the segment, and 20,000 scattered batches held the event loop (and the heartbeat) for ~20 ms.
        live = await trio.to_thread.run_sync(_updated_live, self.live, updates)
        manifest = next_manifest(prev, generation=generation, regions=regions, segments=segments,
                                 live_pages=live.count, state=state or prev.state)
        try:
            if fs.note_fenced():   # fenced while the segment was written: publish nothing, keep every mark
                raise FencedError("this filesystem was fenced by a newer owner; it no longer publishes")
            await trio.to_thread.run_sync(lambda: self.backend.publish(manifest, expect_epoch=prev.epoch))
        except FencedError:
            self.fenced = True
            fs.fenced = True
            raise
        self.manifest, self.live = manifest, live
        faults.point("flush.published")
        flushing.clear()
        faults.point("flush.cleared")
        pages = sum(n for _, _, n in runs)
        written = 0 if info is None else info.bytes
        self._stats.update(last_pages=pages, last_bytes=written, last_full=full,
                           total_bytes=self._stats["total_bytes"] + written)
        if full and len(prev.segments):
            await trio.to_thread.run_sync(self.backend.collect_garbage, manifest)
        log.debug("flushed generation %d: %d pages, %d bytes%s", generation, pages, written,
                  " (full)" if full else "")
        return generation

    def _write_segment(self, snapshot: Snapshot, runs: list[Run],
                       generation: int) -> tuple[SegmentInfo, list[tuple[int, int, list[bool]]]]:
        writer = self.backend.new_segment(self.manifest.fsid, self.manifest.epoch, generation)
        updates: list[tuple[int, int, list[bool]]] = []
        try:
            written = 0
            for region_id, first, n in runs:
                for chunk in range(first, first + n, BATCH_PAGES):
                    m = min(BATCH_PAGES, first + n - chunk)
                    snapshot.capture(region_id, chunk, m, writer.reserve(m))
                    updates.append((region_id, chunk, writer.commit(region_id, chunk, m)))
                    written += m
                    if written >= BATCH_PAGES:
                        faults.point("flush.segment-partial")
            return writer.finish(), updates
        except BaseException:
            writer.abort()
            raise

    # --- observability -----------------------------------------------------
    def statistics(self) -> FlushStats:
        m = self.manifest
        return FlushStats(generation=m.generation, generation_time_ns=m.time_ns, segments=len(m.segments),
                          segment_bytes=m.segment_bytes(), live_pages=self.live.count, fenced=self.fenced,
                          **self._stats)


def _clipped(runs: list[Run], regions: dict[int, int]) -> list[Run]:
    """The runs within the regions (by id -> length): a list may name pages of a region no longer mapped."""
    return [(r, f, min(n, regions[r] // PAGE_SIZE - f)) for r, f, n in runs
            if r in regions and f < regions[r] // PAGE_SIZE]


def _or_into(dst: bytearray, src: bytearray) -> None:
    """Mark in ``dst`` every page ``src`` marks (both one byte per page, 0 or 1), over their common length:
    as two integers, in C (a 65,536-page region in ~0.4 ms)."""
    n = min(len(dst), len(src))
    if not n or src.find(1, 0, n) < 0:
        return
    if dst.find(1, 0, n) < 0:
        dst[:n] = src[:n]
    else:
        dst[:n] = (int.from_bytes(dst[:n], "little") | int.from_bytes(src[:n], "little")).to_bytes(n, "little")


def _updated_live(live: LiveMap, updates: list[tuple[int, int, list[bool]]]) -> LiveMap:
    """``live`` (not changed) with a new segment's batches applied: what is live after its publish."""
    out = live.copy()
    for region_id, first, flags in updates:
        if all(flags):
            out.set_range(region_id, first, len(flags))
        else:
            for i, is_live in enumerate(flags):
                out.set(region_id, first + i, is_live)
    return out
