"""rmemfs-exporter: the region exporter process (started by rmemfs; rarely run by hand).

Exit codes: 0 stopped normally, 1 unexpected error, 2 usage, 10 backend unreadable, 15 cannot listen,
16 backend unreachable.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import trio

from ..errors import BackendError, CorruptionError, QuietError, backend_failed
from ..exits import EXIT_EXPORTER
from ..exporter import DEFAULT_PORT, Exporter
from ..store import open_store, parse_store_options
from .common import first_of, run_main, setup_logging


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="rmemfs-exporter", description=__doc__.splitlines()[0])
    p.add_argument("--region-dir", required=True, type=Path, help="the filesystem's region directory")
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
        exporter = Exporter(args.region_dir, fsid, secret, args.listen, args.port)
        try:
            trio.run(exporter.run)
        except (OSError, BaseExceptionGroup) as e:
            oserr = first_of(e, OSError)
            if oserr is None:
                raise
            raise QuietError(f"cannot serve on {args.listen}:{args.port}: {oserr.strerror or oserr}", EXIT_EXPORTER) from None
        return 0

    run_main("rmemfs-exporter", body)


if __name__ == "__main__":
    main()
