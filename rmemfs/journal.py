"""The namespace journal, kept in the exported meta region.

Every namespace change is one record, so a crash in the middle of an operation
shows it entirely or not at all: a record is valid only when its checksum
matches and its LSN is the next one expected, and replay stops at the first
record that is not.

Layout of ``meta-0001.rgn`` (little endian; version 1)::

    page 0, page 1   superblock slots, written alternately:
        <8s magic "RMEMSB01", I version, I page_size, 16s fsid, Q seq,
         Q area_offset, Q area_length, Q start_lsn, Q xxh3 of the preceding bytes>
    area 0           [2 pages, half the region)
    area 1           [half the region, end)

The active area (named by the valid superblock with the highest seq) begins
with a CHECKPOINT record (the whole namespace) and continues with operation
records. Each record: <Q lsn, I payload length, H type, H 0, Q xxh3 of the
first 16 header bytes + payload>, the payload, zero padding to 8 bytes.
When the area fills, or the log outgrows its checkpoint, a new checkpoint is
written to the other area and the superblock switched to it; only then is the
old area released.

Every byte written here is marked dirty first (``DirtyTracker.mark``).
"""
from __future__ import annotations

import logging
import struct
import uuid
from dataclasses import dataclass
from collections.abc import Callable, Iterator

import xxhash

from . import PAGE_SIZE
from .dirty import DirtyTracker
from .errors import CorruptionError, FsError
from .regions import META_REGION_ID, Region

log = logging.getLogger(__name__)

SB_MAGIC = b"RMEMSB01"
JOURNAL_VERSION = 1
_SB = struct.Struct("<8sII16sQQQQ")
_REC = struct.Struct("<QIHH")
REC_HEADER = _REC.size + 8
_REC_SUM = struct.Struct("<QIHHQ")      # the header and its checksum
CHECKPOINT = 1
_PADS = [b"\0" * i for i in range(8)]
_digest = xxhash.xxh3_64_intdigest
MIN_LOG_BEFORE_COMPACTION = 8 << 20


def _xxh(*parts: bytes | memoryview) -> int:
    h = xxhash.xxh3_64()
    for p in parts:
        h.update(p)
    return h.intdigest()


@dataclass(frozen=True)
class Superblock:
    slot: int
    seq: int
    fsid: str
    area_offset: int
    area_length: int
    start_lsn: int


def read_superblock(view: memoryview) -> Superblock:
    """The valid superblock with the highest sequence number."""
    best: Superblock | None = None
    for slot in (0, 1):
        raw = bytes(view[slot * PAGE_SIZE:slot * PAGE_SIZE + _SB.size + 8])
        magic, version, page_size, fsid, seq, off, length, lsn = _SB.unpack_from(raw)
        (csum,) = struct.unpack_from("<Q", raw, _SB.size)
        if magic != SB_MAGIC or csum != _xxh(raw[:_SB.size]):
            continue
        if version != JOURNAL_VERSION or page_size != PAGE_SIZE:
            raise CorruptionError(f"journal: unsupported version {version}")
        sb = Superblock(slot, seq, str(uuid.UUID(bytes=fsid)), off, length, lsn)
        if best is None or sb.seq > best.seq:
            best = sb
    if best is None:
        raise CorruptionError("journal: no valid superblock in the meta region")
    return best


def iter_records(view: memoryview, sb: Superblock) -> Iterator[tuple[int, int, memoryview]]:
    """Yield (lsn, type, payload) of the valid prefix of the active area."""
    pos, end, lsn = sb.area_offset, sb.area_offset + sb.area_length, sb.start_lsn
    unpack, digest, join = _REC_SUM.unpack_from, xxhash.xxh3_64_intdigest, b"".join   # the replay's hot loop
    while pos + REC_HEADER <= end:
        rec_lsn, length, rtype, _, csum = unpack(view, pos)
        if rec_lsn != lsn or pos + REC_HEADER + length > end:
            return
        payload = view[pos + REC_HEADER:pos + REC_HEADER + length]
        if csum != digest(join((view[pos:pos + _REC.size], payload))):     # = _xxh(header, payload)
            return
        yield lsn, rtype, payload
        pos += REC_HEADER + (length + 7) // 8 * 8
        lsn += 1


class JournalFull(Exception):
    """The active area has no room for the record; checkpoint first."""


