#!/usr/bin/env python3
"""Per-request cost of rmemfs's 4 KiB write path against tools/minimalfs.py (issue 14).

    tools/profile_writes.py inproc [--pages N] [--runs R] [--cprofile]
    tools/profile_writes.py mount [--pairs R] [--writeback]
    tools/profile_writes.py delete [--commits N] [--runs R] [--cprofile]

``inproc``: no kernel. rmemfs's ``fs.Operations.write`` (a fresh filesystem in /dev/shm, a 256 MiB
file prefilled in 1 MiB writes, as tools/bench does) and ``MinimalFS.write`` (os.pwrite into a /dev/shm
file) are awaited N times at random page offsets in a trio loop; each run reports thread CPU time per
request (so other processes on the machine count little) on pages touched for the first time in this
process (their write fault) and on the same pages again. ``--cprofile`` prints rmemfs's profile of one
run, by own time.

``mount``: real FUSE mounts of both (in the same cache mode), R interleaved pairs of 16,384 random 4 KiB
``pwrite`` and of mmap stores + msync into a 64 MiB file; per pair the rate and the filesystem
process's CPU time per request, user and system, from /proc/PID/stat (pyfuse3 and trio included: the
difference between the two is what rmemfs adds to a round trip).

``delete``: no kernel. The requests one SQLite commit in journal_mode=DELETE sends (traced from a real
mount: 35 of them, the journal file created, written in 9 pieces, fsynced and unlinked, the database
written and fsynced, the names looked up) are awaited on rmemfs's ``fs.Operations`` and on ``MinimalFS``,
N commits per run; thread CPU per commit, the two alternated.

Exit 0; 2 on bad arguments. Needs root and /dev/fuse for ``mount``.
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, cast
from pathlib import Path

import pyfuse3
import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import bench  # noqa: E402
import bench_databases  # noqa: E402
from minimalfs import MinimalFS  # noqa: E402
from rmemfs import PAGE_SIZE  # noqa: E402
from rmemfs import fs as fuse  # noqa: E402
from rmemfs.core import Filesystem  # noqa: E402
from rmemfs.namespace import ROOT_INO  # noqa: E402

MiB = 1 << 20
Writer = Callable[[int, int, bytes], Awaitable[int]]


def rmemfs_writer(directory: Path, size: int) -> Writer:
    fsid = str(uuid.uuid4())
    regions = Filesystem.create_regions(directory, fsid, capacity=1 << 20, data_region_size=1 << 30,
                                        meta_size=16 * MiB)
    core = Filesystem.format(regions, fsid, 1, 1 << 20)
    ino = core.make(ROOT_INO, b"f", 0o100644, 0, 0).ino
    core.open(ino)
    block = os.urandom(MiB)
    for off in range(0, size, MiB):
        core.write(ino, off, block)
    core.tracker.swap()              # as after a flush: the list is empty
    core.tracker.flushing.clear()
    ops = fuse.Operations(core)
    return lambda _fh, off, buf: ops.write(ino, off, buf)


def minimal_writer(directory: Path, size: int) -> Writer:
    ops = MinimalFS(directory, False)
    fd = os.open(directory / "f", os.O_RDWR | os.O_CREAT, 0o644)
    block = os.urandom(MiB)
    for off in range(0, size, MiB):
        os.pwrite(fd, block, off)
    ops.fds[2] = fd
    return lambda _fh, off, buf: ops.write(2, off, buf)


def per_request_us(write: Writer, pages: list[int]) -> float:
    data = os.urandom(PAGE_SIZE)

    async def loop() -> float:
        t = time.thread_time()
        for p in pages:
            await write(0, p * PAGE_SIZE, data)
        return (time.thread_time() - t) / len(pages) * 1e6
    return trio.run(loop)


def inproc(pages_n: int, runs: int, profile: bool) -> None:
    size = 256 * MiB
    print(f"in-process, {pages_n} random 4 KiB writes into a {size // MiB} MiB file, thread CPU us per request")
    for run in range(runs):
        base = Path(tempfile.mkdtemp(prefix="profile-writes-", dir="/dev/shm"))
        try:
            (base / "r").mkdir()
            (base / "m").mkdir()
            writers = {"rmemfs": rmemfs_writer(base / "r", size), "minimal": minimal_writer(base / "m", size)}
            pages = random.Random(run).sample(range(size // PAGE_SIZE), pages_n)
            line = []
            for name, write in writers.items():
                if profile and name == "rmemfs" and run == 0:
                    pr = cProfile.Profile()
                    pr.enable()
                first = per_request_us(write, pages)
                if profile and name == "rmemfs" and run == 0:
                    pr.disable()
                    pstats.Stats(pr).sort_stats("tottime").print_stats(20)
                again = per_request_us(write, pages)
                line.append(f"{name} {first:5.2f} first touch, {again:5.2f} again")
            print(f"  run {run + 1}: " + " | ".join(line), flush=True)
        finally:
            shutil.rmtree(base, ignore_errors=True)


def _cpu_s(pid: int) -> tuple[float, float]:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def mount(pairs: int, writeback: bool) -> None:
    size, n = 64 * MiB, 16384
    work = Path(tempfile.mkdtemp(prefix="profile-writes-", dir="/tmp"))
    shm = Path(tempfile.mkdtemp(prefix="profile-writes-", dir="/dev/shm"))
    rm = (bench_databases.RmemfsWriteback if writeback else bench.Rmemfs)(work, "rmemfs", True)
    mn = bench_databases.Minimal(work, shm, "minimal", writeback)
    results: dict[str, dict[str, list[tuple[float, float, float]]]] = {
        t: {"pwrite": [], "mmap": []} for t in ("rmemfs", "minimal")}
    try:
        rm.mount()
        mn.mount()
        pids = {"rmemfs": rm.pid(), "minimal": mn.proc.pid if mn.proc else 0}
        mps = {"rmemfs": rm.mp, "minimal": mn.mp}
        for t in mps:
            bench_databases.prefill(mps[t] / "f", size)
        for pair in range(pairs):
            order = ["rmemfs", "minimal"] if pair % 2 == 0 else ["minimal", "rmemfs"]
            rng = random.Random(pair)
            pages, mpages = rng.sample(range(size // PAGE_SIZE), n), rng.sample(range(size // PAGE_SIZE), n)
            for t in order:
                for kind in ("pwrite", "mmap"):
                    if t == "rmemfs":
                        rm.flush()
                    bench.settle()
                    u0, s0 = _cpu_s(pids[t])
                    if kind == "pwrite":
                        rate = bench_databases.pwrite_random(mps[t] / "f", size, pages, 0)
                    else:
                        rate = n / bench.mmap_random_write(mps[t] / "f", size, mpages, bench.data_block(PAGE_SIZE, 6))
                    u1, s1 = _cpu_s(pids[t])
                    results[t][kind].append((rate, (u1 - u0) / n * 1e6, (s1 - s0) / n * 1e6))
        mode = "writeback_cache" if writeback else "default cache mode"
        print(f"real mounts, {mode}, {pairs} interleaved pairs: rate median [min..max]; fs process CPU us per "
              f"page, user + system (medians)")
        for kind in ("pwrite", "mmap"):
            cells = []
            for t in ("rmemfs", "minimal"):
                rows = results[t][kind]
                rates = [r[0] for r in rows]
                cells.append(f"{t} {statistics.median(rates):>8,.0f} [{min(rates):,.0f}..{max(rates):,.0f}] "
                             f"cpu {statistics.median(r[1] for r in rows):.1f} + "
                             f"{statistics.median(r[2] for r in rows):.1f}")
            ratios = [a[0] / b[0] for a, b in zip(results["rmemfs"][kind], results["minimal"][kind], strict=True)]
            print(f"  {kind:<7} " + " | ".join(cells) + f" | pair ratios {', '.join(f'{x:.2f}' for x in ratios)}")
    finally:
        for o in (rm, mn):
            o.destroy()
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


class _Ctx:
    """A pyfuse3.RequestContext as the handlers read it."""

    uid = gid = 0
    pid = 1
    umask = 0o022


class _Fields:
    """A pyfuse3.SetattrFields that updates uid and gid only (SQLite, as root, chowns its journal)."""

    update_atime = update_mtime = update_ctime = update_mode = update_size = False
    update_uid = update_gid = True


JOURNAL = b"x-DELETE.sqlite-journal"
# (offset, length) of the journal file's writes in one commit, as the kernel sends them
JOURNAL_WRITES = ((0, 512), (512, 4), (516, 3580), (4096, 516), (4612, 4), (4616, 4), (4620, 3572), (8192, 524),
                  (8716, 4))


async def _maybe(request: Awaitable[Any]) -> Any:
    try:
        return await request
    except pyfuse3.FUSEError:
        return None


async def delete_commit(ops: Any, db: int, root: int, page: bytes) -> None:
    """One DELETE-mode commit's requests, in the order a real mount received them."""
    ctx = cast(pyfuse3.RequestContext, _Ctx())
    await ops.getattr(root, ctx)
    await _maybe(ops.lookup(root, JOURNAL, ctx))
    await ops.getattr(db, ctx)
    await ops.read(db, 0, 8192)
    await _maybe(ops.lookup(root, b"x-DELETE.sqlite-wal", ctx))
    await ops.getattr(db, ctx)
    await _maybe(ops.lookup(root, JOURNAL, ctx))
    fi, attr = await ops.create(root, JOURNAL, 0o100644, os.O_RDWR | os.O_CREAT, ctx)
    await ops.getattr(attr.st_ino, ctx)
    await ops.setattr(attr.st_ino, pyfuse3.EntryAttributes(), _Fields(), None, ctx)
    for off, n in JOURNAL_WRITES:
        await ops.write(fi.fh, off, page[:n])
    await ops.getattr(attr.st_ino, ctx)
    await ops.fsync(fi.fh, True)
    await ops.getattr(root, ctx)
    dfh = await ops.opendir(root, ctx)
    await ops.fsyncdir(dfh, True)
    await ops.releasedir(dfh)
    await ops.write(fi.fh, 0, page[:12])
    await ops.fsync(fi.fh, True)
    await ops.write(db, 0, page)
    await ops.write(db, PAGE_SIZE, page)
    await ops.fsync(db, True)
    await ops.flush(fi.fh)
    await ops.release(fi.fh)
    await ops.unlink(root, JOURNAL, ctx)
    await ops.forget([(attr.st_ino, 1)])


