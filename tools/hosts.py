"""Two simulated hosts on one machine, for rmemfs's cross-host recovery tests and demo.

Each host is a network namespace (joined to the other by a veth pair) plus a
mount and UTS namespace held open by a long-lived ``sleep`` (the "keeper").
Every command for the host runs through ``nsenter -t <keeper> -m -n -u``, so
a FUSE mount made by one command is visible to the next (``ip netns exec``
alone would give each call a fresh mount namespace). Each host gets a private
tmpfs on /dev/shm, so the only way hostB can reach hostA's region memory is
the transport. The backend is a plain directory both hosts see.

    with TwoHosts() as (a, b):
        a.mount_rmemfs(backend, a.dir / "mnt", flush_interval=1)
        a.run(["ls", a.dir / "mnt"])

Needs root, iproute2, util-linux (unshare, nsenter) and fuse3.
"""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from collections.abc import Sequence

REPO = Path(__file__).resolve().parent.parent
PYTHON = str(REPO / ".venv" / "bin" / "python")
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from rmemfs.store import open_store  # noqa: E402
NS_PREFIX = "rmh"          # every namespace this module creates is rmh<owner pid>x<n><label><a|b> (stale cleanup)
STORE_OPTIONS = ("ceph_conf", "ceph_id")     # -o options that belong to the backend (rados:), not the mount

Cmd = str | Sequence[str | os.PathLike[str]]


def _argv(cmd: Cmd) -> list[str]:
    # A string is a shell command line; a sequence is an argv.
    return ["sh", "-c", cmd] if isinstance(cmd, str) else [os.fspath(c) for c in cmd]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    # The worktree first on the path: the venv's editable install may point at another checkout.
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH", "")])])
    env.update(extra or {})
    return env


class HostError(RuntimeError):
    pass


