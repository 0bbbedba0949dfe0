#!/usr/bin/env python3
"""The rmemfs story on two hosts (network namespaces), narrated. Run it through tools/demo.

hostA mounts rmemfs; an mmap+msync key-value store and plain write()s put data
in it; a baseline is flushed; more writes follow; rmemfs on hostA is SIGKILLed
while its exporter (the "NIC") lives on; hostB runs rmemfs-recover over the
veth link, and everything acknowledged is checked byte for byte on hostB.

Every acknowledged write is also applied to a shadow copy outside rmemfs, so
the expected XXH3 of each file never comes from rmemfs itself.
Exit status 0 when every check passed, 1 otherwise. Cleans up on any exit.

``--backend rados``: the same story with the baseline in a Ceph pool: a throw-away one-OSD cluster
(tools/cephcluster.py) on a bridge both hosts reach, the store ``rados:rmemfs/demo-<pid>``, and the
cluster's least-privileged user (client.rmemfs: this pool only). The cluster is stopped and removed after.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import time
import tempfile
from pathlib import Path
from typing import Any

import xxhash

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
from hosts import Host, TwoHosts, cleanup_stale  # noqa: E402

KV = str(REPO / "examples" / "kvstore.py")
WORK = str(REPO / "tools" / "fsworkload.py")
BOLD, DIM, GREEN, RED, OFF = ("\033[1m", "\033[2m", "\033[32m", "\033[31m", "\033[0m") if sys.stdout.isatty() \
    else ("",) * 5
T0 = time.monotonic()


def say(text: str) -> None:
    print(f"\n{BOLD}[{time.monotonic() - T0:5.1f}s] {text}{OFF}", flush=True)


def show(host: Host, text: str) -> None:
    for line in text.rstrip().splitlines():
        print(f"  {DIM}{host.name}|{OFF} {line}", flush=True)


def fail(text: str) -> None:
    raise SystemExit(f"{RED}FAIL: {text}{OFF}")


class Files:
    """What was acknowledged: path (relative to the mount) -> content, kept outside rmemfs."""

    def __init__(self, host: Host, mnt: Path, shadow: Path) -> None:
        self.host, self.mnt, self.shadow = host, mnt, shadow
        self.content: dict[str, bytes] = {}
        self.kv: dict[str, str] = {}

    def write(self, rel: str, data: bytes, append: bool = False) -> None:
        # write() + fsync on hostA, from a staging file outside rmemfs; the content is known here, so the
        # expected state never comes from reading rmemfs back.
        staging = self.shadow / "staging"
        staging.write_bytes(data)
        code = ("import os,sys; d=open(sys.argv[1],'rb').read(); "
                "fd=os.open(sys.argv[2], os.O_WRONLY|os.O_CREAT|(os.O_APPEND if sys.argv[3]=='a' else os.O_TRUNC));"
                "os.write(fd, d); os.fsync(fd); os.close(fd)")
        self.host.python("-c", code, staging, self.mnt / rel, "a" if append else "w")
        self.content[rel] = (self.content.get(rel, b"") if append else b"") + data

    def kvstore(self, *args: str) -> str:
        """Run kvstore on hostA's rmemfs and on the shadow file; the acknowledged output must agree."""
        out = self.host.python(KV, self.mnt / "kv.db", *args).stdout
        shadow = self.host.python(KV, self.shadow / "kv.db", *args).stdout
        if out != shadow:
            fail(f"kvstore {' '.join(args)}: output on rmemfs differs from the shadow copy")
        for line in out.splitlines():       # load prints KEY<TAB>VALUE per acknowledged record
            if "\t" in line:
                k, v = line.split("\t", 1)
                self.kv[k] = v
        if args[0] == "put" and out.startswith("committed"):
            self.kv[args[1]] = args[2]
        self.content["kv.db"] = (self.shadow / "kv.db").read_bytes()
        return out

    def rename(self, src: str, dst: str) -> None:
        self.host.run(["mv", self.mnt / src, self.mnt / dst])
        self.content[dst] = self.content.pop(src)

    def unlink(self, rel: str) -> None:
        self.host.run(["rm", self.mnt / rel])
        del self.content[rel]

    def state(self) -> dict:
        dirs = sorted({str(Path(p).parent) for p in self.content} - {"."})
        return {"files": {p: {"xxh3": xxhash.xxh3_64_hexdigest(c), "size": len(c)} for p, c in self.content.items()},
                "dirs": dirs}


