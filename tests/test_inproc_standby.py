"""The standby's Watcher against a real software-transport exporter in this process (no mount)."""
from __future__ import annotations

import logging
import struct
import uuid
from pathlib import Path

import pytest
import trio

from rmemfs import PAGE_SIZE
from rmemfs.dirty import (CTL_MAGIC, CTL_VERSION, HEADER_WORDS, W_FSID0, W_FSID1, W_HEARTBEAT, W_HEARTBEAT_INTERVAL_US,
                          W_MAGIC, W_VERSION)
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


async def _exporter(nursery: trio.Nursery, ctl: bytearray) -> int:
    from rmemfs.transport import software as sw
    from rmemfs.transport.base import Catalog, ExportedRegion, RegionRole
    backend = sw.SoftwareExportBackend()
    backend.register(ExportedRegion(CTL_REGION_ID, "ctl-0000.rgn", RegionRole.CTL, memoryview(ctl), 0x7F0000000000))
    regions = tuple(backend._by_id.values())
    port: int = await nursery.start(lambda task_status: sw.serve(
        host="127.0.0.1", port=0, fsid=FSID, secret=SECRET, export=backend,
        catalog=lambda t: Catalog(FSID, t, regions), task_status=task_status))
    return port


class _BeatingThread:
    """A live source beating every 20 ms from a thread, so that it goes on while this event loop is held
    (as a source on another host does while the standby stalls)."""

    def __init__(self, ctl: bytearray) -> None:
        import threading
        import time
        self.stop = threading.Event()
        self.longest = 0.0                  # its true longest gap (this machine may hold the thread up)
        struct.pack_into("<Q", ctl, W_HEARTBEAT_INTERVAL_US * 8, 20_000)

        def run() -> None:
            last = time.monotonic()
            while not self.stop.is_set():
                beat = struct.unpack_from("<Q", ctl, W_HEARTBEAT * 8)[0] + 1
                struct.pack_into("<QQ", ctl, W_HEARTBEAT * 8, beat, time.time_ns())
                now = time.monotonic()
                self.longest, last = max(self.longest, now - last), now
                time.sleep(0.02)
        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


@pytest.mark.allow_log("connection broken: an operation was cancelled mid-stream")    # the stop, mid-read
@pytest.mark.parametrize("where", ["after a read", "in the watch loop"])
async def test_a_stall_of_the_standby_is_no_silence_of_the_source(nursery: trio.Nursery, where: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 12: the standby's own stall (its loop held, or the process descheduled: 0.4 s here, with
    dead_after 0.3 s, within the 0.5 s a read may take) while the source beats on is not taken for the
    source's silence: no verdict (before: a stall between a read's return and the verdict counted as
    silence, and a live source was declared dead), and the figures keep the two apart: the watch's own
    stall, the gap this process saw, and the source's longest gap on its own clock."""
    import time
    from rmemfs import standby
    ctl = _ctl_page()
    port = await _exporter(nursery, ctl)
    source = _BeatingThread(ctl)
    stalled = trio.Event()
    real_read = standby.read_source_header
    reads = 0

    async def read_then_stall(conn, catalog):  # type: ignore[no-untyped-def]
        nonlocal reads
        header = await real_read(conn, catalog)
        reads += 1
        if where == "after a read" and reads >= 20 and not stalled.is_set() and \
                header.heartbeat == watcher.status.heartbeat:
            time.sleep(0.4)  # noqa: ASYNC251 - the stall: the unchanged heartbeat read is 0.4 s old when judged
            stalled.set()
        return header

    monkeypatch.setattr(standby, "read_source_header", read_then_stall)
    watcher = standby.Watcher(host="127.0.0.1", port=port, fsid=FSID, secret=SECRET, transport="software",
                              watch_interval=0.01, dead_after=0.3, timeout=2.0)
    try:
        await nursery.start(watcher.run)
        await trio.sleep(0.3)
        if where == "in the watch loop":
            time.sleep(0.4)  # noqa: ASYNC251 - this event loop held: the watch wakes 0.4 s late
            stalled.set()
        await stalled.wait()
        await trio.sleep(0.5)
    finally:
        watcher.stop()
        source.close()
    st = watcher.status
    assert watcher.verdict is None and st.state == "watching", st.events
    assert st.longest_gap >= 0.35                # what this process saw between two changes
    # On the source's clock: without the 0.4 s stall that the gap seen here has in it.
    assert st.source_longest_gap < st.longest_gap - 0.2, (source.longest, st)
    stalls = [e for e in st.events if e["event"] == "watch-stalled"]
    # The held loop delays whatever the watch awaits then: its sleep (late) or a read (slow).
    assert stalls and (where != "after a read" or stalls[0]["part"] == "read"), st.events
    assert max(st.read_longest, st.watch_lateness.longest) >= 0.35
    doc = st.to_json()
    assert doc["watch_lateness"]["longest"] == st.watch_lateness.longest and "source_longest_gap" in doc


