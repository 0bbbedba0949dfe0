"""The backend: where a filesystem lives between mounts, and the baseline recovery starts from.

Backend directory (format version 1)::

    fs.json          identity: {"format", "fsid", "created_ns"} + xxh3 trailer; never rewritten
    secret           32 random bytes, hex, mode 0600: the HMAC key of the transports
    MANIFEST         the published generation (JSON + "xxh3:<hex>" trailer line):
                     fsid, epoch, generation, state ("mounted" | "clean"), owner,
                     time_ns, page_size, region lengths, live segments, live page count
    segments/seg-<epoch>-<generation>.rseg

A segment holds the pages that one flush wrote, page images of regions::

    header page   <8s "RMEMSEG1", I version, I page_size, 16s fsid, Q epoch, Q generation, q time_ns>
                  + Q xxh3 of those bytes, zero padded to one page
    data          the non-zero pages, PAGE_SIZE each, in index order
    index         entries <Q region_id << 48 | page_no, Q xxh3 of the page, Q data offset>;
                  data offset ZERO_PAGE means "this page is now all zeros" (no data stored)
    footer        <8s "RMEMSEGF", Q index offset, Q entries, Q data pages, Q index xxh3,
                   Q header xxh3, Q xxh3 of the preceding footer bytes>

A page's content in the baseline is its entry in the newest segment that has
one. Each file is written to a temp name, fsynced, renamed and its directory
fsynced; MANIFEST is published last, so a crash at any step leaves the previous
generation complete and verifiable. Segments that no published MANIFEST names
are garbage and are removed at the next mount.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import struct
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

import xxhash

from . import PAGE_SIZE
from .durable import atomic_write, fsync_dir
from .errors import BackendError, CorruptionError, FencedError

log = logging.getLogger(__name__)

FORMAT = 1
SEG_MAGIC = b"RMEMSEG1"
FOOT_MAGIC = b"RMEMSEGF"
_SEG_HEAD = struct.Struct("<8sII16sQQq")
_ENTRY = struct.Struct("<QQQ")
_FOOT = struct.Struct("<8sQQQQQ")
FOOTER_SIZE = _FOOT.size + 8
ZERO_PAGE = 0xFFFFFFFFFFFFFFFF
ZERO_BYTES = bytes(PAGE_SIZE)
ZERO_HASH = xxhash.xxh3_64_intdigest(ZERO_BYTES)
STAGE_BYTES = 4 << 20     # a segment writer's staging buffer
STATE_MOUNTED, STATE_CLEAN = "mounted", "clean"


def segment_name(epoch: int, generation: int) -> str:
    return f"seg-{epoch:06d}-{generation:010d}.rseg"


def segment_epoch(name: str) -> int:
    """The epoch of the owner that wrote a segment, from its name."""
    return int(name.split("-")[1])


def split_key(key: int) -> tuple[int, int]:
    """An index entry's key as (region id, page number)."""
    return key >> 48, key & 0xFFFFFFFFFFFF


def _with_checksum(payload: bytes) -> bytes:
    return payload + b"\nxxh3:" + xxhash.xxh3_64_hexdigest(payload).encode() + b"\n"


def _strip_checksum(raw: bytes, what: Path) -> bytes:
    body, sep, trailer = raw.rstrip(b"\n").rpartition(b"\nxxh3:")
    if not sep or xxhash.xxh3_64_hexdigest(body).encode() != trailer:
        raise CorruptionError(f"{what}: checksum mismatch or truncated file")
    return body


@dataclass(frozen=True)
class SegmentInfo:
    name: str
    generation: int
    bytes: int
    entries: int
    data_pages: int
    index_xxh3: int


