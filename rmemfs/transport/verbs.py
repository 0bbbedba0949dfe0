"""Verbs transport: one-sided RDMA READ over an RC queue pair, through pyverbs.

This is the only module that imports pyverbs, and only lazily (``_pv()``), so
importing it always works and ``available()`` can say why verbs cannot run.

Exporter side
-------------
``VerbsExportBackend`` registers each region's existing mapping with
``MR(pd, length, IBV_ACCESS_REMOTE_READ, address=region.addr)`` — remote read
only, never remote or local write, so the NIC can never modify the region.

Kernel requirement (measured on Debian's 6.1): before Linux 6.2,
``ib_umem_get`` pins every MR's pages with ``FOLL_WRITE | FOLL_FORCE``, even
for a read-only MR. On a ``MAP_SHARED`` ``PROT_READ`` mapping that fails with
EFAULT (FOLL_FORCE only overrides protection on private, COW mappings — and a
private mapping would pin COW copies, not the live page cache). So on < 6.2
the exporter must map region files ``MAP_SHARED`` with ``PROT_READ |
PROT_WRITE`` (it may hand us a read-only memoryview of it); 6.2 dropped
FOLL_FORCE (commit "RDMA/umem: remove FOLL_FORCE usage") and pins read-only
MRs without FOLL_WRITE, so a read-only mapping works there. LOCAL_WRITE is
never needed for the exporter. ``register`` turns the EFAULT into a
TransportError that says this. ``extensions()`` offers the "verbs" control extension: the initiator
sends its QP info over the authenticated software control channel, the
exporter creates an RC QP, moves it INIT→RTR→RTS with remote-read access and
answers with its own QP info. A "close" request (sent by ``aclose``) frees it.
Each QP belongs to the control connection that asked for it: only that
connection may close it, and when the connection ends (the initiator closed it
or died, or the exporter dropped it as idle) its QPs are destroyed, so a
vanished initiator does not hold one of the ``MAX_EXPORT_QPS`` for ever.

Control payloads are UTF-8 JSON::

    initiator → {"op": "connect", "qpn", "psn", "gid", "lid", "mtu", "rd_atomic"}
    exporter  ← {"qpn", "psn", "gid", "lid", "mtu", "rd_atomic"}
    initiator → {"op": "close", "qpn": <exporter's qpn>}  ← {}

Initiator side
--------------
``connect()`` opens the software control channel (authentication, catalog,
QP exchange), then ``VerbsConnection.read_batch`` posts chained RDMA READ work
requests — as many in flight as the send queue holds, each landing directly in
its destination view (which must lie in ``register_local``'d memory) — and
polls the CQ in a worker thread, so the trio loop never blocks. Bad rkeys and
out-of-bounds reads are refused before posting (like the software transport);
should the NIC still report an error, the QP is in the error state: the batch
drains its flushed work requests, raises, and the next call rebuilds the QP
pair, so the connection stays usable.
"""
from __future__ import annotations

import bisect
import ctypes
import errno
import json
import logging
import random
import threading
import time
from dataclasses import dataclass
from functools import partial
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any
from collections.abc import Awaitable, Callable, Sequence

import trio

from .base import (
    Catalog,
    ConnectError,
    Connection,
    ControlExtension,
    ControlSession,
    ExportBackend,
    ExportedRegion,
    ProgressFn,
    ProtocolError,
    ReadOp,
    RegionDesc,
    RemoteAccessError,
    TransportError,
    TransportUnavailable,
)

if TYPE_CHECKING:
    from .software import SoftwareConnection

log = logging.getLogger(__name__)

EXTENSION = "verbs"
SQ_DEPTH = 2048            # send WRs in flight per QP (capped by the device's max_qp_wr)
MAX_EXPORT_QPS = 256       # exporter-side QPs alive at once (one per initiator connection)
MAX_CONNECTION_QPS = 4     # of those, per control connection (a connection rebuilds its one QP in place)
_POLL_BATCH = 64
_PROGRESS_INTERVAL = 0.1   # seconds between progress callbacks


