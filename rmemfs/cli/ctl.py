"""rmemfs-ctl: control and inspect a mounted rmemfs, and verify a backend.

  rmemfs-ctl flush MOUNTPOINT          flush a baseline now and wait for it to be published
  rmemfs-ctl umount MOUNTPOINT         unmount, and wait until the final baseline is published
  rmemfs-ctl stats MOUNTPOINT [--json] dirty pages per list, last generation, flush figures, regions
  rmemfs-ctl verify --backend B [-o ceph_conf=PATH,ceph_id=NAME]
                                       check the latest baseline against its checksums (B: a directory,
                                       or rados:POOL[/PREFIX]; -o: its options, also for orphans, exporter)
  rmemfs-ctl orphans --backend B [--remove]
                                       region directories of that filesystem on this host that nothing
                                       maps or needs (an old recovery's <dir>.e<epoch>); or remove them
  rmemfs-ctl exporter --backend B [--stop | --retire]
                                       status of this host's exporter for that filesystem; or stop it;
                                       or, once another host owns the filesystem, stop it and free its memory
  rmemfs-ctl standby status MOUNTPOINT [--json]
                                       the standby watching for MOUNTPOINT: source, heartbeat age, state,
                                       last detection time

Exit codes: 0 success; 1 unexpected error; 2 usage; 3 not an rmemfs mount or not
reachable; 4 the flush (for umount: the final flush) failed or did not finish in
time; 5 verify found problems; 6 --retire refused (the memory may still be needed,
or a live process still maps it; the message says why); 7 the unmount was refused (busy); 10 backend unreadable;
16 backend unreachable (a RADOS cluster that did not answer in time).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from .. import control
from ..errors import BackendError, CorruptionError, QuietError, backend_failed
from ..exits import (EXIT_CTL_BUSY, EXIT_CTL_FLUSH, EXIT_CTL_RETIRE, EXIT_CTL_UNREACHABLE,
                     EXIT_CTL_VERIFY)
from ..exporter import SOCKET_NAME, RetireRefused, orphans, retire, stop_exporter, wait_exited, why_still_needed
from ..store import STATE_CLEAN, BaselineStore, backend_spec, open_store, parse_store_options
from .common import run_main


def control_socket(mountpoint: Path) -> str:
    try:
        path = control.find_control(mountpoint)
    except OSError as e:
        raise QuietError(f"{mountpoint}: {e.strerror}", EXIT_CTL_UNREACHABLE) from None
    if path is None:
        raise QuietError(f"{mountpoint} is not the root of an rmemfs mount", EXIT_CTL_UNREACHABLE)
    return path


def ask(mountpoint: Path, request: dict[str, Any]) -> dict[str, Any]:
    path = control_socket(mountpoint)
    try:
        reply = control.call(path, request)
    except OSError as e:
        raise QuietError(f"cannot reach the rmemfs process of {mountpoint} ({path}): {e}", EXIT_CTL_UNREACHABLE) from None
    return reply


def standby_status(mountpoint: Path) -> dict[str, Any]:
    """The watching standby's status socket, else the status it saved at its takeover."""
    from ..standby import status_file, status_socket
    try:
        return control.call(status_socket(mountpoint), {"op": "standby-status"}, timeout=10)
    except OSError:
        pass
    try:
        return dict(json.loads(status_file(mountpoint).read_text()))
    except (OSError, ValueError):
        raise QuietError(f"no rmemfs-standby watches for {mountpoint}", EXIT_CTL_UNREACHABLE) from None


