"""The software transport over real TCP sockets on 127.0.0.1 (no mocks).

The server is ``serve()`` in a trio task; regions are real read-only mmaps of
temp files with pseudo-random contents, so every read is checked byte for byte.
Hostile peers are raw sockets speaking (or mangling) the documented wire format.
"""
from __future__ import annotations

import contextlib
import logging
import mmap
import os
import random
import socket
import struct
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial

import pytest
import trio

from rmemfs.transport import base, software as sw
from rmemfs.transport.base import (
    AuthError, Catalog, ConnectError, ControlExtension, ExportedRegion, ProtocolError, ReadOp,
    RegionRole, RemoteAccessError, TransportError,
)

FSID = "fs-test-0001"
SECRET = b"correct horse battery staple"
HANDSHAKE_TIMEOUT = 0.5
PAGE = 4096


class Echo(ControlExtension):
    name = "echo"

    def handle(self, payload: bytes) -> bytes:
        return b"echo:" + payload[::-1]


class Broken(ControlExtension):
    name = "broken"

    def handle(self, payload: bytes) -> bytes:
        raise RuntimeError("extension bug")


@dataclass
class Server:
    port: int
    backend: sw.SoftwareExportBackend
    contents: dict[int, bytes]          # region_id -> bytes
    catalog: Catalog


def _make_region(tmp_path, region_id: int, name: str, role: RegionRole, size: int, seed: int):
    data = random.Random(seed).randbytes(size)
    path = tmp_path / name
    path.write_bytes(data)
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ)
    return ExportedRegion(region_id, name, role, memoryview(mm), 0x7F0000000000 + region_id * 2**32), data, mm


@pytest.fixture
async def server(nursery, tmp_path):
    backend = sw.SoftwareExportBackend()
    contents = {}
    mms = []
    for rid, name, role, size in [(0, "ctl-0000.rgn", RegionRole.CTL, 64 * 1024),
                                  (1, "meta-0001.rgn", RegionRole.META, 256 * 1024),
                                  (2, "data-0002.rgn", RegionRole.DATA, 24 << 20)]:
        region, data, mm = _make_region(tmp_path, rid, name, role, size, seed=rid)
        backend.register(region)
        contents[rid] = data
        mms.append(mm)
    regions = tuple(backend._by_id[i] for i in sorted(backend._by_id))

    def catalog(transport: str) -> Catalog:
        if transport != "software":
            raise TransportError(f"transport {transport} is not served here")
        return Catalog(FSID, transport, regions)

    port = await nursery.start(partial(
        sw.serve, host="127.0.0.1", port=0, fsid=FSID, secret=SECRET, export=backend,
        catalog=catalog, extensions={"echo": Echo(), "broken": Broken()},
        handshake_timeout=HANDSHAKE_TIMEOUT, frame_timeout=HANDSHAKE_TIMEOUT))
    yield Server(port, backend, contents, Catalog(FSID, "software", regions))


async def _conn(server: Server, **kw) -> sw.SoftwareConnection:
    return await sw.connect("127.0.0.1", server.port, fsid=kw.get("fsid", FSID),
                            secret=kw.get("secret", SECRET), timeout=kw.get("timeout", 5.0))


async def _good_client_works(server: Server) -> None:
    async with await _conn(server) as c:
        cat = await c.register()
        data = cat.by_id(1)
        dest = bytearray(8192)
        await c.read(data.rkey, 4096, memoryview(dest))
        assert dest == server.contents[1][4096:4096 + 8192]


# --- raw peers ---------------------------------------------------------------

async def _raw(server: Server) -> trio.socket.SocketType:
    s = trio.socket.socket()
    await s.connect(("127.0.0.1", server.port))
    return s


async def _recv_exact(s: trio.socket.SocketType, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = await s.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"closed after {len(buf)} of {n}")
        buf += chunk
    return buf


class Authed:
    """A raw socket past the handshake: ``send`` tags what it is given as one frame (per the documented
    format), ``_recv_frame`` checks the tags of what comes back."""

    def __init__(self, sock: trio.socket.SocketType, tx: sw.FrameAuth, rx: sw.FrameAuth) -> None:
        self.sock, self.tx, self.rx = sock, tx, rx

    async def send(self, frame: bytes) -> None:
        await self.sock.send(frame + self.tx.tag((frame,)))

    async def recv(self, n: int) -> bytes:
        return await self.sock.recv(n)

    def __enter__(self) -> Authed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


async def _recv_frame(s: trio.socket.SocketType | Authed) -> tuple[int, int, bytes]:
    sock = s.sock if isinstance(s, Authed) else s
    header = await _recv_exact(sock, sw.HEADER_SIZE)
    magic, ver, ftype, length, req_id = sw.HEADER.unpack(header)
    assert magic == sw.MAGIC and ver == sw.PROTOCOL_VERSION
    payload = await _recv_exact(sock, length)
    if isinstance(s, Authed):
        assert await _recv_exact(sock, sw.TAG_SIZE) == s.rx.tag((header, payload))
    return ftype, req_id, payload