class QPError(TransportError):
    """The queue pair failed (error state, retries exhausted, flushed); the batch was abandoned."""


class VerbsTimeout(TransportError):
    """Posted reads did not complete in time."""


_pyverbs: SimpleNamespace | None = None


def _pv() -> SimpleNamespace:
    """Import pyverbs on first use; TransportUnavailable if it cannot be imported."""
    global _pyverbs
    if _pyverbs is None:
        try:
            import pyverbs.addr as addr
            import pyverbs.cq as cq
            import pyverbs.device as device
            import pyverbs.enums as enums
            import pyverbs.mr as mr
            import pyverbs.pd as pd
            import pyverbs.pyverbs_error as error
            import pyverbs.qp as qp
            import pyverbs.wr as wr
        except ImportError as e:
            raise TransportUnavailable(f"pyverbs is not importable ({e}); install python3-pyverbs "
                                       "and use a venv made from Debian's python3") from None
        _pyverbs = SimpleNamespace(addr=addr, cq=cq, device=device, e=enums, mr=mr, pd=pd,
                                   error=error, qp=qp, wr=wr)
    return _pyverbs


def _errmsg(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _buffer_address(buf: memoryview) -> int:
    """Address of a writable, C-contiguous buffer (no copy)."""
    if buf.readonly:
        raise ValueError("destination buffer is read-only")
    if not buf.c_contiguous:
        raise ValueError("destination buffer is not C-contiguous")
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


# --- device -------------------------------------------------------------------

def _active_ports(ctx: Any) -> list[int]:
    pv = _pv()
    nports = ctx.query_device().phys_port_cnt
    return [p for p in range(1, nports + 1) if ctx.query_port(p).state == pv.e.IBV_PORT_ACTIVE]


def _device_names() -> list[str]:
    pv = _pv()
    try:
        devs = pv.device.get_device_list()
    except pv.error.PyverbsError as e:   # rdma-core raises instead of returning [] without devices
        raise TransportUnavailable(f"no RDMA device ({_errmsg(e)})") from None
    if not devs:
        raise TransportUnavailable("no RDMA device")
    return [d.name.decode() for d in devs]


def available() -> str | None:
    """None when pyverbs imports and some RDMA device has an active port; else why not."""
    try:
        names = _device_names()
        pv = _pv()
        states = []
        for name in names:
            try:
                with pv.device.Context(name=name) as ctx:
                    if _active_ports(ctx):
                        return None
                    states.append(f"{name}: no active port")
            except pv.error.PyverbsError as e:
                states.append(f"{name}: {_errmsg(e)}")
        return "no RDMA device with an active port (" + "; ".join(states) + ")"
    except TransportUnavailable as e:
        return str(e)


class _Device:
    """An opened device: context, one active port, its GID and a PD. Closed child-first by pyverbs
    (closing the context closes what hangs off it), and explicitly so in close()."""

    def __init__(self, name: str | None = None, port: int | None = None) -> None:
        pv = _pv()
        names = _device_names()
        candidates = [name] if name else names
        reasons = []
        for n in candidates:
            try:
                ctx = pv.device.Context(name=n)
            except pv.error.PyverbsError as e:
                reasons.append(f"{n}: {_errmsg(e)}")
                continue
            try:
                ports = _active_ports(ctx)
                if port is not None:
                    ports = [p for p in ports if p == port]
                if not ports:
                    reasons.append(f"{n}: port {port or 'any'} not active")
                    ctx.close()
                    continue
                self.name, self.ctx, self.port = n, ctx, ports[0]
                self.attr = ctx.query_device()
                self.port_attr = ctx.query_port(self.port)
                self.gid_index, self.gid = self._pick_gid()
                self.pd = pv.pd.PD(ctx)
                return
            except pv.error.PyverbsError as e:
                ctx.close()
                reasons.append(f"{n}: {_errmsg(e)}")
        raise TransportUnavailable("no usable RDMA device (" + "; ".join(reasons) + ")")

    def _pick_gid(self) -> tuple[int, str]:
        """Prefer an IPv4-mapped (RoCEv2 over IPv4) GID, else the first non-zero one."""
        found: list[tuple[int, str]] = []
        for i in range(self.port_attr.gid_tbl_len):
            try:
                g = self.ctx.query_gid(self.port, i).gid
            except _pv().error.PyverbsError:
                continue
            if g.replace("0", "").replace(":", ""):
                found.append((i, g))
        if not found:
            raise TransportUnavailable(f"{self.name} port {self.port} has no GID (no IP address on its netdev?)")
        v4 = [f for f in found if f[1].startswith("0000:0000:0000:0000:0000:ffff:")]
        return (v4 or found)[0]

    def max_msg(self) -> int:
        return int(self.port_attr.max_msg_sz)

    def info(self, qp: Any, psn: int, rd_atomic: int) -> dict[str, Any]:
        return {"qpn": qp.qp_num, "psn": psn, "gid": self.gid, "lid": self.port_attr.lid,
                "mtu": int(self.port_attr.active_mtu), "rd_atomic": rd_atomic}

    def create_qp(self, depth: int) -> tuple[Any, Any]:
        """An RC QP (signalled sends) with its own CQ of ``depth`` entries."""
        pv = _pv()
        cq = pv.cq.CQ(self.ctx, depth, None, None, 0)
        try:
            cap = pv.qp.QPCap(max_send_wr=depth, max_recv_wr=1, max_send_sge=1, max_recv_sge=1)
            init = pv.qp.QPInitAttr(qp_type=pv.e.IBV_QPT_RC, scq=cq, rcq=cq, cap=cap, sq_sig_all=1)
            qp = pv.qp.QP(self.pd, init)
        except BaseException:
            cq.close()
            raise
        return qp, cq

    def connect_qp(self, qp: Any, my_psn: int, remote: dict[str, Any], *, access: int,
                   rd_atomic: int, dest_rd_atomic: int) -> None:
        """INIT → RTR → RTS towards ``remote``."""
        pv = _pv()
        a = pv.qp.QPAttr(qp_state=pv.e.IBV_QPS_INIT)
        a.pkey_index = 0
        a.port_num = self.port
        a.qp_access_flags = access
        qp.to_init(a)
        gr = pv.addr.GlobalRoute(dgid=pv.addr.GID(remote["gid"]), sgid_index=self.gid_index)
        gr.hop_limit = 64
        ah = pv.addr.AHAttr(dlid=int(remote["lid"]), port_num=self.port, is_global=1, gr=gr)
        a = pv.qp.QPAttr(qp_state=pv.e.IBV_QPS_RTR)
        a.ah_attr = ah
        a.path_mtu = min(int(self.port_attr.active_mtu), int(remote["mtu"]))
        a.dest_qp_num = int(remote["qpn"])
        a.rq_psn = int(remote["psn"])
        a.max_dest_rd_atomic = dest_rd_atomic
        a.min_rnr_timer = 12
        qp.to_rtr(a)
        a = pv.qp.QPAttr(qp_state=pv.e.IBV_QPS_RTS)
        a.sq_psn = my_psn
        a.timeout = 16        # 4.096 µs * 2^16 ≈ 0.27 s per try: generous for emulated hosts
        a.retry_cnt = 7
        a.rnr_retry = 7
        a.max_rd_atomic = rd_atomic
        qp.to_rts(a)

    def close(self) -> None:
        self.pd.close()
        self.ctx.close()


# --- exporter side ------------------------------------------------------------

@dataclass
class _ExportQP:
    qp: Any
    cq: Any

    def close(self) -> None:
        self.qp.close()
        self.cq.close()


class VerbsExportBackend(ExportBackend):
    """Registers existing mappings for remote read and answers QP exchanges."""

    name = "verbs"

    def __init__(self, device: str | None = None, port: int | None = None) -> None:
        self._dev = _Device(device, port)
        self._mrs: dict[int, tuple[Any, RegionDesc, memoryview]] = {}
        self._qps: dict[int, _ExportQP] = {}
        log.info("verbs exporter on %s port %d gid %s", self._dev.name, self._dev.port, self._dev.gid)

    def register(self, region: ExportedRegion) -> RegionDesc:
        if region.region_id in self._mrs:
            return self._mrs[region.region_id][1]
        pv = _pv()
        length = region.buffer.nbytes
        try:
            # REMOTE_READ alone: no write access, so a read-only mapping can be pinned.
            mr = pv.mr.MR(self._dev.pd, length, pv.e.IBV_ACCESS_REMOTE_READ, address=region.addr)
        except pv.error.PyverbsError as e:
            hint = ""
            if getattr(e, "error_code", None) == errno.EFAULT:
                hint = (" (EFAULT: kernels before 6.2 pin MR pages for writing even for remote-read"
                        " MRs; map the region MAP_SHARED with PROT_READ|PROT_WRITE)")
            raise TransportError(f"verbs: registering region {region.name} ({length} bytes at "
                                 f"{region.addr:#x}) failed: {_errmsg(e)}{hint}") from None
        desc = RegionDesc(region.region_id, region.name, region.role, region.addr, length, mr.rkey)
        # Keeping the memoryview pins the mapping's exporter object while the NIC may read it.
        self._mrs[region.region_id] = (mr, desc, region.buffer)
        return desc

    def deregister(self, region_id: int) -> None:
        entry = self._mrs.pop(region_id, None)
        if entry is not None:
            entry[0].close()

    def descs(self) -> list[RegionDesc]:
        return [d for _, d, _ in self._mrs.values()]

    def extensions(self) -> list[ControlExtension]:
        return [_VerbsExtension(self)]

    def _free(self, qpn: int) -> None:
        q = self._qps.pop(qpn, None)
        if q is not None:
            q.close()
            log.info("verbs QP %d destroyed", qpn)

    def _handle(self, req: dict[str, Any], session: ControlSession) -> dict[str, Any]:
        op = req.get("op")
        if op == "close":
            qpn = int(req["qpn"])
            if not session.owns(("verbs-qp", qpn)):
                raise TransportError(f"QP {qpn} was not created on this control connection")
            session.forget(("verbs-qp", qpn))
            self._free(qpn)
            return {}
        if op != "connect":
            raise ValueError(f"unknown verbs control op {op!r}")
        if len(self._qps) >= MAX_EXPORT_QPS:
            raise TransportError(f"too many verbs connections ({MAX_EXPORT_QPS})")
        if sum(1 for qpn in self._qps if session.owns(("verbs-qp", qpn))) >= MAX_CONNECTION_QPS:
            raise TransportError(f"too many QPs on one control connection ({MAX_CONNECTION_QPS})")
        dev = self._dev
        qp, cq = dev.create_qp(4)   # responder only: reads need no send or receive WRs of ours
        try:
            psn = random.getrandbits(24)
            dest_rd = min(int(dev.attr.max_qp_rd_atom), max(1, int(req.get("rd_atomic", 1))))
            dev.connect_qp(qp, psn, req, access=_pv().e.IBV_ACCESS_REMOTE_READ,
                           rd_atomic=1, dest_rd_atomic=dest_rd)
        except BaseException:
            qp.close()
            cq.close()
            raise
        self._qps[qp.qp_num] = _ExportQP(qp, cq)
        session.on_close(("verbs-qp", qp.qp_num), partial(self._free, qp.qp_num))
        log.info("verbs QP %d connected to initiator QP %d (%s)", qp.qp_num, req["qpn"], req["gid"])
        return dev.info(qp, psn, dest_rd)

    def close(self) -> None:
        for q in self._qps.values():
            q.close()
        self._qps.clear()
        for mr, _, _ in self._mrs.values():
            mr.close()
        self._mrs.clear()
        self._dev.close()

    def __enter__(self) -> VerbsExportBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _VerbsExtension(ControlExtension):
    name = EXTENSION

    def __init__(self, backend: VerbsExportBackend) -> None:
        self._backend = backend

    def handle(self, payload: bytes) -> bytes:
        raise RuntimeError("the verbs extension ties QPs to a control connection: call handle_in")

    def handle_in(self, session: ControlSession, payload: bytes) -> bytes:
        try:
            req = json.loads(payload)
        except ValueError as e:
            raise ProtocolError(f"verbs control payload is not JSON: {e}") from None
        return json.dumps(self._backend._handle(req, session)).encode()


# --- initiator side -----------------------------------------------------------

@dataclass
class _LocalMR:
    start: int
    end: int
    mr: Any
    buffer: memoryview   # keeps the memory alive while registered


class _Batch:
    """State of one read_batch, shared between the trio task and the worker thread."""

    def __init__(self, work: list[tuple[int, int, int, int, int]]) -> None:
        self.work = work            # (local addr, length, lkey, rkey, remote addr)
        self.done_bytes = 0
        self.reported = 0
        self.stop = threading.Event()
        self.started = threading.Event()
        self.finished = threading.Event()


class VerbsConnection(Connection):
    """Initiator side: RDMA READs over one RC QP; control over a SoftwareConnection."""

    transport = "verbs"

    def __init__(self, control: SoftwareConnection, dev: _Device, timeout: float) -> None:
        self._control = control
        self._dev = dev
        self._timeout = timeout
        self._catalog: dict[int, RegionDesc] = {}
        self._local: list[_LocalMR] = []
        self._local_starts: list[int] = []
        self._qp: Any = None
        self._cq: Any = None
        self._remote_qpn: int | None = None
        self._broken: str | None = None     # why the QP needs rebuilding
        self._closed = False
        self._lock = trio.Lock()
        depth = min(SQ_DEPTH, int(dev.attr.max_qp_wr), int(dev.attr.max_cqe))
        self._depth = depth
        self._max_msg = dev.max_msg()
        self._rd_atomic = max(1, int(dev.attr.max_qp_init_rd_atom))

    def __repr__(self) -> str:
        return f"<VerbsConnection {self._dev.name}:{self._dev.port} qpn={getattr(self._qp, 'qp_num', None)}>"

    async def _establish(self) -> None:
        """Create our QP and exchange QP info with the exporter's verbs extension."""
        pv = _pv()
        self._teardown_qp()
        await self._close_remote_qp()
        try:
            qp, cq = self._dev.create_qp(self._depth)
        except pv.error.PyverbsError as e:
            raise TransportError(f"verbs: creating a QP on {self._dev.name} failed: {_errmsg(e)}") from None
        self._qp, self._cq = qp, cq
        psn = random.getrandbits(24)
        req = {"op": "connect", **self._dev.info(qp, psn, self._rd_atomic)}
        try:
            reply = await self._control.call_extension(EXTENSION, json.dumps(req).encode())
        except TransportError:
            self._teardown_qp()
            raise
        try:
            remote = json.loads(reply)
            rd = min(self._rd_atomic, int(remote["rd_atomic"]))
            self._dev.connect_qp(qp, psn, remote, access=0, rd_atomic=rd, dest_rd_atomic=1)
        except (ValueError, KeyError, TypeError) as e:
            self._teardown_qp()
            raise ProtocolError(f"verbs: bad QP info from the exporter: {_errmsg(e)}") from None
        except pv.error.PyverbsError as e:
            self._teardown_qp()
            raise QPError(f"verbs: connecting QP to exporter QP {remote.get('qpn')} failed: "
                          f"{_errmsg(e)}") from None
        self._remote_qpn = int(remote["qpn"])
        self._broken = None
        log.debug("verbs QP %d ↔ exporter QP %d, %d reads in flight, rd_atomic %d",
                  qp.qp_num, self._remote_qpn, self._depth, rd)

    def _teardown_qp(self) -> None:
        if self._qp is not None:
            self._qp.close()
            self._qp = None
        if self._cq is not None:
            self._cq.close()
            self._cq = None

    async def _close_remote_qp(self) -> None:
        if self._remote_qpn is None:
            return
        qpn, self._remote_qpn = self._remote_qpn, None
        try:
            await self._control.call_extension(EXTENSION, json.dumps({"op": "close", "qpn": qpn}).encode())
        except TransportError as e:
            log.debug("closing exporter QP %d: %s", qpn, e)

    def peer_closed(self) -> bool:
        # The exporter destroys our QP when it ends the control connection: that connection tells.
        return not self._closed and self._control.peer_closed()

    async def call_extension(self, name: str, payload: bytes) -> bytes:
        """Extensions go over the control channel (a software connection)."""
        return await self._control.call_extension(name, payload)

    async def register(self) -> Catalog:
        cat: Catalog = await self._control.request_catalog("verbs")
        if cat.transport != "verbs":
            raise ProtocolError(f"exporter answered with a {cat.transport!r} catalog, not 'verbs'")
        self._catalog = {r.rkey: r for r in cat.regions}
        return cat

    def register_local(self, buffer: memoryview) -> None:
        """Register ``buffer`` (writable, contiguous) as read destination memory (LOCAL_WRITE)."""
        pv = _pv()
        buf = memoryview(buffer).cast("B")
        start = _buffer_address(buf)
        end = start + buf.nbytes
        i = bisect.bisect_right(self._local_starts, start) - 1
        if i >= 0 and self._local[i].start <= start and end <= self._local[i].end:
            return   # already covered
        try:
            mr = pv.mr.MR(self._dev.pd, buf.nbytes, pv.e.IBV_ACCESS_LOCAL_WRITE, address=start)
        except pv.error.PyverbsError as e:
            raise TransportError(f"verbs: registering {buf.nbytes} local bytes failed: {_errmsg(e)}") from None
        j = bisect.bisect_right(self._local_starts, start)
        self._local.insert(j, _LocalMR(start, end, mr, buf))
        self._local_starts.insert(j, start)

    def _lkey(self, addr: int, length: int) -> int:
        i = bisect.bisect_right(self._local_starts, addr) - 1
        # several MRs may start before addr; take any that covers the range
        while i >= 0:
            m = self._local[i]
            if m.start <= addr and addr + length <= m.end:
                return m.mr.lkey
            i -= 1
        raise ValueError(f"destination {addr:#x}+{length} is not inside register_local()'d memory")

    def _plan(self, ops: Sequence[ReadOp]) -> list[tuple[int, int, int, int, int]]:
        """Check every op before posting any; split ops above the port's max message size."""
        work = []
        for n, op in enumerate(ops):
            desc = self._catalog.get(op.rkey)
            length = op.dest.nbytes
            if desc is None:
                raise RemoteAccessError(f"read {n}: unknown rkey {op.rkey:#x}")
            if op.offset < 0 or op.offset + length > desc.length:
                raise RemoteAccessError(f"read {n}: {op.offset}+{length} is outside region "
                                        f"{desc.name} ({desc.length} bytes)")
            if length == 0:
                continue
            local = _buffer_address(op.dest)
            lkey = self._lkey(local, length)
            raddr = desc.addr + op.offset
            for off in range(0, length, self._max_msg):
                chunk = min(self._max_msg, length - off)
                work.append((local + off, chunk, lkey, op.rkey, raddr + off))
        return work

    async def read_batch(self, ops: Sequence[ReadOp], progress: ProgressFn | None = None) -> None:
        work = self._plan(ops)
        await self._run_work(work, progress)

    async def read_raw(self, rkey: int, remote_addr: int, dest: memoryview) -> None:
        """One READ with no local rkey/bounds check: lets tests and diagnostics see what the
        NIC itself enforces. Failures surface as for read_batch."""
        local = _buffer_address(dest)
        await self._run_work([(local, dest.nbytes, self._lkey(local, dest.nbytes), rkey, remote_addr)], None)

    async def _run_work(self, work: list[tuple[int, int, int, int, int]], progress: ProgressFn | None) -> None:
        if self._closed:
            raise TransportError("verbs connection is closed")
        if not work:
            return
        async with self._lock:
            if self._broken is not None or self._qp is None:
                log.info("verbs: rebuilding the QP pair (%s)", self._broken)
                await self._establish()
            batch = _Batch(work)

            async def ticker() -> None:
                while True:
                    await trio.sleep(_PROGRESS_INTERVAL)
                    report()

            def report() -> None:
                done = batch.done_bytes
                if progress is not None and done > batch.reported:
                    progress(done - batch.reported)
                    batch.reported = done

            failure: Exception | None = None
            async with trio.open_nursery() as nursery:
                if progress is not None:
                    nursery.start_soon(ticker)
                try:
                    # abandon_on_cancel: on cancellation we stop posting, then wait (shielded)
                    # until every posted read has completed or flushed — the NIC may still
                    # write into the caller's buffers until then.
                    await trio.to_thread.run_sync(self._worker, batch, abandon_on_cancel=True)
                except trio.Cancelled:
                    # Cancelled before the thread ran (to_thread checkpoints first) or while it
                    # ran. It sets `started` before reading `stop`, we the reverse: either we
                    # see it started and wait, or it sees `stop` and posts nothing.
                    batch.stop.set()
                    if batch.started.is_set():
                        with trio.CancelScope(shield=True):
                            await trio.to_thread.run_sync(batch.finished.wait)
                    raise
                except Exception as e:   # raised below, not wrapped in the nursery's ExceptionGroup
                    failure = e
                finally:
                    nursery.cancel_scope.cancel()
            report()
            if failure is not None:
                raise failure

    def _worker(self, batch: _Batch) -> None:
        """Post chained READ WRs with up to ``depth`` in flight and poll completions (thread)."""
        pv = _pv()
        batch.started.set()
        try:
            self._worker_loop(batch, pv)
        except pv.error.PyverbsError as e:
            self._broken = f"verbs call failed: {_errmsg(e)}"
            raise QPError(f"verbs: {_errmsg(e)}") from None
        finally:
            batch.finished.set()

    def _worker_loop(self, batch: _Batch, pv: SimpleNamespace) -> None:
        qp, cq = self._qp, self._cq
        work = batch.work
        SGE, SendWR, READ = pv.wr.SGE, pv.wr.SendWR, pv.e.IBV_WR_RDMA_READ
        SUCCESS, FLUSH = pv.e.IBV_WC_SUCCESS, pv.e.IBV_WC_WR_FLUSH_ERR
        nxt = 0
        inflight = 0
        error: TransportError | None = None      # the first real failure
        flushed: TransportError | None = None    # reported only if nothing better explains it
        forced = False
        last = time.monotonic()
        idle = 0
        while nxt < len(work) or inflight:
            failed = error is not None or flushed is not None
            if not failed and not batch.stop.is_set() and nxt < len(work) and inflight < self._depth:
                # Chain up to the free SQ slots into one post_send.
                end = min(len(work), nxt + self._depth - inflight, nxt + 256)
                head = prev = None
                keep = []   # the C chain points into these objects until post_send returns
                for i in range(nxt, end):
                    laddr, length, lkey, rkey, raddr = work[i]
                    wr = SendWR(wr_id=i, opcode=READ, num_sge=1, sg=[SGE(laddr, length, lkey)])
                    wr.set_wr_rdma(rkey, raddr)
                    keep.append(wr)
                    if prev is None:
                        head = wr
                    else:
                        prev.next_wr = wr
                    prev = wr
                try:
                    qp.post_send(head)
                except pv.error.PyverbsError as e:
                    # Part of the chain may be posted; make the NIC flush everything, then drain.
                    error = QPError(f"verbs: post_send failed: {_errmsg(e)}")
                    self._broken = str(error)
                    self._force_error(qp, pv)
                    inflight += end - nxt   # upper bound; the drain loop below times out on the rest
                    forced = True
                    nxt = end
                else:
                    inflight += end - nxt
                    nxt = end
            elif (failed or batch.stop.is_set()) and not inflight:
                break
            n, wcs = cq.poll(_POLL_BATCH)
            if n:
                idle = 0
                last = time.monotonic()
                for wc in wcs:
                    inflight -= 1
                    if wc.status == SUCCESS:
                        batch.done_bytes += work[wc.wr_id][1]
                    elif wc.status == FLUSH:
                        flushed = flushed or self._wc_error(wc, work, pv)
                        self._broken = self._broken or str(flushed)
                    else:
                        error = error or self._wc_error(wc, work, pv)
                        self._broken = str(error)
                continue
            idle += 1
            if idle > 50:
                time.sleep(0.0002)   # nothing completing: leave the CPU to the NIC (rxe is software)
            if inflight and time.monotonic() - last > self._timeout:
                if forced:
                    self._broken = "reads never flushed"
                    raise error or VerbsTimeout(f"verbs: {inflight} reads never completed or flushed")
                # Force the QP to ERR so the NIC flushes what is outstanding, then drain.
                error = error or VerbsTimeout(f"verbs: {inflight} reads got no completion within "
                                              f"{self._timeout:g}s")
                self._broken = str(error)
                self._force_error(qp, pv)
                forced = True
                last = time.monotonic()
        failure = error or flushed
        if failure is not None:
            raise failure

    @staticmethod
    def _force_error(qp: Any, pv: SimpleNamespace) -> None:
        try:
            qp.modify(pv.qp.QPAttr(qp_state=pv.e.IBV_QPS_ERR), pv.e.IBV_QP_STATE)
        except pv.error.PyverbsError as e:
            log.warning("verbs: cannot move QP to the error state: %s", _errmsg(e))

    @staticmethod
    def _wc_error(wc: Any, work: list[tuple[int, int, int, int, int]], pv: SimpleNamespace) -> TransportError:
        st = pv.e.ibv_wc_status(wc.status)
        laddr, length, _, rkey, raddr = work[wc.wr_id]
        what = f"RDMA READ of {length} bytes at {raddr:#x} rkey {rkey:#x}: {st.name}"
        if st in (pv.e.IBV_WC_REM_ACCESS_ERR, pv.e.IBV_WC_REM_INV_REQ_ERR):
            return RemoteAccessError(f"verbs: remote access error: {what}")
        if st == pv.e.IBV_WC_RETRY_EXC_ERR:
            return ConnectError(f"verbs: exporter not responding (retries exhausted): {what}")
        if st == pv.e.IBV_WC_WR_FLUSH_ERR:
            return QPError(f"verbs: QP in error state, request flushed: {what}")
        return QPError(f"verbs: {what}")

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        async with self._lock:
            with trio.CancelScope(shield=True):
                with trio.move_on_after(self._timeout):
                    await self._close_remote_qp()
            self._teardown_qp()
            for m in self._local:
                m.mr.close()
            self._local.clear()
            self._local_starts.clear()
            self._dev.close()
            await self._control.aclose()


ControlConnect = Callable[..., Awaitable["SoftwareConnection"]]


async def connect(host: str, port: int, *, fsid: str, secret: bytes, timeout: float = 10.0,
                  device: str | None = None, control_connect: ControlConnect | None = None) -> VerbsConnection:
    """Authenticate over the software control channel, then connect an RC QP to the exporter.

    ``control_connect`` defaults to ``rmemfs.transport.software.connect`` (the control channel).
    """
    dev = _Device(device)   # fails fast with TransportUnavailable before any network traffic
    try:
        if control_connect is None:
            try:
                from . import software
            except ImportError as e:
                raise TransportUnavailable(f"verbs needs the software control channel: {e}") from None
            control_connect = software.connect
        control = await control_connect(host, port, fsid=fsid, secret=secret, timeout=timeout)
    except BaseException:
        dev.close()
        raise
    conn = VerbsConnection(control, dev, timeout)
    try:
        with trio.fail_after(timeout):
            await conn._establish()
    except trio.TooSlowError:
        await conn.aclose()
        raise ConnectError(f"verbs: QP exchange with {host}:{port} timed out after {timeout:g}s") from None
    except BaseException:
        await conn.aclose()
        raise
    return conn


def export_backend() -> VerbsExportBackend:
    return VerbsExportBackend()