def format_stats(s: dict[str, Any]) -> str:
    core, fl = s["core"], s["flush"]
    age = time.time() - fl["generation_time_ns"] / 1e9
    lines = [
        f"filesystem {s['fsid']} at {s['mountpoint']} (epoch {s['epoch']}, heartbeat {s['heartbeat']})",
        f"  inodes {core['inodes']}, extents in use {core['used_extents']}, journal {core['journal_bytes']} bytes",
        f"  dirty pages: current list {core['dirty_current_pages']} ({core['dirty_current_entries']} entries), "
        f"flushing list {core['dirty_flushing_pages']} ({core['dirty_flushing_entries']} entries), "
        f"capacity {core['dirty_capacity']} entries per list",
        f"  last baseline: generation {fl['generation']}, {age:.1f} s ago; {fl['segments']} segments, "
        f"{fl['segment_bytes'] / (1 << 20):.1f} MiB, {fl['live_pages']} live pages",
        f"  flushes {fl['flushes']} (failures {fl['failures']}), last {fl['last_duration_s'] * 1000:.1f} ms, "
        f"{fl['last_pages']} pages, {fl['last_bytes'] / (1 << 20):.2f} MiB{' (full)' if fl['last_full'] else ''}; "
        f"{fl['total_bytes'] / (1 << 20):.1f} MiB written in all",
        f"  regions {core['region_count']}: {core['region_virtual_bytes'] / (1 << 20):.0f} MiB virtual, "
        f"{core['region_resident_bytes'] / (1 << 20):.1f} MiB resident",
    ]
    late, gc = s.get("loop_lateness"), s.get("gc")
    if late and gc:
        lines.append(f"  stalls: heartbeat woke up to {late['longest'] * 1000:.1f} ms late ({late['late']} times over "
                     f"{late['threshold'] * 1000:.0f} ms); garbage collector's longest pause {gc['longest'] * 1000:.1f} ms; "
                     f"journal compactions {core['compactions']}, longest loop step "
                     f"{core['compaction_longest_step_s'] * 1000:.1f} ms")
    load = s.get("load")
    if load:
        state = (f"complete in {load['load_seconds']:.1f} s" if load["load_seconds"] is not None
                 else f"{load['load_pages_per_s'] * 4096 / (1 << 20):.0f} MiB/s")
        lines.append(f"  background load: {load['resident_pages']}/{load['total_pages']} pages resident, {state}; "
                     f"{load['demand_waits']} requests waited for a page")
    if fl["last_error"]:
        lines.append(f"  last flush error: {fl['last_error']}")
    if fl["fenced"]:
        lines.append("  FENCED: another host owns this filesystem now; changes are refused")
    return "\n".join(lines)


def unmount_and_wait(mountpoint: Path, timeout: float) -> None:
    """Unmount, then wait for the daemon to publish its final (clean) baseline and exit: only then may
    the host go down without a recovery."""
    info = ask(mountpoint, {"op": "stats"})
    try:
        pid, backend = int(info["pid"]), open_store(info["backend"], info.get("backend_options"))
    except BackendError as e:
        raise backend_failed(e) from None
    proc = subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True, text=True)
    if proc.returncode != 0:
        why = (proc.stderr.strip().splitlines() or ["fusermount3 failed"])[-1]
        raise QuietError(f"cannot unmount {mountpoint}: {why}", EXIT_CTL_BUSY)
    if not wait_exited(pid, timeout):
        raise QuietError(f"{mountpoint} is unmounted, but its final flush (pid {pid}) did not finish within "
                         f"{timeout:g} s; it goes on in the background", EXIT_CTL_FLUSH)
    try:
        manifest = backend.read_manifest()
    except (BackendError, CorruptionError) as e:
        raise backend_failed(e) from None
    if manifest.state != STATE_CLEAN or manifest.owner.get("pid") != pid:
        raise QuietError(f"the final flush of {mountpoint} did not complete (see the log in its region directory): "
                         f"the backend stays marked in use; recover it with rmemfs-recover", EXIT_CTL_FLUSH)
    print(f"unmounted {mountpoint}: final baseline generation {manifest.generation} published")


def backend_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--backend", type=backend_spec, required=True, help="a directory, or rados:POOL[/PREFIX]")
    sp.add_argument("-o", dest="options", action="append", default=[], metavar="OPTS",
                    help="the backend's options: ceph_conf=PATH,ceph_id=NAME (rados: backends)")


