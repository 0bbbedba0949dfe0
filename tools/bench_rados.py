"""Raw RADOS throughput: write and read SIZE bytes as objects with N aio operations in flight.

The reference the RADOS store's flush and load are measured against (issue 13: ≥ 0.8× of these, same run,
same object size and concurrency). Uses librados aio (aio_write_full / aio_read with completions).

    /usr/bin/python3 tools/bench_rados.py --conf DIR/ceph.conf [--size 1G] [--objects 4M,8M] [--depths 1,4,16] [--op 4M]
    /usr/bin/python3 tools/bench_rados.py --start    # starts a throw-away cluster in a temp dir, then stops it
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cephcluster  # noqa: E402

MiB = 1 << 20


def _size(s: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(s[:-1]) * units[s[-1].upper()]) if s[-1].upper() in units else int(s)


def _run_aio(n: int, depth: int, submit) -> None:  # type: ignore[no-untyped-def]
    """Keep ``depth`` operations in flight; ``submit(i, done)`` starts operation i and calls done(rv)."""
    sem = threading.Semaphore(depth)
    errors: list[int] = []
    pending = []

    def done(rv: int) -> None:
        if rv < 0:
            errors.append(rv)
        sem.release()

    for i in range(n):
        sem.acquire()
        if errors:
            break
        pending.append(submit(i, done))
    # wait_for_complete() can return before the callback has run: wait for every callback instead.
    for _ in range(depth):
        sem.acquire()
    del pending
    if errors:
        raise OSError(-errors[0], f"aio operation failed: {os.strerror(-errors[0])}")


def bench(io, total: int, obj: int, depth: int, op: int | None = None) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Write, read back and remove ``total`` bytes as objects of ``obj`` bytes, each in ops of ``op`` bytes
    (default: the whole object; the first op of an object is a write_full), ``depth`` ops in flight."""
    op = op or obj
    if obj % op:
        raise ValueError(f"object size {obj} is not a multiple of the op size {op}")
    n, per = total // obj, obj // op
    payload = os.urandom(op)
    names = [f"bench-{obj}-{i}" for i in range(n)]

    def write(k, done):  # type: ignore[no-untyped-def]
        i, j = divmod(k, per)
        cb = lambda c: done(c.get_return_value())  # noqa: E731
        return (io.aio_write_full(names[i], payload, oncomplete=cb) if j == 0 else
                io.aio_write(names[i], payload, j * op, oncomplete=cb))
    t0 = time.perf_counter()
    _run_aio(n * per, depth, write)
    t_write = time.perf_counter() - t0
    got = [0]

    def on_read(done):  # type: ignore[no-untyped-def]
        def cb(c, data):  # type: ignore[no-untyped-def]
            rv = c.get_return_value()
            if rv >= 0:
                got[0] += len(data)
            done(rv)
        return cb
    t0 = time.perf_counter()
    _run_aio(n * per, depth, lambda k, done: io.aio_read(names[k // per], op, k % per * op, on_read(done)))
    t_read = time.perf_counter() - t0
    if got[0] != n * obj:
        raise RuntimeError(f"read {got[0]} bytes, expected {n * obj}")
    _run_aio(n, 16, lambda i, done: io.aio_remove(names[i], oncomplete=lambda c: done(c.get_return_value())))
    return {"object_size": obj, "op_size": op, "depth": depth, "bytes": n * obj,
            "write_s": t_write, "read_s": t_read,
            "write_MBps": n * obj / MiB / t_write, "read_MBps": n * obj / MiB / t_read}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--conf", type=Path, help="ceph.conf of a running cluster (else --start)")
    ap.add_argument("--start", action="store_true", help="start a throw-away cluster for the run")
    ap.add_argument("--pool", default=cephcluster.POOL)
    ap.add_argument("--id", default="admin", help="rados_id (default admin)")
    ap.add_argument("--size", default="1G")
    ap.add_argument("--objects", default="4M,8M", help="object sizes, comma-separated")
    ap.add_argument("--depths", default="1,4,16", help="operations in flight, comma-separated")
    ap.add_argument("--op", default=None, help="bytes per operation (default: the whole object)")
    ap.add_argument("--json", type=Path, default=Path("bench-rados.json"))
    args = ap.parse_args()
    if not args.conf and not args.start:
        ap.error("give --conf CONF or --start")
    import rados
    tmp = None
    try:
        if args.start:
            tmp = Path(tempfile.mkdtemp(prefix=f"rmemfs-ceph-{os.getpid()}-"))
            t0 = time.monotonic()
            c = cephcluster.start(tmp, owner=os.getpid())
            print(f"cluster started in {time.monotonic() - t0:.1f} s", flush=True)
            args.conf = c.conf
        results = []
        with rados.Rados(conffile=str(args.conf), rados_id=args.id,
                         conf={"client_mount_timeout": "30"}) as r, r.open_ioctx(args.pool) as io:
            for obj in map(_size, args.objects.split(",")):
                for depth in map(int, args.depths.split(",")):
                    res = bench(io, _size(args.size), obj, depth, _size(args.op) if args.op else None)
                    results.append(res)
                    print(f"object {obj // MiB:>3} MiB  depth {depth:>2}  write {res['write_MBps']:7.1f} MiB/s"
                          f"  read {res['read_MBps']:7.1f} MiB/s", flush=True)
        args.json.write_text(json.dumps({"size": _size(args.size), "results": results}, indent=1) + "\n")
        print(f"wrote {args.json}")
    except (cephcluster.ClusterError, rados.Error, OSError) as e:
        print(f"bench_rados: {e}", file=sys.stderr)
        return 1
    finally:
        if tmp:
            cephcluster.stop(tmp, remove=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
