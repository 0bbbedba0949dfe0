#!/usr/bin/env python3
"""Measure rmemfs against its physical limits: one command, a report and plots.

    tools/bench [--size 1G] [--dirty 1,10,50,100] [--quick] [--out DIR]

Sections (each figure is measured ``--repeat`` times; median, min and max are kept):

1. write path: sequential write() in 1 MiB blocks, mmap + memcpy + msync, and
   random 4 KiB writes through mmap, on rmemfs (tracking on), rmemfs (tracking
   off), tmpfs (/dev/shm) and fuse-overlayfs over a tmpfs folder (a C FUSE
   reference); with ``--compare-tree DIR`` also rmemfs from another checkout,
   in the same run (e.g. one with the fence checks removed: their cost);
2. flush: a full baseline and incremental flushes at each dirty fraction, vs
   ``dd conv=fsync bs=1M`` of the same bytes into the same backend folder; and
   the write latency seen by a concurrent writer while a full flush runs;
3. recovery: per dirty fraction, each phase of rmemfs-recover (SIGKILLed
   owner, same host, software transport, caches dropped), vs the limit
   measured in the same run: reading the baseline files after dropping caches
   plus sending the dirty bytes over a raw loopback socket; and 10,000 small
   files with a few dirty pages;
4. transport: tools/bench_transport.py (software transport vs a raw socket);
5. footprint: region memory, RSS of the filesystem and exporter processes, dirty-list bytes;
6. databases: tools/bench_databases.py (SQLite and LMDB commits, random 4 KiB mmap and pwrite on rmemfs,
   tmpfs, fuse-overlayfs and tools/minimalfs.py, the pyfuse3 ceiling, in both cache modes);
7. store: tools/bench_store.py (the RADOS store's full flush and load vs raw RADOS aio of the same bytes,
   on a throw-away cluster; the directory store beside it; skipped under --quick);
8. failover: tools/bench_failover.py (rmemfs-standby on two netns hosts: from SIGKILL or SIGSTOP of the
   source to a recovered dirty page read on the standby's mount, split into detection, fencing, dirty
   fetch and mount; and the source's write path with a standby watching vs none);
9. heartbeat: tools/bench_heartbeat.py (the source's longest event-loop stall, seen as the gap between
   heartbeats, during 1 MiB writes, flushes, scattered mmap writes and namespace churn).

Writes DIR/report.json (every figure with its unit) and PNG plots, and prints
a table with the ratios against the targets. Needs root and /dev/fuse.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import mmap
import multiprocessing as mp
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from collections.abc import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from rmemfs import control  # noqa: E402
from rmemfs.exporter import wait_exited  # noqa: E402
from rmemfs.store import BaselineStore, Manifest, open_store  # noqa: E402

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
PAGE = 4096
T0 = time.monotonic()


# --- small helpers ---------------------------------------------------------------------

def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def parse_size(text: str) -> int:
    units = {"k": KiB, "m": MiB, "g": GiB}
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


def human(n: float) -> str:
    for unit, div in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= div:
            return f"{n / div:.3g} {unit}"
    return f"{n:.0f} B"


def summary(values: list[float], unit: str, **extra: Any) -> dict[str, Any]:
    """A figure: median, min, max, all samples, unit."""
    vals = [float(v) for v in values]
    return {"median": statistics.median(vals) if vals else None, "min": min(vals) if vals else None,
            "max": max(vals) if vals else None, "samples": vals, "unit": unit, **extra}


def percentile(sorted_vals: list[float], q: float) -> float:
    if not sorted_vals:
        return float("nan")
    k = min(len(sorted_vals) - 1, max(0, int(math.ceil(q / 100 * len(sorted_vals))) - 1))
    return sorted_vals[k]


def data_block(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def run_cmd(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, text=True, capture_output=True, **kw)


def drop_caches() -> bool:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def quiesce(seconds: float) -> None:
    """Write back what earlier steps left dirty, then let the disk settle, so a timed step starts quiet."""
    os.sync()
    time.sleep(seconds)


def proc_mem(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(rest.split()[0]) * KiB
    except OSError:
        pass
    return out


def wait_gone(pid: int, timeout: float = 30.0) -> None:
    wait_exited(pid, timeout)


def is_mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


def unmount(path: Path) -> None:
    if is_mounted(path):
        r = run_cmd(["fusermount3", "-u", str(path)])
        if r.returncode != 0:
            run_cmd(["fusermount3", "-u", "-z", str(path)])


# --- file workloads (work on any filesystem) ----------------------------------------------

def settle() -> None:
    """Let the previous target's flush reach the disk first: its writeback would otherwise run, and cost
    CPU, during the next target's timed run (it made tracking-off look slower than tracking-on)."""
    os.sync()
    time.sleep(0.2)


def seq_write(path: Path, size: int, block: bytes) -> float:
    """write() in 1 MiB blocks into a truncated file, then close; seconds."""
    t = time.perf_counter()
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    try:
        view = memoryview(block)
        for off in range(0, size, MiB):
            os.write(fd, view[:min(MiB, size - off)])
    finally:
        os.close(fd)
    return time.perf_counter() - t


def mmap_write(path: Path, size: int, block: bytes) -> float:
    """ftruncate, mmap MAP_SHARED, memcpy 1 MiB at a time, msync(MS_SYNC); seconds."""
    t = time.perf_counter()
    fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            for off in range(0, size, MiB):
                n = min(MiB, size - off)
                mm[off:off + n] = block[:n]
            mm.flush()
        finally:
            mm.close()
    finally:
        os.close(fd)
    return time.perf_counter() - t


def mmap_random_write(path: Path, size: int, pages: list[int], page_data: bytes) -> float:
    """Random 4 KiB stores through an existing file's mapping, then msync; seconds."""
    fd = os.open(path, os.O_RDWR)
    try:
        t = time.perf_counter()
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            for p in pages:
                mm[p * PAGE:(p + 1) * PAGE] = page_data
            mm.flush()
        finally:
            mm.close()
        return time.perf_counter() - t
    finally:
        os.close(fd)


def dirty_pages(path: Path, pages: list[int], seed: int) -> None:
    """pwrite 4 KiB at each listed page (changes every byte of the page)."""
    base = bytearray(data_block(PAGE, seed))
    fd = os.open(path, os.O_WRONLY)
    try:
        for i, p in enumerate(pages):
            base[:8] = (i + seed * 1_000_003).to_bytes(8, "little")
            os.pwrite(fd, base, p * PAGE)
    finally:
        os.close(fd)


def dirty_fraction(path: Path, size: int, pct: float, seed: int) -> int:
    """Dirty pct% of the file's pages, scattered at random; returns the page count."""
    npages = size // PAGE
    k = max(1, round(npages * pct / 100))
    if k >= npages:
        seq_write(path, size, data_block(MiB, seed))
        return npages
    dirty_pages(path, sorted(random.Random(seed).sample(range(npages), k)), seed)
    return k


# --- a raw loopback socket, the transport limit -------------------------------------------

