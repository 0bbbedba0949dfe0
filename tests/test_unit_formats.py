"""Unit level: the byte formats other hosts depend on (dirty lists, journal, baseline segments)."""
from __future__ import annotations

import json
import os
import struct
import uuid
from pathlib import Path

import pytest
import xxhash

from rmemfs import PAGE_SIZE
from rmemfs.baseline import Backend, LiveMap, Manifest, next_manifest
from rmemfs.dirty import (DirtyTracker, ListFull, ctl_region_size, decode_entry, encode_entry, list_offset,
                          merge_runs, parse_entries, parse_header, parse_list_count)
from rmemfs.errors import CorruptionError, FencedError
from rmemfs.journal import CHECKPOINT, Journal, read_superblock
from rmemfs.loader import load, view_writer
from rmemfs.regions import META_REGION_ID, RegionSet, parse_region_file_name, region_file_name

FSID = str(uuid.UUID(int=0x1234))


def tracker(capacity: int = 64) -> tuple[DirtyTracker, bytearray]:
    mem = bytearray(ctl_region_size(capacity))
    t = DirtyTracker(memoryview(mem), capacity)
    t.format(FSID, 7, 4242)
    t.region_pages.update({1: 1024, 2: 1 << 20})
    return t, mem


def test_entry_encoding_roundtrip() -> None:
    for region, first, n in [(0, 0, 1), (2, 123456, 65536), (0xFFFF, 0xFFFFFFFF, 7)]:
        assert decode_entry(encode_entry(region, first, n)) == (region, first, n)


def test_marks_land_in_exported_memory_and_dedup() -> None:
    t, mem = tracker()
    t.mark(2, 10, 3)
    t.mark(2, 11, 1)           # already covered: no new entry
    t.mark(2, 12, 2)           # partly new: one entry for the whole run
    t.mark(1, 0, 1)
    t.set_heartbeat_interval(0.25)
    header = parse_header(bytes(mem[:PAGE_SIZE]))
    assert header.fsid == FSID and header.epoch == 7 and header.pid == 4242 and header.active == 0
    assert header.heartbeat_interval_us == 250_000
    off = list_offset(header.active, header.capacity)
    count = parse_list_count(bytes(mem[off:off + PAGE_SIZE]), header.capacity)
    entries = list(parse_entries(bytes(mem[off + PAGE_SIZE:off + PAGE_SIZE + count * 8])))
    assert entries == [(2, 10, 3), (2, 12, 2), (1, 0, 1)]
    assert t.current.runs() == [(1, 0, 1), (2, 10, 4)]


def test_long_runs_split_into_entries() -> None:
    t, _ = tracker()
    t.mark(2, 0, 200_000)
    assert t.current.count == 4
    assert t.current.runs() == [(2, 0, 200_000)]


def test_swap_moves_new_marks_to_the_other_list() -> None:
    t, mem = tracker()
    t.mark(2, 1, 1)
    flushing = t.swap()
    t.mark(2, 1, 1)            # same page after the swap: must be marked again on the new list
    t.mark(2, 5, 1)
    assert flushing.runs() == [(2, 1, 1)]
    assert t.current.runs() == [(2, 1, 1), (2, 5, 1)]
    header = parse_header(bytes(mem[:PAGE_SIZE]))
    assert header.active == 1 and header.swap_seq == 1
    with pytest.raises(RuntimeError):
        t.swap()               # the flushing list is not cleared yet
    flushing.clear()
    t.swap()


def test_full_list_refuses_instead_of_dropping() -> None:
    t, _ = tracker(capacity=4)
    for page in range(0, 8, 2):
        t.mark(2, page, 1)
    with pytest.raises(ListFull):
        t.mark(2, 100, 1)
    assert t.current.count == 4


def test_fold_after_failed_flush_keeps_every_mark() -> None:
    t, _ = tracker()
    t.mark(2, 1, 1)
    t.swap()
    t.mark(2, 9, 2)
    folded = t.fold_current_into_flushing()
    assert folded.runs() == [(2, 1, 1), (2, 9, 2)]
    assert t.current.count == 0


def test_merge_runs() -> None:
    assert merge_runs([(2, 5, 2), (1, 0, 1), (2, 0, 5), (2, 8, 1)]) == [(1, 0, 1), (2, 0, 7), (2, 8, 1)]


def test_ctl_header_rejects_garbage() -> None:
    with pytest.raises(CorruptionError):
        parse_header(bytes(PAGE_SIZE))


def test_region_names() -> None:
    assert region_file_name(0) == "ctl-0000.rgn" and region_file_name(5) == "data-0005.rgn"
    assert parse_region_file_name("meta-0001.rgn") == (1, parse_region_file_name("meta-0001.rgn")[1])
    assert parse_region_file_name("data-0001.rgn") is None      # role and id disagree
    assert parse_region_file_name("junk") is None


# --- journal ----------------------------------------------------------------------

@pytest.fixture
def journal(tmp_path: Path) -> Journal:
    regions = RegionSet(tmp_path)
    regions.create(META_REGION_ID, 64 * PAGE_SIZE)
    t, _ = tracker()
    t.region_pages[META_REGION_ID] = 64
    j = Journal(regions[META_REGION_ID], t)
    j.checkpoint(FSID, b"state-0")
    return j


def test_journal_replays_records_in_order(journal: Journal) -> None:
    journal.append(5, b"a")
    journal.append(6, b"bc" * 100)
    again = Journal(journal.region, journal.tracker)
    assert [(t, bytes(p)) for t, p in again.open()] == [(CHECKPOINT, b"state-0"), (5, b"a"), (6, b"bc" * 100)]
    again.append(7, b"after reopen")
    assert [t for t, _ in Journal(journal.region, journal.tracker).open()] == [CHECKPOINT, 5, 6, 7]


