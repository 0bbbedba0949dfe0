"""The page-source interface: make runs of pages resident in the regions."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class PageFailure:
    """A page a source could not deliver, and where it tried (a segment name, a host)."""
    region_id: int
    page: int
    where: str
    why: str


class PageSource(Protocol):
    async def make_resident(self, runs: list[tuple[int, int, int]]) -> list[PageFailure]:
        """Write every page of ``runs`` (region id, first page, count) into the regions.

        Returns the pages that could not be delivered (left as they were); raises only when the
        source is unusable as a whole."""
        ...
