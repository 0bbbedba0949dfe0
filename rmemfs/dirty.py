"""The two dirty page lists and the heartbeat, kept in the exported ctl region.

Layout of ``ctl-0000.rgn`` (little endian; version 1). Recovery on another host
reads it byte for byte over RDMA, so it only changes with ``CTL_VERSION``::

    page 0, as u64 words:
      [0] magic b"RMEMCTL1"      [1] version | page_size << 32
      [2..3] fsid (16 bytes)     [4] epoch (owner generation of the backend)
      [5] state = swap_seq << 1 | active list index
      [6] heartbeat counter      [7] heartbeat wall time, ns
      [8] capacity (entries per list)            [9] pid of the filesystem process
      [10] clean generation: the baseline generation published at a clean
           unmount (0 while mounted), so a remount can trust these regions
      [11] heartbeat interval in microseconds, so a failover host knows how
           long a silent heartbeat must stay silent before the owner counts as dead
      [12] fence: 0, or the epoch of a new owner that fenced this filesystem
           (written by the exporter for ``rmemfs-recover``; see ``fencing``).
           Layouts written before this word existed hold 0 there (page 0 is
           zero-filled), so they still read as version 1, unfenced.
    list i (i = 0, 1) at PAGE_SIZE + i * list_bytes(capacity):
      header page as u64 words: [0] magic b"RMEMDL01", [1] count
      then ``capacity`` u64 entries: region_id << 48 | first_page << 16 | (npages - 1)

The active list (state & 1) collects new marks. The other list, when its count
is non-zero, holds the pages of a flush in progress (or one that failed) and is
cleared only after that flush's baseline is durable and published. Recovery
applies the flushing list first and the active list last.

Ordering that keeps every mark: an entry is written before ``count`` covers it,
and a page is marked before the data is copied into it, so a crash anywhere
leaves a superset of the modified pages. Within one list, pages already marked
are skipped using an in-process byte map (one byte per page).
"""
from __future__ import annotations

import logging
import struct
import sys
import time
import uuid
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from collections.abc import Iterable, Iterator

from . import PAGE_SIZE
from .errors import CorruptionError
from .pagemap import PageMaps, Run
from .regions import CTL_REGION_ID, region_file_name

log = logging.getLogger(__name__)

CTL_MAGIC = b"RMEMCTL1"
LIST_MAGIC = b"RMEMDL01"
CTL_VERSION = 1
MAX_RUN_PAGES = 1 << 16
_ONES = b"\x01" * MAX_RUN_PAGES

W_MAGIC, W_VERSION, W_FSID0, W_FSID1, W_EPOCH, W_STATE, W_HEARTBEAT, W_HEARTBEAT_NS, \
    W_CAPACITY, W_PID, W_CLEAN_GEN, W_HEARTBEAT_INTERVAL_US, W_FENCE = range(13)
HEADER_WORDS = 13
L_MAGIC, L_COUNT = 0, 1


