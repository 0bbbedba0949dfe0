#!/usr/bin/env python3
"""tools/bench's heartbeat section (issue 12): the source's longest event-loop stall under load.

The heartbeat word is written by the filesystem's trio event loop (``mount._heartbeat``) every
``heartbeat_interval``; whatever holds the loop (a namespace checkpoint, a journal compaction, the
flush's snapshot, a large write) delays the next beat. A thread here maps the mount's ctl region
file read-only and polls the word every 0.5 ms; the gap between two changes is what a standby would
see as silence, and ``gap - heartbeat_interval`` is the stall. Each workload runs in a child process
(so that the poller is not held up by this process's GIL) and gets its own figures:

* ``write 1 MiB``: SIZE bytes in 1 MiB write() calls into a new file;
* ``flush sequential``: the flush of those dirty pages (one long run);
* ``mmap scattered``: PAGES random 4 KiB pages written through mmap, then ``flush scattered`` (as many
  runs as pages: the snapshot's worst case);
* ``creates+unlinks``: FILES files created and unlinked in one directory (the journal's checkpoints
  and compactions), then ``files kept``: FILES files left, and ``flush namespace`` of them;
* ``churn beside kept``: 2 x FILES files created and unlinked beside those kept, so that the journal's
  compactions checkpoint a namespace of FILES files (the longest stall before issue 12's slices).

As a script it is also the child: ``work KIND PATH N``.
"""
from __future__ import annotations

import mmap
import os
import random
import statistics
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

MiB, PAGE = 1 << 20, 4096
HERE = Path(__file__).resolve()


# --- the child ---------------------------------------------------------------------------------

