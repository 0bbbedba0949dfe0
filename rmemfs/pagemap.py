"""Runs of pages and per-region page maps: the one vocabulary for "which pages of which region".

A ``Run`` is ``(region id, first page, page count)``: what a dirty-list entry names, what a
fetch or a load asks for, what a page source makes resident. It is a plain tuple on purpose:
runs are made by the hundred thousand (a dirty list holds up to 2**27 entries) and unpacked
in hot loops, where a class would cost a constructor call each.

A ``PageMaps`` is region id → one byte per page (1 = marked), created per region on first use.
It serves the dirty lists' dedup, the flush snapshot, the load plan's coverage, the fetch
plan's dedup, the lazy residency and in-flight maps, and the live map. ``set_runs`` and
``unset_runs`` are the two scanners of such a map (also used for one-byte-per-extent maps).
"""
from __future__ import annotations

from collections.abc import Iterator

Run = tuple[int, int, int]
"""(region id, first page, page count)"""

_ONES = b"\x01" * 65536      # marks for runs up to a dirty-list entry's length, without a new bytes each


def set_runs(m: bytes | bytearray, first: int, end: int) -> Iterator[tuple[int, int]]:
    """The [a, b) runs of one bytes of a 0/1 map within [first, end) (the map's end ends the scan)."""
    end = min(end, len(m))
    pos = first
    while pos < end:
        a = m.find(1, pos, end)
        if a < 0:
            return
        b = m.find(0, a, end)
        b = end if b < 0 else b
        yield a, b
        pos = b


def unset_runs(m: bytes | bytearray, first: int, end: int) -> Iterator[tuple[int, int]]:
    """The [a, b) runs of zero bytes of a 0/1 map within [first, end); pages beyond the map's end count
    as zero (an absent or short map marks nothing there)."""
    pos = first
    for a, b in set_runs(m, first, end):
        if a > pos:
            yield pos, a
        pos = b
    if pos < end:
        yield pos, end


class PageMaps(dict[int, bytearray]):
    """Region id → one byte per page (1 = marked). A region's map is ``region_pages`` long, all zeros,
    when first marked; reading an absent region (``get``) finds nothing marked."""

    __slots__ = ()

    def map(self, region_id: int, region_pages: int) -> bytearray:
        """The region's map, created (all zeros) on first use."""
        m = self.get(region_id)
        if m is None:
            m = self[region_id] = bytearray(region_pages)
        return m

    def mark(self, region_id: int, first: int, npages: int, region_pages: int) -> None:
        """Mark pages first..first+npages-1."""
        self.map(region_id, region_pages)[first:first + npages] = _ONES[:npages] if npages <= len(_ONES) \
            else b"\x01" * npages

    def grow(self, region_id: int, region_pages: int) -> None:
        """The region now has ``region_pages`` pages: its map, if it has one, is extended (unmarked)."""
        m = self.get(region_id)
        if m is not None and len(m) < region_pages:
            m.extend(bytes(region_pages - len(m)))

    def all_marked(self, region_id: int, first: int, npages: int) -> bool:
        """Whether every page of the run is marked."""
        m = self.get(region_id)
        return m is not None and first + npages <= len(m) and m.find(0, first, first + npages) < 0

    def claim(self, region_id: int, first: int, npages: int, region_pages: int) -> list[Run]:
        """The parts of the run not marked yet (within the region), in order, now marked."""
        m = self.map(region_id, region_pages)
        end = min(first + npages, len(m))
        if first < end and m.find(1, first, end) < 0:
            # Nothing of it marked (the common case: a dirty list's runs are disjoint): one C-level scan,
            # no generator. A recovery claims each of up to 2**27 runs once (20,000 at 8 GiB, 1 %).
            m[first:end] = _ONES[:end - first] if end - first <= len(_ONES) else b"\x01" * (end - first)
            return [(region_id, first, end - first)]
        out = [(region_id, a, b - a) for a, b in unset_runs(m, first, end)]
        for _, a, n in out:        # marking [a, a+n) does not move the scan: it is done
            m[a:a + n] = b"\x01" * n
        return out

    def runs(self) -> list[Run]:
        """Every marked run, by region id, then page."""
        return [(region_id, a, b - a) for region_id, m in sorted(self.items()) for a, b in set_runs(m, 0, len(m))]

    def copy(self) -> PageMaps:
        return PageMaps({region_id: bytearray(m) for region_id, m in self.items()})
