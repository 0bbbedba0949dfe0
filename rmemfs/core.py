"""The filesystem core: POSIX operations over regions, speaking errno (``FsError``).

No pyfuse3 here: ``fs.py`` adapts FUSE requests to these methods, and tests
call them in-process. Every mutation follows one order:

1. validate (raise FsError, nothing changed yet);
2. mark the pages about to change in the current dirty list;
3. journal the namespace record (its pages are marked first, too);
4. apply it to the model / copy the data in.

All methods except ``admit``, ``with_pages`` and the compactor task ``compact_journal`` are synchronous: a whole
operation runs without an await, so it is atomic with respect to the trio
scheduler, and a flush's list swap can only fall between operations.

During a lazy recovery's background load (``residency``), an operation that
needs the old contents of a page not loaded yet raises ``NotResident`` in
step 1, before it changes anything; ``with_pages`` waits for the page and runs
it again. Pages it overwrites whole, zeroes or frees are claimed instead.
Every page marked dirty is resident at the moment it is marked.
"""
from __future__ import annotations

import errno
import logging
import os
import stat
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable, Iterator
from typing import TypeVar

import trio

from . import PAGE_SIZE
from .dirty import DirtyTracker, ctl_region_size, parse_header
from .errors import CorruptionError, FsError
from .fencing import barrier
from .journal import CHECKPOINT, Journal, JournalFull
from .namespace import (ROOT_INO, RENAME_EXCHANGE, RENAME_NOREPLACE, SET_ATIME, SET_CTIME, SET_GID, SET_MODE,
                        SET_MTIME, SET_SIZE, SET_UID, SETATTR, ExtentStore, Inode, Namespace, rec_create, rec_extent,
                        rec_free, rec_link, rec_rename, rec_setattr, rec_unlink, snapshot_growth)
from .regions import (CTL_REGION_ID, EXTENT_PAGES, EXTENT_SIZE, META_REGION_ID, META_REGION_SIZE, RegionSet,
                      extent_runs)
from .sources.lazy import NotResident, Residency
import trio.lowlevel

log = logging.getLogger(__name__)

NAME_MAX = 255
DEFAULT_DIRTY_CAPACITY = 1 << 20          # entries per list: 8 MiB of exported memory each
ADMIT_MARGIN = 1 << 14                    # entries kept free so any single operation fits
# An overwrite (a write within the file's size) changes only mtime and ctime in the namespace. Those are
# kept in memory and journaled lazily, as ext4's lazytime does: at fsync and close of the file, before
# every baseline, and after any operation once the oldest is this old. A record per write was half of
# the core's cost of a 4 KiB write (issue 14).
TIMES_LAG_S = 1.0
# Longest step of the event loop a journal compaction takes while it serializes the namespace, so that the
# heartbeat a standby watches keeps beating (about 2,000 files a step; issue 12).
COMPACTION_SLICE_S = 0.005
T = TypeVar("T")
# A SETATTR payload (namespace.rec_setattr) of size, mtime and ctime: <Q ino, I mask, I mode, I uid, I gid,
# Q size, q atime, q mtime, q ctime> with mode, uid, gid and atime 0.
_SETATTR_EXTEND = struct.Struct("<QI12xQ8xqq")


@dataclass(frozen=True)
class CoreStats:
    inodes: int
    used_extents: int
    dirty_current_pages: int
    dirty_current_entries: int
    dirty_flushing_pages: int
    dirty_flushing_entries: int
    dirty_capacity: int
    journal_bytes: int
    region_count: int
    region_virtual_bytes: int
    region_resident_bytes: int
    compactions: int = 0                  # journal compactions written
    compaction_longest_step_s: float = 0.0     # the longest event-loop step one took (a slice, or the write)