def open_backend_arg(args: argparse.Namespace) -> BaselineStore:
    """The store --backend and -o name; its failure is one line (exit 10, or 16: unreachable)."""
    try:
        return open_store(args.backend, parse_store_options(args.options))
    except BackendError as e:
        raise backend_failed(e) from None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="rmemfs-ctl", description=__doc__.splitlines()[0],
                                epilog="\n".join(__doc__.splitlines()[2:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sp = sub.add_parser("flush", help="flush a baseline now and wait for it")
    sp.add_argument("mountpoint", type=Path)
    sp = sub.add_parser("stats", help="print statistics")
    sp.add_argument("mountpoint", type=Path)
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp = sub.add_parser("umount", help="unmount, and wait until the final baseline is published "
                                       "(fusermount3 -u returns before that)")
    sp.add_argument("mountpoint", type=Path)
    sp.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the final flush (default 600)")
    sp = sub.add_parser("verify", help="verify the backend's latest baseline")
    backend_args(sp)
    sp = sub.add_parser("exporter", help="status of this host's exporter for a backend's filesystem")
    backend_args(sp)
    sp.add_argument("--regiondir", type=Path, help="region directory (default /dev/shm/rmemfs-<fsid>)")
    act = sp.add_mutually_exclusive_group()
    act.add_argument("--stop", action="store_true", help="stop it; its region files (the memory) stay")
    act.add_argument("--retire", action="store_true",
                     help="on a failed host, once another host has recovered the filesystem and published a "
                          "baseline of its own: stop the exporter and free the memory (refused before that)")
    sp = sub.add_parser("orphans", help="list (or --remove) this host's region directories of a backend's "
                                        "filesystem that nothing needs")
    backend_args(sp)
    sp.add_argument("--regiondir", type=Path, help="region directory (default /dev/shm/rmemfs-<fsid>); its "
                    "<name>.e<epoch> siblings are the candidates, with it")
    sp.add_argument("--remove", action="store_true", help="remove them")
    sp = sub.add_parser("standby", help="a standby's view of the source it watches for MOUNTPOINT")
    sp.add_argument("action", choices=("status",))
    sp.add_argument("mountpoint", type=Path)
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    args = p.parse_args(argv)

    def body() -> int:
        if args.command == "flush":
            t = time.monotonic()
            reply = ask(args.mountpoint, {"op": "flush"})
            if not reply.get("ok"):
                raise QuietError(f"flush failed: {reply.get('error')}", EXIT_CTL_FLUSH)
            print(f"published generation {reply['generation']} in {(time.monotonic() - t) * 1000:.1f} ms")
        elif args.command == "umount":
            unmount_and_wait(args.mountpoint.absolute(), args.timeout)
        elif args.command == "stats":
            reply = ask(args.mountpoint, {"op": "stats"})
            print(json.dumps(reply, indent=1) if args.json else format_stats(reply))
        elif args.command == "verify":
            backend = open_backend_arg(args)
            try:
                manifest = backend.read_manifest()
                problems = backend.verify(manifest)
            except (BackendError, CorruptionError) as e:
                raise backend_failed(e) from None
            for problem in problems:
                print(problem)
            if problems:
                raise QuietError(f"{len(problems)} problems in generation {manifest.generation}", EXIT_CTL_VERIFY)
            pages = sum(s.entries for s in manifest.segments)
            print(f"generation {manifest.generation} (epoch {manifest.epoch}, {manifest.state}) verified: "
                  f"{len(manifest.segments)} segments, {pages} page entries, {manifest.live_pages} live pages")
        elif args.command == "standby":
            reply = standby_status(args.mountpoint)
            print(json.dumps(reply, indent=1) if args.json else
                  " ".join(f"{k}={v}" for k, v in reply.items() if k != "ok"))
        elif args.command == "orphans":
            backend = open_backend_arg(args)
            try:
                base = args.regiondir or Path(f"/dev/shm/rmemfs-{backend.fsid()}")
                found = orphans(backend, base)
            except (BackendError, CorruptionError) as e:
                raise backend_failed(e) from None
            for path in found:
                if args.remove:
                    shutil.rmtree(path)
                print(f"{'removed' if args.remove else 'orphan'} {path}")
        else:
            backend = open_backend_arg(args)
            try:
                fsid = backend.fsid()
            except (BackendError, CorruptionError) as e:
                raise backend_failed(e) from None
            regiondir = args.regiondir or Path(f"/dev/shm/rmemfs-{fsid}")
            if args.retire:
                try:
                    reason = why_still_needed(backend, regiondir)
                except (BackendError, CorruptionError) as e:
                    raise backend_failed(e) from None
                if reason:
                    raise QuietError(f"not retiring {regiondir}: {reason}", EXIT_CTL_RETIRE)
                try:
                    retire(regiondir)
                except RetireRefused as e:
                    raise QuietError(str(e), EXIT_CTL_RETIRE) from None
                print(f"retired {regiondir}: exporter stopped, memory freed")
                return 0
            if args.stop:
                stop_exporter(regiondir)
                print(f"exporter of {regiondir} stopped")
                return 0
            try:
                reply = control.call(regiondir / SOCKET_NAME, {"op": "status"}, timeout=10)
            except OSError as e:
                raise QuietError(f"no exporter answers at {regiondir / SOCKET_NAME}: {e}", EXIT_CTL_UNREACHABLE) from None
            print(json.dumps(reply, indent=1))
        return 0

    run_main("rmemfs-ctl", body)


if __name__ == "__main__":
    main()
