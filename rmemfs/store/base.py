"""The baseline store interface: where a filesystem lives between mounts, and where recovery starts from.

A ``BaselineStore`` holds one filesystem: its identity (fsid, fs.json) and secret,
the published MANIFEST (one generation: which segments make up the baseline),
and the segments (page images, format in ``format.py``). ``open_store(spec, options)``
maps a ``--backend`` spec (and its ``-o`` store options) to an implementation: a plain path is a
``DirectoryStore`` (``directory.py``); other schemes (``rados:POOL[/PREFIX]``)
register themselves with ``register_scheme``. Every implementation must pass
``tests/test_contract_store.py``.

What an implementation must guarantee (the contract suite checks each):

* ``publish(manifest, expect_epoch=E)`` is an atomic compare-and-swap on the
  epoch. It succeeds only if the newest published manifest has epoch ``E``
  and ``manifest.generation`` is greater than its generation, and then
  ``manifest`` is the newest, durably, before it returns. ``manifest.epoch``
  is ``E`` (a flush of the owner of E: only the store instance that claimed E
  may do this) or ``E + 1`` (a takeover, which claims epoch E+1 for this
  instance; of two claimers of one epoch exactly one wins). Otherwise, or when
  a newer epoch is found before or after the swap, it raises ``FencedError``.
  Once a manifest of epoch E+1 is published, no publisher of an epoch <= E can
  make its manifest the newest again, whatever it does and however long it
  pauses between steps. A takeover whose base generation was overtaken while
  it claimed (the old owner published once more) fails with FencedError and
  leaves the old owner's generation the newest; the old owner is fenced
  anyway (it saw the claim) and so never drops marks the takeover did not see.
* ``read_manifest`` returns the newest published manifest, checked (checksum,
  format version, field types, fsid): ``CorruptionError``/``BackendError``
  naming the object otherwise. Never an older one in place of a corrupt newest.
* A segment is written through a ``SegmentWriter`` (``new_segment``): nothing
  is visible under its name until ``finish`` returns, and then all of it is,
  durably; ``abort`` (or a crash) leaves at most a partial object that
  ``list_segments`` does not return and GC removes.
* ``open_segment(name)``: a reader of a finished segment. ``readinto(offset, buf)``
  fills all of ``buf`` or raises ``CorruptionError`` naming the segment (a
  missing segment, a read past its end); ``readv`` does several at once.
* ``list_segments()`` returns the names of finished segments that this format
  wrote (``format.parse_segment_name`` accepts them), in any order, and never
  a foreign name; ``delete_segment(name)`` removes one (missing is fine).
* Garbage collection (``collect_garbage``, in this class, on top of list and
  delete) never deletes what another epoch may reference: it runs only while
  the newest published manifest is this instance's own epoch, re-checks that
  before each deletion, and deletes only our segment names that the newest
  manifest does not name.

All methods block; call them from a worker thread in the event loop.
"""
from __future__ import annotations

import logging
import os
import re
import secrets
import socket
import time
from abc import ABC, abstractmethod
from pathlib import Path
from collections.abc import Callable, Mapping, Sequence

import xxhash

from .. import PAGE_SIZE
from ..errors import BackendError, CorruptionError, UsageError
from .format import (ENTRY, FOOTER_SIZE, HEADER_SIZE, SEG_HEAD, ZERO_BYTES, ZERO_HASH, ZERO_PAGE, Manifest,
                     SegmentFooter, SegmentHeader, SegmentInfo, segment_epoch, segment_name, split_key)

log = logging.getLogger(__name__)

STAGE_BYTES = 4 << 20     # a segment writer's staging buffer


def owner_info(**extra: object) -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), **extra}


def writer_token() -> str:
    """A name part unique to one writer: host, pid and random bits (temp names, claims)."""
    host = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:40]
    return f"{host}.{os.getpid()}.{secrets.token_hex(6)}"


