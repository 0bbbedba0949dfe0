"""Software transport: a TCP stand-in for a NIC's one-sided RDMA READ.

The exporter process (the source host's "NIC") runs ``serve()``; it keeps
serving reads of its read-only region mappings after the filesystem process
has died. The initiator (failover host) uses ``connect()`` and gets a
``SoftwareConnection``. That connection is also the authenticated control
channel other transports use (``call_extension``: verbs exchanges QP numbers
and GIDs over it).

The client performs its socket I/O in a worker thread on a blocking socket:
one ``recvmsg_into(..., MSG_WAITALL)`` scatters a whole response straight
into the caller's destination views, so a batch of 1024 pages costs one
system call instead of dozens of trio wake-ups. The server replies with one
gathered ``sendmsg`` of slices of the region mapping (no user-space copy).

Wire format, protocol version 2
-------------------------------
Every frame is a 20-byte header followed by ``length`` payload bytes and,
once the handshake is done, a 16-byte tag (below). Integers are big-endian
(network order)::

    offset size field
    0      4    magic       b"RMSW"
    4      2    version     PROTOCOL_VERSION (2)
    6      2    type        frame type, below
    8      4    length      payload bytes, <= 4096 before authentication,
                            <= MAX_PAYLOAD (16 MiB) after
    12     8    request id  chosen by the client, echoed in the response
                            (0 during the handshake)

Anything else (bad magic, other version, unknown type, oversized length, a
frame cut short, a tag that does not verify) makes the receiver drop the
connection; a server first sends a best-effort ERROR frame. A version 1 peer
(rmemfs before frame integrity) gets a version 1 ERROR VERSION frame saying
so, which it can read. A server also drops (without an ERROR) an
authenticated connection that starts no frame for ``idle_timeout`` seconds.
Whatever control extensions hold for a connection (its ``ControlSession``:
verbs QPs) is freed when it ends, however it ends.

Handshake (client speaks first; the server allows ``handshake_timeout``
seconds for all of it). ``fsid`` is UTF-8, ``secret`` the per-filesystem
secret, ``cn``/``sn`` 32 random bytes from client/server, ``||`` concatenation::

    C->S HELLO     (1)  cn || fsid
    S->C CHALLENGE (2)  sn                          or ERROR FSID_MISMATCH
    C->S AUTH      (3)  HMAC-SHA256(secret, b"rmemfs-software-v2 client" || cn || sn || fsid)
    S->C WELCOME   (4)  HMAC-SHA256(secret, b"rmemfs-software-v2 server" || cn || sn || fsid)
                                                    or ERROR AUTH_FAILED
The client checks WELCOME, so authentication is mutual; the server only
proves itself to a client that proved itself first (no MAC oracle).

Frame integrity. After WELCOME every frame, both ways, carries a tag over its
header and payload. Each direction has its own key and counts its frames
from 0 (the sequence number ``seq``, implicit: never sent)::

    key_c2s = HMAC-SHA256(secret, b"rmemfs-software-v2 c2s" || cn || sn || fsid)
    key_s2c = HMAC-SHA256(secret, b"rmemfs-software-v2 s2c" || cn || sn || fsid)
    tag     = Poly1305(BLAKE2b-256(key=key_dir, seq u64), header || payload)

Poly1305 is a one-time authenticator; the per-frame key derived from the
sequence number makes every key single-use, so a relay that alters, drops,
replays or reorders a frame (or splices in one from another connection) makes
the next tag fail. The payload is not encrypted: a relay can read it.

Requests after the handshake (each answered in order, by request id)::

    CATALOG_REQ (5)  transport name, UTF-8
    CATALOG     (6)  UTF-8 JSON {"fsid": str, "transport": str, "regions": [
                       {"region_id": int, "name": str, "role": "ctl"|"meta"|"data",
                        "addr": int, "length": int, "rkey": int}, ...]}
    READ_REQ    (7)  n x (rkey u64, offset u64, length u64), 1 <= n <= MAX_READ_OPS (1024),
                     sum of lengths <= MAX_READ_BYTES (16 MiB)
    READ_DATA   (8)  the n ranges' bytes, concatenated in request order
    EXT_REQ     (9)  name length u16 || name (UTF-8) || extension payload
    EXT_RESP   (10)  the extension's reply
    ERROR      (15)  code u16 || detail u32 || message (UTF-8)

A READ_REQ is answered either by READ_DATA or, when any of its reads names an
unknown rkey or does not lie within its region (``offset + length <= region
length``, checked with unbounded integers), by an ERROR with code
UNKNOWN_RKEY (5) or OUT_OF_BOUNDS (6) and ``detail`` = index of the first bad
read; no data is sent for that request and the connection stays usable, as it
does after CATALOG_FAILED (7), NO_SUCH_EXTENSION (8) and EXTENSION_FAILED (9).
PROTOCOL (1), VERSION (2), FSID_MISMATCH (3) and AUTH_FAILED (4) are followed
by the server closing the connection. There is no write request: the
protocol is read-only by construction.
"""
from __future__ import annotations

import enum
import errno
import hashlib
import hmac
import json
import logging
import math
import os
import secrets
import socket
import struct
import threading
from collections import deque
from functools import partial
from typing import Any, NamedTuple, cast
from collections.abc import Callable, Iterator, Mapping, Sequence

import trio
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.poly1305 import Poly1305

