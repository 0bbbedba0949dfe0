"""The Ceph test bed itself: durability across an OSD crash, cephx refusals, missing pools, netns reach."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
from hosts import PYTHON, TwoHosts, cleanup_stale  # noqa: E402

pytestmark = pytest.mark.ceph

TIMEOUTS = {"client_mount_timeout": "20", "rados_mon_op_timeout": "20", "rados_osd_op_timeout": "60"}


def _connect(c, rados_id: str = "admin", **conf: str):  # type: ignore[no-untyped-def]
    import rados
    # Connected by ``with`` (Rados.__enter__ connects).
    return rados.Rados(conffile=str(c.conf), rados_id=rados_id, conf={**TIMEOUTS, **conf})


def test_object_survives_osd_crash(ceph_cluster) -> None:  # type: ignore[no-untyped-def]
    data = bytes(range(256)) * 4096 * 3        # 3 MiB
    with _connect(ceph_cluster) as r, r.open_ioctx(ceph_cluster.pool) as io:
        io.write_full("durable", data)
    ceph_cluster.osd_stop()        # SIGKILL: whatever was acknowledged must be on the bluestore file
    ceph_cluster.osd_start()
    with _connect(ceph_cluster) as r, r.open_ioctx(ceph_cluster.pool) as io:
        assert io.read("durable", len(data) + 1) == data
        io.remove_object("durable")


def test_restricted_user_is_refused(ceph_cluster) -> None:  # type: ignore[no-untyped-def]
    import rados
    with _connect(ceph_cluster, ceph_cluster.restricted_id) as r, r.open_ioctx(ceph_cluster.pool) as io:
        with pytest.raises(rados.PermissionError):
            io.write_full("nope", b"x")
        with pytest.raises(rados.PermissionError):
            io.read("nope")
    with _connect(ceph_cluster, ceph_cluster.user_id) as r, r.open_ioctx(ceph_cluster.pool) as io:
        io.write_full("mine", b"ok")                  # the pool's own user may
        assert io.read("mine") == b"ok"
        io.remove_object("mine")


def test_wrong_key_is_refused(ceph_cluster, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import subprocess

    import rados
    key = subprocess.run(["ceph-authtool", "--gen-print-key"], capture_output=True, text=True, check=True).stdout
    bad = tmp_path / "bad.keyring"
    bad.write_text(f"[client.rmemfs]\n\tkey = {key.strip()}\n")
    with pytest.raises(rados.PermissionDeniedError):
        with _connect(ceph_cluster, "rmemfs", keyring=str(bad), log_to_stderr="false", err_to_stderr="false"):
            pass


def test_missing_pool(ceph_cluster) -> None:  # type: ignore[no-untyped-def]
    import rados
    with _connect(ceph_cluster) as r:
        assert not r.pool_exists("no-such-pool")
        with pytest.raises(rados.ObjectNotFound):
            r.open_ioctx("no-such-pool")


PROBE = """
import rados, sys
conf, pool, name = sys.argv[1:4]
with rados.Rados(conffile=conf, rados_id="rmemfs", conf={"client_mount_timeout": "20"}) as r:
    with r.open_ioctx(pool) as io:
        io.write_full(name, name.encode() * 1000)
        assert io.read(name, 1 << 20) == name.encode() * 1000
        print(io.read(sys.argv[4], 1 << 20).decode()[:5] if len(sys.argv) > 4 else "ok")
