"""Which pages the published baseline holds with non-zero content: one byte per page, per region."""
from __future__ import annotations

from ..pagemap import PageMaps, Run


class LiveMap:
    """Which pages the published baseline holds with non-zero content (one byte per page)."""

    def __init__(self) -> None:
        self.maps = PageMaps()      # grown as pages are set: a baseline does not say how long a region is
        self.count = 0

    def copy(self) -> LiveMap:
        other = LiveMap()
        other.maps = self.maps.copy()
        other.count = self.count
        return other

    def set(self, region_id: int, page: int, live: bool) -> None:
        m = self.maps.get(region_id)
        if m is None:
            m = self.maps[region_id] = bytearray()
        if page >= len(m):
            if not live:
                return
            m.extend(bytes(page + 1 - len(m) + 4096))
        if m[page] != live:
            m[page] = live
            self.count += 1 if live else -1

    def set_range(self, region_id: int, first: int, npages: int) -> None:
        """Mark pages first..first+npages-1 live; the same as ``set(region_id, page, True)`` for each."""
        if npages <= 0:
            return
        m = self.maps.get(region_id)
        if m is None:
            m = self.maps[region_id] = bytearray()
        end = first + npages
        if end > len(m):
            m.extend(bytes(end - len(m) + 4096))
        self.count += npages - m.count(1, first, end)
        m[first:end] = b"\x01" * npages

    def runs(self) -> list[Run]:
        return self.maps.runs()