from .base import (
    AuthError,
    Catalog,
    ConnectError,
    Connection,
    ControlExtension,
    ControlSession,
    ExportBackend,
    ExportedRegion,
    FsidMismatch,
    ProgressFn,
    ProtocolError,
    RegionDesc,
    RegionRole,
    RemoteAccessError,
    TransportError,
)

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 2
MAGIC = b"RMSW"
HEADER = struct.Struct("!4sHHIQ")
HEADER_SIZE = HEADER.size                # 20
MAX_HANDSHAKE_PAYLOAD = 4096             # unauthenticated peers cannot make us allocate more
MAX_PAYLOAD = 16 << 20
MAX_READ_OPS = 1024                      # = IOV_MAX: one gathered sendmsg per response
MAX_READ_BYTES = 16 << 20
# An authenticated peer silent this long between requests is dropped, so leaked or stuck clients do
# not hold fds for ever. Generous: a lazily loading new owner asks its fallback source only when the
# store fails a page, and reconnects on the next batch after a drop (recovery.ReconnectingSource).
IDLE_TIMEOUT = 300.0
READ_OP = struct.Struct("!QQQ")
ERROR_HEAD = struct.Struct("!HI")
NONCE_SIZE = 32
MAC_SIZE = 32
TAG_SIZE = 16                            # Poly1305
_U64 = 1 << 64
_IOV_MAX = 1024
_THREAD_TAG_BYTES = 1 << 20             # replies this large are tagged in a worker thread
_SNAPSHOT_READ_BYTES = 64 << 10         # READ_DATA this small is copied before it is tagged (_read_ranges)
_RECV_CHUNK = 64 << 10                # first allocation for an incoming frame; doubles as bytes arrive
_CLIENT_LABEL = b"rmemfs-software-v2 client"
_SERVER_LABEL = b"rmemfs-software-v2 server"
_C2S_LABEL = b"rmemfs-software-v2 c2s"
_S2C_LABEL = b"rmemfs-software-v2 s2c"

# Client pipelining. Requests are small and the server reads the next one only
# after sending the previous reply, so unread request bytes must fit in the
# kernel's socket buffers or both sides could block in send(); 64 KiB is far
# below the smallest default (tcp_rmem initial 128 KiB).
_REQ_DATA_TARGET = 8 << 20               # data bytes per READ_REQ
_WINDOW = 4                              # READ_REQs in flight
_INFLIGHT_REQ_BYTES = 64 << 10


class Frame(enum.IntEnum):
    HELLO = 1
    CHALLENGE = 2
    AUTH = 3
    WELCOME = 4
    CATALOG_REQ = 5
    CATALOG = 6
    READ_REQ = 7
    READ_DATA = 8
    EXT_REQ = 9
    EXT_RESP = 10
    ERROR = 15


class Err(enum.IntEnum):
    PROTOCOL = 1
    VERSION = 2
    FSID_MISMATCH = 3
    AUTH_FAILED = 4
    UNKNOWN_RKEY = 5
    OUT_OF_BOUNDS = 6
    CATALOG_FAILED = 7
    NO_SUCH_EXTENSION = 8
    EXTENSION_FAILED = 9


_FRAME_TYPES = frozenset(int(f) for f in Frame)


def _mac(secret: bytes, label: bytes, cn: bytes, sn: bytes, fsid: str) -> bytes:
    return hmac.new(secret, label + cn + sn + fsid.encode(), hashlib.sha256).digest()


class FrameAuth:
    """One direction's frame tags after the handshake (see the module docstring): ``start()`` gives the
    next frame's authenticator (keyed for that frame's sequence number) and counts the frame."""

    def __init__(self, key: bytes) -> None:
        self._key = key
        self.seq = 0

    def start(self) -> Poly1305:
        one_time = hashlib.blake2b(self.seq.to_bytes(8, "big"), key=self._key, digest_size=32).digest()
        self.seq += 1
        return Poly1305(one_time)

    def tag(self, parts: Sequence[Any]) -> bytes:
        auth = self.start()
        for part in parts:
            auth.update(part)
        return auth.finalize()


def session_auth(secret: bytes, cn: bytes, sn: bytes, fsid: str) -> tuple[FrameAuth, FrameAuth]:
    """(client-to-server, server-to-client) frame authenticators for the connection with these nonces."""
    return (FrameAuth(_mac(secret, _C2S_LABEL, cn, sn, fsid)),
            FrameAuth(_mac(secret, _S2C_LABEL, cn, sn, fsid)))


class _IntegrityError(ProtocolError):
    """A frame's tag did not verify: altered, replayed, reordered or dropped frames on the way."""


def _advance(bufs: list[Any], i: int, n: int) -> int:
    """After a gathered send or scattered receive of ``n`` bytes from ``bufs[i:]``: the index of the first
    buffer not yet complete, with a partly done one cut down to its rest."""
    while n:
        size = len(bufs[i])
        if n >= size:
            n -= size
            i += 1
        else:
            bufs[i] = memoryview(bufs[i])[n:]
            n = 0
    return i


def _header(ftype: Frame, length: int, req_id: int, version: int = PROTOCOL_VERSION) -> bytes:
    return HEADER.pack(MAGIC, version, ftype, length, req_id)


def _error_payload(code: Err, message: str, detail: int = 0) -> bytes:
    return ERROR_HEAD.pack(code, detail) + message.encode("utf-8", "replace")


def _parse_header(hdr: bytes | bytearray | memoryview, limit: int) -> tuple[int, int, int]:
    """Validate a header; return (type, length, request id) or raise ProtocolError."""
    magic, version, ftype, length, req_id = HEADER.unpack(hdr)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {bytes(magic)!r} (not an rmemfs software transport peer?)")
    if version != PROTOCOL_VERSION:
        raise _VersionError(version, f"protocol version {version} not supported (this side speaks "
                                     f"{PROTOCOL_VERSION}): run the same rmemfs release on both hosts")
    if ftype not in _FRAME_TYPES:
        raise ProtocolError(f"unknown frame type {ftype}")
    if length > limit:
        raise ProtocolError(f"frame of {length} bytes exceeds the limit of {limit}")
    return ftype, length, req_id


class _VersionError(ProtocolError):
    def __init__(self, version: int, message: str) -> None:
        super().__init__(message)
        self.version = version


class _RequestRefused(TransportError):
    """The exporter refused one control request (catalog, extension); the connection stays usable."""


class _PeerClosed(Exception):
    """The peer closed the connection between frames (not an error on the server)."""


class _Idle(Exception):
    """An authenticated peer sent nothing for the idle timeout (dropped; not an error on the server)."""


def _as_bytes_view(buf: memoryview) -> memoryview:
    return buf if buf.format == "B" and buf.ndim == 1 else buf.cast("B")


# --- exporter side ---------------------------------------------------------

class _Export(NamedTuple):
    desc: RegionDesc
    view: memoryview
    fd: int          # the region file, or -1: then reads go through the mapping