@dataclass(frozen=True)
class Manifest:
    fsid: str
    epoch: int
    generation: int
    state: str
    owner: dict
    time_ns: int
    regions: dict[int, int]                   # region id -> length in bytes
    segments: tuple[SegmentInfo, ...] = ()
    live_pages: int = 0
    settings: dict = field(default_factory=dict)   # ctl capacity, extent size, ... at creation

    def to_bytes(self) -> bytes:
        doc = {"format": FORMAT, "fsid": self.fsid, "epoch": self.epoch, "generation": self.generation,
               "state": self.state, "owner": self.owner, "time_ns": self.time_ns, "page_size": PAGE_SIZE,
               "regions": {str(k): v for k, v in sorted(self.regions.items())},
               "segments": [s.__dict__ for s in self.segments], "live_pages": self.live_pages,
               "settings": self.settings}
        return _with_checksum(json.dumps(doc, indent=1, sort_keys=True).encode())

    @classmethod
    def from_bytes(cls, raw: bytes, where: Path) -> "Manifest":
        doc = json.loads(_strip_checksum(raw, where))
        if doc.get("format") != FORMAT or doc.get("page_size") != PAGE_SIZE:
            raise CorruptionError(f"{where}: unsupported format {doc.get('format')}")
        return cls(doc["fsid"], doc["epoch"], doc["generation"], doc["state"], doc["owner"], doc["time_ns"],
                   {int(k): v for k, v in doc["regions"].items()},
                   tuple(SegmentInfo(**s) for s in doc["segments"]), doc["live_pages"], doc.get("settings", {}))

    def segment_bytes(self) -> int:
        return sum(s.bytes for s in self.segments)


def owner_info(**extra: object) -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), **extra}


