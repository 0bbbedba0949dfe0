"""The RADOS store: a baseline store in a Ceph pool (``--backend rados:POOL[/PREFIX]``), issue 13.

Passes tests/test_contract_store.py (kind "rados", against the session's test cluster). ``rados:`` specs
open it through the scheme registry with the store options ``ceph_conf`` (default: librados's own lookup,
``CEPH_CONF``, /etc/ceph/ceph.conf) and ``ceph_id`` (default ``admin``), which every command takes as
``-o ceph_conf=PATH,ceph_id=NAME`` beside ``--backend``.

Failures are store errors with one-line messages: a cluster that does not answer (connect, or any operation,
within TIMEOUT seconds unless the conf file sets its own librados timeouts) is ``StoreUnreachable``;
a missing conf, keyring or pool, refused credentials, missing OSD caps and a full pool (quota or cluster
full ratio: writes fail at once with EDQUOT/ENOSPC, ``set_osdmap_full_try``) are ``BackendError``s.

Objects, all named ``<PREFIX>/...`` (PREFIX defaults to ``rmemfs``) in POOL:

    fs.json                 identity, created exclusively (``op.new(EXCLUSIVE)`` + ``write_full`` in one op)
    secret                  the transports' HMAC key, likewise. It lives in the pool: whoever the cluster's
                            keyring lets read the pool (OSD caps) can read it, no one else.
    epoch.<epoch:010d>      one object per epoch, created by its owner's claim; content = that epoch's
                            newest manifest, omap key ``owner`` = the claimer's token
    seg.<name>              a finished segment's head: JSON {size, parts, part_size}; created exclusively,
                            last, so a segment is visible all at once
    part.<name>.<i:05d>     its bytes, in parts of PART_SIZE (below osd_max_write_size, 90 MiB), written
                            in ops of up to 4 MiB (the segment writer's staging size), IN_FLIGHT at once

**publish is a compare-and-swap on the epoch, from RADOS's atomic ops** (one WriteOp applies all or nothing):

* *Takeover (claim)*: create ``epoch.<E+1>`` with ``op.new(LIBRADOS_CREATE_EXCLUSIVE)``, the manifest and the
  owner token in one op. Of two claimers exactly one create succeeds; the other gets ObjectExists ->
  FencedError. Claim and first manifest appear together.
* *Flush*: ``omap_cmp("owner", our token, EQ)`` + ``write_full`` on our own ``epoch.<E>``: fails unless the
  object still exists and is ours (a newer owner's GC removed it -> ObjectNotFound -> FencedError).
* *An old owner can never make its epoch newest again*: it only writes ``epoch.<E>``; readers take the highest
  epoch object. After its write it lists the epochs; a higher one -> FencedError (marks kept).
* *Takeover after the old owner published once more*: after its create the new owner re-reads ``epoch.<E>``;
  a generation other than its base -> it removes its claim object (the old epoch is newest again) and fails.
  Each side reads after its own atomic step (Dekker's order), as in ``directory.py``.
* *GC* runs only while the newest is our epoch (``BaselineStore.collect_garbage``) and removes our names only.
"""
from __future__ import annotations

import atexit
import errno
import json
import logging
import os
import re
import threading
import weakref
from typing import Any
from collections.abc import Sequence

from ..errors import BackendError, CorruptionError, FencedError, StoreUnreachable
from .base import BaselineStore, SegmentReader, SegmentSink, StoreOptions, register_scheme, writer_token
from .format import STATE_CLEAN, Identity, Manifest, decode_secret, encode_secret, parse_segment_name

log = logging.getLogger(__name__)

PART_SIZE = 64 << 20        # below osd_max_write_size (90 MiB) and osd_max_object_size (128 MiB)
IN_FLIGHT = 16              # aio write ops (of up to base.STAGE_BYTES, 4 MiB) outstanding per sink
TIMEOUT = 10                # seconds: client_mount_timeout, rados_osd_op_timeout, rados_mon_op_timeout
# librados's defaults of those (300 s, 0 = wait forever, 0): a conf file that sets another value keeps it
TIMEOUTS = {"client_mount_timeout": "300", "rados_osd_op_timeout": "0", "rados_mon_op_timeout": "0"}


