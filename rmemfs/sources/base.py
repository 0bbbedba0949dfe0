"""The page-source interface: make runs of pages resident in the regions."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from collections.abc import Callable, Iterator
from typing import Protocol

from ..pagemap import Run

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PageFailure:
    """A page a source could not deliver, and where it tried (a segment name, a host)."""
    region_id: int
    page: int
    where: str
    why: str


class PageSource(Protocol):
    async def make_resident(self, runs: list[Run]) -> list[PageFailure]:
        """Write every page of ``runs`` (region id, first page, count) into the regions.

        Returns the pages that could not be delivered (left as they were); raises only when the
        source is unusable as a whole."""
        ...


class BulkSource(Protocol):
    def stream(self, chunks: Iterator[Run], chunk_pages: int, gate: Callable[[bool], bool],
               done: Callable[[Run, list[PageFailure]], None], lanes: int = 1) -> None:
        """Make every chunk (region id, first page, count of at most ``chunk_pages``) resident, in the order
        ``chunks`` yields them; blocks (a worker thread). Chunks of regions with different ids modulo
        ``lanes`` may be written at once.

        ``gate(wait)`` is called before each chunk is taken; with ``wait`` (only when every chunk taken is in)
        it may block, and False stops the stream; without, False means not yet.
        ``done(chunk, failures)`` follows each chunk: all of it is in but the failed pages."""
        ...


class FallbackSource:
    """Pages ``primary`` cannot deliver are asked of ``fallback`` (a lazy load's baseline, then the failed
    source while it is still reachable); what neither delivers is reported, naming the primary's place."""

    def __init__(self, primary: PageSource, fallback: PageSource | None) -> None:
        self.primary, self.fallback = primary, fallback

    async def make_resident(self, runs: list[Run]) -> list[PageFailure]:
        failures = await self.primary.make_resident(runs)
        if not failures or self.fallback is None:
            return failures
        try:
            again = await self.fallback.make_resident([(f.region_id, f.page, 1) for f in failures])
        except OSError as e:        # the fallback is gone: the primary's failures stand
            log.info("fallback page source unusable: %s", e)
            return failures
        still = {(f.region_id, f.page) for f in again}
        return [f for f in failures if (f.region_id, f.page) in still]
