"""tools/bench section `databases`: small random-page commits, as databases make them.

Workloads (each a rate, median of --repeat runs, the targets interleaved per run):

* sqlite_wal_commits     SQLite, journal_mode=WAL, synchronous=FULL, one small INSERT per transaction
* sqlite_delete_commits  the same with journal_mode=DELETE (a journal file created and unlinked per commit)
* lmdb_commits           LMDB, writemap + sync (each commit: stores through the mapping, then msync)
* mmap_random_4KiB       random 4 KiB stores through a MAP_SHARED mapping, then one msync
* pwrite_random_4KiB     random 4 KiB pwrite()
* pwrite_fdatasync64_4KiB random 4 KiB pwrite(), fdatasync() after every 64

Targets: rmemfs (and rmemfs_writeback: -o writeback_cache), tmpfs, fuse-overlayfs on tmpfs (a C FUSE
filesystem), and tools/minimalfs.py (pyfuse3_minimal, pyfuse3_minimal_writeback): a pyfuse3 filesystem
with nothing but pread/pwrite into /dev/shm files, the ceiling of any pyfuse3 filesystem on this machine.
Ratios are taken within the run: rmemfs to the pyfuse3 ceiling in the same cache mode, and to fuse-overlayfs.
"""
from __future__ import annotations

import contextlib
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from collections.abc import Callable

import bench
from bench import PAGE, MiB, Overlay, Rmemfs, log, summary, unmount

WORKLOADS = ("sqlite_wal_commits", "sqlite_delete_commits", "lmdb_commits", "mmap_random_4KiB",
             "pwrite_random_4KiB", "pwrite_fdatasync64_4KiB")
UNITS = {"sqlite_wal_commits": "commits/s", "sqlite_delete_commits": "commits/s", "lmdb_commits": "commits/s",
         "mmap_random_4KiB": "pages/s", "pwrite_random_4KiB": "pages/s", "pwrite_fdatasync64_4KiB": "pages/s"}
ROW = 100                      # bytes of payload per committed transaction


class RmemfsWriteback(Rmemfs):
    """rmemfs mounted with -o writeback_cache."""

    def options(self) -> str:
        return super().options() + ",writeback_cache"


class Minimal:
    """tools/minimalfs.py: the pyfuse3 ceiling."""

    def __init__(self, work: Path, shm: Path, name: str, writeback: bool) -> None:
        self.store = shm / f"{name}.store"
        self.mp = work / f"{name}.mnt"
        self.writeback = writeback
        self.proc: subprocess.Popen[str] | None = None

    def mount(self) -> None:
        self.store.mkdir(parents=True, exist_ok=True)
        self.mp.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, str(bench.ROOT / "tools" / "minimalfs.py"), *(["--writeback"] * self.writeback),
               str(self.store), str(self.mp)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"minimalfs did not start (exit {self.proc.wait()})")
        deadline = time.monotonic() + 10
        while not bench.is_mounted(self.mp):
            if time.monotonic() > deadline:
                raise RuntimeError("minimalfs did not mount within 10 s")
            time.sleep(0.05)

    def destroy(self) -> None:
        unmount(self.mp)
        if self.proc:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(30)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.store, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.mp.rmdir()


# --- workloads: each takes a path prefix (no subdirectories: minimalfs is flat) and returns a rate ---

def sqlite_commits(d: Path, commits: int, journal: str) -> float:
    db = sqlite3.connect(f"{d}-{journal}.sqlite", isolation_level=None)
    try:
        db.execute(f"PRAGMA journal_mode={journal}")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v BLOB)")
        payload = random.Random(1).randbytes(ROW)
        rng = random.Random(2)
        t = time.perf_counter()
        for _ in range(commits):
            db.execute("BEGIN")
            db.execute("INSERT OR REPLACE INTO t VALUES (?, ?)", (rng.randrange(commits * 4), payload))
            db.execute("COMMIT")
        return commits / (time.perf_counter() - t)
    finally:
        db.close()


