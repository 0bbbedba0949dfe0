"""Unit level: the byte formats other hosts depend on (dirty lists, journal; baseline segments: test_unit_baseline)."""
from __future__ import annotations

import uuid
from array import array
from pathlib import Path

import pytest

from rmemfs import PAGE_SIZE
from rmemfs.dirty import (DirtyTracker, ListFull, ctl_region_size, decode_entry, encode_entry, list_offset,
                          merge_runs, parse_entries, parse_header, parse_list_count)
from rmemfs.errors import CorruptionError
from rmemfs.journal import CHECKPOINT, Journal, read_superblock
from rmemfs.regions import META_REGION_ID, RegionRole, RegionSet, parse_region_file_name, region_file_name

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


def test_runs_sorts_entries_as_integers_in_tuple_order() -> None:
    """DirtyList.runs sorts the raw entries (faster, in the flush's atomic section): the same runs as
    merging the decoded tuples, for overlapping, adjacent, repeated and cross-region marks."""
    import random
    rng = random.Random(5)
    t, _ = tracker(capacity=1 << 16)
    for _ in range(3000):
        t.current.extend([(rng.choice((1, 2)), rng.randrange(900), rng.randint(1, 70))], t.region_pages)
    entries = [decode_entry(e) for e in t.current._entries[:t.current.count]]
    assert t.current.runs() == merge_runs(entries)


def test_parse_entries_ordered_is_the_sorted_decoding() -> None:
    """A recovery reads the source's lists with ordered=True (sorted as integers, then decoded) and merges
    them without sorting again: the same runs as sorting the decoded tuples."""
    import random
    rng = random.Random(11)
    words = array("Q", [encode_entry(rng.choice((1, 2, 7)), rng.randrange(5000), rng.randint(1, 300))
                        for _ in range(4000)])
    raw = words.tobytes()
    assert parse_entries(raw, ordered=True) == sorted(parse_entries(raw))
    assert merge_runs(parse_entries(raw, ordered=True), ordered=True) == merge_runs(parse_entries(raw))


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
    assert parse_region_file_name("meta-0001.rgn") == (1, RegionRole.META)
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


def test_contiguous_marks_widen_the_last_entry() -> None:
    t, _ = tracker()
    t.mark(2, 0, 2)
    t.mark(2, 2, 3)            # continues the last run: widened in place
    t.mark(1, 5, 1)
    t.mark(2, 5, 1)            # contiguous with (2, 0, 5) but not the last entry: a new one
    assert t.current.count == 3
    assert t.current.runs() == [(1, 5, 1), (2, 0, 6)]


def test_mark_runs_stores_every_run_and_feeds_the_dedup_map() -> None:
    t, mem = tracker(capacity=8)
    t.mark_runs([(1, 0, 3), (2, 10, 1), (2, (1 << 16) + 5, (1 << 16) + 2)])   # the last run needs two entries
    assert t.current.count == 4
    assert t.current.runs() == [(1, 0, 3), (2, 10, 1), (2, (1 << 16) + 5, (1 << 16) + 2)]
    assert parse_list_count(bytes(mem[list_offset(t.current.index, 8):][:PAGE_SIZE]), 8) == 4
    t.mark(2, 10, 1)                                   # already on the list: no new entry
    assert t.current.count == 4
    with pytest.raises(ListFull):
        t.mark_runs([(1, 100 + 2 * i, 1) for i in range(5)])
    assert t.current.count == 4                        # nothing half-written
    t.mark(1, 100, 1)                                  # and the refused pages are not taken as marked
    assert t.current.count == 5