def delete_us(kind: str, directory: Path, commits: int, profile: cProfile.Profile | None) -> float:
    """Thread CPU per commit of ``commits`` DELETE commits (after 20 to warm up)."""
    if kind == "rmemfs":
        fsid = str(uuid.uuid4())
        regions = Filesystem.create_regions(directory, fsid, capacity=1 << 20, data_region_size=256 << 20,
                                            meta_size=16 * MiB)
        ops: Any = fuse.Operations(Filesystem.format(regions, fsid, 1, 1 << 20))
    else:
        ops = MinimalFS(directory, False)
    page = os.urandom(PAGE_SIZE)

    async def run() -> float:
        ctx = cast(pyfuse3.RequestContext, _Ctx())
        fi, _ = await ops.create(ROOT_INO, b"x-DELETE.sqlite", 0o100644, os.O_RDWR | os.O_CREAT, ctx)
        await ops.write(fi.fh, 0, page + page)
        for _ in range(20):
            await delete_commit(ops, fi.fh, ROOT_INO, page)
        if profile:
            profile.enable()
        t = time.thread_time()
        for _ in range(commits):
            await delete_commit(ops, fi.fh, ROOT_INO, page)
        us = (time.thread_time() - t) / commits * 1e6
        if profile:
            profile.disable()
        return us
    return trio.run(run)