class SegmentSink(ABC):
    """The raw bytes of one segment being written, in order. Nothing is visible under ``name`` until
    ``finish``."""

    def __init__(self, name: str) -> None:
        self.name = name

    @abstractmethod
    def write(self, data: memoryview) -> None:
        """Append all of ``data``."""

    @abstractmethod
    def finish(self) -> None:
        """Make the bytes durable, then visible under ``name`` at once (a reader sees all or nothing)."""

    @abstractmethod
    def abort(self) -> None:
        """Discard what was written; idempotent, also after a failed ``finish``."""


class SegmentReader(ABC):
    """Random reads of one finished segment. Use as a context manager, or ``close``."""

    def __init__(self, name: str, size: int) -> None:
        self.name = name
        self.size = size

    @abstractmethod
    def readinto(self, offset: int, buf: memoryview) -> None:
        """Fill all of ``buf`` from ``offset``, or raise CorruptionError (short segment, read error)."""

    def readv(self, reads: Sequence[tuple[int, memoryview]]) -> None:
        """Several ``readinto`` at once; an implementation may issue them as one request."""
        for offset, buf in reads:
            self.readinto(offset, buf)

    def done_with(self, offset: int, length: int) -> None:  # noqa: B027 - optional: a hint
        """The caller has what it read of this range and will not read it again: a cache may drop it."""

    def close(self) -> None:  # noqa: B027 - optional: readers holding nothing need not close
        pass

    def __enter__(self) -> SegmentReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SegmentWriter:
    """Builds one segment (format.py) into a store's sink; used from a worker thread. Pages must come in
    (region, page) order."""

    def __init__(self, sink: SegmentSink, fsid: str, epoch: int, generation: int,
                 time_ns: int | None = None) -> None:
        self.sink = sink
        self.name = sink.name
        self.generation = generation
        header = SegmentHeader(fsid, epoch, generation, time.time_ns() if time_ns is None else time_ns)
        page = header.to_bytes()
        self.head_xxh = xxhash.xxh3_64_intdigest(page[:SEG_HEAD.size])
        self.sink.write(memoryview(page))
        self.offset = PAGE_SIZE
        self.index: list[bytes] = []
        self.data_pages = 0
        self.zero_pages = 0
        self.stage = bytearray(STAGE_BYTES)
        self.fill = 0

    def reserve(self, npages: int) -> memoryview:
        """Room for ``npages`` in the staging buffer, to be filled and then ``commit``ted.

        Pages are staged and written a few MiB at a time, so scattered single
        pages cost no system call each.
        """
        need = npages * PAGE_SIZE
        if self.fill + need > len(self.stage):
            self._drain()
            if need > len(self.stage):
                self.stage = bytearray(need)
        return memoryview(self.stage)[self.fill:self.fill + need]

    def commit(self, region_id: int, first_page: int, npages: int) -> list[bool]:
        """Index the reserved pages just filled; zero pages are dropped from the data. Returns per page
        whether it is non-zero (live)."""
        stage, live = self.stage, []
        src = dst = self.fill
        view = memoryview(stage)
        for i in range(npages):
            page = view[src:src + PAGE_SIZE]
            digest = xxhash.xxh3_64_intdigest(page)
            key = region_id << 48 | (first_page + i)
            src += PAGE_SIZE
            if digest == ZERO_HASH and page == ZERO_BYTES:
                self.index.append(ENTRY.pack(key, digest, ZERO_PAGE))
                self.zero_pages += 1
                live.append(False)
                continue
            if dst != src - PAGE_SIZE:
                stage[dst:dst + PAGE_SIZE] = bytes(page)    # close the gap a zero page left
            self.index.append(ENTRY.pack(key, digest, self.offset))
            self.offset += PAGE_SIZE
            self.data_pages += 1
            dst += PAGE_SIZE
            live.append(True)
        self.fill = dst
        return live

    def add(self, region_id: int, first_page: int, data: memoryview | bytes) -> list[bool]:
        """Append consecutive pages given as a buffer."""
        npages = len(data) // PAGE_SIZE
        self.reserve(npages)[:] = data
        return self.commit(region_id, first_page, npages)

    def _drain(self) -> None:
        if self.fill:
            self.sink.write(memoryview(self.stage)[:self.fill])
            self.fill = 0

    def finish(self) -> SegmentInfo:
        self._drain()
        index = b"".join(self.index)
        index_xxh = xxhash.xxh3_64_intdigest(index)
        foot = SegmentFooter(self.offset, len(self.index), self.data_pages, index_xxh, self.head_xxh).to_bytes()
        self.sink.write(memoryview(index + foot))
        self.sink.finish()
        size = self.offset + len(index) + FOOTER_SIZE
        return SegmentInfo(self.name, self.generation, size, len(self.index), self.data_pages, index_xxh)

    def abort(self) -> None:
        self.sink.abort()


