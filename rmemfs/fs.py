"""The FUSE adapter: pyfuse3 requests in, ``core.Filesystem`` calls out.

This is the only module that knows pyfuse3 and the only place that raises
``FUSEError``. Every handler maps ``FsError`` to its errno; any other failure
is logged with its traceback and becomes EIO, so no request can end the mount.
"""
from __future__ import annotations

import errno
import functools
import logging
import os
import stat
from typing import Any, TypeVar
from collections.abc import Awaitable, Callable, Sequence

import pyfuse3

from . import PAGE_SIZE
from .core import Filesystem
from .errors import FsError
from .namespace import Inode
from .regions import EXTENT_SIZE

log = logging.getLogger(__name__)

ATTR_TIMEOUT = 10.0   # nothing but this process changes the namespace

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def _fuse_error(name: str, e: Exception) -> pyfuse3.FUSEError:
    """The FUSEError a handler's failure becomes (logged unless it is an errno the core meant)."""
    if isinstance(e, pyfuse3.FUSEError):
        return e
    if isinstance(e, FsError):
        return pyfuse3.FUSEError(e.errno)
    if isinstance(e, OSError):
        log.error("%s failed: %s", name, e)
        return pyfuse3.FUSEError(e.errno or errno.EIO)
    log.error("%s failed unexpectedly", name, exc_info=e)
    return pyfuse3.FUSEError(errno.EIO)


def _errno_boundary(func: F) -> F:
    @functools.wraps(func)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await func(*args, **kwargs)
        except Exception as e:
            raise _fuse_error(func.__name__, e) from None
    return wrapper  # type: ignore[return-value]