async def _raw_authed(server: Server) -> Authed:
    """A raw socket that has completed the handshake by hand, per the documented format."""
    s = await _raw(server)
    cn = b"\x01" * 32
    await s.send(sw._header(sw.Frame.HELLO, 32 + len(FSID), 0) + cn + FSID.encode())
    ftype, _, sn = await _recv_frame(s)
    assert ftype == sw.Frame.CHALLENGE
    await s.send(sw._header(sw.Frame.AUTH, 32, 0) + sw._mac(SECRET, b"rmemfs-software-v2 client", cn, sn, FSID))
    ftype, _, mac = await _recv_frame(s)
    assert ftype == sw.Frame.WELCOME
    assert mac == sw._mac(SECRET, b"rmemfs-software-v2 server", cn, sn, FSID)
    c2s, s2c = sw.session_auth(SECRET, cn, sn, FSID)
    return Authed(s, c2s, s2c)


async def _assert_dropped(s: trio.socket.SocketType | Authed, within: float = 2.0) -> None:
    """The server closes the connection (possibly after an ERROR frame)."""
    with trio.fail_after(within):
        while True:
            try:
                if not await s.recv(65536):
                    return
            except ConnectionResetError:
                return


# --- the happy path ---------------------------------------------------------

async def test_catalog(server):
    async with await _conn(server) as c:
        cat = await c.register()
    assert cat == server.catalog
    assert [r.role for r in cat.regions] == [RegionRole.CTL, RegionRole.META, RegionRole.DATA]
    assert cat.by_id(2).length == 24 << 20 and cat.by_id(2).name == "data-0002.rgn"
    rkeys = {r.rkey for r in cat.regions}
    assert len(rkeys) == 3 and all(0 < k < 2**64 for k in rkeys)


async def test_single_read(server):
    async with await _conn(server) as c:
        d = (await c.register()).by_id(0)
        dest = bytearray(100)
        await c.read(d.rkey, 12345, memoryview(dest))
        assert bytes(dest) == server.contents[0][12345:12445]


async def test_batch_of_scattered_pages(server):
    async with await _conn(server) as c:
        d = (await c.register()).by_id(2)
        npages = d.length // PAGE
        pages = random.Random(7).sample(range(npages), 5000)
        dest = mmap.mmap(-1, len(pages) * PAGE)
        view = memoryview(dest)
        ops = [ReadOp(d.rkey, p * PAGE, view[i * PAGE:(i + 1) * PAGE]) for i, p in enumerate(pages)]
        done = []
        await c.read_batch(ops, progress=done.append)
        src = server.contents[2]
        for i, p in enumerate(pages):
            assert dest[i * PAGE:(i + 1) * PAGE] == src[p * PAGE:(p + 1) * PAGE], f"page {p}"
        assert sum(done) == len(pages) * PAGE
        del view, ops


async def test_large_reads(server):
    async with await _conn(server) as c:
        d = (await c.register()).by_id(2)
        src = server.contents[2]
        dest = bytearray(8 << 20)
        await c.read(d.rkey, 1 << 20, memoryview(dest))
        assert dest == src[1 << 20:9 << 20]
        # Larger than one request: split across several, and unaligned.
        dest = bytearray((20 << 20) + 3)
        done = []
        await c.read_batch([ReadOp(d.rkey, 7, memoryview(dest))], progress=done.append)
        assert dest == src[7:7 + len(dest)]
        assert sum(done) == len(dest)


async def test_mixed_regions_and_sizes(server):
    async with await _conn(server) as c:
        cat = await c.register()
        rng = random.Random(3)
        ops, expect = [], []
        for _ in range(300):
            r = cat.regions[rng.randrange(3)]
            n = rng.choice([0, 1, 17, 4096, 40000])
            off = rng.randrange(r.length - n + 1)
            ops.append(ReadOp(r.rkey, off, memoryview(bytearray(n))))
            expect.append(server.contents[r.region_id][off:off + n])
        await c.read_batch(ops)
        assert [bytes(o.dest) for o in ops] == expect


async def test_concurrent_reads_on_one_connection(server):
    async with await _conn(server) as c:
        d = (await c.register()).by_id(2)
        results = {}

        async def one(i: int) -> None:
            dest = bytearray(1 << 20)
            await c.read(d.rkey, i << 20, memoryview(dest))
            results[i] = bytes(dest)

        async with trio.open_nursery() as n:
            for i in range(6):
                n.start_soon(one, i)
        for i in range(6):
            assert results[i] == server.contents[2][i << 20:(i + 1) << 20]


@pytest.mark.allow_log(r"control extension 'broken' failed")
async def test_extension_round_trip(server):
    async with await _conn(server) as c:
        assert await c.call_extension("echo", b"qp=17 gid=fe80") == b"echo:08ef=dig 71=pq"
        assert await c.call_extension("echo", b"") == b"echo:"
        with pytest.raises(TransportError, match="no control extension named 'nope'"):
            await c.call_extension("nope", b"x")
        with pytest.raises(TransportError, match="extension 'broken' failed: extension bug"):
            await c.call_extension("broken", b"x")
        assert await c.call_extension("echo", b"ab") == b"echo:ba"   # still usable