async def test_the_baseline_plan_made_ahead_follows_the_published_generation(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 12 item 1: the standby keeps the baseline's load plan made ahead (PlanAhead), planned again
    when a newer generation is published; a takeover uses it only for that generation (_Planner)."""
    from rmemfs import recovery, standby
    from rmemfs.loader import plan_load
    from rmemfs.store.directory import DirectoryStore
    from rmemfs.store.format import next_manifest
    monkeypatch.setattr(standby, "REFRESH_INTERVAL", 0.02)
    (tmp_path / "b").mkdir()
    backend = DirectoryStore(tmp_path / "b")
    first = backend.create({}, regions={})
    ahead = standby.PlanAhead(lambda: backend)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ahead.run)
        with trio.fail_after(10):
            while ahead.planned is None:    # noqa: ASYNC110 - the task's state, as a takeover reads it
                await trio.sleep(0.01)
        assert ahead.planned[0] == first.generation and ahead.plans == 1
        await trio.sleep(0.1)
        assert ahead.plans == 1                                  # the same generation: not planned again
        second = next_manifest(first, generation=first.generation + 1)
        backend.publish(second, expect_epoch=first.epoch)
        with trio.fail_after(10):
            while ahead.planned[0] != second.generation:   # noqa: ASYNC110 - as above
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert ahead.plans == 2
    planned = ahead.planned

    calls: list[int] = []

    def counted(store: DirectoryStore, manifest: recovery.Manifest) -> recovery.LoadPlan:
        calls.append(manifest.generation)
        return plan_load(store, manifest)
    monkeypatch.setattr(recovery, "plan_load", counted)
    report = recovery.RecoveryReport()
    planner = recovery._Planner(backend, report, planned)
    await planner.run(second)
    assert await planner.get(second) is planned[1] and calls == [] and report.phases["baseline plan"].seconds == 0
    third = next_manifest(second, generation=second.generation + 1)
    assert await planner.get(third) is not planned[1] and calls == [third.generation]


@pytest.mark.parametrize("failure", ["exits", "stops", "stops, hung_after = dead_after", "hangs"])
async def test_what_the_exporter_says_of_a_silent_source_decides_when_it_is_dead(
        nursery: trio.Nursery, failure: str) -> None:
    """Issue 12: the heartbeat stops beating, and the source's process (a child mapping the ctl region)
    is killed, stopped, or left running (a hung loop). Its exporter's ``liveness`` answer decides: an
    exit is taken over at once, a stop after dead_after (plus a beat, so the pause itself lasted that
    long), a process that still runs only after hung_after. A stop is a pause even where hung_after is no
    longer than dead_after: it waits for dead_after of pause (once taken for a silence at hung_after, less a beat)."""
    import os
    import signal
    from rmemfs import standby
    from rmemfs.liveness import EXTENSION, LivenessExtension
    from rmemfs.regions import region_file_name
    from rmemfs.transport import software as sw
    from rmemfs.transport.base import Catalog, ExportedRegion, RegionRole
    from test_inproc_core import new_fs
    from test_unit_liveness import child

    fs = new_fs(Path("/dev/shm") / f"rmemfs-test-standby-{uuid.uuid4()}")
    directory = fs.regions.directory
    proc = child(directory / region_file_name(CTL_REGION_ID))
    try:
        fs.tracker.set_pid(proc.pid)
        fs.tracker.set_heartbeat_interval(0.02)
        backend = sw.SoftwareExportBackend()
        backend.register(ExportedRegion(CTL_REGION_ID, "ctl-0000.rgn", RegionRole.CTL,
                                        fs.regions[CTL_REGION_ID].view, 0x7F0000000000))
        regions = tuple(backend._by_id.values())
        port = await nursery.start(lambda task_status: sw.serve(
            host="127.0.0.1", port=0, fsid=fs.fsid, secret=SECRET, export=backend,
            catalog=lambda t: Catalog(fs.fsid, t, regions), extensions={EXTENSION: LivenessExtension(directory)},
            task_status=task_status))
        watcher = standby.Watcher(host="127.0.0.1", port=port, fsid=fs.fsid, secret=SECRET, transport="software",
                                  watch_interval=0.01, dead_after=0.2,
                                  hung_after=0.2 if "hung_after" in failure else 1.0, timeout=2.0)
        beating = True

        async def beat() -> None:
            while beating:
                fs.tracker.beat()
                await trio.sleep(0.02)

        nursery.start_soon(beat)
        await nursery.start(watcher.run)
        await trio.sleep(0.3)
        assert watcher.status.state == "watching", watcher.status.events
        beating = False
        if failure == "exits":
            proc.kill()
        elif failure.startswith("stops"):
            os.kill(proc.pid, signal.SIGSTOP)
        with trio.fail_after(10):
            await watcher.finished.wait()
        st = watcher.status
        assert watcher.verdict == "dead", st.events
        if failure == "exits":
            assert st.detected_by == "exit" and st.detected_after is not None and st.detected_after < 0.2, st
        elif failure.startswith("stops"):
            assert st.detected_by == "stopped" and st.detected_after is not None, st
            assert 0.2 + 0.02 <= st.detected_after < 1.0, st
        else:
            assert st.detected_by == "silence" and st.detected_after is not None and st.detected_after >= 1.0, st
    finally:
        proc.kill()
        proc.wait()
        fs.regions.close()
        for f in directory.iterdir():
            f.unlink()
        directory.rmdir()
