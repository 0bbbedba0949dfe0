"""Pause -> takeover -> resume on two hosts (issue 10): a fenced source acknowledges nothing the new owner lacks.

hostA mounts rmemfs; tools/fsworkload.py ``pause`` writers on hostA keep write()+fsync and mmap+msync
calls in flight, each into a fresh slot. The test SIGSTOPs hostA's filesystem process (its exporter, a
process of its own, keeps serving), hostB takes over with rmemfs-recover (liveness verdict, fence,
dirty lists), hostA is SIGCONTed and the writers go on. Then on hostB's mount: every operation hostA
acknowledged (write() returned, or msync did) holds exactly its bytes, every other byte is zero or a
refused operation's own, and every operation started after the takeover returned was refused (EROFS).
The seed sometimes resumes hostA inside the takeover instead: before the liveness verdict it is then
refused as alive (exit 23) and hostA, unfenced, must have refused nothing.

Seeded like tests/test_hosts_recovery.py (which runs the same check as its "pause" kill mode):
``--seed S --trials N``; the seed and the replay command are printed.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
from fsworkload import acknowledged  # noqa: E402
from hosts import PYTHON, Host, TwoHosts  # noqa: E402
from hosts_fixtures import hosts_available, parametrize_seeds  # noqa: E402, F401

WORKLOAD = REPO / "tools" / "fsworkload.py"
DEFAULT_TRIALS = 2
RADOS_TRIALS = 1
PAUSE_DIR = "p"             # the pause writers' directory in the mount

pytestmark = pytest.mark.hosts


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    parametrize_seeds(metafunc, RADOS_TRIALS if metafunc.function.__name__.endswith("_on_rados") else DEFAULT_TRIALS)


def pause_takeover_resume(a: Host, b: Host, backend: Path | str, rng: random.Random, params: str,
                          report_file: Path, region_size: str = "64M", store: dict[str, str] | None = None,
                          writeback: bool = False) -> dict[str, object]:
    """With rmemfs mounted at a.dir/"mnt": pause writers, SIGSTOP, recover on hostB at b.dir/"mnt",
    SIGCONT, writers go on, stop them; assert the check above. Returns the outcome counts and the report.
    ``store``: the backend's options (rados: ceph_conf, ceph_id). ``writeback``: hostA's mount has
    writeback_cache, so the check counts only fsync and msync as acknowledgements."""
    store = store or {}
    pid = a.rmemfs_pid(backend, store)
    ready, stop, log_file = a.dir / "pause.ready", a.dir / "pause.stop", a.dir / "pause.json"
    workers = rng.randint(2, 4)
    writers = a.popen([PYTHON, WORKLOAD, "pause", a.dir / "mnt" / PAUSE_DIR, "--seed", str(rng.getrandbits(31)),
                       "--out", log_file, "--ready", ready, "--stop", stop, "--workers", str(workers),
                       *(["--writeback"] if writeback else [])],
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert writers.poll() is None, f"pause writers failed ({params}): {writers.communicate()}"
            assert time.monotonic() < deadline, f"pause writers never started ({params})"
            time.sleep(0.01)
        time.sleep(rng.uniform(0.05, 0.5))           # the writers are mid-call when the pause lands
        hold = rng.uniform(0, 1.0)                   # paused this long before hostB starts its takeover
        # When hostA resumes: after the takeover returned, or at a random point inside it (before the
        # liveness verdict: refused as alive, exit 23; between verdict and fence; or while it reads).
        resume = rng.choice(["after", "after", "during"])
        resume_at = rng.uniform(0, 4.0)
        done: list[subprocess.CompletedProcess[str]] = []

        def take_over() -> None:
            done.append(b.recover_rmemfs(backend, b.dir / "mnt", a.addr, json_report=report_file, check=False,
                                         extra=["--transport", "software", "--verify"], region_size=region_size,
                                         **store))
        os.kill(pid, signal.SIGSTOP)
        paused_ns = time.monotonic_ns()
        try:
            time.sleep(hold)
            taker = threading.Thread(target=take_over)
            taker.start()
            if resume == "during":
                taker.join(resume_at)
                os.kill(pid, signal.SIGCONT)
            taker.join(180)
            assert done, f"rmemfs-recover hangs ({params})"
        finally:
            os.kill(pid, signal.SIGCONT)
        # Every operation started after the takeover returned must be refused (it fenced before that).
        resumed_ns = time.monotonic_ns()
        rec = done[0]
        params += f" resume={resume}" + (f" at {resume_at:.2f}s" if resume == "during" else "")
        if rec.returncode == 23 and resume == "during":
            # Resumed before the liveness verdict: refused as alive, nothing fenced, every write goes on.
            time.sleep(rng.uniform(0.2, 1.0))
            stop.touch()
            out, err = writers.communicate(timeout=60)
            assert writers.returncode == 0, f"pause writers failed ({params}):\n{out}\n{err}"
            ops = json.loads(log_file.read_text())["ops"]
            refused = [r for r in ops if not acknowledged(r, writeback)]
            assert not refused, f"a source found alive refused writes ({params}): {refused[:3]}"
            stats = json.loads(a.python(WORKLOAD, "ctl", a.dir / "mnt", "stats").stdout)
            assert not stats.get("fenced"), f"a source found alive was fenced ({params}): {stats}"
            return {"outcome": "refused as alive (exit 23)", "resume": f"during, at {resume_at:.2f}s",
                    "acknowledged": len(ops)}
        assert rec.returncode == 0, f"rmemfs-recover exited {rec.returncode} ({params}):\n{rec.stderr}{rec.stdout}"
        time.sleep(rng.uniform(0.2, 1.0))            # the writers go on against the fenced mount
        stop.touch()
        out, err = writers.communicate(timeout=60)
        assert writers.returncode == 0, f"pause writers failed ({params}):\n{out}\n{err}"
    finally:
        stop.touch()
        if writers.poll() is None:
            writers.kill()
            writers.wait(timeout=10)
    stats = json.loads(a.python(WORKLOAD, "ctl", a.dir / "mnt", "stats").stdout)
    assert stats.get("fenced") is True, f"hostA's mount does not say it is fenced ({params}): {stats}"
    check = b.python(WORKLOAD, "verify-pause", b.dir / "mnt" / PAUSE_DIR, log_file, "--after-ns", str(resumed_ns),
                     check=False)
    assert check.returncode == 0, f"hostB lacks what hostA acknowledged, or hostA acknowledged after the " \
                                  f"resume ({params}):\n{check.stdout[-4000:]}"
    counts: dict[str, object] = json.loads(check.stdout.strip().splitlines()[-1])
    ops = json.loads(log_file.read_text())["ops"]
    counts["acknowledged after the pause"] = sum(
        1 for r in ops if acknowledged(r, writeback) and r["end_ns"] > paused_ns)
    counts["in flight at the pause"] = sum(1 for r in ops if r["start_ns"] < paused_ns < r["end_ns"])
    assert counts["refused"], f"nothing was refused: the writers never met the fence ({params}): {counts}"
    assert counts["started after the resume"], f"no operation after the resume ({params}): {counts}"
    counts["outcome"] = "taken over"
    counts["resume"] = f"during, at {resume_at:.2f}s" if resume == "during" else "after"
    counts["report"] = json.loads(report_file.read_text())
    return counts


def test_pause_takeover_resume(seed: int) -> None:
    hosts = TwoHosts(subnet="10.241.0", label="pause")
    pause_trial(seed, hosts, hosts.backend, {}, "test_pause_takeover_resume")


@pytest.mark.ceph
def test_pause_takeover_resume_on_rados(seed: int, ceph_cluster) -> None:  # type: ignore[no-untyped-def]
    """The same with the baselines in the session's Ceph pool (issue 13: the fencing tests on rados)."""
    hosts = TwoHosts(subnet="10.244.0", label="radospause", ceph=ceph_cluster.dir)
    store = {"ceph_conf": str(ceph_cluster.conf), "ceph_id": ceph_cluster.user_id}
    pause_trial(seed, hosts, f"rados:{ceph_cluster.pool}/pause-{seed}-{os.getpid()}", store,
                "test_pause_takeover_resume_on_rados")


def pause_trial(seed: int, hosts: TwoHosts, backend: Path | str, store: dict[str, str], name: str) -> None:
    rng = random.Random(seed)
    flush_interval = rng.choice([0.3, 0.5, 1.0, 3600])
    params = (f"seed={seed} flush_interval={flush_interval}; replay: tools/test "
              f"{Path(__file__).relative_to(REPO)}::{name} --seed {seed} --trials 1")
    print(f"\ntrial {params}")
    t0 = time.monotonic()
    with hosts as (a, b):
        a.mount_rmemfs(backend, a.dir / "mnt", flush_interval=flush_interval, region_size="64M", **store)
        counts = pause_takeover_resume(a, b, backend, rng, params, b.dir / "report.json", store=store)
    report = counts.pop("report", None)
    fetched = report["dirty_pages_fetched"] if isinstance(report, dict) else "-"
    print(f"ok in {time.monotonic() - t0:.1f} s: {counts}; dirty pages fetched {fetched}")
