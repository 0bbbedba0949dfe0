"""A throw-away single-node Ceph cluster (one mon, one mgr, one bluestore OSD) for the RADOS store's tests.

Everything lives in one directory DIR: ``ceph.conf``, the keyrings, the daemons' data, logs, admin sockets
and ``cluster.json`` (what ``start`` made: address, pool, users, owner, bridge). No systemd, LVM or
containers: the daemons are started the way Ceph's own standalone tests start them (``ceph-mon --mkfs``,
``ceph-mgr``, ``ceph osd new`` + ``ceph-osd --mkfs`` in a directory), each with ``--conf DIR/ceph.conf`` on
its command line, which is how ``stop`` finds every process of this cluster (also after its pid files are
gone) and never touches another one's.

The OSD is bluestore on a sparse file (``DIR/osd/0/block``): what it acknowledges survives an OSD restart,
which memstore would not. Pools are size 1. cephx is on; users:

* ``client.admin``      every capability (``DIR/client.admin.keyring``)
* ``client.rmemfs``     read/write on the pool only (``DIR/client.rmemfs.keyring``): least privilege
* ``client.restricted`` may talk to the monitors but has no OSD capability on the pool, for "wrong user" tests

``--net``: instead of loopback the cluster binds to the first address of a fresh /24 (10.232.X.0/24, X
free in this machine's routing table) on a bridge it creates in the root namespace; tools/hosts.py
(``TwoHosts(ceph=...)``) plugs each netns host into that bridge with a veth, so the root namespace and
both hosts reach the same monitor and OSD addresses. ``stop`` deletes the bridge.

    cluster = start(Path("/tmp/c"), net=True)    # prints nothing; tools/ceph/start prints the conf path
    osd_stop(cluster.dir); osd_start(cluster.dir)
    stop(cluster.dir)
"""
from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from collections.abc import Iterator

POOL = "rmemfs"
PACKAGES = ("ceph-mon", "ceph-mgr", "ceph-osd", "ceph", "rados", "monmaptool", "ceph-authtool")
NET_LOCK = Path("/run/lock/rmemfs-ceph-net.lock")
NET_BASE = ipaddress.ip_network("10.232.0.0/16")     # the /24s that --net picks from
BRIDGE_PREFIX = "rmcb"                               # every bridge this module creates (stale cleanup)
STALE_GLOB = "rmemfs-ceph-*"                         # fixture dirs under /tmp, owner pid in cluster.json
BLOCK_SIZE = 12 << 30                                # sparse bluestore file: only written bytes use disk

# Small daemons: the machine has 2 cores and the test suite runs beside the cluster.
CONF_TEMPLATE = """\
[global]
fsid = {fsid}
mon_host = [v2:{addr}:{port}]
public_addr = {addr}
cluster_addr = {addr}
ms_bind_msgr1 = false
ms_bind_ipv6 = false
auth_cluster_required = cephx
auth_service_required = cephx
auth_client_required = cephx
auth_allow_insecure_global_id_reclaim = false
mon_warn_on_insecure_global_id_reclaim_allowed = false
osd_pool_default_size = 1
osd_pool_default_min_size = 1
mon_allow_pool_size_one = true
mon_allow_pool_delete = true
osd_pool_default_pg_autoscale_mode = off
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
mon_warn_on_pool_no_redundancy = false
osd_crush_chooseleaf_type = 0
run_dir = {dir}/run
admin_socket = {dir}/run/$name.asok
pid_file = {dir}/run/$name.pid
log_file = {dir}/log/$name.log
mon_cluster_log_file = {dir}/log/cluster.log
crash_dir = {dir}/crash
log_to_stderr = false
err_to_stderr = true
# The machine's disk may be fuller than a production mon tolerates (it stops below mon_data_avail_crit).
mon_data_avail_warn = 2
mon_data_avail_crit = 1

[mon]
mon_data = {dir}/mon/$name
keyring = {dir}/mon/$name/keyring
mon_memory_target = 268435456
paxos_propose_interval = 0.1

[mgr]
mgr_data = {dir}/mgr/$name
keyring = {dir}/mgr/$name/keyring

[osd]
osd_data = {dir}/osd/$id
keyring = {dir}/osd/$id/keyring
osd_objectstore = bluestore
bluestore_block_create = true
bluestore_block_size = {block_size}
bluestore_block_db_create = false
bluestore_block_wal_create = false
osd_memory_target = 1073741824
bluestore_cache_autotune = false
bluestore_cache_size = 268435456
osd_op_num_shards = 2
osd_op_num_threads_per_shard = 1
osd_scrub_load_threshold = 2000
osd_scrub_begin_hour = 0
osd_scrub_end_hour = 0

[client]
keyring = {dir}/$name.keyring
admin_socket =
log_file =
"""