# Room kept in each area beyond the largest checkpoint the namespace may grow to: the records that
# shrink it (unlink, rmdir, truncate) and their checkpoints always fit, so a full journal never
# stops a delete.
RESERVE_FRACTION = 8
MIN_RESERVE = 16 << 10
# Memory is allocated (fallocate) ahead of the write position in steps of BACK_STEP, before anything is
# written through the mapping (a store into a hole of a full tmpfs is a SIGBUS). A record that grows the
# namespace needs BACK_RESERVE allocated beyond it, so deletes still fit once the tmpfs is full.
BACK_STEP = 256 << 10
BACK_RESERVE = 64 << 10


class Journal:
    """Appends records to the active area and switches areas at checkpoints."""

    def __init__(self, region: Region, tracker: DirtyTracker) -> None:
        self.region = region
        self.view = region.view
        self.tracker = tracker
        self._layout()
        self.sb: Superblock | None = None
        self.pos = 0
        self.next_lsn = 1
        self.checkpoint_bytes = 0
        # An upper bound on the size of a checkpoint written now: the last one plus what the records
        # since can have added (``namespace.snapshot_growth``); exact right after a checkpoint.
        self.snapshot_bound = 0
        self.growth_since_checkpoint = 0
        self.backed = {off: off for off, _ in self.areas}      # area offset -> end of its allocated prefix
        region.allocate(0, 2 * PAGE_SIZE)                      # the superblock slots

    def _layout(self) -> None:
        """The two areas of the region as it is now, and the checkpoint limit they imply."""
        length = self.region.length
        half = length // 2 // PAGE_SIZE * PAGE_SIZE
        self.areas = [(2 * PAGE_SIZE, half - 2 * PAGE_SIZE), (half, length - half)]
        smaller_area = min(n for _, n in self.areas)
        self.checkpoint_limit = smaller_area - max(MIN_RESERVE, smaller_area // RESERVE_FRACTION)

    def region_grew(self, fsid: str, snapshot: Callable[[], bytes]) -> None:
        """The meta region was made longer (``-o meta_size`` at a mount): take the new layout of areas.

        The active area is an area of the old layout. It moves by ordinary checkpoints, so a crash
        between any two steps leaves a valid journal: straight into the new second area when the old
        first area is active (the new second area begins beyond everything the old layout used), or,
        when the old second area is active (the new first area covers it), first into the space before
        it and from there into the new second area.
        """
        assert self.sb is not None
        self.view = self.region.view
        self._layout()
        first, second = self.areas
        self.backed.setdefault(second[0], second[0])
        if self.sb.area_offset != first[0]:
            self.checkpoint(fsid, snapshot(), area=(first[0], self.sb.area_offset - first[0]))
        self.checkpoint(fsid, snapshot(), area=second)
        self.backed = {off: self.backed.get(off, off) for off, _ in self.areas}

    # --- writing -----------------------------------------------------------
    def _back(self, pos: int, end: int, reserve: int = 0) -> None:
        """Allocate the area's memory up to ``end`` (and ``reserve`` beyond) before it is written;
        raises FsError(ENOSPC) when the region tmpfs has no room for what is needed."""
        if pos < 2 * PAGE_SIZE:
            return
        area, length = self.areas[0] if pos < self.areas[1][0] else self.areas[1]
        have, limit = self.backed[area], area + length
        if end + reserve <= have:
            return
        want = min(limit, -(-(end + reserve + BACK_STEP) // PAGE_SIZE) * PAGE_SIZE)
        try:
            self.region.allocate(have, want - have)
            self.backed[area] = want
            return
        except OSError:
            pass
        need = min(limit, -(-(end + reserve) // PAGE_SIZE) * PAGE_SIZE)
        try:
            if need > have:
                self.region.allocate(have, need - have)
                self.backed[area] = need
        except OSError as e:
            raise FsError(28, f"the region directory is full: no memory for the namespace journal ({e})") from None

    def _write(self, pos: int, data: bytes | memoryview, reserve: int = 0) -> None:
        self._back(pos, pos + len(data), reserve)
        self.tracker.mark_bytes(META_REGION_ID, pos, len(data))
        self.view[pos:pos + len(data)] = data

    def _encode(self, lsn: int, rtype: int, payload: bytes) -> bytes:
        n = len(payload)
        head = _REC.pack(lsn, n, rtype, 0)
        # One digest call over the joined bytes (= _xxh(head, payload)): a record per extending write
        # makes this a hot path (issue 14).
        csum = _digest(head + payload) if n <= 4096 else _xxh(head, payload)    # no copy of a checkpoint
        return _REC_SUM.pack(lsn, n, rtype, 0, csum) + payload + _PADS[-n % 8]

    def append(self, rtype: int, payload: bytes, growing: bool = False) -> None:
        # _write inlined, and _back called only when the allocated prefix ends too soon: every namespace
        # change and every write past a file's end runs this (issue 14).
        sb = self.sb
        assert sb is not None
        pos, lsn = self.pos, self.next_lsn
        rec = self._encode(lsn, rtype, payload)
        end = pos + len(rec)
        if end > sb.area_offset + sb.area_length:
            raise JournalFull()
        reserve = BACK_RESERVE if growing else 0
        if end + reserve > self.backed.get(sb.area_offset, 0):
            self._back(pos, end, reserve)
        first = pos // PAGE_SIZE
        self.tracker.mark(META_REGION_ID, first, (end - 1) // PAGE_SIZE - first + 1)
        self.view[pos:end] = rec
        self.pos = end
        self.next_lsn = lsn + 1

    def room_for_growth(self, growth: int) -> bool:
        """Whether a record that grows the namespace by up to ``growth`` bytes keeps the next checkpoint
        within its limit (the reserve stays free for deletes)."""
        return self.snapshot_bound + growth <= self.checkpoint_limit

    def grew(self, growth: int) -> None:
        self.snapshot_bound += growth
        self.growth_since_checkpoint += growth

    def used_bytes(self) -> int:
        return 0 if self.sb is None else self.pos - self.sb.area_offset

    def wants_checkpoint(self) -> bool:
        log_bytes = self.used_bytes() - self.checkpoint_bytes
        return log_bytes > max(MIN_LOG_BEFORE_COMPACTION, 4 * self.checkpoint_bytes)

    def checkpoint(self, fsid: str, snapshot: bytes, area: tuple[int, int] | None = None) -> None:
        """Write the namespace snapshot to the other area (or ``area``: offset, length), then switch to it."""
        old_end = self.pos
        new_index = 0 if self.sb is None or self.sb.area_offset != self.areas[0][0] else 1
        off, length = area or self.areas[new_index]
        rec = self._encode(self.next_lsn, CHECKPOINT, snapshot)
        if len(rec) > length:
            raise FsError(28, "namespace checkpoint does not fit the meta region")
        self._write(off, rec)
        old = self.sb
        seq = 1 if old is None else old.seq + 1
        slot = 0 if old is None else 1 - old.slot
        sb_raw = _SB.pack(SB_MAGIC, JOURNAL_VERSION, PAGE_SIZE, uuid.UUID(fsid).bytes, seq, off, length,
                          self.next_lsn)
        self._write(slot * PAGE_SIZE, sb_raw + struct.pack("<Q", _xxh(sb_raw)))
        self.sb = Superblock(slot, seq, fsid, off, length, self.next_lsn)
        self.pos = off + len(rec)
        self.next_lsn += 1
        self.checkpoint_bytes = self.snapshot_bound = len(rec)
        self.growth_since_checkpoint = 0
        if old is not None:
            # The old area is dead once the new superblock is in place; give its memory back.
            used_end = min(old.area_offset + old.area_length, -(-old_end // PAGE_SIZE) * PAGE_SIZE)
            if used_end > old.area_offset:
                self.tracker.mark_bytes(META_REGION_ID, old.area_offset, used_end - old.area_offset)
                self.region.release(old.area_offset, used_end - old.area_offset)
            self.backed[old.area_offset] = old.area_offset

    # --- reading -------------------------------------------------------------
    def open(self) -> Iterator[tuple[int, memoryview]]:
        """Find the active area and yield its records (type, payload); then ready to append."""
        self.sb = read_superblock(self.view)
        first = True
        self.pos = self.sb.area_offset
        self.next_lsn = self.sb.start_lsn
        for lsn, rtype, payload in iter_records(self.view, self.sb):
            if first:
                if rtype != CHECKPOINT:
                    raise CorruptionError("journal: active area does not start with a checkpoint")
                self.checkpoint_bytes = REC_HEADER + (len(payload) + 7) // 8 * 8
                self.snapshot_bound = self.checkpoint_bytes
                first = False
            yield rtype, payload
            self.pos += REC_HEADER + (len(payload) + 7) // 8 * 8
            self.next_lsn = lsn + 1
        if first:
            raise CorruptionError("journal: active area has no valid checkpoint")
