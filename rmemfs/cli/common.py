"""What every rmemfs command shares: logging set-up and one-line failures with exit codes."""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Callable, NoReturn

from ..errors import QuietError

log = logging.getLogger(__name__)


def setup_logging(debug: bool = False, log_file: Path | None = None, quiet: bool = False) -> None:
    root = logging.getLogger()
    root.handlers.clear()
    handler: logging.Handler
    if log_file:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file)
        handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(name)s %(levelname)s: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(name)s: %(levelname)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO)
    if not debug:
        logging.getLogger("pyfuse3").setLevel(logging.WARNING)


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
    sys.exit(code)
