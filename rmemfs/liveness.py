"""Whether the source's filesystem process has exited, as its exporter knows for certain.

A standby decides from the heartbeat's silence (``standby.Watcher``), and that silence must outlast
every stall of a live source (``dead_after``). A crashed filesystem process can be known sooner, and
without a guess: its exporter, a process of its own on the same host, holds a pidfd on it, which
becomes readable when the process exits (killed, crashed, or exited without unmounting). Once the
heartbeat has missed a few beats, the standby asks the exporter (the ``liveness`` control
extension) and takes over at once on "exited"; any other answer leaves the decision to dead_after.

"exited" is only ever said of a process the exporter saw alive mapping this ctl region, through a
pidfd opened before it looked. A recycled pid, a process of another pid namespace, or one that was
gone before it was ever seen is "unknown", never "exited". A stopped process (SIGSTOP) is
"stopped": it is still a pause, taken over only after dead_after (issue 12, item 4).

The header's pid is the serving process's own: ``session.serve`` sets it, as a daemon serves from a
child forked after the filesystem was loaded (whose parent exits once the mount is usable).
"""
from __future__ import annotations

import json
import logging
import os
import select
from pathlib import Path

from .dirty import read_ctl_header
from .errors import CorruptionError
from .regions import CTL_REGION_ID, region_file_name
from .transport.base import Connection, ControlExtension, TransportError

log = logging.getLogger(__name__)

EXTENSION = "liveness"
EXITED, STOPPED, RUNNING, UNKNOWN = "exited", "stopped", "running", "unknown"

FileId = tuple[int, int, int]          # (major, minor, inode)


def file_ids(paths: list[Path]) -> set[FileId]:
    """How /proc/PID/maps names these files (device and inode), for those that exist."""
    ids = set()
    for path in paths:
        try:
            st = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            continue
        ids.add((os.major(st.st_dev), os.minor(st.st_dev), st.st_ino))
    return ids


def maps_any(pid: int | str, wanted: set[FileId]) -> bool:
    """Whether process ``pid`` maps any of ``wanted`` (False when it cannot be read: gone, or not ours)."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                parts = line.split(None, 5)      # address perms offset dev inode [path]
                if len(parts) < 5 or parts[4] == "0":
                    continue
                major, _, minor = parts[3].partition(":")
                if (int(major, 16), int(minor, 16), int(parts[4])) in wanted:
                    return True
    except (OSError, ValueError):
        pass
    return False


def run_state(pid: int) -> str | None:
    """The state letter /proc/PID/stat gives (R, S, D, T, t, Z, ...); None for no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


class ProcessWatch:
    """The exporter's pidfd on the filesystem process its ctl header names (exporter side)."""

    def __init__(self, region_dir: Path) -> None:
        self.region_dir = region_dir
        self._pid = 0
        self._fd: int | None = None

    def state(self) -> tuple[int, str]:
        """(the header's pid, EXITED | STOPPED | RUNNING | UNKNOWN)."""
        pid = read_ctl_header(self.region_dir).pid
        if pid != self._pid or self._fd is None:
            self._watch(pid)
        if self._fd is None:
            return pid, UNKNOWN
        poller = select.poll()          # not select(): the exporter's descriptors may pass FD_SETSIZE
        poller.register(self._fd, select.POLLIN)
        if poller.poll(0):
            return pid, EXITED
        return pid, STOPPED if run_state(pid) in ("T", "t") else RUNNING

    def _watch(self, pid: int) -> None:
        self.close()
        self._pid = pid
        if pid <= 0 or pid == os.getpid():
            return
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            return           # gone before it was seen, or not in this pid namespace: unknown
        # Checked after the pidfd is open, so that the process checked is the one it refers to.
        if not maps_any(pid, file_ids([self.region_dir / region_file_name(CTL_REGION_ID)])) \
                or run_state(pid) in (None, "Z", "X"):
            os.close(fd)
            return
        self._fd = fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class LivenessExtension(ControlExtension):
    """The exporter's ``liveness`` request: empty payload, reply ``{"ok": true, "pid": N, "state": ...}``."""

    name = EXTENSION

    def __init__(self, region_dir: Path) -> None:
        self.watch = ProcessWatch(region_dir)

    def handle(self, payload: bytes) -> bytes:
        try:
            pid, state = self.watch.state()
        except (OSError, CorruptionError) as e:
            return json.dumps({"ok": False, "error": f"cannot read the ctl header: {e}"}).encode()
        return json.dumps({"ok": True, "pid": pid, "state": state}).encode()


async def ask_liveness(conn: Connection) -> tuple[int, str]:
    """The source's (pid, state) from its exporter; (0, UNKNOWN) when it cannot say. Raises TransportError
    when the exporter has no such extension (an older one) or the connection failed."""
    reply = await conn.call_extension(EXTENSION, b"")
    try:
        answer = json.loads(reply)
        if not answer.get("ok"):
            return 0, UNKNOWN
        return int(answer["pid"]), str(answer["state"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise TransportError(f"the exporter's liveness reply is not understood: {e}") from None
