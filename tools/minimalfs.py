#!/usr/bin/env python3
"""The smallest pyfuse3 filesystem that databases run on: the ceiling of any pyfuse3 filesystem here.

    tools/minimalfs.py [--writeback] STORE_DIR MOUNTPOINT

One flat directory; each file is one file in STORE_DIR (put it on /dev/shm), read and written with
pread/pwrite. No dirty tracking, no journal, no baselines, no recovery: what is left is the cost of
the FUSE round trip through pyfuse3 and trio, which rmemfs pays as well. Runs in the foreground until
unmounted (fusermount3 -u); prints "ready" on stdout once mounted. Exit codes: 0 unmounted, 2 bad
arguments. For benchmarks only (tools/bench --only databases).
"""
from __future__ import annotations

import argparse
import errno
import os
import stat
import sys
from pathlib import Path

import pyfuse3
import trio

ROOT_INO = pyfuse3.ROOT_INODE
TIMEOUT = 300.0


class MinimalFS(pyfuse3.Operations):
    supports_dot_lookup = True

    def __init__(self, store: Path, writeback: bool) -> None:
        super().__init__()
        self.store = store
        self.enable_writeback_cache = writeback
        self.names: dict[bytes, int] = {}           # name -> inode
        self.paths: dict[int, str] = {}             # inode -> backing file
        self.fds: dict[int, int] = {}               # inode -> the one fd used for all I/O
        self.next_ino = ROOT_INO + 1

    def _attrs(self, ino: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        if ino == ROOT_INO:
            st = os.stat(self.store)
        elif ino in self.fds:
            st = os.fstat(self.fds[ino])
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        a.st_ino = ino
        a.st_mode, a.st_nlink, a.st_uid, a.st_gid = st.st_mode, st.st_nlink, st.st_uid, st.st_gid
        a.st_size, a.st_blksize, a.st_blocks = st.st_size, 4096, st.st_blocks
        a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns
        a.entry_timeout = a.attr_timeout = TIMEOUT
        return a

    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if name in (b".", b".."):
            return self._attrs(ROOT_INO)
        if parent_inode != ROOT_INO or name not in self.names:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(self.names[name])

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(inode)

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        fd = self.fds.get(inode)
        if fd is None:
            return self._attrs(inode)
        if fields.update_size:
            os.ftruncate(fd, attr.st_size)
        if fields.update_mode:
            os.fchmod(fd, stat.S_IMODE(attr.st_mode))
        if fields.update_mtime or fields.update_atime:
            st = os.fstat(fd)
            os.utime(fd, ns=(attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                             attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns))
        return self._attrs(inode)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if inode != ROOT_INO:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = sorted(self.names.items(), key=lambda kv: kv[1])
        for name, ino in entries:
            if ino <= start_id:
                continue
            if not pyfuse3.readdir_reply(token, name, self._attrs(ino), ino):
                return

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        if parent_inode != ROOT_INO:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if name in self.names:
            ino = self.names[name]
        else:
            ino = self.next_ino
            self.next_ino += 1
            path = str(self.store / f"f{ino}")
            self.fds[ino] = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, stat.S_IMODE(mode))
            self.names[name], self.paths[ino] = ino, path
        return pyfuse3.FileInfo(fh=ino), self._attrs(ino)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if inode not in self.fds:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if flags & os.O_TRUNC:
            os.ftruncate(self.fds[inode], 0)
        return pyfuse3.FileInfo(fh=inode)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return os.pread(self.fds[fh], size, off)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return os.pwrite(self.fds[fh], buf, off)

    async def flush(self, fh: int) -> None:
        pass

    async def fsync(self, fh: int, datasync: bool) -> None:
        pass            # the store is tmpfs: nothing further to make durable

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        pass

    async def release(self, fh: int) -> None:
        pass

    async def releasedir(self, fh: int) -> None:
        pass

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        ino = self.names.pop(name, None)
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        # The inode stays usable through open handles (SQLite's DELETE journal unlinks while open);
        # forget() would free it, this benchmark filesystem simply keeps it.
        os.unlink(self.paths[ino])

    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes,
                     flags: int, ctx: pyfuse3.RequestContext) -> None:
        ino = self.names.pop(name_old, None)
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        self.names.pop(name_new, None)
        self.names[name_new] = ino

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = os.statvfs(self.store)
        s = pyfuse3.StatvfsData()
        for k in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree", "f_favail"):
            setattr(s, k, getattr(st, k))
        s.f_namemax = 255
        return s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--writeback", action="store_true", help="let the kernel cache writes (writeback_cache)")
    ap.add_argument("store", type=Path)
    ap.add_argument("mountpoint", type=Path)
    args = ap.parse_args(argv)
    if not args.store.is_dir() or not args.mountpoint.is_dir():
        print(f"minimalfs: {args.store} and {args.mountpoint} must be existing directories", file=sys.stderr)
        return 2
    ops = MinimalFS(args.store, args.writeback)
    options = set(pyfuse3.default_options)
    options.add("fsname=minimalfs")
    options.add("default_permissions")     # as rmemfs mounts: the kernel checks permissions
    pyfuse3.init(ops, str(args.mountpoint), options)
    print("ready", flush=True)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
