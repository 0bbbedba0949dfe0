"""tools/bench section `store`: the RADOS store's full flush and full load against raw RADOS (issue 13).

One run, on a throw-away cluster (tools/cephcluster.py: one mon, one mgr, one bluestore OSD on a sparse
file, pool size 1) started for the section and stopped after it; an untimed raw write + read first (the
OSD's first writes also allocate its sparse block file). Per repeat, in this order:

* rados: an rmemfs mounted with ``--backend rados:rmemfs/bench-N``; ``--size`` bytes written, then a full
  flush (the flush's own ``last_duration_s`` and ``last_bytes``); then, caches dropped, a full load of
  the published generation in this process, as recovery's baseline load does it: ``plan_load`` (the
  indexes) + ``BaselineSource.load`` through the RadosStore into fresh region files;
* raw, right before and right after the two: tools/bench_rados.py's ``bench``, ``--size`` bytes written
  and read back as objects of the store's part size (rados.PART_SIZE) in ops of the store's write size
  (base.STAGE_BYTES) with the store's concurrency (rados.IN_FLIGHT aio ops in flight), for reads too;
  the reference is the mean of the two (drift hits both sides);
* directory: the same data, flush and load with the directory store on --workdir (a reference).

Ratios are per repeat (raw measured beside it), median over repeats: flush throughput / raw write, load
throughput / raw read; targets ≥ 0.8 each. Under --quick the section is skipped (nothing else in a smoke
run needs a Ceph cluster, and its three daemons are heavy on a small machine) unless --only names it.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import bench
import bench_rados
import cephcluster
from bench import MiB, Rmemfs, human, log, summary

from rmemfs.loader import SPAN_BYTES, plan_load, region_file_writer
from rmemfs.opening import fresh_regions
from rmemfs.options import parse_options
from rmemfs.sources.baseline import BaselineSource
from rmemfs.store import BaselineStore, open_store

SKIP_QUICK = ("skipped under --quick: it needs a Ceph cluster of its own (three daemons, heavy on a small "
              "machine; nothing else in --quick needs one): run tools/bench --only store")


class RadosRmemfs(Rmemfs):
    """An rmemfs whose baseline store is a prefix of the cluster's pool."""

    def __init__(self, work: Path, name: str, conf: Path, pool: str) -> None:
        super().__init__(work, name)
        self.conf, self.pool, self.prefix = conf, pool, f"bench-{os.getpid()}-{name}"

    def spec(self) -> str:
        return f"rados:{self.pool}/{self.prefix}"

    def options(self) -> str:
        return super().options() + f",ceph_conf={self.conf},ceph_id=admin"

    def store(self) -> BaselineStore:
        return open_store(self.spec(), {"ceph_conf": str(self.conf), "ceph_id": "admin"})

    def destroy(self) -> None:
        super().destroy()
        remove_prefix(self.conf, self.pool, self.prefix)


def remove_prefix(conf: Path, pool: str, prefix: str) -> None:
    import rados
    with rados.Rados(conffile=str(conf), rados_id="admin", conf={"client_mount_timeout": "30"}) as r, \
            r.open_ioctx(pool) as io:
        for obj in list(io.list_objects()):
            if obj.key.startswith(prefix + "/"):
                with contextlib.suppress(rados.ObjectNotFound):
                    io.remove_object(obj.key)


def load_once(store: BaselineStore, region_dir: Path) -> dict[str, Any]:
    """A full baseline load of the published generation into fresh region files, as recovery does it."""
    m = store.read_manifest()
    regions = fresh_regions(region_dir, m.fsid, m, parse_options([]))
    try:
        t0 = time.perf_counter()
        plan = plan_load(store, m)
        t1 = time.perf_counter()
        source = BaselineSource(store, plan, region_file_writer(regions))
        try:
            res = source.load()
        finally:
            source.close()
        t2 = time.perf_counter()
    finally:
        regions.close()
        shutil.rmtree(region_dir, ignore_errors=True)
    if res.corrupt:
        raise RuntimeError(f"load found {len(res.corrupt)} corrupt pages in {store.describe()}")
    return {"plan_s": t1 - t0, "copy_s": t2 - t1, "total_s": t2 - t0, "bytes": res.bytes,
            "throughput": res.bytes / (t2 - t0)}