def delete(commits: int, runs: int, profile: bool) -> None:
    print(f"in-process, {commits} SQLite DELETE-mode commits' requests per run, thread CPU us per commit")
    for run in range(runs):
        line = []
        for kind in ("rmemfs", "minimal") if run % 2 == 0 else ("minimal", "rmemfs"):
            base = Path(tempfile.mkdtemp(prefix="profile-writes-", dir="/dev/shm"))
            try:
                pr = cProfile.Profile() if profile and kind == "rmemfs" and run == 0 else None
                line.append(f"{kind} {delete_us(kind, base, commits, pr):6.1f}")
                if pr:
                    pstats.Stats(pr).sort_stats("tottime").print_stats(20)
            finally:
                shutil.rmtree(base, ignore_errors=True)
        print(f"  run {run + 1}: " + " | ".join(sorted(line)), flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    ip = sub.add_parser("inproc", help="the handlers alone, in this process")
    ip.add_argument("--pages", type=int, default=20000)
    ip.add_argument("--runs", type=int, default=3)
    ip.add_argument("--cprofile", action="store_true", help="print rmemfs's cProfile of the first run")
    mp = sub.add_parser("mount", help="real FUSE mounts, interleaved pairs")
    mp.add_argument("--pairs", type=int, default=3)
    mp.add_argument("--writeback", action="store_true", help="both mounts with writeback_cache")
    dp = sub.add_parser("delete", help="one SQLite DELETE commit's requests, in this process")
    dp.add_argument("--commits", type=int, default=2000)
    dp.add_argument("--runs", type=int, default=3)
    dp.add_argument("--cprofile", action="store_true", help="print rmemfs's cProfile of the first run")
    args = ap.parse_args(argv)
    if args.cmd == "delete":
        if args.commits < 1 or args.runs < 1:
            print("profile_writes: --commits and --runs must be at least 1", file=sys.stderr)
            return 2
        delete(args.commits, args.runs, args.cprofile)
    elif args.cmd == "inproc":
        if not 0 < args.pages <= 65536 or args.runs < 1:
            print("profile_writes: --pages must be 1..65536 and --runs at least 1", file=sys.stderr)
            return 2
        inproc(args.pages, args.runs, args.cprofile)
    else:
        if args.pairs < 1:
            print("profile_writes: --pairs must be at least 1", file=sys.stderr)
            return 2
        mount(args.pairs, args.writeback)
    return 0


if __name__ == "__main__":
    sys.exit(main())
