"""Two netns hosts: rmemfs on hostA, rmemfs-standby on hostB watching it over the network and taking over.

hostA and hostB are tools/hosts.py network namespaces (own subnet 10.242.0, own /dev/shm); hostB reaches
hostA's memory only through the exporter's TCP transport.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
from hosts import PYTHON, Host, TwoHosts  # noqa: E402
from hosts_fixtures import hosts_available  # noqa: E402, F401
from harness import prepared_exporters  # noqa: E402

WORKLOAD = REPO / "tools" / "fsworkload.py"
SUBNET = "10.242.0"

pytestmark = pytest.mark.hosts


def start_standby(b: Host, a: Host, backend: Path | str, *extra: str) -> tuple[subprocess.Popen[bytes], Path]:
    log = b.dir / "standby.log"
    (b.dir / "mnt").mkdir(exist_ok=True)
    opts = ",".join([f"listen={b.addr}", "region_size=64M", "watch_interval=0.01", "dead_after=0.3", *extra])
    proc = b.popen([PYTHON, "-m", "rmemfs.cli.standby", "--source", a.addr, "--backend", str(backend),
                    "--transport", "software", "-o", opts, "-f", "--log", str(log), str(b.dir / "mnt")],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, log


def status(b: Host) -> dict:
    proc = b.python("-m", "rmemfs.cli.ctl", "standby", "status", "--json", str(b.dir / "mnt"), check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else {"state": None}


def wait_state(b: Host, proc: subprocess.Popen[bytes], log: Path, *states: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        st = status(b)
        if st.get("state") in states:
            return st
        assert proc.poll() is None, f"standby exited {proc.returncode}: {log.read_text() if log.exists() else ''}"
        assert time.monotonic() < deadline, f"never {states}: {st}\n{log.read_text() if log.exists() else ''}"
        time.sleep(0.05)


def mounted(host: Host, mnt: Path) -> bool:
    return host.run(["mountpoint", "-q", str(mnt)], check=False).returncode == 0


def wait_mounted(b: Host, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not mounted(b, b.dir / "mnt"):
        assert proc.poll() is None, f"standby exited {proc.returncode}: {log.read_text()}"
        assert time.monotonic() < deadline, f"no takeover:\n{log.read_text()}"
        time.sleep(0.05)


def stop(b: Host, proc: subprocess.Popen[bytes]) -> None:
    b.run(["fusermount3", "-u", str(b.dir / "mnt")], check=False)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def mount_source(a: Host, flush_interval: float = 3600) -> tuple[Path, int]:
    """hostA's rmemfs over a backend beside the hosts: (backend, its pid)."""
    backend = a.dir.parent / "backend"
    return backend, a.mount_rmemfs(backend, a.dir / "mnt", flush_interval=flush_interval, region_size="64M",
                                   heartbeat_interval=0.02)


def partition(a: Host) -> None:
    """hostA cut off: its links down (its processes live on)."""
    a.run(["ip", "link", "set", "dev", "lo", "down"], check=False)
    a.run(["sh", "-c", "ip -o link | awk -F': ' '/rh/{print $2}' | cut -d@ -f1 | xargs -I{} ip link set dev {} down"])


def test_kill_is_taken_over_with_every_acknowledged_write() -> None:
    hosts = TwoHosts(subnet=SUBNET)
    kill_is_taken_over(hosts, hosts.backend, {})


@pytest.mark.ceph
def test_kill_is_taken_over_on_rados(ceph_cluster) -> None:  # type: ignore[no-untyped-def]
    """The same with the baselines in the session's Ceph pool: rmemfs-standby takes --backend rados:... and
    its store options, and passes them on to the takeover (issue 13)."""
    hosts = TwoHosts(subnet="10.245.0", label="radosstandby", ceph=ceph_cluster.dir)
    store = {"ceph_conf": str(ceph_cluster.conf), "ceph_id": ceph_cluster.user_id}
    kill_is_taken_over(hosts, f"rados:{ceph_cluster.pool}/standby-{os.getpid()}", store)