@pytest.mark.allow_log(r"catalog request failed: transport verbs is not served")
async def test_catalog_refused_for_other_transport(server):
    async with await _conn(server) as c:
        with pytest.raises(TransportError, match="transport verbs is not served here"):
            await c.request_catalog("verbs")
        assert (await c.register()) == server.catalog


# --- authentication ----------------------------------------------------------

@pytest.mark.allow_log(r"authentication failed")
async def test_wrong_secret(server, caplog):
    with pytest.raises(AuthError, match="authentication failed: wrong filesystem secret"):
        await _conn(server, secret=b"wrong")
    assert any("authentication failed" in r.message for r in caplog.records if r.levelno >= logging.WARNING)
    await _good_client_works(server)


@pytest.mark.allow_log(r"filesystem id mismatch")
async def test_fsid_mismatch(server):
    with pytest.raises(AuthError, match="filesystem id mismatch: client asked for 'other-fs'"):
        await _conn(server, fsid="other-fs")
    await _good_client_works(server)


async def _fake_exporter(nursery, talk) -> int:
    """A listener that takes one connection and runs ``talk(sock)`` on it: a scripted, hostile exporter."""
    async def serve(task_status=trio.TASK_STATUS_IGNORED):
        ls = trio.socket.socket()
        await ls.bind(("127.0.0.1", 0))
        ls.listen()
        task_status.started(ls.getsockname()[1])
        s, _ = await ls.accept()
        with s, ls:
            await talk(s)
    return await nursery.start(serve)


async def test_client_rejects_server_without_secret(nursery):
    """Mutual auth: a server that does not know the secret is caught by the client."""
    async def talk(s):
        await _recv_exact(s, sw.HEADER_SIZE + 32 + len(FSID))
        await s.send(sw._header(sw.Frame.CHALLENGE, 32, 0) + b"\x02" * 32)
        await _recv_exact(s, sw.HEADER_SIZE + 32)      # the client's proof; accept it blindly
        await s.send(sw._header(sw.Frame.WELCOME, 32, 0) + b"\x03" * 32)
        await trio.sleep(1)

    port = await _fake_exporter(nursery, talk)
    with pytest.raises(AuthError, match="failed mutual authentication"):
        await sw.connect("127.0.0.1", port, fsid=FSID, secret=SECRET, timeout=2)


# --- remote access errors ----------------------------------------------------

async def test_unknown_rkey(server):
    async with await _conn(server) as c:
        cat = await c.register()
        bogus = next(k for k in range(1, 100) if k not in {r.rkey for r in cat.regions})
        with pytest.raises(RemoteAccessError, match=rf"rkey {bogus:#x}, offset 0, length 4096"):
            await c.read(bogus, 0, memoryview(bytearray(PAGE)))
        # The failing read among good ones: the batch fails, the connection stays usable.
        d = cat.by_id(2)
        ops = [ReadOp(d.rkey, i * PAGE, memoryview(bytearray(PAGE))) for i in range(3000)]
        ops[2500] = ReadOp(bogus, 0, memoryview(bytearray(PAGE)))
        with pytest.raises(RemoteAccessError, match="read 2500 .*unknown rkey"):
            await c.read_batch(ops)
        dest = bytearray(PAGE)
        await c.read(d.rkey, 5 * PAGE, memoryview(dest))
        assert dest == server.contents[2][5 * PAGE:6 * PAGE]


async def test_out_of_bounds(server):
    async with await _conn(server) as c:
        d = (await c.register()).by_id(1)
        for off, n in [(d.length - 100, PAGE), (d.length, 1), (d.length + PAGE, PAGE),
                       (2**64 - 2048, PAGE), (2**64 + 5, 1), (-1, 1)]:
            with pytest.raises(RemoteAccessError, match=rf"rkey {d.rkey:#x}, offset {off}"):
                await c.read(d.rkey, off, memoryview(bytearray(n)))
        dest = bytearray(100)        # exactly up to the end is fine
        await c.read(d.rkey, d.length - 100, memoryview(dest))
        assert dest == server.contents[1][-100:]


@pytest.mark.parametrize("off,length", [
    (2**64 - 4096, 8192),            # wraps to 4096 in 64-bit arithmetic
    (2**64 - 1, 2**64 - 1),
    (1, 2**64 - 1),
    (256 * 1024 - 1, 2),
])
async def test_out_of_bounds_raw_overflow(server, off, length):
    """The server itself rejects wrapping ranges (a client need not be ours)."""
    s = await _raw_authed(server)
    with s:
        rkey = server.catalog.by_id(1).rkey
        await s.send(sw._header(sw.Frame.READ_REQ, 24, 9) + struct.pack("!QQQ", rkey, off, length))
        ftype, req_id, payload = await _recv_frame(s)
        assert (ftype, req_id) == (sw.Frame.ERROR, 9)
        assert struct.unpack_from("!HI", payload) == (sw.Err.OUT_OF_BOUNDS, 0)
        # Same connection still serves a good read.
        await s.send(sw._header(sw.Frame.READ_REQ, 24, 10) + struct.pack("!QQQ", rkey, 10, 20))
        ftype, req_id, payload = await _recv_frame(s)
        assert (ftype, req_id, payload) == (sw.Frame.READ_DATA, 10, server.contents[1][10:30])


