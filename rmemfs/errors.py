"""Domain exceptions shared by the core, the tools and the transports.

The core raises these (or ``FsError`` carrying an errno); only ``fs.py`` turns
them into ``pyfuse3.FUSEError``, and only ``cli/`` turns ``QuietError`` into an
exit code.
"""
from __future__ import annotations

import errno


class RmemfsError(Exception):
    """Base of every rmemfs-specific error."""


class QuietError(RmemfsError):
    """A failure to report as one line, without a traceback, and exit with ``exitcode``."""

    def __init__(self, msg: str, exitcode: int = 1) -> None:
        super().__init__(msg)
        self.exitcode = exitcode


class FsError(RmemfsError):
    """A filesystem operation failed with a POSIX errno."""

    def __init__(self, errno_: int, msg: str = "") -> None:
        super().__init__(errno_, msg or errno.errorcode.get(errno_, str(errno_)))
        self.errno = errno_


class CorruptionError(RmemfsError):
    """Stored or in-memory data failed a format or checksum check."""


class BackendError(RmemfsError):
    """The backend directory is unusable (missing, foreign, fenced, ...)."""


class FencedError(BackendError):
    """A newer owner (epoch) has taken over this filesystem's backend."""
