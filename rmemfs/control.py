"""Local control sockets: one JSON object per line, request then reply.

The filesystem process answers ``flush`` and ``stats`` (``rmemfs-ctl``); the
exporter answers ``status`` and ``shutdown``. Both listen on unix sockets in
the region directory, reachable only by root (mode 0600 directory).
"""
from __future__ import annotations

import functools
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any
from collections.abc import Awaitable, Callable

import trio

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
MAX_REQUEST = 64 * 1024
# The mount root's extended attribute that names the filesystem process's control socket (rmemfs-ctl finds it so).
CONTROL_XATTR = b"user.rmemfs.control"


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