async def test_deregistered_region_is_unreadable(server):
    async with await _conn(server) as c:
        d = (await c.register()).by_id(0)
        server.backend.deregister(0)
        with pytest.raises(RemoteAccessError, match="unknown rkey"):
            await c.read(d.rkey, 0, memoryview(bytearray(10)))


# --- malformed peers ------------------------------------------------------------

@pytest.mark.allow_log(r"protocol error: truncated frame")
async def test_truncated_frame(server, caplog):
    s = await _raw(server)
    with s:
        await s.send(sw._header(sw.Frame.HELLO, 100, 0) + b"x" * 10)
        s.shutdown(socket.SHUT_WR)
        await _assert_dropped(s)
    await _good_client_works(server)
    await trio.sleep(0.05)
    assert any("truncated frame" in r.message for r in caplog.records)


@pytest.mark.allow_log(r"protocol error: bad magic")
async def test_garbage_bytes(server, caplog):
    s = await _raw(server)
    with s:
        await s.send(random.Random(1).randbytes(200))
        await _assert_dropped(s)
    await _good_client_works(server)
    assert any("bad magic" in r.message for r in caplog.records)


@pytest.mark.allow_log(r"protocol error: frame of \d+ bytes exceeds the limit")
async def test_oversized_frame_before_auth(server, caplog):
    s = await _raw(server)
    with s:
        await s.send(sw._header(sw.Frame.HELLO, 2**31, 0))
        await _assert_dropped(s)
    await _good_client_works(server)
    assert any("exceeds the limit" in r.message for r in caplog.records)


@pytest.mark.allow_log(r"protocol error: ")
async def test_oversized_and_malformed_frames_after_auth(server):
    for bad in [sw._header(sw.Frame.READ_REQ, sw.MAX_PAYLOAD + 1, 1),
                sw._header(sw.Frame.READ_REQ, 23, 1) + b"\0" * 23,                 # not n x 24
                sw._header(sw.Frame.READ_REQ, 24 * 1025, 1) + b"\0" * 24 * 1025,   # too many reads
                sw._header(sw.Frame.WELCOME, 0, 1),                                # wrong type now
                sw.HEADER.pack(sw.MAGIC, 99, sw.Frame.READ_REQ, 0, 1)]:            # other version
        s = await _raw_authed(server)
        with s:
            await s.send(bad)
            await _assert_dropped(s)
    # A read asking for more than MAX_READ_BYTES in one request is dropped too.
    s = await _raw_authed(server)
    with s:
        rkey = server.catalog.by_id(2).rkey
        ops = b"".join(struct.pack("!QQQ", rkey, 0, 24 << 20) for _ in range(1))
        await s.send(sw._header(sw.Frame.READ_REQ, len(ops), 1) + ops)
        await _assert_dropped(s)
    await _good_client_works(server)


@pytest.mark.allow_log(r"no handshake within")
async def test_staller_is_dropped_without_blocking_others(server, caplog):
    stallers = [await _raw(server) for _ in range(3)]
    half = await _raw(server)                       # sends half a HELLO, then stalls
    await half.send(sw._header(sw.Frame.HELLO, 32 + len(FSID), 0) + b"\0" * 5)
    t0 = time.monotonic()
    await _good_client_works(server)                # served while the stallers hang on
    assert time.monotonic() - t0 < HANDSHAKE_TIMEOUT
    for s in stallers + [half]:
        with s:
            await _assert_dropped(s, within=HANDSHAKE_TIMEOUT + 2)
    assert time.monotonic() - t0 < HANDSHAKE_TIMEOUT + 2
    assert any("no handshake within" in r.message for r in caplog.records)
    await _good_client_works(server)


@pytest.mark.allow_log(r"frame not completed within")
async def test_authenticated_peer_stalling_mid_frame_is_dropped(server):
    s = await _raw_authed(server)
    with s:
        await s.send(sw._header(sw.Frame.READ_REQ, 48, 1) + b"\0" * 10)
        await _assert_dropped(s, within=HANDSHAKE_TIMEOUT + 2)


@pytest.mark.allow_log(r"protocol error: protocol version \d+ not supported")
async def test_version_mismatch_reported_to_client(server):
    s = await _raw(server)
    with s:
        await s.send(sw.HEADER.pack(sw.MAGIC, 3, sw.Frame.HELLO, 0, 0))
        ftype, _, payload = await _recv_frame(s)
        assert ftype == sw.Frame.ERROR and struct.unpack_from("!H", payload)[0] == sw.Err.VERSION
        assert b"protocol version 3 not supported (this side speaks 2)" in payload


@pytest.mark.allow_log(r"protocol error: protocol version 1 not supported")
async def test_version_1_peer_gets_a_refusal_it_can_read(server):
    """A version 1 initiator (before frame integrity) gets a version 1 ERROR saying why, in one line."""
    s = await _raw(server)
    with s:
        await s.send(sw._header(sw.Frame.HELLO, 32 + len(FSID), 0, version=1) + b"\x01" * 32 + FSID.encode())
        magic, ver, ftype, length, _ = sw.HEADER.unpack(await _recv_exact(s, sw.HEADER_SIZE))
        payload = await _recv_exact(s, length)
        assert (magic, ver, ftype) == (sw.MAGIC, 1, sw.Frame.ERROR)
        assert struct.unpack_from("!H", payload)[0] == sw.Err.VERSION
        msg = payload[6:].decode()
        assert "\n" not in msg and msg == ("this exporter speaks software transport protocol version 2 (frames "
                                          "authenticated after the handshake), not 1: upgrade rmemfs on the initiator")
        await _assert_dropped(s)


