"""The namespace model: inodes, directory entries, extent maps, and the journal records that change them.

Each change is one journal record; ``apply`` executes a record against the
model. The live filesystem validates an operation, journals its record, then
applies it; replay after a restart or a recovery applies the same records, so
both paths run the same code.

Record payloads (little endian; names and symlink targets as <H len> bytes)::

    CREATE   <Q parent, Q ino, I mode, I uid, I gid, Q rdev, q time_ns> name target
    LINK     <Q parent, Q ino, q time_ns> name
    UNLINK   <Q parent, q time_ns> name                 (files and directories)
    RENAME   <Q old_parent, Q new_parent, I flags, q time_ns> old_name new_name
    SETATTR  <Q ino, I mask, I mode, I uid, I gid, Q size, q atime, q mtime, q ctime>
    EXTENT   <Q ino, Q file_extent_index, I region_id, I extent_no>
    FREE     <Q ino>                                      (last reference gone)
    CHECKPOINT  the whole model (see ``serialize``)

A checkpoint of a large namespace takes long to serialize (about 3 µs a file), too long for one step of
the event loop that also beats the heartbeat a standby watches. ``CheckpointBuilder`` builds the same
bytes in slices between operations; see there.
"""
from __future__ import annotations

import logging
import stat
import struct
import time
from dataclasses import dataclass, field
from collections.abc import Callable

from .errors import CorruptionError
from .journal import CHECKPOINT

log = logging.getLogger(__name__)

ROOT_INO = 1
CREATE, LINK, UNLINK, RENAME, SETATTR, EXTENT, FREE = range(2, 9)
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2

SET_MODE, SET_UID, SET_GID, SET_SIZE, SET_ATIME, SET_MTIME, SET_CTIME = (1 << i for i in range(7))

_CREATE = struct.Struct("<QQIIIQq")
_LINK = struct.Struct("<QQq")
_UNLINK = struct.Struct("<Qq")
_RENAME = struct.Struct("<QQIq")
_SETATTR = struct.Struct("<QIIIIQqqq")
_EXTENT = struct.Struct("<QQII")
_FREE = struct.Struct("<Q")
_CK_HEAD = struct.Struct("<QQ")
_CK_INODE = struct.Struct("<QIIIIQqqqQQIIH")
_CK_EXT = struct.Struct("<QII")
_CK_DIRENT = struct.Struct("<QH")


@dataclass(eq=False)
class Inode:
    ino: int
    mode: int
    uid: int
    gid: int
    nlink: int = 1
    size: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    rdev: int = 0
    parent: int = 0                    # directories only: for ".."
    target: bytes = b""                # symlinks only
    extents: dict[int, tuple[int, int]] = field(default_factory=dict)   # file extent index -> (region, extent)
    entries: dict[bytes, int] | None = None                              # directories only
    lookups: int = 0                   # kernel references; in memory only
    opens: int = 0                     # open file handles; in memory only

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


def _name(data: bytes) -> bytes:
    return struct.pack("<H", len(data)) + data


def _take_name(buf: memoryview, pos: int) -> tuple[bytes, int]:
    (n,) = struct.unpack_from("<H", buf, pos)
    return bytes(buf[pos + 2:pos + 2 + n]), pos + 2 + n


def snapshot_growth(rtype: int, payload: bytes | memoryview) -> int:
    """An upper bound on how much a record can grow the namespace's checkpoint (``serialize``).

    The journal keeps its checkpoint within one area; this bound is what lets it refuse growth while
    there is still room for the records that shrink the namespace (unlink, rmdir, truncate).
    """
    if rtype == CREATE:      # an inode, its name in the parent, a symlink target
        return _CK_INODE.size + _CK_DIRENT.size + len(payload)
    if rtype in (LINK, RENAME):   # a name (a rename may make a longer one)
        return _CK_DIRENT.size + len(payload)
    if rtype == EXTENT:
        return _CK_EXT.size
    return 0


# --- record encoders (the live side) --------------------------------------

def rec_create(parent: int, ino: int, mode: int, uid: int, gid: int, rdev: int, now: int,
               name: bytes, target: bytes = b"") -> tuple[int, bytes]:
    return CREATE, _CREATE.pack(parent, ino, mode, uid, gid, rdev, now) + _name(name) + _name(target)


def rec_link(parent: int, ino: int, now: int, name: bytes) -> tuple[int, bytes]:
    return LINK, _LINK.pack(parent, ino, now) + _name(name)


def rec_unlink(parent: int, now: int, name: bytes) -> tuple[int, bytes]:
    return UNLINK, _UNLINK.pack(parent, now) + _name(name)