def flush_and_load(b: Any, fs: Rmemfs, seed: int, label: str) -> dict[str, Any]:
    fs.mount()
    bench.seq_write(fs.mp / "data.dat", b.size, bench.data_block(MiB, seed))
    bench.quiesce(b.settle)
    fl = fs.flush()
    if not fl["last_full"] and fl["last_bytes"] < b.size:
        raise RuntimeError(f"{label}: flush wrote {fl['last_bytes']} bytes of {b.size}")
    bench.drop_caches()
    ld = load_once(fs.store(), b.shm / f"load-{label}")
    out = {"flush_s": fl["last_duration_s"], "flush_bytes": fl["last_bytes"],
           "flush_throughput": fl["last_bytes"] / fl["last_duration_s"], "load": ld}
    log(f"store: {label:<9} flush {human(fl['last_bytes'])} in {fl['last_duration_s']:.2f} s "
        f"({out['flush_throughput'] / MiB:.0f} MiB/s); load {human(ld['bytes'])} in {ld['total_s']:.2f} s "
        f"({ld['throughput'] / MiB:.0f} MiB/s; plan {ld['plan_s']:.2f} s)")
    fs.destroy()
    return out


def raw_bench(io: Any, size: int, part: int, depth: int, op: int, label: str) -> dict[str, Any]:
    """tools/bench_rados.py's aio write + read of ``size`` bytes as ``part``-byte objects in ``op``-byte
    operations, ``depth`` in flight."""
    raw = bench_rados.bench(io, size, part, depth, op)
    raw["write_throughput"], raw["read_throughput"] = raw["bytes"] / raw["write_s"], raw["bytes"] / raw["read_s"]
    log(f"store: raw {label:<9} {raw['bytes'] // part} objects of {human(part)}, ops of {human(op)}, {depth} in flight: "
        f"write {raw['write_throughput'] / MiB:.0f} MiB/s, read {raw['read_throughput'] / MiB:.0f} MiB/s")
    return raw


def cluster_setup(c: cephcluster.Cluster, r: Any) -> dict[str, Any]:
    def osd_config(key: str) -> str | None:
        cmd = json.dumps({"prefix": "config get", "who": "osd.0", "key": key, "format": "json"})
        rc, out, _ = r.mon_command(cmd, b"")
        return out.decode().strip().strip('"') if rc == 0 else None
    conf = cephcluster.CONF_TEMPLATE
    setting = {k: v for k, _, v in (line.partition(" = ") for line in conf.splitlines()) if v}
    block_fs = bench.run_cmd(["stat", "-f", "-c", "%T", str(c.dir)]).stdout.strip()
    return {
        "daemons": "1 mon, 1 mgr, 1 OSD on this machine, loopback", "objectstore": "bluestore on a sparse file",
        "block_file_bytes": cephcluster.BLOCK_SIZE, "block_file_filesystem": block_fs,
        "pool": c.pool, "pool_size": 1, "pg_num": int(setting["osd_pool_default_pg_num"]),
        "bluestore_cache_size": int(setting["bluestore_cache_size"]),
        "osd_op_num_shards": int(setting["osd_op_num_shards"]),
        "osd_memory_target": int(setting["osd_memory_target"]),
        "osd_max_object_size": osd_config("osd_max_object_size"),
        "osd_max_write_size_MiB": osd_config("osd_max_write_size"),
        "client_objecter_inflight_op_bytes": int(r.conf_get("objecter_inflight_op_bytes")),
        "ceph_version": bench.run_cmd(["ceph", "--version"]).stdout.strip(),
        "librados_version": str(r.version()),
        "python3_rados": bench.run_cmd(["dpkg-query", "-W", "-f", "${Version}", "python3-rados"]).stdout.strip(),
    }