"""


@pytest.mark.hosts
def test_both_netns_hosts_reach_cluster(ceph_cluster) -> None:  # type: ignore[no-untyped-def]
    cleanup_stale()
    with TwoHosts(ceph=ceph_cluster.dir) as (a, b):
        assert a.ceph_addr and b.ceph_addr and a.ceph_addr != b.ceph_addr
        assert a.run([PYTHON, "-c", PROBE, ceph_cluster.conf, ceph_cluster.pool, "fromA"]).stdout.strip() == "ok"
        # hostB reads what hostA wrote: the same cluster, not a copy
        out = b.run([PYTHON, "-c", PROBE, ceph_cluster.conf, ceph_cluster.pool, "fromB", "fromA"]).stdout
        assert out.strip() == "fromA"
    with _connect(ceph_cluster) as r, r.open_ioctx(ceph_cluster.pool) as io:
        for o in ("fromA", "fromB"):
            io.remove_object(o)


def test_connected_client_resumes_after_osd_restart(ceph_cluster) -> None:  # type: ignore[no-untyped-def]
    # What the flush-retry fault needs: one long-lived client times out while the OSD is dead and writes
    # again as soon as it is back. (Before osd_stop marked the OSD down, this client kept timing out for
    # minutes after the restart: a lone OSD has no peer to report it.)
    import rados
    with _connect(ceph_cluster, rados_osd_op_timeout="5") as r, r.open_ioctx(ceph_cluster.pool) as io:
        io.write_full("resume", b"before")
        ceph_cluster.osd_stop()
        with pytest.raises(rados.TimedOut):
            io.write_full("resume", b"while down")
        ceph_cluster.osd_start()
        io.write_full("resume", b"after")
        assert io.read("resume") == b"after"
        io.remove_object("resume")


def _ctl_verify(spec: str, *options: str):  # type: ignore[no-untyped-def]
    import subprocess
    cmd = [sys.executable, "-m", "rmemfs.cli.ctl", "verify", "--backend", spec]
    if options:
        cmd += ["-o", ",".join(options)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_ctl_verify_names_rados_faults_with_their_exit_codes(ceph_cluster, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """One line and a documented code for each: a missing pool and an unknown user are backend errors
    (10; a missing pool exited 1 with an unexpected BackendError before), an unreachable cluster is 16,
    a store option on a directory backend is a usage error (2)."""
    conf = f"ceph_conf={ceph_cluster.conf}"
    cases = [(_ctl_verify("rados:no-such-pool/x", conf), 10, "no-such-pool"),
             (_ctl_verify(f"rados:{ceph_cluster.pool}/x", conf, "ceph_id=nobody-here"), 10, "nobody-here")]
    cases.append((_ctl_verify(f"rados:{ceph_cluster.pool}/x", f"ceph_conf={dead_conf(tmp_path)}"), 16, ""))
    (tmp_path / "dir").mkdir()
    cases.append((_ctl_verify(str(tmp_path / "dir"), conf), 2, "ceph_conf"))
    for proc, code, word in cases:
        assert proc.returncode == code, (code, proc.returncode, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in proc.stderr and word in lines[0], proc.stderr


def on_rados(rig, ceph_cluster, name: str, conf: Path | None = None) -> str:  # type: ignore[no-untyped-def]
    """Point ``rig`` at a fresh prefix of the test pool, as client.rmemfs; returns the prefix."""
    import uuid
    prefix = f"{name}-{uuid.uuid4().hex[:8]}"
    rig.spec = f"rados:{ceph_cluster.pool}/{prefix}"
    rig.store = [f"ceph_conf={conf or ceph_cluster.conf}", f"ceph_id={ceph_cluster.user_id}"]
    return prefix


def conf_with(ceph_cluster, tmp_path: Path, **client: str) -> Path:  # type: ignore[no-untyped-def]
    """A copy of the cluster's ceph.conf with more [client] settings (its last section): e.g. a shorter
    rados_osd_op_timeout, so that a fault test waits seconds, not the store's default."""
    conf = tmp_path / f"ceph-{len(list(tmp_path.glob('ceph-*.conf')))}.conf"
    conf.write_text(Path(ceph_cluster.conf).read_text() + "".join(f"{k} = {v}\n" for k, v in client.items()))
    return conf


def dead_conf(tmp_path: Path) -> Path:
    """A ceph.conf whose monitor never answers (librados gives up after its client_mount_timeout)."""
    dead = tmp_path / "dead.conf"
    dead.write_text("[global]\nmon_host = 127.0.0.1:1\nauth_supported = none\nclient_mount_timeout = 3\n")
    return dead