def kill_is_taken_over(hosts: TwoHosts, backend: Path | str, store: dict[str, str]) -> None:
    with hosts as (a, b):
        state_file = a.dir / "state.json"
        pid = a.mount_rmemfs(backend, a.dir / "mnt", flush_interval=0.5, region_size="64M",
                             heartbeat_interval=0.02, **store)
        proc, log = start_standby(b, a, backend, *(f"{k}={v}" for k, v in store.items()))
        try:
            wait_state(b, proc, log, "watching")
            work = a.python(WORKLOAD, "run", a.dir / "mnt", "--seed", "7", "--out", state_file, "--workers", "3",
                            "--ops", "200", "--self-check", check=False, timeout=120)
            assert work.returncode == 0, work.stdout + work.stderr
            assert status(b)["state"] == "watching"
            os.kill(pid, signal.SIGKILL)
            wait_mounted(b, proc, log)
            check = b.python(WORKLOAD, "verify", b.dir / "mnt", state_file, check=False)
            assert check.returncode == 0, check.stdout[-4000:] + log.read_text()
            assert "taking over" in log.read_text()
        finally:
            stop(b, proc)


def test_long_pause_is_fenced_and_the_resumed_source_refuses_writes() -> None:
    with TwoHosts(subnet=SUBNET) as (a, b):
        backend, pid = mount_source(a)
        a.run(["sh", "-c", f"echo v1 > {a.dir}/mnt/f && sync {a.dir}/mnt/f"])
        proc, log = start_standby(b, a, backend)
        try:
            wait_state(b, proc, log, "watching")
            os.kill(pid, signal.SIGSTOP)
            try:
                wait_mounted(b, proc, log)
            finally:
                os.kill(pid, signal.SIGCONT)
            late = a.run(["sh", "-c", f"echo v2 > {a.dir}/mnt/f && sync {a.dir}/mnt/f"], check=False)
            assert late.returncode != 0, "the fenced old owner acknowledged a write"
            assert b.run(["cat", str(b.dir / "mnt" / "f")]).stdout == "v1\n"
        finally:
            stop(b, proc)


@pytest.mark.parametrize("fence_cmd", [False, True], ids=["without-fence_cmd", "with-fence_cmd"])
def test_partitioned_source(fence_cmd: bool) -> None:
    """Without fence_cmd it is never taken over (an operator is needed); with one that exits 0 it is
    recovered from the baseline alone: the flushed file is there, the dirty one lost (what fence_cmd accepts)."""
    with TwoHosts(subnet=SUBNET) as (a, b):
        backend, _ = mount_source(a)
        _write(a, a.dir / "mnt" / "f", "flushed")
        a.python("-m", "rmemfs.cli.ctl", "flush", str(a.dir / "mnt"))
        _write(a, a.dir / "mnt" / "late", "dirty")
        proc, log = start_standby(b, a, backend, *(["fence_cmd=true"] if fence_cmd else []))
        try:
            wait_state(b, proc, log, "watching")
            partition(a)
            if not fence_cmd:
                wait_state(b, proc, log, "needs-operator")
                time.sleep(1.0)
                assert not mounted(b, b.dir / "mnt") and proc.poll() is None
                assert "operator" in log.read_text()
                return
            wait_mounted(b, proc, log)
            assert b.run(["cat", str(b.dir / "mnt" / "f")]).stdout == "flushed\n"
            assert b.run(["test", "-e", str(b.dir / "mnt" / "late")], check=False).returncode != 0
            assert "fenced by fence_cmd" in log.read_text()
        finally:
            stop(b, proc)


