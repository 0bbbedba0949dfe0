"""The standby's Watcher against a real software-transport exporter in this process (no mount)."""
from __future__ import annotations

import logging
import struct
import uuid

import pytest
import trio

from rmemfs import PAGE_SIZE
from rmemfs.dirty import CTL_MAGIC, CTL_VERSION, HEADER_WORDS, W_FSID0, W_FSID1, W_HEARTBEAT, W_MAGIC, W_VERSION
from rmemfs.regions import CTL_REGION_ID

FSID = str(uuid.UUID(int=0x1234))
SECRET = b"w" * 16


def _ctl_page() -> bytearray:
    words = [0] * HEADER_WORDS
    words[W_MAGIC] = struct.unpack("<Q", CTL_MAGIC)[0]
    words[W_VERSION] = PAGE_SIZE << 32 | CTL_VERSION
    words[W_FSID0], words[W_FSID1] = struct.unpack("<QQ", uuid.UUID(FSID).bytes)
    page = bytearray(PAGE_SIZE)
    struct.pack_into(f"<{HEADER_WORDS}Q", page, 0, *words)
    return page


async def test_watcher_registers_again_when_the_exporter_drops_it_as_idle(
        nursery: trio.Nursery, caplog: pytest.LogCaptureFixture) -> None:
    """Reading less often than the exporter's idle timeout, the watcher finds its connection closed
    before each read and registers again: the source never looks unreachable (before: one
    'unreachable' event, and an outage counted towards dead_after, per drop)."""
    from rmemfs.standby import Watcher
    from rmemfs.transport import software as sw
    from rmemfs.transport.base import Catalog, ExportedRegion, RegionRole

    caplog.set_level(logging.INFO, logger="rmemfs.standby")
    ctl = _ctl_page()
    backend = sw.SoftwareExportBackend()
    backend.register(ExportedRegion(CTL_REGION_ID, "ctl-0000.rgn", RegionRole.CTL, memoryview(ctl), 0x7F0000000000))
    regions = tuple(backend._by_id.values())
    port = await nursery.start(lambda task_status: sw.serve(
        host="127.0.0.1", port=0, fsid=FSID, secret=SECRET, export=backend,
        catalog=lambda t: Catalog(FSID, t, regions), idle_timeout=0.2, task_status=task_status))

    async def beat() -> None:                   # a live source: the heartbeat word moves
        while True:
            struct.pack_into("<Q", ctl, W_HEARTBEAT * 8, struct.unpack_from("<Q", ctl, W_HEARTBEAT * 8)[0] + 1)
            await trio.sleep(0.05)

    nursery.start_soon(beat)
    watcher = Watcher(host="127.0.0.1", port=port, fsid=FSID, secret=SECRET, transport="software",
                      watch_interval=0.5, dead_after=30.0, timeout=2.0)
    await nursery.start(watcher.run)
    await trio.sleep(1.8)                       # three reads, each after a drop
    watcher.stop()
    events = [e["event"] for e in watcher.status.events]
    assert "unreachable" not in events, watcher.status.events
    assert watcher.status.registrations >= 3 and watcher.status.state == "watching", watcher.status
    assert any("closed the watch connection; registering again" in r.getMessage() for r in caplog.records)
