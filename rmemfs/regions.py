"""Memory regions: page-aligned, file-backed, shared mappings that outlive the process.

Region files live in one region directory per filesystem (default
``/dev/shm/rmemfs-<fsid>``, or a DAX/persistent-memory mount)::

    ctl-0000.rgn    dirty page lists and heartbeat  (layout: dirty.py)
    meta-0001.rgn   the namespace journal           (layout: journal.py)
    data-NNNN.rgn   file data, carved into EXTENT_SIZE extents

A region never changes size after it is created, so a registration (an rkey)
stays valid for its lifetime. A file grows by taking more extents and the
filesystem by adding data regions. Region files are sparse: on tmpfs only the
pages ever written cost memory, and freeing an extent punches it out (but for a
few small ones, zeroed and kept for the next new extents: ``REUSE_EXTENTS``).
"""
from __future__ import annotations

import enum
import logging
import mmap
import os
import re
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterator

from . import PAGE_SIZE
from .pagemap import unset_runs

log = logging.getLogger(__name__)

EXTENT_SIZE = 256 * 1024
EXTENT_PAGES = EXTENT_SIZE // PAGE_SIZE
DEFAULT_DATA_REGION_SIZE = 256 << 20
META_REGION_SIZE = 256 << 20
CTL_REGION_ID = 0
META_REGION_ID = 1
FIRST_DATA_REGION_ID = 2
MAX_REGION_ID = 0xFFFF          # dirty-list entries hold 16 bits of region id
# A freed extent whose file used at most REUSE_MAX_BYTES of it keeps its memory, those bytes zeroed, for the
# next new extent: a file created and deleted again and again (SQLite's DELETE journal, every commit)
# otherwise pays an fallocate of the whole extent and a punch (130-160 us a cycle here, against about
# 2 us to zero three pages; issue 14). At most REUSE_EXTENTS are kept (4 MiB).
REUSE_MAX_BYTES = 64 << 10
REUSE_EXTENTS = 16
_ZEROS = memoryview(bytes(REUSE_MAX_BYTES))

_NAME_RE = re.compile(r"^(ctl|meta|data)-(\d{4,5})\.rgn$")
TMPFS_MAGIC = 0x01021994


class RegionRole(enum.Enum):
    """What a region holds; recovery needs to tell dirty-list regions apart."""

    CTL = "ctl"     # dirty page lists + heartbeat
    META = "meta"   # the namespace journal
    DATA = "data"   # file data extents


def region_file_name(region_id: int) -> str:
    role = role_of(region_id)
    return f"{role.value}-{region_id:04d}.rgn"


def role_of(region_id: int) -> RegionRole:
    if region_id == CTL_REGION_ID:
        return RegionRole.CTL
    if region_id == META_REGION_ID:
        return RegionRole.META
    return RegionRole.DATA


def parse_region_file_name(name: str) -> tuple[int, RegionRole] | None:
    m = _NAME_RE.match(name)
    if not m:
        return None
    region_id = int(m.group(2))
    if role_of(region_id).value != m.group(1) or region_id > MAX_REGION_ID:
        return None
    return region_id, RegionRole(m.group(1))


