"""The transport interface: one-sided reads of another host's exported memory.

Two implementations plug in behind it and are picked by name through
``TRANSPORTS`` (``software``: TCP stand-in served by the exporter process;
``verbs``: pyverbs RDMA READ). Recovery only ever sees this module.

Roles
-----
*Exporter side* (the source host's "NIC", a process of its own): an
``ExportedRegion`` is memory that already exists (a read-only mapping of a
region file). An ``ExportBackend`` registers it and returns the remote
description ``RegionDesc(region_id, name, addr, length, rkey)``. Registration
never copies or re-allocates memory.

*Initiator side* (the failover host): ``connect()`` opens a ``Connection``
authenticated with the filesystem's secret. ``Connection.register()`` is the
registration handshake (US11720457B2 claim 1): the exporter registers the
filesystem's regions and the regions holding its dirty page lists, and returns
their descriptions as a ``Catalog``. Then ``read``/``read_batch`` perform
one-sided reads of ``(rkey, offset, length)`` straight into caller buffers;
``read_batch`` keeps many reads in flight and never does a per-page round trip.
Destination buffers must lie inside memory passed to ``register_local`` first
(a verbs MR; a no-op for software).
"""
from __future__ import annotations

import abc
import logging
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol, runtime_checkable
from collections.abc import Awaitable, Callable, Sequence

from ..errors import RmemfsError
from ..regions import RegionRole

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegionDesc:
    """A registered region as a remote reader sees it."""

    region_id: int
    name: str       # region file name, e.g. "data-0002.rgn"
    role: RegionRole
    addr: int       # start address in the exporter's address space
    length: int     # bytes
    rkey: int       # random, unguessable; >= 64 bits for software, NIC-assigned for verbs


@dataclass(frozen=True)
class Catalog:
    """The exporter's answer to the registration handshake."""

    fsid: str
    transport: str
    regions: tuple[RegionDesc, ...]

    @cached_property
    def _index(self) -> dict[int, RegionDesc]:
        return {r.region_id: r for r in self.regions}

    def by_id(self, region_id: int) -> RegionDesc:
        return self._index[region_id]

    def with_role(self, role: RegionRole) -> list[RegionDesc]:
        return [r for r in self.regions if r.role is role]


@dataclass(frozen=True)
class ReadOp:
    """One one-sided read: ``len(dest)`` bytes at ``offset`` within the region ``rkey`` names."""

    rkey: int
    offset: int
    dest: memoryview   # writable, C-contiguous, bytes; inside register_local()'d memory


@dataclass(frozen=True)
class ExportedRegion:
    """Memory the exporter already maps, offered for registration."""

    region_id: int
    name: str
    role: RegionRole
    buffer: memoryview   # the mapping (read-only is enough: there is no remote write)
    addr: int            # its address in this process
    fd: int = -1         # the region file, open while exported, or -1 when there is none (tests)


# --- errors --------------------------------------------------------------

class TransportError(RmemfsError):
    """Any transport failure."""


class ConnectError(TransportError):
    """The source cannot be reached, refused, or timed out."""


class AuthError(TransportError):
    """The peer failed the HMAC challenge (wrong secret) or serves another filesystem."""


class FsidMismatch(AuthError):
    """The exporter serves another filesystem than the one asked for."""


class RemoteAccessError(TransportError):
    """A read named an unknown rkey or fell outside its region; the connection stays usable."""


class ProtocolError(TransportError):
    """The peer sent something malformed; the connection is dropped."""


class TransportUnavailable(TransportError):
    """This transport cannot run here (no pyverbs, no RDMA device, port down)."""


# --- interfaces ----------------------------------------------------------

class ExportBackend(abc.ABC):
    """Exporter-side registration of existing memory for one transport."""

    name: str

    @abc.abstractmethod
    def register(self, region: ExportedRegion) -> RegionDesc:
        """Register ``region`` for remote read only; idempotent per region_id."""

    @abc.abstractmethod
    def deregister(self, region_id: int) -> None: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    def extensions(self) -> list[ControlExtension]:
        """Control extensions this transport needs served over the software channel (e.g. a QP exchange)."""
        return []


