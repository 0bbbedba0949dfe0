"""Domain exceptions shared by the core, the tools and the transports.

The core raises these (or ``FsError`` carrying an errno); only ``fs.py`` turns
them into ``pyfuse3.FUSEError``, and only ``cli/`` turns a ``CommandError`` into
an exit code (``cli/common.py`` maps each type to a code of ``exits.py``): the
library (recovery, and what it calls) raises a typed error and never picks a
code itself.
"""
from __future__ import annotations

import errno


class RmemfsError(Exception):
    """Base of every rmemfs-specific error."""


class CommandError(RmemfsError):
    """A failure a command reports as one line, without a traceback; its type decides the exit code."""


class QuietError(CommandError):
    """A command-line failure that names its own exit code (``cli/`` and the mount's set-up only)."""

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


class StoreUnreachable(BackendError):
    """The store's servers did not answer in time (a RADOS cluster down, its monitors unreachable)."""


class FencedError(BackendError):
    """A newer owner (epoch) has taken over this filesystem's backend."""


class BackendFailed(CommandError):
    """The backend is missing, unwritable, foreign, or a baseline file of it is missing or corrupt."""


class BackendUnreachable(BackendFailed):
    """The backend's servers did not answer in time (a RADOS cluster down): try again once it is up."""


def backend_failed(e: BackendError | CorruptionError) -> BackendFailed:
    """The command error for a store's error (its message as is)."""
    return BackendUnreachable(str(e)) if isinstance(e, StoreUnreachable) else BackendFailed(str(e))


class RegionsFailed(CommandError):
    """The new region directory or its region files cannot be made."""


class UsageError(CommandError):
    """A bad option or argument."""


class HostUnfit(CommandError):
    """Not root, or no usable /dev/fuse."""


class MountpointUnusable(CommandError):
    """The mountpoint is missing, not a directory, busy, or cannot be mounted."""


class BackendUnclean(CommandError):
    """The backend was not unmounted cleanly (or is in use): it needs rmemfs-recover, not a mount."""


class ExporterFailed(CommandError):
    """The exporter of the new regions did not start."""


class RecoveryError(CommandError):
    """A recovery refused or failed because of its source, or its result. (``recover`` raises these, and
    ``BackendFailed``/``RegionsFailed``.) The message is one line for the user; the subclass says why."""


class SourceUnreachable(RecoveryError):
    """The source's exporter cannot be reached (host down, partitioned, or timed out)."""


class AuthFailed(RecoveryError):
    """The source's exporter refused the backend's secret."""


class SourceFsidMismatch(RecoveryError):
    """The source exports another filesystem than the backend holds."""


class SourceAlive(RecoveryError):
    """The source's heartbeat still advances: it is not taken over."""


class TransportFailed(RecoveryError):
    """The transport is unavailable, or failed while reading from the source."""


class EpochMismatch(RecoveryError):
    """The source's memory, or the backend, belongs to another epoch: someone else recovered or remounted it."""


class NamespaceInconsistent(RecoveryError):
    """The rebuilt namespace fails its consistency check."""


class VerifyFailed(RecoveryError):
    """``verify``: a recovered page differs from the source or from its baseline checksum."""


class CapacityExceeded(RecoveryError):
    """The fetched pages do not fit the new filesystem's dirty list."""


class FenceFailed(RecoveryError):
    """The source's exporter would not fence it."""
