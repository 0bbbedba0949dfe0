"""What every rmemfs command shares: logging set-up and one-line failures with exit codes."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import NoReturn, TypeVar
from collections.abc import Callable

from ..errors import QuietError
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


E = TypeVar("E", bound=BaseException)


def first_of(exc: BaseException, kind: type[E]) -> E | None:
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
    """Run a command body; QuietError becomes one line on stderr and its exit code."""
    try:
        code = body()
    except QuietError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(e.exitcode)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:   # a bug: one line for the user, the traceback in the log at debug level
        log.debug("unexpected failure", exc_info=True)
        print(f"{prog}: error: unexpected {type(e).__name__}: {e} (--debug shows the traceback)", file=sys.stderr)
        sys.exit(1)
    sys.exit(code)