def lmdb_commits(d: Path, commits: int) -> float:
    import lmdb
    env = lmdb.open(f"{d}-lmdb.mdb", subdir=False, map_size=64 * MiB, writemap=True, sync=True,
                    metasync=True, lock=True)
    try:
        payload = random.Random(1).randbytes(ROW)
        rng = random.Random(3)
        t = time.perf_counter()
        for _ in range(commits):
            with env.begin(write=True) as txn:
                txn.put(rng.randrange(1 << 32).to_bytes(4, "big"), payload)
        return commits / (time.perf_counter() - t)
    finally:
        env.close()


def prefill(path: Path, size: int) -> None:
    """A file of `size` written bytes, so random stores hit allocated pages (as in a database file)."""
    block = bench.data_block(MiB, 9)
    bench.seq_write(path, size, block)


def pwrite_random(path: Path, size: int, pages: list[int], sync_every: int) -> float:
    data = bench.data_block(PAGE, 5)
    fd = os.open(path, os.O_RDWR)
    try:
        t = time.perf_counter()
        for i, p in enumerate(pages, 1):
            os.pwrite(fd, data, p * PAGE)
            if sync_every and i % sync_every == 0:
                os.fdatasync(fd)
        if sync_every:
            os.fdatasync(fd)
        return len(pages) / (time.perf_counter() - t)
    finally:
        os.close(fd)