# --- connecting ---------------------------------------------------------------

async def test_connect_refused_is_quick():
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    port = ls.getsockname()[1]
    ls.close()                                       # nothing listens there now
    t0 = time.monotonic()
    with pytest.raises(ConnectError, match=rf"127\.0\.0\.1:{port}"):
        await sw.connect("127.0.0.1", port, fsid=FSID, secret=SECRET, timeout=2)
    assert time.monotonic() - t0 < 1


async def test_connect_to_silent_listener_times_out():
    ls = socket.socket()                             # accepts (backlog) but never speaks
    ls.bind(("127.0.0.1", 0))
    ls.listen()
    with ls:
        t0 = time.monotonic()
        with pytest.raises(ConnectError, match="handshake timed out"):
            await sw.connect("127.0.0.1", ls.getsockname()[1], fsid=FSID, secret=SECRET, timeout=0.3)
        assert time.monotonic() - t0 < 2


async def test_closed_connection_is_unusable(server):
    c = await _conn(server)
    await c.aclose()
    with pytest.raises(TransportError, match="unusable"):
        await c.register()
    await c.aclose()                                 # idempotent


@pytest.mark.allow_log(r"connection broken: .*closed by the exporter")
async def test_exporter_going_away_breaks_connection(nursery, tmp_path):
    backend = sw.SoftwareExportBackend()
    region, _, _ = _make_region(tmp_path, 5, "data-0005.rgn", RegionRole.DATA, 1 << 20, 5)
    desc = backend.register(region)
    cancel = trio.CancelScope()

    async def run(task_status=trio.TASK_STATUS_IGNORED):
        with cancel:
            await sw.serve(host="127.0.0.1", port=0, fsid=FSID, secret=SECRET, export=backend,
                           catalog=lambda t: Catalog(FSID, t, (desc,)), task_status=task_status)

    port = await nursery.start(run)
    c = await sw.connect("127.0.0.1", port, fsid=FSID, secret=SECRET, timeout=2)
    cancel.cancel()
    await trio.sleep(0.05)
    with pytest.raises(TransportError):
        await c.read(desc.rkey, 0, memoryview(bytearray(10)))
    await c.aclose()


# --- backend -----------------------------------------------------------------

def test_backend_register_is_idempotent_and_keys_are_random(tmp_path):
    b = sw.SoftwareExportBackend()
    region, data, _ = _make_region(tmp_path, 3, "data-0003.rgn", RegionRole.DATA, 8192, 3)
    d1 = b.register(region)
    assert b.register(region) == d1
    desc, view = b.lookup(d1.rkey)
    assert desc == d1 and bytes(view[:10]) == data[:10]
    b.deregister(3)
    with pytest.raises(RemoteAccessError):
        b.lookup(d1.rkey)
    assert b.register(region).rkey != d1.rkey        # a new registration, a new key
    keys = {sw.SoftwareExportBackend().register(region).rkey for _ in range(200)}
    assert len(keys) == 200 and max(keys).bit_length() > 56
    b.close()
    assert sw.available() is None
    assert isinstance(sw.SoftwareConnection.transport, str) and issubclass(sw.SoftwareConnection, base.Connection)


async def test_bad_destination_late_in_batch_keeps_connection_in_sync(server):
    """Ops are planned lazily while earlier requests are in flight; a bad one later on
    must fail the batch cleanly (responses drained) and leave the connection usable."""
    async with await _conn(server) as c:
        d = (await c.register()).by_id(2)
        ops = [ReadOp(d.rkey, i * PAGE, memoryview(bytearray(PAGE))) for i in range(4000)]
        ops[3500] = ReadOp(d.rkey, 0, memoryview(bytes(PAGE)))          # read-only destination
        with pytest.raises(ValueError, match="read 3500: destination buffer is read-only"):
            await c.read_batch(ops)
        ops[3500] = ReadOp(d.rkey, 2**64 - 1, memoryview(bytearray(2)))
        with pytest.raises(RemoteAccessError, match="read 3500"):
            await c.read_batch(ops)
        ops[3500] = ReadOp(d.rkey, 0, memoryview(bytearray(PAGE)))
        await c.read_batch(ops)
        src = server.contents[2]
        assert all(bytes(o.dest) == src[o.offset:o.offset + PAGE] for o in ops)


@pytest.mark.allow_log(r"connection broken: an operation was cancelled")
async def test_cancelled_read_breaks_connection_without_hanging(server):
    c = await _conn(server)
    d = (await c.register()).by_id(2)
    dest = bytearray(24 << 20)
    ops = [ReadOp(d.rkey, 0, memoryview(dest))] * 20
    with trio.move_on_after(0.01) as scope:
        await c.read_batch(ops)
    assert scope.cancelled_caught
    with pytest.raises(TransportError, match="unusable"):
        await c.read(d.rkey, 0, memoryview(bytearray(1)))
    with trio.fail_after(2):
        await c.aclose()
    await _good_client_works(server)


