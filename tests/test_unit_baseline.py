"""Unit level: baseline segments on disk, and loading them into regions (plan, cut, copy, checks)."""
from __future__ import annotations

import json
import os
import struct
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import xxhash
from hypothesis import given, settings, strategies as st

from rmemfs import PAGE_SIZE, loader
from rmemfs.dirty import DirtyTracker, ctl_region_size
from rmemfs.errors import BackendError, CorruptionError, FencedError
from rmemfs.exporter import why_still_needed
from rmemfs.loader import LoadPlan, LoadResult, RegionWriter, plan_load, view_writer
from rmemfs.sources.baseline import BaselineSource, load_baseline
from rmemfs.pagemap import Run
from rmemfs.store.base import SegmentReader
from rmemfs.store.directory import DirectoryStore
from rmemfs.store.format import ENTRY, FOOT, FOOTER_SIZE, STATE_CLEAN, STATE_MOUNTED, Manifest, next_manifest
from rmemfs.store.live import LiveMap

REGION_PAGES = 64


def copy(plan: LoadPlan, store: DirectoryStore, write: RegionWriter, **kw: Any) -> LoadResult:
    """An eager load of ``plan`` through the baseline page source."""
    source = BaselineSource(store, plan, write)
    try:
        return source.load(**kw)
    finally:
        source.close()


def make_backend(tmp_path: Path, regions: tuple[int, ...] = (2,)) -> tuple[DirectoryStore, Manifest]:
    backend = DirectoryStore(tmp_path / "backend")
    backend.path.mkdir()
    manifest = backend.create({}, regions={rid: REGION_PAGES * PAGE_SIZE for rid in regions})
    return backend, manifest


def page(fill: int) -> bytes:
    return bytes([fill]) * PAGE_SIZE


def write_segment(backend: DirectoryStore, manifest: Manifest, generation: int,
                  pages: dict[int, bytes] | dict[tuple[int, int], bytes]) -> Manifest:
    """Publish a segment holding ``pages``, keyed by page number (region 2) or (region, page)."""
    w = backend.new_segment(manifest.fsid, manifest.epoch, generation)
    keyed = {(k if isinstance(k, tuple) else (2, k)): v for k, v in pages.items()}
    for region_id, p in sorted(keyed):
        w.add(region_id, p, memoryview(keyed[region_id, p]))
    info = w.finish()
    new = next_manifest(manifest, generation=generation, segments=manifest.segments + (info,))
    backend.publish(new, expect_epoch=manifest.epoch)
    return new


def images(manifest: Manifest) -> dict[int, bytearray]:
    return {rid: bytearray(length) for rid, length in manifest.regions.items()}


def rewrite_index(backend: DirectoryStore, manifest: Manifest, change) -> Manifest:  # type: ignore[no-untyped-def]
    """Rewrite the only segment's index entries with ``change(entries)``, with valid checksums: a
    segment that is well-formed on disk but says something impossible."""
    info = manifest.segments[0]
    path = backend.segdir / info.name
    raw = path.read_bytes()
    magic, index_off, count, data_pages, _, head_xxh = FOOT.unpack_from(raw, len(raw) - FOOTER_SIZE)
    entries = change([list(e) for e in ENTRY.iter_unpack(raw[index_off:index_off + count * ENTRY.size])])
    index = b"".join(ENTRY.pack(*e) for e in entries)
    foot = FOOT.pack(magic, index_off, len(entries), data_pages, xxhash.xxh3_64_intdigest(index), head_xxh)
    path.write_bytes(raw[:index_off] + index + foot + struct.pack("<Q", xxhash.xxh3_64_intdigest(foot)))
    new = replace(manifest, segments=(replace(info, bytes=path.stat().st_size, entries=len(entries),
                                              index_xxh3=xxhash.xxh3_64_intdigest(index)),))
    backend.publish(new, expect_epoch=manifest.epoch)
    return new


# --- segments and manifests ------------------------------------------------------------

