"""Build and boot a throw-away QEMU VM with soft-RoCE (rdma_rxe) for rmemfs tests.

The host kernel has no RDMA, so verbs code runs in a guest: Debian's generic
kernel (it ships rdma_rxe.ko; the cloud kernel does not) plus a busybox
initramfs. No root filesystem is built: the host's ``/`` is shared read-only
over 9p and the guest chroots into it, so the repo, its venv and every host
tool are there at the same paths. Writable tmpfs goes on /tmp, /run, /dev/shm.

Output travels back over a second, writable 9p share (a host temp dir): the
command's stdout/stderr are files there (9p writes are synchronous, so nothing
is lost at power-off) which the host tails while the guest runs, and ``rc``
holds the exit status. The kernel console goes to ``console.log`` in the same
dir and is shown when the guest fails before reporting a status.

Only host python3's standard library is used (the venv may not exist yet).
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("RMEMFS_VM_CACHE", REPO / ".cache" / "vm"))
QEMU = "qemu-system-x86_64"
SKIP_RC = 77          # automake's "skipped": QEMU cannot run here at all
GUEST_FAIL_RC = 125   # the guest never ran the command (boot or setup failed)
TIMEOUT_RC = 124

# Wanted modules; their dependencies come from depmod's modules.dep.
# crc32_generic is not a declared dependency, but rxe allocates the "crc32"
# shash at link creation and fails without it (there is no modprobe to
# autoload it). fuse gives /dev/fuse for mount tests; rdma_ucm for rdma_cm users.
MODULES = ["virtio_pci", "virtio_net", "9pnet_virtio", "9p", "crc32_generic",
           "rdma_rxe", "ib_uverbs", "rdma_ucm", "fuse"]

GUEST_IP = "10.0.2.15"   # QEMU user networking's fixed guest address


class Skip(Exception):
    """QEMU (or what it needs) cannot be had on this machine."""


def log(msg: str) -> None:
    print(f"vm: {msg}", file=sys.stderr, flush=True)


# --- build -------------------------------------------------------------------

def _apt_kernel_package() -> str:
    """The versioned package behind linux-image-amd64, e.g. linux-image-6.1.0-56-amd64."""
    def depends() -> str:
        r = subprocess.run(["apt-cache", "depends", "linux-image-amd64"],
                           capture_output=True, text=True)
        return r.stdout if r.returncode == 0 else ""
    out = depends()
    if "Depends:" not in out and os.geteuid() == 0:
        # fresh containers ship without apt lists
        subprocess.run(["apt-get", "update", "-qq"], check=False)
        out = depends()
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Depends:") and "linux-image-" in line:
            return line.split()[-1]
    raise Skip("cannot find Debian's linux-image-amd64 package (apt-cache depends failed)")


def ensure_kernel() -> Path:
    """Download and unpack the kernel .deb once; return its unpacked root."""
    for root in sorted(CACHE.glob("kernel-*")):
        if (root / ".complete").exists():
            return root
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise Skip("no apt-get/dpkg to fetch Debian's generic kernel")
    pkg = _apt_kernel_package()
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        log(f"downloading {pkg}")
        r = subprocess.run(["apt-get", "download", "-q", pkg], cwd=tmp, capture_output=True, text=True)
        debs = list(Path(tmp).glob("*.deb"))
        if r.returncode != 0 or not debs:
            raise Skip(f"apt-get download {pkg} failed: {r.stderr.strip().splitlines()[-1:]}")
        root = CACHE / f"kernel-{pkg.removeprefix('linux-image-')}"
        shutil.rmtree(root, ignore_errors=True)
        subprocess.run(["dpkg", "-x", str(debs[0]), str(root)], check=True)
    kver = _kver(root)
    # The .deb has no modules.dep (postinst makes it); generate it in the cache.
    subprocess.run(["depmod", "-b", str(root), kver], check=True)
    (root / ".complete").touch()
    return root


def _kver(root: Path) -> str:
    return next((root / "lib" / "modules").iterdir()).name


def module_order(root: Path, wanted: list[str]) -> list[str]:
    """Module paths (relative to lib/modules/KVER) in a valid insmod order."""
    moddir = root / "lib" / "modules" / _kver(root)
    deps: dict[str, list[str]] = {}
    byname: dict[str, str] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        byname[Path(path).name.split(".ko")[0].replace("-", "_")] = path
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for d in deps[path]:
            visit(d)
        order.append(path)

    for name in wanted:
        if name not in byname:
            raise Skip(f"kernel module {name} missing from {moddir}")
        visit(byname[name])
    return order


class _Cpio:
    """A minimal newc cpio writer (no root needed to add device nodes)."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1

    def _add(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0]
        hdr = b"070701" + b"".join(b"%08x" % f for f in fields)
        self.buf.write(hdr + name.encode() + b"\0")
        self.buf.write(b"\0" * (-self.buf.tell() % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-self.buf.tell() % 4))
        self.ino += 1

    def dir(self, name: str) -> None:
        self._add(name, 0o040755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._add(name, 0o100000 | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._add(name, 0o120777, target.encode())

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._add(name, 0o020600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._add("TRAILER!!!", 0)
        return self.buf.getvalue()


def _busybox() -> Path:
    bb = Path("/bin/busybox")
    if not bb.exists():
        raise Skip("busybox-static is not installed (/bin/busybox missing)")
    if b"ld-linux" in bb.read_bytes()[:8192]:
        raise Skip("/bin/busybox is dynamically linked; install busybox-static")
    return bb


INIT = Path(__file__).with_name("init.sh")


def ensure_initramfs(root: Path) -> Path:
    """Build (once per content hash) the initramfs: busybox, init, the module set."""
    kver = _kver(root)
    moddir = root / "lib" / "modules" / kver
    mods = module_order(root, MODULES)
    bb = _busybox()
    init = INIT.read_bytes()
    h = hashlib.sha256(init + bb.read_bytes() + "\n".join(mods).encode()).hexdigest()[:16]
    out = CACHE / f"initramfs-{kver}-{h}.cpio.gz"
    if out.exists():
        return out
    c = _Cpio()
    for d in ("bin", "dev", "proc", "sys", "newroot", "lib", "lib/modules", "tmp"):
        c.dir(d)
    c.chardev("dev/console", 5, 1)   # the kernel opens it for init before devtmpfs exists
    c.chardev("dev/null", 1, 3)
    c.file("bin/busybox", bb.read_bytes(), 0o755)
    c.file("init", init, 0o755)
    for m in mods:
        c.file(f"lib/modules/{Path(m).name}", (moddir / m).read_bytes())
    c.file("modules.list", "".join(Path(m).name + "\n" for m in mods).encode())
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(gzip.compress(c.finish(), compresslevel=6))
    tmp.rename(out)
    for old in CACHE.glob(f"initramfs-{kver}-*.cpio.gz"):
        if old != out:
            old.unlink()
    return out


def build() -> tuple[Path, Path]:
    """Return (kernel image, initramfs), building whatever is missing."""
    if shutil.which(QEMU) is None:
        raise Skip(f"{QEMU} is not installed (tools/setup installs qemu-system-x86)")
    root = ensure_kernel()
    vmlinuz = next((root / "boot").glob("vmlinuz-*"))
    return vmlinuz, ensure_initramfs(root)


# --- run ---------------------------------------------------------------------

GUEST_TMPFS = (Path("/tmp"), Path("/run"), Path("/dev/shm"))   # mounted fresh in the guest (init.sh)


def _job_script(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    lines = ["# generated by tools/vm/run; runs inside the chroot of the host's /"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    lines += [f"cd {shlex.quote(str(cwd))} || exit {GUEST_FAIL_RC}", "exec " + shlex.join(cmd)]
    return "\n".join(lines) + "\n"


class _Tail(threading.Thread):
    """Copy a file that the guest appends to onto a host stream, as it grows."""

    def __init__(self, path: Path, sink: io.BufferedWriter) -> None:
        super().__init__(daemon=True)
        self.path, self.sink = path, sink
        self.done = threading.Event()

    def run(self) -> None:
        with open(self.path, "rb") as f:
            while True:
                finished = self.done.is_set()   # read once more after the guest is gone
                chunk = f.read(65536)
                if chunk:
                    self.sink.write(chunk)
                    self.sink.flush()
                elif finished:
                    return
                else:
                    time.sleep(0.05)


def run(cmd: list[str], *, timeout: float, mem: str, smp: int, accel: str,
        env: dict[str, str], cwd: Path, share_rw: list[Path], verbose: bool) -> int:
    vmlinuz, initrd = build()
    with tempfile.TemporaryDirectory(prefix="rmemfs-vm-") as tmpd:
        out = Path(tmpd)
        os.chmod(out, 0o777)
        genv = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "HOME": "/tmp", "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1",
                "PYTHONDONTWRITEBYTECODE": "1",   # the repo is read-only inside
                "PYTHONPATH": str(REPO),   # this checkout, not whatever the venv has installed
                "RMEMFS_VM": "1", "RMEMFS_VM_IP": GUEST_IP, "TERM": "dumb"}
        genv.update(env)
        (out / "job.sh").write_text(_job_script(cmd, cwd, genv))
        (out / "stdout").touch()
        (out / "stderr").touch()
        rw = "".join(f"{p}\n" for p in share_rw)
        (out / "rw.list").write_text(rw)
        args = [QEMU, "-accel", accel, "-cpu", "max" if accel == "tcg" else "host",
                "-smp", str(smp), "-m", mem,
                "-display", "none", "-monitor", "none", "-no-reboot",
                "-serial", f"file:{out / 'console.log'}",
                "-kernel", str(vmlinuz), "-initrd", str(initrd),
                "-append", "console=ttyS0 quiet loglevel=3 panic=-1 oops=panic",
                "-nic", "user,model=virtio-net-pci",
                "-fsdev", "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
                "-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
                "-fsdev", f"local,id=vmout,path={out},security_model=none",
                "-device", "virtio-9p-pci,fsdev=vmout,mount_tag=vmout"]
        for i, p in enumerate(share_rw):
            args += ["-fsdev", f"local,id=rw{i},path={p},security_model=none,multidevs=remap",
                     "-device", f"virtio-9p-pci,fsdev=rw{i},mount_tag=rw{i}"]
        if verbose:
            log(shlex.join(args))
        tails = [_Tail(out / "stdout", sys.stdout.buffer), _Tail(out / "stderr", sys.stderr.buffer)]
        for t in tails:
            t.start()
        t0 = time.monotonic()
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        timed_out = False
        try:
            qemu_out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            qemu_out, _ = proc.communicate()
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        for t in tails:
            t.done.set()
            t.join()
        elapsed = time.monotonic() - t0
        rcfile = out / "rc"
        if timed_out:
            log(f"timed out after {timeout:.0f}s; killed the VM")
            _show_console(out)
            return TIMEOUT_RC
        if not rcfile.exists() or not rcfile.read_text().strip():
            log(f"the guest exited without an exit status (qemu rc {proc.returncode})")
            if qemu_out:
                sys.stderr.write(qemu_out.decode(errors="replace"))
            _show_console(out)
            return GUEST_FAIL_RC
        rc = int(rcfile.read_text().strip())
        if rc == GUEST_FAIL_RC or verbose:
            _show_console(out)
        if verbose:
            log(f"VM ran {elapsed:.1f}s, command exit status {rc}")
        return rc


def _show_console(out: Path) -> None:
    con = out / "console.log"
    text = con.read_text(errors="replace") if con.exists() else ""
    tail = "\n".join(text.splitlines()[-40:])
    log("guest console (last 40 lines):\n" + tail)


def main_build(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    try:
        vmlinuz, initrd = build()
    except Skip as e:
        print(f"vm: skip: {e}", file=sys.stderr)
        return SKIP_RC
    print(vmlinuz)
    print(initrd)
    return 0


def main_run(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="tools/vm/run",
        description="Boot the soft-RoCE VM, run CMD in a chroot of the host's / (cwd: the repo, "
                    "or --cwd), print its output and exit with its status.",
        epilog=f"Exit status: CMD's, {TIMEOUT_RC} on timeout, {GUEST_FAIL_RC} if the guest never "
               f"ran it, {SKIP_RC} (with a one-line 'vm: skip: ...') if QEMU cannot run here.")
    p.add_argument("--timeout", type=float, default=float(os.environ.get("RMEMFS_VM_TIMEOUT", 600)),
                   help="hard limit in seconds for the whole VM (default 600)")
    p.add_argument("--mem", default=os.environ.get("RMEMFS_VM_MEM", "3G"))
    p.add_argument("--smp", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--accel", default=os.environ.get("RMEMFS_VM_ACCEL", "tcg"),
                   help="tcg (default; works without usable KVM) or kvm")
    p.add_argument("-e", "--env", action="append", default=[], metavar="K=V",
                   help="set an environment variable for CMD")
    p.add_argument("--cwd", type=Path, default=REPO)
    p.add_argument("--share-rw", action="append", type=Path, default=[], metavar="DIR",
                   help="host dir to mount writable at the same path inside")
    p.add_argument("--check", action="store_true",
                   help="only build; exit 0 if the VM can run, else print the skip reason")
    p.add_argument("-v", "--verbose", action="store_true", help="show the qemu command and console")
    p.add_argument("cmd", nargs="*", help="the command (after --)")
    a = p.parse_args(argv)
    try:
        if a.check:
            build()
            return 0
        if not a.cmd:
            p.error("no command given (tools/vm/run -- CMD...)")
        env = dict(kv.split("=", 1) for kv in a.env)
        cwd, share_rw = a.cwd.resolve(), [d.resolve() for d in a.share_rw]
        if any(cwd == m or m in cwd.parents for m in GUEST_TMPFS) and cwd not in share_rw:
            # The guest mounts fresh tmpfs on these, hiding a checkout that lives there (CI may clone
            # under /tmp): share the checkout itself at the same path.
            share_rw.append(cwd)
        return run(a.cmd, timeout=a.timeout, mem=a.mem, smp=a.smp, accel=a.accel, env=env,
                   cwd=cwd, share_rw=share_rw, verbose=a.verbose)
    except Skip as e:
        print(f"vm: skip: {e}", file=sys.stderr)
        return SKIP_RC