def test_torn_record_ends_replay(journal: Journal) -> None:
    journal.append(5, b"first")
    pos = journal.pos
    journal.append(6, b"second record")
    journal.view[pos + 30] ^= 0xFF         # a crash mid-copy leaves a record whose checksum fails
    journal.append(7, b"third")            # an LSN after a torn one is never replayed
    assert [t for t, _ in Journal(journal.region, journal.tracker).open()] == [CHECKPOINT, 5]


def test_checkpoint_switches_area_and_torn_superblock_falls_back(journal: Journal) -> None:
    journal.append(5, b"x")
    old_area = journal.sb.area_offset
    journal.checkpoint(FSID, b"state-1")
    journal.append(6, b"y")
    sb = read_superblock(journal.view)
    assert sb.area_offset != old_area and sb.seq == 2
    assert [(t, bytes(p)) for t, p in Journal(journal.region, journal.tracker).open()] == [
        (CHECKPOINT, b"state-1"), (6, b"y")]
    assert bytes(journal.view[old_area:old_area + 64]) == bytes(64)     # the dead area was released
    # Every byte the journal wrote was marked dirty first.
    marked = {p for _, f, n in journal.tracker.current.runs() for p in range(f, f + n)}
    assert {0, 1, old_area // PAGE_SIZE, sb.area_offset // PAGE_SIZE} <= marked


def test_journal_full_raises(journal: Journal) -> None:
    from rmemfs.journal import JournalFull
    with pytest.raises(JournalFull):
        for _ in range(10_000):
            journal.append(5, b"z" * 1000)


# --- baseline --------------------------------------------------------------------------

def make_backend(tmp_path: Path) -> tuple[Backend, Manifest]:
    backend = Backend(tmp_path / "backend")
    backend.path.mkdir()
    manifest = backend.create({}, regions={2: 64 * PAGE_SIZE})
    return backend, manifest


def page(fill: int) -> bytes:
    return bytes([fill]) * PAGE_SIZE


def write_segment(backend: Backend, manifest: Manifest, generation: int,
                  pages: dict[int, bytes]) -> Manifest:
    w = backend.new_segment(manifest.fsid, manifest.epoch, generation)
    for p in sorted(pages):
        w.add(2, p, memoryview(pages[p]))
    info = w.finish()
    new = next_manifest(manifest, generation=generation, segments=manifest.segments + (info,))
    backend.publish(new, expect_epoch=manifest.epoch)
    return new


def test_segments_roundtrip_newest_wins_and_zero_pages(tmp_path: Path) -> None:
    backend, m = make_backend(tmp_path)
    m = write_segment(backend, m, 1, {0: page(1), 1: page(2), 5: page(3)})
    m = write_segment(backend, m, 2, {1: page(9), 5: bytes(PAGE_SIZE)})
    region = bytearray(64 * PAGE_SIZE)
    result = load(backend, backend.read_manifest(), view_writer(lambda rid: memoryview(region)))
    assert region[:PAGE_SIZE] == page(1) and region[PAGE_SIZE:2 * PAGE_SIZE] == page(9)
    assert region[5 * PAGE_SIZE:6 * PAGE_SIZE] == bytes(PAGE_SIZE)
    assert result.corrupt == [] and result.live.count == 2
    assert m.segments[1].data_pages == 1          # the zero page cost no data
    assert backend.verify() == []


def test_corrupt_page_is_named_and_reported(tmp_path: Path) -> None:
    backend, m = make_backend(tmp_path)
    m = write_segment(backend, m, 1, {3: page(7)})
    seg = backend.segment_path(m.segments[0].name)
    with open(seg, "r+b") as f:
        f.seek(PAGE_SIZE + 100)
        f.write(b"\xff")
    problems = backend.verify()
    assert problems and seg.name in problems[0] and "page 3" in problems[0]
    region = bytearray(64 * PAGE_SIZE)
    result = load(backend, m, view_writer(lambda rid: memoryview(region)))
    assert result.corrupt == [(2, 3, seg.name)]


def test_missing_segment_and_bad_manifest_are_named(tmp_path: Path) -> None:
    backend, m = make_backend(tmp_path)
    m = write_segment(backend, m, 1, {3: page(7)})
    seg = backend.segment_path(m.segments[0].name)
    seg.unlink()
    with pytest.raises(CorruptionError, match=seg.name):
        load(backend, m, view_writer(lambda rid: memoryview(bytearray(64 * PAGE_SIZE))))
    raw = backend.manifest_path.read_bytes()
    backend.manifest_path.write_bytes(raw.replace(b'"generation": 1', b'"generation": 9'))
    with pytest.raises(CorruptionError, match="MANIFEST"):
        backend.read_manifest()


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
    seg = backend.segment_path(m.segments[0].name)
    with open(seg, "r+b") as f:
        f.write(struct.pack("<8s", b"GARBAGE!"))
    with pytest.raises(CorruptionError, match="header"):
        backend.read_index(m.segments[0])


def test_contiguous_marks_widen_the_last_entry() -> None:
    t, _ = tracker()
    t.mark(2, 0, 2)
    t.mark(2, 2, 3)            # continues the last run: widened in place
    t.mark(1, 5, 1)
    t.mark(2, 5, 1)            # contiguous with (2, 0, 5) but not the last entry: a new one
    assert t.current.count == 3
    assert t.current.runs() == [(1, 5, 1), (2, 0, 6)]