def story(a: Host, b: Host, backend: Path | str, store: dict[str, str] | None = None,
          shared: str | None = None) -> None:
    """``store``: the backend's -o options (rados: ceph_conf, ceph_id); ``shared``: how the hosts share it."""
    store = store or {}
    mnt_a, mnt_b = a.dir / "mnt", b.dir / "mnt"
    shadow = a.dir / "shadow"
    shadow.mkdir()
    say(f"Two hosts: {a.name} {a.addr} (netns {a.netns}) and {b.name} {b.addr} (netns {b.netns}), a veth "
        f"pair between them. Each has a private /dev/shm; {shared or f'the backend {backend} is shared'}.")
    say(f"{a.name}: mount rmemfs, exporter listening on {a.addr}:7470 (periodic flushes every 30 s; we ask "
        "for one explicitly below)")
    pid = a.mount_rmemfs(backend, mnt_a, flush_interval=30, region_size="256M", **store)
    show(a, a.run(["sh", "-c", f"grep ' {mnt_a} ' /proc/self/mounts; ls /dev/shm"]).stdout)
    show(a, f"rmemfs pid {pid}, exporter pid {a.exporter_pids()}")

    f = Files(a, mnt_a, shadow)
    say(f"{a.name}: the key-value store writes through mmap and commits with msync (16 records per msync)")
    out = f.kvstore("load", "3000", "--seed", "7", "--keys", "2000")
    show(a, f"{len(out.splitlines())} records acknowledged, {len(f.kv)} distinct keys; last: "
            f"{out.splitlines()[-1][:60]}")
    say(f"{a.name}: plain write()+fsync files")
    rng = random.Random(7)
    a.run(["mkdir", mnt_a / "notes", mnt_a / "blobs"])
    f.write("notes/log.txt", b"".join(b"line %d: the quick brown fox\n" % i for i in range(2000)))
    for i in range(6):
        f.write(f"blobs/blob-{i}.bin", rng.randbytes(rng.randrange(10_000, 600_000)))
    show(a, a.run(["sh", "-c", f"cd {mnt_a} && du -ab | sort -k2"]).stdout)

    say(f"{a.name}: flush a baseline to the backend now")
    gen = json.loads(a.python(WORK, "ctl", mnt_a, "flush").stdout)["generation"]
    show(a, f"baseline generation {gen} published in {backend}")
    if store:       # rados: what the pool holds, listed from hostA as the filesystem's cephx user
        prefix = str(backend).partition(":")[2].partition("/")[2] + "/"
        pool = str(backend).partition(":")[2].partition("/")[0]
        objs = sorted(o for o in a.run(["rados", "--conf", store["ceph_conf"], "--id", store["ceph_id"], "-p", pool,
                                        "ls"]).stdout.split() if o.startswith(prefix))
        show(a, f"$ rados -p {pool} ls  ({len(objs)} objects under {prefix})\n" + "\n".join(objs))

    say(f"{a.name}: more writes after the last baseline (only in hostA's memory and its dirty page lists)")
    out = f.kvstore("load", "800", "--seed", "8", "--keys", "2000")
    show(a, f"{len(out.splitlines())} more records acknowledged (many overwrite keys of the first load)")
    show(a, f.kvstore("put", "greeting", "hello from hostA, after the last baseline").strip())
    f.write("notes/log.txt", b"appended after the baseline\n", append=True)
    f.write("blobs/blob-1.bin", rng.randbytes(50_000))
    f.rename("blobs/blob-2.bin", "blobs/blob-5.bin")   # over an existing file
    f.unlink("blobs/blob-3.bin")
    f.write("notes/late.txt", b"written just before the crash\n")
    stats = json.loads(a.python(WORK, "ctl", mnt_a, "stats").stdout)
    show(a, f"dirty pages not yet in any baseline: {stats['core']['dirty_current_pages']}")

    say(f"{a.name}: SIGKILL rmemfs (pid {pid}); the exporter stays up, as an RDMA NIC would")
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while pid in a.pids() and time.monotonic() < deadline:
        time.sleep(0.05)
    show(a, a.run(["sh", "-c", f"ls {mnt_a} 2>&1 | head -1; true"]).stdout)
    exporters = a.exporter_pids()
    if not exporters:
        fail("the exporter died with rmemfs")
    show(a, f"exporter pid {exporters} still serving {a.addr}:7470")

    say(f"{b.name}: rmemfs-recover --source {a.addr} --transport software --verify")
    report = b.dir / "recovery.json"
    t = time.monotonic()
    # On a terminal its progress bars show live (stderr not captured); otherwise just the summary.
    r = b.recover_rmemfs(backend, mnt_b, a.addr, json_report=report, extra=["--transport", "software", "--verify"],
                         check=False, capture=not sys.stderr.isatty(), region_size="256M", **store)
    show(b, (r.stdout or "") + (r.stderr or ""))
    if r.returncode != 0:
        fail(f"rmemfs-recover exited {r.returncode}")
    rep = json.loads(report.read_text())
    show(b, f"recovered and mounted in {time.monotonic() - t:.1f} s: {rep['dirty_pages_fetched']} dirty pages "
            f"fetched over TCP, {rep['verified_pages']} pages verified; JSON report in {report}")

    say(f"{b.name}: XXH3 of every file against what hostA acknowledged")
    expected = b.dir / "expected.json"
    expected.write_text(json.dumps(f.state()))
    v = b.python(WORK, "verify", mnt_b, expected, check=False)
    show(b, v.stdout + v.stderr)
    if v.returncode != 0:
        fail("recovered files differ from what was acknowledged")
    for rel, content in sorted(f.content.items()):
        show(b, f"{xxhash.xxh3_64_hexdigest(content)}  {len(content):8d}  {rel}")

    say(f"{b.name}: the key-value store reopens its data")
    check = b.python(KV, mnt_b / "kv.db", "check", check=False)
    show(b, "$ kvstore.py kv.db check\n" + check.stdout + check.stderr)
    get = b.python(KV, mnt_b / "kv.db", "get", "greeting", check=False)
    show(b, "$ kvstore.py kv.db get greeting\n" + get.stdout + get.stderr)
    dump = b.python(KV, mnt_b / "kv.db", "dump").stdout
    got = dict(line.split("\t", 1) for line in dump.splitlines())
    if check.returncode or get.stdout.strip() != f.kv["greeting"] or got != f.kv:
        fail("the key-value store on hostB does not hold exactly the acknowledged records")
    show(b, f"dump: all {len(got)} keys hold their last acknowledged values")