def test_segments_roundtrip_newest_wins_and_zero_pages(tmp_path: Path) -> None:
    backend, m = make_backend(tmp_path)
    m = write_segment(backend, m, 1, {0: page(1), 1: page(2), 5: page(3)})
    m = write_segment(backend, m, 2, {1: page(9), 5: bytes(PAGE_SIZE)})
    region = images(m)[2]
    result = load_baseline(backend, backend.read_manifest(), view_writer(lambda rid: memoryview(region)))
    assert region[:PAGE_SIZE] == page(1) and region[PAGE_SIZE:2 * PAGE_SIZE] == page(9)
    assert region[5 * PAGE_SIZE:6 * PAGE_SIZE] == bytes(PAGE_SIZE)
    assert result.corrupt == [] and result.live.count == 2
    assert m.segments[1].data_pages == 1          # the zero page cost no data
    assert backend.verify() == []


def test_corrupt_page_is_named_and_reported(tmp_path: Path) -> None:
    backend, m = make_backend(tmp_path)
    m = write_segment(backend, m, 1, {3: page(7)})
    seg = backend.segdir / m.segments[0].name
    with open(seg, "r+b") as f:
        f.seek(PAGE_SIZE + 100)
        f.write(b"\xff")
    problems = backend.verify()
    assert problems and seg.name in problems[0] and "page 3" in problems[0]
    region = images(m)[2]
    result = load_baseline(backend, m, view_writer(lambda rid: memoryview(region)))
    assert result.corrupt == [(2, 3, seg.name)]


def test_corrupt_page_inside_a_long_run_is_the_only_one_reported(tmp_path: Path) -> None:
    backend, m = make_backend(tmp_path)
    m = write_segment(backend, m, 1, {p: page(p + 1) for p in range(4, 60)})
    seg = backend.segdir / m.segments[0].name
    with open(seg, "r+b") as f:                 # page 37 is the 34th data page
        f.seek(PAGE_SIZE + (37 - 4) * PAGE_SIZE + 5)
        f.write(b"\x00")
    region = images(m)[2]
    result = load_baseline(backend, m, view_writer(lambda rid: memoryview(region)))
    assert result.corrupt == [(2, 37, seg.name)]
    assert all(region[p * PAGE_SIZE:(p + 1) * PAGE_SIZE] == page(p + 1) for p in range(4, 60) if p != 37)
    assert result.bytes == 56 * PAGE_SIZE


def test_missing_segment_and_bad_manifest_are_named(tmp_path: Path) -> None:
    backend, m = make_backend(tmp_path)
    m = write_segment(backend, m, 1, {3: page(7)})
    seg = backend.segdir / m.segments[0].name
    seg.unlink()
    with pytest.raises(CorruptionError, match=seg.name):
        load_baseline(backend, m, view_writer(lambda rid: memoryview(bytearray(REGION_PAGES * PAGE_SIZE))))
    raw = backend.manifest_path.read_bytes()
    backend.manifest_path.write_bytes(raw.replace(b'"generation": 1', b'"generation": 9'))
    with pytest.raises(CorruptionError, match="MANIFEST"):
        backend.read_manifest()


def test_index_naming_a_page_outside_its_region_is_refused(tmp_path: Path) -> None:
    backend, m = make_backend(tmp_path)
    m = write_segment(backend, m, 1, {3: page(7), 4: page(8)})
    m = rewrite_index(backend, m, lambda entries: [[2 << 48 | REGION_PAGES, *entries[1][1:]], *entries[:1]][::-1])
    with pytest.raises(CorruptionError, match=f"{m.segments[0].name}.*outside region 2"):
        plan_load(backend, m)


def test_index_pointing_outside_the_data_area_is_refused(tmp_path: Path) -> None:
    backend, m = make_backend(tmp_path)
    m = write_segment(backend, m, 1, {3: page(7)})
    m = rewrite_index(backend, m, lambda entries: [[entries[0][0], entries[0][1], 50 * PAGE_SIZE]])
    with pytest.raises(CorruptionError, match="outside the segment"):
        plan_load(backend, m)