_CLUSTERS: dict[tuple[int, str, str | None], Any] = {}   # by (pid, conf, user)
_STORES: weakref.WeakSet[RadosStore] = weakref.WeakSet()  # whose I/O contexts use those connections
_LOCK = threading.Lock()
_OURS = re.compile(r"fs\.json|secret|epoch\.\d{10}|seg\..+|part\..+\.\d{5}")


def _op_error(store: RadosStore, what: str, errno_: int, text: str) -> BackendError:
    errno_ = abs(errno_)
    if errno_ == errno.ETIMEDOUT:
        return StoreUnreachable(f"{store.spec}: {what}: the cluster did not answer within "
                                f"{store.timeouts.get('rados_osd_op_timeout', TIMEOUT)} s "
                                f"(rados_osd_op_timeout; an OSD down?)")
    if errno_ in (errno.EPERM, errno.EACCES):
        return BackendError(f"{store.spec}: {what}: {store.who} may not use pool {store.pool!r} (its OSD caps)")
    if errno_ in (errno.ENOSPC, errno.EDQUOT):
        return BackendError(f"{store.spec}: {what}: pool {store.pool!r} is full "
                            f"({'its quota is reached' if errno_ == errno.EDQUOT else 'the cluster is full'})")
    return BackendError(f"{store.spec}: {what}: {text or os.strerror(errno_)}")


@atexit.register
def _shutdown() -> None:
    """Close this process's I/O contexts, then its connections, before the interpreter goes away. Left to
    the interpreter's teardown, a connection's threads could outlive the C++ runtime: "terminate called
    without an active exception" and SIGABRT after the command had done its work (rmemfs-ctl verify
    printed its result and exited -6, once in four runs). A forked child's copies of its parent's
    handles have no threads and are left alone."""
    pid = os.getpid()
    with _LOCK:
        for store in list(_STORES):
            if store._pid == pid:
                store._io.close()
        for key in [k for k in _CLUSTERS if k[0] == pid]:
            _CLUSTERS.pop(key).shutdown()


def _rados() -> Any:
    try:
        import rados  # the one importer of python3-rados
    except ImportError:
        raise BackendError("the rados backend needs python3-rados (run tools/setup)") from None
    return rados