USERS = {
    "client.admin": ["mon", "allow *", "osd", "allow *", "mgr", "allow *", "mds", "allow *"],
    "client.rmemfs": ["mon", "allow r", "osd", f"allow rwx pool={POOL}"],
    "client.restricted": ["mon", "allow r", "osd", "allow rwx pool=some-other-pool"],
}


class ClusterError(RuntimeError):
    pass


@dataclass
class Cluster:
    """What ``start`` made (saved as DIR/cluster.json)."""
    dir: Path
    conf: Path
    addr: str
    port: int
    pool: str = POOL
    fsid: str = ""
    owner: list[int] | None = None           # [pid, start time] of the process whose death makes it stale
    bridge: str | None = None
    subnet: str | None = None
    users: dict[str, str] = field(default_factory=dict)     # entity -> keyring path

    @property
    def admin_keyring(self) -> Path:
        return Path(self.users["client.admin"])

    def save(self) -> None:
        d = asdict(self)
        d["dir"], d["conf"] = str(self.dir), str(self.conf)
        _write_atomic(self.dir / "cluster.json", json.dumps(d, indent=1) + "\n")

    @classmethod
    def load(cls, directory: Path) -> Cluster:
        d = json.loads((Path(directory) / "cluster.json").read_text())
        d["dir"], d["conf"] = Path(d["dir"]), Path(d["conf"])
        return cls(**d)


def missing_packages() -> list[str]:
    """The cluster's executables (and the python3-rados binding) that are not installed."""
    missing = [p for p in PACKAGES if shutil.which(p) is None]
    try:
        import rados  # noqa: F401
    except ImportError:
        missing.append("python3-rados")
    return missing


# --- processes -------------------------------------------------------------------------------------------

def _write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _run(argv: list[str], *, timeout: float = 120, input: str | None = None) -> str:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input,
                           env={**os.environ, "CEPH_ARGS": ""})
    except subprocess.TimeoutExpired:
        raise ClusterError(f"{' '.join(argv[:4])}... did not finish within {timeout:.0f} s") from None
    if p.returncode != 0:
        raise ClusterError(f"{' '.join(argv)} exited {p.returncode}: {(p.stderr or p.stdout).strip()[-2000:]}")
    return p.stdout


def _ceph(conf: Path, *args: str, timeout: float = 60, **kw: object) -> str:
    return _run(["ceph", "--conf", str(conf), "--name", "client.admin", "--connect-timeout", str(int(timeout)),
                 *args], timeout=timeout + 10, **kw)  # type: ignore[arg-type]


def _start_time(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[19])