class BaselineStore(ABC):
    """One filesystem's baseline store. See the module docstring for what each operation guarantees."""

    spec: str     # the --backend string that opens this store again (for messages and other processes)
    options: dict[str, str]     # with the -o store options (open_store sets them): open_store(spec, options)
    # Span reads a baseline load keeps in flight at once: one suits a disk read front to back (with the
    # kernel's read-ahead); a store whose reads wait on the network wants more.
    load_reads_in_flight: int = 1

    def __init__(self) -> None:
        self.options = {}
        self.owned_epoch: int | None = None    # the epoch this instance claimed by publishing (or creating)
        self._fsid: str | None = None
        # Test hook: called with a step name between the steps of publish and GC (the contract suite
        # injects pauses and crashes here).
        self.step: Callable[[str], None] = lambda name: None

    def describe(self, name: str | None = None) -> str:
        """Where the store, or one of its segments, is: for messages."""
        return self.spec if name is None else f"{self.spec}/segments/{name}"

    # --- identity ---------------------------------------------------------------
    @abstractmethod
    def check_usable(self) -> None:
        """BackendError saying what to do if the store cannot be used (missing, not writable)."""

    @abstractmethod
    def is_empty(self) -> bool:
        """True if no filesystem has been published here: nothing at all, or only a creation of ours that
        stopped before its first manifest (``create`` finishes it). BackendError if the store holds objects
        that are not ours (a foreign directory), naming one."""

    @abstractmethod
    def create(self, settings: dict, regions: dict[int, int]) -> Manifest:
        """Make (or finish making) a filesystem here: identity, secret, and generation 0 of epoch 0,
        claimed by this instance. Of two concurrent creators one wins; the other adopts its identity."""

    @abstractmethod
    def fsid(self) -> str:
        """The filesystem id (from the identity, checked); BackendError if there is none."""

    @abstractmethod
    def secret(self) -> bytes:
        """The 32-byte secret; BackendError if missing, CorruptionError if malformed."""

    # --- manifest ---------------------------------------------------------------
    @abstractmethod
    def read_manifest(self) -> Manifest:
        """The newest published manifest, checked; BackendError if there is none."""

    @abstractmethod
    def publish(self, manifest: Manifest, *, expect_epoch: int) -> None:
        """Compare-and-swap: make ``manifest`` the newest iff the newest has epoch ``expect_epoch``
        (see the module docstring). FencedError otherwise."""

    def owns(self, manifest: Manifest) -> bool:
        """Whether ``manifest`` is of the epoch this instance claimed."""
        return self.owned_epoch is not None and manifest.epoch == self.owned_epoch

    # --- segments ---------------------------------------------------------------
    @abstractmethod
    def open_segment_sink(self, name: str) -> SegmentSink:
        """A sink for a new segment ``name`` (a name ``format.segment_name`` made)."""

    @abstractmethod
    def open_segment(self, name: str, *, sequential: bool = False) -> SegmentReader:
        """A reader of finished segment ``name``; CorruptionError naming it if it is missing.
        ``sequential`` hints that it will be read front to back (read ahead)."""

    @abstractmethod
    def list_segments(self) -> list[str]:
        """Names of finished segments of our format (any order); never a foreign name."""

    @abstractmethod
    def delete_segment(self, name: str) -> None:
        """Remove a finished segment; a missing one is fine."""

    def collect_partial(self, current: Manifest) -> int:
        """Remove leftovers of this store's own writes that cannot matter any more (temp objects of epochs
        up to ``current``'s and of no live writer of ours, lost claims, manifests of epochs older than
        ``current``'s). Called by ``collect_garbage`` with the newest manifest after checking that it is
        ours; judge by ``current``, never by a fresh read (a newer claim seen now may yet be withdrawn, and
        then ``current`` is the newest again). Returns how many were removed."""
        return 0

    def new_segment(self, fsid: str, epoch: int, generation: int) -> SegmentWriter:
        return SegmentWriter(self.open_segment_sink(segment_name(epoch, generation)), fsid, epoch, generation)

    def readinto(self, name: str, offset: int, buf: memoryview) -> None:
        with self.open_segment(name) as reader:
            reader.readinto(offset, buf)

    def collect_garbage(self, manifest: Manifest | None = None) -> int:
        """Delete our segments that the newest manifest does not name, only while that manifest is this
        instance's (its epoch: no other owner can reference them) and, if given, still ``manifest``."""
        current = self.read_manifest()
        if not self.owns(current) or (manifest is not None and
                                      (manifest.epoch, manifest.generation) != (current.epoch, current.generation)):
            log.debug("garbage collection skipped: the newest manifest (epoch %d) is not this owner's", current.epoch)
            return 0
        keep = {s.name for s in current.segments}
        removed = 0
        for name in sorted(self.list_segments()):
            if name in keep or segment_epoch(name) > current.epoch:
                continue
            self.step("gc.delete")
            if not self.owns(self.read_manifest()):     # a newer owner took over meanwhile: stop
                log.info("garbage collection stopped: a newer owner published")
                return removed
            self.delete_segment(name)
            removed += 1
        return removed + self.collect_partial(current)

    def read_index(self, info: SegmentInfo) -> list[tuple[int, int, int]]:
        """The entries of a segment, verified against its header, footer and the manifest."""
        return list(ENTRY.iter_unpack(self.read_index_raw(info)[0]))

    def read_index_raw(self, info: SegmentInfo) -> tuple[bytearray, int]:
        """A segment's index as stored (verified), and where its data area ends. The buffer it was read
        into, not a copy: 24 bytes per page (48 MiB at 8 GiB), copied with the GIL held beside a recovery."""
        where = self.describe(info.name)
        if self._fsid is None:
            self._fsid = self.fsid()
        with self.open_segment(info.name) as r:
            if r.size != info.bytes:
                raise CorruptionError(f"{where}: size {r.size}, manifest says {info.bytes}")
            if r.size < PAGE_SIZE + FOOTER_SIZE:
                raise CorruptionError(f"{where}: bad header or footer (truncated)")
            head, foot = bytearray(HEADER_SIZE), bytearray(FOOTER_SIZE)
            r.readv([(0, memoryview(head)), (r.size - FOOTER_SIZE, memoryview(foot))])
            SegmentHeader.from_bytes(head, where).check(where, self._fsid, info)
            footer = SegmentFooter.from_bytes(bytes(foot), where, r.size, head)
            raw = bytearray(footer.entries * ENTRY.size)
            r.readinto(footer.index_offset, memoryview(raw))
        if xxhash.xxh3_64_intdigest(raw) != footer.index_xxh3 or footer.index_xxh3 != info.index_xxh3:
            raise CorruptionError(f"{where}: index checksum mismatch")
        return raw, footer.index_offset

    def verify(self, manifest: Manifest | None = None) -> list[str]:
        """Check the latest generation end to end; returns the problems found (empty = good)."""
        problems: list[str] = []
        try:
            manifest = manifest or self.read_manifest()
        except (CorruptionError, BackendError) as e:
            return [str(e)]
        page = bytearray(PAGE_SIZE)
        for info in manifest.segments:
            try:
                entries = self.read_index(info)
                with self.open_segment(info.name) as r:
                    for key, digest, off in entries:
                        if off == ZERO_PAGE:
                            continue
                        r.readinto(off, memoryview(page))
                        if xxhash.xxh3_64_intdigest(page) != digest:
                            region_id, page_no = split_key(key)
                            problems.append(f"{self.describe(info.name)}: region {region_id} page "
                                            f"{page_no} checksum mismatch")
            except CorruptionError as e:
                problems.append(str(e))
        return problems


