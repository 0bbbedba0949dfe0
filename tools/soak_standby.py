#!/usr/bin/env python3
"""Issue 12's no-false-takeover soak: a busy source watched by rmemfs-standby at its default settings.

    tools/soak_standby.py [--seconds 600] [--writers 8] [--out report.json]

On two netns hosts (tools/hosts.py): hostA mounts rmemfs with flush_interval=1 (defaults otherwise) and
runs WRITERS processes for SECONDS: half write() 1 MiB blocks at random offsets of their own 64 MiB file
(an fsync every 16), half store 4 KiB pages at random through mmap (an msync every 256). hostB runs
rmemfs-standby at its default watch settings. Meanwhile this process polls hostA's heartbeat word in
its ctl region file every 0.5 ms (tools/bench_heartbeat.py's Poller). It passes if the standby is still
watching at the end and its event log has no ``dead``; it reports the longest heartbeat gap seen both
ways (here, and by the standby over the network), with the flush figures. Needs root.

As a script inside a host it is also the writer: ``writer write|mmap PATH SECONDS SEED``.
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
MiB, PAGE, FILE = 1 << 20, 4096, 64 << 20


def writer(kind: str, path: str, seconds: float, seed: int) -> None:
    rng = random.Random(seed)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    os.ftruncate(fd, FILE)
    end, n, error = time.monotonic() + seconds, 0, None
    try:
        if kind == "write":
            block = rng.randbytes(MiB)
            while time.monotonic() < end:
                os.pwrite(fd, block, rng.randrange(FILE // MiB) * MiB)
                n += 1
                if n % 16 == 0:
                    os.fsync(fd)
        else:
            with mmap.mmap(fd, FILE) as mm:
                page = rng.randbytes(PAGE)
                while time.monotonic() < end:
                    p = rng.randrange(FILE // PAGE)
                    mm[p * PAGE:(p + 1) * PAGE] = page
                    n += 1
                    if n % 256 == 0:
                        mm.flush()
    except OSError as e:         # refused (a fenced source: a takeover happened): said in the report
        error = f"{e} after {seconds - (end - time.monotonic()):.1f} s"
    finally:
        os.close(fd)
    print(json.dumps({"kind": kind, "ops": n, "error": error}))


def soak(seconds: float, writers: int, keep: Path, standby_options: str = "") -> dict[str, Any]:
    from bench_heartbeat import Poller
    from hosts import PYTHON, TwoHosts
    from rmemfs.store import open_store
    from rmemfs.regions import CTL_REGION_ID, region_file_name
    from rmemfs.standby import DEFAULT_DEAD_AFTER, DEFAULT_HUNG_AFTER, DEFAULT_WATCH_INTERVAL
    with TwoHosts(subnet="10.246.0", label="soak") as (a, b):
        backend, amnt, bmnt = a.dir.parent / "backend", a.dir / "mnt", b.dir / "mnt"
        a.mount_rmemfs(backend, amnt, flush_interval=1)
        fsid = open_store(backend).fsid()      # hostA's regions: its default region directory, in its /dev/shm
        poller = Poller(a.path(Path(f"/dev/shm/rmemfs-{fsid}") / region_file_name(CTL_REGION_ID)))
        events, log = b.dir / "events.jsonl", b.dir / "standby.log"
        bmnt.mkdir()
        standby = b.popen([PYTHON, "-m", "rmemfs.cli.standby", "--source", a.addr, "--backend", str(backend),
                           "--transport", "software", "-o",
                           f"listen={b.addr},event_log={events}" + (f",{standby_options}" if standby_options else ""),
                           "-f", "--log",
                           str(log), str(bmnt)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not (events.exists() and '"watching"' in events.read_text()):
            assert standby.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        poller.take()
        t0, t0_ns = time.monotonic(), time.time_ns()
        procs = [a.popen([PYTHON, str(HERE), "writer", "write" if i % 2 == 0 else "mmap", str(amnt / f"w{i}"),
                          str(seconds), str(i)], stdout=subprocess.PIPE, text=True) for i in range(writers)]
        outs = [json.loads(p.communicate(timeout=seconds + 300)[0].strip().splitlines()[-1]) for p in procs]
        took = time.monotonic() - t0
        for f in (events, log):          # the hosts' folders go with them
            (keep / f.name).write_bytes(f.read_bytes())
        gaps = [(g, at - t0) for g, at in poller.take_timed()]     # (gap, seconds into the soak it ended)
        poller.close()
        st = json.loads(b.python("-m", "rmemfs.cli.ctl", "standby", "status", "--json", str(bmnt), check=False).stdout
                        or "{}")
        stats = json.loads(a.python("-m", "rmemfs.cli.ctl", "stats", "--json", str(amnt), check=False).stdout
                           or "{}")
        kinds = [json.loads(line)["event"] for line in events.read_text().splitlines() if line.strip()]
        standby.terminate()
        standby.wait(60)
        s = sorted(g for g, _ in gaps)
        dead = [{**e, "at_s": (e["time_ns"] - t0_ns) / 1e9} for e in map(json.loads, events.read_text().splitlines())
                if e["event"] == "dead"]
        return {"seconds": took, "writers": writers, "ops": outs, "flush_interval_s": 1,
                "standby": {"watch_interval_s": DEFAULT_WATCH_INTERVAL, "dead_after_s": st.get("dead_after"),
                            "default_dead_after_s": DEFAULT_DEAD_AFTER, "hung_after_s": st.get("hung_after"),
                            "default_hung_after_s": DEFAULT_HUNG_AFTER, "state_at_end": st.get("state"),
                            "longest_gap_seen_s": st.get("longest_gap"), "registrations": st.get("registrations"),
                            # the source's longest silence on its own clock, and the standby's own stalls
                            "source_longest_gap_s": st.get("source_longest_gap"),
                            "watch_lateness": st.get("watch_lateness"), "read_longest_s": st.get("read_longest"),
                            "gc": st.get("gc"), "options": standby_options,
                            "watch_stalls": [e for e in map(json.loads, events.read_text().splitlines())
                                             if e["event"] == "watch-stalled"][-10:],
                            "events": kinds},
                "source": {"loop_lateness": stats.get("loop_lateness"), "gc": stats.get("gc"),
                           "compactions": (stats.get("core") or {}).get("compactions"),
                           "compaction_longest_step_s": (stats.get("core") or {}).get("compaction_longest_step_s")},
                "dead_events": dead, "longest_gaps_at_s": sorted(gaps)[-5:],
                "heartbeat_polled_here": {"beats": len(s), "longest_gap_s": s[-1] if s else None,
                                          "p99_gap_s": s[min(len(s) - 1, int(len(s) * 0.99))] if s else None,
                                          "p999_gap_s": s[min(len(s) - 1, int(len(s) * 0.999))] if s else None},
                "flush": stats.get("flush"),
                "false_takeover": "dead" in kinds or st.get("state") != "watching"}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "writer":
        writer(sys.argv[2], sys.argv[3], float(sys.argv[4]), int(sys.argv[5]))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--writers", type=int, default=8)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--standby-options", default="",
                    help="more -o options for rmemfs-standby (e.g. dead_after=0.3), to try settings other than the "
                         "defaults")
    args = ap.parse_args()
    keep = (args.out or Path("soak.json")).absolute().parent
    res = soak(args.seconds, args.writers, keep, args.standby_options)
    text = json.dumps(res, indent=1)
    if args.out:
        args.out.write_text(text)
    print(text)
    sys.exit(1 if res["false_takeover"] else 0)


if __name__ == "__main__":
    main()