def test_publish_is_fenced_by_a_newer_epoch(tmp_path: Path) -> None:
    backend, m = make_backend(tmp_path)
    newer = next_manifest(m, epoch=m.epoch + 1, generation=1)
    backend.publish(newer, expect_epoch=m.epoch)
    with pytest.raises(FencedError):
        backend.publish(next_manifest(m, generation=2), expect_epoch=m.epoch)
    assert backend.read_manifest().epoch == m.epoch + 1


def test_crash_before_publish_leaves_previous_generation(tmp_path: Path) -> None:
    backend, m = make_backend(tmp_path)
    m = write_segment(backend, m, 1, {0: page(1)})
    w = backend.new_segment(m.fsid, m.epoch, 2)
    w.add(2, 0, memoryview(page(2)))
    w.finish()                                      # segment written, manifest never published
    assert backend.read_manifest().generation == 1 and backend.verify() == []
    assert backend.collect_garbage(backend.read_manifest()) == 1


def test_manifest_and_identity_files(tmp_path: Path) -> None:
    backend, m = make_backend(tmp_path)
    assert os.stat(backend.path / "secret").st_mode & 0o777 == 0o600
    assert len(backend.secret()) == 32
    body, trailer = backend.manifest_path.read_bytes().rstrip(b"\n").rsplit(b"\nxxh3:", 1)
    assert xxhash.xxh3_64_hexdigest(body).encode() == trailer
    assert json.loads(body)["fsid"] == backend.fsid() == m.fsid


def test_live_map_runs() -> None:
    live = LiveMap()
    for p in (1, 2, 3, 7):
        live.set(4, p, True)
    live.set(4, 2, False)
    assert live.runs() == [(4, 1, 1), (4, 3, 1), (4, 7, 1)] and live.count == 3


def test_segment_header_is_checked(tmp_path: Path) -> None:
    backend, m = make_backend(tmp_path)
    m = write_segment(backend, m, 1, {0: page(1)})
    seg = backend.segdir / m.segments[0].name
    with open(seg, "r+b") as f:
        f.write(struct.pack("<8s", b"GARBAGE!"))
    with pytest.raises(CorruptionError, match="header"):
        backend.read_index(m.segments[0])


# --- loading: plan, cut, copy -------------------------------------------------------------

# A generation: segments oldest first, each {(region, page): fill byte, 0 = a zero page}.
pages_st = st.dictionaries(st.tuples(st.sampled_from([2, 3]), st.integers(0, REGION_PAGES - 1)),
                           st.integers(0, 255), max_size=40)
runs_st = st.lists(st.tuples(st.sampled_from([2, 3]), st.integers(0, REGION_PAGES - 1), st.integers(1, 20)),
                   max_size=6)


def expand(runs: list[Run], fill: int) -> dict[tuple[int, int], int]:
    return {(r, p): fill for r, first, n in runs for p in range(first, min(first + n, REGION_PAGES))}


def page_marks(runs: list[Run]) -> dict[int, bytearray]:
    marks = {rid: bytearray(REGION_PAGES) for rid in (2, 3)}
    for r, first, n in runs:
        marks[r][first:first + n] = b"\x01" * len(marks[r][first:first + n])
    return marks


@settings(max_examples=60, deadline=None)
@given(generations=st.lists(st.tuples(pages_st, runs_st), min_size=1, max_size=4), skip_runs=runs_st,
       fetch_runs=runs_st, span_pages=st.sampled_from([2, 5, 64]))