def rec_rename(old_parent: int, new_parent: int, flags: int, now: int, old: bytes, new: bytes) -> tuple[int, bytes]:
    return RENAME, _RENAME.pack(old_parent, new_parent, flags, now) + _name(old) + _name(new)


def rec_setattr(ino: int, mask: int, *, mode: int = 0, uid: int = 0, gid: int = 0, size: int = 0,
                atime: int = 0, mtime: int = 0, ctime: int = 0) -> tuple[int, bytes]:
    return SETATTR, _SETATTR.pack(ino, mask, mode, uid, gid, size, atime, mtime, ctime)


def rec_extent(ino: int, index: int, region_id: int, ext: int) -> tuple[int, bytes]:
    return EXTENT, _EXTENT.pack(ino, index, region_id, ext)


def rec_free(ino: int) -> tuple[int, bytes]:
    return FREE, _FREE.pack(ino)


class ExtentStore:
    """What the model needs from the data side: extent bookkeeping and zeroing."""

    def __init__(self, mark_used: Callable[[int, int, bool], None],
                 release: Callable[[list[tuple[int, int]], list[int] | None], None],
                 zero_range: Callable[[int, int, int, int], None]) -> None:
        self.mark_used = mark_used        # (region, extent, used)
        # ([(region, extent), ...], bytes of each the file may have written, None: all): mark dirty + give
        # the memory back
        self.release = release
        self.zero_range = zero_range      # (region, extent, offset_in_extent, length): mark dirty + zero