def run(b: Any) -> dict[str, Any]:
    """The section; `b` is the tools/bench Bench (sizes, work dirs, cleanups, args)."""
    only = set(b.args.only.split(",")) if b.args.only else set()
    if b.args.quick and "store" not in only:
        log(f"store: {SKIP_QUICK}")
        return {"skipped": SKIP_QUICK}
    missing = cephcluster.missing_packages()
    if missing:
        raise RuntimeError(f"ceph is not installed ({', '.join(missing)} missing): run tools/setup")
    import rados

    from rmemfs.store import rados as rados_store
    from rmemfs.store.base import STAGE_BYTES
    part, depth, op = rados_store.PART_SIZE, rados_store.IN_FLIGHT, STAGE_BYTES
    cephcluster.cleanup_stale()
    cdir = Path(tempfile.mkdtemp(prefix=f"rmemfs-ceph-{os.getpid()}-"))
    b.cleanups.append(lambda: cephcluster.stop(cdir, remove=True))
    t0 = time.monotonic()
    try:
        c = cephcluster.start(cdir, owner=os.getpid())
        start_s = time.monotonic() - t0
        log(f"store: cluster started in {start_s:.1f} s ({cdir})")
        res: dict[str, Any] = {"size_bytes": b.size, "part_size": part, "op_size": op, "in_flight": depth,
                               "cluster_start_s": start_s,
                               "load_reads_in_flight": rados_store.RadosStore.load_reads_in_flight,
                               "load_read_bytes": SPAN_BYTES}
        runs: list[dict[str, Any]] = []
        with rados.Rados(conffile=str(c.conf), rados_id="admin", conf={"client_mount_timeout": "30"}) as r, \
                r.open_ioctx(c.pool) as io:
            res["cluster"] = cluster_setup(c, r)
            # Untimed: the OSD's first writes also allocate its sparse block file on this machine's disk.
            raw_bench(io, b.size, part, depth, op, "warm-up (not counted)")
            for rep in range(b.repeat):
                tag = f"{rep + 1}/{b.repeat}"
                # Raw right before and right after the store's flush + load: the reference is their mean,
                # so drift in the shared machine's load hits both sides alike.
                one: dict[str, Any] = {"raw_before": raw_bench(io, b.size, part, depth, op, f"before {tag}")}
                one["rados"] = flush_and_load(b, RadosRmemfs(b.work, f"store-rados-{rep}", c.conf, c.pool),
                                              600 + rep, f"rados {tag}")
                one["raw_after"] = raw_bench(io, b.size, part, depth, op, f"after {tag}")
                one["raw_write_throughput"] = statistics.mean(one[k]["write_throughput"]
                                                              for k in ("raw_before", "raw_after"))
                one["raw_read_throughput"] = statistics.mean(one[k]["read_throughput"]
                                                             for k in ("raw_before", "raw_after"))
                one["directory"] = flush_and_load(b, Rmemfs(b.work, f"store-dir-{rep}"), 600 + rep, f"dir {tag}")
                one["flush_to_raw_write"] = one["rados"]["flush_throughput"] / one["raw_write_throughput"]
                one["load_to_raw_read"] = one["rados"]["load"]["throughput"] / one["raw_read_throughput"]
                log(f"store: run {tag}: flush {one['flush_to_raw_write']:.2f}× raw write, "
                    f"load {one['load_to_raw_read']:.2f}× raw read")
                runs.append(one)
    finally:
        cephcluster.stop(cdir, remove=True)

    def fig(pick: Any, unit: str) -> dict[str, Any]:
        return summary([pick(x) for x in runs], unit)
    res.update({
        "rados_flush": fig(lambda x: x["rados"]["flush_throughput"], "bytes/s"),
        "rados_load": fig(lambda x: x["rados"]["load"]["throughput"], "bytes/s"),
        "rados_load_plan": fig(lambda x: x["rados"]["load"]["plan_s"], "s"),
        "raw_write": fig(lambda x: x["raw_write_throughput"], "bytes/s"),
        "raw_read": fig(lambda x: x["raw_read_throughput"], "bytes/s"),
        "directory_flush": fig(lambda x: x["directory"]["flush_throughput"], "bytes/s"),
        "directory_load": fig(lambda x: x["directory"]["load"]["throughput"], "bytes/s"),
        "ratios": {"flush_to_raw_write": statistics.median(x["flush_to_raw_write"] for x in runs),
                   "load_to_raw_read": statistics.median(x["load_to_raw_read"] for x in runs),
                   "flush_to_raw_write_per_run": [x["flush_to_raw_write"] for x in runs],
                   "load_to_raw_read_per_run": [x["load_to_raw_read"] for x in runs]},
        "runs": runs,
        "loadavg_at_end": os.getloadavg(),     # the machine is shared: how busy it was
    })
    return res


def table(r: dict[str, Any]) -> list[str]:
    if not isinstance(r, dict) or "ratios" not in r:
        return [f"store: {r['skipped']}"] if isinstance(r, dict) and "skipped" in r else []
    sp, q = bench._spread, r["ratios"]
    return [
        f"store (1 bluestore OSD, {human(r['part_size'])} objects, {human(r['op_size'])} ops, {r['in_flight']} in flight; "
        f"{human(r['size_bytes'])}, median [min .. max])",
        f"  rados: full flush {sp(r['rados_flush'])}, full load {sp(r['rados_load'])}",
        f"  raw aio: write {sp(r['raw_write'])}, read {sp(r['raw_read'])}",
        f"  -> flush {q['flush_to_raw_write']:.2f}× raw write, load {q['load_to_raw_read']:.2f}× raw read "
        f"(median of per-run ratios)",
        f"  directory store (reference, same disk): flush {sp(r['directory_flush'])}, "
        f"load {sp(r['directory_load'])}",
    ]