class Region:
    """One region file mapped shared and writable."""

    def __init__(self, region_id: int, path: Path, length: int, *, create: bool) -> None:
        if length <= 0 or length % PAGE_SIZE:
            raise ValueError(f"region length {length} is not a positive multiple of {PAGE_SIZE}")
        self.region_id = region_id
        self.role = role_of(region_id)
        self.path = path
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, length)
            elif os.fstat(fd).st_size != length:
                raise ValueError(f"{path}: size {os.fstat(fd).st_size} != expected {length}")
            self.mm = mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self.length = length
        self.view = memoryview(self.mm)
        self.pages = length // PAGE_SIZE

    def write(self, offset: int, data: memoryview) -> None:
        """Copy a large piece in through the region's file: the kernel allocates new pages on its write
        path, several times cheaper here than faulting them into the mapping (even with
        MADV_POPULATE_WRITE, which measured 0.8 s per GiB against 0.37 s). Thread-safe, and the GIL is
        released while the kernel copies."""
        done = 0
        while done < len(data):
            done += os.pwrite(self.fd, data[done:], offset + done)

    def grow(self, length: int) -> None:
        """Make the file and its mapping longer (new pages are holes). The old ``view`` is released (a
        slice of it keeps the old, shorter mapping until it goes): holders take ``view`` again."""
        if length <= self.length or length % PAGE_SIZE:
            raise ValueError(f"cannot grow region {self.region_id} from {self.length} to {length} bytes")
        os.ftruncate(self.fd, length)
        old_mm, old_view = self.mm, self.view
        self.mm = mmap.mmap(self.fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.view = memoryview(self.mm)
        self.length, self.pages = length, length // PAGE_SIZE
        try:
            old_view.release()
            old_mm.close()
        except BufferError:
            pass   # a slice of the old view still lives; the GC unmaps it with that

    def allocate(self, offset: int, length: int) -> None:
        """Back a range with memory before anything writes it through the mapping: a store into a hole
        of a full tmpfs is a SIGBUS, which ends the process, while this fails with ENOSPC."""
        os.posix_fallocate(self.fd, offset, length)

    def release(self, offset: int, length: int) -> None:
        """Zero a page-aligned range and give its memory back (a hole on tmpfs)."""
        if not self.punch(offset, length):
            # Not every DAX mount supports hole punching; zeroing keeps the semantics.
            self.view[offset:offset + length] = bytes(length)

    def punch(self, offset: int, length: int) -> bool:
        """Give the memory of a page-aligned range back, if the mount can; whether it could."""
        try:
            self.mm.madvise(mmap.MADV_REMOVE, offset, length)
            return True
        except OSError:
            return False

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        try:
            self.view.release()
            self.mm.close()
        except BufferError:
            pass   # views handed out (dirty lists, journal) still live; the GC unmaps it with them


@dataclass
class RegionStats:
    regions: int
    virtual_bytes: int
    resident_bytes: int


class RegionSet:
    """All regions of one filesystem in one directory, plus the data-extent allocator."""

    def __init__(self, directory: Path, *, data_region_size: int = DEFAULT_DATA_REGION_SIZE) -> None:
        if data_region_size % EXTENT_SIZE:
            raise ValueError(f"region size must be a multiple of {EXTENT_SIZE}")
        self.directory = directory
        self.data_region_size = data_region_size
        self.regions: dict[int, Region] = {}
        self._used: dict[int, bytearray] = {}   # data region id -> one byte per extent (1 = used)
        self._backed: dict[int, bytearray] = {}  # data region id -> one byte per extent (1 = allocated)
        # data region id -> one byte per extent: 1 = handed out free by allocate_extent in this process. A
        # free extent is zeros (punched at every load, zeroed or punched when freed), and every write since
        # went through this process, which keeps the bytes past a file's end zero (a shrink zeroes them):
        # so the file's size bounds what must be zeroed to free it. Not true of an extent loaded in use,
        # which a crash may have left with bytes past the end its size record never covered.
        self._fresh: dict[int, bytearray] = {}
        self._reusable: dict[tuple[int, int], None] = {}   # free, backed, all zeros; the newest last
        self._free_extents = 0

    # --- lifecycle -----------------------------------------------------
    def existing_files(self) -> dict[int, int]:
        """Region files present in the directory: id -> size."""
        out: dict[int, int] = {}
        if self.directory.is_dir():
            for entry in os.scandir(self.directory):
                parsed = parse_region_file_name(entry.name)
                if parsed:
                    out[parsed[0]] = entry.stat().st_size
        return out

    def open_existing(self) -> None:
        for region_id, size in sorted(self.existing_files().items()):
            self._add(Region(region_id, self.directory / region_file_name(region_id), size, create=False))

    def create(self, region_id: int, length: int) -> Region:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        region = Region(region_id, self.directory / region_file_name(region_id), length, create=True)
        self._add(region)
        return region

    def _add(self, region: Region) -> None:
        self.regions[region.region_id] = region
        if region.role is RegionRole.DATA:
            n = region.length // EXTENT_SIZE
            self._used[region.region_id] = bytearray(n)
            self._backed[region.region_id] = bytearray(n)
            self._fresh[region.region_id] = bytearray(n)
            self._free_extents += n

    def close(self) -> None:
        for region in self.regions.values():
            region.close()
        self.regions.clear()

    def __getitem__(self, region_id: int) -> Region:
        return self.regions[region_id]

    def data_regions(self) -> list[Region]:
        return [r for r in self.regions.values() if r.role is RegionRole.DATA]

    # --- extents ---------------------------------------------------------
    def allocate_extent(self) -> tuple[int, int]:
        """Pick a free extent (one kept backed first), adding a data region when all are used. Does not
        mark it used (``mark_extent`` does, and takes it out of the reusable ones)."""
        loc = next(reversed(self._reusable)) if self._reusable else self._first_free()
        if loc is None:
            region_id = max(self._used, default=FIRST_DATA_REGION_ID - 1) + 1
            if region_id > MAX_REGION_ID:
                raise OSError(28, "no region ids left")
            self.create(region_id, self.data_region_size)
            log.info("added data region %d (%d bytes)", region_id, self.data_region_size)
            loc = region_id, 0
        region_id, ext = loc
        self._fresh[region_id][ext] = 1
        return region_id, ext

    def _first_free(self) -> tuple[int, int] | None:
        for region_id, used in self._used.items():
            ext = used.find(0)
            if ext >= 0:
                return region_id, ext
        return None

    def ensure_data_region(self, region_id: int, length: int) -> None:
        if region_id not in self.regions:
            self.create(region_id, length)

    def mark_extent(self, region_id: int, ext: int, used: bool) -> None:
        table = self._used[region_id]
        if bool(table[ext]) != used:
            table[ext] = used
            self._free_extents += -1 if used else 1
        if used and self._reusable:
            self._reusable.pop((region_id, ext), None)

    def is_backed(self, region_id: int, ext: int) -> bool:
        """Whether this process allocated the extent's memory (``back_extent``): only then can it have
        written into it."""
        return bool(self._backed[region_id][ext])

    def release_extents(self, extents: list[tuple[int, int]], used_bytes: list[int] | None = None) -> None:
        """Give freed extents' memory back (holes on tmpfs), or keep a few small ones backed, zeroed, for
        ``allocate_extent``. ``used_bytes``: per extent, how many of its first bytes the file may have
        written (from its size); None: all of them. Call after their pages are marked dirty."""
        punch: list[tuple[int, int]] = []
        for i, (region_id, ext) in enumerate(extents):
            fresh = self._fresh[region_id]
            n = EXTENT_SIZE if used_bytes is None or not fresh[ext] else -(-used_bytes[i] // PAGE_SIZE) * PAGE_SIZE
            fresh[ext] = 0
            if n <= REUSE_MAX_BYTES and len(self._reusable) < REUSE_EXTENTS and self._backed[region_id][ext]:
                region = self.regions[region_id]
                start, done = ext * EXTENT_SIZE, 0
                while done < n:     # through the file: no fault for pages not mapped here
                    done += os.pwrite(region.fd, _ZEROS[done:n], start + done)
                self._reusable[(region_id, ext)] = None
            else:
                self._backed[region_id][ext] = 0
                punch.append((region_id, ext))
        for region_id, first, count in extent_runs(punch):
            self.regions[region_id].release(first * EXTENT_SIZE, count * EXTENT_SIZE)

    def back_extent(self, region_id: int, ext: int) -> None:
        """Allocate an extent's memory the first time this process writes into it (one fallocate per
        extent per mount; a loaded extent may have holes). Raises OSError(ENOSPC) on a full region tmpfs."""
        backed = self._backed[region_id]
        if not backed[ext]:
            self.regions[region_id].allocate(ext * EXTENT_SIZE, EXTENT_SIZE)
            backed[ext] = 1

    def back_whole(self, region_id: int) -> None:
        """Allocate a whole region up front (the ctl region: the dirty lists are written through the
        mapping by every operation, so they must never meet a full tmpfs)."""
        region = self.regions[region_id]
        region.allocate(0, region.length)

    def punch_free_extents(self) -> None:
        """Give back the memory of every free extent (its pages are zeros, or about to be unused)."""
        self._reusable.clear()
        for region_id, used in self._used.items():
            backed = self._backed[region_id]
            for ext, end in unset_runs(used, 0, len(used)):
                self.regions[region_id].punch(ext * EXTENT_SIZE, (end - ext) * EXTENT_SIZE)
                backed[ext:end] = bytes(end - ext)

    def free_page_ranges(self, region_id: int, first: int, npages: int) -> Iterator[tuple[int, int]]:
        """[a, b) page ranges within first..first+npages-1 that lie in free extents. A free extent's
        pages are zeros (released extents are punched out, unused ones never written)."""
        used = self._used.get(region_id)
        if used is None or npages <= 0:
            return
        for free, end in unset_runs(used, first // EXTENT_PAGES, (first + npages - 1) // EXTENT_PAGES + 1):
            yield max(first, free * EXTENT_PAGES), min(first + npages, end * EXTENT_PAGES)

    def reusable_extents(self) -> int:
        """Free extents kept backed (zeros) for the next allocations."""
        return len(self._reusable)

    def extent_offset(self, ext: int) -> int:
        return ext * EXTENT_SIZE

    def used_extents(self) -> int:
        return sum(len(u) for u in self._used.values()) - self._free_extents

    def stats(self) -> RegionStats:
        virtual = sum(r.length for r in self.regions.values())
        resident = 0
        for region in self.regions.values():
            try:
                resident += os.stat(region.path).st_blocks * 512
            except OSError:
                pass
        return RegionStats(len(self.regions), virtual, resident)


def check_region_directory(directory: Path) -> str | None:
    """A warning when the region directory is not memory (tmpfs) or DAX, else None."""
    probe = directory if directory.exists() else directory.parent
    try:
        import ctypes
        import ctypes.util

        class _Statfs(ctypes.Structure):
            _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 120)]

        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        buf = _Statfs()
        if libc.statfs(str(probe).encode(), ctypes.byref(buf)) != 0:
            return None
        if buf.f_type == TMPFS_MAGIC:
            return None
    except OSError:
        return None
    if _is_dax_mount(probe):
        return None
    return (f"region directory {directory} is not on tmpfs or a DAX mount: file data will "
            f"live in page cache over a disk, and a host crash loses what the baseline lacks")


def _is_dax_mount(path: Path) -> bool:
    best, dax = "", False
    target = os.path.realpath(path)
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                parts = line.split()
                mnt, opts = parts[4], parts[5]
                if (target == mnt or target.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best = mnt
                    super_opts = line.split(" - ", 1)[1].split()[-1] if " - " in line else ""
                    dax = "dax" in opts.split(",") or any(o.startswith("dax") for o in super_opts.split(","))
    except OSError:
        return False
    return dax


def buffer_address(obj: object) -> int:
    """Address of a buffer's first byte, read-only buffers (a PROT_READ mmap) included.

    ctypes' ``from_buffer`` refuses read-only buffers, so ask the buffer protocol directly.
    """
    import ctypes

    class _PyBuffer(ctypes.Structure):
        _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.c_void_p), ("len", ctypes.c_ssize_t),
                    ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
                    ("format", ctypes.c_char_p), ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
                    ("suboffsets", ctypes.c_void_p), ("internal", ctypes.c_void_p)]

    view = _PyBuffer()
    get = ctypes.pythonapi.PyObject_GetBuffer
    get.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
    if get(obj, ctypes.byref(view), 0) != 0:
        raise TypeError("object does not support the buffer protocol")
    try:
        return int(view.buf or 0)
    finally:
        release = ctypes.pythonapi.PyBuffer_Release
        release.argtypes = [ctypes.POINTER(_PyBuffer)]
        release(ctypes.byref(view))


def extent_runs(extents: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """(region id, first extent, extent count) runs of the given extents: counted in extents, not a
    pagemap.Run of pages."""
    runs: list[tuple[int, int, int]] = []
    for region_id, ext in sorted(extents):
        if runs and runs[-1][0] == region_id and runs[-1][1] + runs[-1][2] == ext:
            runs[-1] = (region_id, runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((region_id, ext, 1))
    return runs
