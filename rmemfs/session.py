"""Serving a mounted filesystem and taking it down cleanly.

``serve`` publishes this mount as the backend's owner, mounts FUSE and runs the
services (flusher, heartbeat, journal compactor, control socket, signals, a lazy recovery's
background load) in one trio nursery. On unmount or SIGTERM/SIGINT it writes a
final baseline marked clean and stops the exporter. ``Session.control`` answers
``rmemfs-ctl``'s flush and stats requests.
"""
from __future__ import annotations

import faulthandler
import gc
import logging
import os
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any
from collections.abc import Callable

import trio

from . import control, faults
from .core import Filesystem, RoomWaiter
from .errors import (BackendError, BackendFailed, BackendUnreachable, CorruptionError, FencedError,
                     MountpointUnusable, StoreUnreachable)
from .exporter import orphans, stop_exporter
from .flusher import Flusher
from .launch import StartUp
from .opening import Opened
from .options import MountOptions
from .stalls import GC_PAUSES, Lateness, favour_the_event_loop
from .store import STATE_CLEAN, STATE_MOUNTED, BaselineStore, owner_info

log = logging.getLogger(__name__)

CONTROL_SOCKET = "control.sock"


class _FlushRoom(RoomWaiter):
    def __init__(self, flusher: Flusher) -> None:
        self.flusher = flusher

    async def wait_for_room(self) -> None:
        target = self.flusher.completed + 1
        self.flusher.trigger()
        async with self.flusher.done:
            while self.flusher.completed < target:
                await self.flusher.done.wait()