# --- the registry: --backend spec (+ its -o store options) -> store ----------------------

StoreOptions = Mapping[str, str]     # -o options a scheme takes, e.g. rados: ceph_conf, ceph_id
StoreFactory = Callable[[str, StoreOptions], BaselineStore]
_SCHEMES: dict[str, tuple[StoreFactory, frozenset[str]]] = {}
_SCHEME = re.compile(r"([a-z][a-z0-9+]*):(.*)", re.S)


def register_scheme(scheme: str, factory: StoreFactory, options: tuple[str, ...] = ()) -> None:
    """Make ``SCHEME:REST`` specs open ``factory(REST, options)`` (e.g. ``rados`` -> RadosStore);
    ``options`` names the -o options the scheme takes (each command accepts them beside --backend)."""
    _SCHEMES[scheme] = (factory, frozenset(options))


def store_option_names() -> frozenset[str]:
    """Every -o option some store scheme takes."""
    return frozenset().union(*(names for _, names in _SCHEMES.values()))


def _scheme_of(text: str) -> tuple[str, str] | None:
    m = _SCHEME.fullmatch(text)
    return (m.group(1), m.group(2)) if m and m.group(1) in _SCHEMES else None


def backend_spec(text: str | os.PathLike[str]) -> str:
    """A --backend argument as every process of the filesystem will open it: a scheme spec as given
    (its slashes normalised), a directory as an absolute path (another process may have another cwd)."""
    text = os.fspath(text)
    scheme = _scheme_of(text)
    if scheme is not None:
        return f"{scheme[0]}:" + re.sub(r"/+", "/", scheme[1]).rstrip("/")
    return str(Path(text).absolute())