def _write(host: Host, path: Path, text: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Written and fsynced: acknowledged."""
    return host.run(["sh", "-c", f"echo {text} > {path} && sync {path}"], check=check)


def _standby_exporters(host: Host, backend: Path) -> list[int]:
    """Exporters a standby of ``backend`` started ahead of its takeover (tests/test_mount_standby.py)."""
    return [p for p in prepared_exporters(backend) if p in host.pids()]


def test_short_pause_and_a_restarted_standby_are_not_taken_over_then_a_kill_is() -> None:
    with TwoHosts(subnet=SUBNET) as (a, b):
        backend, pid = mount_source(a)
        _write(a, a.dir / "mnt" / "f", "v1")
        proc, log = start_standby(b, a, backend)
        try:
            wait_state(b, proc, log, "watching")
            os.kill(pid, signal.SIGSTOP)
            time.sleep(0.1)                 # well under dead_after=0.3
            os.kill(pid, signal.SIGCONT)
            time.sleep(1.0)
            assert status(b)["state"] == "watching" and not mounted(b, b.dir / "mnt"), log.read_text()
            _write(a, a.dir / "mnt" / "f", "v2")       # the source still owns it
            # A standby killed while watching and started again: it registers anew and takes over later.
            (first,) = _standby_exporters(b, backend)
            proc.kill()
            proc.wait()
            proc, log = start_standby(b, a, backend)
            st = wait_state(b, proc, log, "watching")
            assert st["registrations"] >= 1 and not mounted(b, b.dir / "mnt")
            assert first not in _standby_exporters(b, backend), "the killed standby's exporter outlived it"
            os.kill(pid, signal.SIGKILL)
            wait_mounted(b, proc, log)
            assert b.run(["cat", str(b.dir / "mnt" / "f")]).stdout == "v2\n"
        finally:
            stop(b, proc)


def test_failback_the_repaired_host_becomes_the_new_owners_standby() -> None:
    with TwoHosts(subnet=SUBNET) as (a, b):
        backend, pid = mount_source(a)
        _write(a, a.dir / "mnt" / "f", "v1")
        proc_b, log_b = start_standby(b, a, backend)
        proc_a: subprocess.Popen[bytes] | None = None
        try:
            wait_state(b, proc_b, log_b, "watching")
            os.kill(pid, signal.SIGKILL)
            wait_mounted(b, proc_b, log_b)
            _write(b, b.dir / "mnt" / "f", "v2")
            # Repaired hostA: its old memory is retired by the existing rules (refused until hostB has
            # published a baseline of its own), then it watches hostB.
            a.run(["fusermount3", "-u", "-z", str(a.dir / "mnt")], check=False)
            b.python("-m", "rmemfs.cli.ctl", "flush", str(b.dir / "mnt"))
            a.python("-m", "rmemfs.cli.ctl", "exporter", "--backend", str(backend), "--retire")
            assert not a.exporter_pids()
            _write(b, b.dir / "mnt" / "f", "v3")      # dirty on hostB only
            proc_a, log_a = start_standby(a, b, backend)
            wait_state(a, proc_a, log_a, "watching")
            proc_b.kill()                  # hostB's fs process is its standby process since the takeover
            proc_b.wait()
            b.run(["fusermount3", "-u", "-z", str(b.dir / "mnt")], check=False)
            wait_mounted(a, proc_a, log_a)
            assert a.run(["cat", str(a.dir / "mnt" / "f")]).stdout == "v3\n"
            _write(a, a.dir / "mnt" / "f", "v4")
            assert a.run(["cat", str(a.dir / "mnt" / "f")]).stdout == "v4\n"
            # hostB's memory retires by the same rules, though its exporter was the one prepared ahead
            # (its command line does not name the region directory).
            a.python("-m", "rmemfs.cli.ctl", "flush", str(a.dir / "mnt"))
            b.python("-m", "rmemfs.cli.ctl", "exporter", "--backend", str(backend), "--retire")
            assert not b.exporter_pids()
        finally:
            if proc_a is not None:
                stop(a, proc_a)
            stop(b, proc_b)