def test_load_matches_a_model_of_newest_wins(tmp_path_factory: pytest.TempPathFactory,
                                             generations: list[tuple[dict[tuple[int, int], int],
                                                                     list[Run]]],
                                             skip_runs: list[Run],
                                             fetch_runs: list[Run], span_pages: int) -> None:
    """Whatever the segments hold, the loaded regions are newest-wins page by page, the live map is the
    non-zero pages, cut pages are left alone, and every fetched page is ordered after the span that
    writes it. Small spans exercise span grouping and the lanes."""
    tmp_path = tmp_path_factory.mktemp("load")
    backend, m = make_backend(tmp_path, regions=(2, 3))
    model: dict[tuple[int, int], int] = {}
    for generation, (scattered, runs) in enumerate(generations, start=1):
        fills = {**scattered, **expand(runs, generation)}        # runs give long copy runs
        m = write_segment(backend, m, generation, {k: page(v) for k, v in fills.items()})
        model.update(fills)
    old_span = loader.SPAN_BYTES
    loader.SPAN_BYTES = span_pages * PAGE_SIZE
    try:
        skip = page_marks(skip_runs)
        plan = plan_load(backend, m).cut(skip)
        regions = images(m)
        done_at: list[dict[int, bytes]] = []
        result = copy(plan, backend, view_writer(lambda rid: memoryview(regions[rid])),
                      spans_done=lambda n: done_at.append({r: bytes(v) for r, v in regions.items()}))
    finally:
        loader.SPAN_BYTES = old_span
    assert result.corrupt == []
    assert len(done_at) == len(plan.spans)
    for (rid, p), fill in model.items():
        got = regions[rid][p * PAGE_SIZE:(p + 1) * PAGE_SIZE]
        assert got == (bytes(PAGE_SIZE) if skip[rid][p] else page(fill)), (rid, p)
    assert plan.live.count == sum(1 for fill in model.values() if fill)
    assert {(rid, p) for rid, p0, n in plan.live.runs() for p in range(p0, p0 + n)} == \
        {k for k, fill in model.items() if fill}
    assert result.bytes == plan.bytes == sum(1 for k, f in model.items() if f and not skip[k[0]][k[1]]) * PAGE_SIZE
    # Each span is in the regions when spans_done reports it.
    for k, span in enumerate(plan.spans):
        for run in span.runs:
            want = b"".join(page(model[run.region_id, p]) for p in range(run.first_page, run.first_page + run.npages))
            assert done_at[k][run.region_id][run.first_page * PAGE_SIZE:(run.first_page + run.npages) * PAGE_SIZE] \
                == want
    # Fetched runs: split into pages no span writes, and pages to write over once their last span is in.
    span_of = {(run.region_id, p): k for k, span in enumerate(plan.spans) for run in span.runs
               for p in range(run.first_page, run.first_page + run.npages)}
    fetch = [(r, f, min(n, REGION_PAGES - f)) for r, f, n in fetch_runs]
    free, written = plan.split_covered(fetch)
    pages_in = sorted((r, p) for r, f, n in fetch for p in range(f, f + n))
    pages_out = sorted([(r, p) for r, f, n in free for p in range(f, f + n)]
                       + [(r, p) for _, (r, f, n) in written for p in range(f, f + n)])
    assert pages_in == pages_out
    assert all((r, p) not in span_of for r, f, n in free for p in range(f, f + n))
    for need, (r, f, n) in written:
        assert need == max(span_of[r, p] for p in range(f, f + n)) + 1
    assert [need for need, _ in written] == sorted(need for need, _ in written)


def test_check_regions_finds_changed_pages_except_excluded(tmp_path: Path) -> None:
    backend, m = make_backend(tmp_path)
    m = write_segment(backend, m, 1, {p: page(p + 1) for p in range(10)})
    plan = plan_load(backend, m)
    region = images(m)[2]
    copy(plan, backend, view_writer(lambda rid: memoryview(region)))
    assert plan.check_regions(lambda rid: memoryview(region), exclude={}) == ([], 10)
    region[4 * PAGE_SIZE] ^= 1
    region[7 * PAGE_SIZE] ^= 1
    assert plan.check_regions(lambda rid: memoryview(region), exclude={}) == ([(2, 4), (2, 7)], 10)
    skip = bytearray(REGION_PAGES)
    skip[7] = 1
    assert plan.check_regions(lambda rid: memoryview(region), exclude={2: skip}) == ([(2, 4)], 9)