class Namespace:
    """Inodes by number; applies journal records."""

    def __init__(self, store: ExtentStore, extent_size: int) -> None:
        self.inodes: dict[int, Inode] = {}
        self.next_ino = ROOT_INO + 1
        self.store = store
        self.extent_size = extent_size
        # While replaying, unlinked inodes stay until the end: later records of
        # the live run may still touch a file that was open when unlinked.
        self.replaying = False
        # While replaying, region memory already holds the final state: an old
        # record's release or zeroing must not run then, as a later record may
        # have reused the extent and the data written to it is not journaled.
        # ``finish_replay`` applies what the final state needs instead.
        self._replay_released: set[tuple[int, int]] = set()
        self._replay_shrunk: set[int] = set()
        self.building: CheckpointBuilder | None = None     # a checkpoint being built in slices

    def init_root(self, uid: int, gid: int, now: int) -> None:
        self.inodes[ROOT_INO] = Inode(ROOT_INO, stat.S_IFDIR | 0o755, uid, gid, nlink=2, atime_ns=now,
                                      mtime_ns=now, ctime_ns=now, parent=ROOT_INO, entries={})

    def get(self, ino: int) -> Inode:
        return self.inodes[ino]

    # --- apply ---------------------------------------------------------------
    def apply(self, rtype: int, payload: bytes | memoryview) -> None:
        buf = memoryview(payload)
        if rtype == EXTENT:              # first: most records of a journal are extents
            ino, index, region_id, ext = _EXTENT.unpack_from(buf)
            self.changed(ino)
            self.inodes[ino].extents[index] = (region_id, ext)
            self.store.mark_used(region_id, ext, True)
        elif rtype == CREATE:
            parent, ino, mode, uid, gid, rdev, now = _CREATE.unpack_from(buf)
            name, pos = _take_name(buf, _CREATE.size)
            target, _ = _take_name(buf, pos)
            self._create(parent, ino, mode, uid, gid, rdev, now, name, target)
        elif rtype == LINK:
            parent, ino, now = _LINK.unpack_from(buf)
            name, _ = _take_name(buf, _LINK.size)
            self._link(parent, ino, now, name)
        elif rtype == UNLINK:
            parent, now = _UNLINK.unpack_from(buf)
            name, _ = _take_name(buf, _UNLINK.size)
            self._unlink(parent, now, name)
        elif rtype == RENAME:
            op, np_, flags, now = _RENAME.unpack_from(buf)
            old, pos = _take_name(buf, _RENAME.size)
            new, _ = _take_name(buf, pos)
            self._rename(op, np_, flags, now, old, new)
        elif rtype == SETATTR:
            self._setattr(*_SETATTR.unpack_from(buf))
        elif rtype == FREE:
            (ino,) = _FREE.unpack_from(buf)
            self._free(ino)
        elif rtype == CHECKPOINT:
            self.building = None
            self.load(buf)
        else:
            raise CorruptionError(f"journal: unknown record type {rtype}")

    def changed(self, *inos: int) -> None:
        """These inodes are about to change: a checkpoint being built drops their serialized parts. Every
        change to what ``serialize`` writes calls this first (the namespace's own records here; core.py for
        the file times an overwrite keeps in memory)."""
        if self.building is not None:
            for ino in inos:
                self.building.drop(ino)

    def _touch(self, inode: Inode, now: int) -> None:
        self.changed(inode.ino)
        inode.mtime_ns = inode.ctime_ns = now

    def _create(self, parent: int, ino: int, mode: int, uid: int, gid: int, rdev: int, now: int,
                name: bytes, target: bytes) -> None:
        pdir = self.inodes[parent]
        self.changed(parent, ino)
        inode = Inode(ino, mode, uid, gid, atime_ns=now, mtime_ns=now, ctime_ns=now, rdev=rdev, target=target)
        if stat.S_ISDIR(mode):
            inode.entries, inode.nlink, inode.parent = {}, 2, parent
            pdir.nlink += 1
        if stat.S_ISLNK(mode):
            inode.size = len(target)
        self.inodes[ino] = inode
        assert pdir.entries is not None
        pdir.entries[name] = ino
        self._touch(pdir, now)
        self.next_ino = max(self.next_ino, ino + 1)

    def _link(self, parent: int, ino: int, now: int, name: bytes) -> None:
        pdir, inode = self.inodes[parent], self.inodes[ino]
        self.changed(parent, ino)
        assert pdir.entries is not None
        pdir.entries[name] = ino
        inode.nlink += 1
        inode.ctime_ns = now
        self._touch(pdir, now)

    def _drop_link(self, inode: Inode, parent: Inode, now: int) -> None:
        self.changed(inode.ino, parent.ino)
        inode.ctime_ns = now
        if inode.is_dir:
            inode.nlink = 0
            parent.nlink -= 1
        else:
            inode.nlink -= 1
        if inode.nlink == 0 and inode.lookups == 0 and inode.opens == 0 and not self.replaying:
            self._free(inode.ino)

    def _unlink(self, parent: int, now: int, name: bytes) -> None:
        pdir = self.inodes[parent]
        self.changed(parent)
        assert pdir.entries is not None
        ino = pdir.entries.pop(name)
        self._touch(pdir, now)
        self._drop_link(self.inodes[ino], pdir, now)

    def _rename(self, old_parent: int, new_parent: int, flags: int, now: int, old: bytes, new: bytes) -> None:
        src, dst = self.inodes[old_parent], self.inodes[new_parent]
        assert src.entries is not None and dst.entries is not None
        moving = self.inodes[src.entries[old]]
        self.changed(old_parent, new_parent, moving.ino)
        if flags & RENAME_EXCHANGE:
            other = self.inodes[dst.entries[new]]
            self.changed(other.ino)
            src.entries[old], dst.entries[new] = other.ino, moving.ino
            for inode, parent in ((moving, dst), (other, src)):
                if inode.is_dir and inode.parent != parent.ino:
                    self.changed(inode.parent)
                    self.inodes[inode.parent].nlink -= 1
                    inode.parent = parent.ino
                    parent.nlink += 1
                inode.ctime_ns = now
        else:
            replaced = dst.entries.get(new)
            del src.entries[old]
            dst.entries[new] = moving.ino
            if replaced is not None and replaced != moving.ino:
                self._drop_link(self.inodes[replaced], dst, now)
            if moving.is_dir and old_parent != new_parent:
                src.nlink -= 1
                dst.nlink += 1
                moving.parent = new_parent
            moving.ctime_ns = now
        self._touch(src, now)
        self._touch(dst, now)

    def _setattr(self, ino: int, mask: int, mode: int, uid: int, gid: int, size: int,
                 atime: int, mtime: int, ctime: int) -> None:
        inode = self.inodes[ino]
        self.changed(ino)
        if mask & SET_MODE:
            inode.mode = stat.S_IFMT(inode.mode) | stat.S_IMODE(mode)
        if mask & SET_UID:
            inode.uid = uid
        if mask & SET_GID:
            inode.gid = gid
        if mask & SET_SIZE:
            if size < inode.size:
                self._shrink(inode, size)
            inode.size = size
        if mask & SET_ATIME:
            inode.atime_ns = atime
        if mask & SET_MTIME:
            inode.mtime_ns = mtime
        if mask & SET_CTIME:
            inode.ctime_ns = ctime

    def extended(self, inode: Inode, size: int, now: int) -> None:
        """Apply rec_setattr(ino, SET_SIZE | SET_MTIME | SET_CTIME, size=size, mtime=now, ctime=now) for a
        size not below the inode's (a write past the end), without decoding it: what ``_setattr`` does."""
        self.changed(inode.ino)
        inode.size = size
        inode.mtime_ns = inode.ctime_ns = now

    def _shrink(self, inode: Inode, size: int) -> None:
        """Free extents past ``size`` and zero the tail of the last one, so a later
        extension reads zeros (POSIX). Idempotent, so replay may redo it."""
        es = self.extent_size
        keep = -(-size // es)
        indices = [i for i in inode.extents if i >= keep]
        dropped = [inode.extents.pop(i) for i in indices]
        self._release(dropped, self._used_bytes(inode, indices))
        if self.replaying:
            self._replay_shrunk.add(inode.ino)
            return
        tail = size % es
        if tail and (size // es) in inode.extents:
            region_id, ext = inode.extents[size // es]
            self.store.zero_range(region_id, ext, tail, min(es, inode.size - size // es * es) - tail)

    def _free(self, ino: int) -> None:
        self.changed(ino)
        inode = self.inodes.pop(ino, None)
        if inode is None:
            return
        self._release(list(inode.extents.values()), self._used_bytes(inode, list(inode.extents)))

    def _used_bytes(self, inode: Inode, indices: list[int]) -> list[int]:
        """Per extent index of the file, how much of that extent lies within its size (the rest is zeros)."""
        es = self.extent_size
        return [max(0, min(es, inode.size - i * es)) for i in indices]

    def _release(self, extents: list[tuple[int, int]], used_bytes: list[int]) -> None:
        """``used_bytes``: per extent, how much of it lies within the file's size (the rest is zeros)."""
        if extents:
            if self.replaying:
                self._replay_released.update(extents)
            else:
                self.store.release(extents, used_bytes)
            for region_id, ext in extents:
                self.store.mark_used(region_id, ext, False)

    def finish_replay(self) -> None:
        """After replay: the memory effects the final state needs, which only matter when the last record's
        operation was cut off before it changed memory. Extents released during replay and still free are
        released (zeroed) again; a file shrunk during replay gets the bytes past its end zeroed."""
        used = {loc for inode in self.inodes.values() for loc in inode.extents.values()}
        free = sorted(self._replay_released - used)
        if free:
            self.store.release(free, None)
        es = self.extent_size
        for ino in sorted(self._replay_shrunk):
            inode = self.inodes.get(ino)
            tail = inode.size % es if inode is not None else 0
            if inode is not None and tail and (inode.size // es) in inode.extents:
                region_id, ext = inode.extents[inode.size // es]
                self.store.zero_range(region_id, ext, tail, es - tail)
        self._replay_released.clear()
        self._replay_shrunk.clear()

    def orphans(self) -> list[int]:
        """Inodes with no name left; after a restart nothing refers to them."""
        return [ino for ino, inode in self.inodes.items() if inode.nlink == 0]

    # --- checkpoint ----------------------------------------------------------
    def serialize(self) -> bytes:
        """The whole model as one CHECKPOINT payload (in one step; ``CheckpointBuilder`` in slices)."""
        parts = [_CK_HEAD.pack(self.next_ino, len(self.inodes))]
        parts.extend(_ck_inode(inode) for inode in self.inodes.values())
        return b"".join(parts)

    def start_checkpoint(self) -> CheckpointBuilder:
        """Begin building a checkpoint in slices (replacing one being built)."""
        self.building = CheckpointBuilder(self)
        return self.building

    def load(self, buf: memoryview) -> None:
        self.building = None
        self.inodes.clear()
        self.next_ino, count = _CK_HEAD.unpack_from(buf)
        pos = _CK_HEAD.size
        for _ in range(count):
            (ino, mode, uid, gid, nlink, size, atime, mtime, ctime, rdev, parent, n_ext, n_ent,
             n_target) = _CK_INODE.unpack_from(buf, pos)
            pos += _CK_INODE.size
            inode = Inode(ino, mode, uid, gid, nlink, size, atime, mtime, ctime, rdev, parent,
                          bytes(buf[pos:pos + n_target]))
            pos += n_target
            for _ in range(n_ext):
                index, region_id, ext = _CK_EXT.unpack_from(buf, pos)
                pos += _CK_EXT.size
                inode.extents[index] = (region_id, ext)
                self.store.mark_used(region_id, ext, True)
            if n_ent != 0xFFFFFFFF:
                inode.entries = {}
                for _ in range(n_ent):
                    child, n = _CK_DIRENT.unpack_from(buf, pos)
                    pos += _CK_DIRENT.size
                    inode.entries[bytes(buf[pos:pos + n])] = child
                    pos += n
            self.inodes[ino] = inode
        if pos != len(buf):
            raise CorruptionError(f"journal: checkpoint has {len(buf) - pos} trailing bytes")

    # --- checks ----------------------------------------------------------------
    def check(self) -> list[str]:
        """Structural problems (empty when consistent): dangling entries, wrong link counts, shared extents."""
        problems: list[str] = []
        links: dict[int, int] = {}
        owners: dict[tuple[int, int], int] = {}
        if ROOT_INO not in self.inodes:
            return ["root directory missing"]
        for inode in self.inodes.values():
            for loc in inode.extents.values():
                if loc in owners:
                    problems.append(f"extent {loc} owned by inodes {owners[loc]} and {inode.ino}")
                owners[loc] = inode.ino
            if inode.entries is None:
                continue
            for name, child in inode.entries.items():
                if child not in self.inodes:
                    problems.append(f"entry {name!r} in directory {inode.ino} names missing inode {child}")
                    continue
                links[child] = links.get(child, 0) + 1
        for inode in self.inodes.values():
            if inode.is_dir:
                subdirs = sum(1 for c in (inode.entries or {}).values()
                              if c in self.inodes and self.inodes[c].is_dir)
                expected = 0 if inode.nlink == 0 else 2 + subdirs
            else:
                expected = links.get(inode.ino, 0)
            if inode.nlink != expected:
                problems.append(f"inode {inode.ino}: nlink {inode.nlink}, expected {expected}")
        return problems



def _ck_inode(inode: Inode) -> bytes:
    """One inode's part of a checkpoint: its fields, symlink target, extents and directory entries."""
    entries = inode.entries
    parts = [_CK_INODE.pack(inode.ino, inode.mode, inode.uid, inode.gid, inode.nlink, inode.size,
                            inode.atime_ns, inode.mtime_ns, inode.ctime_ns, inode.rdev, inode.parent,
                            len(inode.extents), 0xFFFFFFFF if entries is None else len(entries),
                            len(inode.target)), inode.target]
    parts.extend(_CK_EXT.pack(i, r, e) for i, (r, e) in inode.extents.items())
    if entries:
        parts.extend(_CK_DIRENT.pack(child, len(name)) + name for name, child in entries.items())
    return b"".join(parts)


SLICE_INODES = 256         # inodes serialized between two looks at the clock


class CheckpointBuilder:
    """A checkpoint payload (``serialize``'s format) built in slices of bounded time between operations.

    It holds each inode's serialized part. ``Namespace.changed`` drops the part of an inode before it
    changes (and notes it as stale), so every part held is always the inode as it is now, whatever
    operations ran between two slices. ``finish`` (one step, no await) serializes the stale inodes that
    still exist and joins the parts: the namespace as it is at that moment. Only the order of the inodes
    may differ from ``serialize``'s, and ``load`` does not depend on it (each directory keeps the order
    of its entries). Nothing is written anywhere until then: the journal writes the result with the same
    single ``Journal.checkpoint`` call as before, so a crash at any point during the slices leaves the
    last checkpoint and its records, exactly as without the builder.
    """

    def __init__(self, ns: Namespace) -> None:
        self.ns = ns
        self.parts: dict[int, bytes] = {}
        self.stale: set[int] = set()       # changed or created since the build began
        self._todo = list(ns.inodes)
        self._next = 0

    def drop(self, ino: int) -> None:
        self.parts.pop(ino, None)
        self.stale.add(ino)

    def step(self, budget_s: float) -> bool:
        """Serialize inodes for about ``budget_s`` seconds; whether every inode has been visited."""
        inodes, parts, todo = self.ns.inodes, self.parts, self._todo
        deadline = time.perf_counter() + budget_s
        while self._next < len(todo):
            for ino in todo[self._next:self._next + SLICE_INODES]:
                inode = inodes.get(ino)
                if inode is not None and ino not in parts:
                    parts[ino] = _ck_inode(inode)
            self._next += SLICE_INODES
            if time.perf_counter() >= deadline:
                break
        return self._next >= len(todo)

    def finish(self) -> bytes:
        """The checkpoint payload of the namespace as it is now; the builder is spent."""
        ns, parts = self.ns, self.parts
        self.step(float("inf"))
        for ino in self.stale:
            inode = ns.inodes.get(ino)
            if inode is not None:
                parts[ino] = _ck_inode(inode)
        if ns.building is self:
            ns.building = None
        if len(parts) != len(ns.inodes):     # a change that did not call ``changed``: never write that
            log.error("checkpoint built in slices holds %d inodes, the namespace %d: serialized whole instead",
                      len(parts), len(ns.inodes))
            return ns.serialize()
        return _CK_HEAD.pack(ns.next_ino, len(parts)) + b"".join(parts.values())