def cluster_pids(conf: Path, daemon: str | None = None) -> list[int]:
    """Processes started with ``--conf CONF`` (our daemons put it on their command line), e.g. daemon='ceph-osd'."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(conf).encode() in argv and (daemon is None or os.path.basename(argv[0]) == daemon.encode()):
            pids.append(int(d.name))
    return pids


def _kill_all(pids: list[int], conf: Path, grace: float) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(p in cluster_pids(conf) for p in pids):
        time.sleep(0.1)
    for pid in pids:
        if pid in cluster_pids(conf):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(p in cluster_pids(conf) for p in pids):
        time.sleep(0.05)


def _daemon(conf: Path, argv: list[str]) -> None:
    # Ceph daemons fork into the background once they are initialized; the parent's exit status tells.
    _run([argv[0], "--conf", str(conf), *argv[1:]], timeout=120)


# --- network ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def net_lock() -> Iterator[None]:
    """Serializes choosing subnets and host addresses between processes."""
    NET_LOCK.parent.mkdir(parents=True, exist_ok=True)
    with open(NET_LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and p.returncode != 0:
        raise ClusterError(f"ip {' '.join(args)}: {p.stderr.strip()}")
    return p


def _used_networks() -> list[ipaddress.IPv4Network]:
    used = []
    for r in json.loads(_ip("-j", "-4", "route", "show", "table", "all").stdout or "[]"):
        dst = r.get("dst", "")
        if dst == "default":
            continue
        with contextlib.suppress(ValueError):
            used.append(ipaddress.ip_network(dst, strict=False))
    for link in json.loads(_ip("-j", "-4", "addr").stdout or "[]"):
        for a in link.get("addr_info", []):
            used.append(ipaddress.ip_network(f"{a['local']}/{a['prefixlen']}", strict=False))
    return used


def _make_bridge(directory: Path) -> tuple[str, str, str]:
    """A bridge with the first address of an unused /24 of NET_BASE; its alias names DIR (stale cleanup)."""
    name = f"{BRIDGE_PREFIX}{uuid.uuid4().hex[:8]}"
    with net_lock():
        used = _used_networks()
        subnet = next((s for s in NET_BASE.subnets(new_prefix=24) if not any(s.overlaps(u) for u in used)), None)
        if subnet is None:
            raise ClusterError(f"no free /24 in {NET_BASE} for the cluster's bridge")
        addr = str(subnet.network_address + 1)
        _ip("link", "add", name, "type", "bridge")
        _ip("link", "set", name, "alias", f"rmemfs-ceph:{directory}")
        _ip("addr", "add", f"{addr}/24", "dev", name)
        _ip("link", "set", name, "up")
    return name, str(subnet), addr


def _bridge_dirs() -> dict[str, str]:
    out = {}
    for link in json.loads(_ip("-j", "link", "show", "type", "bridge", check=False).stdout or "[]"):
        name, alias = link.get("ifname", ""), link.get("ifalias", "")
        if name.startswith(BRIDGE_PREFIX) and alias.startswith("rmemfs-ceph:"):
            out[name] = alias[len("rmemfs-ceph:"):]
    return out


def attach_netns(directory: Path, netns: str) -> str:
    """Plug network namespace NETNS into the --net cluster's bridge with a veth; returns its address there.

    The root end carries the host's address as its alias, so concurrent callers pick distinct free ones
    (under net_lock); deleting the namespace deletes the veth and frees the address.
    """
    c = Cluster.load(directory)
    if not c.bridge or not c.subnet:
        raise ClusterError(f"the cluster in {directory} was not started with --net: netns hosts cannot reach it")
    subnet = ipaddress.ip_network(c.subnet)
    with net_lock():
        ports = json.loads(_ip("-j", "link", "show", "master", c.bridge).stdout or "[]")
        taken = {p.get("ifalias", "") for p in ports} | {c.addr}
        addr = next((str(a) for a in subnet.hosts() if str(a) not in taken), None)
        if addr is None:
            raise ClusterError(f"no free address left on {c.bridge} ({c.subnet})")
        root_end = f"rmcv{uuid.uuid4().hex[:8]}"
        _ip("link", "add", root_end, "type", "veth", "peer", "name", "ceph0", "netns", netns)
        _ip("link", "set", root_end, "alias", addr)
        _ip("link", "set", root_end, "master", c.bridge)
        _ip("link", "set", root_end, "up")
    _ip("-n", netns, "addr", "add", f"{addr}/{subnet.prefixlen}", "dev", "ceph0")
    _ip("-n", netns, "link", "set", "ceph0", "up")
    return addr


def _free_port(addr: str) -> int:
    with socket.socket() as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


# --- lifecycle -------------------------------------------------------------------------------------------

def start(directory: Path, *, net: bool = False, addr: str = "127.0.0.1", owner: int | None = None,
          timeout: float = 240) -> Cluster:
    """Create and start a cluster in DIR (which must be empty or absent) and wait until the pool takes writes.

    ``owner``: a pid; once that process is gone, ``cleanup_stale`` treats the cluster as left over.
    """
    missing = missing_packages()
    if missing:
        raise ClusterError(f"ceph is not installed ({', '.join(missing)} missing): run tools/setup")
    d = Path(directory).resolve()
    if d.exists() and any(d.iterdir()):
        raise ClusterError(f"{d} is not empty: tools/ceph/stop it (or remove it) first")
    for sub in ("run", "log", "crash", "mon", "mgr/mgr.x", "osd/0"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    conf = d / "ceph.conf"
    cluster = Cluster(dir=d, conf=conf, addr=addr, port=0, fsid=str(uuid.uuid4()),
                      owner=[owner, _start_time(owner) or 0] if owner else None)
    try:
        if net:
            cluster.bridge, cluster.subnet, cluster.addr = _make_bridge(d)
        cluster.port = _free_port(cluster.addr)
        cluster.save()       # from here on, stop() can undo whatever exists
        _write_atomic(conf, CONF_TEMPLATE.format(fsid=cluster.fsid, addr=cluster.addr, port=cluster.port,
                                                 dir=d, block_size=BLOCK_SIZE))
        _bootstrap(cluster, timeout)
    except BaseException:
        stop(d, remove=False)
        raise
    return cluster


def _bootstrap(c: Cluster, timeout: float) -> None:
    d, conf = c.dir, c.conf
    deadline = time.monotonic() + timeout
    # Monitor: its keyring holds mon. and client.admin; --mkfs writes its store from a one-entry monmap.
    mon_keyring = d / "mon.keyring"      # outside mon_data: --mkfs wants that empty, and copies the keyring in
    admin_keyring = d / "client.admin.keyring"
    _run(["ceph-authtool", "--create-keyring", str(mon_keyring), "--gen-key", "-n", "mon.", "--cap", "mon", "allow *"])
    caps = [a for pair in zip(["--cap"] * 4, USERS["client.admin"][0::2], USERS["client.admin"][1::2], strict=True) for a in pair]
    _run(["ceph-authtool", "--create-keyring", str(admin_keyring), "--gen-key", "-n", "client.admin", *caps])
    os.chmod(admin_keyring, 0o600)
    _run(["ceph-authtool", str(mon_keyring), "--import-keyring", str(admin_keyring)])
    monmap = d / "monmap"
    _run(["monmaptool", "--create", "--fsid", c.fsid, "--addv", "a", f"[v2:{c.addr}:{c.port}]", str(monmap)])
    _run(["ceph-mon", "--conf", str(conf), "--id", "a", "--mkfs", "--monmap", str(monmap),
          "--keyring", str(mon_keyring)])
    _daemon(conf, ["ceph-mon", "--id", "a"])
    _ceph(conf, "status", timeout=30)    # the monitor answers (with the admin's key)
    # Manager.
    mgr_keyring = d / "mgr" / "mgr.x" / "keyring"
    _ceph(conf, "auth", "get-or-create", "mgr.x", "mon", "allow profile mgr", "osd", "allow *", "mds", "allow *",
          "-o", str(mgr_keyring))
    _daemon(conf, ["ceph-mgr", "--id", "x"])
    # OSD 0: register it with a fresh key, make its bluestore on a file, start it.
    osd_uuid, key = str(uuid.uuid4()), _run(["ceph-authtool", "--gen-print-key"]).strip()
    osd_id = _ceph(conf, "osd", "new", osd_uuid, "-i", "-", input=json.dumps({"cephx_secret": key})).strip()
    if osd_id != "0":
        raise ClusterError(f"ceph osd new gave id {osd_id!r}, expected 0")
    _write_atomic(d / "osd" / "0" / "keyring", f"[osd.0]\n\tkey = {key}\n", 0o600)
    _run(["ceph-osd", "--conf", str(conf), "--id", "0", "--mkfs", "--osd-uuid", osd_uuid], timeout=180)
    _daemon(conf, ["ceph-osd", "--id", "0"])
    # The pool, and the users the tests log in as.
    _ceph(conf, "osd", "pool", "create", c.pool, "8", "8", "replicated")
    _ceph(conf, "osd", "pool", "application", "enable", c.pool, "rmemfs")
    c.users["client.admin"] = str(admin_keyring)
    for entity, caps in USERS.items():
        if entity == "client.admin":
            continue
        path = d / f"{entity}.keyring"
        _ceph(conf, "auth", "get-or-create", entity, *caps, "-o", str(path))
        os.chmod(path, 0o600)
        c.users[entity] = str(path)
    c.save()
    wait_writable(c, max(10.0, deadline - time.monotonic()))


def wait_writable(c: Cluster, timeout: float = 120) -> None:
    """Until an object can be written to and removed from the pool (the OSD is up and its PG active)."""
    import rados
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with rados.Rados(conffile=str(c.conf), rados_id="admin",
                             conf={"rados_osd_op_timeout": "10", "rados_mon_op_timeout": "10",
                                   "client_mount_timeout": "10"}) as r:
                with r.open_ioctx(c.pool) as io:
                    io.write_full("rmemfs-ceph-probe", b"probe")
                    io.remove_object("rmemfs-ceph-probe")
                    return
        except rados.Error as e:
            last = e
            time.sleep(0.5)
    raise ClusterError(f"the pool {c.pool} took no write within {timeout:.0f} s: {last}; logs in {c.dir}/log")


def osd_stop(directory: Path, sig: int = signal.SIGKILL) -> None:
    """Stop the OSD (SIGKILL by default: a crash, not a shutdown) and wait until it is gone."""
    c = Cluster.load(directory)
    pids = cluster_pids(c.conf, "ceph-osd")
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    _kill_all(pids, c.conf, grace=30)
    # A lone OSD has no peer to report its death, so the mon would mark it down only after
    # mon_osd_report_timeout (900 s), and clients that were connected kept targeting the dead
    # instance even after a restart (seen: > 3 min of TimedOut). Mark it down as peers would.
    _ceph(c.conf, "osd", "down", "0", timeout=30)


def osd_start(directory: Path, wait: bool = True, timeout: float = 120) -> None:
    """Start the OSD again on its existing bluestore and (by default) wait until the pool takes writes."""
    c = Cluster.load(directory)
    if not cluster_pids(c.conf, "ceph-osd"):
        _daemon(c.conf, ["ceph-osd", "--id", "0"])
    if wait:
        wait_writable(c, timeout)


def command(directory: Path, *args: str, timeout: float = 60) -> str:
    """One ``ceph`` command as client.admin (e.g. ``osd set-full-ratio 0.95``); its output."""
    return _ceph(Cluster.load(directory).conf, *args, timeout=timeout)


def stop(directory: Path, remove: bool = False) -> None:
    """Kill every process of the cluster in DIR and delete its bridge (idempotent); ``remove`` deletes DIR."""
    d = Path(directory).resolve()
    conf = d / "ceph.conf"
    _kill_all(cluster_pids(conf), conf, grace=10)
    try:
        bridge = Cluster.load(d).bridge
    except (OSError, ValueError, TypeError):
        bridge = None
    for name, bdir in _bridge_dirs().items():
        if name == bridge or Path(bdir) == d:
            _ip("link", "del", name, check=False)
    if remove:
        shutil.rmtree(d, ignore_errors=True)


def _owner_alive(owner: list[int] | None) -> bool:
    if not owner or not owner[0]:
        return True          # started by hand (tools/ceph/start): only tools/ceph/stop ends it
    return _start_time(owner[0]) == owner[1]


def cleanup_stale(tmp: Path | None = None) -> list[str]:
    """Stop and remove clusters (under tmp, named rmemfs-ceph-*) whose owner process is gone, and bridges
    whose directory no longer exists: what a killed test run leaves behind."""
    removed = []
    for d in Path(tmp or tempfile.gettempdir()).glob(STALE_GLOB):
        try:
            owner = Cluster.load(d).owner
        except FileNotFoundError:
            owner = None if (time.time() - d.stat().st_mtime) < 600 else [1, -1]   # half-made; old = stale
        except (OSError, ValueError, TypeError):
            owner = [1, -1]
        if not _owner_alive(owner):
            stop(d, remove=True)
            removed.append(str(d))
    for name, bdir in _bridge_dirs().items():
        if not Path(bdir).exists():
            _ip("link", "del", name, check=False)
            removed.append(name)
    return removed


def main(argv: list[str] | None = None) -> int:
    """tools/ceph/{start,stop,osd}: exit 0 done, 1 failed (one line on stderr), 2 usage."""
    import argparse
    ap = argparse.ArgumentParser(prog="tools/ceph", description="a single-node Ceph cluster for rmemfs's tests")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("start", help="create and start a cluster in DIR; prints its ceph.conf path last")
    s.add_argument("dir", type=Path)
    s.add_argument("--net", action="store_true",
                   help="bind to a fresh bridge (10.232.X.1) that tools/hosts.py netns hosts can join")
    s.add_argument("--addr", default="127.0.0.1", help="address to bind without --net (default 127.0.0.1)")
    p = sub.add_parser("stop", help="kill the cluster's processes and delete its bridge (idempotent)")
    p.add_argument("dir", type=Path)
    p.add_argument("--remove", action="store_true", help="also delete DIR")
    o = sub.add_parser("osd", help="stop (SIGKILL, or --term) or start the OSD alone")
    o.add_argument("dir", type=Path)
    o.add_argument("action", choices=["stop", "start"])
    o.add_argument("--term", action="store_true", help="stop with SIGTERM (a clean shutdown)")
    sub.add_parser("cleanup-stale", help="remove clusters left by killed test runs")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "start":
            t0 = time.monotonic()
            c = start(args.dir, net=args.net, addr=args.addr)
            print(f"cluster up in {time.monotonic() - t0:.1f} s at {c.addr}:{c.port}, pool {c.pool}"
                  + (f", bridge {c.bridge} ({c.subnet})" if c.bridge else ""), flush=True)
            print(c.conf)
        elif args.cmd == "stop":
            stop(args.dir, remove=args.remove)
        elif args.cmd == "osd":
            if args.action == "stop":
                osd_stop(args.dir, signal.SIGTERM if args.term else signal.SIGKILL)
            else:
                osd_start(args.dir)
        else:
            for r in cleanup_stale():
                print(f"removed {r}")
    except (ClusterError, OSError) as e:
        print(f"tools/ceph {args.cmd}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