def test_daemon_mode_mount_on_rados_serves_and_publishes(ceph_cluster, rig, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """rmemfs without -f forks after opening the store: librados's threads do not survive a fork, so the
    daemon hung before the mount was ready (the mount command timed out) until the store reconnected in
    the child."""
    on_rados(rig, ceph_cluster, "daemon")
    rig.mount()                                    # daemon mode: returns once the mount is ready
    data = bytes(range(256)) * 4096 * 2            # 2 MiB
    with open(rig.mountpoint / "f.bin", "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    rig.flush()
    rig.ctl("umount", str(rig.mountpoint))
    assert rig.ctl("verify", *rig.backend_args()).returncode == 0
    # Without -o ceph_conf, librados's own lookup applies (CEPH_CONF here)
    from harness import cli, run
    found = run(cli("ctl") + ["verify", "--backend", rig.spec, "-o", f"ceph_id={ceph_cluster.user_id}"],
                env={"CEPH_CONF": str(ceph_cluster.conf)})
    assert found.returncode == 0, found.stderr
    rig.mount()
    assert (rig.mountpoint / "f.bin").read_bytes() == data
    rig.ctl("umount", str(rig.mountpoint))


def _remount_reads_back(rig, files: dict[str, bytes]) -> None:  # type: ignore[no-untyped-def]
    """Unmount (the final baseline published), verify the store, mount again, read ``files`` back."""
    rig.ctl("umount", str(rig.mountpoint))
    assert rig.ctl("verify", *rig.backend_args()).returncode == 0
    rig.mount()
    for name, data in files.items():
        assert (rig.mountpoint / name).read_bytes() == data, name
    rig.ctl("umount", str(rig.mountpoint))


def _dirty_pages(st: dict) -> int:
    return int(st["core"]["dirty_current_pages"] + st["core"]["dirty_flushing_pages"])


def _assert_flush_failed_marks_kept(rig, published: int, pages: int) -> None:  # type: ignore[no-untyped-def]
    """A flush failed: the published generation is still ``published`` and ``pages`` are still marked."""
    st = rig.stats()
    assert st["flush"]["failures"] >= 1 and st["flush"]["generation"] == published, st["flush"]
    assert _dirty_pages(st) >= pages, st["core"]


def _wait_retry_published(rig, published: int, timeout: float) -> None:  # type: ignore[no-untyped-def]
    """The flusher's own retries (its failure backoff, not the 3600 s interval) publish every mark."""
    import time
    deadline = time.monotonic() + timeout
    while True:
        st = rig.stats()
        if st["flush"]["generation"] > published and _dirty_pages(st) == 0:
            return
        assert time.monotonic() < deadline, (st["flush"], _dirty_pages(st),
                                             (rig.regiondir / "rmemfs.log").read_text()[-3000:])
        time.sleep(0.5)


@pytest.mark.mount
@pytest.mark.slow
def test_osd_killed_during_flush_fails_it_keeps_marks_and_retry_succeeds(ceph_cluster, rig) -> None:  # type: ignore[no-untyped-def]
    """Issue 13, faults: the only OSD SIGKILLed while a flush writes its segment. The flush fails (rmemfs-ctl
    flush: exit 4, one line, "did not answer"), nothing is published, every dirty mark is kept; once the OSD
    is back the flusher's own retry publishes it, and the data survives an unmount and a mount."""
    import contextlib
    import subprocess
    import time

    import rados
    prefix = on_rados(rig, ceph_cluster, "osdkill")
    rig.options = ["flush_interval=3600"]          # only explicit flushes and the failure retries
    rig.mount()
    (rig.mountpoint / "small").write_bytes(b"first baseline\n")
    rig.flush()
    published = rig.manifest().generation
    size = 192 << 20                               # a flush of a few seconds on the test cluster
    data = os.urandom(1 << 20) * (size >> 20)
    with open(rig.mountpoint / "big.bin", "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    pages = size // 4096
    flush = subprocess.Popen([sys.executable, "-m", "rmemfs.cli.ctl", "flush", str(rig.mountpoint)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Kill the OSD once the flush's first part object exists: mid-segment.
    with _connect(ceph_cluster) as r, r.open_ioctx(ceph_cluster.pool) as io:
        deadline = time.monotonic() + 60
        while not any(o.key.startswith(f"{prefix}/part.") for o in io.list_objects()):
            assert time.monotonic() < deadline and flush.poll() is None, "the flush wrote no part object"
            time.sleep(0.01)
    ceph_cluster.osd_stop()
    try:
        _, err = flush.communicate(timeout=120)
        assert flush.returncode == 4, (flush.returncode, err)
        assert len(err.strip().splitlines()) == 1 and "did not answer" in err and "Traceback" not in err, err
        _assert_flush_failed_marks_kept(rig, published, pages)
    finally:
        ceph_cluster.osd_start()
    _wait_retry_published(rig, published, 180)     # once the OSD is back
    assert rig.manifest().generation > published
    _remount_reads_back(rig, {"big.bin": data, "small": b"first baseline\n"})
    with _connect(ceph_cluster) as r, r.open_ioctx(ceph_cluster.pool) as io:
        for o in list(io.list_objects()):
            if o.key.startswith(prefix + "/"):
                with contextlib.suppress(rados.ObjectNotFound):
                    io.remove_object(o.key)


def test_mount_names_rados_faults_with_their_exit_codes(ceph_cluster, rig, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Issue 13, faults, at the mount: a missing pool, a wrong key and a user without the pool's OSD caps
    are backend errors (10), a cluster down is 16; each in one line, before anything is created."""
    from harness import run
    from test_mount_lifecycle import one_line_error
    on_rados(rig, ceph_cluster, "mountfaults")
    store = list(rig.store)
    rig.spec = "rados:no-such-pool/x"
    one_line_error(rig.mount(check=False), 10, "no-such-pool", "does not exist")
    import subprocess
    key = subprocess.run(["ceph-authtool", "--gen-print-key"], capture_output=True, text=True, check=True).stdout
    bad = tmp_path / "bad.keyring"
    bad.write_text(f"[client.rmemfs]\n\tkey = {key.strip()}\n")
    rig.spec = f"rados:{ceph_cluster.pool}/mountfaults"
    rig.store = [f"ceph_conf={conf_with(ceph_cluster, tmp_path, keyring=str(bad))}", store[1]]
    one_line_error(rig.mount(check=False), 10, "refused client.rmemfs")
    rig.store = [store[0], f"ceph_id={ceph_cluster.restricted_id}"]      # a user without OSD caps on the pool
    one_line_error(rig.mount(check=False), 10, "client.restricted may not use pool")
    rig.store = [f"ceph_conf={dead_conf(tmp_path)}", store[1]]
    one_line_error(rig.mount(check=False), 16, "unreachable", "within 3 s")
    rig.store = store
    assert not list(rig.mountpoint.iterdir()) and not rig.regiondir.exists()
    assert run(["findmnt", str(rig.mountpoint)]).returncode != 0


def _stopped(pattern: str, timeout: float = 60) -> int:
    """The pid of the process whose command line holds ``pattern`` once it has stopped itself (SIGSTOP)."""
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                state = stat.read_text().rpartition(")")[2].split()[0]
            except OSError:
                continue
            if pattern in cmdline and state == "T":
                return int(stat.parent.name)
        time.sleep(0.05)
    raise AssertionError(f"no stopped process {pattern!r}")


@pytest.mark.mount
@pytest.mark.slow
def test_recover_on_rados_byte_exact_after_its_faults(ceph_cluster, rig, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A mount on rados SIGKILLed; rmemfs-recover on rados gets back every acknowledged byte (the baseline
    from the pool, the later writes from the exporter). Before that, each fault exits with its code in
    one line and takes nothing away: the cluster down (16), an unknown user (10), a pool that does not
    exist (10), and the only OSD killed in the middle of the recovery's load (16: it exited 1 before)."""
    import signal
    import subprocess

    from harness import ENV, cli
    from rmemfs.errors import StoreUnreachable
    from rmemfs.store import open_store
    from test_mount_lifecycle import digest_tree, one_line_error
    from test_recover_cli import baseline_then_changes
    on_rados(rig, ceph_cluster, "recover")
    rig.options = ["flush_interval=3600"]
    rig.mount()
    baseline_then_changes(rig)
    (rig.mountpoint / "big").write_bytes(os.urandom(24 << 20))     # a load of some length
    rig.flush()
    (rig.mountpoint / "after").write_bytes(b"only in memory")
    want = digest_tree(rig.mountpoint)
    rig.kill()
    store = list(rig.store)
    rig.store = [f"ceph_conf={dead_conf(tmp_path)}", store[1]]
    one_line_error(rig.recover(extra=["port=0"], check=False), 16, "unreachable")
    rig.store = [store[0], "ceph_id=nobody-here"]
    one_line_error(rig.recover(extra=["port=0"], check=False), 10, "nobody-here")
    spec, rig.spec = rig.spec, "rados:no-such-pool/x"
    one_line_error(rig.recover(extra=["port=0"], check=False), 10, "no-such-pool")
    rig.spec = spec
    # The OSD dies while the recovery loads the baseline: the recovery stops itself there (fault point),
    # the OSD is killed, and it goes on against a dead OSD (3 s op timeout instead of the store's 10).
    rig.store = [f"ceph_conf={conf_with(ceph_cluster, tmp_path, rados_osd_op_timeout='3')}", store[1]]
    cmd = cli("recover") + ["--backend", rig.spec, "--transport", "software", "--source", f"127.0.0.1:{rig.port}",
                            "-o", rig.opts(["port=0"]), str(rig.mountpoint)]
    proc = subprocess.Popen(cmd, env={**ENV, "RMEMFS_FAULT": "stop:recover.load"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        pid = _stopped(f"rmemfs.cli.recover --backend {rig.spec}")
        ceph_cluster.osd_stop()
        os.kill(pid, signal.SIGCONT)
        out, err = proc.communicate(timeout=120)
        # A listing with the OSD down says so: the binding's listing ends quietly on a timeout, and the
        # store took that for an empty pool ("has no published MANIFEST", exit 10) before it checked.
        with pytest.raises(StoreUnreachable, match="did not answer within 3 s"):
            open_store(rig.spec, rig.store_options()).read_manifest()
    finally:
        if proc.poll() is None:
            proc.kill()
        ceph_cluster.osd_start()
    one_line_error(subprocess.CompletedProcess(cmd, proc.returncode, out, err), 16, "did not answer within 3 s")
    rig.store = store
    # Nothing was lost: the cluster is back, the same recovery succeeds and every byte is there.
    report = tmp_path / "report.json"
    rec = rig.recover("--verify", "--json", str(report), extra=["port=0"], check=False)
    assert rec.returncode == 0, rec.stderr
    assert digest_tree(rig.mountpoint) == want
    assert json.loads(report.read_text())["dirty_pages_fetched"] > 0
    rig.ctl("umount", str(rig.mountpoint))
    assert rig.ctl("verify", *rig.backend_args()).returncode == 0


def _osd_full(ceph_cluster) -> bool:  # type: ignore[no-untyped-def]
    """The OSD map says the OSD is full (set by the monitor from the OSD's report, some seconds after a
    full ratio below its usage)."""
    dump = json.loads(ceph_cluster.command("osd", "dump", "--format", "json"))
    return any("full" in osd.get("state", []) for osd in dump["osds"])


@pytest.mark.mount
@pytest.mark.slow
def test_full_cluster_fails_the_flush_keeps_marks_and_retry_succeeds(ceph_cluster, rig) -> None:  # type: ignore[no-untyped-def]
    """Issue 13, faults: a full cluster (its full ratio set below what the OSD holds) is like ENOSPC on a
    directory backend: the flush fails at once (rmemfs-ctl flush exit 4, one line, "full"), nothing is
    published, the marks are kept, the mount keeps working; once there is room the flusher's own retry
    publishes, and the data survives an unmount and a mount."""
    import time
    on_rados(rig, ceph_cluster, "full")
    rig.options = ["flush_interval=3600"]
    rig.mount()
    (rig.mountpoint / "small").write_bytes(b"first baseline\n")
    rig.flush()
    published = rig.manifest().generation
    # Below what the OSD holds (about 2 %), in order: out of order, the OSD raises full to backfillfull.
    for kind, ratio in (("nearfull", "0.001"), ("backfillfull", "0.002"), ("full", "0.003")):
        ceph_cluster.command("osd", f"set-{kind}-ratio", ratio)
    try:
        deadline = time.monotonic() + 60
        while not _osd_full(ceph_cluster):
            assert time.monotonic() < deadline, "the OSD was never marked full"
            time.sleep(0.5)
        data = os.urandom(3 << 20)
        (rig.mountpoint / "big.bin").write_bytes(data)
        t = time.monotonic()
        flush = rig.ctl("flush", str(rig.mountpoint), check=False)
        assert time.monotonic() - t < 30, "the flush waited for room instead of failing"
        assert flush.returncode == 4, (flush.returncode, flush.stderr)
        lines = flush.stderr.strip().splitlines()
        assert len(lines) == 1 and "full" in lines[0] and "Traceback" not in flush.stderr, flush.stderr
        _assert_flush_failed_marks_kept(rig, published, len(data) // 4096)
        (rig.mountpoint / "meanwhile").write_bytes(b"written while full\n")     # the mount keeps working
        assert rig.manifest().generation == published
    finally:
        for kind, ratio in (("full", "0.95"), ("backfillfull", "0.9"), ("nearfull", "0.85")):   # Ceph's defaults
            ceph_cluster.command("osd", f"set-{kind}-ratio", ratio)
    _wait_retry_published(rig, published, 120)     # once there is room
    _remount_reads_back(rig, {"big.bin": data, "meanwhile": b"written while full\n"})


@pytest.mark.mount
def test_compaction_on_rados_rewrites_and_collects(ceph_cluster, rig) -> None:  # type: ignore[no-untyped-def]
    """Compaction on a mount over rados: once the segments hold over 3x the live bytes (and 64 MiB of
    garbage), the next flush is a full one; its one segment replaces the others, whose objects GC
    removes, and the file reads back after a remount. Then rmemfs-ctl verify exits 0 six times in a
    row: it printed its result and aborted (-6, "terminate called without an active exception") in 15
    of 40 runs here, until the store shut its connections down before the interpreter's exit."""
    prefix = on_rados(rig, ceph_cluster, "compact")
    rig.options = ["flush_interval=3600"]
    rig.mount()
    first = len(rig.manifest().segments)        # the mount's own first flush
    for i in range(5):              # segments of 24, 48, 72, 96 MiB: the fifth flush is a full one
        data = os.urandom(24 << 20)
        (rig.mountpoint / "f").write_bytes(data)
        rig.flush()
        assert len(rig.manifest().segments) == (first + i + 1 if i < 4 else 1), (i, rig.manifest().segments)
    (seg,) = [s.name for s in rig.manifest().segments]
    with _connect(ceph_cluster) as r, r.open_ioctx(ceph_cluster.pool) as io:
        names = sorted(o.key[len(prefix) + 1:] for o in io.list_objects() if o.key.startswith(prefix + "/"))
    assert [n for n in names if n.startswith(("seg.", "part."))] == [f"part.{seg}.00000", f"seg.{seg}"], names
    _remount_reads_back(rig, {"f": data})
    codes = [rig.ctl("verify", *rig.backend_args(), check=False).returncode for _ in range(6)]
    assert codes == [0] * 6, codes