def rados_story() -> None:
    """The story with the baseline in a throw-away Ceph cluster's pool, which both hosts reach."""
    import cephcluster
    missing = cephcluster.missing_packages()
    if missing:
        fail(f"ceph is not installed ({', '.join(missing)} missing): run tools/setup")
    cephcluster.cleanup_stale()
    cdir = Path(tempfile.mkdtemp(prefix=f"rmemfs-ceph-{os.getpid()}-"))
    try:
        say("Starting a throw-away Ceph cluster: one monitor, one manager, one bluestore OSD on a file, "
            "pool 'rmemfs' (size 1), cephx on")
        c = cephcluster.start(cdir, net=True, owner=os.getpid())
        show_line(f"mon at {c.addr}:{c.port} on bridge {c.bridge}; ceph.conf {c.conf}; "
                  f"started in {time.monotonic() - T0:.1f} s")
        backend = f"rados:{c.pool}/demo-{os.getpid()}"
        store: dict[str, Any] = {"ceph_conf": str(c.conf), "ceph_id": "rmemfs"}
        hosts = TwoHosts(ceph=c.dir)
        with hosts as (a, b):
            story(a, b, backend, store, shared=f"the backend is {backend}: pool {c.pool!r} of that cluster, which "
                  f"both reach over a bridge ({a.name} {a.ceph_addr}, {b.name} {b.ceph_addr}), as user client.rmemfs "
                  f"(read/write on this pool only)")
    finally:
        cephcluster.stop(cdir, remove=True)


def show_line(text: str) -> None:
    print(f"  {DIM}{text}{OFF}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description="The rmemfs two-host recovery story, narrated (tools/demo).")
    ap.add_argument("--backend", choices=("directory", "rados"), default="directory",
                    help="where the baselines go: a directory both hosts share (default), or a Ceph pool "
                         "of a throw-away cluster")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # run the cleanup on SIGTERM too
    cleanup_stale()
    try:
        if args.backend == "rados":
            rados_story()
        else:
            hosts = TwoHosts()
            with hosts as (a, b):
                story(a, b, hosts.backend)
    except SystemExit as e:
        if e.code not in (0, None):
            print(f"\n{e.code}" if isinstance(e.code, str) else "", file=sys.stderr)
            return 1
        raise
    except Exception as e:
        print(f"\n{RED}FAIL: {type(e).__name__}: {e}{OFF}", file=sys.stderr)
        return 1
    say(f"{GREEN}PASS: everything acknowledged on hostA is on hostB, byte for byte "
        f"({time.monotonic() - T0:.1f} s; namespaces and mounts removed){OFF}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