def store_option(key: str, value: str) -> str:
    """A store option's value as every process of the mount uses it (a relative ceph_conf made absolute)."""
    if not value:
        raise UsageError(f"option {key} needs a value")
    return os.path.abspath(value) if key == "ceph_conf" else value


def parse_store_options(items: list[str]) -> dict[str, str]:
    """``-o`` items of a command that takes only store options beside --backend (rmemfs-ctl, the exporter)."""
    names, out = store_option_names(), {}
    for item in ",".join(items).split(","):
        key, _, value = item.strip().partition("=")
        if not key:
            continue
        if key not in names:
            raise UsageError(f"unknown option {key!r} (options here: {', '.join(sorted(names))})")
        out[key] = store_option(key, value)
    return out


def store_argv(store: dict[str, str]) -> list[str]:
    """The ``-o`` arguments that give another process the same store options."""
    return ["-o", ",".join(f"{k}={v}" for k, v in sorted(store.items()))] if store else []


def open_store(spec: str | os.PathLike[str], options: StoreOptions | None = None) -> BaselineStore:
    """The store a ``--backend`` spec names: ``SCHEME:REST`` for a registered scheme, else a directory.
    ``options`` (-o ceph_conf=... and the like) must be ones the scheme takes: UsageError otherwise."""
    text = os.fspath(spec)
    options = dict(options or {})
    scheme = _scheme_of(text)
    allowed = _SCHEMES[scheme[0]][1] if scheme else frozenset()
    wrong = sorted(set(options) - allowed)
    if wrong:
        takers = sorted(s for s, (_, names) in _SCHEMES.items() if wrong[0] in names)
        where = f"{'/'.join(t + ':' for t in takers)} backends only" if takers else "no backend"
        raise UsageError(f"-o {wrong[0]} applies to {where}, not to --backend {text}")
    if scheme is not None:
        store = _SCHEMES[scheme[0]][0](scheme[1], options)
    else:
        from .directory import DirectoryStore
        store = DirectoryStore(Path(text))
    store.options = options
    return store
