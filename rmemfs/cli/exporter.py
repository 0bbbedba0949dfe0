"""rmemfs-exporter: the region exporter process (started by rmemfs; rarely run by hand).

Exit codes: 0 stopped normally (or, with --await-region-dir, its stdin closed before a hand-off),
1 unexpected error, 2 usage, 10 backend unreadable, 15 cannot listen, 16 backend unreachable.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import trio

from ..errors import BackendError, CorruptionError, QuietError, backend_failed
from ..exits import EXIT_EXPORTER, EXIT_USAGE
from ..exporter import DEFAULT_PORT, Exporter
from ..store import open_store, parse_store_options
from ..transport import load as load_transport
from ..transport.base import TransportUnavailable
from .common import first_of, run_main, setup_logging


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="rmemfs-exporter", description=__doc__.splitlines()[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--region-dir", type=Path, help="the filesystem's region directory")
    where.add_argument("--await-region-dir", action="store_true",
                       help="started ahead by rmemfs-standby: open the backend and load the transports, then read "
                       'one JSON line on stdin ({"region_dir", "listen", "port", "log"}) and serve; end of file '
                       "before it exits 0")
    p.add_argument("--backend", required=True, help="the backend (for the fsid and secret): a directory or "
                   "rados:POOL[/PREFIX]")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTS",
                   help="the backend's options: ceph_conf=PATH,ceph_id=NAME")
    p.add_argument("--listen", default="127.0.0.1", help="address to serve on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"TCP port (default {DEFAULT_PORT}; 0 = any)")
    p.add_argument("--log", type=Path, help="log file (default stderr)")
    p.add_argument("--debug", action="store_true")
    args = p.parse_args(argv)

    def body() -> int:
        setup_logging(args.debug, args.log)
        try:
            backend = open_store(args.backend, parse_store_options(args.options))
            fsid, secret = backend.fsid(), backend.secret()
        except (BackendError, CorruptionError) as e:
            raise backend_failed(e) from None
        region_dir, listen, port = args.region_dir, args.listen, args.port
        if args.await_region_dir:
            handed = await_hand_off()
            if handed is None:
                return 0
            region_dir, listen, port, log_file = handed
            # What names it as this directory's exporter (exporter.serves): its command line cannot.
            os.chdir(region_dir)
            if log_file is not None:
                setup_logging(args.debug, log_file)
        exporter = Exporter(region_dir, fsid, secret, listen, port)
        try:
            trio.run(exporter.run)
        except (OSError, BaseExceptionGroup) as e:
            oserr = first_of(e, OSError)
            if oserr is None:
                raise
            raise QuietError(f"cannot serve on {listen}:{port}: {oserr.strerror or oserr}", EXIT_EXPORTER) from None
        return 0

    run_main("rmemfs-exporter", body)


def await_hand_off() -> tuple[Path, str, int, Path | None] | None:
    """The prepared exporter's wait: the transports' modules are imported now (the takeover should not
    pay for them), then stdin names the region directory. None: stdin closed (no takeover)."""
    for name in ("software", "verbs"):
        try:
            load_transport(name)
        except TransportUnavailable:
            pass
    line = sys.stdin.readline()
    if not line.strip():
        return None
    try:
        spec = json.loads(line)
        return (Path(spec["region_dir"]), str(spec["listen"]), int(spec["port"]),
                Path(spec["log"]) if spec.get("log") else None)
    except (ValueError, KeyError, TypeError) as e:
        raise QuietError(f"unusable region directory hand-off on stdin ({e}): {line.strip()[:200]}", EXIT_USAGE) from None


if __name__ == "__main__":
    main()