@pytest.mark.allow_log(r"connection broken: timed out")
async def test_read_times_out_when_exporter_stops_answering(nursery):
    """An exporter that authenticates and then goes silent: the read fails after ``timeout``."""
    async def talk(s):
        hello = await _recv_exact(s, sw.HEADER_SIZE + 32 + len(FSID))
        cn, sn = hello[sw.HEADER_SIZE:sw.HEADER_SIZE + 32], b"\x05" * 32
        await s.send(sw._header(sw.Frame.CHALLENGE, 32, 0) + sn)
        await _recv_exact(s, sw.HEADER_SIZE + 32)
        await s.send(sw._header(sw.Frame.WELCOME, 32, 0)
                     + sw._mac(SECRET, b"rmemfs-software-v2 server", cn, sn, FSID))
        await trio.sleep(10)

    port = await _fake_exporter(nursery, talk)
    c = await sw.connect("127.0.0.1", port, fsid=FSID, secret=SECRET, timeout=0.3)
    t0 = time.monotonic()
    with pytest.raises(TransportError, match=rf"127\.0\.0\.1:{port}: no response within 0.3s"):
        await c.read(1, 0, memoryview(bytearray(10)))
    assert time.monotonic() - t0 < 2
    await c.aclose()


async def test_client_rejects_garbage_from_server(nursery):
    async def talk(s):
        await s.send(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        await trio.sleep(1)

    port = await _fake_exporter(nursery, talk)
    with pytest.raises(ProtocolError, match="bad magic"):
        await sw.connect("127.0.0.1", port, fsid=FSID, secret=SECRET, timeout=2)


@pytest.mark.allow_log(r"filesystem id mismatch")
async def test_fsid_mismatch_does_not_reveal_the_real_fsid(server):
    """An unauthenticated peer guessing fsids learns nothing about the served one."""
    s = await _raw(server)
    with s:
        await s.send(sw._header(sw.Frame.HELLO, 32 + 8, 0) + b"\x01" * 32 + b"other-fs")
        ftype, _, payload = await _recv_frame(s)
        assert ftype == sw.Frame.ERROR
        assert b"other-fs" in payload and FSID.encode() not in payload
    await _good_client_works(server)


@pytest.mark.allow_log(r"frame not completed within")
async def test_announced_frames_do_not_allocate_up_front(server):
    """50 authenticated peers announce 16 MiB frames and send nothing: memory stays bounded."""
    import tracemalloc
    peers = [await _raw_authed(server) for _ in range(50)]
    tracemalloc.start()
    try:
        for s in peers:
            await s.send(sw._header(sw.Frame.EXT_REQ, sw.MAX_PAYLOAD, 1))
        await trio.sleep(HANDSHAKE_TIMEOUT / 2)       # the server has read every header by now
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    for s in peers:
        with s:
            await _assert_dropped(s, within=HANDSHAKE_TIMEOUT + 2)
    assert peak < 50 * sw.MAX_PAYLOAD // 20, f"peak {peak} bytes traced while 50 peers announced 16 MiB"
    await _good_client_works(server)


@pytest.mark.allow_log(r"too many connections", r"no handshake within")
async def test_flood_of_unauthenticated_connections_is_capped(server):
    """More idle unauthenticated connections than the cap (64, 16 per source): the excess is
    closed at once, and a legitimate client from another address still connects and reads."""
    flood = []
    for i in range(4):                       # 4 sources x 20 connections = 80 > 64
        for _ in range(20):
            s = socket.socket()              # plain sockets: polled below without waiting
            s.bind((f"127.0.0.{i + 2}", 0))
            s.connect(("127.0.0.1", server.port))
            s.setblocking(False)
            flood.append(s)
    t0 = time.monotonic()
    await _good_client_works(server)
    await trio.sleep(0.05)
    closed = 0
    for s in flood:
        try:
            closed += s.recv(1) == b""
        except BlockingIOError:
            pass                             # still open, waiting in its handshake
        except ConnectionResetError:
            closed += 1
    # 16 accepted from each source, 4 per source refused at accept, and the oldest evicted
    # to make room for the legitimate client: all well before the handshake timeout.
    assert closed == 17 and time.monotonic() - t0 < HANDSHAKE_TIMEOUT, closed
    for s in flood:
        s.close()


async def test_idle_authenticated_connection_is_dropped_while_others_are_served(nursery, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=sw.__name__)
    idle_timeout = 0.5
    backend = sw.SoftwareExportBackend()
    region, data, _ = _make_region(tmp_path, 5, "data-0005.rgn", RegionRole.DATA, 1 << 20, 5)
    desc = backend.register(region)
    port = await nursery.start(partial(sw.serve, host="127.0.0.1", port=0, fsid=FSID, secret=SECRET, export=backend,
                                       catalog=lambda t: Catalog(FSID, t, (desc,)), idle_timeout=idle_timeout))
    server = Server(port, backend, {5: data}, Catalog(FSID, "software", (desc,)))
    idle = await _raw_authed(server)
    unauthenticated = await _raw(server)             # the handshake timeout (10 s here) governs it, not idleness
    async with await _conn(server) as busy:
        dest = bytearray(PAGE)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 3 * idle_timeout:  # reads 10 times per idle timeout: never idle
            await busy.read(desc.rkey, PAGE, memoryview(dest))
            assert dest == data[PAGE:2 * PAGE]
            await trio.sleep(idle_timeout / 10)
        with idle:
            await _assert_dropped(idle, within=0.1)      # gone by now, after one timeout of silence
        await busy.read(desc.rkey, 0, memoryview(dest))
        assert dest == data[:PAGE]
    drops = [r for r in caplog.records if "idle for" in r.getMessage()]
    assert len(drops) == 1 and drops[0].levelno == logging.INFO
    assert drops[0].getMessage().endswith("idle for 0.5s; dropping")
    with unauthenticated:
        with trio.move_on_after(0.05) as still_open:
            await unauthenticated.recv(1)
        assert still_open.cancelled_caught               # not closed: idleness counts only once authenticated


# --- a relay in the middle ------------------------------------------------------------

async def _relay(nursery: trio.Nursery, upstream: int, mangle) -> int:
    """A TCP relay to 127.0.0.1:``upstream`` that passes whole frames through, except that every frame
    after the handshake goes through ``mangle(direction, frame type, frame bytes) -> frames to send``
    (direction "c2s" or "s2c"). It parses the documented format only; it knows no key."""
    tag = getattr(sw, "TAG_SIZE", 0)

    async def pump(src, dst, direction: str) -> None:
        handshake = 2                                  # HELLO, AUTH / CHALLENGE, WELCOME: untagged
        try:
            while True:
                header = await _recv_exact(src, sw.HEADER_SIZE)
                _, _, ftype, length, _ = sw.HEADER.unpack(header)
                body = await _recv_exact(src, length + (tag if handshake == 0 else 0))
                frames = [header + body]
                if handshake:
                    handshake -= 1
                else:
                    frames = mangle(direction, ftype, header + body)
                for f in frames:
                    await dst.send(f)
        except (EOFError, OSError):
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    async def serve(task_status=trio.TASK_STATUS_IGNORED):
        ls = trio.socket.socket()
        await ls.bind(("127.0.0.1", 0))
        ls.listen()
        task_status.started(ls.getsockname()[1])
        with ls:
            while True:
                c, _ = await ls.accept()
                u = trio.socket.socket()
                await u.connect(("127.0.0.1", upstream))
                nursery.start_soon(pump, c, u, "c2s")
                nursery.start_soon(pump, u, c, "s2c")
    return await nursery.start(serve)


def _once(direction: str, ftype: int, change):
    """A mangler that applies ``change`` to the first frame of ``ftype`` going ``direction``, then passes all."""
    done = []

    def mangle(d: str, t: int, frame: bytes) -> list[bytes]:
        if d == direction and t == ftype and not done:
            done.append(frame)
            return change(frame)
        return [frame]
    return mangle


def _flip(at: int):
    return lambda frame: [frame[:at] + bytes([frame[at] ^ 0x10]) + frame[at + 1:]]


@pytest.mark.allow_log(r"connection broken: .*failed its integrity check")
async def test_relay_flipping_one_bit_of_read_data_is_detected(server, nursery):
    """A relay that passes the handshake and flips one bit in one READ_DATA reply: the read fails, the
    connection is dropped (its next request fails at once), and the exporter serves everyone else,
    including a new connection through the same relay. Before frame tags: the read returned the
    flipped byte as data."""
    relay = await _relay(nursery, server.port, _once("s2c", sw.Frame.READ_DATA, _flip(sw.HEADER_SIZE + 1000)))
    c = await sw.connect("127.0.0.1", relay, fsid=FSID, secret=SECRET, timeout=5)
    rkey = (await c.register()).by_id(2).rkey
    dest = bytearray(64 << 10)
    with pytest.raises(ProtocolError, match=rf"127\.0\.0\.1:{relay}: reply 1 failed its integrity check"):
        await c.read(rkey, 0, memoryview(dest))
    with pytest.raises(TransportError, match="connection unusable"):
        await c.read(rkey, 0, memoryview(dest))
    await c.aclose()
    await _good_client_works(server)
    async with await sw.connect("127.0.0.1", relay, fsid=FSID, secret=SECRET, timeout=5) as again:
        await again.read(rkey, 0, memoryview(dest))        # the relay is honest now: exact data
        assert dest == server.contents[2][:64 << 10]


@pytest.mark.parametrize("change, what", [
    (_flip(sw.HEADER_SIZE + 9), "one bit of a READ_REQ flipped"),
    (lambda frame: [frame, frame], "a READ_REQ replayed"),
])
@pytest.mark.allow_log(r"failed its integrity check")
async def test_relay_altering_or_replaying_a_request_is_dropped_by_the_exporter(server, nursery, caplog, change, what):
    """The exporter checks every request's tag (keyed per frame by its sequence number): an altered or
    replayed request drops that connection with one WARNING, and the exporter serves the others."""
    relay = await _relay(nursery, server.port, _once("c2s", sw.Frame.READ_REQ, change))
    c = await sw.connect("127.0.0.1", relay, fsid=FSID, secret=SECRET, timeout=5)
    rkey = server.catalog.by_id(1).rkey
    dest = bytearray(PAGE)
    with pytest.raises(TransportError):
        for _ in range(3):                 # a replay: the first read is answered, the copy is not
            await c.read(rkey, 0, memoryview(dest))
    await c.aclose()
    drops = [r for r in caplog.records if "protocol error: frame" in r.getMessage()
             and "failed its integrity check" in r.getMessage()]          # the exporter's, not the client's
    assert len(drops) == 1 and drops[0].levelno == logging.WARNING, what
    await _good_client_works(server)


@pytest.mark.parametrize("with_file", [False, True], ids=["mapping-64KiB-copy", "file-pread"])
async def test_reads_of_memory_written_meanwhile_pass_their_tags(nursery, tmp_path, with_file):
    """A live source's heartbeat page changes under the exporter: the bytes are copied before they are
    tagged, so the tag and the bytes sent are of the same instant (before, about one read in a few
    hundred failed its tag and broke the connection while another process wrote the page). A bare mapping
    is copied up to 64 KiB; a region with its file (as the exporter registers them) is read with pread
    at any size, here 1 MiB."""
    size = (1 << 20) if with_file else PAGE
    path = tmp_path / "ctl-0000.rgn"
    path.write_bytes(bytes(size))
    fd = os.open(path, os.O_RDWR)
    mm = mmap.mmap(fd, size)
    if not with_file:
        os.close(fd)
    backend = sw.SoftwareExportBackend()
    backend.register(ExportedRegion(0, path.name, RegionRole.CTL, memoryview(mm), 0x7F0000000000,
                                    fd if with_file else -1))
    regions = tuple(backend._by_id.values())
    port = await nursery.start(partial(sw.serve, host="127.0.0.1", port=0, fsid=FSID, secret=SECRET, export=backend,
                                       catalog=lambda t: Catalog(FSID, t, regions)))
    beater = await trio.lowlevel.open_process([sys.executable, "-c", (
        "import mmap, os, sys, time\n"
        f"fd = os.open({str(path)!r}, os.O_RDWR); m = mmap.mmap(fd, {size}); n = 0\n"
        "end = time.monotonic() + 20\n"
        "while time.monotonic() < end:\n"
        f"    n += 1; m[0:8] = n.to_bytes(8, 'little'); m[{size - 8}:{size}] = n.to_bytes(8, 'little')\n")])
    try:
        async with await sw.connect("127.0.0.1", port, fsid=FSID, secret=SECRET, timeout=5.0) as c:
            cat = await c.register()
            dest = bytearray(size)
            end = trio.current_time() + 2.0
            while trio.current_time() < end:
                await c.read_batch([ReadOp(cat.by_id(0).rkey, 0, memoryview(dest))])
            assert int.from_bytes(dest[:8], "little") > 0
    finally:
        beater.kill()
        await beater.wait()
        if with_file:
            os.close(fd)


async def test_reads_of_holes_allocate_no_region_memory(nursery):
    """Issue 15 item 11: the exporter read holes through its MAP_SHARED mapping, and every read fault
    allocated a tmpfs page, so reading a sparse region filled /dev/shm. Reads of the file leave holes
    unallocated and still return zeros for them and the data for written pages."""
    size = 64 << 20
    with tempfile.TemporaryDirectory(dir="/dev/shm") as d:       # tmpfs, as region directories are
        path = os.path.join(d, "data-0002.rgn")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            os.pwrite(fd, b"d" * PAGE, 5 * PAGE)
            mm = mmap.mmap(fd, size)
            backend = sw.SoftwareExportBackend()
            backend.register(ExportedRegion(2, "data-0002.rgn", RegionRole.DATA, memoryview(mm), 0x7F0000000000, fd))
            regions = tuple(backend._by_id.values())
            port = await nursery.start(partial(sw.serve, host="127.0.0.1", port=0, fsid=FSID, secret=SECRET,
                                               export=backend, catalog=lambda t: Catalog(FSID, t, regions)))
            allocated = os.fstat(fd).st_blocks
            async with await sw.connect("127.0.0.1", port, fsid=FSID, secret=SECRET, timeout=5.0) as c:
                rkey = (await c.register()).by_id(2).rkey
                small = bytearray(3 * PAGE)                        # hole, data, hole: one small reply
                big = bytearray(32 << 20)                          # 1 MiB reads of holes only
                await c.read_batch([ReadOp(rkey, 4 * PAGE, memoryview(small))])
                await c.read_batch([ReadOp(rkey, off, memoryview(big)[off - (16 << 20):][:1 << 20])
                                    for off in range(16 << 20, 48 << 20, 1 << 20)])
            assert small == bytes(PAGE) + b"d" * PAGE + bytes(PAGE)
            assert big == bytes(len(big))
            assert os.fstat(fd).st_blocks == allocated, "reads allocated region pages"
        finally:
            os.close(fd)