class RadosStore(BaselineStore):
    # A load's span reads (8 MiB, one aio read each) in flight at once: one at a time left the OSD idle
    # between them (tools/bench --only store: 0.86x raw read, the reader thread waiting in every sample).
    load_reads_in_flight = 4

    def __init__(self, rest: str, *, ceph_conf: str | None = None, ceph_id: str | None = None) -> None:
        super().__init__()
        pool, _, prefix = rest.partition("/")
        if not pool:
            raise BackendError(f"rados:{rest}: give a pool, rados:POOL[/PREFIX]")
        self.pool, self.prefix = pool, (prefix.strip("/") or "rmemfs")
        self.spec = f"rados:{rest}"
        self.token = writer_token()
        self._warned: set[str] = set()
        self._sinks: set[str] = set()       # segment names this instance is writing
        self.rados = _rados()
        if ceph_conf and not os.path.isfile(ceph_conf):
            raise BackendError(f"{self.spec}: ceph_conf {ceph_conf} does not exist (or is not a file)")
        self.who = f"client.{ceph_id or 'admin'}"
        self._conf, self._id = ceph_conf, ceph_id
        self.timeouts: dict[str, str] = {}      # librados's timeouts in force (ours, or the conf file's)
        self._open()

    def _open(self) -> None:
        try:
            key = (os.getpid(), self._conf or "", self._id)
            with _LOCK:     # one connection per (conf, user) in a process: connecting costs a mon round trip
                cluster = _CLUSTERS.get(key)
                if cluster is None:
                    cluster = _CLUSTERS[key] = self._connect(self._conf, self._id)
                self.timeouts = {name: cluster.conf_get(name) for name in TIMEOUTS}
                self._io = cluster.open_ioctx(self.pool)
                self._pid = os.getpid()
                _STORES.add(self)
        except self.rados.Error as e:
            raise self._connect_error(e, self._conf) from None
        # A full pool or cluster fails writes at once (ENOSPC, EDQUOT) instead of holding them until it
        # has room again: a flush then fails like one on a full disk, keeps its marks, and retries.
        self._io.set_osdmap_full_try()

    @property
    def io(self) -> Any:
        """The pool's I/O context, in this process: librados's threads do not survive a fork (a daemon
        opens its store before it forks), so a forked child connects again instead of hanging."""
        if self._pid != os.getpid():
            self._open()
        return self._io

    def _connect(self, ceph_conf: str | None, ceph_id: str | None) -> Any:
        # conffile "" is librados's own lookup (CEPH_CONF, /etc/ceph/ceph.conf, ~/.ceph, ./ceph.conf).
        cluster = self.rados.Rados(conffile=ceph_conf or "", rados_id=ceph_id,
                                   conf={"log_to_stderr": "false", "err_to_stderr": "false"})
        for name, default in TIMEOUTS.items():     # ours unless the conf file sets its own
            if cluster.conf_get(name) == default:
                cluster.conf_set(name, str(TIMEOUT))
        self.timeouts = {name: cluster.conf_get(name) for name in TIMEOUTS}
        cluster.connect()
        return cluster

    def _connect_error(self, e: Exception, ceph_conf: str | None) -> BackendError:
        conf = ceph_conf or "librados's default ceph.conf (CEPH_CONF, /etc/ceph/ceph.conf)"
        text = str(e)
        if "conf_read_file" in text:
            return BackendError(f"{self.spec}: cannot read {conf}: give -o ceph_conf=PATH")
        if isinstance(e, self.rados.TimedOut):
            return StoreUnreachable(f"{self.spec}: the cluster is unreachable: no monitor of {conf} answered "
                                    f"within {self.timeouts.get('client_mount_timeout', TIMEOUT)} s "
                                    f"(client_mount_timeout)")
        if isinstance(e, (self.rados.PermissionDeniedError, self.rados.PermissionError)):
            return BackendError(f"{self.spec}: the cluster refused {self.who}: wrong key or user "
                                f"(check -o ceph_id and the keyring {conf} names)")
        if "opening pool" in text:
            return BackendError(f"{self.spec}: pool {self.pool!r} does not exist "
                                f"(create it: ceph osd pool create {self.pool})")
        if isinstance(e, self.rados.ObjectNotFound):
            return BackendError(f"{self.spec}: no keyring for {self.who} (the keyring setting of {conf}; "
                                f"check -o ceph_id)")
        return BackendError(f"{self.spec}: cannot connect to the cluster as {self.who}: {e}")

    def _failed(self, what: str, e: Exception) -> BackendError:
        """The store error for a failed operation: unreachable (timed out), not permitted, full, other."""
        return _op_error(self, what, getattr(e, "errno", 0) or 0, str(e))

    def _o(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def describe(self, name: str | None = None) -> str:
        return self.spec if name is None else f"{self.spec}/seg.{name}"

    def _read(self, name: str) -> bytes | None:
        try:
            size, _ = self.io.stat(self._o(name))
            return self.io.read(self._o(name), max(size, 1))
        except self.rados.ObjectNotFound:
            return None
        except self.rados.Error as e:
            raise self._failed(f"reading {name}", e) from None

    def _names(self) -> list[str]:
        start = self.prefix + "/"
        try:
            names = [o.key[len(start):] for o in self.io.list_objects() if o.key.startswith(start)]
            # The binding's listing ends quietly on an error (ObjectIterator.__next__ turns any failure into
            # StopIteration): with the only OSD down it timed out and listed nothing, which read_manifest
            # took for "no MANIFEST". So one more operation must succeed before the listing is believed.
            try:
                self.io.stat(self._o("fs.json"))
            except self.rados.ObjectNotFound:
                pass
        except self.rados.Error as e:
            raise self._failed("listing the pool", e) from None
        return names

    def _create(self, name: str, data: bytes, omap: dict[str, bytes] | None = None) -> bool:
        with self.rados.WriteOpCtx() as op:
            op.new(self.rados.LIBRADOS_CREATE_EXCLUSIVE)
            op.write_full(data)
            if omap:
                self.io.set_omap(op, tuple(omap), tuple(omap.values()))
            try:
                self.io.operate_write_op(op, self._o(name))
            except self.rados.ObjectExists:
                return False
            except self.rados.Error as e:
                raise self._failed(f"writing {name}", e) from None
        return True

    # --- identity ---------------------------------------------------------------
    def check_usable(self) -> None:
        pass    # connecting and opening the pool in __init__ checked it

    def is_empty(self) -> bool:
        names = self._names()
        if any(n.startswith("epoch.") for n in names):
            return False
        for n in names:
            if not _OURS.fullmatch(n) or (n.startswith("seg.") and parse_segment_name(n[4:]) is None):
                raise BackendError(f"backend {self.spec} holds {n!r}, which is not an rmemfs file: "
                                   f"give rmemfs a pool or prefix of its own")
            if n.startswith("seg."):
                raise BackendError(f"backend {self.spec} holds segments but no MANIFEST: it is damaged")
        return True

    def create(self, settings: dict, regions: dict[int, int]) -> Manifest:
        import secrets
        import time
        import uuid
        from .base import owner_info
        self._create("fs.json", Identity(str(uuid.uuid4()), time.time_ns()).to_bytes())
        self._create("secret", encode_secret(secrets.token_bytes(32)))
        manifest = Manifest(self.fsid(), 0, 0, STATE_CLEAN, owner_info(), time.time_ns(), regions,
                            settings=settings)
        if not self._epochs():
            try:
                self._claim(manifest, base=None)
                return manifest
            except FencedError:
                pass
        return self.read_manifest()

    def fsid(self) -> str:
        if self._fsid is None:
            raw = self._read("fs.json")
            if raw is None:
                raise BackendError(f"backend {self.spec} holds no rmemfs filesystem (no fs.json)")
            self._fsid = Identity.from_bytes(raw, f"{self.spec}/fs.json").fsid
        return self._fsid

    def secret(self) -> bytes:
        raw = self._read("secret")
        if raw is None:
            raise BackendError(f"{self.spec}/secret is missing: the backend is incomplete")
        return decode_secret(raw, f"{self.spec}/secret")

    # --- manifest ---------------------------------------------------------------
    def _epochs(self) -> list[int]:
        return sorted((int(n[6:]) for n in self._names() if n.startswith("epoch.") and n[6:].isdigit()),
                      reverse=True)

    def _manifest_of(self, epoch: int) -> Manifest | None:
        raw = self._read(f"epoch.{epoch:010d}")
        return None if raw is None else Manifest.from_bytes(raw, f"{self.spec}/MANIFEST of epoch {epoch}")

    def read_manifest(self) -> Manifest:
        for _ in range(5):
            epochs = self._epochs()
            if not epochs:
                raise BackendError(f"backend {self.spec} has no published MANIFEST")
            m = self._manifest_of(epochs[0])
            if m is None:
                continue
            if m.fsid != self.fsid():
                raise BackendError(f"{self.spec}: manifest of filesystem {m.fsid}, backend is {self.fsid()}")
            if m.epoch != epochs[0]:
                raise CorruptionError(f"{self.spec}/epoch.{epochs[0]:010d}: holds epoch {m.epoch}")
            return m
        raise BackendError(f"backend {self.spec}: the MANIFEST kept disappearing while being read")

    def _fenced(self, epoch: int) -> FencedError:
        return FencedError(f"backend {self.spec} now belongs to a newer epoch; this host (epoch {epoch}) "
                           f"may no longer publish")

    def publish(self, manifest: Manifest, *, expect_epoch: int) -> None:
        current = self.read_manifest()
        self.step("publish.read")
        if current.epoch != expect_epoch:
            raise self._fenced(expect_epoch)
        if manifest.epoch == expect_epoch:
            if self.owned_epoch != expect_epoch or manifest.generation <= current.generation:
                raise FencedError(f"backend {self.spec}: this writer may not publish in epoch {expect_epoch}")
            with self.rados.WriteOpCtx() as op:
                op.omap_cmp("owner", self.token, self.rados.LIBRADOS_CMPXATTR_OP_EQ)
                op.write_full(manifest.to_bytes())
                self.step("publish.written")
                try:
                    self.io.operate_write_op(op, self._o(f"epoch.{expect_epoch:010d}"))
                except self.rados.Error as e:
                    if isinstance(e, self.rados.ObjectNotFound) or getattr(e, "errno", 0) == errno.ECANCELED:
                        raise self._fenced(expect_epoch) from None
                    raise self._failed(f"publishing epoch {expect_epoch}", e) from None
            self.step("publish.renamed")
            if self._epochs()[0] > expect_epoch:
                raise self._fenced(expect_epoch)
        elif manifest.epoch == expect_epoch + 1:
            if manifest.generation <= current.generation:
                raise FencedError(f"backend {self.spec} moved on while this host took over: run it again")
            self._claim(manifest, base=current)
        else:
            raise ValueError(f"publish of epoch {manifest.epoch} expecting {expect_epoch}: only E or E+1")

    def _claim(self, manifest: Manifest, base: Manifest | None) -> None:
        name = f"epoch.{manifest.epoch:010d}"
        self.step("claim.built")
        if not self._create(name, manifest.to_bytes(), {"owner": self.token.encode()}):
            raise FencedError(f"backend {self.spec}: epoch {manifest.epoch} was claimed by another host first")
        self.step("claim.renamed")
        if base is not None:
            now = self._manifest_of(base.epoch)
            if now is None or now.generation != base.generation:
                self._remove(name)
                log.warning("withdrew this host's claim of epoch %d in %s", manifest.epoch, self.spec)
                raise FencedError(f"backend {self.spec} moved on while this host took over: run it again")
        self.owned_epoch = manifest.epoch

    # --- segments ---------------------------------------------------------------
    def open_segment_sink(self, name: str) -> SegmentSink:
        return _RadosSink(self, name)

    def open_segment(self, name: str, *, sequential: bool = False) -> SegmentReader:
        raw = self._read(f"seg.{name}")
        if raw is None:
            raise CorruptionError(f"baseline segment {self.describe(name)} is missing")
        try:
            head = json.loads(raw)
            return _RadosReader(self, name, int(head["size"]), int(head["part_size"]))
        except (ValueError, KeyError, TypeError):
            raise CorruptionError(f"baseline segment {self.describe(name)}: bad head object") from None

    def list_segments(self) -> list[str]:
        out = []
        for n in self._names():
            if n.startswith("seg.") and parse_segment_name(n[4:]):
                out.append(n[4:])
            elif not _OURS.fullmatch(n) and n not in self._warned:
                self._warned.add(n)
                log.warning("%s/%s is not an rmemfs file; it is left alone", self.spec, n)
        return out

    def collect_partial(self, current: Manifest) -> int:
        """Manifests of older epochs, and parts of our segment names that have no head (an aborted or
        crashed writer) of epochs up to ``current``'s, not being written by this instance."""
        names = self._names()
        heads = {n[4:] for n in names if n.startswith("seg.")}
        removed = 0
        for n in names:
            gone = False
            if n.startswith("epoch.") and n[6:].isdigit() and int(n[6:]) < current.epoch:
                gone = True
            elif n.startswith("part.") and _OURS.fullmatch(n):
                seg = n[5:-6]
                parsed = parse_segment_name(seg)
                gone = (parsed is not None and seg not in heads and seg not in self._sinks
                        and parsed[0] <= current.epoch)
            if gone and self._remove(n):
                removed += 1
        return removed

    def delete_segment(self, name: str) -> None:
        if parse_segment_name(name) is None:
            raise ValueError(f"{name!r} is not a segment name")
        for n in self._names():
            if n == f"seg.{name}" or n.startswith(f"part.{name}."):
                self._remove(n)

    def _remove(self, name: str) -> bool:
        """Remove one object; False if it was not there."""
        try:
            self.io.remove_object(self._o(name))
        except self.rados.ObjectNotFound:
            return False
        except self.rados.Error as e:
            raise self._failed(f"removing {name}", e) from None
        return True


class _RadosSink(SegmentSink):
    """Parts written with aio, in ops of the writer's staging size, up to IN_FLIGHT ops at once; the head
    object, created last, makes the segment visible.

    Why ops and not one write_full per part: librados lets at most objecter_inflight_op_bytes (100 MiB) be
    in flight per client, so whole 64 MiB parts went one at a time, and each waited to be gathered (three
    copies of it, into fresh memory) before its write could start. Now each piece the segment writer hands
    over is copied once (``bytes``; librados copies it again into its own buffer) and sent at once: the
    first op of a part is a write_full (it truncates what an earlier attempt at this generation left), the
    rest are writes at their offset, which RADOS applies in order (one client, one object).
    """

    def __init__(self, store: RadosStore, name: str) -> None:
        super().__init__(name)
        self.store, self.size = store, 0
        self.slots = threading.Semaphore(IN_FLIGHT)
        self.errors: list[int] = []
        self.pending: list[Any] = []
        store._sinks.add(name)

    @property
    def parts(self) -> int:
        return max(1, -(-self.size // PART_SIZE))

    def _submit(self, part: int, offset: int, data: bytes) -> None:
        self.slots.acquire()

        def done(comp: Any) -> None:
            rv = comp.get_return_value()
            if rv < 0:
                self.errors.append(rv)
            self.slots.release()
        key = self.store._o(f"part.{self.name}.{part:05d}")
        io = self.store.io
        comp = (io.aio_write_full(key, data, oncomplete=done) if offset == 0 else
                io.aio_write(key, data, offset, oncomplete=done))
        self.pending.append(comp)
        if len(self.pending) > 4 * IN_FLIGHT:   # done ones: keep the list short
            self.pending = [c for c in self.pending if not c.is_complete()]

    def write(self, data: memoryview) -> None:
        view = memoryview(data)
        while len(view):
            part, offset = divmod(self.size, PART_SIZE)
            n = min(len(view), PART_SIZE - offset)
            self._submit(part, offset, bytes(view[:n]))
            self.size += n
            view = view[n:]

    def finish(self) -> None:
        if not self.size:
            self._submit(0, 0, b"")
        for _ in range(IN_FLIGHT):      # every callback has run (not wait_for_complete: docs/rados-notes.md)
            self.slots.acquire()
        for _ in range(IN_FLIGHT):
            self.slots.release()
        self.pending.clear()
        if self.errors:
            raise _op_error(self.store, f"writing a part of segment {self.name}", self.errors[0], "")
        head = json.dumps({"size": self.size, "parts": self.parts, "part_size": PART_SIZE}).encode()
        self.store._sinks.discard(self.name)
        try:    # write_full replaces a head of an earlier attempt at this generation atomically
            self.store.io.write_full(self.store._o(f"seg.{self.name}"), head)
        except self.store.rados.Error as e:
            raise self.store._failed(f"writing the head of segment {self.name}", e) from None

    def abort(self) -> None:
        self.store._sinks.discard(self.name)
        for _ in range(IN_FLIGHT):      # ops in flight end first (each within rados_osd_op_timeout)
            self.slots.acquire()
        for i in range(self.parts):
            try:
                self.store.io.remove_object(self.store._o(f"part.{self.name}.{i:05d}"))
            except self.store.rados.Error:
                pass


class _RadosReader(SegmentReader):
    def __init__(self, store: RadosStore, name: str, size: int, part_size: int) -> None:
        super().__init__(name, size)
        self.store, self.part_size = store, part_size

    def readinto(self, offset: int, buf: memoryview) -> None:
        self.readv([(offset, buf)])

    def readv(self, reads: Sequence[tuple[int, memoryview]]) -> None:
        """All pieces issued as aio reads at once, then waited for (a counter, not wait_for_complete)."""
        where = self.store.describe(self.name)
        pieces = []
        for offset, buf in reads:
            if offset < 0 or offset + len(buf) > self.size:
                raise CorruptionError(f"{where}: read past its end ({offset}+{len(buf)} > {self.size})")
            pos, view = offset, buf
            while len(view):
                part, off = divmod(pos, self.part_size)
                n = min(len(view), self.part_size - off)
                pieces.append((part, off, view[:n]))
                view, pos = view[n:], pos + n
        cond, left, bad = threading.Condition(), [len(pieces)], []
        for part, off, view in pieces:
            def done(comp: Any, data: bytes | None, view: memoryview = view) -> None:
                if data is None or len(data) != len(view):
                    bad.append(comp.get_return_value())
                else:
                    view[:] = data
                with cond:
                    left[0] -= 1
                    cond.notify()
            self.store.io.aio_read(self.store._o(f"part.{self.name}.{part:05d}"), len(view), off, done)
        with cond:
            cond.wait_for(lambda: left[0] == 0)
        if bad:
            if abs(bad[0]) in (errno.ETIMEDOUT, errno.EPERM, errno.EACCES):    # the cluster's failure, not the data's
                raise _op_error(self.store, f"reading segment {self.name}", bad[0], "")
            raise CorruptionError(f"{where}: a part could not be read (rv {bad[0]})")


def _factory(rest: str, options: StoreOptions) -> BaselineStore:
    return RadosStore(rest, ceph_conf=options.get("ceph_conf"), ceph_id=options.get("ceph_id"))


register_scheme("rados", _factory, ("ceph_conf", "ceph_id"))
