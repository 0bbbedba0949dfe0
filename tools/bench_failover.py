#!/usr/bin/env python3
"""tools/bench's failover section (issue 12): rmemfs-standby taking over by itself, on two netns hosts.

For each run hostA mounts a fresh rmemfs (a SIZE file, flushed into a one-segment baseline, then
PCT % of its pages written again and left dirty); hostB runs rmemfs-standby at its default watch
settings. Each run signals hostA's fs process (SIGKILL: a crash; SIGSTOP: a hung source) and times,
from the signal, until a reader already waiting on hostB has read one of the recovered dirty pages
through the standby's new mount and found it byte-exact. The split comes from the standby's own
records: detection from its event log's ``dead`` event, fencing, dirty fetch and mount from the
takeover's recovery report (``-o report=``); ``other`` is the rest (the watch's end, connect, dirty
lists, baseline plan, namespace check, starting the recovery, the reader's open).

Cost while watching: the source's write path (1 MiB write() and random 4 KiB pwrite()) with a
standby watching vs none, alternating in one run; the ratio of each pair is reported.

As a script it is the helper that runs inside a host: ``fill``, ``dirty``, ``write`` and ``read``.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
PAGE = 4096
HERE = Path(__file__).resolve()
SUBNET = "10.245.0"


# --- inside a host -------------------------------------------------------------------------------

def page_of(seed: int, index: int) -> bytes:
    """The content run ``seed`` writes into page ``index`` (distinct per run and page)."""
    return struct.pack("<QQ", seed, index) * (PAGE // 16)


def dirty_set(seed: int, npages: int, pct: float) -> list[int]:
    return random.Random(seed).sample(range(npages), max(1, int(npages * pct / 100)))


def _fill(path: str, nbytes: int) -> None:
    block = random.Random(1).randbytes(MiB)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for off in range(0, nbytes, MiB):
            os.pwrite(fd, block[:min(MiB, nbytes - off)], off)
        os.fsync(fd)
    finally:
        os.close(fd)


def _dirty(path: str, nbytes: int, pct: float, seed: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        for index in dirty_set(seed, nbytes // PAGE, pct):
            os.pwrite(fd, page_of(seed, index), index * PAGE)
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(path: str, nbytes: int, npwrites: int, seed: int, passes: int = 3) -> None:
    """1 MiB write()s over ``nbytes``, then ``npwrites`` 4 KiB pwrite()s at random pages of it, ``passes``
    times: the best pass of each (the one least disturbed by the machine's other work)."""
    block = random.Random(seed).randbytes(MiB)
    offsets = [p * PAGE for p in random.Random(seed).choices(range(nbytes // PAGE), k=npwrites)]
    small = block[:PAGE]
    seq, rnd = [], []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for _ in range(passes):
            os.lseek(fd, 0, os.SEEK_SET)
            t = time.perf_counter()
            for _ in range(nbytes // MiB):
                os.write(fd, block)
            seq.append(time.perf_counter() - t)
            t = time.perf_counter()
            for off in offsets:
                os.pwrite(fd, small, off)
            rnd.append(time.perf_counter() - t)
    finally:
        os.close(fd)
    print(json.dumps({"seq_Bps": nbytes / min(seq), "pwrite_ops": npwrites / min(rnd)}))


def _read(path: str, index: int, seed: int, timeout: float) -> None:
    """Wait for ``path`` to appear (the standby's mount), read page ``index``, report when and whether exact."""
    want = page_of(seed, index)
    print("ready", flush=True)
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            if time.monotonic() > deadline:
                print(json.dumps({"error": f"{path} never appeared"}), flush=True)
                return
            time.sleep(0.0005)
            continue
        try:
            got = os.pread(fd, PAGE, index * PAGE)
        finally:
            os.close(fd)
        t = time.monotonic_ns()
        print(json.dumps({"t_ns": t, "exact": got == want}), flush=True)
        return


def helper(argv: list[str]) -> None:
    cmd, *a = argv
    if cmd == "fill":
        _fill(a[0], int(a[1]))
    elif cmd == "dirty":
        _dirty(a[0], int(a[1]), float(a[2]), int(a[3]))
    elif cmd == "write":
        _write(a[0], int(a[1]), int(a[2]), int(a[3]))
    elif cmd == "read":
        _read(a[0], int(a[1]), int(a[2]), float(a[3]))
    else:
        raise SystemExit(f"unknown helper {cmd}")


# --- the section (runs in tools/bench) ----------------------------------------------------------

def _pct(vals: list[float], q: float) -> float | None:
    if not vals:
        return None
    s = sorted(vals)
    import math
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


def _stats(vals: list[float]) -> dict[str, Any]:
    return {"p50": _pct(vals, 50), "p99": _pct(vals, 99), "min": min(vals) if vals else None,
            "max": max(vals) if vals else None, "samples": vals, "unit": "s"}


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _events(path: Path) -> list[dict[str, Any]]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return []


class Pair:
    """hostA's source and hostB's standby over one backend; each run gets a fresh filesystem."""

    def __init__(self, a: Any, b: Any, size: int, pct: float, log: Any) -> None:
        from hosts import PYTHON
        self.a, self.b, self.size, self.pct, self.log = a, b, size, pct, log
        self.python = PYTHON
        self.k = 0
        self.backend = a.dir.parent / "backend0"
        self.amnt, self.bmnt = a.dir / "mnt", b.dir / "mnt"
        self.file = self.amnt / "f"
        self.pid = 0
        self.standby: subprocess.Popen[bytes] | None = None
        self.n = 0

    def ctl(self, host: Any, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return host.python("-m", "rmemfs.cli.ctl", *args, check=check, timeout=600)

    def mount_source(self) -> None:
        self.pid = self.a.mount_rmemfs(self.backend, self.amnt, flush_interval=3600)

    def helper(self, host: Any, *args: Any) -> str:
        return host.python(str(HERE), *[str(x) for x in args], timeout=600).stdout

    def start_standby(self) -> tuple[Path, Path]:
        """A standby at default watch settings on hostB; returns once its event log says watching."""
        self.n += 1
        events, report = self.b.dir / f"events{self.n}.jsonl", self.b.dir / f"takeover{self.n}.json"
        self.bmnt.mkdir(exist_ok=True)
        self.standby = self.b.popen(
            [self.python, "-m", "rmemfs.cli.standby", "--source", self.a.addr, "--backend", str(self.backend),
             "--transport", "software", "-o", f"listen={self.b.addr},event_log={events},report={report}",
             "-f", "--log", str(self.b.dir / f"standby{self.n}.log"), str(self.bmnt)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not any(e["event"] == "watching" for e in _events(events)):
            if self.standby.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"standby never watching (exit {self.standby.poll()}): "
                                   f"{(self.b.dir / f'standby{self.n}.log').read_text()[-2000:]}")
            time.sleep(0.02)
        return events, report

    def stop_standby(self) -> None:
        assert self.standby is not None
        self.standby.send_signal(signal.SIGTERM)
        code = self.standby.wait(60)
        if code != 0:
            raise RuntimeError(f"standby exited {code} on SIGTERM")
        self.standby = None

    def fresh(self) -> None:
        """A new filesystem on hostA: the SIZE file written and flushed into a one-segment baseline (each
        run starts from the same state: a takeover's own flushes would add segments, and the baseline
        plan and namespace check grow with them). Whatever the last run left is killed first."""
        if self.standby is not None:
            self.standby.kill()                 # the new owner: its filesystem is thrown away
            self.standby.wait()
            self.standby = None
        for host, mnt in ((self.a, self.amnt), (self.b, self.bmnt)):
            host.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
            for pid in host.exporter_pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            host.run("rm -rf /dev/shm/rmemfs-*", check=False)
        shutil.rmtree(self.backend, ignore_errors=True)
        self.k += 1
        self.backend = self.a.dir.parent / f"backend{self.k}"
        self.backend.mkdir()
        self.mount_source()
        self.helper(self.a, "fill", self.file, self.size)
        self.ctl(self.a, "flush", str(self.amnt))

    def run_once(self, sig: signal.Signals, seed: int) -> dict[str, Any]:
        self.helper(self.a, "dirty", self.file, self.size, self.pct, seed)
        pages = dirty_set(seed, self.size // PAGE, self.pct)
        probe = random.Random(seed + 1).choice(pages)
        events, report = self.start_standby()
        reader = self.b.popen([self.python, str(HERE), "read", str(self.bmnt / "f"), str(probe), str(seed), "120"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert reader.stdout is not None
        if reader.stdout.readline().strip() != "ready":
            raise RuntimeError(f"reader failed: {reader.stderr.read() if reader.stderr else ''}")
        time.sleep(0.2)     # the standby settles into its watch (and the reader into its poll)
        t_wall, t_mono = time.time_ns(), time.monotonic_ns()
        os.kill(self.pid, sig)
        try:
            out, err = reader.communicate(timeout=150)
        finally:
            with contextlib.suppress(ProcessLookupError):
                if sig == signal.SIGSTOP:
                    os.kill(self.pid, signal.SIGCONT)     # fenced by now: it refuses writes; then it goes
                os.kill(self.pid, signal.SIGKILL)
            self.a.run(["fusermount3", "-u", "-z", str(self.amnt)], check=False)
        res = json.loads(out.strip().splitlines()[-1]) if out.strip() else {"error": err[-2000:]}
        if "error" in res or not res.get("exact"):
            raise RuntimeError(f"run {seed} ({sig.name}): recovered page {probe} not served exactly: {res}")
        total = (res["t_ns"] - t_mono) / 1e9
        deadline = time.monotonic() + 30
        while not report.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        rep = json.loads(report.read_text())
        kinds = {e["event"]: e for e in _events(events)}
        dead, taking = kinds.get("dead"), kinds.get("taking-over")
        if not dead or not taking:
            raise RuntimeError(f"run {seed}: no 'dead' or 'taking-over' event in {events}")
        phases = {k: v["seconds"] for k, v in rep["phases"].items()}
        split = {"detection": (dead["time_ns"] - t_wall) / 1e9, "fencing": phases.get("fence", 0.0),
                 "dirty_fetch": phases.get("page fetch", 0.0), "mount": phases.get("publish+mount", 0.0)}
        split["other"] = total - sum(split.values())
        # Where "other" goes: the watch's end, the recovery until its mount (its phases), the rest (the
        # recovery's start before its clock, and the reader's first open).
        verdict_to_takeover = (taking["time_ns"] - dead["time_ns"]) / 1e9
        to_mount = rep.get("time_to_mount_s") or 0.0
        return {"total": total, **split, "silence_seen": dead.get("silent"), "detected_by": dead.get("by"),
                "phases": phases,
                "verdict_to_takeover": verdict_to_takeover, "recovery_to_mount": to_mount,
                "mount_exporter_wait": phases.get("exporter wait", 0.0),
                "unaccounted": total - split["detection"] - verdict_to_takeover - to_mount,
                "dirty_pages_fetched": rep.get("dirty_pages_fetched"), "probe_page": probe}

    def write_cost(self, pairs: int, nbytes: int, npwrites: int) -> dict[str, Any]:
        """The source's write path with a standby watching vs none, alternating (AB BA ...), same file; a
    pair's ratio is watching / none, and the median of the pairs' ratios is reported."""
        wfile = self.amnt / "w"
        self.helper(self.a, "fill", wfile, nbytes)
        self.ctl(self.a, "flush", str(self.amnt))
        got: dict[str, list[dict[str, float]]] = {"none": [], "watching": []}
        cpu: dict[str, list[float]] = {"standby": [], "exporter": []}
        for i in range(pairs):
            order = ("none", "watching") if i % 2 == 0 else ("watching", "none")
            for state in order:
                if state == "watching":
                    self.start_standby()
                    assert self.standby is not None
                    # Both share this machine's cores with the writer: the standby would not, on its own host.
                    pids = {"standby": self.standby.pid, "exporter": self.a.exporter_pids()[0]}
                    before, t = {k: _cpu_s(p) for k, p in pids.items()}, time.monotonic()
                got[state].append(json.loads(self.helper(self.a, "write", wfile, nbytes, npwrites, i)))
                if state == "watching":
                    wall = time.monotonic() - t
                    for k, p in pids.items():
                        cpu[k].append((_cpu_s(p) - before[k]) / wall)
                    self.stop_standby()
                self.ctl(self.a, "flush", str(self.amnt))    # each measurement starts with nothing dirty
            self.log(f"failover: write cost pair {i + 1}/{pairs}: "
                     f"none {got['none'][-1]['seq_Bps'] / MiB:.0f} MiB/s {got['none'][-1]['pwrite_ops']:.0f}/s, "
                     f"watching {got['watching'][-1]['seq_Bps'] / MiB:.0f} MiB/s "
                     f"{got['watching'][-1]['pwrite_ops']:.0f}/s")
        self.a.run(["rm", "-f", str(wfile)])
        self.ctl(self.a, "flush", str(self.amnt))
        out: dict[str, Any] = {"pairs": pairs, "bytes": nbytes, "pwrites": npwrites,
                               "cpu_while_watching": {k: {"median": statistics.median(v), "samples": v,
                                                          "unit": "cores"} for k, v in cpu.items()}}
        for key, unit in (("seq_Bps", "bytes/s"), ("pwrite_ops", "ops/s")):
            ratios = [w[key] / n[key] for n, w in zip(got["none"], got["watching"], strict=True)]
            out[key] = {"none": [n[key] for n in got["none"]], "watching": [w[key] for w in got["watching"]],
                        "unit": unit, "ratio_watching_to_none": statistics.median(ratios), "ratios": ratios}
        return out


def run(bench: Any, log: Any) -> dict[str, Any]:
    """The section: ``bench`` is tools/bench.py's Bench (its args and work dir), ``log`` its progress log."""
    from hosts import TwoHosts
    from rmemfs.standby import DEFAULT_DEAD_AFTER, DEFAULT_HUNG_AFTER, DEFAULT_WATCH_INTERVAL
    args = bench.args
    size = bench.size if args.quick else GiB
    pct, runs = 1.0, args.failover_runs
    res: dict[str, Any] = {"size_bytes": size, "dirty_percent": pct, "runs": runs,
                           "standby": f"default watch settings (watch_interval {DEFAULT_WATCH_INTERVAL} s, dead_after "
                                      f"{DEFAULT_DEAD_AFTER} s, hung_after {DEFAULT_HUNG_AFTER} s), software transport",
                           "source": "flush_interval=3600, defaults otherwise"}
    with TwoHosts(subnet=SUBNET, workdir=bench.work / "failover", label="bench") as (a, b):
        pair = Pair(a, b, size, pct, log)
        t = time.monotonic()
        pair.fresh()
        res["mount_fill_and_flush_s"] = time.monotonic() - t
        if args.failover_cost_pairs:
            res["write_cost"] = pair.write_cost(args.failover_cost_pairs, 32 * MiB if args.quick else 256 * MiB,
                                                2000 if args.quick else 20000)
        seed = 100
        for sig in (signal.SIGKILL, signal.SIGSTOP):
            rows: list[dict[str, Any]] = []
            for i in range(runs):
                seed += 1
                pair.fresh()
                row = pair.run_once(sig, seed)
                rows.append(row)
                log(f"failover: {sig.name} {i + 1}/{runs}: total {row['total'] * 1e3:.0f} ms (detection "
                    f"{row['detection'] * 1e3:.0f}, fencing {row['fencing'] * 1e3:.1f}, dirty fetch "
                    f"{row['dirty_fetch'] * 1e3:.0f}, mount {row['mount'] * 1e3:.0f}, other {row['other'] * 1e3:.0f}: "
                    f"watch's end {row['verdict_to_takeover'] * 1e3:.0f}, recovery to mount "
                    f"{row['recovery_to_mount'] * 1e3:.0f}, rest {row['unaccounted'] * 1e3:.0f}), "
                    f"{row['dirty_pages_fetched']} dirty pages; phases "
                    + ", ".join(f"{k} {v * 1e3:.0f}" for k, v in row["phases"].items()))
            res[sig.name] = {k: _stats([r[k] for r in rows])
                             for k in ("total", "detection", "fencing", "dirty_fetch", "mount", "other",
                                       "verdict_to_takeover", "recovery_to_mount", "unaccounted",
                                       "mount_exporter_wait")}
            res[sig.name]["phases_p50"] = {k: _pct([r["phases"].get(k, 0.0) for r in rows], 50)
                                           for k in sorted({k for r in rows for k in r["phases"]})}
            res[sig.name]["detected_by"] = {by: sum(1 for r in rows if str(r["detected_by"]) == by)
                                            for by in sorted({str(r["detected_by"]) for r in rows})}
            res[sig.name]["runs"] = rows
    return res


def targets(r: dict[str, Any], add: Any) -> None:
    f = r.get("failover") or {}
    for sig in ("SIGKILL", "SIGSTOP"):
        t = (f.get(sig) or {}).get("total") or {}
        add(f"failover after {sig} (to a dirty page read), p50", t.get("p50"), "<=", 0.3, "s")
        add(f"failover after {sig} (to a dirty page read), p99", t.get("p99"), "<=", 0.6, "s")
    wc = f.get("write_cost") or {}
    for key, label in (("seq_Bps", "1 MiB write()"), ("pwrite_ops", "4 KiB pwrite()")):
        ratio = (wc.get(key) or {}).get("ratio_watching_to_none")
        add(f"a standby watching: source's {label} slowdown", None if ratio is None else 1 - ratio, "<=", 0.03,
            "fraction")


def table(f: dict[str, Any]) -> list[str]:
    if "error" in f:
        return [f"failover: failed: {f['error']}"]
    lines = [f"failover (two netns hosts, {f['size_bytes'] / GiB:.3g} GiB, {f['dirty_percent']:g} % dirty, "
             f"{f['runs']} runs each; standby at {f['standby']})"]
    lines.append(f"  {'':<9}{'':<6}{'total':>9}{'detection':>11}{'fencing':>9}{'dirty fetch':>13}{'mount':>8}"
                 f"{'other':>8}   (ms)")
    for sig in ("SIGKILL", "SIGSTOP"):
        s = f.get(sig)
        if not s:
            continue
        for q in ("p50", "p99"):
            cells = "".join(f"{s[k][q] * 1e3:>{w}.1f}" for k, w in (("total", 9), ("detection", 11), ("fencing", 9),
                                                                    ("dirty_fetch", 13), ("mount", 8), ("other", 8)))
            lines.append(f"  {sig:<9}{q:<6}{cells}")
    for sig in ("SIGKILL", "SIGSTOP"):
        s = f.get(sig)
        if s and "recovery_to_mount" in s:
            ph = ", ".join(f"{k} {v * 1e3:.0f}" for k, v in s["phases_p50"].items())
            lines.append(f"  {sig} p50s: watch's end {s['verdict_to_takeover']['p50'] * 1e3:.0f} ms, recovery to its "
                         f"mount {s['recovery_to_mount']['p50'] * 1e3:.0f} ms (phases {ph}), rest "
                         f"{s['unaccounted']['p50'] * 1e3:.0f} ms; of the mount, waiting for the new exporter "
                         f"{(s.get('mount_exporter_wait') or {}).get('p50', 0.0) * 1e3:.0f} ms")
    wc = f.get("write_cost")
    if wc:
        sq, pw = wc["seq_Bps"], wc["pwrite_ops"]
        lines.append(f"  write path with a standby watching vs none ({wc['pairs']} alternating pairs): 1 MiB write() "
                     f"{statistics.median(sq['watching']) / MiB:.0f} vs {statistics.median(sq['none']) / MiB:.0f} MiB/s "
                     f"-> {sq['ratio_watching_to_none']:.3f}×; 4 KiB pwrite() {statistics.median(pw['watching']):.0f} vs "
                     f"{statistics.median(pw['none']):.0f} /s -> {pw['ratio_watching_to_none']:.3f}×")
        c = wc["cpu_while_watching"]
        lines.append(f"  CPU while watching (same cores as the writer here): standby {c['standby']['median'] * 100:.1f} % "
                     f"of a core (on its own host in a real pair), the source's exporter "
                     f"{c['exporter']['median'] * 100:.1f} %")
    return lines


if __name__ == "__main__":
    helper(sys.argv[1:])