def work(kind: str, path: str, n: int) -> None:
    if kind == "write":
        block = random.Random(1).randbytes(MiB)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for _ in range(n // MiB):
                os.write(fd, block)
        finally:
            os.close(fd)
    elif kind == "mmap":
        fd = os.open(path, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            with mmap.mmap(fd, size) as mm:
                page = b"\x5a" * PAGE
                for p in random.Random(2).sample(range(size // PAGE), n):
                    mm[p * PAGE:(p + 1) * PAGE] = page
                mm.flush()
        finally:
            os.close(fd)
    elif kind in ("churn", "keep"):
        d = Path(path)
        d.mkdir(exist_ok=True)
        for i in range(n):
            f = d / f"f{i:06d}"
            f.write_bytes(b"x")
            if kind == "churn":
                f.unlink()
    else:
        raise SystemExit(f"unknown work {kind}")


# --- the section -------------------------------------------------------------------------------

class Poller:
    """Polls the heartbeat word of a ctl region file; ``take()`` returns the gaps seen since the last call."""

    def __init__(self, ctl_file: Path) -> None:
        from rmemfs.dirty import W_HEARTBEAT
        fd = os.open(ctl_file, os.O_RDONLY)
        try:
            self.mm = mmap.mmap(fd, PAGE, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(fd)
        self.offset = W_HEARTBEAT * 8
        self.gaps: list[tuple[float, float]] = []      # (gap, monotonic time it ended)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        last, at = struct.unpack_from("<Q", self.mm, self.offset)[0], time.monotonic()
        while not self.stop.is_set():
            beat = struct.unpack_from("<Q", self.mm, self.offset)[0]
            now = time.monotonic()
            if beat != last:
                with self.lock:
                    self.gaps.append((now - at, now))
                last, at = beat, now
            time.sleep(0.0005)

    def take(self) -> list[float]:
        return [g for g, _ in self.take_timed()]

    def take_timed(self) -> list[tuple[float, float]]:
        with self.lock:
            gaps, self.gaps = self.gaps, []
        return gaps

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.mm.close()


def _figures(gaps: list[float], seconds: float, interval: float) -> dict[str, Any]:
    s = sorted(gaps)
    worst = s[-1] if s else None
    return {"beats": len(s), "seconds": seconds, "longest_gap_s": worst,
            "p99_gap_s": s[min(len(s) - 1, int(len(s) * 0.99))] if s else None,
            "median_gap_s": statistics.median(s) if s else None,
            "longest_stall_s": None if worst is None else max(0.0, worst - interval)}


def run(bench: Any, log: Any) -> dict[str, Any]:
    """The section: ``bench`` is tools/bench.py's Bench (its args, work dir and Rmemfs). With
    ``--compare-tree DIR`` the same phases run with that checkout's rmemfs too, right after."""
    from bench import ROOT
    res = _one(bench, log, ROOT, "heartbeat")
    res["compaction_in_process"] = compaction(bench, log)
    if bench.args.compare_tree:
        res["compare_tree"] = _one(bench, log, Path(bench.args.compare_tree).resolve(), "heartbeat-other")
        res["compare_tree"]["tree"] = str(Path(bench.args.compare_tree).resolve())
    return res


def compaction(bench: Any, log: Any) -> dict[str, Any]:
    """A journal compaction of a namespace of FILES files, in this process (no FUSE, no machine noise
    from other tasks on the loop): the loop time of the whole checkpoint in one step (as before issue
    12's slices, and as ``after_operation`` still does without a compactor), against the longest slice
    and the final write of the same checkpoint built in slices. Medians of 3 of each, in one run."""
    import shutil
    import stat
    import uuid
    from rmemfs.core import COMPACTION_SLICE_S, Filesystem
    from rmemfs.namespace import ROOT_INO
    files = 2000 if bench.args.quick else 40000
    fsid = str(uuid.uuid4())
    directory = Path("/dev/shm") / f"rmemfs-bench-compaction-{fsid}"
    regions = Filesystem.create_regions(directory, fsid, capacity=1 << 18, data_region_size=64 << 20,
                                        meta_size=64 << 20)
    fs = Filesystem.format(regions, fsid, 1, 1 << 18)
    try:
        dirs = [fs.make(ROOT_INO, f"d{i}".encode(), stat.S_IFDIR | 0o755, 0, 0).ino for i in range(40)]
        for i in range(files):
            f = fs.make(dirs[i % 40], f"file{i:06d}".encode(), stat.S_IFREG | 0o644, 0, 0)
            fs.write(f.ino, 0, b"x")
        whole, slices, finish = [], [], []
        for _ in range(3):
            t = time.perf_counter()
            fs._checkpoint()
            whole.append(time.perf_counter() - t)
            building = fs.ns.start_checkpoint()
            longest = 0.0
            while True:
                t = time.perf_counter()
                done = building.step(COMPACTION_SLICE_S)
                longest = max(longest, time.perf_counter() - t)
                if done:
                    break
            slices.append(longest)
            t = time.perf_counter()
            fs._checkpoint()
            finish.append(time.perf_counter() - t)
        import gc
        full, frozen = [], []
        for _ in range(3):         # a full collection (what a generation-2 pass costs) with the namespace loaded
            t = time.perf_counter()
            gc.collect()
            full.append(time.perf_counter() - t)
            gc.freeze()            # as the mount does once loaded (session.serve)
            t = time.perf_counter()
            gc.collect()
            frozen.append(time.perf_counter() - t)
            gc.unfreeze()
        res = {"files": files, "checkpoint_bytes": fs.journal.checkpoint_bytes,
               "whole_s": statistics.median(whole), "longest_slice_s": statistics.median(slices),
               "final_write_s": statistics.median(finish), "gc_full_pass_s": statistics.median(full),
               "gc_full_pass_frozen_s": statistics.median(frozen)}
        log(f"heartbeat: compaction of {files} files in process: whole {res['whole_s'] * 1e3:.1f} ms; in slices: "
            f"longest slice {res['longest_slice_s'] * 1e3:.1f} ms, final write {res['final_write_s'] * 1e3:.1f} ms; "
            f"a full GC pass {res['gc_full_pass_s'] * 1e3:.1f} ms, {res['gc_full_pass_frozen_s'] * 1e3:.1f} ms frozen")
        return res
    finally:
        fs.regions.close()
        shutil.rmtree(directory, ignore_errors=True)


def _one(bench: Any, log: Any, root: Path, name: str) -> dict[str, Any]:
    from bench import Rmemfs
    from rmemfs.options import MountOptions
    from rmemfs.regions import CTL_REGION_ID, region_file_name
    q = bench.args.quick
    size = bench.size if q else 256 * MiB
    pages = min(bench.args.random_pages, size // PAGE) if q else 20000
    files = 500 if q else 20000
    interval = MountOptions().heartbeat_interval
    fs = Rmemfs(bench.work, name, root=root)
    res: dict[str, Any] = {"heartbeat_interval_s": interval, "size_bytes": size, "pages": pages, "files": files,
                           "phases": {}}
    fs.mount()
    poller = Poller(Path(fs.ctl).parent / region_file_name(CTL_REGION_ID))
    try:
        def phase(name: str, fn: Any) -> None:
            poller.take()
            t = time.monotonic()
            fn()
            took = time.monotonic() - t
            time.sleep(2 * interval)          # the beat after the phase ends its last gap
            fig = res["phases"][name] = _figures(poller.take(), took, interval)
            log(f"heartbeat{'' if root == HERE.parents[1] else ' (' + str(root) + ')'}: {name}: {took:.2f} s, "
                f"{fig['beats']} beats, longest gap {(fig['longest_gap_s'] or 0) * 1e3:.1f} ms, "
                f"p99 {(fig['p99_gap_s'] or 0) * 1e3:.1f} ms")

        def child(kind: str, path: Path, n: int) -> None:
            subprocess.run([sys.executable, str(HERE), kind, str(path), str(n)], check=True, env=fs.env)

        phase("idle", lambda: time.sleep(2))
        phase("write 1 MiB", lambda: child("write", fs.mp / "seq", size))
        phase("flush sequential", fs.flush)
        phase("mmap scattered", lambda: child("mmap", fs.mp / "seq", pages))
        phase("flush scattered", fs.flush)
        phase("creates+unlinks", lambda: child("churn", fs.mp / "churn", files))
        phase("files kept", lambda: child("keep", fs.mp / "kept", files))
        phase("flush namespace", fs.flush)
        phase("churn beside kept", lambda: child("churn", fs.mp / "churn2", 2 * files))
    finally:
        poller.close()
        fs.destroy()
    worst = max(res["phases"].items(), key=lambda kv: kv[1]["longest_gap_s"] or 0)
    res["longest_gap_s"], res["longest_gap_phase"] = worst[1]["longest_gap_s"], worst[0]
    return res


def targets(r: dict[str, Any], add: Any) -> None:
    from rmemfs.standby import DEFAULT_HUNG_AFTER
    h = r.get("heartbeat") or {}
    # Well under hung_after: a standby at its defaults must never see a busy source as dead.
    add("longest heartbeat gap under load (vs standby hung_after / 2)", h.get("longest_gap_s"), "<=",
        DEFAULT_HUNG_AFTER / 2, "s")


def table(h: dict[str, Any]) -> list[str]:
    if "error" in h:
        return [f"heartbeat: failed: {h['error']}"]
    lines = [f"heartbeat gaps under load (heartbeat_interval {h['heartbeat_interval_s'] * 1e3:.0f} ms; "
             f"{h['size_bytes'] / MiB:.0f} MiB, {h['pages']} scattered pages, {h['files']} files)"]
    c = h.get("compaction_in_process")
    if c:
        lines.append(f"  journal compaction of {c['files']} files ({c['checkpoint_bytes'] / MiB:.1f} MiB checkpoint), "
                     f"in process: whole {c['whole_s'] * 1e3:.1f} ms; in slices: longest slice "
                     f"{c['longest_slice_s'] * 1e3:.1f} ms, final write {c['final_write_s'] * 1e3:.1f} ms; a full GC "
                     f"pass {c['gc_full_pass_s'] * 1e3:.1f} ms, {c['gc_full_pass_frozen_s'] * 1e3:.1f} ms after gc.freeze()")
    other = h.get("compare_tree")
    for label, r in [("this tree", h)] + ([(f"--compare-tree {other['tree']}", other)] if other else []):
        lines.append(f"  {label}: {'phase':<20}{'seconds':>9}{'beats':>7}{'median':>9}{'p99':>9}{'longest':>9}"
                     "   (gaps, ms)")
        for name, f in r["phases"].items():
            cells = "".join(f"{(f[k] or 0) * 1e3:>9.1f}" for k in ("median_gap_s", "p99_gap_s", "longest_gap_s"))
            lines.append(f"  {'':<{len(label)}}  {name:<20}{f['seconds']:>9.2f}{f['beats']:>7}{cells}")
    return lines


if __name__ == "__main__":
    work(sys.argv[1], sys.argv[2], int(sys.argv[3]))
