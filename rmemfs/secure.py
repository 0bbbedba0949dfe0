"""Safe local files in directories other users may reach (issue 15 item 1).

A region directory sits in a world-writable sticky directory (/dev/shm), and its name is public (the
fsid is in fs.json), so another local user can create it first and fill it with symlinks and planted
files. ``private_dir`` makes sure we only ever work in a real directory owned by us with mode 0700:
inside such a directory nobody else can create, replace or rename anything, so what we find there was
written by us. The helpers below add O_NOFOLLOW (and O_EXCL for temp files) as a second line.
"""
from __future__ import annotations

import logging
import os
import stat
import time
from pathlib import Path

log = logging.getLogger(__name__)

_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


def private_dir(path: Path) -> None:
    """Make ``path`` a real directory owned by this euid with mode 0700.

    Absent: created 0700. Ours and writable by nobody else: tightened to 0700. Anything else (another
    owner, a symlink, not a directory, group/other-writable) is not trusted: it is renamed aside to
    ``<name>.foreign-<time>`` (rename does not follow symlinks; root may rename in a sticky directory) with
    a warning, and a fresh directory is created. Raises OSError when that cannot be done."""
    for _ in range(5):
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            try:
                os.mkdir(path, 0o700)
            except FileExistsError:   # someone raced us: look again
                continue
            st = os.lstat(path)
        if (stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid()
                and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)):
            if stat.S_IMODE(st.st_mode) != 0o700:
                os.chmod(path, 0o700, follow_symlinks=False)
            return
        aside = path.with_name(f"{path.name}.foreign-{time.time_ns()}")
        log.warning("%s is not a private directory of uid %d (owner uid %d, mode %o): moved it aside to %s "
                    "and created a fresh one", path, os.geteuid(), st.st_uid, st.st_mode, aside)
        os.rename(path, aside)
    raise OSError(f"{path} keeps being re-created by someone else; check who writes to {path.parent}")


def open_nofollow(path: Path, flags: int, mode: int = 0o600) -> int:
    """os.open that refuses a symlink as the last component."""
    return os.open(path, flags | _NOFOLLOW, mode)


def open_log(path: Path) -> int:
    """An append descriptor for a log file that is never a symlink and is a regular file of ours."""
    fd = open_nofollow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        os.close(fd)
        raise OSError(f"log file {path} is not a regular file owned by uid {os.geteuid()}")
    return fd


def read_private(path: Path) -> bytes:
    """Contents of a regular file of ours (no symlink, no other owner's file)."""
    fd = open_nofollow(path, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            raise OSError(f"{path} is not a regular file owned by uid {os.geteuid()}")
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)