@dataclass
class Session:
    """A filesystem being served; ``serve`` fills in the services."""

    opened: Opened
    mountpoint: Path
    opts: MountOptions
    exporter_port: int
    startup: StartUp
    flusher: Flusher | None = None
    requests: dict[str, int] = field(default_factory=dict)    # FUSE request counters, shared with fs.py
    terminated: bool = False
    started_ns: int = field(default_factory=time.time_ns)
    # How late the heartbeat task woke: this loop's (and CPU's) stalls, as a standby sees them in its gaps.
    loop_lateness: Lateness = field(default_factory=Lateness)

    def owner(self) -> dict[str, Any]:
        return owner_info(mountpoint=str(self.mountpoint), exporter_host=_advertised_host(self.opts.listen),
                          exporter_port=self.exporter_port, region_dir=str(self.opened.region_dir))

    async def control(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self.flusher is not None
        op = request.get("op")
        if op == "flush":
            generation = await self.flusher.flush()
            return {"ok": True, "generation": generation}
        if op == "stats":
            bg = self.opened.background
            return {"load": bg.loader.stats() if bg is not None else None,
                    "ok": True, "fsid": self.opened.fs.fsid, "epoch": self.opened.epoch, "pid": os.getpid(),
                    "backend": self.opened.backend.spec, "backend_options": self.opened.backend.options,
                    "mountpoint": str(self.mountpoint),
                    "core": self.opened.fs.statistics().__dict__,
                    "flush": self.flusher.statistics().__dict__, "requests": dict(self.requests),
                    "heartbeat": self.opened.fs.tracker.header().heartbeat,
                    "loop_lateness": self.loop_lateness.to_json(), "gc": GC_PAUSES.to_json(),
                    "fenced": self.opened.fs.note_fenced(), "fence_epoch": self.opened.fs.tracker.fence}
        raise ValueError(f"unknown request {op!r}")


def _advertised_host(listen: str) -> str:
    if listen in ("0.0.0.0", "::", ""):
        return socket.gethostname()
    return listen


async def serve(session: Session, *, on_ready: Callable[[], None] = lambda: None) -> bool:
    """Publish ownership, mount, serve until unmounted, then flush clean. Returns False when that final
    flush failed (logged; the backend stays marked in use and the exporter keeps serving), else True."""
    opened, opts = session.opened, session.opts
    fs = opened.fs
    GC_PAUSES.install()
    favour_the_event_loop()
    fs.tracker.set_pid(os.getpid())     # before the mount is usable, so before a daemon's parent exits
    # What is loaded by now (the namespace's inodes above all) lives as long as the mount: out of the
    # collector's full passes, which otherwise walk it and stall the loop (a 40,000-file namespace: full
    # passes of 45-72 ms, 1-7 ms frozen; tools/bench --only heartbeat measures both). Garbage cycles
    # frozen with it are kept once, not collected: a bounded cost at start-up.
    gc.freeze()
    flusher = Flusher(fs, opened.backend, opened.manifest, opened.live, opts.flush_interval)
    session.flusher = flusher
    fs.room_waiter = _FlushRoom(flusher)
    if opened.how == "recovered":
        session.startup.exporter_needed = True    # the fetched pages live only in this memory (and the fenced source's)
    try:
        await flusher.publish(replace(opened.manifest, epoch=opened.epoch, state=STATE_MOUNTED,
                                      owner=session.owner()), expect_epoch=opened.manifest.epoch)
        # Only now, as the owner of the newest epoch, may this host delete what no manifest names.
        await trio.to_thread.run_sync(opened.backend.collect_garbage)
        if fs.tracker.current.count and opened.how != "recovered":
            await flusher.flush()      # a new filesystem: publish its first pages before serving
        # A recovered filesystem mounts first: the pages it fetched are marked on its current list, so
        # they are as protected as any write (this host's exporter serves them) until the flush
        # triggered below makes them part of a baseline.
    except FencedError as e:
        raise BackendFailed(str(e)) from None
    except (OSError, BackendError, CorruptionError) as e:
        # A publish that failed after its rename (a directory fsync) did mark the backend ours.
        session.startup.exporter_needed |= _published_epoch(opened.backend) != opened.manifest.epoch
        kind = BackendUnreachable if isinstance(e, StoreUnreachable) else BackendFailed
        raise kind(f"cannot publish to backend {opened.backend.spec}: {e}") from None
    # The backend says "mounted" by us: only a clean baseline releases the memory (see _abandon_start).
    session.startup.exporter_needed = True
    ready = False

    def mounted() -> None:
        nonlocal ready
        ready = True
        on_ready()

    try:
        return await _mount_and_serve(session, mounted)
    except BaseException:
        if not ready:
            with trio.CancelScope(shield=True):
                await _abandon_start(session)
        raise


def _published_epoch(backend: BaselineStore) -> int | None:
    try:
        return backend.read_manifest().epoch
    except Exception:       # unreadable: assume the worst (it may be ours)
        return None


async def _abandon_start(session: Session) -> None:
    """A start-up that failed after the backend was marked mounted, before the mount was usable: publish
    a clean baseline (nothing was acknowledged to an application since the last one, but a recovery's
    fetched pages were) so the backend is clean again, as before; then the exporter may go."""
    assert session.flusher is not None
    try:
        generation = await session.flusher.flush(state=STATE_CLEAN)
    except Exception as e:
        log.error("start-up failed and the clean baseline that undoes it failed too (%s): the backend stays "
                  "marked in use and the exporter keeps serving; recover with rmemfs-recover", e)
        return
    session.opened.fs.tracker.set_clean_generation(generation)
    session.startup.exporter_needed = False
    log.info("start-up failed: backend marked clean again at generation %d", generation)


async def _mount_and_serve(session: Session, on_ready: Callable[[], None]) -> bool:
    from . import fs as fuse      # loads pyfuse3: only the serving process needs it

    opened, opts, flusher = session.opened, session.opts, session.flusher
    assert flusher is not None
    fs = opened.fs
    control_path = opened.region_dir / CONTROL_SOCKET
    ops = fuse.Operations(fs, writeback_cache=opts.writeback_cache)
    session.requests = ops.counters
    try:
        faults.fail("mount.fuse", RuntimeError)
        fuse.mount(ops, str(session.mountpoint),
                   fuse.mount_options(opts.fsname, allow_other=opts.allow_other, extra=opts.extra_fuse))
    except RuntimeError as e:
        raise MountpointUnusable(f"cannot mount {session.mountpoint}: {e}") from None
    unmounted = False
    registered = None
    try:
        registered = control.register_mount(session.mountpoint, control_path)
        async with trio.open_nursery() as nursery:
            await nursery.start(flusher.run)
            await nursery.start(control.serve, control_path, session.control)
            nursery.start_soon(_heartbeat, fs, opts.heartbeat_interval, session.loop_lateness, opts.stall_trace)
            nursery.start_soon(fs.compact_journal)
            nursery.start_soon(_signals, session)
            if opened.background is not None:
                nursery.start_soon(opened.background.run, fs)
            on_ready()
            log.info("mounted %s at %s", fs.fsid, session.mountpoint)
            nursery.start_soon(_remove_orphans, session)
            if fs.tracker.current.count:
                flusher.trigger()
            await fuse.serve_requests()
            unmounted = True
            flusher.stop()
            nursery.cancel_scope.cancel()
    finally:
        control.unregister_mount(registered, control_path)
        fuse.close(unmount=session.terminated or not unmounted)
    return await _shutdown(session)


async def _remove_orphans(session: Session) -> None:
    """Free the region directories beside ours that nothing needs any more, such as a recovered epoch's
    ``.e<N>`` that was unmounted cleanly and is now superseded by this mount (issue 15 item 8). Once
    serving, in a thread: it reads every process's memory maps."""
    base = session.opts.region_dir(session.opened.fs.fsid)
    try:
        found = await trio.to_thread.run_sync(partial(orphans, session.opened.backend, base, settled_only=True))
        for path in found:
            if path != session.opened.region_dir:
                await trio.to_thread.run_sync(shutil.rmtree, path)
                log.info("removed %s: an older epoch's region directory that nothing needs", path)
    except Exception as e:       # never a reason to stop serving; rmemfs-ctl orphans can do it later
        log.warning("could not remove orphaned region directories beside %s: %s", base, e)


async def _shutdown(session: Session) -> bool:
    """Final baseline marked clean; only then may the exporter go."""
    assert session.flusher is not None
    fs = session.opened.fs
    try:
        # The heartbeat goes on through the final flush: a standby must not take a stopping source for dead.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_heartbeat, fs, session.opts.heartbeat_interval, session.loop_lateness)
            generation = await session.flusher.flush(state=STATE_CLEAN)
            if fs.times_pending:     # a full dirty list had no room for them before the first flush's swap
                generation = await session.flusher.flush(state=STATE_CLEAN)
            nursery.cancel_scope.cancel()
    except Exception as e:
        log.error("final flush failed (%s): the backend stays marked in use and the exporter keeps serving; "
                  "recover with rmemfs-recover", e)
        return False
    if fs.residency is not None and not fs.residency.complete:
        # Unmounted before a lazy load finished: the baseline is clean, but these region files are not whole,
        # so they must not be taken for it (the next mount loads the baseline).
        log.info("unmounted before the background load finished: the next mount loads from the baseline")
    else:
        fs.tracker.set_clean_generation(generation)
    stop_exporter(session.opened.region_dir)
    log.info("unmounted cleanly at generation %d", generation)
    return True


async def _heartbeat(fs: Filesystem, interval: float, lateness: Lateness, stall_trace: float = 0.0) -> None:
    fs.tracker.set_heartbeat_interval(interval)
    # -o stall_trace: faulthandler's watchdog is a C thread that needs no GIL, so it can show what holds
    # the loop (or the GIL) while the stall lasts; re-armed at every beat, it fires once per stall.
    trace_to = _stall_trace_file() if stall_trace > 0 else None
    try:
        while True:
            if trace_to is not None:
                faulthandler.dump_traceback_later(stall_trace, file=trace_to)
            fs.tracker.beat()
            fs.note_fenced()   # so the fenced mount says so even when nothing writes
            await lateness.sleep(interval)
    finally:
        if trace_to is not None:
            faulthandler.cancel_dump_traceback_later()


def _stall_trace_file() -> Any:
    """The log's stream when it is a file (stderr otherwise): faulthandler writes to its descriptor."""
    for handler in logging.getLogger().handlers:
        stream = getattr(handler, "stream", None)
        if stream is not None and hasattr(stream, "fileno"):
            try:
                stream.fileno()
                return stream
            except (OSError, ValueError):
                pass
    return sys.stderr


async def _signals(session: Session) -> None:
    from . import fs as fuse
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("signal %d: unmounting", signum)
            session.terminated = True
            fuse.terminate()