class Host:
    """One simulated host: run commands in its namespaces, mount rmemfs there, find its processes."""

    def __init__(self, name: str, netns: str, addr: str, workdir: Path) -> None:
        self.name, self.netns, self.addr = name, netns, addr
        self.dir = workdir / name            # scratch space (mountpoints, logs) on the shared filesystem
        self.dir.mkdir(parents=True, exist_ok=True)
        self.keeper: subprocess.Popen[bytes] | None = None
        self.ceph_addr: str | None = None     # its address on a tools/ceph --net bridge (TwoHosts(ceph=...))

    # --- lifetime -------------------------------------------------------------
    def start(self, private_shm: bool = True) -> None:
        # `unshare` execs the shell, which execs sleep: keeper.pid is the pid whose namespaces we enter.
        setup = f"hostname {shlex.quote(self.name)}"
        if private_shm:
            setup += " && mount -t tmpfs -o mode=1777 rmh-shm /dev/shm"
        self.keeper = subprocess.Popen(
            ["ip", "netns", "exec", self.netns, "unshare", "--mount", "--uts", "--propagation", "private",
             "sh", "-c", f"{setup} && echo ready && exec sleep infinity"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        assert self.keeper.stdout is not None
        line = self.keeper.stdout.readline()
        if line.strip() != b"ready":
            err = self.keeper.stderr.read().decode(errors="replace") if self.keeper.stderr else ""
            raise HostError(f"{self.name}: namespace keeper failed: {err.strip() or line!r}")

    @property
    def pid(self) -> int:
        assert self.keeper is not None, "host not started"
        return self.keeper.pid

    def path(self, p: str | os.PathLike[str]) -> Path:
        """A path as this host's mount namespace sees it, reachable from outside (e.g. its /dev/shm)."""
        return Path(f"/proc/{self.pid}/root") / Path(p).relative_to("/")

    def prefix(self) -> list[str]:
        # --wd: entering a mount namespace otherwise leaves us in the keeper's cwd (/).
        return ["nsenter", "-t", str(self.pid), "-m", "-n", "-u", f"--wd={REPO}"]

    # --- running things ------------------------------------------------------------
    def run(self, cmd: Cmd, *, check: bool = True, capture: bool = True, timeout: float | None = 120,
            input: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(self.prefix() + _argv(cmd), capture_output=capture, text=True, timeout=timeout,
                              input=input, env=_env(env), cwd=REPO)
        if check and proc.returncode != 0:
            raise HostError(f"{self.name}: {shlex.join(_argv(cmd))} exited {proc.returncode}\n"
                            f"{(proc.stderr or '').strip()}\n{(proc.stdout or '').strip()}".rstrip())
        return proc

    def popen(self, cmd: Cmd, env: dict[str, str] | None = None, **kw: Any) -> subprocess.Popen[Any]:
        return subprocess.Popen(self.prefix() + _argv(cmd), env=_env(env), cwd=REPO, **kw)

    def python(self, *args: str | os.PathLike[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        return self.run([PYTHON, *args], **kw)

    # --- rmemfs ---------------------------------------------------------------------
    @staticmethod
    def _options(options: dict[str, Any]) -> list[str]:
        opts = [k if v is True else f"{k}={v}" for k, v in options.items() if v is not None and v is not False]
        return ["-o", ",".join(opts)] if opts else []

    def mount_rmemfs(self, backend: Path | str, mountpoint: Path, **options: Any) -> int:
        """Mount (daemonized) and return the daemon's pid. Options become ``-o k=v``; listen defaults to our
        address so the exporter is reachable from the other host."""
        options.setdefault("listen", self.addr)
        mountpoint.mkdir(parents=True, exist_ok=True)
        self.python("-m", "rmemfs.cli.mount", "--backend", backend, *self._options(options), mountpoint)
        return self.rmemfs_pid(backend, {k: str(options[k]) for k in STORE_OPTIONS if k in options})

    def recover_rmemfs(self, backend: Path | str, mountpoint: Path, source: str, *, json_report: Path | None = None,
                       extra: Sequence[str] = (), check: bool = True, capture: bool = True, **options: Any
                       ) -> subprocess.CompletedProcess[str]:
        """rmemfs-recover from ``source`` (HOST[:PORT]); capture=False lets its progress bars reach a terminal."""
        options.setdefault("listen", self.addr)
        mountpoint.mkdir(parents=True, exist_ok=True)
        args = ["-m", "rmemfs.cli.recover", "--source", source, "--backend", str(backend), *extra]
        if json_report is not None:
            args += ["--json", str(json_report)]
        return self.python(*args, *self._options(options), str(mountpoint), check=check, capture=capture)

    def rmemfs_pid(self, backend: Path | str, store: dict[str, str] | None = None) -> int:
        """The pid of the rmemfs daemon that owns ``backend`` (a directory or a rados: spec, with its store
        options), per the MANIFEST owner, checked to be ours."""
        owner = open_store(backend, store).read_manifest().owner
        pid = int(owner["pid"])
        if pid not in self.pids():
            raise HostError(f"{self.name}: MANIFEST owner pid {pid} ({owner.get('host')}) is not on this host")
        return pid

    def exporter_pids(self) -> list[int]:
        return [p for p in self.pids() if b"rmemfs.cli.exporter" in _cmdline(p)]

    def pids(self) -> list[int]:
        """Every process in this host's network namespace (the keeper included)."""
        out = _ip("netns", "pids", self.netns, check=False).stdout
        return [int(p) for p in out.split()]

    def unmount_all(self) -> None:
        """Lazily detach the FUSE mounts under our work dir in this host's mount namespace (dead ones too)."""
        try:
            mounts = Path(f"/proc/{self.pid}/mountinfo").read_text()     # the keeper's mount namespace
        except OSError:
            return
        for line in mounts.splitlines():
            fields = line.split()
            fstype = fields[fields.index("-") + 1]
            # Only ours: the namespace also holds private copies of the machine's other mounts.
            if fstype.startswith("fuse") and fields[4].startswith(f"{self.dir.parent}/"):
                self.run(["fusermount3", "-u", "-z", fields[4]], check=False, timeout=20)

    def stop(self) -> None:
        """Kill everything in the host (our processes only: they all live in our namespaces), then the keeper."""
        if self.keeper is None:
            return
        if self.keeper.poll() is None:
            self.unmount_all()
        for pid in self.pids():
            if pid != self.keeper.pid:
                _kill(pid)
        _kill(self.keeper.pid)
        self.keeper.wait(timeout=10)
        for f in (self.keeper.stdout, self.keeper.stderr):
            if f:
                f.close()
        self.keeper = None


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return b""


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class TwoHosts:
    """hostA (10.231.0.1) and hostB (10.231.0.2) on a veth pair; a shared work dir with ``backend/``.

    Names carry this process's pid and a counter so parallel and leftover runs never clash, plus an
    optional ``label`` (letters) that says whose they are; ``__exit__`` (also run on failure) kills the
    hosts' processes and deletes the namespaces and the work dir. ``subnet`` is the hosts' /24.
    """

    _count = 0

    def __init__(self, subnet: str = "10.231.0", workdir: Path | None = None, keep_workdir: bool = False,
                 private_shm: bool = True, ceph: Path | None = None, label: str = "") -> None:
        if not (label.isascii() and (label.isalpha() or label == "")):
            raise ValueError(f"label must be ASCII letters, not {label!r}")
        TwoHosts._count += 1
        tag = f"{os.getpid()}x{TwoHosts._count}"
        self.netns = [f"{NS_PREFIX}{tag}{label}a", f"{NS_PREFIX}{tag}{label}b"]
        self.veth = [f"rh{tag}a"[:15], f"rh{tag}b"[:15]]
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix=f"rmemfs-hosts-{tag}-", dir="/tmp"))
        self.keep_workdir, self.private_shm = keep_workdir, private_shm
        self.backend = self.workdir / "backend"
        self.a = Host("hostA", self.netns[0], f"{subnet}.1", self.workdir)
        self.b = Host("hostB", self.netns[1], f"{subnet}.2", self.workdir)
        self.ceph = ceph        # a tools/ceph/start --net cluster dir: each host gets a veth into its bridge

    def __enter__(self) -> tuple[Host, Host]:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self.a, self.b

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        for tool in ("ip", "nsenter", "unshare", "fusermount3"):
            if shutil.which(tool) is None:
                raise HostError(f"{tool} is missing (run tools/setup)")
        self.backend.mkdir(parents=True, exist_ok=True)
        for ns in self.netns:
            _ip("netns", "add", ns)
        _ip("link", "add", self.veth[0], "type", "veth", "peer", "name", self.veth[1])
        for host, ns, dev in zip((self.a, self.b), self.netns, self.veth, strict=True):
            _ip("link", "set", dev, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{host.addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            host.start(self.private_shm)
        if self.ceph is not None:
            from cephcluster import attach_netns      # tools/cephcluster.py, beside this file
            for host, ns in zip((self.a, self.b), self.netns, strict=True):
                host.ceph_addr = attach_netns(self.ceph, ns)

    def close(self) -> None:
        errors = []
        for host in (self.a, self.b):
            try:
                host.stop()
            except Exception as e:     # keep going: the namespaces must go even if one host misbehaves
                errors.append(f"{host.name}: {e}")
        for ns in self.netns:
            _ip("netns", "del", ns, check=False)      # takes the veth pair with it
        if not self.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        if errors:
            print("hosts teardown: " + "; ".join(errors), file=sys.stderr)


def cleanup_stale() -> list[str]:
    """Delete namespaces left by runs whose process is gone (e.g. killed with SIGKILL), with their processes.

    Only names of this module's form (``rmh<pid>x...``) whose owner pid is gone: a live run's hosts, and
    any other namespace that merely starts with ``rmh`` (a probe, someone else's), are left alone."""
    removed = []
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        ns = line.split()[0] if line.split() else ""
        if not ns.startswith(NS_PREFIX):
            continue
        owner, sep, _ = ns[len(NS_PREFIX):].partition("x")
        if not (sep and owner.isdigit()) or int(owner) == os.getpid() or Path(f"/proc/{owner}").exists():
            continue
        for pid in _ip("netns", "pids", ns, check=False).stdout.split():
            _kill(int(pid))
        time.sleep(0.1)
        _ip("netns", "del", ns, check=False)
        removed.append(ns)
    # Work dirs of dead runs (their mounts lived only in the namespaces just removed).
    for d in Path(tempfile.gettempdir()).glob("rmemfs-hosts-*x*-*"):
        owner = d.name.split("-")[2].split("x", 1)[0]
        if owner.isdigit() and not Path(f"/proc/{owner}").exists():
            shutil.rmtree(d, ignore_errors=True)
            removed.append(str(d))
    return removed
