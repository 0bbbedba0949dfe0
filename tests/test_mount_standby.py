"""Process level on one host (loopback): rmemfs-standby watches a mounted source and takes over by itself."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import ENV, Rig, cli, exporter_pid, prepared_exporters, run, wait_gone
from rmemfs.host import is_mounted
from test_mount_lifecycle import digest_tree
from test_recover_cli import baseline_then_changes

pytestmark = pytest.mark.mount

SOURCE_OPTS = ["flush_interval=3600", "heartbeat_interval=0.02"]


class Standby:
    def __init__(self, rig: Rig, mnt: Path, extra: list[str], env: dict[str, str] | None = None) -> None:
        self.rig, self.mnt = rig, mnt
        mnt.mkdir(exist_ok=True)
        self.log = rig.root / "standby.log"
        self.out = open(self.log, "ab")
        self.proc = subprocess.Popen(
            cli("standby") + ["--backend", str(rig.backend), "--transport", "software", "--source",
                              f"127.0.0.1:{rig.port}", "-o", rig.opts(["port=0", *extra]), "--debug", "-f", str(mnt)],
            env={**ENV, **(env or {})}, stdout=self.out, stderr=subprocess.STDOUT)

    def status(self) -> dict:
        proc = run(cli("ctl") + ["standby", "status", "--json", str(self.mnt)])
        return json.loads(proc.stdout) if proc.returncode == 0 else {"state": None, "rc": proc.returncode}

    def wait_state(self, *states: str, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.status()
            if st.get("state") in states:
                return st
            assert self.proc.poll() is None, f"standby exited {self.proc.returncode}: {self.log.read_text()}"
            time.sleep(0.05)
        raise AssertionError(f"standby never reached {states}: {st}\n{self.log.read_text()}")

    def wait_mounted(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not is_mounted(self.mnt):
            assert self.proc.poll() is None, f"standby exited {self.proc.returncode}: {self.log.read_text()}"
            assert time.monotonic() < deadline, f"no takeover: {self.log.read_text()}"
            time.sleep(0.05)

    def stop(self) -> None:
        if is_mounted(self.mnt):
            subprocess.run(["fusermount3", "-u", str(self.mnt)], capture_output=True)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.out.close()


@pytest.fixture
def source(rig: Rig) -> Rig:
    rig.mount(SOURCE_OPTS)
    baseline_then_changes(rig)
    return rig


@pytest.fixture
def standby(source: Rig, request: pytest.FixtureRequest) -> Iterator[Standby]:
    extra = getattr(request, "param", ["watch_interval=0.01", "dead_after=0.3"])
    sb = Standby(source, source.root / "mnt2", extra)
    try:
        yield sb
    finally:
        sb.stop()


def test_kill_is_taken_over_byte_exact(source: Rig, standby: Standby) -> None:
    want = digest_tree(source.mountpoint)
    st = standby.wait_state("watching")
    assert st["registrations"] >= 1 and st["heartbeat_interval"] == pytest.approx(0.02)
    source.kill()
    standby.wait_mounted()
    assert digest_tree(standby.mnt) == want
    st = standby.status()
    # Its exporter saw the process exit: taken over before dead_after (0.3 s) ran out.
    assert st["state"] == "taking-over" and st["detected_by"] == "exit" and st["detected_after"] < 0.3, st
    assert "taking over" in standby.log.read_text() and "saw the filesystem process exit" in standby.log.read_text()
    # The new owner serves writes.
    (standby.mnt / "after").write_bytes(b"new owner")
    assert (standby.mnt / "after").read_bytes() == b"new owner"


def test_the_takeover_hands_the_new_regions_to_the_exporter_prepared_while_watching(source: Rig,
                                                                                   standby: Standby) -> None:
    standby.wait_state("watching")
    (prepared,) = prepared_exporters(source.backend)
    source.kill()
    standby.wait_mounted()
    # The new regions are served by the exporter that was started before the failure.
    serving = {exporter_pid(d) for d in Path("/dev/shm").glob(f"{source.regiondir.name}.e*")}
    assert serving == {prepared}, (serving, prepared)
    (standby.mnt / "after").write_bytes(b"new owner")
    assert (standby.mnt / "after").read_bytes() == b"new owner"


def test_short_pause_is_not_taken_over(source: Rig, standby: Standby) -> None:
    standby.wait_state("watching")
    pid = source.daemon_pid()
    os.kill(pid, signal.SIGSTOP)
    time.sleep(0.1)          # well under dead_after=0.3
    os.kill(pid, signal.SIGCONT)
    time.sleep(1.0)
    st = standby.status()
    assert st["state"] == "watching" and not is_mounted(standby.mnt), st
    assert (source.mountpoint / "b").read_bytes() == b"b" * 5000


@pytest.mark.allow_log("unreachable")
def test_long_pause_is_fenced_and_the_resumed_source_refuses_writes(source: Rig, standby: Standby) -> None:
    want = digest_tree(source.mountpoint)
    standby.wait_state("watching")
    pid = source.daemon_pid()
    os.kill(pid, signal.SIGSTOP)
    try:
        standby.wait_mounted()
    finally:
        os.kill(pid, signal.SIGCONT)
    st = standby.status()
    # A pause, seen as one by the exporter: taken over once it has lasted dead_after (0.3 s), never sooner.
    assert st["detected_by"] == "stopped" and st["detected_after"] >= 0.3 + 0.02, st
    assert digest_tree(standby.mnt) == want
    with pytest.raises(OSError):
        with open(source.mountpoint / "b", "r+b") as f:
            f.write(b"from the old owner")
            f.flush()
            os.fsync(f.fileno())
    assert (standby.mnt / "b").read_bytes() == b"b" * 5000


def test_unreachable_exporter_without_fence_cmd_is_not_taken_over(source: Rig, standby: Standby) -> None:
    standby.wait_state("watching")
    os.kill(exporter_pid(source.regiondir), signal.SIGKILL)
    source.kill()
    st = standby.wait_state("needs-operator")
    time.sleep(1.0)
    assert not is_mounted(standby.mnt) and standby.proc.poll() is None, st
    assert "needs an operator" in standby.log.read_text() or "operator" in standby.log.read_text()


@pytest.mark.parametrize("standby", [["watch_interval=0.01", "dead_after=0.3", "fence_cmd=true"]], indirect=True)
def test_unreachable_exporter_with_fence_cmd_recovers_from_the_baseline(source: Rig, standby: Standby) -> None:
    standby.wait_state("watching")
    exporter = exporter_pid(source.regiondir)
    os.kill(exporter, signal.SIGKILL)
    wait_gone(exporter)
    source.kill()
    standby.wait_mounted()
    # The baseline alone: what was flushed is there, the later file is lost (the risk fence_cmd accepts).
    assert (standby.mnt / "b").read_bytes() == b"b" * 5000
    assert not (standby.mnt / "late").exists()


def test_standby_restarted_while_watching(source: Rig, standby: Standby) -> None:
    want = digest_tree(source.mountpoint)
    standby.wait_state("watching")
    (prepared,) = prepared_exporters(source.backend)
    standby.proc.kill()
    standby.proc.wait()
    wait_gone(prepared)     # its stdin closed with the standby: a prepared exporter does not outlive it unused
    again = Standby(source, standby.mnt, ["watch_interval=0.01", "dead_after=0.3"])
    try:
        again.wait_state("watching")
        assert not is_mounted(again.mnt)
        source.kill()
        again.wait_mounted()
        assert digest_tree(again.mnt) == want
    finally:
        again.stop()


def _notify_socket(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    s.settimeout(30)
    return s


def scrape(port: int) -> dict[str, str]:
    """Prometheus text from 127.0.0.1:PORT: sample (with its labels) -> value."""
    import urllib.request
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {line.rpartition(" ")[0]: line.rpartition(" ")[2] for line in text.splitlines() if line and line[0] != "#"}


def test_systemd_readiness_and_metrics_of_rmemfs_and_the_standby(rig: Rig) -> None:
    from harness import free_port
    sock_path, port = rig.root / "notify.sock", free_port()
    with _notify_socket(sock_path) as s:
        rig.mount([*SOURCE_OPTS, f"metrics=127.0.0.1:{port}"], env={"NOTIFY_SOCKET": str(sock_path)})
        assert is_mounted(rig.mountpoint)
        assert s.recv(4096).startswith(b"READY=1")
        (rig.mountpoint / "m").write_bytes(b"m" * 10000)
        m = scrape(port)
        assert float(m["rmemfs_heartbeat_total"]) > 0 and float(m["rmemfs_heartbeat_age_seconds"]) < 5, m
        assert float(m["rmemfs_dirty_entries"]) >= 1 and float(m["rmemfs_fenced"]) == 0, m
        assert float(m["rmemfs_flushes_total"]) >= 0 and "rmemfs_flush_last_seconds" in m, m
        sb = Standby(rig, rig.root / "mnt2", ["watch_interval=0.01", "dead_after=0.3"],
                     env={"NOTIFY_SOCKET": str(sock_path)})
        try:
            msg = s.recv(4096)
            assert msg.startswith(b"READY=1") and b"watching" in msg, msg
            assert sb.status()["state"] == "watching"
        finally:
            sb.stop()


def test_event_log_and_metrics(source: Rig) -> None:
    from harness import free_port
    events, port, report = source.root / "events.jsonl", free_port(), source.root / "takeover.json"
    sb = Standby(source, source.root / "mnt2", ["watch_interval=0.01", "dead_after=0.3", f"event_log={events}",
                                                f"metrics=127.0.0.1:{port}", f"report={report}"])
    try:
        sb.wait_state("watching")
        lines = scrape(port)
        assert float(lines["rmemfs_standby_registrations_total"]) >= 1
        assert float(lines["rmemfs_standby_heartbeat_age_seconds"]) < 0.3
        assert float(lines["rmemfs_standby_detections_total"]) == 0
        source.kill()
        sb.wait_mounted()
        kinds = [json.loads(line)["event"] for line in events.read_text().splitlines()]
        assert kinds[:2] == ["registered", "watching"] and kinds[-2:] == ["dead", "taking-over"], kinds
        # The takeover's own report: each phase of the recovery (tools/bench's failover split uses them).
        # It is written once the mount is usable, a little after the kernel shows it mounted.
        deadline = time.monotonic() + 30
        while not report.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        phases = json.loads(report.read_text())["phases"]
        assert {"baseline plan", "connect", "fence", "lists", "exporter wait", "publish+mount"} <= set(phases), phases
        # After the takeover the same endpoint has the takeover's phases and the new owner's filesystem.
        m = scrape(port)
        assert float(m["rmemfs_standby_detections_total"]) == 1, m
        assert 'rmemfs_standby_recovery_phase_seconds{phase="fence"}' in m, m
        assert float(m["rmemfs_heartbeat_total"]) > 0 and float(m["rmemfs_epoch"]) >= 2, m
    finally:
        sb.stop()


@pytest.mark.parametrize("standby", [["watch_interval=0.01", "dead_after=0.3", "fence_cmd=true"]], indirect=True)
def test_clean_unmount_and_remount_are_not_taken_over_and_are_registered_again(source: Rig, standby: Standby
                                                                              ) -> None:
    first = standby.wait_state("watching")
    source.ctl("umount", str(source.mountpoint))
    standby.wait_state("source-stopped")
    time.sleep(1.0)
    assert not is_mounted(standby.mnt)
    source.mount(SOURCE_OPTS)
    again = standby.wait_state("watching")
    assert again["registrations"] > first["registrations"]
    want = digest_tree(source.mountpoint)
    source.kill()
    standby.wait_mounted()
    assert digest_tree(standby.mnt) == want


def _standby_cmd(rig: Rig, mnt: Path, *extra: str, backend: Path | None = None, source: str | None = None,
                 transport: str = "software") -> list[str]:
    return cli("standby") + ["--backend", str(backend or rig.backend), "--transport", transport, "--source",
                             source or f"127.0.0.1:{rig.port}", "-o", rig.opts(["port=0", *extra]), "--debug", "-f", str(mnt)]


def test_exit_codes_before_a_takeover(source: Rig, tmp_path: Path) -> None:
    """Each way rmemfs-standby ends before a takeover: one line and its code (exits.py's standby column)."""
    from test_mount_lifecycle import one_line_error
    mnt = source.root / "mnt2"
    mnt.mkdir()
    one_line_error(run(_standby_cmd(source, mnt, "dead_after=0")), 2, "dead_after")
    one_line_error(run(_standby_cmd(source, mnt, backend=tmp_path / "nope")), 10, "does not exist")
    one_line_error(run(_standby_cmd(source, tmp_path / "no-mnt" / "x")), 12)
    forged = tmp_path / "forged"
    shutil.copytree(source.backend, forged)
    (forged / "secret").write_text("00" * 32 + "\n")
    one_line_error(run(_standby_cmd(source, mnt, backend=forged)), 21, "secret")
    other = Rig(tmp_path / "other")
    try:
        other.mount()
        one_line_error(run(_standby_cmd(source, mnt, source=f"127.0.0.1:{other.port}")), 22, "mismatch")
    finally:
        other.cleanup()
    # verbs without an RDMA device here: the transport cannot run, which no retry mends
    one_line_error(run(_standby_cmd(source, mnt, transport="verbs")), 24)
    sb = Standby(source, mnt, ["watch_interval=0.01", "dead_after=0.3"])
    try:
        sb.wait_state("watching")
        (prepared,) = prepared_exporters(source.backend)
        sb.proc.send_signal(signal.SIGTERM)
        assert sb.proc.wait(30) == 0
        wait_gone(prepared)
    finally:
        sb.stop()