class Operations(pyfuse3.Operations):
    supports_dot_lookup = True

    def __init__(self, fs: Filesystem, *, writeback_cache: bool = False) -> None:
        super().__init__()
        self.fs = fs
        self.enable_writeback_cache = writeback_cache
        self._dir_handles: dict[int, list[tuple[bytes, Inode]]] = {}
        self.counters = {"reads": 0, "read_bytes": 0, "writes": 0, "write_bytes": 0, "getxattr": 0}
        self._next_dir_fh = 1

    def _attrs(self, inode: Inode) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode.ino
        a.generation = 0
        a.entry_timeout = ATTR_TIMEOUT
        a.attr_timeout = ATTR_TIMEOUT
        a.st_mode = inode.mode
        a.st_nlink = inode.nlink
        a.st_uid = inode.uid
        a.st_gid = inode.gid
        a.st_rdev = inode.rdev
        a.st_size = inode.size
        a.st_blksize = PAGE_SIZE
        a.st_blocks = len(inode.extents) * (EXTENT_SIZE // 512)
        a.st_atime_ns = inode.atime_ns
        a.st_mtime_ns = inode.mtime_ns
        a.st_ctime_ns = inode.ctime_ns
        return a

    async def _mutating(self) -> None:
        if not self.fs.has_room():     # checked here first: two coroutines less per request (issue 14)
            await self.fs.admit()

    # --- namespace ---------------------------------------------------------------
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        # Catches for itself, as read and write do. A missing name is a negative entry the kernel keeps for
        # ATTR_TIMEOUT, as it keeps the positive ones: only requests through this mount change the namespace,
        # and the kernel drops or replaces the entry itself on each of them. SQLite looks its -journal and
        # -wal names up two or three times a transaction (issue 14).
        try:
            inode = self.fs.find(parent_inode, name)
        except Exception as e:
            raise _fuse_error("lookup", e) from None
        if inode is None:
            a = pyfuse3.EntryAttributes()
            a.st_ino = 0
            a.entry_timeout = ATTR_TIMEOUT
            return a
        return self._attrs(inode)

    @_errno_boundary
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(self.fs.inode(inode))

    @_errno_boundary
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        await self._mutating()
        node = await self.fs.with_pages(lambda: self.fs.setattr(   # a truncate keeps the head of its last page
            inode,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=attr.st_size if fields.update_size else None,
            atime=attr.st_atime_ns if fields.update_atime else None,
            mtime=attr.st_mtime_ns if fields.update_mtime else None,
            ctime=attr.st_ctime_ns if fields.update_ctime else None))
        self.fs.after_operation()
        self.fs.confirm_owner()   # the last check before the reply: no await after it (see fencing)
        return self._attrs(node)

    @_errno_boundary
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return self.fs.readlink(inode)

    async def _make(self, parent: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext, rdev: int = 0,
                    target: bytes = b"") -> Inode:
        await self._mutating()
        node = self.fs.make(parent, name, mode, ctx.uid, ctx.gid, rdev, target)
        self.fs.after_operation()
        self.fs.confirm_owner()   # callers only build the reply after this, without an await
        return node

    @_errno_boundary
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(await self._make(parent_inode, name, mode, ctx, rdev))

    @_errno_boundary
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(await self._make(parent_inode, name, stat.S_IFDIR | stat.S_IMODE(mode), ctx))

    @_errno_boundary
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(await self._make(parent_inode, name, stat.S_IFLNK | 0o777, ctx, target=target))

    @_errno_boundary
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        node = await self._make(parent_inode, name, stat.S_IFREG | stat.S_IMODE(mode), ctx)
        self.fs.open(node.ino)
        return pyfuse3.FileInfo(fh=node.ino, keep_cache=True), self._attrs(node)

    @_errno_boundary
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        await self._mutating()
        node = self.fs.link(inode, new_parent_inode, new_name)
        self.fs.after_operation()
        self.fs.confirm_owner()
        return self._attrs(node)

    @_errno_boundary
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._mutating()
        self.fs.unlink(parent_inode, name, directory=False)
        self.fs.after_operation()
        self.fs.confirm_owner()

    @_errno_boundary
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._mutating()
        self.fs.unlink(parent_inode, name, directory=True)
        self.fs.after_operation()
        self.fs.confirm_owner()

    @_errno_boundary
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes,
                     flags: int, ctx: pyfuse3.RequestContext) -> None:
        await self._mutating()
        self.fs.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)
        self.fs.after_operation()
        self.fs.confirm_owner()

    @_errno_boundary
    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, nlookup in inode_list:
            self.fs.forget(ino, nlookup)
        self.fs.after_operation()

    # --- files --------------------------------------------------------------------
    @_errno_boundary
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self.fs.inode(inode)
        if flags & os.O_TRUNC and stat.S_ISREG(node.mode):
            await self._mutating()
            self.fs.setattr(inode, size=0)
            self.fs.confirm_owner()
        self.fs.open(inode)
        # Never direct_io: MAP_SHARED writable mmap needs the page cache.
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    # read and write, the hot handlers, catch for themselves (_fuse_error) instead of through
    # _errno_boundary's wrapper: one coroutine less per request (issue 14).
    async def read(self, fh: int, off: int, size: int) -> bytes:
        try:
            if self.fs.residency is None:
                data = self.fs.read(fh, off, size)
            else:         # a lazy recovery's load may still be bringing the pages in
                data = await self.fs.with_pages(lambda: self.fs.read(fh, off, size))
        except Exception as e:
            raise _fuse_error("read", e) from None
        self.counters["reads"] += 1
        self.counters["read_bytes"] += len(data)
        return data

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        fs = self.fs
        try:
            if not fs.has_room():
                await fs.admit()
            if fs.residency is None:
                n = fs.write(fh, off, buf)
            else:
                n = await fs.with_pages(lambda: fs.write(fh, off, buf))
            fs.after_operation()
            self.counters["writes"] += 1
            self.counters["write_bytes"] += n
            fs.confirm_owner()   # the last check before the reply: no await after it (see fencing)
        except Exception as e:
            raise _fuse_error("write", e) from None
        return n

    @_errno_boundary
    async def flush(self, fh: int) -> None:
        # Data is in region memory and tracked the moment write() returns.
        return None

    @_errno_boundary
    async def fsync(self, fh: int, datasync: bool) -> None:
        # Data is tracked the moment write() returns; overwrites' times are journaled here (and lazily
        # otherwise). A fenced mount must not tell fsync it is safe.
        if not datasync:
            self.fs.sync_times(fh)
        self.fs.confirm_owner()

    @_errno_boundary
    async def release(self, fh: int) -> None:
        self.fs.release(fh)
        self.fs.after_operation()

    # --- directories ------------------------------------------------------------
    @_errno_boundary
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self.fs.inode(inode)
        if node.entries is None:
            raise FsError(errno.ENOTDIR)
        fh = self._next_dir_fh
        self._next_dir_fh += 1
        # Snapshot the listing: offsets stay stable while the directory changes.
        parent = self.fs.inode(node.parent)
        self._dir_handles[fh] = [(b".", node), (b"..", parent)] + self.fs.readdir(inode)
        return fh

    @_errno_boundary
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = self._dir_handles.get(fh, [])
        for i in range(start_id, len(entries)):
            name, node = entries[i]
            if not pyfuse3.readdir_reply(token, name, self._attrs(node), i + 1):
                break

    @_errno_boundary
    async def releasedir(self, fh: int) -> None:
        self._dir_handles.pop(fh, None)

    @_errno_boundary
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        self.fs.confirm_owner()

    # --- filesystem -------------------------------------------------------------
    @_errno_boundary
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        blocks, bfree, files, ffree = self.fs.statfs()
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = PAGE_SIZE
        s.f_blocks, s.f_bfree, s.f_bavail = blocks, bfree, bfree
        s.f_files, s.f_ffree, s.f_favail = files, ffree, ffree
        s.f_namemax = 255
        return s

    @_errno_boundary
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        # ENOSYS, not ENOATTR: the kernel then stops sending GETXATTR, which it otherwise sends before every
        # write() (security.capability, for file_remove_privs). rmemfs keeps no extended attributes.
        self.counters["getxattr"] += 1
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @_errno_boundary
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return []

    @_errno_boundary
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.fs.confirm_owner()
        raise FsError(errno.ENOTSUP)

    @_errno_boundary
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise FsError(errno.ENOTSUP)


# --- the FUSE session: the rest of rmemfs mounts, serves and unmounts through these -------------------

def mount_options(fsname: str, *, allow_other: bool, extra: list[str]) -> set[str]:
    """libfuse mount options: pyfuse3's defaults, ours, then the user's ``-o`` extras."""
    options = set(pyfuse3.default_options)
    options.update({f"fsname={fsname}", "subtype=rmemfs", "default_permissions"})
    if allow_other:
        options.add("allow_other")
    options.update(o for o in extra if o != "default_permissions")
    return options


def mount(ops: Operations, mountpoint: str, options: set[str]) -> None:
    """Mount (RuntimeError if the kernel refuses)."""
    pyfuse3.init(ops, mountpoint, options)


async def serve_requests() -> None:
    """Serve FUSE requests until the filesystem is unmounted or ``terminate`` is called."""
    await pyfuse3.main()


def terminate() -> None:
    pyfuse3.terminate()


def close(*, unmount: bool) -> None:
    pyfuse3.close(unmount=unmount)
