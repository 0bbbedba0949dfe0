"""Fencing: a takeover stops the old owner from acknowledging anything before it reads the dirty lists.

The protocol (three parties: the old filesystem process F, its exporter X, the
recovering host R):

0. R connects to X, reads the ctl header twice, 2.5 heartbeat intervals
   apart, and gives up (exit 23) without fencing if the heartbeat moved: a
   live source, or one that paused only briefly, is never harmed by a
   recovery that then refuses. F may resume right after that verdict; the
   fence below then stops it, and what it acknowledged before is in the
   lists R reads after the fence.
1. R calls, over the authenticated software channel, the
   ``fence`` control extension with the new epoch (the backend's epoch + 1).
2. X stores that epoch in the fence word of the ctl header (``dirty`` word 12)
   with ``pwrite`` on the ctl region file, then replies. X never lowers the
   word, and refuses an epoch not above the owner's own.
3. Only after that reply does R re-read the backend's manifest (the base
   generation of its takeover: F's flusher can publish no later one) and read
   the ctl header, the dirty lists and the dirty pages.

F, for every mutating request (write, including the WRITEs of msync and
writeback, setattr/truncate, create, mknod, mkdir, symlink, link, unlink,
rmdir, rename, setxattr, fsync): checks the fence word before changing
anything (``Filesystem._writable``), marks, copies, and then checks it once
more (``Filesystem.confirm_owner``) immediately before the handler returns its
reply. Between that second check and the handler's return there is no await
(``fs.py``: the check is the last statement before ``return``), so the trio
scheduler cannot run anything in between, and pyfuse3 sends the reply as soon
as the handler's coroutine returns.

Why this is airtight. Take a mutation whose reply is sent after R began
reading. If its second check saw 0, that load happened before X's store of the
fence word became visible; its marks and copies precede the load in program
order, and a full memory barrier (``_barrier``) between the copy and the load
keeps the stores from being ordered after it (a store-then-load pattern:
x86-TSO lets a load pass older stores, so the barrier is needed). X's store
precedes its reply and R reads only after the reply, so R's reads see the
mutation's marks and pages: it is in what R read. If the second check saw the
fence, the request fails with EROFS: it was refused. A request that passed the
first check and was then paused (SIGSTOP, a slow page fault) before its copy
lands its copy after R may have read the page, but its second check then runs
after the fence store and refuses it. The mutation stays in F's memory, but
nobody was told it happened.

The barrier is a ``threading.Lock`` acquire/release: on x86 the lock's
atomic read-modify-write is a full barrier. This (and x86's coherent shared
tmpfs mappings between F and X) is what the argument rests on; on a weaker
memory model the barrier would need an explicit full fence.

Errno: EROFS. The mount did not fail (EIO would suggest lost data or a broken
device); it lost ownership, and from then on it is a read-only view of its own
memory, which is what EROFS says. Reads are served from that memory: they show
what this host had, possibly older than the new owner's filesystem.

A fenced mount logs one line naming the new epoch (``note_fenced``), stays
mounted read-only (unmounting under open files would turn the refusal into
ENOTCONN for every reader), its flusher stops and never publishes or clears a
mark, and ``rmemfs-ctl stats`` shows ``fenced``.
"""
from __future__ import annotations

import json
import logging
import os
import struct
import subprocess
import threading
from pathlib import Path

from . import PAGE_SIZE
from .dirty import W_FENCE, parse_header
from .regions import CTL_REGION_ID, region_file_name
from .transport.base import Connection, ControlExtension, TransportError

log = logging.getLogger(__name__)

EXTENSION = "fence"

_barrier_lock = threading.Lock()


def barrier() -> None:
    """A full memory barrier between this thread's earlier stores and its later loads (see above)."""
    _barrier_lock.acquire()
    _barrier_lock.release()


class FenceRefused(Exception):
    """The exporter would not fence (the epoch is not newer than the owner's)."""


def write_fence(region_dir: Path, epoch: int) -> dict[str, int]:
    """Raise the fence word of the ctl region in ``region_dir`` to ``epoch``; the header seen after it.

    A write through the file rather than through the exporter's mapping: the
    mapping is registered for remote reads and nothing should write through it;
    ``pwrite`` on the tmpfs file lands in the very page F and X map. A torn
    8-byte store could only show F another non-zero value, which still fences.
    """
    path = region_dir / region_file_name(CTL_REGION_ID)
    fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
    try:
        header = parse_header(os.pread(fd, PAGE_SIZE, 0))
        if epoch <= header.epoch:
            raise FenceRefused(f"epoch {epoch} is not newer than the owner's epoch {header.epoch}")
        if header.fence < epoch:
            os.pwrite(fd, struct.pack("<Q", epoch), W_FENCE * 8)
        after = parse_header(os.pread(fd, PAGE_SIZE, 0))
    finally:
        os.close(fd)
    log.warning("fenced filesystem %s (owner epoch %d, pid %d) for epoch %d", after.fsid, after.epoch,
                after.pid, after.fence)
    return {"fence": after.fence, "epoch": after.epoch, "pid": after.pid}


class FenceExtension(ControlExtension):
    """The exporter's ``fence`` control request: payload ``{"epoch": N}``, reply ``{"ok": ..., "fence": ...}``."""

    name = EXTENSION

    def __init__(self, region_dir: Path) -> None:
        self.region_dir = region_dir

    def handle(self, payload: bytes) -> bytes:
        try:
            epoch = int(json.loads(payload)["epoch"])
        except (ValueError, KeyError, TypeError) as e:
            return json.dumps({"ok": False, "error": f"bad fence request: {e}"}).encode()
        try:
            done = write_fence(self.region_dir, epoch)
        except FenceRefused as e:
            return json.dumps({"ok": False, "error": str(e)}).encode()
        return json.dumps({"ok": True, **done}).encode()


async def request_fence(conn: Connection, epoch: int) -> dict[str, int]:
    """Ask the source's exporter to fence its filesystem for ``epoch``; returns its reply.

    The request is a control extension (``Connection.call_extension``; a verbs
    connection sends it over its software control channel). Raises FenceRefused
    when the exporter refuses or does not know the request (an exporter older
    than fencing), or the transport has no control channel.
    """
    try:
        reply = json.loads(await conn.call_extension(EXTENSION, json.dumps({"epoch": epoch}).encode()))
    except TransportError as e:
        raise FenceRefused(f"the exporter did not fence: {e}") from None
    except ValueError as e:
        raise FenceRefused(f"the exporter's fence reply is not JSON: {e}") from None
    if not isinstance(reply, dict) or not reply.get("ok") or int(reply.get("fence", 0)) < epoch:
        raise FenceRefused(f"the exporter did not fence: {reply.get('error') if isinstance(reply, dict) else reply}")
    return reply


# fence_cmd (rmemfs-recover, rmemfs-standby): the operator's STONITH agent, for a source whose exporter cannot
# be reached, so cannot be fenced through its ctl word.
FENCE_CMD_TIMEOUT = 60.0


def run_fence_cmd(cmd: str, host: str, port: int, fsid: str) -> bool:
    """``fence_cmd`` with the source address and fsid as arguments: exit 0 means the source is cut off."""
    try:
        proc = subprocess.run(["/bin/sh", "-c", f'{cmd} "$@"', "fence_cmd", f"{host}:{port}", fsid],
                              capture_output=True, text=True, timeout=FENCE_CMD_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("fence_cmd %r failed: %s", cmd, e)
        return False
    if proc.returncode != 0:
        log.warning("fence_cmd %r exited %d: %s", cmd, proc.returncode, proc.stderr.strip()[-200:])
        return False
    return True