class SoftwareExportBackend(ExportBackend):
    """Registers existing mappings under random 64-bit rkeys; never copies them."""

    name = "software"

    def __init__(self) -> None:
        self._by_id: dict[int, RegionDesc] = {}
        # rkey -> region; read directly by the server's read path.
        self._by_rkey: dict[int, _Export] = {}

    def register(self, region: ExportedRegion) -> RegionDesc:
        view = _as_bytes_view(region.buffer)
        old = self._by_id.get(region.region_id)
        if old is not None:
            if old.name == region.name and old.length == view.nbytes and old.addr == region.addr:
                return old
            # The region was remapped (e.g. grown): old rkey must stop working.
            log.info("region %d (%s) changed mapping; re-registering", region.region_id, region.name)
            self.deregister(region.region_id)
        rkey = 0
        while rkey == 0 or rkey in self._by_rkey:   # non-zero and unique, still 64 random bits
            rkey = secrets.randbits(64)
        desc = RegionDesc(region.region_id, region.name, region.role, region.addr, view.nbytes, rkey)
        self._by_id[region.region_id] = desc
        self._by_rkey[rkey] = _Export(desc, view, region.fd)
        return desc

    def deregister(self, region_id: int) -> None:
        desc = self._by_id.pop(region_id, None)
        if desc is not None:
            self._by_rkey.pop(desc.rkey, None)

    def lookup(self, rkey: int) -> tuple[RegionDesc, memoryview]:
        try:
            entry = self._by_rkey[rkey]
        except KeyError:
            raise RemoteAccessError(f"unknown rkey {rkey:#x}") from None
        return entry.desc, entry.view

    def close(self) -> None:
        self._by_id.clear()
        self._by_rkey.clear()


_ZEROS = memoryview(bytes(1 << 20))    # what a hole in a region file sends


def _first_data(fd: int, off: int, end: int) -> int:
    """Where [off, end) of the file first holds data (``end``: nowhere)."""
    try:
        return min(end, os.lseek(fd, off, os.SEEK_DATA))
    except OSError as e:
        if e.errno == errno.ENXIO:       # no data after off
            return end
        raise


def _read_ranges(wanted: Sequence[tuple[_Export, int, int]], total: int) -> list[bytes | memoryview]:
    """The bytes of each (region, offset, length) for a READ_DATA of ``total`` bytes.

    A reply up to _SNAPSHOT_READ_BYTES is a copy, so that the tag covers the very bytes sent: memory a
    live filesystem still writes (its heartbeat) cannot change between the tag and the send. From a
    region with its file the copy is a pread, which reads a hole as zeros without allocating a tmpfs page
    (a read fault through a MAP_SHARED mapping allocates one). A larger reply is sent from the mapping
    without a copy (a pread costs 2.5x a copy from the mapping, and 40 % of the transport's 1 MiB
    throughput): it is read after a fence, from memory nothing writes any more; what of each range
    is a hole before its first data page (found with SEEK_DATA, cheap, unlike SEEK_HOLE on tmpfs,
    which walks every data page after the offset) is sent as zeros, so a freed extent in a dirty run
    is not allocated by reading it. Holes after a range's first data page are read through the mapping.
    """
    out: list[bytes | memoryview] = []
    small = total <= _SNAPSHOT_READ_BYTES
    for entry, off, length in wanted:
        if small and entry.fd >= 0:
            data = os.pread(entry.fd, length, off)
            if len(data) != length:   # region files never shrink while exported
                raise RemoteAccessError(f"region {entry.desc.name} is shorter than its mapping")
            out.append(data)
        elif small:
            out.append(bytes(entry.view[off:off + length]))
        else:
            end = off + length
            data_at = _first_data(entry.fd, off, end) if entry.fd >= 0 else off
            for at in range(off, data_at, len(_ZEROS)):
                out.append(_ZEROS[:min(len(_ZEROS), data_at - at)])
            if data_at < end:
                out.append(entry.view[data_at:end])
    return out


def _catalog_json(cat: Catalog) -> bytes:
    return json.dumps({
        "fsid": cat.fsid,
        "transport": cat.transport,
        "regions": [
            {"region_id": r.region_id, "name": r.name, "role": r.role.value,
             "addr": r.addr, "length": r.length, "rkey": r.rkey}
            for r in cat.regions
        ],
    }).encode()


def _catalog_from_json(data: bytes) -> Catalog:
    try:
        obj = json.loads(data)
        regions = tuple(
            RegionDesc(int(r["region_id"]), str(r["name"]), RegionRole(r["role"]),
                       int(r["addr"]), int(r["length"]), int(r["rkey"]))
            for r in obj["regions"]
        )
        return Catalog(str(obj["fsid"]), str(obj["transport"]), regions)
    except (ValueError, KeyError, TypeError) as e:
        raise ProtocolError(f"malformed catalog: {e}") from None