def test_spans_read_through_small_gaps_and_take_turns_between_regions(tmp_path: Path) -> None:
    backend, m = make_backend(tmp_path, regions=(2, 3, 4))
    pages = {(rid, p): page(rid) for rid in (2, 3, 4) for p in range(0, REGION_PAGES, 2)}
    m = write_segment(backend, m, 1, pages)
    plan = plan_load(backend, m)
    assert len(plan.runs) == 3 * REGION_PAGES // 2          # every page its own run: keys are not consecutive
    assert len(plan.spans) == 3                             # but one read per region: the gaps are tiny
    assert [span.lane for span in plan.spans] == [0, 1, 0]
    assert [span.runs[0].region_id for span in plan.spans] == [2, 3, 4]


# --- when a failed host's memory may go ---------------------------------------------------

def test_memory_is_needed_until_a_newer_owner_publishes_its_own_baseline(tmp_path: Path) -> None:
    backend, m = make_backend(tmp_path)
    m = write_segment(backend, m, 1, {0: page(1)})
    region_dir = tmp_path / "regions"
    region_dir.mkdir()
    mem = bytearray(ctl_region_size(1 << 14))
    tracker = DirtyTracker(memoryview(mem), 1 << 14)
    tracker.format(m.fsid, m.epoch, os.getpid())
    (region_dir / "ctl-0000.rgn").write_bytes(mem)
    assert "rmemfs-recover" in (why_still_needed(backend, region_dir) or "")       # it is still the owner
    newer = next_manifest(m, epoch=m.epoch + 1, generation=2, state=STATE_MOUNTED)
    backend.publish(newer, expect_epoch=m.epoch)                                    # recovered elsewhere...
    assert "first flush" in (why_still_needed(backend, region_dir) or "")          # ...but nothing flushed
    w = backend.new_segment(m.fsid, newer.epoch, 3)
    w.add(2, 1, memoryview(page(2)))
    backend.publish(next_manifest(newer, generation=3, segments=newer.segments + (w.finish(),)),
                    expect_epoch=newer.epoch)
    assert why_still_needed(backend, region_dir) is None
    assert "no rmemfs regions" in (why_still_needed(backend, tmp_path) or "")


def test_memory_of_a_clean_unmount_is_not_needed(tmp_path: Path) -> None:
    backend, m = make_backend(tmp_path)
    m = write_segment(backend, m, 1, {0: page(1)})
    backend.publish(next_manifest(m, state=STATE_CLEAN), expect_epoch=m.epoch)
    region_dir = tmp_path / "regions"
    region_dir.mkdir()
    mem = bytearray(ctl_region_size(1 << 14))
    tracker = DirtyTracker(memoryview(mem), 1 << 14)
    tracker.format(m.fsid, m.epoch, os.getpid())
    tracker.set_clean_generation(m.generation)
    (region_dir / "ctl-0000.rgn").write_bytes(mem)
    assert why_still_needed(backend, region_dir) is None
    tracker.set_clean_generation(m.generation - 1)            # regions of an older generation than published
    (region_dir / "ctl-0000.rgn").write_bytes(mem)
    assert why_still_needed(backend, region_dir) is not None


def test_segment_shrinking_under_the_load_is_a_named_short_read(tmp_path: Path) -> None:
    backend, m = make_backend(tmp_path)
    m = write_segment(backend, m, 1, {p: page(p + 1) for p in range(20)})
    plan = plan_load(backend, m)
    seg = backend.segdir / m.segments[0].name
    os.truncate(seg, 5 * PAGE_SIZE)                      # after the plan was made from its index
    region = images(m)[2]
    with pytest.raises(CorruptionError, match=f"{seg.name}.*short read"):
        copy(plan, backend, view_writer(lambda rid: memoryview(region)))


