"""What every rmemfs command shares: logging set-up and one-line failures with exit codes."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import NoReturn, TypeVar
from collections.abc import Callable, Collection

from .. import errors as E
from .. import exits as X
from ..secure import open_log

log = logging.getLogger(__name__)


def setup_logging(debug: bool = False, log_file: Path | None = None, quiet: bool = False) -> None:
    root = logging.getLogger()
    root.handlers.clear()
    handler: logging.Handler
    if log_file:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        # never through a symlink, never another user's file (the log may sit in the region directory)
        handler = logging.StreamHandler(os.fdopen(open_log(log_file), "a", buffering=1))
        handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(name)s %(levelname)s: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(name)s: %(levelname)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO)
    if not debug:
        logging.getLogger("pyfuse3").setLevel(logging.WARNING)


# The one place an error's type becomes an exit code (the codes are exits.py's table).
EXIT_OF: tuple[tuple[type[E.CommandError], int], ...] = (
    (E.UsageError, X.EXIT_USAGE), (E.HostUnfit, X.EXIT_ENVIRONMENT), (E.MountpointUnusable, X.EXIT_MOUNTPOINT),
    (E.BackendUnreachable, X.EXIT_BACKEND_UNREACHABLE), (E.BackendFailed, X.EXIT_BACKEND),
    (E.BackendUnclean, X.EXIT_UNCLEAN), (E.RegionsFailed, X.EXIT_REGIONS),
    (E.ExporterFailed, X.EXIT_EXPORTER), (E.SourceUnreachable, X.EXIT_UNREACHABLE), (E.AuthFailed, X.EXIT_AUTH),
    (E.SourceFsidMismatch, X.EXIT_FSID), (E.SourceAlive, X.EXIT_ALIVE), (E.TransportFailed, X.EXIT_TRANSPORT),
    (E.EpochMismatch, X.EXIT_EPOCH), (E.NamespaceInconsistent, X.EXIT_NAMESPACE), (E.VerifyFailed, X.EXIT_VERIFY),
    (E.CapacityExceeded, X.EXIT_CAPACITY), (E.FenceFailed, X.EXIT_FENCE))


def exit_code(e: E.CommandError) -> int:
    """The exit code for a command's one-line failure."""
    if isinstance(e, E.QuietError):
        return e.exitcode
    for kind, code in EXIT_OF:
        if isinstance(e, kind):
            return code
    return X.EXIT_ERROR


def take_options(items: list[str], keys: Collection[str]) -> tuple[dict[str, str], list[str]]:
    """The ``key=VALUE`` options named by ``keys`` out of the -o lists (a command's own options, such as
    rmemfs-recover's fence_cmd or the standby's, not mount options), and the rest, one item each, in order.
    A key given without a value is a usage error (exit 2)."""
    mine: dict[str, str] = {}
    rest: list[str] = []
    for item in items:
        for part in item.split(","):
            key, sep, value = part.partition("=")
            if key in keys:
                if not sep or not value:
                    raise E.UsageError(f"option {key} needs a value")
                mine[key] = value
            elif part:
                rest.append(part)
    return mine, rest


T = TypeVar("T", bound=BaseException)


def first_of(exc: BaseException, kind: type[T]) -> T | None:
    """The first exception of ``kind`` in ``exc`` or, for trio's exception groups, inside it."""
    if isinstance(exc, kind):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            found = first_of(sub, kind)
            if found is not None:
                return found
    return None


def run_main(prog: str, body: Callable[[], int]) -> NoReturn:
    """Run a command body; a CommandError becomes one line on stderr and its exit code."""
    try:
        code = body()
    except E.CommandError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(exit_code(e))
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)       # the shell's convention for a SIGINT (128 + 2), not a code of exits.TABLE
    except Exception as e:   # a bug: one line for the user, the traceback in the log at debug level
        log.debug("unexpected failure", exc_info=True)
        print(f"{prog}: error: unexpected {type(e).__name__}: {e} (--debug shows the traceback)", file=sys.stderr)
        sys.exit(X.EXIT_ERROR)
    sys.exit(code)