ProgressFn = Callable[[int], None]   # called with bytes completed since the last call


class Connection(abc.ABC):
    """Initiator side of one authenticated connection to a source's exporter."""

    transport: str

    @abc.abstractmethod
    async def register(self) -> Catalog:
        """The registration handshake: returns every region of the filesystem and its dirty lists."""

    def register_local(self, buffer: memoryview) -> None:  # noqa: B027 - optional: a no-op where nothing registers
        """Make ``buffer`` a valid read destination (software transport: nothing to do)."""

    @abc.abstractmethod
    async def read_batch(self, ops: Sequence[ReadOp], progress: ProgressFn | None = None) -> None:
        """Perform every read with many in flight; raise on the first failure."""

    async def read(self, rkey: int, offset: int, dest: memoryview) -> None:
        await self.read_batch([ReadOp(rkey, offset, dest)])

    def peer_closed(self) -> bool:
        """True when the exporter has already closed this connection (e.g. dropped it as idle), found
        without sending anything: a caller holding an idle connection reconnects before its next request
        instead of failing it. False when it cannot tell (a request in flight; a transport that cannot)."""
        return False

    @abc.abstractmethod
    async def aclose(self) -> None: ...

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


ConnectFn = Callable[..., Awaitable[Connection]]
"""``connect(host, port, *, fsid: str, secret: bytes, timeout: float) -> Connection``"""


class ControlExtension(abc.ABC):
    """An exporter-side handler for an authenticated control-channel request.

    The software transport's connection is the control channel. A transport
    that needs its own set-up (verbs: exchanging QP numbers and GIDs) registers
    an extension under a name; the initiator calls it with
    ``SoftwareConnection.call_extension(name, payload)`` after authentication.
    """

    name: str

    @abc.abstractmethod
    def handle(self, payload: bytes) -> bytes: ...

    def handle_in(self, session: ControlSession, payload: bytes) -> bytes:
        """``handle`` for a request arriving on ``session``. An extension that holds resources for
        a client (verbs: its QPs) overrides this and frees them with ``session.on_close``."""
        return self.handle(payload)


class ControlSession:
    """One authenticated control connection as extensions see it. When the connection ends (closed by
    the client, dropped as idle or for a protocol error), the exporter calls ``close``, which runs the
    clean-ups registered with ``on_close`` newest first; a failing one is logged, the others still run."""

    def __init__(self, peer: str) -> None:
        self.peer = peer
        self._cleanups: dict[object, Callable[[], None]] = {}
        self.closed = False

    def on_close(self, key: object, fn: Callable[[], None]) -> None:
        """Run ``fn`` when the connection ends, unless ``forget(key)`` is called first."""
        if self.closed:
            raise RuntimeError(f"{self.peer}: control connection already closed")
        self._cleanups[key] = fn

    def forget(self, key: object) -> None:
        self._cleanups.pop(key, None)

    def owns(self, key: object) -> bool:
        return key in self._cleanups

    def close(self) -> None:
        self.closed = True
        while self._cleanups:
            key, fn = self._cleanups.popitem()
            try:
                fn()
            except Exception:
                log.exception("%s: clean-up of %r after the control connection ended failed", self.peer, key)


@runtime_checkable
class Transport(Protocol):
    """What every transport module provides; ``transport.load`` checks a module against it."""

    def available(self) -> str | None:
        """None when this transport can be used here, else the reason it cannot (one line)."""

    async def connect(self, host: str, port: int, *, fsid: str, secret: bytes, timeout: float = 10.0) -> Connection:
        """Connect to an exporter and authenticate (ConnectError, AuthError, ProtocolError, ...)."""

    def export_backend(self) -> ExportBackend:
        """A new exporter-side registration backend."""