class Backend:
    """One backend directory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.segdir = path / "segments"
        self.manifest_path = path / "MANIFEST"

    # --- identity ---------------------------------------------------------
    def check_usable(self) -> None:
        if not self.path.is_dir():
            raise BackendError(f"backend {self.path} does not exist or is not a directory: create it first")
        if not os.access(self.path, os.W_OK | os.X_OK):
            raise BackendError(f"backend {self.path} is not writable by this user")

    def is_empty(self) -> bool:
        return not (self.path / "fs.json").exists() and not self.manifest_path.exists()

    def create(self, settings: dict, regions: dict[int, int]) -> Manifest:
        """Make a new filesystem here: identity, secret, and generation 0 (clean, no pages)."""
        fsid = str(uuid.uuid4())
        self.segdir.mkdir(exist_ok=True)
        atomic_write(self.path / "secret", secrets.token_hex(32).encode() + b"\n", mode=0o600)
        atomic_write(self.path / "fs.json", _with_checksum(json.dumps(
            {"format": FORMAT, "fsid": fsid, "created_ns": time.time_ns()}).encode()))
        manifest = Manifest(fsid, 0, 0, STATE_CLEAN, owner_info(), time.time_ns(), regions, settings=settings)
        atomic_write(self.manifest_path, manifest.to_bytes())
        log.info("created filesystem %s in %s", fsid, self.path)
        return manifest

    def fsid(self) -> str:
        where = self.path / "fs.json"
        try:
            raw = where.read_bytes()
        except FileNotFoundError:
            raise BackendError(f"backend {self.path} holds no rmemfs filesystem (no fs.json)") from None
        return json.loads(_strip_checksum(raw, where))["fsid"]

    def secret(self) -> bytes:
        where = self.path / "secret"
        try:
            st = where.stat()
            if st.st_mode & 0o077:
                log.warning("%s is readable by group or others (mode %o)", where, st.st_mode & 0o777)
            return bytes.fromhex(where.read_text().strip())
        except FileNotFoundError:
            raise BackendError(f"{where} is missing: the backend is incomplete") from None
        except ValueError:
            raise CorruptionError(f"{where} is not a hex secret") from None

    def read_manifest(self) -> Manifest:
        try:
            raw = self.manifest_path.read_bytes()
        except FileNotFoundError:
            raise BackendError(f"{self.manifest_path} is missing") from None
        manifest = Manifest.from_bytes(raw, self.manifest_path)
        fsid = self.fsid()
        if manifest.fsid != fsid:
            raise BackendError(f"{self.manifest_path} belongs to filesystem {manifest.fsid}, "
                               f"but the backend is {fsid}")
        return manifest

    def publish(self, manifest: Manifest, *, expect_epoch: int | None) -> None:
        """Atomically make ``manifest`` the current generation.

        Refuses (FencedError) when the published epoch is no longer ``expect_epoch``:
        another host has recovered this filesystem and owns it now.
        """
        if expect_epoch is not None:
            current = self.read_manifest()
            if current.epoch != expect_epoch:
                raise FencedError(f"backend {self.path} now belongs to epoch {current.epoch} "
                                  f"(owner {current.owner.get('host')}); this host (epoch {expect_epoch}) "
                                  f"may no longer publish")
        atomic_write(self.manifest_path, manifest.to_bytes())

    # --- segments -----------------------------------------------------------
    def segment_path(self, name: str) -> Path:
        return self.segdir / name

    def new_segment(self, fsid: str, epoch: int, generation: int) -> "SegmentWriter":
        self.segdir.mkdir(exist_ok=True)
        return SegmentWriter(self, fsid, epoch, generation)

    def collect_garbage(self, manifest: Manifest) -> int:
        """Remove segment and temp files the manifest does not name."""
        keep = {s.name for s in manifest.segments}
        removed = 0
        if self.segdir.is_dir():
            for entry in os.scandir(self.segdir):
                if entry.name not in keep:
                    os.unlink(entry.path)
                    removed += 1
        if removed:
            fsync_dir(self.segdir)
        return removed

    def read_index(self, info: SegmentInfo) -> list[tuple[int, int, int]]:
        """The entries of a segment, verified against its footer and the manifest."""
        return list(_ENTRY.iter_unpack(self.read_index_raw(info)[0]))

    def read_index_raw(self, info: SegmentInfo) -> tuple[bytes, int]:
        """A segment's index as stored (verified), and where its data area ends."""
        path = self.segment_path(info.name)
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size != info.bytes:
                    raise CorruptionError(f"{path}: size {size}, manifest says {info.bytes}")
                head = f.read(_SEG_HEAD.size + 8)
                f.seek(size - FOOTER_SIZE)
                foot = f.read(FOOTER_SIZE)
                magic, index_off, entries, data_pages, index_xxh, head_xxh = _FOOT.unpack_from(foot)
                (foot_xxh,) = struct.unpack_from("<Q", foot, _FOOT.size)
                if (magic != FOOT_MAGIC or foot_xxh != xxhash.xxh3_64_intdigest(foot[:_FOOT.size])
                        or head_xxh != xxhash.xxh3_64_intdigest(head[:_SEG_HEAD.size])):
                    raise CorruptionError(f"{path}: bad header or footer")
                if index_off + entries * _ENTRY.size + FOOTER_SIZE != size:
                    raise CorruptionError(f"{path}: index does not end at the footer")
                f.seek(index_off)
                raw = f.read(entries * _ENTRY.size)
        except FileNotFoundError:
            raise CorruptionError(f"baseline segment {path} is missing") from None
        if xxhash.xxh3_64_intdigest(raw) != index_xxh or index_xxh != info.index_xxh3:
            raise CorruptionError(f"{path}: index checksum mismatch")
        return raw, index_off

    def verify(self, manifest: Manifest | None = None) -> list[str]:
        """Check the latest generation end to end; returns the problems found (empty = good)."""
        problems: list[str] = []
        try:
            manifest = manifest or self.read_manifest()
        except (CorruptionError, BackendError) as e:
            return [str(e)]
        for info in manifest.segments:
            try:
                entries = self.read_index(info)
            except CorruptionError as e:
                problems.append(str(e))
                continue
            with open(self.segment_path(info.name), "rb") as f:
                for key, digest, off in entries:
                    if off == ZERO_PAGE:
                        continue
                    page = os.pread(f.fileno(), PAGE_SIZE, off)
                    if xxhash.xxh3_64_intdigest(page) != digest:
                        region_id, page_no = split_key(key)
                        problems.append(f"{self.segment_path(info.name)}: region {region_id} page "
                                        f"{page_no} checksum mismatch")
        return problems


