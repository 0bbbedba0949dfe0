"""Hostile local users (issue 15 item 1), on real mounts with a real second uid (``nobody`` via setpriv).

A region directory lives in a world-writable, sticky directory (/dev/shm). ``nobody`` can pre-create it
with symlinks and a planted exporter.json / exporter.sock; root's rmemfs must then neither write through
the symlinks nor signal the PID the planted files name.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from harness import exporter_pid, process_running, wait_gone

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]

# Run as nobody: plant the directory, the symlinks and a fake exporter (socket + json naming VICTIM).
PLANT = r"""
import json, os, socket, sys
d, secret, logtarget, victim = sys.argv[1:5]
os.mkdir(d, 0o755)
os.symlink(logtarget, os.path.join(d, "rmemfs.log"))
os.symlink(secret, os.path.join(d, ".exporter.json.tmp"))
with open(os.path.join(d, "exporter.json"), "w") as f:
    json.dump({"pid": int(victim), "listen": "127.0.0.1", "port": 1, "fsid": "x"}, f)
s = socket.socket(socket.AF_UNIX)
s.bind(os.path.join(d, "exporter.sock"))
s.listen(8)
print("planted", flush=True)
while True:   # answer every request with ok, as a live exporter would
    c, _ = s.accept()
    try:
        c.recv(65536)
        c.sendall(json.dumps({"ok": True}).encode() + b"\n")
    except OSError:
        pass
    c.close()
"""


def test_foreign_region_directory_is_not_trusted(rig, tmp_path: Path) -> None:
    rig.mount()
    (rig.mountpoint / "f").write_bytes(b"data")
    rig.flush()
    rig.unmount()
    subprocess.run(["rm", "-rf", str(rig.regiondir)], check=True)   # as after a reboot

    secret = tmp_path / "secret"
    secret.write_bytes(b"root only")
    secret.chmod(0o600)
    logtarget = tmp_path / "logtarget"
    logtarget.write_bytes(b"original")
    logtarget.chmod(0o600)
    victim = subprocess.Popen(["sleep", "300"])
    plant = subprocess.Popen(NOBODY + [sys.executable, "-c", PLANT, str(rig.regiondir), str(secret),
                                       str(logtarget), str(victim.pid)], stdout=subprocess.PIPE, text=True)
    try:
        assert plant.stdout is not None and plant.stdout.readline().strip() == "planted"
        assert rig.regiondir.stat().st_uid == 65534
        rig.mount()
        assert (rig.mountpoint / "f").read_bytes() == b"data"
        # the mount runs in a directory of its own: root's, 0700, not the planted one
        st = os.lstat(rig.regiondir)
        assert (st.st_uid, st.st_mode & 0o7777) == (0, 0o700)
        assert not os.path.islink(rig.regiondir / "rmemfs.log")
        time.sleep(0.5)
        assert secret.read_bytes() == b"root only"
        assert logtarget.read_bytes() == b"original"
        assert process_running(victim.pid), "rmemfs signalled a process that is not its exporter"
        rig.unmount()
    finally:
        plant.kill()
        plant.wait()
        victim.kill()
        victim.wait()


def _start_time(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])


def test_stop_signals_only_a_proven_exporter(rig) -> None:
    """exporter.json naming a pid that is not (any more) our exporter, as after a pid reuse: stopping
    the exporter leaves that process alone, even when its start time matches; a hung real exporter
    (SIGSTOPped) is still killed."""
    rig.mount()
    exporter = exporter_pid(rig.regiondir)
    rig.unmount()
    wait_gone(exporter)
    victim = subprocess.Popen(["sleep", "300"])
    try:
        for start in (1, _start_time(victim.pid)):
            (rig.regiondir / "exporter.json").write_text(json.dumps(
                {"pid": victim.pid, "start": start, "listen": "127.0.0.1", "port": rig.port, "fsid": "x"}))
            rig.ctl("exporter", "--stop", "--backend", str(rig.backend), "--regiondir", str(rig.regiondir))
            assert process_running(victim.pid), f"killed a process that is not the exporter (start {start})"
    finally:
        victim.kill()
        victim.wait()
    rig.mount()
    exporter = exporter_pid(rig.regiondir)
    os.kill(exporter, signal.SIGSTOP)
    try:
        rig.ctl("exporter", "--stop", "--backend", str(rig.backend), "--regiondir", str(rig.regiondir))
        wait_gone(exporter, timeout=5)
    finally:
        if process_running(exporter):
            os.kill(exporter, signal.SIGKILL)