@pytest.mark.allow_log(r"is not an rmemfs file; it is left alone")
def test_a_directory_named_like_a_segment_is_a_clear_error(tmp_path: Path) -> None:
    """Issue 15.4: a subdirectory in segments/ gave an unexpected IsADirectoryError (exit 1)."""
    backend, m = make_backend(tmp_path)
    m = write_segment(backend, m, 1, {0: page(1)})
    (backend.segdir / "seg-000000-0000000005.rseg").mkdir()
    (backend.segdir / "photos").mkdir()
    with pytest.raises(BackendError, match="seg-000000-0000000005.rseg.*not a regular file"):
        backend.collect_garbage(m)
    (backend.segdir / "seg-000000-0000000005.rseg").rmdir()
    assert backend.collect_garbage(m) == 0 and (backend.segdir / "photos").is_dir()


def test_two_creators_make_one_filesystem(tmp_path: Path) -> None:
    root = tmp_path / "backend"
    root.mkdir()
    a, b = DirectoryStore(root), DirectoryStore(root)
    assert a.is_empty() and b.is_empty()
    ma = a.create({}, regions={})
    mb = b.create({}, regions={})                   # as if it had raced: it adopts the first one
    assert ma.fsid == mb.fsid == DirectoryStore(root).fsid() and a.secret() == b.secret()
    assert a.owned_epoch == 0 and b.owned_epoch is None


class _SlowFirstReads(DirectoryStore):
    """A directory store whose loads read several spans at once, the earlier ones slowest, so the reads
    end out of plan order; it records how many were in progress at once."""
    load_reads_in_flight = 4

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        import threading
        self.lock, self.now, self.most, self.reads = threading.Lock(), 0, 0, 0

    def open_segment(self, name: str, *, sequential: bool = False) -> SegmentReader:
        import time
        inner, store = super().open_segment(name, sequential=sequential), self

        class Slow(SegmentReader):
            def readinto(self, offset: int, buf: memoryview) -> None:
                with store.lock:
                    store.now += 1
                    store.most = max(store.most, store.now)
                    k = store.reads
                    store.reads += 1
                time.sleep(max(0.0, 0.08 - 0.02 * k))
                inner.readinto(offset, buf)
                with store.lock:
                    store.now -= 1

            def close(self) -> None:
                inner.close()
        return Slow(name, inner.size)


def test_load_with_reads_in_flight_ends_out_of_order_and_reports_in_order(tmp_path: Path) -> None:
    """A store with load_reads_in_flight > 1 (RADOS: 4) gets that many span reads at once; the spans
    still land whole and are reported done in plan order."""
    regions = tuple(range(2, 10))            # one span per region: 8 spans
    backend, m = make_backend(tmp_path, regions=regions)
    fills = {(rid, p): rid * 16 + p % 7 + 1 for rid in regions for p in range(0, REGION_PAGES, 3)}
    m = write_segment(backend, m, 1, {k: page(v) for k, v in fills.items()})
    slow = _SlowFirstReads(backend.path)
    plan = plan_load(slow, slow.read_manifest())
    assert len(plan.spans) == len(regions)
    imgs = images(m)
    done: list[int] = []
    seen_whole: list[bool] = []

    def spans_done(n: int) -> None:
        done.append(n)
        span = plan.spans[n - 1]
        seen_whole.append(all(imgs[r.region_id][r.first_page * PAGE_SIZE:(r.first_page + r.npages) * PAGE_SIZE]
                              == b"".join(page(fills[r.region_id, p]) for p in range(r.first_page,
                                                                                      r.first_page + r.npages))
                              for r in span.runs))
    result = copy(plan, slow, view_writer(lambda rid: memoryview(imgs[rid])), spans_done=spans_done)
    assert result.corrupt == []
    assert slow.most > 1, "the span reads ran one at a time"
    assert done == list(range(1, len(plan.spans) + 1)) and all(seen_whole)
    for (rid, p), fill in fills.items():
        assert imgs[rid][p * PAGE_SIZE:(p + 1) * PAGE_SIZE] == page(fill)