def list_bytes(capacity: int) -> int:
    return PAGE_SIZE + -(-capacity * 8 // PAGE_SIZE) * PAGE_SIZE


def ctl_region_size(capacity: int) -> int:
    return PAGE_SIZE + 2 * list_bytes(capacity)


def encode_entry(region_id: int, first_page: int, npages: int) -> int:
    return region_id << 48 | first_page << 16 | (npages - 1)


def decode_entry(entry: int) -> Run:
    return entry >> 48, (entry >> 16) & 0xFFFFFFFF, (entry & 0xFFFF) + 1


@dataclass(frozen=True)
class CtlHeader:
    fsid: str
    epoch: int
    swap_seq: int
    active: int
    heartbeat: int
    heartbeat_ns: int
    capacity: int
    pid: int
    clean_generation: int
    heartbeat_interval_us: int
    fence: int = 0

    @property
    def flushing(self) -> int:
        return 1 - self.active


def parse_header(page: bytes | bytearray | memoryview) -> CtlHeader:
    words = struct.unpack_from(f"<{HEADER_WORDS}Q", page)
    if struct.pack("<Q", words[W_MAGIC]) != CTL_MAGIC:
        raise CorruptionError("ctl region: bad magic (not an rmemfs dirty-list region)")
    version = words[W_VERSION] & 0xFFFFFFFF
    if version != CTL_VERSION or words[W_VERSION] >> 32 != PAGE_SIZE:
        raise CorruptionError(f"ctl region: unsupported version {version} / page size {words[W_VERSION] >> 32}")
    fsid = str(uuid.UUID(bytes=struct.pack("<QQ", words[W_FSID0], words[W_FSID1])))
    return CtlHeader(fsid, words[W_EPOCH], words[W_STATE] >> 1, words[W_STATE] & 1, words[W_HEARTBEAT],
                     words[W_HEARTBEAT_NS], words[W_CAPACITY], words[W_PID], words[W_CLEAN_GEN],
                     words[W_HEARTBEAT_INTERVAL_US], words[W_FENCE])


def list_offset(index: int, capacity: int) -> int:
    return PAGE_SIZE + index * list_bytes(capacity)


def parse_list_count(header_page: bytes | bytearray | memoryview, capacity: int) -> int:
    magic, count = struct.unpack_from("<8sQ", header_page)
    if magic != LIST_MAGIC:
        raise CorruptionError("dirty list: bad magic")
    if count > capacity:
        raise CorruptionError(f"dirty list: count {count} exceeds capacity {capacity}")
    return count


def read_ctl_header(region_dir: Path) -> CtlHeader:
    """The header of the ctl region file in ``region_dir`` (raises OSError or CorruptionError)."""
    with open(region_dir / region_file_name(CTL_REGION_ID), "rb") as f:
        return parse_header(f.read(PAGE_SIZE))


def parse_entries(raw: bytes | bytearray | memoryview, *, ordered: bool = False) -> list[Run]:
    """Stored entries (little-endian words) as (region id, first page, npages); decode_entry, inlined.

    ``ordered``: sorted, as ``merge_runs`` wants them. The words are sorted before they are decoded (their
    bits are region, first page, npages - 1, high to low: the same order), several times faster than
    sorting the tuples (see ``DirtyList.runs``)."""
    words = array("Q", bytes(raw))
    if sys.byteorder != "little":
        words.byteswap()
    return [(e >> 48, (e >> 16) & 0xFFFFFFFF, (e & 0xFFFF) + 1) for e in (sorted(words) if ordered else words)]


class PagePreserver(Protocol):
    """Called before pages change; the flusher's copy-on-write snapshot implements it."""

    def preserve(self, region_id: int, first_page: int, npages: int) -> None: ...


class DirtyList:
    """One exported list plus its in-process dedup map."""

    def __init__(self, index: int, view: memoryview, capacity: int) -> None:
        self.index = index
        self.capacity = capacity
        self._header = view[:PAGE_SIZE].cast("Q")
        self._entries = view[PAGE_SIZE:PAGE_SIZE + capacity * 8].cast("Q")
        self._seen = PageMaps()      # the pages this list names
        # Entries already in the exported list when this process took it over (a restart on the same
        # host) are not in the dedup map: until the list is cleared, only its entries name every page.
        self._adopted = self._header[L_COUNT] > 0

    @property
    def count(self) -> int:
        return self._header[L_COUNT]

    def pages_named(self) -> PageMaps | None:
        """A copy of the pages this list names (one byte per page), or None when its dedup map does not
        know them all (entries adopted from an earlier process): what ``runs`` covers, in a memory copy
        instead of a sort of the entries."""
        return None if self._adopted else self._seen.copy()

    def room(self) -> int:
        return self.capacity - self._header[L_COUNT]

    def format(self) -> None:
        self._header[L_MAGIC] = struct.unpack("<Q", LIST_MAGIC)[0]
        self._header[L_COUNT] = 0
        self._seen.clear()
        self._adopted = False

    def add(self, region_id: int, first_page: int, npages: int, region_pages: int) -> None:
        seen = self._seen.get(region_id) or self._seen.map(region_id, region_pages)
        end = first_page + npages
        if (seen[first_page] if npages == 1 else seen.find(0, first_page, end) < 0):   # all marked already
            return
        self.append_run(region_id, first_page, npages)
        seen[first_page:end] = _ONES[:npages] if npages <= MAX_RUN_PAGES else b"\x01" * npages

    def covers(self, region_id: int, first_page: int, npages: int) -> bool:
        """Whether every page of the run is already on this list."""
        return self._seen.all_marked(region_id, first_page, npages)

    def append_run(self, region_id: int, first_page: int, npages: int) -> None:
        """Append entries for a run without consulting the dedup map."""
        count = self._header[L_COUNT]
        if count:
            # A run that continues the last entry widens it in place: one aligned 8-byte
            # store, and the new value covers a superset of the old, so no crash loses a mark.
            last = self._entries[count - 1]          # decode_entry, inlined: this runs once per new page
            last_n = (last & 0xFFFF) + 1
            if (last >> 48 == region_id and (last >> 16 & 0xFFFFFFFF) + last_n == first_page
                    and last_n + npages <= MAX_RUN_PAGES):
                self._entries[count - 1] = last + npages      # the same first page, npages - 1 grown
                return
        if count + -(-npages // MAX_RUN_PAGES) > self.capacity:
            raise ListFull(f"dirty list {self.index} is full ({self.capacity} entries)")
        page, end = first_page, first_page + npages
        while page < end:
            n = min(MAX_RUN_PAGES, end - page)
            self._entries[count] = encode_entry(region_id, page, n)
            count += 1
            # Publish the count only after the entry it covers is in place.
            self._header[L_COUNT] = count
            page += n

    def extend(self, runs: list[Run], region_pages: dict[int, int]) -> None:
        """Append many runs at once (a recovery marking every page it fetched): the entries are stored
        in one slice, then the count that covers them, then the dedup map learns of them."""
        entries = array("Q", [region_id << 48 | first << 16 | (n - 1) for region_id, first, n in runs
                              if n <= MAX_RUN_PAGES])            # encode_entry, inlined: one entry per run
        for region_id, first, n in runs:
            if n > MAX_RUN_PAGES:
                entries.extend(encode_entry(region_id, page, min(MAX_RUN_PAGES, first + n - page))
                               for page in range(first, first + n, MAX_RUN_PAGES))
        count = self._header[L_COUNT]
        if count + len(entries) > self.capacity:
            raise ListFull(f"dirty list {self.index} is full ({self.capacity} entries)")
        self._entries[count:count + len(entries)] = memoryview(entries)
        self._header[L_COUNT] = count + len(entries)
        for region_id, first, n in runs:
            self._seen.mark(region_id, first, n, region_pages[region_id])

    def region_grew(self, region_id: int, pages: int) -> None:
        self._seen.grow(region_id, pages)

    def runs(self) -> list[Run]:
        """The marked runs, merged and sorted: (region_id, first_page, npages)."""
        # An entry's bits are region, first page, npages - 1, high to low: the integers sort in the order of
        # their decoded tuples. Sorting them first, in C, is several times faster than sorting tuples, and
        # this runs in the flush's atomic section (20,000 scattered entries: 108 ms on the loop before).
        return _merge_sorted(decode_entry(e) for e in sorted(self._entries[:self.count].tolist()))

    def pages(self) -> int:
        return sum(n for _, _, n in self.runs())

    def clear(self) -> None:
        self._header[L_COUNT] = 0
        self._seen.clear()
        self._adopted = False


def merge_runs(runs: Iterator[Run] | list[Run], *, ordered: bool = False) -> list[Run]:
    """Overlapping and adjacent runs merged, in order; ``ordered``: ``runs`` are sorted already."""
    return _merge_sorted(runs if ordered else sorted(runs))


def _merge_sorted(runs: Iterable[Run]) -> list[Run]:
    out: list[Run] = []
    for region_id, first, n in runs:
        if out and out[-1][0] == region_id and first <= out[-1][1] + out[-1][2]:
            r, f, m = out[-1]
            out[-1] = (r, f, max(f + m, first + n) - f)
        else:
            out.append((region_id, first, n))
    return out


class ListFull(Exception):
    """The active list cannot take another entry; a flush must run first."""


class DirtyTracker:
    """Marks pages dirty in the active list; swaps lists for a flush; keeps the heartbeat."""

    def __init__(self, view: memoryview, capacity: int) -> None:
        self._view = view
        self._hdr = view[:PAGE_SIZE].cast("Q")
        self.capacity = capacity
        self.lists = [DirtyList(i, view[list_offset(i, capacity):list_offset(i, capacity) + list_bytes(capacity)],
                                capacity) for i in range(2)]
        self.region_pages: dict[int, int] = {}
        self.enabled = True
        self.preserver: PagePreserver | None = None

    # --- format ------------------------------------------------------------
    def format(self, fsid: str, epoch: int, pid: int) -> None:
        """Initialise a fresh ctl region (both lists empty)."""
        hdr = self._hdr
        hdr[W_MAGIC] = struct.unpack("<Q", CTL_MAGIC)[0]
        hdr[W_VERSION] = CTL_VERSION | PAGE_SIZE << 32
        hdr[W_FSID0], hdr[W_FSID1] = struct.unpack("<QQ", uuid.UUID(fsid).bytes)
        hdr[W_STATE] = 0
        hdr[W_CAPACITY] = self.capacity
        for lst in self.lists:
            lst.format()
        self.take_ownership(epoch, pid)

    def take_ownership(self, epoch: int, pid: int) -> None:
        self._hdr[W_EPOCH] = epoch
        self._hdr[W_PID] = pid
        self._hdr[W_CLEAN_GEN] = 0
        self._hdr[W_FENCE] = 0

    def set_pid(self, pid: int) -> None:
        """The serving process's pid (a daemon serves from a child forked after the load): what the
        exporter watches for a standby (``liveness``)."""
        self._hdr[W_PID] = pid

    @property
    def fence(self) -> int:
        """The fence word: 0 while this process owns the filesystem, else the new owner's epoch."""
        return self._hdr[W_FENCE]

    def header(self) -> CtlHeader:
        return parse_header(self._view[:PAGE_SIZE])

    def set_clean_generation(self, generation: int) -> None:
        self._hdr[W_CLEAN_GEN] = generation

    def set_heartbeat_interval(self, seconds: float) -> None:
        self._hdr[W_HEARTBEAT_INTERVAL_US] = int(seconds * 1e6)

    def beat(self) -> None:
        self._hdr[W_HEARTBEAT] += 1
        self._hdr[W_HEARTBEAT_NS] = time.time_ns()

    # --- marking -------------------------------------------------------------
    @property
    def current(self) -> DirtyList:
        return self.lists[self._hdr[W_STATE] & 1]

    @property
    def flushing(self) -> DirtyList:
        return self.lists[1 - (self._hdr[W_STATE] & 1)]

    def region_grew(self, region_id: int, pages: int) -> None:
        """A region now has ``pages`` pages (the dedup maps are one byte per page)."""
        self.region_pages[region_id] = pages
        for lst in self.lists:
            lst.region_grew(region_id, pages)

    def mark(self, region_id: int, first_page: int, npages: int) -> None:
        """Record pages about to change. Call before writing them."""
        if self.preserver is not None:
            self.preserver.preserve(region_id, first_page, npages)
        if self.enabled:     # self.current, inlined: once per write and per journal record
            self.lists[self._hdr[W_STATE] & 1].add(region_id, first_page, npages, self.region_pages[region_id])

    def mark_runs(self, runs: list[Run]) -> None:
        """``mark`` for many disjoint runs at once."""
        if self.preserver is not None:
            for region_id, first_page, npages in runs:
                self.preserver.preserve(region_id, first_page, npages)
        if self.enabled:
            self.current.extend(runs, self.region_pages)

    def mark_bytes(self, region_id: int, offset: int, length: int) -> None:
        first = offset // PAGE_SIZE
        self.mark(region_id, first, (offset + length - 1) // PAGE_SIZE - first + 1)

    def swap(self) -> DirtyList:
        """Make the (empty) other list current; return the one to flush.

        Runs without an await, so it is atomic with respect to the trio scheduler:
        every mark lands on exactly one side of the swap.
        """
        if self.flushing.count:
            raise RuntimeError("swap while the flushing list still holds marks")
        state = self._hdr[W_STATE]
        self._hdr[W_STATE] = ((state >> 1) + 1) << 1 | (1 - (state & 1))
        return self.flushing

    def fold_current_into_flushing(self) -> DirtyList:
        """After a failed flush: move new marks onto the flushing list so the retry snapshots both.

        Runs whose pages the flushing list already names are skipped (its dedup map knows them): a
        writer that rewrites the same pages through a long backend outage must not grow the list at
        every retry. Entries are copied before the current list is cleared, so a crash in between only
        duplicates marks. Raises ListFull if the new runs do not fit (nothing is folded then).
        """
        src, dst = self.current, self.flushing
        runs = [run for run in src.runs() if not dst.covers(*run)]
        need = sum(-(-n // MAX_RUN_PAGES) for _, _, n in runs)
        if need > dst.room():
            raise ListFull("cannot fold the current dirty list into the flushing one: not enough room")
        for region_id, first, n in runs:
            dst.add(region_id, first, n, self.region_pages[region_id])
        src.clear()
        return dst
