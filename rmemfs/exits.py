"""Every exit code of every rmemfs command, in one table (README.md's tables are checked against it).

A command fails by raising a typed ``errors.CommandError``; ``cli/common.py`` maps its type to one
of these codes (``EXIT_OF``; a ``QuietError`` of ``cli/`` names its code), prints the message as one
line and exits with the code. The library never picks a code. Codes 0-9 are shared conventions, 10-19
concern the local host and the backend, 20-29 the recovery's source.

rmemfs-standby exits with its own codes while it watches (0 stopped, 1, 2, 10, 12, 13, 16, 21, 22, 24)
and, once it has taken over, with rmemfs-recover's (the recovery runs in its process): all of them but
23 and 27, which need what the standby never asks for (a liveness check, --verify).
"""
from __future__ import annotations

from dataclasses import dataclass

MOUNT, RECOVER, CTL, STANDBY = "rmemfs", "rmemfs-recover", "rmemfs-ctl", "rmemfs-standby"


@dataclass(frozen=True)
class ExitCode:
    code: int
    commands: frozenset[str]
    meaning: str


def _code(code: int, meaning: str, *commands: str) -> int:
    TABLE.append(ExitCode(code, frozenset(commands), meaning))
    return code


TABLE: list[ExitCode] = []

EXIT_ERROR = _code(1, "unexpected error", MOUNT, RECOVER, CTL, STANDBY)
EXIT_USAGE = _code(2, "usage", MOUNT, RECOVER, CTL, STANDBY)
EXIT_CTL_UNREACHABLE = _code(3, "not an rmemfs mount, or its process is unreachable", CTL)
EXIT_CTL_FLUSH = _code(4, "a flush (or umount's final flush) failed or timed out", CTL)
EXIT_CTL_VERIFY = _code(5, "verify found problems", CTL)
EXIT_CTL_RETIRE = _code(6, "--retire refused: the memory may still hold the only copy of something", CTL)
EXIT_CTL_BUSY = _code(7, "umount refused (busy)", CTL)
EXIT_BACKEND = _code(10, "backend missing, unwritable, foreign or corrupt", MOUNT, RECOVER, CTL, STANDBY)
EXIT_UNCLEAN = _code(11, "backend not unmounted cleanly: run rmemfs-recover", MOUNT)
EXIT_MOUNTPOINT = _code(12, "mountpoint missing or busy", MOUNT, RECOVER, STANDBY)
EXIT_ENVIRONMENT = _code(13, "not root, or no /dev/fuse", MOUNT, RECOVER, STANDBY)
EXIT_REGIONS = _code(14, "region directory unusable", MOUNT, RECOVER, STANDBY)
EXIT_EXPORTER = _code(15, "exporter failed to start", MOUNT, RECOVER, STANDBY)
EXIT_BACKEND_UNREACHABLE = _code(16, "backend unreachable: its cluster did not answer in time", MOUNT, RECOVER, CTL,
                                 STANDBY)
EXIT_UNREACHABLE = _code(20, "source unreachable or timed out", RECOVER, STANDBY)
EXIT_AUTH = _code(21, "authentication failed (wrong secret)", RECOVER, STANDBY)
EXIT_FSID = _code(22, "filesystem id mismatch", RECOVER, STANDBY)
EXIT_ALIVE = _code(23, "the source filesystem is still alive", RECOVER)
EXIT_TRANSPORT = _code(24, "transport unavailable or failed", RECOVER, STANDBY)
EXIT_EPOCH = _code(25, "the source's memory belongs to another epoch", RECOVER, STANDBY)
EXIT_NAMESPACE = _code(26, "the rebuilt namespace is inconsistent", RECOVER, STANDBY)
EXIT_VERIFY = _code(27, "--verify found a mismatch", RECOVER)
EXIT_CAPACITY = _code(28, "the fetched pages do not fit the new dirty list", RECOVER, STANDBY)
EXIT_FENCE = _code(29, "the source's exporter would not fence it", RECOVER, STANDBY)


def codes_of(command: str) -> dict[int, ExitCode]:
    """The failure codes a command can exit with (0, success, is implied)."""
    return {e.code: e for e in TABLE if command in e.commands}