def run(b: Any) -> dict[str, Any]:
    """The section; `b` is the tools/bench Bench (work dirs, cleanups, args)."""
    R, commits = b.repeat, b.args.db_commits
    size = b.args.db_size
    npages = min(b.args.random_pages, size // PAGE)
    fs_objs: dict[str, Any] = {}

    def add(name: str, obj: Any) -> None:
        b.cleanups.append(obj.destroy)
        obj.mount()
        fs_objs[name] = obj

    on = Rmemfs(b.work, "db", True)
    add("rmemfs", on)
    wb = RmemfsWriteback(b.work, "db-wb", True)
    add("rmemfs_writeback", wb)
    add("pyfuse3_minimal", Minimal(b.work, b.shm, "minimal", False))
    add("pyfuse3_minimal_writeback", Minimal(b.work, b.shm, "minimal-wb", True))
    add("fuse_overlayfs_on_tmpfs", Overlay(b.work, b.shm))
    tmpfs_dir = b.shm / "db-tmpfs"
    tmpfs_dir.mkdir()
    dirs: dict[str, Path] = {n: o.mp for n, o in fs_objs.items()}
    dirs["tmpfs"] = tmpfs_dir
    order = ["rmemfs", "rmemfs_writeback", "pyfuse3_minimal", "pyfuse3_minimal_writeback",
             "fuse_overlayfs_on_tmpfs", "tmpfs"]
    rng = random.Random(11)
    samples: dict[str, dict[str, list[float]]] = {t: {w: [] for w in WORKLOADS} for t in order}
    jobs: list[tuple[str, Callable[[Path], float]]] = [
        ("sqlite_wal_commits", lambda d: sqlite_commits(d, commits, "WAL")),
        ("sqlite_delete_commits", lambda d: sqlite_commits(d, commits, "DELETE")),
        ("lmdb_commits", lambda d: lmdb_commits(d, commits)),
    ]
    log(f"databases: {commits} commits, {npages} random pages in {bench.human(size)}, {R} runs, "
        f"targets {', '.join(order)}")
    for rep in range(R):
        names = order[rep % len(order):] + order[:rep % len(order)]
        for name in names:
            d = dirs[name] / f"rep{rep}"
            fs = fs_objs.get(name)
            flush = fs.flush if isinstance(fs, Rmemfs) else (lambda: None)
            for wl, fn in jobs:
                flush()                 # empty dirty lists: every run pays for marking
                bench.settle()
                samples[name][wl].append(fn(d))
            f = Path(f"{d}-pages.dat")
            prefill(f, size)
            for wl, sync_every in (("pwrite_random_4KiB", 0), ("pwrite_fdatasync64_4KiB", 64)):
                flush()
                bench.settle()
                samples[name][wl].append(pwrite_random(f, size, rng.sample(range(size // PAGE), npages),
                                                       sync_every))
            flush()
            bench.settle()
            s = bench.mmap_random_write(f, size, rng.sample(range(size // PAGE), npages), bench.data_block(PAGE, 6))
            samples[name]["mmap_random_4KiB"].append(npages / s)
            log(f"databases: {name:<26} rep {rep + 1}/{R}: " + ", ".join(
                f"{w} {samples[name][w][-1]:,.0f}" for w in WORKLOADS))
            for leftover in dirs[name].glob(f"rep{rep}-*"):
                leftover.unlink()
    res: dict[str, Any] = {"commits": commits, "random_pages": npages, "file_bytes": size, "targets": {}}
    for name in order:
        res["targets"][name] = {w: summary(samples[name][w], UNITS[w]) for w in WORKLOADS}
    t = res["targets"]
    ratios: dict[str, float] = {}
    for fsname, ceiling in (("rmemfs", "pyfuse3_minimal"), ("rmemfs_writeback", "pyfuse3_minimal_writeback")):
        for w in WORKLOADS:
            ratios[f"{fsname}_to_{ceiling}.{w}"] = t[fsname][w]["median"] / t[ceiling][w]["median"]
            ratios[f"{fsname}_to_fuse_overlayfs.{w}"] = t[fsname][w]["median"] / t["fuse_overlayfs_on_tmpfs"][w]["median"]
    for w in WORKLOADS:
        ratios[f"pyfuse3_minimal_to_fuse_overlayfs.{w}"] = (t["pyfuse3_minimal"][w]["median"]
                                                            / t["fuse_overlayfs_on_tmpfs"][w]["median"])
    res["ratios"] = ratios
    for o in fs_objs.values():
        o.destroy()
    shutil.rmtree(tmpfs_dir, ignore_errors=True)
    return res


def table(r: dict[str, Any]) -> list[str]:
    t = r.get("targets") or {}
    if not t:
        return []
    short = {"sqlite_wal_commits": "sqlite WAL", "sqlite_delete_commits": "sqlite DELETE", "lmdb_commits": "lmdb",
             "mmap_random_4KiB": "mmap 4K", "pwrite_random_4KiB": "pwrite 4K", "pwrite_fdatasync64_4KiB": "pwrite+fds64"}
    lines = ["databases (median [min .. max], per second)",
             "  " + f"{'target':<27}" + "".join(f"{short[w]:>24}" for w in WORKLOADS)]
    for name, d in t.items():
        lines.append("  " + f"{name:<27}" + "".join(
            f"{d[w]['median']:>9,.0f} [{d[w]['min']:,.0f}..{d[w]['max']:,.0f}]".rjust(24) for w in WORKLOADS))
    ra = r.get("ratios") or {}
    for prefix, label in (("rmemfs_to_pyfuse3_minimal", "rmemfs / minimal"),
                          ("rmemfs_writeback_to_pyfuse3_minimal_writeback", "rmemfs_wb / minimal_wb"),
                          ("rmemfs_to_fuse_overlayfs", "rmemfs / fuse-overlayfs"),
                          ("rmemfs_writeback_to_fuse_overlayfs", "rmemfs_wb / fuse-overlayfs")):
        lines.append("  " + f"{label:<27}" + "".join(
            f"{ra.get(f'{prefix}.{w}', float('nan')):>23.2f}×" for w in WORKLOADS))
    return lines


def plot(r: dict[str, Any], out: Path, plt: Any) -> str | None:
    t = r.get("targets") or {}
    if not t:
        return None
    fig, ax = plt.subplots(figsize=(11, 5))
    names = list(t)
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = [j - 0.4 + (i + 0.5) * width for j in range(len(WORKLOADS))]
        med = [t[name][w]["median"] for w in WORKLOADS]
        lo = [m - t[name][w]["min"] for m, w in zip(med, WORKLOADS, strict=True)]
        hi = [t[name][w]["max"] - m for m, w in zip(med, WORKLOADS, strict=True)]
        ax.bar(xs, med, width, yerr=[lo, hi], label=name, capsize=2)
    ax.set_yscale("log")
    ax.set_xticks(range(len(WORKLOADS)))
    ax.set_xticklabels([f"{w}\n({UNITS[w]})" for w in WORKLOADS], fontsize=8)
    ax.set_ylabel("rate (log scale; bars: min..max)")
    ax.set_title("databases: small random-page commits (median of runs)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "databases.png", dpi=110)
    plt.close(fig)
    return "databases.png"