class LiveMap:
    """Which pages the published baseline holds with non-zero content (one byte per page)."""

    def __init__(self) -> None:
        self.maps: dict[int, bytearray] = {}
        self.count = 0

    def set(self, region_id: int, page: int, live: bool) -> None:
        m = self.maps.get(region_id)
        if m is None:
            m = self.maps[region_id] = bytearray()
        if page >= len(m):
            if not live:
                return
            m.extend(bytes(page + 1 - len(m) + 4096))
        if m[page] != live:
            m[page] = live
            self.count += 1 if live else -1

    def set_range(self, region_id: int, first: int, npages: int) -> None:
        """Mark pages first..first+npages-1 live; the same as ``set(region_id, page, True)`` for each."""
        if npages <= 0:
            return
        m = self.maps.get(region_id)
        if m is None:
            m = self.maps[region_id] = bytearray()
        end = first + npages
        if end > len(m):
            m.extend(bytes(end - len(m) + 4096))
        self.count += npages - m.count(1, first, end)
        m[first:end] = b"\x01" * npages

    def runs(self) -> list[tuple[int, int, int]]:
        out = []
        for region_id, m in sorted(self.maps.items()):
            pos = m.find(1)
            while pos >= 0:
                end = m.find(0, pos)
                end = len(m) if end < 0 else end
                out.append((region_id, pos, end - pos))
                pos = m.find(1, end)
        return out


class SegmentWriter:
    """Writes one segment; used from a worker thread. Pages must come in (region, page) order."""

    def __init__(self, backend: Backend, fsid: str, epoch: int, generation: int) -> None:
        self.backend = backend
        self.name = segment_name(epoch, generation)
        self.generation = generation
        self.tmp = backend.segdir / f".{self.name}.tmp"
        self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        head = _SEG_HEAD.pack(SEG_MAGIC, FORMAT, PAGE_SIZE, uuid.UUID(fsid).bytes, epoch, generation,
                              time.time_ns())
        self.head_xxh = xxhash.xxh3_64_intdigest(head)
        self._write((head + struct.pack("<Q", self.head_xxh)).ljust(PAGE_SIZE, b"\0"))
        self.offset = PAGE_SIZE
        self.index: list[bytes] = []
        self.data_pages = 0
        self.zero_pages = 0
        self.stage = bytearray(STAGE_BYTES)
        self.fill = 0

    def _write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]

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
                self.index.append(_ENTRY.pack(key, digest, ZERO_PAGE))
                self.zero_pages += 1
                live.append(False)
                continue
            if dst != src - PAGE_SIZE:
                stage[dst:dst + PAGE_SIZE] = bytes(page)    # close the gap a zero page left
            self.index.append(_ENTRY.pack(key, digest, self.offset))
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
            self._write(memoryview(self.stage)[:self.fill])
            self.fill = 0

    def finish(self) -> SegmentInfo:
        self._drain()
        index = b"".join(self.index)
        index_xxh = xxhash.xxh3_64_intdigest(index)
        foot = _FOOT.pack(FOOT_MAGIC, self.offset, len(self.index), self.data_pages, index_xxh, self.head_xxh)
        self._write(index + foot + struct.pack("<Q", xxhash.xxh3_64_intdigest(foot)))
        size = self.offset + len(index) + FOOTER_SIZE
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        os.rename(self.tmp, self.backend.segment_path(self.name))
        fsync_dir(self.backend.segdir)
        return SegmentInfo(self.name, self.generation, size, len(self.index), self.data_pages, index_xxh)

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass


def next_manifest(prev: Manifest, **changes: object) -> Manifest:
    return replace(prev, time_ns=time.time_ns(), **changes)
