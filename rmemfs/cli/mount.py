"""rmemfs: mount a recoverable memory filesystem whose baselines live in a backend (a directory or RADOS).

Exit codes: 0 mounted (daemon) or cleanly unmounted (-f); 1 unexpected error;
2 usage; 10 backend missing, unwritable, foreign or corrupt (a missing pool, refused
credentials); 11 backend not unmounted cleanly (run rmemfs-recover); 12 mountpoint missing
or busy; 13 not root or no /dev/fuse; 14 region directory unusable; 15 exporter failed;
16 backend unreachable (a RADOS cluster that did not answer in time).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from collections.abc import Callable

import trio

from .. import metrics
from ..errors import CommandError, QuietError
from ..exits import EXIT_BACKEND, EXIT_ERROR, EXIT_USAGE
from ..host import check_environment, check_mountpoint
from ..launch import ExporterLaunch, StartUp, undo_failed_start
from ..opening import Opened, open_backend
from ..options import OPTION_HELP, MountOptions, parse_options
from ..session import Session, serve
from ..sdnotify import notify
from ..store import backend_spec
from .common import exit_code, run_main, setup_logging

log = logging.getLogger(__name__)


def option_epilog() -> str:
    lines = ["mount options (-o name[=value],...):"]
    lines += [f"  {name:<20} {text}" for name, text in OPTION_HELP.items()]
    lines += ["", __doc__.split("\n\n", 1)[1]]
    return "\n".join(lines)


def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description, epilog=option_epilog(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", required=True, type=backend_spec,
                   help="the baseline store the hosts share: a directory, or rados:POOL[/PREFIX] "
                        "(with -o ceph_conf=PATH,ceph_id=NAME)")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTS",
                   help="comma-separated mount options (see below)")
    p.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground (default: daemonize "
                   "once the mount is usable)")
    p.add_argument("--log", type=Path, help="log file (default: stderr with -f, else <regiondir>/rmemfs.log)")
    p.add_argument("--debug", action="store_true", help="verbose logging")
    p.add_argument("mountpoint", type=Path)
    return p


Ready = Callable[[str], None]


def daemonize_and_run(foreground: bool, work: Callable[[Ready], int],
                      on_ready: Callable[[str], None] = lambda note: None) -> int:
    """Run ``work(ready)``; without -f, fork first and let the parent return 0 only once the child calls
    ``ready(note)``, or raise the child's one-line error and exit code. ``on_ready(note)`` runs in the
    process the user sees, once the mount is usable."""
    if foreground:
        return work(on_ready)
    r, w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(w)
        with os.fdopen(r, "rb") as pipe:
            msg = pipe.read().decode(errors="replace")
        if msg.startswith("OK"):
            on_ready(msg[2:].strip())
            return 0
        _, pid_status = os.waitpid(pid, 0)
        status, _, text = msg.partition(" ")
        if not status.isdigit():
            raise QuietError(f"daemon exited before the mount was ready (status {pid_status})", EXIT_ERROR)
        raise QuietError(text.strip(), int(status))
    # Child: a daemon in its own session; the parent is told how it went through the pipe.
    os.close(r)
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    reported = False

    def ready(note: str = "") -> None:
        nonlocal reported
        os.write(w, f"OK {note}\n".encode())
        os.close(w)
        reported = True

    try:
        code = work(ready)
    except CommandError as e:
        if not reported:
            os.write(w, f"{exit_code(e)} {e}\n".encode())
        log.error("%s", e)
        os._exit(exit_code(e))
    except BaseException as e:
        log.exception("daemon failed")
        if not reported:
            os.write(w, f"{EXIT_ERROR} {e}\n".encode())
        os._exit(EXIT_ERROR)
    os._exit(code)


def daemon_log(args: argparse.Namespace, region_dir: Path) -> Path | None:
    """--log, else stderr in the foreground, else rmemfs.log in the region directory."""
    return args.log or (None if args.foreground else region_dir / "rmemfs.log")


def exporter_log(log_file: Path | None) -> Path | None:
    return log_file.with_name("exporter.log") if log_file else None


def run_session(opened: Opened, mountpoint: Path, opts: MountOptions, log_file: Path | None, debug: bool,
                mounted: Callable[[], None], exporter_port: int | None = None) -> int:
    """In the (possibly daemonized) serving process: start the exporter (unless the caller already did
    and passes its port), then serve until unmounted."""
    if log_file:
        setup_logging(debug, log_file)
    startup = StartUp(opened.region_dir)
    with undo_failed_start(startup):
        port = exporter_port
        if port is None:
            startup.launch = ExporterLaunch(opened.region_dir, opened.backend.spec, opened.fs.fsid, opts,
                                            exporter_log(log_file))
            port = startup.launch.ready()
        session = Session(opened, mountpoint, opts, port, startup)
        if opts.metrics:
            try:
                metrics.serve(opts.metrics, metrics.filesystem_metrics(session))
            except OSError as e:
                raise QuietError(f"cannot serve metrics on {opts.metrics}: {e}", EXIT_USAGE) from None
        clean = trio.run(lambda: serve(session, on_ready=mounted))
    return 0 if clean else EXIT_BACKEND     # a failed final flush: logged by serve


def main(argv: list[str] | None = None) -> None:
    args = build_parser("rmemfs", __doc__.splitlines()[0]).parse_args(argv)

    def body() -> int:
        setup_logging(args.debug, args.log if args.log else None)
        opts = parse_options(args.options)
        check_environment()
        mountpoint = args.mountpoint.absolute()
        check_mountpoint(mountpoint)
        opened = open_backend(args.backend, opts, mountpoint)
        log_file = daemon_log(args, opened.region_dir)

        def work(ready: Ready) -> int:
            def mounted() -> None:
                ready("")
                notify("READY=1")     # systemd Type=notify (with -f): the mount is usable

            return run_session(opened, mountpoint, opts, log_file, args.debug, mounted=mounted)

        return daemonize_and_run(args.foreground, work)

    run_main("rmemfs", body)


if __name__ == "__main__":
    main()
    sys.exit(0)
