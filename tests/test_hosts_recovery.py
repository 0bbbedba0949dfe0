"""Two-host recovery: rmemfs on hostA is SIGKILLed, hostB recovers it over the network, byte for byte.

hostA and hostB are network namespaces joined by a veth pair (tools/hosts.py),
each with its own mount namespace and private /dev/shm, so hostB reaches
hostA's memory only through the exporter's TCP transport. Per trial (seeded):

* hostA mounts rmemfs with a short flush interval (0.5-1 s);
* tools/fsworkload.py runs inside hostA: worker threads create, write()+fsync,
  pwrite, append, truncate, mmap+msync, rename (also over an existing file),
  mkdir and unlink, while baselines are flushed (periodic and requested);
  a last burst lands after the last baseline; it writes the acknowledged state
  (path -> XXH3, directories) to JSON;
* after a random delay shorter than the flush interval (so sometimes during a
  flush) the test SIGKILLs the rmemfs daemon; its exporter must live on;
* hostB runs rmemfs-recover --source <hostA> --transport software --verify --json (lazy, the
  default), and every file must match by XXH3, with no file or directory missing or extra;
* in about half of the trials ("io during load") the background load is slowed (-o load_rate) and the
  workers go on, on hostB, while it runs: writes, truncates and mmap stores on pages not loaded yet
  (fsworkload.py resume, from the first run's saved bytes, without reading the mount first), then the
  tree must match the state after those operations. In those trials hostB's rmemfs is then SIGKILLed
  in the middle of its load, and hostA recovers from hostB (a second failure): hostA's copy must be
  that state, from the store plus hostB's dirty lists and pages.

The kill mode follows the seed (``seed % 4``, so any four consecutive seeds try each): "now", "delay",
"mid-flush" (SIGKILL a few ms into a requested flush of a big dirty set) and "pause": instead of a
SIGKILL, pause writers keep write()+fsync and mmap+msync in flight while hostA's fs process is
SIGSTOPped, hostB takes over, hostA is SIGCONTed and the writers go on; then everything the first
workload acknowledged and every operation the paused mount acknowledged is in hostB's copy, and every
operation after the resume was refused (tests/test_hosts_fencing.py, which runs that check alone).

Default: 4 trials (one per mode) with a random first seed (printed). ``--trials N`` for more,
``--seed S`` to replay: e.g. tools/test tests/test_hosts_recovery.py --seed 1234 --trials 1.

With ``--standby`` the recovery is rmemfs-standby's instead (issue 12): it watches hostA from before the
workload and takes over by itself at the kill (modes "now", "delay" and "mid-flush"; the pause mode is
tests/test_hosts_standby.py's). ``test_two_host_standby_trial`` runs STANDBY_TRIALS of those by default.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
from hosts import PYTHON, Host, TwoHosts  # noqa: E402
from hosts_fixtures import hosts_available, parametrize_seeds  # noqa: E402, F401
from test_hosts_fencing import PAUSE_DIR, pause_takeover_resume  # noqa: E402
from test_hosts_standby import start_standby, wait_mounted, wait_state  # noqa: E402

WORKLOAD = REPO / "tools" / "fsworkload.py"
DEFAULT_TRIALS = 4
STANDBY_TRIALS = 2
RADOS_TRIALS = 4            # on rados too, one trial per kill mode (about 6 s each here)
KILL_MODES = ("now", "delay", "mid-flush", "pause")

pytestmark = pytest.mark.hosts


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    on_rados = metafunc.function.__name__.endswith("_on_rados")
    standby = metafunc.function.__name__ == "test_two_host_standby_trial"
    parametrize_seeds(metafunc, RADOS_TRIALS if on_rados else STANDBY_TRIALS if standby else DEFAULT_TRIALS)


def test_two_host_recovery(seed: int, request: pytest.FixtureRequest) -> None:
    hosts = TwoHosts(subnet="10.242.0", label="trial")
    two_host_trial(seed, hosts, hosts.backend, {}, "test_two_host_recovery",
                   standby=bool(request.config.getoption("--standby")))


def test_two_host_recovery_writeback_cache(seed: int) -> None:
    """The same trials with hostA (and the recovered mount) in writeback_cache mode, where only fsync,
    msync and close acknowledge a write(): every kill mode, and the pause check counts those alone."""
    hosts = TwoHosts(subnet="10.242.0", label="trial")
    two_host_trial(seed, hosts, hosts.backend, {}, "test_two_host_recovery_writeback_cache", writeback=True)


def test_two_host_standby_trial(seed: int) -> None:
    hosts = TwoHosts(subnet="10.242.0", label="trial")
    two_host_trial(seed, hosts, hosts.backend, {}, "test_two_host_standby_trial", standby=True)


@pytest.mark.ceph
def test_two_host_recovery_on_rados(seed: int, ceph_cluster) -> None:  # type: ignore[no-untyped-def]
    """The same trials with the baselines in the session's Ceph pool, which both hosts reach over its bridge
    as client.rmemfs (issue 13: a handful of seeded trials with --backend rados:...)."""
    hosts = TwoHosts(subnet="10.243.0", label="rados", ceph=ceph_cluster.dir)
    store = {"ceph_conf": str(ceph_cluster.conf), "ceph_id": ceph_cluster.user_id}
    two_host_trial(seed, hosts, f"rados:{ceph_cluster.pool}/trial-{seed}-{os.getpid()}", store,
                   "test_two_host_recovery_on_rados")


def two_host_trial(seed: int, hosts: TwoHosts, backend: Path | str, store: dict[str, str], name: str,
                   standby: bool = False, writeback: bool = False) -> None:
    """One seeded trial (the module's docstring) on ``backend``, a directory or a rados: spec with its
    store options ``store`` (ceph_conf, ceph_id), which every command on either host is given; with
    ``standby``, rmemfs-standby does the recovery; with ``writeback``, both mounts have writeback_cache.
    The workload's model takes a change as acknowledged once its file is closed (or msynced), which is an
    acknowledgement in both cache modes."""
    rng = random.Random(seed)
    flush_interval = rng.choice([0.3, 0.5, 0.7])
    workers, ops = rng.randint(2, 4), rng.randint(150, 400)
    # How the kill lands: at once (the last burst is surely after the last baseline), after a random delay
    # within the flush interval, a few ms into a requested flush of a big dirty set (mid-flush), or not at
    # all: a pause and a takeover while writers keep calls in flight (pause).
    modes = KILL_MODES[:3] if standby else KILL_MODES
    kill = modes[seed % len(modes)]
    kill_delay = {"now": 0.0, "delay": rng.uniform(0, flush_interval), "mid-flush": rng.uniform(0.002, 0.06),
                  "pause": 0.0}[kill]
    tail_big = rng.randint(16, 48) if kill == "mid-flush" else 0
    io_during_load = kill != "pause" and rng.random() < 0.5
    params = (f"seed={seed} flush_interval={flush_interval} workers={workers} ops/worker={ops} kill={kill} "
              f"after {kill_delay:.3f}s big={tail_big}MiB io_during_load={io_during_load} standby={standby} "
              f"writeback_cache={writeback}; "
              f"replay: tools/test {Path(__file__).relative_to(REPO)}::{name} "
              f"--seed {seed} --trials 1{' --standby' if standby and name == 'test_two_host_recovery' else ''}")
    print(f"\ntrial {params}")
    t0 = time.monotonic()
    with hosts as (a, b):
        state_file, report_file = a.dir / "state.json", b.dir / "report.json"
        assert os.stat(a.path("/dev/shm")).st_dev != os.stat(b.path("/dev/shm")).st_dev, "shared /dev/shm"
        cache = {"writeback_cache": True} if writeback else {}
        pid = a.mount_rmemfs(backend, a.dir / "mnt", flush_interval=flush_interval, region_size="64M", **cache,
                             **store)
        slow = {"load_rate": "64K", **cache} if io_during_load else dict(cache)      # load_rate: 16 pages/s
        watch = None
        if standby:     # watching through the workload (a busy source must not look dead); hosts.stop ends it
            watch = start_standby(b, a, backend, f"report={report_file}",
                                  *(f"{k}={v}" for k, v in {**slow, **store}.items()))
            wait_state(b, *watch, "watching")

        work = a.python(WORKLOAD, "run", a.dir / "mnt", "--seed", str(seed), "--out", state_file,
                        "--workers", str(workers), "--ops", str(ops), "--tail-big", str(tail_big), "--self-check",
                        "--contents", a.dir / "contents", check=False, timeout=120)
        assert work.returncode == 0, f"workload failed ({params}):\n{work.stdout}\n{work.stderr}"
        print(work.stdout.strip())

        if kill == "pause":
            pause_counts = pause_takeover_resume(a, b, backend, rng, params, report_file, store=store,
                                                 writeback=writeback)
            report = pause_counts.pop("report", None)
            owner = b if isinstance(report, dict) else a     # a source resumed before the verdict keeps it
            check = owner.python(WORKLOAD, "verify", owner.dir / "mnt", state_file, "--exclude", PAUSE_DIR,
                                 check=False)
            assert check.returncode == 0, (f"{owner.name}'s tree differs from the acknowledged state ({params}):"
                                           f"\n{check.stdout[-4000:]}")
            more = (f", dirty pages fetched {report['dirty_pages_fetched']}, verified {report['verified_pages']}"
                    if isinstance(report, dict) else "")
            print(f"ok in {time.monotonic() - t0:.1f} s: pause outcomes {pause_counts}{more}")
            return

        flush = None
        if kill == "mid-flush":
            flush = a.popen([PYTHON, WORKLOAD, "ctl", a.dir / "mnt", "flush"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
        time.sleep(kill_delay)
        os.kill(pid, signal.SIGKILL)
        if flush is not None:
            flush.wait(timeout=30)      # fails: the daemon died under it
        deadline = time.monotonic() + 10
        while pid in a.pids() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert pid not in a.pids(), "rmemfs survived SIGKILL?"
        assert a.exporter_pids(), f"the exporter died with rmemfs ({params})"

        if watch is None:
            rec = b.recover_rmemfs(backend, b.dir / "mnt", a.addr, json_report=report_file, check=False,
                                   extra=["--transport", "software", "--verify"], region_size="64M", **slow, **store)
            assert rec.returncode == 0, f"rmemfs-recover exited {rec.returncode} ({params}):\n{rec.stderr}{rec.stdout}"
            recovery_out = rec.stdout
        else:
            wait_mounted(b, *watch)
            deadline = time.monotonic() + 30      # written once the mount is usable
            while not report_file.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            recovery_out = watch[1].read_text()
            # One takeover, after the kill: a busy source taken for dead would have failed the workload.
            assert recovery_out.count("taking over") == 1, recovery_out
        report = json.loads(report_file.read_text())
        assert report["source"] == f"{a.addr}:7470" and report["transport"] == "software", report
        assert not report["rejected_entries"], report["rejected_entries"]

        if io_during_load:
            load = json.loads(b.python(WORKLOAD, "ctl", b.dir / "mnt", "stats").stdout)["load"]
            print(f"background load at the mount: {load['missing_pages']} of {load['to_load_pages']} pages missing")
            if load["to_load_pages"] >= 64:       # 4 s at 16 pages/s: surely still loading
                assert load["missing_pages"] > 0, load
            state_file = b.dir / "state2.json"
            more = b.python(WORKLOAD, "resume", b.dir / "mnt", "--contents", a.dir / "contents", "--state",
                            a.dir / "state.json", "--seed", str(seed + 1), "--ops", "40", "--out", state_file,
                            check=False, timeout=120)
            assert more.returncode == 0, f"workload during the load failed ({params}):\n{more.stdout}\n{more.stderr}"
            print(more.stdout.strip())
            # Before anything reads the whole tree (which would bring every page in): a second failure.
            second_failure_back_on_a(a, b, backend, state_file, report_file, params, store)
        else:
            check = b.python(WORKLOAD, "verify", b.dir / "mnt", state_file, check=False)
            assert check.returncode == 0, (f"recovered tree differs from the acknowledged state ({params}):\n"
                                           f"{check.stdout[-4000:]}\nrecovery:\n{recovery_out}")
        state = json.loads(state_file.read_text())
    print(f"ok in {time.monotonic() - t0:.1f} s: {len(state.get('files', ()))} files, baseline generation "
          f"{report['baseline_generation']}, dirty pages listed {report['dirty_pages_listed']}, fetched "
          f"{report['dirty_pages_fetched']}, verified {report['verified_pages']}")


def test_demo_runs() -> None:
    """The narrated demo (tools/demo without its setup step) passes end to end."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    t0 = time.monotonic()
    proc = subprocess.run([PYTHON, str(REPO / "examples" / "demo.py")], capture_output=True, text=True,
                          timeout=120, env=env, cwd=REPO)
    assert proc.returncode == 0, f"demo failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    assert "PASS" in proc.stdout
    assert time.monotonic() - t0 < 60, "the demo should take under a minute"


@pytest.mark.ceph
@pytest.mark.slow
def test_demo_runs_on_rados() -> None:
    """tools/demo --backend rados: the same story with the baselines in a throw-away cluster's pool, which
    both hosts reach; the cluster and its bridge are gone afterwards."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([PYTHON, str(REPO / "examples" / "demo.py"), "--backend", "rados"], capture_output=True,
                          text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, f"demo failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    assert "PASS" in proc.stdout and "published in rados:rmemfs/demo-" in proc.stdout
    assert "/secret" in proc.stdout and "/epoch.0000000001" in proc.stdout     # listed from hostA as client.rmemfs
    conf = next(line for line in proc.stdout.splitlines() if "ceph.conf " in line).split("ceph.conf ")[1].split(";")[0]
    assert not Path(conf).exists(), "the demo left its cluster directory behind"


def second_failure_back_on_a(a: Host, b: Host, backend: Path | str, state_file: Path, first_report: Path,
                             params: str, store: dict[str, str]) -> None:
    """hostB's rmemfs dies in the middle of its background load; hostA recovers from hostB's exporter.

    What hostB never loaded is in the store; what it fetched from hostA and what was written on it since
    are in its dirty lists: hostA's copy must be the state after the writes on hostB, byte for byte."""
    # Usually still loading (16 pages/s), but not always: the writes, truncates and unlinks on hostB may
    # have claimed every page a small tree had left to load (seed 1572567010: 105 pages, none left).
    load = json.loads(b.python(WORKLOAD, "ctl", b.dir / "mnt", "stats").stdout)["load"]
    pid = b.rmemfs_pid(backend, store)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while pid in b.pids() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert pid not in b.pids() and b.exporter_pids(), f"hostB's rmemfs survived, or its exporter died ({params})"
    report_file = a.dir / "report2.json"
    rec = a.recover_rmemfs(backend, a.dir / "mnt2", b.addr, json_report=report_file, check=False,
                           extra=["--transport", "software", "--verify"], region_size="64M", **store)
    assert rec.returncode == 0, f"second recovery on hostA exited {rec.returncode} ({params}):\n{rec.stderr}{rec.stdout}"
    report = json.loads(report_file.read_text())
    assert report["source"] == f"{b.addr}:7470", report
    assert report["new_epoch"] > json.loads(first_report.read_text())["new_epoch"], report
    check = a.python(WORKLOAD, "verify", a.dir / "mnt2", state_file, check=False)
    assert check.returncode == 0, (f"hostA's copy after the second failure differs ({params}):\n"
                                   f"{check.stdout[-4000:]}\nrecovery:\n{rec.stdout}")
    print(f"second failure: hostB killed with {load['missing_pages']} of {load['to_load_pages']} pages not loaded; "
          f"hostA fetched {report['dirty_pages_fetched']} dirty pages from hostB")