class _ServerConn:
    """One accepted connection, handled in its own trio task."""

    def __init__(self, sock: trio.socket.SocketType, peer: str, fsid: str, secret: bytes,
                 export: SoftwareExportBackend, catalog: Callable[[str], Catalog],
                 extensions: Mapping[str, ControlExtension], frame_timeout: float,
                 idle_timeout: float = math.inf) -> None:
        self.sock = sock
        self.peer = peer
        self.fsid = fsid
        self.secret = secret
        self.export = export
        self.catalog = catalog
        self.extensions = extensions
        self.frame_timeout = frame_timeout
        self.idle_timeout = idle_timeout
        self._hdr = bytearray(HEADER_SIZE)
        self.scope = trio.CancelScope()    # cancelled to evict it while it is still in its handshake
        self.session = ControlSession(peer)  # what extensions hold for this client, freed when it ends
        self._rx: FrameAuth | None = None   # set once authenticated: every frame is tagged from then on
        self._tx: FrameAuth | None = None
        self._tag = bytearray(TAG_SIZE)

    async def _recv_into(self, view: memoryview, between_frames: bool) -> None:
        got = 0
        while got < len(view):
            n = await self.sock.recv_into(view[got:])
            if n == 0:
                if between_frames and got == 0:
                    raise _PeerClosed()
                raise ProtocolError(f"truncated frame: connection closed after {got} of {len(view)} bytes")
            got += n

    async def recv_frame(self, limit: int, idle_timeout: float = math.inf) -> tuple[int, int, bytearray]:
        """The next frame; _Idle if not even its first byte comes within ``idle_timeout``."""
        with trio.move_on_after(idle_timeout) as idle:
            await self._recv_into(memoryview(self._hdr)[:1], between_frames=True)
        if idle.cancelled_caught:
            raise _Idle()
        # A peer that starts a frame and then stalls must not hold the task forever.
        with trio.fail_after(self.frame_timeout):
            await self._recv_into(memoryview(self._hdr)[1:], between_frames=False)
            ftype, length, req_id = _parse_header(self._hdr, limit)
            # Never allocate the announced size up front: many peers announcing 16 MiB
            # and sending nothing would cost 16 MiB each. Grow as bytes arrive.
            payload = bytearray(min(length, _RECV_CHUNK))
            if length:
                got = 0
                while got < length:
                    if got == len(payload):
                        payload.extend(bytes(min(length - got, len(payload))))
                    await self._recv_into(memoryview(payload)[got:], between_frames=False)
                    got = len(payload)
            if self._rx is not None:
                auth = self._rx.start()
                await self._recv_into(memoryview(self._tag), between_frames=False)
                auth.update(bytes(self._hdr))
                auth.update(cast(bytes, payload))   # any buffer works; the stub says bytes
                try:
                    auth.verify(bytes(self._tag))
                except InvalidSignature:
                    raise _IntegrityError(f"frame {self._rx.seq - 1} failed its integrity check (altered, "
                                          f"replayed or reordered on the way?)") from None
        return ftype, req_id, payload

    async def send(self, bufs: list[Any], nbytes: int = 0) -> None:
        """Send one frame's buffers (``nbytes`` of payload, if known), gathered, handling partial sends
        (no copies); tagged once authenticated."""
        tx = self._tx
        if tx is None:
            await self._send_all(bufs)
        elif nbytes < _THREAD_TAG_BYTES:
            await self._send_all([*bufs, tx.tag(bufs)])
        else:
            # Tag a large reply in a thread (Poly1305 drops the GIL) while the loop sends it: other
            # connections are not held up for the milliseconds it takes, and hashing overlaps sending.
            tag: list[bytes] = []

            async def compute() -> None:
                tag.append(await trio.to_thread.run_sync(tx.tag, list(bufs)))

            failure: Exception | None = None
            async with trio.open_nursery() as nursery:
                nursery.start_soon(compute)
                try:
                    await self._send_all(bufs)
                except Exception as e:   # raised as itself, not in the nursery's ExceptionGroup
                    failure = e
                    nursery.cancel_scope.cancel()
            if failure is not None:
                raise failure
            await self._send_all(tag)

    async def _send_all(self, bufs: list[Any]) -> None:
        bufs = [b for b in bufs if len(b)]
        i = 0
        while i < len(bufs):
            i = _advance(bufs, i, await self.sock.sendmsg(bufs[i:i + _IOV_MAX]))

    async def send_frame(self, ftype: Frame, req_id: int, payload: bytes = b"", version: int = PROTOCOL_VERSION) -> None:
        await self.send([_header(ftype, len(payload), req_id, version), payload])

    async def send_error(self, req_id: int, code: Err, message: str, detail: int = 0,
                         version: int = PROTOCOL_VERSION) -> None:
        await self.send_frame(Frame.ERROR, req_id, _error_payload(code, message, detail), version)

    async def handshake(self) -> bool:
        ftype, _, payload = await self.recv_frame(MAX_HANDSHAKE_PAYLOAD)
        if ftype != Frame.HELLO or len(payload) < NONCE_SIZE:
            raise ProtocolError(f"expected HELLO, got frame type {ftype} of {len(payload)} bytes")
        cn = bytes(payload[:NONCE_SIZE])
        try:
            asked = payload[NONCE_SIZE:].decode()
        except UnicodeDecodeError:
            raise ProtocolError("fsid in HELLO is not UTF-8") from None
        if asked != self.fsid:
            msg = f"filesystem id mismatch: client asked for {asked!r}"
            # The peer is unauthenticated: the real fsid goes to our log only.
            log.warning("%s: %s, this exporter serves %r; dropping", self.peer, msg, self.fsid)
            await self.send_error(0, Err.FSID_MISMATCH, msg + ", which this exporter does not serve")
            return False
        sn = secrets.token_bytes(NONCE_SIZE)
        await self.send_frame(Frame.CHALLENGE, 0, sn)
        ftype, _, payload = await self.recv_frame(MAX_HANDSHAKE_PAYLOAD)
        if ftype != Frame.AUTH or len(payload) != MAC_SIZE:
            raise ProtocolError(f"expected AUTH, got frame type {ftype} of {len(payload)} bytes")
        if not hmac.compare_digest(bytes(payload), _mac(self.secret, _CLIENT_LABEL, cn, sn, self.fsid)):
            log.warning("%s: authentication failed (wrong secret for %r); dropping", self.peer, self.fsid)
            await self.send_error(0, Err.AUTH_FAILED, "authentication failed: wrong filesystem secret")
            return False
        await self.send_frame(Frame.WELCOME, 0, _mac(self.secret, _SERVER_LABEL, cn, sn, self.fsid))
        self._rx, self._tx = session_auth(self.secret, cn, sn, self.fsid)
        log.info("%s: authenticated for %r", self.peer, self.fsid)
        return True

    async def serve_requests(self) -> None:
        while True:
            ftype, req_id, payload = await self.recv_frame(MAX_PAYLOAD, self.idle_timeout)
            if ftype == Frame.READ_REQ:
                await self.handle_read(req_id, payload)
            elif ftype == Frame.CATALOG_REQ:
                await self.handle_catalog(req_id, payload)
            elif ftype == Frame.EXT_REQ:
                await self.handle_extension(req_id, payload)
            else:
                raise ProtocolError(f"unexpected frame type {ftype} after the handshake")

    async def handle_read(self, req_id: int, payload: bytearray) -> None:
        n, rem = divmod(len(payload), READ_OP.size)
        if rem or not 1 <= n <= MAX_READ_OPS:
            raise ProtocolError(f"READ_REQ of {len(payload)} bytes is not 1..{MAX_READ_OPS} reads")
        vals = struct.unpack(f"!{3 * n}Q", payload)
        regions = self.export._by_rkey
        wanted: list[tuple[_Export, int, int]] = []
        total = 0
        for i, (rkey, off, length) in enumerate(zip(vals[0::3], vals[1::3], vals[2::3], strict=True)):
            entry = regions.get(rkey)
            if entry is None:
                log.info("%s: read %d of request %d: unknown rkey %#x", self.peer, i, req_id, rkey)
                await self.send_error(req_id, Err.UNKNOWN_RKEY, f"unknown rkey {rkey:#x}", i)
                return
            size = len(entry.view)
            # Python ints cannot overflow; still compare as "length <= size - off" for clarity.
            if off > size or length > size - off:
                msg = (f"read of {length} bytes at offset {off} outside region {entry.desc.name} "
                       f"of {size} bytes (rkey {rkey:#x})")
                log.info("%s: request %d: %s", self.peer, req_id, msg)
                await self.send_error(req_id, Err.OUT_OF_BOUNDS, msg, i)
                return
            total += length
            wanted.append((entry, off, length))
        if total > MAX_READ_BYTES:
            raise ProtocolError(f"READ_REQ asks for {total} bytes, over the limit of {MAX_READ_BYTES}")
        try:
            pieces = _read_ranges(wanted, total)
        except RemoteAccessError as e:
            log.warning("%s: request %d: %s", self.peer, req_id, e)
            await self.send_error(req_id, Err.OUT_OF_BOUNDS, str(e))
            return
        bufs: list[Any] = [b"", *pieces]
        bufs[0] = _header(Frame.READ_DATA, total, req_id)
        await self.send(bufs, total)

    async def handle_catalog(self, req_id: int, payload: bytearray) -> None:
        try:
            transport = payload.decode()
            cat = self.catalog(transport)
        except (TransportError, UnicodeDecodeError) as e:
            log.warning("%s: catalog request failed: %s", self.peer, e)
            await self.send_error(req_id, Err.CATALOG_FAILED, str(e))
            return
        except Exception as e:   # a bug in the catalog callback must not take the exporter down
            log.exception("%s: catalog callback failed", self.peer)
            await self.send_error(req_id, Err.CATALOG_FAILED, f"catalog failed: {e!r}")
            return
        await self.send_frame(Frame.CATALOG, req_id, _catalog_json(cat))

    async def handle_extension(self, req_id: int, payload: bytearray) -> None:
        if len(payload) < 2:
            raise ProtocolError("EXT_REQ shorter than its name length")
        (nlen,) = struct.unpack_from("!H", payload)
        if 2 + nlen > len(payload):
            raise ProtocolError("EXT_REQ name runs past the frame")
        name = payload[2:2 + nlen].decode("utf-8", "replace")
        ext = self.extensions.get(name)
        if ext is None:
            await self.send_error(req_id, Err.NO_SUCH_EXTENSION, f"no control extension named {name!r}")
            return
        try:
            reply = ext.handle_in(self.session, bytes(payload[2 + nlen:]))
        except TransportError as e:  # a refusal (e.g. a resource cap): one line, no traceback
            log.warning("%s: control extension %r refused: %s", self.peer, name, e)
            await self.send_error(req_id, Err.EXTENSION_FAILED, f"extension {name!r} refused: {e}")
            return
        except Exception as e:  # an extension's bug must not take the exporter down
            log.exception("%s: control extension %r failed", self.peer, name)
            await self.send_error(req_id, Err.EXTENSION_FAILED, f"extension {name!r} failed: {e}")
            return
        if len(reply) > MAX_PAYLOAD:
            await self.send_error(req_id, Err.EXTENSION_FAILED, f"extension {name!r} reply too large")
            return
        await self.send_frame(Frame.EXT_RESP, req_id, reply)

    async def run(self, handshake_timeout: float, authenticated: Callable[[], None] = lambda: None) -> None:
        try:
            try:
                with trio.fail_after(handshake_timeout):
                    if not await self.handshake():
                        return
            except trio.TooSlowError:
                log.warning("%s: no handshake within %.1fs; dropping", self.peer, handshake_timeout)
                return
            authenticated()
            await self.serve_requests()
        except _PeerClosed:
            log.info("%s: closed the connection", self.peer)
        except _Idle:
            log.info("%s: idle for %gs; dropping", self.peer, self.idle_timeout)
        except trio.TooSlowError:
            log.warning("%s: frame not completed within %.1fs; dropping", self.peer, self.frame_timeout)
        except _VersionError as e:
            log.warning("%s: protocol error: %s; dropping", self.peer, e)
            # Framed in the peer's own version where we know it, so that it can read why.
            version, msg = PROTOCOL_VERSION, str(e)
            if e.version == 1 and self._tx is None:
                version = 1
                msg = (f"this exporter speaks software transport protocol version {PROTOCOL_VERSION} "
                       f"(frames authenticated after the handshake), not 1: upgrade rmemfs on the initiator")
            with trio.move_on_after(1):
                try:
                    await self.send_error(0, Err.VERSION, msg, version=version)
                except OSError:
                    pass
        except ProtocolError as e:
            log.warning("%s: protocol error: %s; dropping", self.peer, e)
            with trio.move_on_after(1):   # best effort; the peer may not be reading
                try:
                    await self.send_error(0, Err.PROTOCOL, str(e))
                except OSError:
                    pass
        except OSError as e:
            log.info("%s: connection lost: %s", self.peer, e)
        except Exception:
            log.exception("%s: unexpected error; dropping", self.peer)
        finally:
            self.session.close()
            self.sock.close()