def _raw_sender(size: int, conn: Any) -> None:
    buf = bytearray(data_block(MiB, 7)) * max(1, size // MiB)
    view = memoryview(buf)
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    conn.send(srv.getsockname()[1])
    while True:
        s, _ = srv.accept()
        with s:
            want = int.from_bytes(s.recv(8, socket.MSG_WAITALL), "little")
            while want > 0:
                n = min(want, len(view))
                s.sendall(view[:n])
                want -= n


class RawSocket:
    """A sender process; ``transfer(n)`` times receiving n bytes into pre-faulted memory."""

    def __init__(self, size: int) -> None:
        self.size = max(MiB, min(size, 256 * MiB))
        parent, child = mp.get_context("spawn").Pipe()
        self.proc = mp.get_context("spawn").Process(target=_raw_sender, args=(self.size, child), daemon=True)
        self.proc.start()
        if not parent.poll(60):
            raise RuntimeError("raw sender did not start")
        self.port = parent.recv()
        self.dest = bytearray(self.size)
        self.dest[::PAGE] = b"\x01" * len(self.dest[::PAGE])

    def transfer(self, nbytes: int) -> float:
        view = memoryview(self.dest)
        with socket.create_connection(("127.0.0.1", self.port)) as s:
            t = time.perf_counter()
            s.sendall(nbytes.to_bytes(8, "little"))
            got = 0
            while got < nbytes:
                n = s.recv_into(view[:min(len(view), nbytes - got)])
                if n == 0:
                    raise RuntimeError("raw sender closed early")
                got += n
            return time.perf_counter() - t

    def close(self) -> None:
        self.proc.kill()
        self.proc.join()


# --- rmemfs instances ---------------------------------------------------------------------

class Rmemfs:
    """One rmemfs filesystem (backend + mountpoint), driven through the worktree's CLI."""

    def __init__(self, work: Path, name: str, tracking: bool = True, root: Path = ROOT) -> None:
        self.backend = work / f"{name}.backend"
        self.mp = work / f"{name}.mnt"
        self.tracking = tracking
        self.region_dirs: set[Path] = set()
        self.root = root        # the checkout whose rmemfs runs (--compare-tree: another one)
        self.env = dict(os.environ, PYTHONPATH=str(root))

    def _cli(self, module: str, args: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
        r = run_cmd([sys.executable, "-m", module, *args], env=self.env, cwd=str(self.root))
        if check and r.returncode != 0:
            raise RuntimeError(f"{module} {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()[-800:]}")
        return r

    def options(self) -> str:
        return f"flush_interval=3600,port=0,tracking={'on' if self.tracking else 'off'}"

    def mount(self) -> None:
        self.backend.mkdir(parents=True, exist_ok=True)
        self.mp.mkdir(parents=True, exist_ok=True)
        self._cli("rmemfs.cli.mount", ["--backend", self.spec(), "-o", self.options(), str(self.mp)])
        self._after_mount()

    def _after_mount(self) -> None:
        ctl = control.find_control(self.mp)
        assert ctl is not None, f"{self.mp} is not an rmemfs mount"
        self.ctl = ctl
        self.region_dirs.add(Path(self.ctl).parent)

    def spec(self) -> str:
        """The --backend argument (tools/bench_store.py: a rados: spec)."""
        return str(self.backend)

    def store(self) -> BaselineStore:
        return open_store(self.backend)

    def manifest(self) -> Manifest:
        return self.store().read_manifest()

    def pid(self) -> int:
        return int(self.manifest().owner["pid"])

    def exporter_pid(self) -> int:
        info = json.loads((Path(self.ctl).parent / "exporter.json").read_text())
        return int(info["pid"])

    def flush(self) -> dict[str, Any]:
        t = time.perf_counter()
        r = control.call(self.ctl, {"op": "flush"})
        wall = time.perf_counter() - t
        if not r.get("ok"):
            raise RuntimeError(f"flush failed: {r}")
        st = self.stats()
        return {"wall_s": wall, **st["flush"]}

    def stats(self) -> dict[str, Any]:
        return control.call(self.ctl, {"op": "stats"})

    def segment_files(self) -> list[Path]:
        store = self.store()
        return [Path(store.describe(s.name)) for s in store.read_manifest().segments]

    def kill(self) -> None:
        pid = self.pid()
        os.kill(pid, signal.SIGKILL)
        wait_gone(pid)
        run_cmd(["fusermount3", "-u", "-z", str(self.mp)])

    def recover(self, report: Path, load: str = "eager") -> tuple[dict[str, Any], float]:
        t = time.perf_counter()
        self._cli("rmemfs.cli.recover", ["--backend", self.spec(), "--source", "127.0.0.1", "--transport",
                                         "software", "--json", str(report), "--no-liveness-check", "--load", load,
                                         "-o", self.options(), str(self.mp)])
        wall = time.perf_counter() - t
        self._after_mount()
        return json.loads(report.read_text()), wall

    def destroy(self) -> None:
        pid = None
        with contextlib.suppress(Exception):
            pid = self.pid()
        unmount(self.mp)
        if pid:
            wait_gone(pid, 60)
        with contextlib.suppress(Exception):
            fsid = self.store().fsid()
            self.region_dirs.update(Path("/dev/shm").glob(f"rmemfs-{fsid}*"))
        for d in self.region_dirs:
            info = d / "exporter.json"
            with contextlib.suppress(Exception):
                control.call(d / "exporter.sock", {"op": "shutdown"}, timeout=5)
            with contextlib.suppress(Exception):
                wait_gone(int(json.loads(info.read_text())["pid"]), 10)
            shutil.rmtree(d, ignore_errors=True)
        shutil.rmtree(self.backend, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.mp.rmdir()


class Overlay:
    """fuse-overlayfs over a tmpfs folder: the C FUSE reference."""

    def __init__(self, work: Path, shm: Path) -> None:
        self.base = shm / "ovl"
        self.mp = work / "ovl.mnt"

    def mount(self) -> None:
        for d in ("lower", "upper", "work"):
            (self.base / d).mkdir(parents=True, exist_ok=True)
        self.mp.mkdir(parents=True, exist_ok=True)
        b = self.base
        r = run_cmd(["fuse-overlayfs", "-o", f"lowerdir={b}/lower,upperdir={b}/upper,workdir={b}/work",
                     str(self.mp)])
        if r.returncode != 0:
            raise RuntimeError(f"fuse-overlayfs failed: {r.stderr.strip()}")

    def destroy(self) -> None:
        unmount(self.mp)
        shutil.rmtree(self.base, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.mp.rmdir()


# --- the benchmark ---------------------------------------------------------------------------

class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.size = max(MiB, parse_size(args.size) // MiB * MiB)
        self.dirty = [float(x) for x in args.dirty.split(",") if x.strip()]
        self.repeat = args.repeat
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        tag = f"rmemfs-bench-{os.getpid()}"
        self.work = Path(args.workdir) / tag
        self.shm = Path("/dev/shm") / tag
        self.work.mkdir(parents=True, exist_ok=True)
        self.shm.mkdir(parents=True, exist_ok=True)
        self.cleanups: list[Callable[[], None]] = []
        self.report: dict[str, Any] = {}
        self.block = data_block(MiB, 1)
        self.settle = 0.2 if args.quick else 1.0

    def cleanup(self) -> None:
        for fn in reversed(self.cleanups):
            with contextlib.suppress(Exception):
                fn()
        shutil.rmtree(self.work, ignore_errors=True)
        shutil.rmtree(self.shm, ignore_errors=True)

    def rmemfs(self, name: str, tracking: bool = True, root: Path = ROOT) -> Rmemfs:
        fs = Rmemfs(self.work, name, tracking, root)
        self.cleanups.append(fs.destroy)
        fs.mount()
        return fs

    # 1 ----------------------------------------------------------------------------------------
    def write_path(self) -> dict[str, Any]:
        size, R = self.size, self.repeat
        on = self.rmemfs("write-on", True)
        off = self.rmemfs("write-off", False)
        ovl = Overlay(self.work, self.shm)
        self.cleanups.append(ovl.destroy)
        ovl.mount()
        tmpfs_dir = self.shm / "tmpfs"
        tmpfs_dir.mkdir()
        targets: dict[str, tuple[Path, Rmemfs | None]] = {
            "rmemfs_tracking_on": (on.mp, on), "rmemfs_tracking_off": (off.mp, off),
            "tmpfs": (tmpfs_dir, None), "fuse_overlayfs_on_tmpfs": (ovl.mp, None)}
        other = None
        if self.args.compare_tree:
            # The same build from another checkout (e.g. one with the fence checks removed), in this run.
            other = self.rmemfs("write-other-tree", True, Path(self.args.compare_tree).resolve())
            targets["rmemfs_compare_tree"] = (other.mp, other)
        npages = min(self.args.random_pages, size // PAGE)
        rng = random.Random(3)
        seq: dict[str, list[float]] = {t: [] for t in targets}
        mm: dict[str, list[float]] = {t: [] for t in targets}
        rnd: dict[str, list[float]] = {t: [] for t in targets}
        page_data = data_block(PAGE, 5)
        for d, fs in targets.values():
            # One untimed round: region memory and the page cache reach their steady state.
            seq_write(d / "warm.dat", size, self.block)
            os.unlink(d / "warm.dat")
            if fs:
                fs.flush()
        log("write: warm-up round done (not counted)")
        for rep in range(R):
            # Interleave the targets so drift in machine load hits all of them alike.
            names = list(targets)
            for name in names[rep % len(names):] + names[:rep % len(names)]:
                d, fs = targets[name]
                f = d / "seq.dat"
                if fs:
                    fs.flush()          # empty dirty lists: every repeat pays for marking
                settle()
                s = seq_write(f, size, self.block)
                seq[name].append(size / s)
                log(f"write: {name:<24} write() 1 MiB     rep {rep + 1}/{R}: {size / s / MiB:8.0f} MiB/s")
                if fs:
                    fs.flush()
                pages = rng.sample(range(size // PAGE), npages)
                settle()
                s = mmap_random_write(f, size, pages, page_data)
                rnd[name].append(npages / s)
                log(f"write: {name:<24} mmap random 4 KiB rep {rep + 1}/{R}: {npages / s:8.0f} pages/s")
                os.unlink(f)
                if fs:
                    fs.flush()
                g = d / "mmap.dat"
                settle()
                s = mmap_write(g, size, self.block)
                mm[name].append(size / s)
                log(f"write: {name:<24} mmap+memcpy+msync rep {rep + 1}/{R}: {size / s / MiB:8.0f} MiB/s")
                os.unlink(g)
        res: dict[str, Any] = {"size_bytes": size, "random_pages": npages, "targets": {}}
        for name in targets:
            res["targets"][name] = {
                "seq_write_1MiB": summary(seq[name], "bytes/s"),
                "mmap_memcpy_msync": summary(mm[name], "bytes/s"),
                "mmap_random_4KiB": summary(rnd[name], "pages/s")}
        t = res["targets"]
        med = lambda n, k: t[n][k]["median"]  # noqa: E731
        res["ratios"] = {
            "seq_write_rmemfs_to_tmpfs": med("rmemfs_tracking_on", "seq_write_1MiB") / med("tmpfs", "seq_write_1MiB"),
            "mmap_rmemfs_to_tmpfs": med("rmemfs_tracking_on", "mmap_memcpy_msync") / med("tmpfs", "mmap_memcpy_msync"),
            "seq_write_rmemfs_to_fuse_overlayfs": med("rmemfs_tracking_on", "seq_write_1MiB")
            / med("fuse_overlayfs_on_tmpfs", "seq_write_1MiB"),
            "mmap_rmemfs_to_fuse_overlayfs": med("rmemfs_tracking_on", "mmap_memcpy_msync")
            / med("fuse_overlayfs_on_tmpfs", "mmap_memcpy_msync"),
            "tracking_on_slowdown_seq_write": 1 - med("rmemfs_tracking_on", "seq_write_1MiB")
            / med("rmemfs_tracking_off", "seq_write_1MiB"),
            "tracking_on_slowdown_mmap": 1 - med("rmemfs_tracking_on", "mmap_memcpy_msync")
            / med("rmemfs_tracking_off", "mmap_memcpy_msync"),
            "tracking_on_slowdown_random_4KiB": 1 - med("rmemfs_tracking_on", "mmap_random_4KiB")
            / med("rmemfs_tracking_off", "mmap_random_4KiB"),
        }
        if other is not None:
            res["compare_tree"] = str(Path(self.args.compare_tree).resolve())
            for key, fig in (("seq_write", "seq_write_1MiB"), ("mmap", "mmap_memcpy_msync"),
                             ("random_4KiB", "mmap_random_4KiB")):
                res["ratios"][f"slowdown_vs_compare_tree_{key}"] = 1 - med("rmemfs_tracking_on", fig) \
                    / med("rmemfs_compare_tree", fig)
        for fs in (on, off, *([other] if other else [])):
            fs.destroy()
        ovl.destroy()
        shutil.rmtree(tmpfs_dir, ignore_errors=True)
        return res

    # 2 + 5 ------------------------------------------------------------------------------------
    def dd(self, nbytes: int, src: Path, dst_dir: Path) -> float:
        count = max(1, -(-nbytes // MiB))
        dst = dst_dir / "dd.tmp"
        quiesce(self.settle)
        t = time.perf_counter()
        r = run_cmd(["dd", f"if={src}", f"of={dst}", "bs=1M", f"count={count}", "conv=fsync"])
        s = time.perf_counter() - t
        if r.returncode != 0:
            raise RuntimeError(f"dd failed: {r.stderr}")
        dst.unlink()
        return s

    def flush_and_footprint(self) -> tuple[dict[str, Any], dict[str, Any]]:
        size, R = self.size, self.repeat
        fs = self.rmemfs("flush")
        f = fs.mp / "data.dat"
        src = self.shm / "dd-source"
        seq_write(src, size + 16 * MiB, self.block)   # dd reads random data from tmpfs
        mem_empty = {"fs": proc_mem(fs.pid()), "exporter": proc_mem(fs.exporter_pid())}

        # full baselines: every page of the file dirty
        full: list[dict[str, Any]] = []
        dd_full: list[float] = []
        footprint: dict[str, Any] = {}
        for rep in range(R):
            seq_write(f, size, data_block(MiB, 10 + rep))
            if rep == 0:
                st = fs.stats()["core"]
                footprint = {
                    "data_bytes": size,
                    "fs_process_empty": mem_empty["fs"], "exporter_process_empty": mem_empty["exporter"],
                    "fs_process": proc_mem(fs.pid()), "exporter_process": proc_mem(fs.exporter_pid()),
                    "region_resident_bytes": st["region_resident_bytes"],
                    "dirty_list_entries_sequential": st["dirty_current_entries"],
                    "dirty_list_pages_sequential": st["dirty_current_pages"],
                }
            quiesce(self.settle)
            fl = fs.flush()
            full.append(fl)
            dd_full.append(self.dd(fl["last_bytes"], src, fs.backend))
            log(f"flush: full  rep {rep + 1}/{R}: {fl['last_duration_s']:.3f} s for {human(fl['last_bytes'])} "
                f"(dd conv=fsync {dd_full[-1]:.3f} s)")

        # incremental flushes at each dirty fraction
        incr: dict[str, Any] = {}
        gc_rewrites = 0
        for pct in self.dirty:
            runs, dds = [], []
            rep = attempt = 0
            while rep < R:
                attempt += 1
                n = dirty_fraction(f, size, pct, seed=100 + attempt + int(pct * 10))
                if rep == 0:
                    st = fs.stats()["core"]
                    footprint.setdefault("dirty_list_scattered", {})[f"{pct:g}%"] = {
                        "entries": st["dirty_current_entries"], "pages": st["dirty_current_pages"]}
                quiesce(self.settle)
                fl = fs.flush()
                if fl["last_full"] and pct < 100 and attempt < 3 * R:
                    # Old segments held 2x the live bytes: rmemfs rewrote everything (garbage
                    # collection). That is not an incremental flush; count it apart and redo.
                    gc_rewrites += 1
                    log(f"flush: {pct:g}% dirty: garbage-collecting full rewrite ({fl['last_duration_s']:.3f} s, "
                        f"{human(fl['last_bytes'])}), not counted; again")
                    continue
                rep += 1
                fl["pages_dirtied"] = n
                runs.append(fl)
                dds.append(self.dd(fl["last_bytes"], src, fs.backend))
                log(f"flush: {pct:g}% dirty rep {rep}/{R}: {fl['last_duration_s']:.3f} s for "
                    f"{human(fl['last_bytes'])} (dd conv=fsync {dds[-1]:.3f} s)")
            incr[f"{pct:g}"] = {
                "dirty_percent": pct,
                "duration": summary([r["last_duration_s"] for r in runs], "s"),
                "wall": summary([r["wall_s"] for r in runs], "s"),
                "bytes_written": summary([r["last_bytes"] for r in runs], "bytes"),
                "pages": summary([r["last_pages"] for r in runs], "pages"),
                "dd_conv_fsync_same_bytes": summary(dds, "s"),
                "ratio_dd_time_to_flush_time": statistics.median(dds)
                / statistics.median(r["last_duration_s"] for r in runs),
            }

        # stall: a writer doing 4 KiB pwrites at random pages while a full flush runs
        stall = self.flush_stall(fs, f, size)

        full_med = statistics.median(r["last_duration_s"] for r in full)
        res: dict[str, Any] = {
            "size_bytes": size,
            "full": {"duration": summary([r["last_duration_s"] for r in full], "s"),
                     "wall": summary([r["wall_s"] for r in full], "s"),
                     "bytes_written": summary([r["last_bytes"] for r in full], "bytes"),
                     "dd_conv_fsync_same_bytes": summary(dd_full, "s"),
                     "throughput": summary([r["last_bytes"] / r["last_duration_s"] for r in full], "bytes/s"),
                     "dd_throughput": summary([r["last_bytes"] / d for r, d in zip(full, dd_full, strict=True)], "bytes/s")},
            "incremental": incr,
            "garbage_collecting_rewrites_skipped": gc_rewrites,
            "stall": stall,
            "ratios": {"full_flush_to_dd_throughput": statistics.median(dd_full) / full_med},
        }
        lo = min(self.dirty)
        res["ratios"][f"flush_{lo:g}pct_to_full_time"] = incr[f"{lo:g}"]["duration"]["median"] / full_med
        gib = size / GiB
        fsm, exm = footprint["fs_process"], footprint["exporter_process"]
        footprint["per_GiB"] = {
            "region_resident_bytes": footprint["region_resident_bytes"] / gib,
            "fs_rss_bytes": fsm.get("VmRSS", 0) / gib,
            "fs_rss_anon_bytes": fsm.get("RssAnon", 0) / gib,
            "fs_rss_growth_bytes": (fsm.get("VmRSS", 0) - footprint["fs_process_empty"].get("VmRSS", 0)) / gib,
            "fs_rss_anon_growth_bytes": (fsm.get("RssAnon", 0) - footprint["fs_process_empty"].get("RssAnon", 0)) / gib,
            "exporter_rss_bytes": exm.get("VmRSS", 0) / gib,
            "exporter_rss_anon_bytes": exm.get("RssAnon", 0) / gib,
            "dirty_list_bytes_sequential": footprint["dirty_list_entries_sequential"] * 8 / gib,
            "dirty_list_bytes_all_pages_scattered_worst_case": (size // PAGE) * 8 / gib,
            "dedup_map_bytes": GiB // PAGE / 1.0,
            "unit": "bytes per GiB of file data",
        }
        for pct, d in footprint.get("dirty_list_scattered", {}).items():
            footprint["per_GiB"][f"dirty_list_bytes_{pct}_scattered"] = d["entries"] * 8 / gib
        fs.destroy()
        src.unlink()
        return res, footprint

    def flush_stall(self, fs: Rmemfs, f: Path, size: int) -> dict[str, Any]:
        npages = size // PAGE
        stop = threading.Event()
        samples: list[tuple[float, float]] = []
        page = bytearray(data_block(PAGE, 77))

        def writer() -> None:
            fd = os.open(f, os.O_WRONLY)
            rng = random.Random(9)
            try:
                while not stop.is_set():
                    p = rng.randrange(npages)
                    t = time.perf_counter()
                    os.pwrite(fd, page, p * PAGE)
                    samples.append((t, time.perf_counter() - t))
            finally:
                os.close(fd)

        res: dict[str, Any] = {}
        during: list[float] = []
        idle: list[float] = []
        windows = []
        for rep in range(self.repeat):
            seq_write(f, size, data_block(MiB, 50 + rep))       # everything dirty: a full-size flush
            samples.clear()
            stop.clear()
            th = threading.Thread(target=writer, daemon=True)
            th.start()
            time.sleep(0.5)
            t0 = time.perf_counter()
            fs.flush()
            t1 = time.perf_counter()
            time.sleep(0.3)
            stop.set()
            th.join()
            idle += [lat for t, lat in samples if t < t0 - 0.05 or t > t1 + 0.05]
            during += [lat for t, lat in samples if t0 <= t <= t1]
            windows.append(t1 - t0)
            log(f"flush stall rep {rep + 1}/{self.repeat}: flush {t1 - t0:.3f} s, "
                f"{sum(1 for t, _ in samples if t0 <= t <= t1)} writes during it, "
                f"max latency {max((lat for t, lat in samples if t0 <= t <= t1), default=0) * 1000:.1f} ms")
        during.sort()
        idle.sort()
        for label, vals in (("during_flush", during), ("without_flush", idle)):
            res[label] = {"writes": len(vals), "p50": percentile(vals, 50), "p99": percentile(vals, 99),
                          "max": vals[-1] if vals else float("nan"), "unit": "s"}
        res["flush_window"] = summary(windows, "s")
        res["workload"] = "one thread, 4 KiB pwrite() at random pages of the file being flushed"
        return res

    # 3 ----------------------------------------------------------------------------------------
    def recovery(self) -> dict[str, Any]:
        size, R = self.size, self.repeat
        raw = RawSocket(size)
        self.cleanups.append(raw.close)
        res: dict[str, Any] = {"size_bytes": size, "fractions": {}}
        try:
            for pct in self.dirty:
                runs = []
                for rep in range(R):
                    fs = self.rmemfs(f"rec-{pct:g}-{rep}")
                    f = fs.mp / "data.dat"
                    seq_write(f, size, data_block(MiB, 200 + rep))
                    fs.flush()
                    dirty_fraction(f, size, pct, seed=300 + rep + int(pct * 10))
                    runs.append(self.one_recovery(fs, raw, f"{pct:g}% rep {rep + 1}/{R}"))
                    fs.destroy()
                res["fractions"][f"{pct:g}"] = self.recovery_summary(pct, runs)
            res["small_files"] = self.small_files(raw)
            res["lazy"] = self.lazy_recovery()
        finally:
            raw.close()
        return res

    def lazy_recovery(self) -> dict[str, Any]:
        """Issue 11's speed figures: lazy (the default) beside eager recovery, per filesystem size.

        recovery.lazy.sizes[<bytes>] = {eager, lazy, lazy_read, eager_read}; each run is one file of that
        size with 1 % scattered dirty pages, flushed, SIGKILLed and recovered (--no-liveness-check: the
        liveness wait is a separate phase and is kept out of time_to_mount; its phase is reported apart).
        - time_to_mount_s: the recovery report's time_to_mount_s (wall incl. CLI start beside it);
        - first_read: 200 (quick: 20) pread()s of 4 KiB at distinct random pages of the file's last half
          (far from the load's front), timed in this process right after the lazy mount, p50/p99;
        - load throughput: the background load's pages/s (report rewritten when the load completes) vs the
          eager recovery's "baseline load" phase bytes/s: load_throughput_ratio (target >= 0.9);
        - seq read: a second lazy recovery, then a sequential read of the whole file (at most 1 GiB) in 1 MiB
          blocks started right after the mount; vs eager recovery time + the same read on the eagerly
          recovered fs: seq_read_ratio (target <= 1.2).
        """
        sizes = [max(MiB, parse_size(x) // MiB * MiB) for x in self.args.lazy_sizes.split(",") if x.strip()]
        nreads = 20 if self.args.quick else 200
        out: dict[str, Any] = {"dirty_percent": 1.0, "first_reads": nreads, "sizes": {}}
        for size in sizes:
            try:
                out["sizes"][str(size)] = self.lazy_one_size(size, nreads)
            except Exception as e:     # one size too big for memory must not lose the others
                log(f"lazy recovery {human(size)} failed: {e!r}")
                out["sizes"][str(size)] = {"error": repr(e)}
        return out

    def _lazy_fs(self, name: str, size: int, seed: int) -> Rmemfs:
        fs = self.rmemfs(name)
        seq_write(fs.mp / "data.dat", size, data_block(MiB, seed))
        fs.flush()
        dirty_fraction(fs.mp / "data.dat", size, 1.0, seed=seed + 1)
        fs.kill()
        drop_caches()
        return fs

    @staticmethod
    def _seq_read(path: Path, nbytes: int) -> float:
        buf = bytearray(MiB)
        t = time.perf_counter()
        done = 0
        with open(path, "rb", buffering=0) as fh:
            while done < nbytes and (n := fh.readinto(buf)):
                done += n
        return time.perf_counter() - t

    def _wait_load(self, fs: Rmemfs, report: Path, timeout: float = 3600) -> dict[str, Any]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                rep = json.loads(report.read_text())
            except ValueError:      # caught mid-rewrite
                rep = {}
            if rep.get("background_load", {}).get("load_seconds") is not None:
                return rep
            time.sleep(0.1)
        raise RuntimeError(f"background load not done after {timeout:.0f} s")

    def lazy_one_size(self, size: int, nreads: int) -> dict[str, Any]:
        tag = human(size).replace(" ", "")
        read_bytes = min(size, GiB)
        res: dict[str, Any] = {"size_bytes": size, "seq_read_bytes": read_bytes}
        # eager: time to mount (= total) and the sequential read on the eagerly recovered fs
        fs = self._lazy_fs(f"lz-eager-{tag}", size, 500)
        rep, wall = fs.recover(self.work / "eager.json", "eager")
        base = rep["phases"].get("baseline load", {})
        eager_read = self._seq_read(fs.mp / "data.dat", read_bytes)
        res["eager"] = {"time_to_mount_s": rep.get("time_to_mount_s") or rep["total_seconds"], "wall_s": wall,
                        "total_s": rep["total_seconds"], "phases_s": {k: v["seconds"] for k, v in rep["phases"].items()},
                        "dirty_bytes": rep["dirty_bytes_fetched"], "baseline_bytes": rep["baseline_bytes"],
                        "baseline_load_bytes_per_s": (base.get("bytes") or rep["baseline_bytes"])
                        / base["seconds"] if base.get("seconds") else None,
                        "seq_read_s": eager_read}
        fs.destroy()
        # lazy: time to mount, then first reads of non-resident pages while the load runs
        fs = self._lazy_fs(f"lz-lazy-{tag}", size, 500)
        report = self.work / "lazy.json"
        rep, wall = fs.recover(report, "lazy")
        npages = size // PAGE
        pages = random.Random(7).sample(range(npages // 2, npages), min(nreads, npages - npages // 2))
        lat = []
        fd = os.open(fs.mp / "data.dat", os.O_RDONLY)
        try:
            for pg in pages:
                t = time.perf_counter()
                os.pread(fd, PAGE, pg * PAGE)
                lat.append(time.perf_counter() - t)
        finally:
            os.close(fd)
        done = self._wait_load(fs, report)
        bl = done["background_load"]
        lat.sort()
        # The bound is "0.2 s plus the dirty fetch": what the mount took beyond the fetch, apart.
        res["lazy"] = {"time_to_mount_s": rep["time_to_mount_s"], "wall_s": wall,
                       "beyond_dirty_fetch_s": rep["time_to_mount_s"] - rep["phases"].get("page fetch", {}).get("seconds", 0.0),
                       "phases_s": {k: v["seconds"] for k, v in rep["phases"].items()},
                       "dirty_bytes": rep["dirty_bytes_fetched"],
                       "first_read": {"reads": len(lat), "p50": percentile(lat, 50), "p99": percentile(lat, 99),
                                      "max": lat[-1] if lat else None, "unit": "s"},
                       "background_load": bl,
                       "load_bytes_per_s": bl["load_pages_per_s"] * PAGE if bl.get("load_pages_per_s") else None}
        fs.destroy()
        # lazy + sequential read right after the mount
        fs = self._lazy_fs(f"lz-seq-{tag}", size, 500)
        _, wall = fs.recover(self.work / "lazy-seq.json", "lazy")
        t_read = self._seq_read(fs.mp / "data.dat", read_bytes)
        res["lazy_read"] = {"recover_wall_s": wall, "seq_read_s": t_read}
        fs.destroy()
        e, lz = res["eager"], res["lazy"]
        res["time_to_mount_ratio_lazy_to_eager"] = lz["time_to_mount_s"] / e["time_to_mount_s"]
        res["load_throughput_ratio"] = (lz["load_bytes_per_s"] / e["baseline_load_bytes_per_s"]
                                        if lz["load_bytes_per_s"] and e["baseline_load_bytes_per_s"] else None)
        # both sides from the CLI's start: recover wall + read
        res["seq_read_ratio"] = (wall + t_read) / (e["wall_s"] + eager_read)
        log(f"lazy {human(size)}: mount lazy {lz['time_to_mount_s']:.3f} s vs eager {e['time_to_mount_s']:.3f} s; "
            f"first read p50 {lz['first_read']['p50'] * 1e3:.2f} ms p99 {lz['first_read']['p99'] * 1e3:.2f} ms; "
            f"load ratio {res['load_throughput_ratio']}; seq read ratio {res['seq_read_ratio']:.2f}")
        return res

    def one_recovery(self, fs: Rmemfs, raw: RawSocket, label: str) -> dict[str, Any]:
        segs = fs.segment_files()
        fs.kill()
        # The limit's disk half is measured first, on a quiet machine: after the recovery, the new
        # daemon's first flush would be writing to the same disk.
        drop_caches()
        buf = bytearray(MiB)
        t = time.perf_counter()
        nread = 0
        for p in segs:
            with open(p, "rb", buffering=0) as fh:
                while n := fh.readinto(buf):
                    nread += n
        t_read = time.perf_counter() - t
        cold = drop_caches()
        rep, wall = fs.recover(self.work / "recovery.json")
        dirty_bytes = rep["dirty_bytes_fetched"]
        t_raw = raw.transfer(dirty_bytes) if dirty_bytes else 0.0
        limit = t_read + t_raw
        phases = {k: v["seconds"] for k, v in rep["phases"].items()}
        log(f"recovery {label}: total {rep['total_seconds']:.3f} s (wall {wall:.3f} s), limit {limit:.3f} s "
            f"[baseline read {t_read:.3f} s + raw {human(dirty_bytes)} {t_raw:.3f} s] "
            + ", ".join(f"{k} {v:.3f}" for k, v in phases.items()))
        return {"total_s": rep["total_seconds"], "wall_s": wall, "phases_s": phases,
                "baseline_bytes": rep["baseline_bytes"], "dirty_bytes": dirty_bytes,
                "dirty_pages": rep["dirty_pages_fetched"], "files": rep["files"],
                "limit_s": limit, "limit_baseline_read_s": t_read, "limit_baseline_read_bytes": nread,
                "limit_raw_socket_s": t_raw, "caches_dropped": cold}

    @staticmethod
    def recovery_summary(pct: float, runs: list[dict[str, Any]]) -> dict[str, Any]:
        phases = sorted({k for r in runs for k in r["phases_s"]}, key=lambda k: list(runs[0]["phases_s"]).index(k)
                        if k in runs[0]["phases_s"] else 99)
        # Each run is compared with the limit measured beside it (the disk's speed drifts between runs),
        # and the median of those ratios is the figure.
        ratios = [r["total_s"] / r["limit_s"] for r in runs if r["limit_s"]]
        return {
            "dirty_percent": pct,
            "total": summary([r["total_s"] for r in runs], "s"),
            "wall_including_cli_start": summary([r["wall_s"] for r in runs], "s"),
            "phases": {k: summary([r["phases_s"].get(k, 0.0) for r in runs], "s") for k in phases},
            "limit": summary([r["limit_s"] for r in runs], "s"),
            "limit_baseline_read": summary([r["limit_baseline_read_s"] for r in runs], "s"),
            "limit_raw_socket": summary([r["limit_raw_socket_s"] for r in runs], "s"),
            "baseline_bytes": runs[0]["baseline_bytes"], "dirty_bytes": summary([r["dirty_bytes"] for r in runs],
                                                                                 "bytes"),
            "ratio_to_limit": statistics.median(ratios) if ratios else None,
            "ratios_per_run": ratios,
            "caches_dropped": all(r["caches_dropped"] for r in runs),
            "runs": runs,
        }

    def small_files(self, raw: RawSocket) -> dict[str, Any]:
        n, R = self.args.small_files, self.repeat
        runs = []
        for rep in range(R):
            fs = self.rmemfs(f"small-{rep}")
            t = time.perf_counter()
            body = data_block(PAGE, 11)
            per_dir = 1000
            for i in range(n):
                d = fs.mp / f"d{i // per_dir:03d}"
                if i % per_dir == 0:
                    d.mkdir()
                (d / f"f{i:05d}").write_bytes(body)
            t_create = time.perf_counter() - t
            fs.flush()
            for i in random.Random(rep).sample(range(n), min(n, 10)):    # a few dirty pages
                p = fs.mp / f"d{i // per_dir:03d}" / f"f{i:05d}"
                with open(p, "r+b") as fh:
                    fh.write(data_block(PAGE, 1000 + i))
            r = self.one_recovery(fs, raw, f"{n} small files rep {rep + 1}/{R}")
            r["create_s"] = t_create
            runs.append(r)
            fs.destroy()
        out = self.recovery_summary(0.0, runs)
        out.pop("dirty_percent")
        out["files"] = n
        out["dirty_files"] = min(n, 10)
        return out

    # 4 ----------------------------------------------------------------------------------------
    def transport(self) -> dict[str, Any]:
        size = self.args.transport_size and parse_size(self.args.transport_size) or self.size
        try:
            import bench_transport
        except ImportError as e:
            return {"error": f"tools/bench_transport.py not importable: {e}"}
        log(f"transport: {human(size)}, {self.args.transport_pages} random pages, {self.repeat} runs each")
        r = bench_transport.run(size, self.args.transport_pages, self.repeat)
        res = {
            "size_bytes": r["size"], "pages": r["pages"], "data_verified": r["data_verified"],
            "raw_socket": summary([r["size"] / t for t in r["raw_times_s"]], "bytes/s"),
            "software_1MiB_reads": summary([r["size"] / t for t in r["software_1mib_times_s"]], "bytes/s"),
            "software_4KiB_scattered": summary([r["pages"] / t for t in r["software_4kib_times_s"]], "pages/s"),
        }
        res["ratio_software_to_raw"] = res["software_1MiB_reads"]["median"] / res["raw_socket"]["median"]
        log(f"transport: raw {res['raw_socket']['median'] / MiB:.0f} MiB/s, software 1 MiB "
            f"{res['software_1MiB_reads']['median'] / MiB:.0f} MiB/s, 4 KiB "
            f"{res['software_4KiB_scattered']['median']:.0f} pages/s")
        return res

    # 6 ----------------------------------------------------------------------------------------
    def databases(self) -> dict[str, Any]:
        import bench_databases
        return bench_databases.run(self)

    # 7 ----------------------------------------------------------------------------------------
    def store(self) -> dict[str, Any]:
        import bench_store
        return bench_store.run(self)

    # 8 ----------------------------------------------------------------------------------------
    def failover(self) -> dict[str, Any]:
        import bench_failover
        return bench_failover.run(self, log)

    # 9 ----------------------------------------------------------------------------------------
    def heartbeat(self) -> dict[str, Any]:
        import bench_heartbeat
        return bench_heartbeat.run(self, log)

    # ------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        started = datetime.datetime.now(datetime.UTC)
        self.report = {"machine": machine_info(self.work), "versions": versions(),
                       "parameters": {"size_bytes": self.size, "dirty_percent": self.dirty,
                                      "repeat": self.repeat, "quick": self.args.quick,
                                      "small_files": self.args.small_files,
                                      "random_pages": self.args.random_pages,
                                      "transport_pages": self.args.transport_pages,
                                      "db_commits": self.args.db_commits, "db_size_bytes": self.args.db_size,
                                      "failover_runs": self.args.failover_runs,
                                      "failover_cost_pairs": self.args.failover_cost_pairs,
                                      "workdir": str(self.work), "command": " ".join(sys.argv)},
                       "started": started.isoformat(timespec="seconds")}
        sections: list[tuple[str, Callable[[], Any]]] = [
            ("write", self.write_path), ("flush", self.flush_and_footprint),
            ("recovery", self.recovery), ("transport", self.transport), ("databases", self.databases),
            ("store", self.store), ("failover", self.failover), ("heartbeat", self.heartbeat)]
        only = set(self.args.only.split(",")) if self.args.only else None
        for name, fn in sections:
            if only and name not in only:
                continue
            log(f"== {name} ==")
            t = time.monotonic()
            try:
                out = fn()
            except Exception as e:
                log(f"{name} FAILED: {e!r}")
                self.report[name] = {"error": repr(e)}
                continue
            if name == "flush":
                self.report["flush"], self.report["footprint"] = out
            else:
                self.report[name] = out
            self.report.setdefault("section_seconds", {})[name] = time.monotonic() - t
        self.report["targets"] = targets(self.report)
        self.report["elapsed_s"] = time.monotonic() - T0
        (self.out / "report.json").write_text(json.dumps(self.report, indent=1, default=str) + "\n")
        self.report["plots"] = plots(self.report, self.out)
        (self.out / "report.json").write_text(json.dumps(self.report, indent=1, default=str) + "\n")
        return self.report


# --- targets, table, plots ---------------------------------------------------------------------

def _get(doc: dict[str, Any], *keys: Any) -> Any:
    for k in keys:
        if not isinstance(doc, dict) or k not in doc:
            return None
        doc = doc[k]
    return doc


def targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets: value, the bound, pass/fail (None when not measured)."""
    out = []

    def add(name: str, value: Any, op: str, bound: float, unit: str = "×") -> None:
        ok = None if value is None else (value >= bound if op == ">=" else value <= bound if op == "<=" else
                                         value < bound)
        out.append({"target": name, "value": value, "op": op, "bound": bound, "unit": unit, "pass": ok})

    w = _get(r, "write", "ratios") or {}
    add(f"sequential write() {human(_get(r, 'parameters', 'size_bytes') or 0)} vs tmpfs",
        w.get("seq_write_rmemfs_to_tmpfs"), ">=", 0.35)
    add("mmap+memcpy+msync vs tmpfs mmap", w.get("mmap_rmemfs_to_tmpfs"), ">=", 0.35)
    add("tracking on vs off, write() slowdown", w.get("tracking_on_slowdown_seq_write"), "<=", 0.05, "fraction")
    add("tracking on vs off, mmap slowdown", w.get("tracking_on_slowdown_mmap"), "<=", 0.05, "fraction")
    if "slowdown_vs_compare_tree_seq_write" in w:     # e.g. the fence check's cost: --compare-tree without it
        for key, label in (("seq_write", "write()"), ("mmap", "mmap"), ("random_4KiB", "random 4 KiB")):
            add(f"vs --compare-tree, {label} slowdown", w.get(f"slowdown_vs_compare_tree_{key}"), "<=", 0.02,
                "fraction")
    fl = _get(r, "flush", "ratios") or {}
    add("full flush throughput vs dd conv=fsync", fl.get("full_flush_to_dd_throughput"), ">=", 0.8)
    one = [v for k, v in fl.items() if k.startswith("flush_1pct")]
    add("1%-dirty flush time vs full flush", one[0] if one else None, "<=", 0.03, "fraction")
    add("recovery, 10% scattered dirty, vs limit", _get(r, "recovery", "fractions", "10", "ratio_to_limit"),
        "<=", 1.3)
    add(f"{_get(r, 'recovery', 'small_files', 'files')} small files, few dirty pages: recovered and mounted",
        _get(r, "recovery", "small_files", "total", "median"), "<", 5.0, "s")
    add("software transport 1 MiB reads vs raw socket", _get(r, "transport", "ratio_software_to_raw"), ">=", 0.8)
    add("software transport 4 KiB scattered reads", _get(r, "transport", "software_4KiB_scattered", "median"),
        ">=", 100_000, "pages/s")
    st = _get(r, "store", "ratios") or {}
    add("RADOS full flush vs raw aio write, same run", st.get("flush_to_raw_write"), ">=", 0.8)
    add("RADOS full load vs raw aio read, same run", st.get("load_to_raw_read"), ">=", 0.8)
    import bench_failover
    bench_failover.targets(r, add)
    import bench_heartbeat
    bench_heartbeat.targets(r, add)
    return out


def _fmt(v: Any, unit: str) -> str:
    if v is None:
        return "n/a"
    if unit == "bytes/s":
        return f"{v / MiB:,.0f} MiB/s"
    if unit == "pages/s":
        return f"{v:,.0f} pages/s"
    if unit == "s":
        return f"{v:.3f} s"
    if unit == "fraction":
        return f"{v * 100:+.1f} %"
    if unit == "bytes":
        return human(v)
    return f"{v:.2f}×"


def _spread(fig: dict[str, Any] | None) -> str:
    if not fig or fig.get("median") is None:
        return "n/a"
    u = fig["unit"]
    return f"{_fmt(fig['median'], u)} [{_fmt(fig['min'], u)} .. {_fmt(fig['max'], u)}]"


def table(r: dict[str, Any]) -> str:
    lines: list[str] = []
    wt = _get(r, "write", "targets") or {}
    if wt:
        lines.append("write path (median [min .. max])")
        lines.append(f"  {'target':<26}{'write() 1 MiB':<38}{'mmap+memcpy+msync':<38}mmap random 4 KiB")
        for name, d in wt.items():
            lines.append(f"  {name:<26}{_spread(d['seq_write_1MiB']) + ' ':<38}{_spread(d['mmap_memcpy_msync']) + ' ':<38}"
                         f"{_spread(d['mmap_random_4KiB'])}")
    if isinstance(r.get("flush"), dict) and "full" in r["flush"]:
        f = r["flush"]
        lines.append("flush")
        lines.append(f"  full ({human(f['full']['bytes_written']['median'])}): {_spread(f['full']['duration'])}; "
                     f"dd conv=fsync same bytes {_spread(f['full']['dd_conv_fsync_same_bytes'])}")
        for k, v in f["incremental"].items():
            lines.append(f"  {k:>5}% dirty ({human(v['bytes_written']['median'])}): {_spread(v['duration'])}; "
                         f"dd {_spread(v['dd_conv_fsync_same_bytes'])}")
        s = f["stall"]
        lines.append(f"  writer latency during a full flush: p50 {s['during_flush']['p50'] * 1e3:.2f} ms, "
                     f"p99 {s['during_flush']['p99'] * 1e3:.2f} ms, max {s['during_flush']['max'] * 1e3:.1f} ms "
                     f"({s['during_flush']['writes']} writes); without: p50 {s['without_flush']['p50'] * 1e3:.2f} "
                     f"ms, p99 {s['without_flush']['p99'] * 1e3:.2f} ms, max {s['without_flush']['max'] * 1e3:.1f} ms")
    rec = r.get("recovery") or {}
    if "fractions" in rec:
        lines.append("recovery (software transport, same host, caches dropped)")
        for k, v in rec["fractions"].items():
            ph = ", ".join(f"{n} {p['median']:.3f}" for n, p in v["phases"].items())
            lines.append(f"  {k:>5}% dirty: total {_spread(v['total'])}; limit {v['limit']['median']:.3f} s "
                         f"-> {v['ratio_to_limit']:.2f}×  ({ph})")
        sf = rec.get("small_files")
        if sf:
            lines.append(f"  {sf['files']} small files, {sf['dirty_files']} dirty: total {_spread(sf['total'])}, "
                         f"wall incl. CLI start {_spread(sf['wall_including_cli_start'])}")
        for k, v in ((rec.get("lazy") or {}).get("sizes") or {}).items():
            if "error" in v:
                lines.append(f"  lazy {human(int(k))}: failed: {v['error']}")
                continue
            e, lz, fr = v["eager"], v["lazy"], v["lazy"]["first_read"]
            lr = v["load_throughput_ratio"]
            lines.append(f"  lazy vs eager, {human(int(k))}, 1% dirty: mount {lz['time_to_mount_s']:.3f} s "
                         f"({lz.get('beyond_dirty_fetch_s', 0.0):.3f} s beyond the dirty fetch; wall incl. CLI start "
                         f"{lz['wall_s']:.3f} s) vs {e['time_to_mount_s']:.3f} s (liveness check skipped); first 4 KiB read p50 "
                         f"{fr['p50'] * 1e3:.2f} ms p99 {fr['p99'] * 1e3:.2f} ms; load throughput "
                         f"{'n/a' if lr is None else f'{lr:.2f}'}× eager; seq read of {human(v['seq_read_bytes'])} "
                         f"{v['lazy_read']['recover_wall_s'] + v['lazy_read']['seq_read_s']:.2f} s vs "
                         f"{e['wall_s'] + e['seq_read_s']:.2f} s -> {v['seq_read_ratio']:.2f}×")
    tr = r.get("transport") or {}
    if "raw_socket" in tr:
        lines.append("transport (loopback)")
        lines.append(f"  raw socket {_spread(tr['raw_socket'])}; software 1 MiB {_spread(tr['software_1MiB_reads'])}; "
                     f"4 KiB scattered {_spread(tr['software_4KiB_scattered'])}")
    fp = r.get("footprint") or {}
    if "per_GiB" in fp:
        g = fp["per_GiB"]
        lines.append("footprint per GiB of file data")
        lines.append(f"  region memory (the region files' allocated pages) {human(g['region_resident_bytes'])}")
        lines.append(f"  fs process RSS {human(g['fs_rss_bytes'])} (anon {human(g['fs_rss_anon_bytes'])}, anon growth "
                     f"{human(g['fs_rss_anon_growth_bytes'])}, RSS growth {human(g['fs_rss_growth_bytes'])}); "
                     f"exporter RSS {human(g['exporter_rss_bytes'])} "
                     f"(anon {human(g['exporter_rss_anon_bytes'])})")
        lines.append(f"  dirty list: sequential {human(g['dirty_list_bytes_sequential'])}, worst case (every page "
                     f"scattered) {human(g['dirty_list_bytes_all_pages_scattered_worst_case'])}; dedup map "
                     f"{human(g['dedup_map_bytes'])} per list")
    if isinstance(r.get("databases"), dict):
        import bench_databases
        lines += bench_databases.table(r["databases"])
    if isinstance(r.get("store"), dict):
        import bench_store
        lines += bench_store.table(r["store"])
    if isinstance(r.get("failover"), dict):
        import bench_failover
        lines += bench_failover.table(r["failover"])
    if isinstance(r.get("heartbeat"), dict):
        import bench_heartbeat
        lines += bench_heartbeat.table(r["heartbeat"])
    lines.append("targets")
    for t in r.get("targets", []):
        mark = {True: "PASS", False: "FAIL", None: "n/a"}[t["pass"]]
        bound = _fmt(t["bound"], t["unit"]) if t["unit"] != "fraction" else f"{t['bound'] * 100:.0f} %"
        lines.append(f"  [{mark:4}] {t['target']:<58} {_fmt(t['value'], t['unit']):>18}  (target {t['op']} {bound})")
    for name in ("write", "flush", "recovery", "transport", "databases", "store", "failover", "heartbeat"):
        if isinstance(r.get(name), dict) and "error" in r[name]:
            lines.append(f"  section {name} failed: {r[name]['error']}")
    return "\n".join(lines)


def plots(r: dict[str, Any], out: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    made = []

    def save(fig: Any, name: str) -> str:
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        return name

    rec = _get(r, "recovery", "fractions")
    if rec:
        # Phases overlap (the baseline load and the page fetch run together), so they stand beside the
        # total rather than stacked into it.
        fig, ax = plt.subplots(figsize=(8, 4.5))
        labels = list(rec)
        phases: list[str] = []
        for v in rec.values():
            phases += [p for p in v["phases"] if p not in phases]
        series = [("total", [rec[k]["total"]["median"] for k in labels])]
        series += [(p, [rec[k]["phases"].get(p, {}).get("median") or 0.0 for k in labels]) for p in phases]
        width = 0.8 / len(series)
        for i, (name, vals) in enumerate(series):
            ax.bar([j - 0.4 + (i + 0.5) * width for j in range(len(labels))], vals, width, label=name,
                   color="black" if name == "total" else None)
        ax.plot(range(len(labels)), [rec[k]["limit"]["median"] for k in labels], "k--o",
                label="limit: cold baseline read + raw socket")
        for j, k in enumerate(labels):
            ratios = rec[k].get("ratios_per_run") or []
            if ratios:
                ax.annotate(f"{rec[k]['ratio_to_limit']:.2f}× ({min(ratios):.2f}–{max(ratios):.2f})",
                            (j, max(rec[k]["total"]["median"], rec[k]["limit"]["median"])), textcoords="offset points",
                            xytext=(0, 6), ha="center", fontsize=8)
        ax.set_xticks(range(len(labels)), [f"{k} %" for k in labels])
        ax.set_xlabel("dirty pages (% of the file, scattered); label: median per-run ratio to the limit (range)")
        ax.set_ylabel("seconds (median)")
        ax.set_title(f"rmemfs recovery of {human(r['recovery']['size_bytes'])}: total and phases")
        ax.set_ylim(top=ax.get_ylim()[1] * 1.12)
        ax.legend(fontsize=7, loc="upper left")
        made.append(save(fig, "recovery.png"))
    lz = {int(k): v for k, v in (_get(r, "recovery", "lazy", "sizes") or {}).items() if "error" not in v}
    if lz:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        xs = sorted(lz)
        for mode, style in (("eager", "k-o"), ("lazy", "b-s")):
            ax.plot([x / GiB for x in xs], [lz[x][mode]["time_to_mount_s"] for x in xs], style, label=mode)
        ax.set_xlabel("filesystem size (GiB), 1 % dirty")
        ax.set_ylabel("time to a usable mount (s), liveness check excluded")
        ax.set_title("rmemfs recovery: time to mount, lazy vs eager")
        ax.legend()
        made.append(save(fig, "recovery_lazy.png"))
    wt = _get(r, "write", "targets")
    if wt:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.5))
        names = list(wt)
        x = range(len(names))
        for i, (key, lab) in enumerate((("seq_write_1MiB", "write() 1 MiB"), ("mmap_memcpy_msync", "mmap+memcpy+msync"))):
            med = [wt[n][key]["median"] / MiB for n in names]
            err = [[m - wt[n][key]["min"] / MiB for m, n in zip(med, names, strict=True)],
                   [wt[n][key]["max"] / MiB - m for m, n in zip(med, names, strict=True)]]
            a1.bar([j + i * 0.4 for j in x], med, 0.4, yerr=err, label=lab, capsize=3)
        a1.set_xticks([j + 0.2 for j in x], [n.replace("_", "\n", 1) for n in names], fontsize=8)
        a1.set_ylabel("MiB/s")
        a1.set_title(f"sequential write, {human(r['write']['size_bytes'])}")
        a1.legend(fontsize=8)
        med = [wt[n]["mmap_random_4KiB"]["median"] for n in names]
        a2.bar(list(x), med, 0.5, color="tab:green")
        a2.set_xticks(list(x), [n.replace("_", "\n", 1) for n in names], fontsize=8)
        a2.set_ylabel("pages/s")
        a2.set_title("random 4 KiB writes through mmap (+msync)")
        made.append(save(fig, "write.png"))
    fl = r.get("flush")
    if isinstance(fl, dict) and "incremental" in fl:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        inc = fl["incremental"]
        xs = [v["dirty_percent"] for v in inc.values()]
        ys = [v["duration"]["median"] for v in inc.values()]
        err = [[v["duration"]["median"] - v["duration"]["min"] for v in inc.values()],
               [v["duration"]["max"] - v["duration"]["median"] for v in inc.values()]]
        ax.errorbar(xs, ys, yerr=err, fmt="o-", capsize=3, label="rmemfs incremental flush")
        ax.plot(xs, [v["dd_conv_fsync_same_bytes"]["median"] for v in inc.values()], "s--",
                label="dd bs=1M conv=fsync, same bytes")
        ax.axhline(fl["full"]["duration"]["median"], color="gray", ls=":", label="full baseline flush")
        ax.set_xscale("log")
        ax.set_xlabel("dirty pages (% of the file, scattered)")
        ax.set_ylabel("seconds (median)")
        ax.set_title(f"flush time, {human(fl['size_bytes'])} file")
        ax.legend(fontsize=8)
        made.append(save(fig, "flush.png"))
    if isinstance(r.get("databases"), dict) and "targets" in r["databases"]:
        import bench_databases
        made += [p for p in [bench_databases.plot(r["databases"], out, plt)] if p]
    return made


# --- machine and versions ---------------------------------------------------------------------

def machine_info(work: Path) -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError):
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = int(line.split()[1]) * KiB
    fstype = run_cmd(["stat", "-f", "-c", "%T", str(work)]).stdout.strip()
    load = os.getloadavg()
    return {"cpu_model": cpu, "cores": os.cpu_count(), "kernel": platform.release(), "memory_bytes": mem,
            "hostname": socket.gethostname(), "backend_filesystem": fstype, "backend_dir": str(work),
            "loadavg_at_start": load, "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def versions() -> dict[str, Any]:
    v: dict[str, Any] = {"python": platform.python_version()}
    for mod in ("pyfuse3", "trio", "xxhash", "matplotlib"):
        with contextlib.suppress(Exception):
            m = __import__(mod)
            v[mod] = getattr(m, "__version__", None) or getattr(m, "VERSION", None)
    with contextlib.suppress(Exception):
        import rmemfs
        v["rmemfs"] = getattr(rmemfs, "__version__", None)
    v["rmemfs_git"] = run_cmd(["git", "-C", str(ROOT), "describe", "--always", "--dirty"]).stdout.strip()
    v["libfuse3"] = run_cmd(["fusermount3", "--version"]).stdout.strip() or run_cmd(
        ["fusermount3", "--version"]).stderr.strip()
    v["fuse_overlayfs"] = (run_cmd(["fuse-overlayfs", "--version"]).stdout.strip().splitlines() or [""])[-1]
    return v


# --- main ----------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default=None, help="file size per test, e.g. 256M, 1G (default 1G; --quick 32M)")
    ap.add_argument("--dirty", default="1,10,50,100", help="dirty percentages, comma separated (default 1,10,50,100)")
    ap.add_argument("--quick", action="store_true", help="small sizes, 2 runs each: a smoke run in < 2 minutes")
    ap.add_argument("--out", default=None, help="output folder (default bench-out/<date>)")
    ap.add_argument("--repeat", type=int, default=None, help="runs per figure (default 3; --quick 2)")
    ap.add_argument("--lazy-sizes", default=None, help="sizes for lazy vs eager recovery (default 1G,4G,8G; "
                    "--quick: --size)")
    ap.add_argument("--small-files", type=int, default=None, help="files in the small-file recovery (default 10000)")
    ap.add_argument("--random-pages", type=int, default=None, help="4 KiB mmap writes per run (default 20000)")
    ap.add_argument("--transport-size", default=None, help="bytes for the transport test (default --size)")
    ap.add_argument("--transport-pages", type=int, default=None, help="scattered pages read (default 100000)")
    ap.add_argument("--workdir", default="/var/tmp", help="where backends live (a disk; default /var/tmp)")
    ap.add_argument("--compare-tree", default=None, metavar="DIR",
                    help="write section: also run rmemfs from the checkout DIR and report the slowdown against it "
                         "(e.g. a checkout with one change reverted)")
    ap.add_argument("--only", default="", help="run only these sections: write,flush,recovery,transport,databases,"
                    "store,failover,heartbeat")
    ap.add_argument("--db-commits", type=int, default=None, help="transactions per database run (default 2000)")
    ap.add_argument("--db-size", default=None, help="file for the random 4 KiB runs (default 64M; --quick 4M)")
    ap.add_argument("--failover-runs", type=int, default=None,
                    help="failover section: runs per signal, SIGKILL and SIGSTOP (default 20; --quick 1)")
    ap.add_argument("--failover-cost-pairs", type=int, default=None,
                    help="failover section: write-cost pairs, a standby watching vs none (default 8; --quick 1; "
                         "0 skips the write cost)")
    args = ap.parse_args(argv)
    q = args.quick
    args.size = args.size or ("32M" if q else "1G")
    args.repeat = args.repeat or (2 if q else 3)
    args.lazy_sizes = args.lazy_sizes or (args.size if q else "1G,4G,8G")
    args.small_files = args.small_files if args.small_files is not None else (1000 if q else 10000)
    args.random_pages = args.random_pages or (2000 if q else 20000)
    args.transport_pages = args.transport_pages or (20000 if q else 100000)
    args.db_commits = args.db_commits or (100 if q else 2000)
    args.db_size = parse_size(args.db_size or ("4M" if q else "64M"))
    args.failover_runs = args.failover_runs or (1 if q else 20)
    if args.failover_cost_pairs is None:
        args.failover_cost_pairs = 1 if q else 8
    args.out = args.out or str(ROOT / "bench-out" / datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    if os.geteuid() != 0:
        print("bench: must run as root (it mounts FUSE and drops caches)", file=sys.stderr)
        return 2
    bench = Bench(args)
    log(f"rmemfs benchmark: size {human(bench.size)}, dirty {args.dirty} %, {args.repeat} runs per figure, "
        f"output {bench.out}")
    old = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        report = bench.run()
    finally:
        bench.cleanup()
        signal.signal(signal.SIGTERM, old)
    print(table(report))
    print(f"\nreport: {bench.out / 'report.json'}; plots: " + ", ".join(str(bench.out / p) for p in report["plots"]))
    print(f"elapsed {time.monotonic() - T0:.0f} s")
    return 0 if not any(isinstance(report.get(s), dict) and "error" in report[s]
                        for s in ("write", "flush", "recovery", "transport", "store")) else 1


if __name__ == "__main__":
    sys.exit(main())
