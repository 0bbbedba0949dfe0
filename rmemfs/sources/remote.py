"""Reading the failed host's memory over a transport (its exporter): ``read_source_header`` (its ctl
header: heartbeat, lists, fence; for recovery's liveness check and the standby's watch), ``read_exact``,
and ``RemoteSource``, the page source of its regions.

Pages come through one registered bounce buffer (a verbs transport registers only it) and are
written into the regions from a worker thread. A transport failure fails the pages asked for,
naming the source; it is not raised, so a caller falls back or fails just those requests. ``broken``
says the connection itself failed (not just a read refused), so a caller can make a new one.
"""
from __future__ import annotations

import logging
import mmap

import trio

from .. import PAGE_SIZE
from ..dirty import CtlHeader, parse_header
from ..loader import RegionWriter
from ..regions import CTL_REGION_ID
from ..transport.base import Catalog, Connection, ReadOp, RegionDesc, RemoteAccessError, TransportError
from ..pagemap import Run
from .base import PageFailure

log = logging.getLogger(__name__)

BUFFER_BYTES = 4 << 20
MAX_READ_PAGES = 256


async def read_exact(conn: Connection, desc: RegionDesc, offset: int, length: int) -> bytearray:
    """``length`` bytes at ``offset`` of the region ``desc``, read into a new registered buffer."""
    buf = bytearray(length)
    conn.register_local(memoryview(buf))
    await conn.read(desc.rkey, offset, memoryview(buf))
    return buf


async def read_source_header(conn: Connection, catalog: Catalog) -> CtlHeader:
    """The source's ctl header, read from its memory (raises TransportError or CorruptionError)."""
    return parse_header(await read_exact(conn, catalog.by_id(CTL_REGION_ID), 0, PAGE_SIZE))


class RemoteSource:
    def __init__(self, conn: Connection, catalog: Catalog, write: RegionWriter, where: str) -> None:
        self.conn, self.write, self.where = conn, write, where
        self._rkeys = {desc.region_id: desc.rkey for desc in catalog.regions}
        self._buf = memoryview(mmap.mmap(-1, BUFFER_BYTES))
        conn.register_local(self._buf)
        self._lock = trio.Lock()                  # one bounce buffer: one batch at a time
        self.bytes_read = 0
        self.broken: str | None = None            # why the connection failed (not just a read refused)

    async def make_resident(self, runs: list[Run]) -> list[PageFailure]:
        pieces = [(rid, p, min(MAX_READ_PAGES, first + n - p)) for rid, first, n in runs
                  for p in range(first, first + n, MAX_READ_PAGES)]
        failed: list[PageFailure] = []
        async with self._lock:
            while pieces:
                batch, at = [], 0
                while pieces and at + pieces[0][2] * PAGE_SIZE <= BUFFER_BYTES:
                    batch.append((pieces.pop(0), at))
                    at += batch[-1][0][2] * PAGE_SIZE
                try:
                    await self.conn.read_batch([ReadOp(self._rkeys[rid], p * PAGE_SIZE,
                                                       self._buf[off:off + n * PAGE_SIZE])
                                                for (rid, p, n), off in batch])
                except (TransportError, KeyError) as e:
                    why = f"region not exported ({e})" if isinstance(e, KeyError) else str(e)
                    if isinstance(e, TransportError) and not isinstance(e, RemoteAccessError):
                        self.broken = why
                    failed.extend(PageFailure(rid, p + k, self.where, why) for (rid, p, n), _ in batch for k in range(n))
                    continue

                def write_out(batch: list[tuple[Run, int]] = batch) -> None:
                    for (rid, p, n), off in batch:
                        self.write(rid, p * PAGE_SIZE, self._buf[off:off + n * PAGE_SIZE])
                await trio.to_thread.run_sync(write_out)
                self.bytes_read += at
        return failed