async def serve(*, host: str, port: int, fsid: str, secret: bytes,
                export: SoftwareExportBackend,
                catalog: Callable[[str], Catalog],
                extensions: Mapping[str, ControlExtension] = {},
                handshake_timeout: float = 10.0,
                frame_timeout: float = 30.0,
                idle_timeout: float = IDLE_TIMEOUT,
                max_unauthenticated: int = 64,
                max_unauthenticated_per_source: int = 16,
                task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve authenticated reads of ``export``'s regions until cancelled.

    ``task_status.started()`` gets the bound port (useful with ``port=0``).
    ``handshake_timeout`` bounds a peer's whole handshake; ``frame_timeout``
    bounds how long an authenticated peer may take to finish a started frame;
    one that starts none for ``idle_timeout`` seconds is dropped.
    At most ``max_unauthenticated`` connections (``max_unauthenticated_per_source``
    per source address) may be in their handshake at once; more are closed at
    accept, so a flood of idle connections cannot use up the fds that
    authenticated readers need.
    """
    if not secret:
        raise ValueError("the filesystem secret must not be empty")
    infos = await trio.socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                          flags=socket.AI_PASSIVE)
    family, type_, proto, _, addr = infos[0]
    lsock = trio.socket.socket(family, type_, proto)
    with lsock:
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        await lsock.bind(addr)
        lsock.listen(128)
        bound = lsock.getsockname()[1]
        log.info("software transport serving %r on %s:%d", fsid, host, bound)
        pending = _Pending()
        async with trio.open_nursery() as nursery:
            task_status.started(bound)
            while True:
                try:
                    sock, peer_addr = await lsock.accept()
                except OSError as e:   # e.g. EMFILE: keep serving the connections we have
                    log.warning("accept failed: %s", e)
                    await trio.sleep(0.1)
                    continue
                src = peer_addr[0]
                peer = f"{src}:{peer_addr[1]}"
                if pending.per_source.get(src, 0) >= max_unauthenticated_per_source:
                    log.warning("%s: too many connections from %s in their handshake; refusing", peer, src)
                    sock.close()
                    continue
                if len(pending.scopes) >= max_unauthenticated:
                    # Evict the oldest instead of refusing: a steady flood then cannot
                    # keep a legitimate client out for longer than one accept.
                    oldest = next(iter(pending.scopes))
                    log.warning("%s: too many connections in their handshake; dropping the oldest, %s",
                                peer, oldest.peer)
                    pending.release(oldest)
                    oldest.scope.cancel()
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn = _ServerConn(sock, peer, fsid, secret, export, catalog, extensions, frame_timeout,
                                   idle_timeout)
                pending.add(conn, src)
                nursery.start_soon(_run_counted, conn, handshake_timeout, pending,
                                   name=f"software-conn {peer}")


class _Pending:
    """Connections still in their handshake, oldest first, and their count per source address."""

    def __init__(self) -> None:
        self.scopes: dict[_ServerConn, str] = {}
        self.per_source: dict[str, int] = {}

    def add(self, conn: _ServerConn, src: str) -> None:
        self.scopes[conn] = src
        self.per_source[src] = self.per_source.get(src, 0) + 1

    def release(self, conn: _ServerConn) -> None:
        src = self.scopes.pop(conn, None)
        if src is not None:
            self.per_source[src] -= 1
            if not self.per_source[src]:
                del self.per_source[src]


async def _run_counted(conn: _ServerConn, handshake_timeout: float, pending: _Pending) -> None:
    """Run ``conn``, counted in ``pending`` until it authenticates or ends; evictable meanwhile."""
    with conn.scope:
        try:
            await conn.run(handshake_timeout, partial(pending.release, conn))
        finally:
            pending.release(conn)


# --- initiator side --------------------------------------------------------

def _set_io_timeout(sock: socket.socket, timeout: float) -> None:
    # Kernel timeouts (not Python's settimeout, which makes the fd non-blocking)
    # keep MSG_WAITALL working: one recvmsg_into fills a whole response.
    frac, whole = math.modf(max(timeout, 0.001))
    tv = struct.pack("ll", int(whole), int(frac * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


class SoftwareConnection(Connection):
    """An authenticated connection to an exporter; all socket I/O runs in worker threads."""

    transport = "software"

    def __init__(self, sock: socket.socket, host: str, port: int, fsid: str, timeout: float) -> None:
        self._sock = sock
        self._where = f"{host}:{port}"
        self._fsid = fsid
        self._timeout = timeout
        self._lock = trio.Lock()
        self._next_id = 1
        self._broken: str | None = None
        self._hdr = bytearray(HEADER_SIZE)
        self._abandoned = threading.Event()
        self._tx: FrameAuth | None = None   # set by the handshake: every frame is tagged from then on
        self._rx: FrameAuth | None = None
        self._rx_auth: Poly1305 | None = None   # the incoming frame's, fed as its parts arrive
        self._tag = bytearray(TAG_SIZE)

    def __repr__(self) -> str:
        return f"<SoftwareConnection {self._where} fsid={self._fsid!r}{' broken' if self._broken else ''}>"

    # -- blocking helpers, run in a worker thread --

    def _recv_into(self, view: memoryview) -> None:
        got = 0
        while got < len(view):
            n = self._sock.recv_into(view[got:], 0, socket.MSG_WAITALL)
            if n == 0:
                raise TransportError(f"{self._where}: connection closed by the exporter")
            got += n

    def _recv_frame_header(self, req_id: int) -> tuple[int, int]:
        self._recv_into(memoryview(self._hdr))
        if self._rx is not None:
            self._rx_auth = self._rx.start()
            self._rx_auth.update(bytes(self._hdr))
        try:
            ftype, length, got_id = _parse_header(self._hdr, MAX_PAYLOAD)
        except _VersionError as e:
            raise _VersionError(e.version, f"{self._where}: the exporter speaks software transport protocol "
                                           f"version {e.version}, this rmemfs {PROTOCOL_VERSION}: run the same "
                                           f"rmemfs release on both hosts") from None
        if got_id != req_id and not (ftype == Frame.ERROR and got_id == 0):
            raise ProtocolError(f"response to request {got_id} while expecting {req_id}")
        return ftype, length

    def _recv_payload(self, length: int) -> bytes:
        buf = bytearray(length)
        self._recv_into(memoryview(buf))
        self._verify((buf,))
        return bytes(buf)

    def _verify(self, parts: Sequence[Any]) -> None:
        """Check the tag that ends the frame whose header and payload (``parts``) were just received."""
        auth, self._rx_auth = self._rx_auth, None
        if auth is None:
            return                   # a handshake frame: the handshake authenticates itself
        for part in parts:
            auth.update(part)
        self._recv_into(memoryview(self._tag))
        try:
            auth.verify(bytes(self._tag))
        except InvalidSignature:
            assert self._rx is not None
            raise _IntegrityError(f"{self._where}: reply {self._rx.seq - 1} failed its integrity check "
                                  f"(altered, replayed or reordered on the way?)") from None

    def _error_from(self, payload: bytes, context: str = "") -> TransportError:
        if len(payload) < ERROR_HEAD.size:
            return ProtocolError(f"{self._where}: malformed ERROR frame")
        code, _detail = ERROR_HEAD.unpack_from(payload)
        msg = payload[ERROR_HEAD.size:].decode("utf-8", "replace")
        where = f"{self._where}: {context}{msg}"
        if code == Err.FSID_MISMATCH:
            return FsidMismatch(where)
        if code == Err.AUTH_FAILED:
            return AuthError(where)
        if code in (Err.UNKNOWN_RKEY, Err.OUT_OF_BOUNDS):
            return RemoteAccessError(where)
        if code in (Err.CATALOG_FAILED, Err.NO_SUCH_EXTENSION, Err.EXTENSION_FAILED):
            return _RequestRefused(where)
        return ProtocolError(where)

    def _send(self, frame: bytes) -> None:
        """Send one whole frame (header and payload), tagged once authenticated."""
        if self._tx is not None:
            frame += self._tx.tag((frame,))
        self._sock.sendall(frame)

    def _call(self, ftype: Frame, payload: bytes, want: Frame) -> bytes:
        """One request/response exchange on the control path."""
        req_id = self._next_id
        self._next_id += 1
        self._send(_header(ftype, len(payload), req_id) + payload)
        rtype, length = self._recv_frame_header(req_id)
        data = self._recv_payload(length)
        if rtype == Frame.ERROR:
            raise self._error_from(data)
        if rtype != want:
            raise ProtocolError(f"{self._where}: expected frame type {want}, got {rtype}")
        return data

    def _handshake(self, secret: bytes) -> None:
        cn = secrets.token_bytes(NONCE_SIZE)
        fsid_b = self._fsid.encode()
        if len(fsid_b) > MAX_HANDSHAKE_PAYLOAD - NONCE_SIZE:
            raise ValueError("fsid too long")
        self._send(_header(Frame.HELLO, NONCE_SIZE + len(fsid_b), 0) + cn + fsid_b)
        ftype, length = self._recv_frame_header(0)
        payload = self._recv_payload(length)
        if ftype == Frame.ERROR:
            raise self._error_from(payload)
        if ftype != Frame.CHALLENGE or length != NONCE_SIZE:
            raise ProtocolError(f"{self._where}: expected CHALLENGE, got frame type {ftype}")
        sn = payload
        self._send(_header(Frame.AUTH, MAC_SIZE, 0) + _mac(secret, _CLIENT_LABEL, cn, sn, self._fsid))
        ftype, length = self._recv_frame_header(0)
        payload = self._recv_payload(length)
        if ftype == Frame.ERROR:
            raise self._error_from(payload)
        if ftype != Frame.WELCOME or length != MAC_SIZE:
            raise ProtocolError(f"{self._where}: expected WELCOME, got frame type {ftype}")
        if not hmac.compare_digest(payload, _mac(secret, _SERVER_LABEL, cn, sn, self._fsid)):
            raise AuthError(f"{self._where}: the exporter failed mutual authentication "
                            f"(it does not know the secret of {self._fsid!r})")
        self._tx, self._rx = session_auth(secret, cn, sn, self._fsid)

    def _plan(self, ops: Sequence[Any]) -> Iterator[tuple[bytes, list[memoryview], list[int], int]]:
        """Yield READ_REQs lazily (request payload, destination views, op indexes, data bytes).

        Lazy so that building request k+1 overlaps the exporter serving request k.
        """
        flat: list[int] = []
        dests: list[memoryview] = []
        idxs: list[int] = []
        total = 0
        for i, op in enumerate(ops):
            dest = op.dest
            if type(dest) is not memoryview:
                dest = memoryview(dest)
            if dest.readonly:
                raise ValueError(f"read {i}: destination buffer is read-only")
            if dest.format != "B" or dest.ndim != 1:
                dest = dest.cast("B")
            n = len(dest)
            rkey, off = op.rkey, op.offset
            if not (0 <= rkey < _U64 and 0 <= off and off + n <= _U64):
                raise RemoteAccessError(f"{self._where}: read {i} (rkey {rkey:#x}, offset {off}, "
                                        f"length {n}) failed: outside the 64-bit address space")
            start = 0
            while start < n:   # a read larger than one request is split
                piece = dest if n <= _REQ_DATA_TARGET else dest[start:start + _REQ_DATA_TARGET]
                ln = len(piece)
                if dests and (len(dests) == MAX_READ_OPS or total + ln > _REQ_DATA_TARGET):
                    yield struct.pack(f"!{len(flat)}Q", *flat), dests, idxs, total
                    flat, dests, idxs, total = [], [], [], 0
                flat += (rkey, off + start, ln)
                dests.append(piece)
                idxs.append(i)
                total += ln
                start += ln
        if dests:
            yield struct.pack(f"!{len(flat)}Q", *flat), dests, idxs, total

    def _scatter(self, bufs: list[memoryview]) -> None:
        """Receive straight into the destination views, up to IOV_MAX per system call."""
        bufs = list(bufs)
        i = 0
        while i < len(bufs):
            n = self._sock.recvmsg_into(bufs[i:i + _IOV_MAX], 0, socket.MSG_WAITALL)[0]
            if n == 0:
                raise TransportError(f"{self._where}: connection closed by the exporter mid-read")
            i = _advance(bufs, i, n)

    def _read_sync(self, ops: Sequence[Any], progress: ProgressFn | None) -> None:
        plan = self._plan(ops)
        pending = next(plan, None)
        inflight: deque[tuple[int, tuple[bytes, list[memoryview], list[int], int]]] = deque()
        inflight_bytes = 0
        first_err: Exception | None = None
        while True:
            # Keep the pipe full, unless a read failed: then only drain what was sent.
            while (first_err is None and pending is not None and len(inflight) < _WINDOW
                   and (not inflight or inflight_bytes + len(pending[0]) <= _INFLIGHT_REQ_BYTES)):
                payload = pending[0]
                req_id = self._next_id
                self._next_id += 1
                self._send(_header(Frame.READ_REQ, len(payload), req_id) + payload)
                inflight.append((req_id, pending))
                inflight_bytes += len(payload)
                try:
                    pending = next(plan, None)
                except (ValueError, RemoteAccessError) as e:   # a bad op later in the list
                    first_err, pending = e, None
            if not inflight:
                break
            req_id, (payload, dests, idxs, total) = inflight.popleft()
            inflight_bytes -= len(payload)
            ftype, length = self._recv_frame_header(req_id)
            if ftype == Frame.READ_DATA:
                if length != total:
                    raise ProtocolError(f"{self._where}: READ_DATA of {length} bytes, expected {total}")
                self._scatter(dests)
                self._verify(dests)   # the data is in the caller's buffers, but no good until this passes
                if progress is not None and first_err is None and not self._abandoned.is_set():
                    trio.from_thread.run_sync(progress, total)
            elif ftype == Frame.ERROR:
                data = self._recv_payload(length)
                err = self._error_from(data)
                if not isinstance(err, RemoteAccessError):
                    raise err
                if first_err is None:
                    _, detail = ERROR_HEAD.unpack_from(data)
                    k = idxs[detail] if detail < len(idxs) else idxs[0]
                    op = ops[k]
                    first_err = RemoteAccessError(
                        f"{self._where}: read {k} (rkey {op.rkey:#x}, offset {op.offset}, length {memoryview(op.dest).nbytes}) "
                        f"failed: {data[ERROR_HEAD.size:].decode('utf-8', 'replace')}")
            else:
                raise ProtocolError(f"{self._where}: unexpected frame type {ftype} in reply to a read")
        if first_err is not None:
            raise first_err

    # -- async API --

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._broken is not None:
            raise TransportError(f"{self._where}: connection unusable: {self._broken}")
        async with self._lock:
            if self._broken is not None:
                raise TransportError(f"{self._where}: connection unusable: {self._broken}")
            try:
                return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=True)
            except trio.Cancelled:
                # The stream is mid-frame; unblock the abandoned thread and give up on it.
                self._abandoned.set()
                self._break("an operation was cancelled mid-stream")
                raise
            except (RemoteAccessError, _RequestRefused, ValueError):
                raise   # clean failures: the stream is still in sync
            except (TimeoutError, BlockingIOError) as e:
                self._break("timed out")
                raise TransportError(f"{self._where}: no response within {self._timeout:g}s") from e
            except OSError as e:
                self._break(str(e))
                raise TransportError(f"{self._where}: {e.strerror or e}") from e
            except Exception as e:
                self._break(str(e))
                raise

    def _break(self, why: str) -> None:
        if self._broken is None:
            self._broken = why
            log.warning("%s: connection broken: %s", self._where, why)
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def peer_closed(self) -> bool:
        if self._lock.locked() or self._broken == "closed":
            return False             # mid-request the bytes are a reply; closed by us is not the peer
        if self._broken is not None:
            return True
        try:
            self._sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False             # nothing pending: open, as far as we can tell
        except OSError:
            return True              # reset
        return True                  # EOF, or bytes nobody asked for: the stream is unusable either way

    async def register(self) -> Catalog:
        """The registration handshake: the exporter's catalog of regions for this transport."""
        return await self.request_catalog("software")

    async def request_catalog(self, transport: str) -> Catalog:
        """The exporter's catalog of regions registered for ``transport`` (verbs asks over this channel)."""
        data = await self._run(self._call, Frame.CATALOG_REQ, transport.encode(), Frame.CATALOG)
        cat = _catalog_from_json(data)
        if cat.fsid != self._fsid:
            raise ProtocolError(f"{self._where}: catalog is for {cat.fsid!r}, not {self._fsid!r}")
        return cat

    async def read_batch(self, ops: Sequence[Any], progress: ProgressFn | None = None) -> None:
        if ops:
            await self._run(self._read_sync, ops, progress)

    async def call_extension(self, name: str, payload: bytes) -> bytes:
        """Call the exporter's control extension ``name`` (e.g. verbs QP exchange)."""
        nb = name.encode()
        if len(nb) > 0xFFFF or 2 + len(nb) + len(payload) > MAX_PAYLOAD:
            raise ValueError("extension name or payload too large")
        return await self._run(self._call, Frame.EXT_REQ, struct.pack("!H", len(nb)) + nb + payload,
                               Frame.EXT_RESP)

    async def aclose(self) -> None:
        if self._broken is None:
            self._broken = "closed"
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        async with self._lock:   # a running worker thread returns promptly after shutdown
            self._sock.close()


async def connect(host: str, port: int, *, fsid: str, secret: bytes,
                  timeout: float = 10.0) -> SoftwareConnection:
    """Connect and authenticate; ConnectError/AuthError/ProtocolError within about ``timeout``."""
    where = f"{host}:{port}"
    abandoned = threading.Event()

    def _open() -> SoftwareConnection:
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except TimeoutError:
            raise ConnectError(f"cannot connect to {where}: timed out after {timeout:g}s") from None
        except OSError as e:
            raise ConnectError(f"cannot connect to {where}: {e.strerror or e}") from None
        try:
            sock.settimeout(None)
            _set_io_timeout(sock, timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = SoftwareConnection(sock, host, port, fsid, timeout)
            conn._handshake(secret)
        except BlockingIOError:
            sock.close()
            raise ConnectError(f"cannot connect to {where}: handshake timed out after {timeout:g}s") from None
        except TransportError:
            sock.close()
            raise
        except OSError as e:
            sock.close()
            raise ConnectError(f"cannot connect to {where}: handshake failed: {e.strerror or e}") from None
        except BaseException:
            sock.close()
            raise
        if abandoned.is_set():
            sock.close()
        return conn

    # Name resolution can outlast socket timeouts, so bound the whole thing from trio too.
    with trio.move_on_after(timeout * 3 + 1):
        try:
            return await trio.to_thread.run_sync(_open, abandon_on_cancel=True)
        except trio.Cancelled:
            abandoned.set()
            raise
    abandoned.set()
    raise ConnectError(f"cannot connect to {where}: timed out after {timeout * 3 + 1:g}s")


def available() -> str | None:
    """The software transport needs only TCP: always available."""
    return None


def export_backend() -> SoftwareExportBackend:
    return SoftwareExportBackend()