class Filesystem:
    """One mounted (or being recovered) filesystem's in-memory state."""

    def __init__(self, regions: RegionSet, tracker: DirtyTracker, fsid: str,
                 residency: Residency | None = None) -> None:
        self.residency = residency        # None, or a lazy load's map of the pages loaded so far
        self.regions = regions
        self.tracker = tracker
        self.fsid = fsid
        self.journal = Journal(regions[META_REGION_ID], tracker)
        self.ns = Namespace(ExtentStore(regions.mark_extent, self._release_extents, self._zero_range), EXTENT_SIZE)
        self.fenced = False
        self.room_waiter: RoomWaiter | None = None
        self._pending_times: set[int] = set()     # inodes whose times changed in memory only
        self._times_due = 0.0                    # monotonic time by which they are journaled
        self._checked_journal_pos = -1           # the journal position after_operation last measured at
        self._compaction_wanted: trio.Event | None = None     # set while compact_journal runs
        self.compactions = 0
        self.compaction_longest_step_s = 0.0
        self._sync_region_pages()

    # --- construction -----------------------------------------------------------
    @classmethod
    def create_regions(cls, directory: Path, fsid: str, *, capacity: int, data_region_size: int,
                       meta_size: int = META_REGION_SIZE, extra: dict[int, int] | None = None) -> RegionSet:
        """Fresh, empty region files (ctl, meta and any ``extra`` data regions by id -> length)."""
        regions = RegionSet(directory, data_region_size=data_region_size)
        regions.create(CTL_REGION_ID, ctl_region_size(capacity))
        regions.create(META_REGION_ID, meta_size)
        for region_id, length in sorted((extra or {}).items()):
            if region_id not in (CTL_REGION_ID, META_REGION_ID):
                regions.create(region_id, length)
        return regions

    @classmethod
    def format(cls, regions: RegionSet, fsid: str, epoch: int, capacity: int) -> Filesystem:
        """A new, empty filesystem in fresh regions."""
        tracker = DirtyTracker(regions[CTL_REGION_ID].view, capacity)
        tracker.format(fsid, epoch, os.getpid())
        fs = cls(regions, tracker, fsid)
        fs.ns.init_root(os.getuid(), os.getgid(), time.time_ns())
        fs.journal.checkpoint(fsid, fs.ns.serialize())
        return fs

    @classmethod
    def load(cls, regions: RegionSet, fsid: str, epoch: int, *, fresh_ctl_capacity: int | None = None,
             residency: Residency | None = None) -> Filesystem:
        """Rebuild the namespace from the meta region's journal.

        With ``fresh_ctl_capacity`` the ctl region is (re)formatted: used after
        loading a baseline or a recovery, when the old lists mean nothing here.
        With ``residency`` (a lazy recovery) the meta region is in, data pages
        may not be: the replay loads what it needs through ``residency.fill_now``.
        """
        ctl = regions[CTL_REGION_ID]
        if fresh_ctl_capacity is not None:
            tracker = DirtyTracker(ctl.view, fresh_ctl_capacity)
            tracker.format(fsid, epoch, os.getpid())
        else:
            header = parse_header(ctl.view[:PAGE_SIZE])
            if header.fsid != fsid:
                raise CorruptionError(f"region directory {regions.directory} holds filesystem {header.fsid}, "
                                      f"not {fsid}")
            tracker = DirtyTracker(ctl.view, header.capacity)
            tracker.take_ownership(epoch, os.getpid())
        fs = cls(regions, tracker, fsid, residency)
        fs.replay()
        # A recovery fetches the pages of extents freed since the baseline (their release marked them):
        # zeros now, but memory. Free extents are holes after any load.
        if residency is not None:       # and a lazy load never writes into them
            for region_id, region in regions.regions.items():
                for a, b in regions.free_page_ranges(region_id, 0, region.pages):
                    residency.claim(region_id, a, b - a)
        regions.punch_free_extents()
        return fs

    def replay(self) -> None:
        self.ns.replaying = True
        growth = 0
        apply = self.ns.apply            # looked up once: a journal holds up to ~170,000 records
        try:
            for rtype, payload in self.journal.open():
                apply(rtype, payload)
                if rtype != CHECKPOINT:     # keeps the journal's bound on the next checkpoint true
                    growth += snapshot_growth(rtype, payload)
        finally:
            self.ns.replaying = False
        self.journal.grew(growth)
        if self.journal.sb is not None and self.journal.sb.fsid != self.fsid:
            raise CorruptionError(f"journal belongs to filesystem {self.journal.sb.fsid}, not {self.fsid}")
        self.ns.finish_replay()
        for ino in self.ns.orphans():
            if ino != ROOT_INO:
                self._do(rec_free(ino))
        problems = self.ns.check()
        if problems:
            raise CorruptionError("namespace check failed: " + "; ".join(problems[:5]))

    def grow_journal(self, length: int) -> None:
        """Give the namespace journal a longer region (``-o meta_size`` at a mount; it never shrinks).
        Call before serving: what moves is marked dirty as every journal write is."""
        self.regions[META_REGION_ID].grow(length)
        self.tracker.region_grew(META_REGION_ID, self.regions[META_REGION_ID].pages)
        self.journal.region_grew(self.fsid, self.ns.serialize)

    # --- plumbing ---------------------------------------------------------------
    def _sync_region_pages(self) -> None:
        for region_id, region in self.regions.regions.items():
            self.tracker.region_pages[region_id] = region.pages

    def _release_extents(self, extents: list[tuple[int, int]], used_bytes: list[int] | None = None) -> None:
        # Mark contiguous extents as one run, so freeing a big file costs few list entries.
        for region_id, first, count in extent_runs(extents):
            if self.residency is not None:
                self.residency.claim(region_id, first * EXTENT_PAGES, count * EXTENT_PAGES)
            self.tracker.mark(region_id, first * EXTENT_PAGES, count * EXTENT_PAGES)
        # Only once serving: a lazy load must not be under way when an extent is kept for reuse.
        self.regions.release_extents(extents, used_bytes if self.residency is None or self.residency.complete
                                     else None)

    def _zero_range(self, region_id: int, ext: int, offset: int, length: int) -> None:
        if length <= 0:
            return
        self._back(region_id, ext)
        start = ext * EXTENT_SIZE + offset
        if self.residency is not None:
            self._overwriting(region_id, start, length)
        self.tracker.mark_bytes(region_id, start, length)
        self.regions[region_id].view[start:start + length] = bytes(length)

    def _overwriting(self, region_id: int, start: int, length: int) -> None:
        """Pages [start, start + length) are about to change: whole pages are claimed, a partly covered one
        must be in (NotResident: callers check this in their validation step, so it is not raised here
        once serving; before the mount the replay loads it)."""
        res = self.residency
        if res is None or res.complete or length <= 0:
            return
        first, end = start // PAGE_SIZE, (start + length - 1) // PAGE_SIZE + 1
        head, tail = start % PAGE_SIZE, (start + length) % PAGE_SIZE
        if head:
            res.require(region_id, first, 1)
        if tail and end - 1 != first or tail and not head:
            res.require(region_id, end - 1, 1)
        res.claim(region_id, first, end - first)

    def _need_pages(self, region_id: int, start: int, length: int) -> None:
        if length > 0 and self.residency is not None:
            first = start // PAGE_SIZE
            self.residency.require(region_id, first, (start + length - 1) // PAGE_SIZE + 1 - first)

    async def with_pages(self, op: Callable[[], T]) -> T:
        """Run ``op`` (a sync operation); while it needs pages a lazy load has not brought in yet, wait for
        them with priority and run it again (it changed nothing when it raised)."""
        while True:
            try:
                return op()
            except NotResident as e:
                assert self.residency is not None
                await self.residency.ensure(e.region_id, e.first, e.n)

    def _back(self, region_id: int, ext: int) -> None:
        try:
            self.regions.back_extent(region_id, ext)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise FsError(errno.ENOSPC, f"the region directory {self.regions.directory} is full") from None
            raise

    def _log(self, rtype: int, payload: bytes) -> None:
        growth = snapshot_growth(rtype, payload)
        if growth and not self.journal.room_for_growth(growth):
            if self.journal.growth_since_checkpoint:      # the bound may be loose: measure exactly once
                self._checkpoint()
            if not self.journal.room_for_growth(growth):
                raise FsError(errno.ENOSPC, "the namespace journal region is full: delete files (its size, "
                              "-o meta_size, is set when the filesystem is created)")
        try:
            self.journal.append(rtype, payload, growing=growth > 0)
        except JournalFull:
            self._checkpoint()
            self.journal.append(rtype, payload, growing=growth > 0)
        self.journal.grew(growth)

    def _do(self, record: tuple[int, bytes]) -> None:
        self._log(*record)
        self.ns.apply(*record)

    def after_operation(self) -> None:
        """Journal overwrites' times once due, and compact the journal when its log outgrew the last
        checkpoint (between operations)."""
        if self._pending_times and time.monotonic() >= self._times_due:
            if not self.sync_times():
                self._times_due = time.monotonic() + TIMES_LAG_S
        if self.fenced or self.tracker.fence:     # another host owns the memory now: no compaction
            return
        if (self.journal.pos != self._checked_journal_pos and self.ns.building is None
                and self.journal.wants_checkpoint()):
            if self._compaction_wanted is not None:       # the mount's compactor builds it in slices
                self.ns.start_checkpoint()
                self._compaction_wanted.set()
            elif not self._compact_now():
                return                                    # postponed: compact after the next record
        # Until the journal moves again its log cannot have outgrown the checkpoint: an overwrite, which
        # journals nothing (its times are lazy), skips the measure (issue 14).
        self._checked_journal_pos = self.journal.pos

    def has_room(self) -> bool:
        """Whether the current dirty list can take any single operation now (``admit`` need not wait)."""
        return self.tracker.current.room() >= ADMIT_MARGIN or not self.tracker.enabled

    def _checkpoint(self) -> None:
        """Write a checkpoint now: the one being built in slices if there is one (finished in this step),
        else the whole namespace serialized here."""
        building = self.ns.building
        if building is None:
            snapshot = self.ns.serialize()
        else:
            self.ns.changed(*self._pending_times)    # times an overwrite changed in memory only
            snapshot = building.finish()
        self.journal.checkpoint(self.fsid, snapshot)

    def _compact_now(self) -> bool:
        """A compaction in this step; whether it was written (else it is postponed)."""
        t = time.perf_counter()
        try:
            self._checkpoint()
        except FsError as e:      # the operation is done and journaled; compact later
            log.warning("journal compaction postponed: %s", e)
            return False
        self.compactions += 1
        self._compaction_step(time.perf_counter() - t)
        return True

    def _compaction_step(self, seconds: float) -> None:
        self.compaction_longest_step_s = max(self.compaction_longest_step_s, seconds)

    async def compact_journal(self) -> None:
        """The mount's compactor (runs until cancelled): a compaction that ``after_operation`` asks for is
        built in slices of at most COMPACTION_SLICE_S of the event loop, with the loop free in between,
        and written in one step (``CheckpointBuilder``). No await falls inside a journal write: between
        slices the journal and the meta region are as the operations left them, so a crash there replays
        the last checkpoint and its records. A checkpoint an operation needs at once (a full area) finishes
        the one being built synchronously (``_checkpoint``); this task then finds it gone."""
        self._compaction_wanted = trio.Event()
        try:
            while True:
                await self._compaction_wanted.wait()
                self._compaction_wanted = trio.Event()
                building = self.ns.building
                while building is not None and building is self.ns.building:
                    t = time.perf_counter()
                    done = building.step(COMPACTION_SLICE_S)
                    self._compaction_step(time.perf_counter() - t)
                    if done:
                        break
                    await trio.lowlevel.checkpoint()
                if building is None or building is not self.ns.building:
                    continue
                if self.fenced or self.tracker.fence:      # another host owns the memory: write nothing
                    self.ns.building = None
                    continue
                self._compact_now()
        finally:
            self._compaction_wanted = None
            self.ns.building = None

    async def admit(self) -> None:
        """Wait until the current dirty list can take any single operation.

        A full list forces a flush (which swaps in the empty list); marks are
        never dropped. If flushing keeps failing, give up with ENOSPC rather
        than accept a change that cannot be tracked.
        """
        if self.has_room():
            return
        if self.room_waiter is None:
            raise FsError(errno.ENOSPC, "dirty list full and no flusher")
        await self.room_waiter.wait_for_room()
        if self.tracker.current.room() < ADMIT_MARGIN:
            raise FsError(errno.ENOSPC, "dirty list full and the flush failed")

    # --- lookups ------------------------------------------------------------------
    def inode(self, ino: int) -> Inode:
        try:
            return self.ns.inodes[ino]
        except KeyError:
            raise FsError(errno.ENOENT) from None

    def _dir(self, ino: int) -> Inode:
        inode = self.inode(ino)
        if inode.entries is None:
            raise FsError(errno.ENOTDIR)
        return inode

    @staticmethod
    def _check_name(name: bytes) -> None:
        if len(name) > NAME_MAX:
            raise FsError(errno.ENAMETOOLONG)
        if not name or b"/" in name or name in (b".", b".."):
            raise FsError(errno.EINVAL)

    def lookup(self, parent: int, name: bytes) -> Inode:
        inode = self.find(parent, name)
        if inode is None:
            raise FsError(errno.ENOENT)
        return inode

    def find(self, parent: int, name: bytes) -> Inode | None:
        """``lookup``, with None for a name that does not exist (no exception: the FUSE adapter answers it
        with a negative entry)."""
        pdir = self._dir(parent)
        if len(name) > NAME_MAX:
            raise FsError(errno.ENAMETOOLONG)
        if name == b".":
            ino = parent
        elif name == b"..":
            ino = pdir.parent
        else:
            assert pdir.entries is not None
            child = pdir.entries.get(name)
            if child is None:
                return None
            ino = child
        inode = self.ns.inodes[ino]
        inode.lookups += 1
        return inode

    def remember(self, inode: Inode) -> Inode:
        """Count a kernel reference handed out by create/mkdir/link/..."""
        inode.lookups += 1
        return inode

    def forget(self, ino: int, nlookup: int) -> None:
        inode = self.ns.inodes.get(ino)
        if inode is None:
            return
        inode.lookups = max(0, inode.lookups - nlookup)
        self._maybe_free(inode)

    def _maybe_free(self, inode: Inode) -> None:
        if inode.nlink == 0 and inode.lookups == 0 and inode.opens == 0 and inode.ino != ROOT_INO:
            self._do(rec_free(inode.ino))

    def readdir(self, ino: int) -> list[tuple[bytes, Inode]]:
        pdir = self._dir(ino)
        assert pdir.entries is not None
        return [(name, self.ns.inodes[child]) for name, child in pdir.entries.items()]

    def readlink(self, ino: int) -> bytes:
        inode = self.inode(ino)
        if not stat.S_ISLNK(inode.mode):
            raise FsError(errno.EINVAL)
        return inode.target

    # --- namespace changes ----------------------------------------------------------
    def _writable(self) -> None:
        """The first fence check of a mutation (see ``fencing``): before anything changes."""
        if self.fenced or self.tracker.fence:
            self._refuse()

    def confirm_owner(self) -> None:
        """The second fence check, after the mutation's marks and copies and right before its reply
        (no await may follow it in the handler): a fence set meanwhile refuses the reply."""
        barrier()
        if self.fenced or self.tracker.fence:
            self._refuse()

    def _refuse(self) -> None:
        self.note_fenced()
        raise FsError(errno.EROFS, "fenced: another host owns this filesystem now")

    def note_fenced(self) -> bool:
        """Whether this filesystem is fenced; the first time it is, log the one line that says so."""
        if not self.fenced and self.tracker.fence:
            self.fenced = True
            log.error("fenced: the filesystem was taken over by epoch %d (this mount was epoch %d, pid %d); "
                      "it is read-only now and refuses every change with EROFS", self.tracker.fence,
                      self.tracker.header().epoch, os.getpid())
        return self.fenced

    def make(self, parent: int, name: bytes, mode: int, uid: int, gid: int, rdev: int = 0,
             target: bytes = b"") -> Inode:
        """create / mknod / mkdir / symlink: ``mode`` carries the file type."""
        self._writable()
        self._check_name(name)
        pdir = self._dir(parent)
        assert pdir.entries is not None
        if name in pdir.entries:
            raise FsError(errno.EEXIST)
        if pdir.mode & stat.S_ISGID:
            gid = pdir.gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        ino = self.ns.next_ino
        self._do(rec_create(parent, ino, mode, uid, gid, rdev, time.time_ns(), name, target))
        return self.remember(self.ns.inodes[ino])

    def link(self, ino: int, parent: int, name: bytes) -> Inode:
        self._writable()
        self._check_name(name)
        inode, pdir = self.inode(ino), self._dir(parent)
        assert pdir.entries is not None
        if inode.is_dir:
            raise FsError(errno.EPERM)
        if name in pdir.entries:
            raise FsError(errno.EEXIST)
        if inode.nlink == 0:
            raise FsError(errno.ENOENT)
        self._do(rec_link(parent, ino, time.time_ns(), name))
        return self.remember(inode)

    def unlink(self, parent: int, name: bytes, *, directory: bool) -> None:
        self._writable()
        pdir = self._dir(parent)
        assert pdir.entries is not None
        if len(name) > NAME_MAX:
            raise FsError(errno.ENAMETOOLONG)
        child = pdir.entries.get(name)
        if child is None:
            raise FsError(errno.ENOENT)
        inode = self.ns.inodes[child]
        if directory:
            if not inode.is_dir:
                raise FsError(errno.ENOTDIR)
            if inode.entries:
                raise FsError(errno.ENOTEMPTY)
        elif inode.is_dir:
            raise FsError(errno.EISDIR)
        self._do(rec_unlink(parent, time.time_ns(), name))

    def rename(self, old_parent: int, old: bytes, new_parent: int, new: bytes, flags: int) -> None:
        self._writable()
        self._check_name(new)
        src, dst = self._dir(old_parent), self._dir(new_parent)
        assert src.entries is not None and dst.entries is not None
        if old not in src.entries:
            raise FsError(errno.ENOENT)
        moving = self.ns.inodes[src.entries[old]]
        target_ino = dst.entries.get(new)
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == RENAME_NOREPLACE | RENAME_EXCHANGE:
            raise FsError(errno.EINVAL)
        if flags & RENAME_NOREPLACE and target_ino is not None:
            raise FsError(errno.EEXIST)
        if flags & RENAME_EXCHANGE and target_ino is None:
            raise FsError(errno.ENOENT)
        if moving.is_dir and self._is_ancestor(moving.ino, new_parent):
            raise FsError(errno.EINVAL)
        if flags & RENAME_EXCHANGE:
            other = self.ns.inodes[target_ino]  # type: ignore[index]
            if other.is_dir and self._is_ancestor(other.ino, old_parent):
                raise FsError(errno.EINVAL)
        elif target_ino is not None:
            if target_ino == moving.ino:
                return   # POSIX: two links to the same file, nothing to do
            target = self.ns.inodes[target_ino]
            if moving.is_dir and not target.is_dir:
                raise FsError(errno.ENOTDIR)
            if not moving.is_dir and target.is_dir:
                raise FsError(errno.EISDIR)
            if target.is_dir and target.entries:
                raise FsError(errno.ENOTEMPTY)
        self._do(rec_rename(old_parent, new_parent, flags, time.time_ns(), old, new))

    def _is_ancestor(self, ancestor: int, ino: int) -> bool:
        while True:
            if ino == ancestor:
                return True
            if ino == ROOT_INO:
                return False
            ino = self.ns.inodes[ino].parent

    def setattr(self, ino: int, *, mode: int | None = None, uid: int | None = None, gid: int | None = None,
                size: int | None = None, atime: int | None = None, mtime: int | None = None,
                ctime: int | None = None) -> Inode:
        self._writable()
        inode = self.inode(ino)
        now = time.time_ns()
        mask = SET_CTIME
        if size is not None:
            if inode.is_dir:
                raise FsError(errno.EISDIR)
            if not stat.S_ISREG(inode.mode):
                raise FsError(errno.EINVAL)
            if size < 0:
                raise FsError(errno.EINVAL)
            if size > (1 << 48):
                raise FsError(errno.EFBIG)
            if self.residency is not None and size < inode.size and size % PAGE_SIZE:
                loc = inode.extents.get(size // EXTENT_SIZE)     # the page the new end cuts keeps its head
                if loc is not None:
                    self._need_pages(loc[0], loc[1] * EXTENT_SIZE + size % EXTENT_SIZE, 1)
            mask |= SET_SIZE | SET_MTIME
        mask |= (SET_MODE if mode is not None else 0) | (SET_UID if uid is not None else 0) | \
            (SET_GID if gid is not None else 0) | (SET_ATIME if atime is not None else 0) | \
            (SET_MTIME if mtime is not None else 0)
        self._do(rec_setattr(ino, mask, mode=mode or 0, uid=uid or 0, gid=gid or 0, size=size or 0,
                             atime=atime or 0, mtime=mtime if mtime is not None else now,
                             ctime=ctime if ctime is not None else now))
        return inode

    # --- data ------------------------------------------------------------------------
    def open(self, ino: int) -> Inode:
        inode = self.inode(ino)
        inode.opens += 1
        return inode

    def release(self, ino: int) -> None:
        self.sync_times(ino)
        inode = self.ns.inodes.get(ino)
        if inode is not None:
            inode.opens = max(0, inode.opens - 1)
            self._maybe_free(inode)

    def read(self, ino: int, offset: int, size: int) -> bytes:
        inode = self.inode(ino)
        end = min(offset + size, inode.size)
        if offset >= end:
            return b""
        parts: list[bytes | memoryview] = []
        if self.residency is not None and not self.residency.complete:
            for index, in_ext, n, _pos in _extent_pieces(offset, end):
                loc = inode.extents.get(index)
                if loc is not None:
                    self._need_pages(loc[0], loc[1] * EXTENT_SIZE + in_ext, n)
        for index, in_ext, n, _pos in _extent_pieces(offset, end):
            loc = inode.extents.get(index)
            if loc is None:
                parts.append(bytes(n))
            else:
                start = loc[1] * EXTENT_SIZE + in_ext
                parts.append(self.regions[loc[0]].view[start:start + n])
        return b"".join(parts)

    def write(self, ino: int, offset: int, data: bytes | memoryview) -> int:
        self._writable()
        inode = self.inode(ino)
        if not stat.S_ISREG(inode.mode):
            raise FsError(errno.EINVAL)
        src = memoryview(data)
        end = offset + len(src)
        if end > (1 << 48):
            raise FsError(errno.EFBIG)
        res = self.residency
        loading = res is not None and not res.complete
        if loading:
            self._check_partial_pages(inode, offset, end)
        index, in_ext = divmod(offset, EXTENT_SIZE)
        loc = inode.extents.get(index)
        extends = end > inode.size
        try:
            if loc is not None and 0 < len(src) <= EXTENT_SIZE - in_ext and not loading:
                # The common case (a database page, a writeback page): one piece of an extent the file has.
                # The same steps as the loop below, without its generator and run list (issue 14).
                self._back(*loc)
                start = loc[1] * EXTENT_SIZE + in_ext
                first = start // PAGE_SIZE
                self.tracker.mark(loc[0], first, (start + len(src) - 1) // PAGE_SIZE - first + 1)  # mark_bytes
                self._copy_in(loc[0], start, src)
            else:
                self._write_pieces(inode, offset, end, src)
            now = time.time_ns()
            if extends:
                # rec_setattr(ino, SET_SIZE | SET_MTIME | SET_CTIME, size=end, mtime=now, ctime=now) through
                # _do, without building and decoding it twice: one record per appending write (issue 14).
                self._log(SETATTR, _SETATTR_EXTEND.pack(ino, SET_SIZE | SET_MTIME | SET_CTIME, end, now, now))
                self.ns.extended(inode, end, now)
        except BaseException:
            if extends:
                self._zero_past_end(inode, max(offset, inode.size), end)
            raise
        if not extends:     # the data is tracked; the new times are journaled lazily (TIMES_LAG_S)
            inode.mtime_ns = inode.ctime_ns = now
            if not self._pending_times:
                self._times_due = time.monotonic() + TIMES_LAG_S
            self._pending_times.add(ino)
        return len(src)

    @property
    def times_pending(self) -> bool:
        return bool(self._pending_times)

    def sync_times(self, ino: int | None = None) -> bool:
        """Journal the times that overwrites changed in memory only: of ``ino``, or of every inode.
        Whether none is left pending: the ones that do not fit now (no room in the current dirty list or,
        on a full region tmpfs, in the journal) stay pending for a later call."""
        if not self._pending_times or self.fenced or self.tracker.fence:
            return not self._pending_times
        for i in ([ino] if ino is not None else sorted(self._pending_times)):
            if i not in self._pending_times:
                continue
            inode = self.ns.inodes.get(i)
            if inode is not None:
                if self.tracker.enabled and self.tracker.current.room() < ADMIT_MARGIN:
                    return False
                try:
                    self._do(rec_setattr(i, SET_MTIME | SET_CTIME, mtime=inode.mtime_ns, ctime=inode.ctime_ns))
                except FsError as e:
                    log.info("file times journaled later: %s", e)
                    return False
            self._pending_times.discard(i)
        return not self._pending_times

    def _check_partial_pages(self, inode: Inode, offset: int, end: int) -> None:
        """A write keeps the rest of the pages it covers in part: those must be in (validation step)."""
        partial = {offset} if offset % PAGE_SIZE else set()
        if end % PAGE_SIZE:
            partial.add(end - 1)
        for pos in partial:
            loc = inode.extents.get(pos // EXTENT_SIZE)
            if loc is not None:
                self._need_pages(loc[0], loc[1] * EXTENT_SIZE + pos % EXTENT_SIZE, 1)

    def _zero_past_end(self, inode: Inode, start: int, end: int) -> None:
        """A write past the file's end failed after some of its bytes may have landed: zero [start, end)
        again, so that a later extension reads zeros (POSIX) and a freed extent stays zeros past the size.
        Only a backed extent can hold copied bytes (every copy follows ``_back``), and writing through the
        region's file cannot meet a SIGBUS. The pages are marked already (every copy marks first)."""
        for index, in_ext, n, _pos in _extent_pieces(start, end):
            loc = inode.extents.get(index)
            if loc is not None and self.regions.is_backed(*loc):
                self.regions[loc[0]].write(loc[1] * EXTENT_SIZE + in_ext, memoryview(bytes(n)))

    def _write_pieces(self, inode: Inode, offset: int, end: int, src: memoryview) -> None:
        # Pieces that lie back to back in one region (extents are mostly allocated in order) are copied
        # with one call; every piece is marked before any of its bytes are copied. A piece that fails
        # (ENOSPC) leaves the pieces before it copied: they are marked and, during a lazy load, claimed, so
        # the loader will not bring their old bytes in.
        run: list[int] = []                      # [region id, region offset, source offset, length]
        try:
            for index, in_ext, n, pos in _extent_pieces(offset, end):
                loc = inode.extents.get(index)
                if loc is None:
                    loc = self.regions.allocate_extent()
                    self._back(*loc)                 # before the extent is recorded: ENOSPC leaves no trace
                    if loc[0] not in self.tracker.region_pages:
                        self._sync_region_pages()
                    self._do(rec_extent(inode.ino, index, *loc))
                self._back(*loc)
                start = loc[1] * EXTENT_SIZE + in_ext
                if self.residency is not None:
                    self._overwriting(loc[0], start, n)
                self.tracker.mark_bytes(loc[0], start, n)
                if run and run[0] == loc[0] and run[1] + run[3] == start:
                    run[3] += n
                else:
                    if run:
                        self._copy_in(run[0], run[1], src[run[2]:run[2] + run[3]])
                    run = [loc[0], start, pos - offset, n]
        finally:
            if run:
                self._copy_in(run[0], run[1], src[run[2]:run[2] + run[3]])

    def _copy_in(self, region_id: int, start: int, piece: memoryview) -> None:
        region = self.regions[region_id]
        if len(piece) >= 16 * PAGE_SIZE:
            region.write(start, piece)
        else:
            # Read a byte first: a read fault maps the page and its neighbours in the page cache (the
            # kernel's fault-around, 64 KiB), writable on a shared tmpfs mapping, while a write fault maps
            # only its own page. Scattered writes to pages not mapped yet in this process (say, after a
            # large write, which goes through pwrite) then fault a fraction as often (issue 14).
            region.view[start]
            region.view[start:start + len(piece)] = piece

    # --- observability ------------------------------------------------------------------
    def statistics(self) -> CoreStats:
        cur, fl = self.tracker.current, self.tracker.flushing
        rs = self.regions.stats()
        return CoreStats(len(self.ns.inodes), self.regions.used_extents(), cur.pages(), cur.count, fl.pages(),
                         fl.count, self.tracker.capacity, self.journal.used_bytes(), rs.regions, rs.virtual_bytes,
                         rs.resident_bytes, self.compactions, self.compaction_longest_step_s)

    def statfs(self) -> tuple[int, int, int, int]:
        """(total blocks, free blocks, total inodes, free inodes) in PAGE_SIZE blocks."""
        st = os.statvfs(self.regions.directory)
        free = st.f_bavail * st.f_frsize // PAGE_SIZE
        used = self.regions.used_extents() * EXTENT_PAGES
        files_free = max(0, (1 << 32) - len(self.ns.inodes))
        return used + free, free, len(self.ns.inodes) + files_free, files_free


class RoomWaiter:
    """Lets ``admit`` wait for a flush to swap in an empty list (implemented by the mount)."""

    async def wait_for_room(self) -> None:  # pragma: no cover - interface
        await trio.lowlevel.checkpoint()


def _extent_pieces(offset: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """Split a byte range at extent boundaries: (extent index, offset in it, length, file offset)."""
    pos = offset
    while pos < end:
        index, in_ext = divmod(pos, EXTENT_SIZE)
        n = min(EXTENT_SIZE - in_ext, end - pos)
        yield index, in_ext, n, pos
        pos += n
