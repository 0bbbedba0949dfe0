"""Checks of the host before a mount: root, a usable /dev/fuse, and a mountpoint that exists, is a
directory and holds no mount (a dead FUSE mount is named with the command that clears it)."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from .errors import HostUnfit, MountpointUnusable

log = logging.getLogger(__name__)


def check_environment() -> None:
    if os.geteuid() != 0:
        raise HostUnfit("rmemfs must run as root (it mounts FUSE and maps shared memory regions)")
    if not os.path.exists("/dev/fuse"):
        raise HostUnfit("/dev/fuse is missing: load the fuse module (modprobe fuse) or run where FUSE exists")
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as e:
        raise HostUnfit(f"/dev/fuse cannot be opened: {e.strerror}") from None


def check_mountpoint(path: Path) -> None:
    if not path.exists():
        # A dead FUSE mount (ENOTCONN) also looks missing; say how to clear it.
        if is_mounted(path):
            raise MountpointUnusable(f"mountpoint {path} holds a dead mount: run fusermount3 -u -z {path}")
        raise MountpointUnusable(f"mountpoint {path} does not exist: create it first")
    if not path.is_dir():
        raise MountpointUnusable(f"mountpoint {path} is not a directory")
    if is_mounted(path):
        raise MountpointUnusable(f"mountpoint {path} is busy: something is already mounted there")


def is_mounted(path: Path) -> bool:
    target = os.path.abspath(path)
    try:
        with open("/proc/self/mountinfo") as f:
            return any(line.split()[4] == target for line in f)
    except OSError:
        return False
