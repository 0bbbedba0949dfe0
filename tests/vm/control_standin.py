"""A minimal stand-in for rmemfs.transport.software's control channel, for the VM tests only.

Used only while ``rmemfs.transport.software`` is not in this branch (see
``verbs_env.control_module``). It offers the two calls verbs needs after an
HMAC challenge-response: the catalog for a transport and a control extension
call. Frames: 4-byte big-endian length + JSON. No reads: verbs does those.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import struct
from typing import Any
from collections.abc import Callable, Mapping

import trio

from rmemfs.transport.base import (AuthError, Catalog, ConnectError, ControlExtension, ControlSession, ProtocolError,
                                   RegionDesc, RegionRole, TransportError)


async def _send(stream: trio.abc.Stream, obj: Any) -> None:
    data = json.dumps(obj).encode()
    await stream.send_all(struct.pack("!I", len(data)) + data)


async def _recv(stream: trio.abc.Stream) -> Any:
    buf = b""
    while len(buf) < 4 or len(buf) < 4 + struct.unpack("!I", buf[:4])[0]:
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise ProtocolError("control stand-in: peer closed")
        buf += chunk
    return json.loads(buf[4:])


def _mac(secret: bytes, nonce: str, fsid: str) -> str:
    return hmac.new(secret, f"{nonce}|{fsid}".encode(), hashlib.sha256).hexdigest()


def _cat_json(cat: Catalog) -> dict[str, Any]:
    return {"fsid": cat.fsid, "transport": cat.transport,
            "regions": [{"region_id": r.region_id, "name": r.name, "role": r.role.value, "addr": r.addr,
                         "length": r.length, "rkey": r.rkey} for r in cat.regions]}


async def serve(*, host: str, port: int, fsid: str, secret: bytes, export: Any,
                catalog: Callable[[str], Catalog], extensions: Mapping[str, ControlExtension] = {},
                task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    async def handler(stream: trio.SocketStream) -> None:
        session = ControlSession("stand-in peer")
        try:
            hello = await _recv(stream)
            nonce = secrets.token_hex(16)
            await _send(stream, {"nonce": nonce})
            auth = await _recv(stream)
            if hello.get("fsid") != fsid or not hmac.compare_digest(auth.get("mac", ""), _mac(secret, nonce, fsid)):
                await _send(stream, {"error": "auth"})
                return
            await _send(stream, {"ok": True})
            while True:
                req = await _recv(stream)
                try:
                    if req["op"] == "catalog":
                        await _send(stream, {"catalog": _cat_json(catalog(req["transport"]))})
                    else:
                        reply = extensions[req["name"]].handle_in(session, bytes.fromhex(req["payload"]))
                        await _send(stream, {"payload": reply.hex()})
                except Exception as e:   # report, keep serving
                    await _send(stream, {"error": f"{type(e).__name__}: {e}"})
        except (ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            session.close()

    listeners = await trio.open_tcp_listeners(port, host=host)
    async with trio.open_nursery() as n:
        await n.start(trio.serve_listeners, handler, listeners)
        task_status.started(listeners[0].socket.getsockname()[1])


class StandinConnection:
    transport = "control-standin"

    def __init__(self, stream: trio.SocketStream, fsid: str) -> None:
        self._stream, self._fsid, self._lock = stream, fsid, trio.Lock()

    async def _call(self, req: dict[str, Any]) -> dict[str, Any]:
        async with self._lock:
            await _send(self._stream, req)
            resp = await _recv(self._stream)
        if "error" in resp:
            raise TransportError(f"control stand-in: {resp['error']}")
        return resp

    async def register(self, transport: str = "software") -> Catalog:
        c = (await self._call({"op": "catalog", "transport": transport}))["catalog"]
        regions = tuple(RegionDesc(r["region_id"], r["name"], RegionRole(r["role"]), r["addr"], r["length"],
                                   r["rkey"]) for r in c["regions"])
        return Catalog(c["fsid"], c["transport"], regions)

    async def call_extension(self, name: str, payload: bytes) -> bytes:
        return bytes.fromhex((await self._call({"op": "ext", "name": name, "payload": payload.hex()}))["payload"])

    async def aclose(self) -> None:
        await self._stream.aclose()


async def connect(host: str, port: int, *, fsid: str, secret: bytes, timeout: float = 10.0) -> StandinConnection:
    try:
        with trio.fail_after(timeout):
            stream = await trio.open_tcp_stream(host, port)
            await _send(stream, {"fsid": fsid})
            nonce = (await _recv(stream))["nonce"]
            await _send(stream, {"mac": _mac(secret, nonce, fsid)})
            if "error" in await _recv(stream):
                await stream.aclose()
                raise AuthError("control stand-in: authentication failed")
    except (OSError, trio.TooSlowError) as e:
        raise ConnectError(f"control stand-in: cannot connect to {host}:{port}: {e}") from None
    return StandinConnection(stream, fsid)
