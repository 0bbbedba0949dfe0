"""Reading the failed host's memory over a transport (its exporter): ``read_source_header`` (its ctl
header: heartbeat, lists, fence; for recovery's liveness check and the standby's watch), ``read_exact``,
and ``RemoteSource``, the page source of its regions.

Pages come through registered bounce buffers (a verbs transport registers only them: registering
whole regions would pin, and so allocate, every page of them) and are written into the regions from
a worker thread (the kernel allocates new region memory on its write path, several times cheaper
than a page fault per page here). A transport failure fails the pages asked for,
naming the source; it is not raised, so a caller falls back or fails just those requests. ``broken``
says the connection itself failed (not just a read refused), so a caller can make a new one.
"""
from __future__ import annotations

import logging
import mmap
from collections.abc import Callable, Iterator

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


def batches(runs: list[Run], buffer_bytes: int) -> Iterator[list[Run]]:
    """``runs`` cut into reads of at most MAX_READ_PAGES, packed into loads of one bounce buffer."""
    batch: list[Run] = []
    size = 0
    for region_id, first, n in runs:
        for start in range(first, first + n, MAX_READ_PAGES):
            m = min(MAX_READ_PAGES, first + n - start)
            if size + m * PAGE_SIZE > buffer_bytes:
                yield batch
                batch, size = [], 0
            batch.append((region_id, start, m))
            size += m * PAGE_SIZE
    if batch:
        yield batch


class RemoteSource:
    """The source's regions as a page source: batches read into registered bounce buffers, each written
    into the regions from a worker thread while the next batch is read (with more than one buffer)."""

    def __init__(self, conn: Connection, catalog: Catalog, write: RegionWriter, where: str, *,
                 buffers: int = 1, buffer_bytes: int = BUFFER_BYTES) -> None:
        self.conn, self.write, self.where, self.buffer_bytes = conn, write, where, buffer_bytes
        self._rkeys = {desc.region_id: desc.rkey for desc in catalog.regions}
        self._return, self._take = trio.open_memory_channel[memoryview](buffers)
        for _ in range(buffers):
            buf = memoryview(mmap.mmap(-1, buffer_bytes))
            conn.register_local(buf)
            self._return.send_nowait(buf)
        self._lock = trio.Lock()                  # one call at a time: its batches keep every buffer busy
        self.bytes_read = 0
        self.broken: str | None = None            # why the connection failed (not just a read refused)

    def _ops(self, batch: list[Run], buf: memoryview) -> list[ReadOp]:
        ops, at = [], 0
        for region_id, first, n in batch:
            ops.append(ReadOp(self._rkeys[region_id], first * PAGE_SIZE, buf[at:at + n * PAGE_SIZE]))
            at += n * PAGE_SIZE
        return ops

    async def make_resident(self, runs: list[Run], progress: Callable[[int], None] | None = None
                            ) -> list[PageFailure]:
        """Also ``progress(bytes)`` as reads land. Once the connection fails, the rest fail unread."""
        failed: list[PageFailure] = []
        async with self._lock, trio.open_nursery() as nursery:
            for batch in batches(runs, self.buffer_bytes):
                if self.broken is not None:
                    failed.extend(PageFailure(rid, p + k, self.where, self.broken) for rid, p, n in batch
                                  for k in range(n))
                    continue
                buf = await self._take.receive()
                try:
                    await self.conn.read_batch(self._ops(batch, buf), progress=progress)
                except (TransportError, KeyError) as e:
                    self._return.send_nowait(buf)
                    why = f"region not exported ({e})" if isinstance(e, KeyError) else str(e)
                    if isinstance(e, TransportError) and not isinstance(e, RemoteAccessError):
                        self.broken = why
                    failed.extend(PageFailure(rid, p + k, self.where, why) for rid, p, n in batch for k in range(n))
                    continue
                except BaseException:
                    self._return.send_nowait(buf)
                    raise
                self.bytes_read += sum(n for _, _, n in batch) * PAGE_SIZE
                nursery.start_soon(self._write_out, batch, buf)
        return failed

    async def compare(self, runs: list[Run], view_of: Callable[[int], memoryview]) -> int:
        """Read ``runs`` again into the same bounce buffers (a new buffer per run would register, and pin,
        memory that grows with the dirty set) and compare them with ``view_of(region id)``; returns the
        pages checked, raises TransportError or ValueError at the first mismatch."""
        checked = 0
        async with self._lock:
            for batch in batches(runs, self.buffer_bytes):
                buf = await self._take.receive()
                try:
                    await self.conn.read_batch(self._ops(batch, buf))
                    at = 0
                    for region_id, first, n in batch:
                        if buf[at:at + n * PAGE_SIZE] != view_of(region_id)[first * PAGE_SIZE:(first + n) * PAGE_SIZE]:
                            raise ValueError(f"region {region_id} pages {first}..{first + n - 1} differ from {self.where}")
                        at += n * PAGE_SIZE
                        checked += n
                finally:
                    self._return.send_nowait(buf)
        return checked

    async def _write_out(self, batch: list[Run], buf: memoryview) -> None:
        def write_batch() -> None:
            at = 0
            for region_id, first, n in batch:
                self.write(region_id, first * PAGE_SIZE, buf[at:at + n * PAGE_SIZE])
                at += n * PAGE_SIZE
        try:
            await trio.to_thread.run_sync(write_batch)
        finally:
            self._return.send_nowait(buf)
