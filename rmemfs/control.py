"""Local control sockets: one JSON object per line, request then reply.

The filesystem process answers ``flush`` and ``stats`` (``rmemfs-ctl``); the
exporter answers ``status`` and ``shutdown``. Both listen on unix sockets in
the region directory, reachable only by root (mode 0600 directory).

``rmemfs-ctl`` finds a mount's control socket through a registry in ``/run/rmemfs/mounts``, keyed by the
mount's device number, which the filesystem process writes once mounted. Not through an extended attribute
of the mount root: a filesystem that answers GETXATTR at all gets one from the kernel before every write()
(the security.capability check of file_remove_privs), which halved the small-write rate. rmemfs answers
ENOSYS once, and the kernel stops asking.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import secrets
import socket
from pathlib import Path
from typing import Any
from collections.abc import Awaitable, Callable

import trio

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
MAX_REQUEST = 64 * 1024
# The mount root's extended attribute that named the control socket before the registry; still read as a
# fallback, for mounts of older rmemfs trees (tools/bench --compare-tree).
CONTROL_XATTR = b"user.rmemfs.control"
MOUNTS_DIR = Path("/run/rmemfs/mounts")
FUSE_ROOT_INODE = 1


def _device_of_mount(mountpoint: Path) -> str | None:
    """``major:minor`` of the FUSE mount at ``mountpoint`` in this mount namespace, from mountinfo (a stat of
    our own mount point from the serving process would wait on itself)."""
    # Resolve the parent only: resolving the mount point itself would stat it, a FUSE request to ourselves.
    path = Path(os.path.abspath(mountpoint))
    target = os.path.join(os.path.realpath(path.parent), path.name)
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            point = fields[4].encode().decode("unicode_escape")     # mountinfo escapes space, tab, \\ in octal
            if point == target and fields[sep + 1].startswith("fuse"):
                found = fields[2]                                    # the last one mounted there wins
    return found


def _entry(device: str) -> Path:
    return MOUNTS_DIR / device.replace(":", "-")


def register_mount(mountpoint: Path, control_path: Path) -> Path | None:
    """Record which control socket serves the mount at ``mountpoint``; returns the entry to remove at unmount.
    A stale entry of a killed process is overwritten by the next mount that gets the same device number."""
    from .secure import private_dir
    device = _device_of_mount(mountpoint)
    if device is None:
        log.warning("cannot find %s in /proc/self/mountinfo: rmemfs-ctl will not find this mount", mountpoint)
        return None
    private_dir(MOUNTS_DIR.parent)
    private_dir(MOUNTS_DIR)
    entry = _entry(device)
    tmp = entry.with_name(f".{entry.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(str(control_path))
    os.rename(tmp, entry)
    return entry


def unregister_mount(entry: Path | None, control_path: Path) -> None:
    if entry is None:
        return
    try:
        if entry.read_text() == str(control_path):     # not a later mount's entry for a reused device number
            entry.unlink()
    except OSError:
        pass


def find_control(mountpoint: Path | str) -> str | None:
    """The control socket of the rmemfs mount whose root is ``mountpoint``, or None when it is not one.
    Raises OSError when ``mountpoint`` cannot be examined."""
    st = os.stat(mountpoint)
    if st.st_ino != FUSE_ROOT_INODE:
        return None
    try:
        fd = os.open(_entry(f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"), os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        pass
    else:
        with os.fdopen(fd) as f:
            return f.read()
    try:
        return os.getxattr(mountpoint, CONTROL_XATTR.decode()).decode()
    except OSError:
        return None


async def serve(path: Path, handler: Handler, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                ) -> None:
    try:
        path.unlink()   # noqa: ASYNC240 - once, before serving
    except FileNotFoundError:
        pass
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(str(path))
    os.chmod(path, 0o600)
    sock.listen(16)
    listener = trio.SocketListener(sock)
    task_status.started()
    await trio.serve_listeners(functools.partial(_serve_one, handler), [listener])


async def _serve_one(handler: Handler, stream: trio.SocketStream) -> None:
    buf = b""
    try:
        async with stream:
            while True:
                while b"\n" not in buf:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        return
                    buf += chunk
                    if len(buf) > MAX_REQUEST:
                        return
                line, buf = buf.split(b"\n", 1)
                try:
                    request = json.loads(line)
                    if not isinstance(request, dict):
                        raise ValueError("request is not an object")
                    reply = await handler(request)
                except Exception as e:   # a bad request gets an error reply, never ends the server
                    log.warning("control request failed: %s", e)
                    reply = {"ok": False, "error": str(e)}
                await stream.send_all(json.dumps(reply).encode() + b"\n")
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


def call(path: Path | str, request: dict[str, Any], timeout: float = 300.0) -> dict[str, Any]:
    """Blocking client: send one request, return the reply (raises OSError when unreachable)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(json.dumps(request).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError(f"{path}: connection closed without a reply")
            buf += chunk
    return json.loads(buf)
