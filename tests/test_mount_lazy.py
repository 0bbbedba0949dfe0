"""Lazy recovery on real mounts: the recovered filesystem serves while its baseline is still loading.

The background load is slowed with ``-o load_rate`` so that every check below runs while most baseline
pages are still missing (the test asserts that they are), and each request that touches one must wait
for it and see exactly the bytes the failed host had acknowledged.
"""
from __future__ import annotations

import json
import mmap
import os
import random
import threading
from pathlib import Path

import pytest

from harness import Rig, cli, run
from rmemfs import PAGE_SIZE
from test_mount_lifecycle import digest_tree

pytestmark = pytest.mark.mount

BIG = 24 << 20                 # the file most of the baseline is
SLOW = ["load_rate=512K"]      # the whole load would take about 50 s: every test ends long before


def model_bytes(seed: int, n: int) -> bytearray:
    return bytearray(random.Random(seed).randbytes(n))


@pytest.fixture
def crashed(rig: Rig) -> Rig:
    """A baseline holding a 24 MiB file and a small one, then changes only memory holds; SIGKILLed."""
    rig.mount(["flush_interval=3600"])
    big = model_bytes(1, BIG)
    (rig.mountpoint / "big").write_bytes(big)
    (rig.mountpoint / "small").write_bytes(b"s" * 10_000)
    rig.flush()
    with open(rig.mountpoint / "big", "r+b") as f:    # dirty pages scattered through the file
        for k in range(0, BIG, 1 << 20):
            f.seek(k + 100)
            f.write(b"dirty")
            big[k + 100:k + 105] = b"dirty"
        os.fsync(f.fileno())
    (rig.mountpoint / "late").write_bytes(b"late" * 3000)
    rig.model = {"big": big, "small": bytearray(b"s" * 10_000),  # type: ignore[attr-defined]
                 "late": bytearray(b"late" * 3000)}
    rig.kill()
    return rig


def check_model(rig: Rig) -> None:
    model: dict[str, bytearray] = rig.model  # type: ignore[attr-defined]
    assert sorted(p.name for p in rig.mountpoint.iterdir()) == sorted(model)
    for name, want in model.items():
        assert (rig.mountpoint / name).read_bytes() == want, name


def load_stats(rig: Rig) -> dict:
    load = rig.stats()["load"]
    assert load is not None
    return load


def recover_lazy(rig: Rig, *args: str, source: int | None = None) -> None:
    run(cli("recover") + ["--backend", str(rig.backend), "--transport", "software", "--source",
                          f"127.0.0.1:{source or rig.port}", "-o", rig.opts(["port=0", *SLOW]), *args,
                          str(rig.mountpoint)])


def test_mounts_before_the_load_and_every_read_waits_for_its_pages(crashed: Rig, tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    recover_lazy(crashed, "--no-liveness-check", "--json", str(report))
    doc = json.loads(report.read_text())
    assert doc["load"] == "lazy" and doc["time_to_mount_s"] > 0
    before = load_stats(crashed)
    assert before["missing_pages"] > before["to_load_pages"] // 2      # most of the baseline is still out
    check_model(crashed)
    after = load_stats(crashed)
    assert after["demand_waits"] > 0
    out = crashed.ctl("stats", str(crashed.mountpoint)).stdout
    assert "background load:" in out and "pages resident" in out


def test_64_concurrent_readers_of_distinct_missing_pages(crashed: Rig) -> None:
    recover_lazy(crashed, "--no-liveness-check")
    big = crashed.model["big"]  # type: ignore[attr-defined]
    pages = random.Random(7).sample(range(BIG // PAGE_SIZE), 64)
    got: dict[int, bytes] = {}
    barrier = threading.Barrier(64)

    def reader(page: int) -> None:
        fd = os.open(crashed.mountpoint / "big", os.O_RDONLY)
        try:
            barrier.wait()
            got[page] = os.pread(fd, PAGE_SIZE, page * PAGE_SIZE)
        finally:
            os.close(fd)

    threads = [threading.Thread(target=reader, args=(p,)) for p in pages]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(got[p] == big[p * PAGE_SIZE:(p + 1) * PAGE_SIZE] for p in pages)
    assert load_stats(crashed)["missing_pages"] > 0


def test_writes_truncate_mmap_and_a_flush_during_the_load_then_a_second_failure(crashed: Rig) -> None:
    """Changes to missing pages keep the rest of each page; a flush publishes only what is dirty and
    verifies; the new owner killed mid-load is recovered from the store plus its own dirty lists."""
    recover_lazy(crashed, "--no-liveness-check")
    model: dict[str, bytearray] = crashed.model  # type: ignore[attr-defined]
    big = model["big"]
    path = crashed.mountpoint / "big"
    with open(path, "r+b") as f:
        for off in (3 * PAGE_SIZE + 17, (5 << 20) + 4000, (9 << 20) - 3):    # partial pages, one across two
            f.seek(off)
            f.write(b"partial write")
            big[off:off + 13] = b"partial write"
        os.fsync(f.fileno())
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), BIG) as m:
        for off in ((12 << 20) + 5, (13 << 20) + PAGE_SIZE - 2):
            m[off:off + 4] = b"mmap"
            big[off:off + 4] = b"mmap"
        m.flush()
    cut = (20 << 20) + 1234                  # truncate inside a page still missing: its head must stay
    os.truncate(path, cut)
    del big[cut:]
    crashed.flush()                          # during the load: only dirty pages, and it verifies
    run(cli("ctl") + ["verify", "--backend", str(crashed.backend)])
    assert load_stats(crashed)["missing_pages"] > 0
    with open(path, "r+b") as f:             # after the flush, so only the new owner's lists hold it
        f.seek(1 << 20)
        f.write(b"after the flush")
        big[1 << 20:(1 << 20) + 15] = b"after the flush"
        os.fsync(f.fileno())
    check_model(crashed)

    # Second failure, mid-load: recover from the new owner's exporter, store and dirty lists.
    port = int(crashed.manifest().owner["exporter_port"])
    crashed.kill()
    run(cli("recover") + ["--backend", str(crashed.backend), "--transport", "software", "--source",
                          f"127.0.0.1:{port}", "-o", crashed.opts(["port=0"]), "--no-liveness-check",
                          "--load", "eager", "--verify", str(crashed.mountpoint)])
    check_model(crashed)


def test_unmount_during_the_load_leaves_a_clean_baseline_and_a_full_remount(crashed: Rig) -> None:
    recover_lazy(crashed, "--no-liveness-check")
    (crashed.mountpoint / "small").write_bytes(b"new small")
    crashed.model["small"] = bytearray(b"new small")  # type: ignore[attr-defined]
    assert load_stats(crashed)["missing_pages"] > 0
    crashed.unmount()
    run(cli("ctl") + ["verify", "--backend", str(crashed.backend)])
    crashed.mount()
    check_model(crashed)


def test_eager_load_is_still_there(crashed: Rig, tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    run(cli("recover") + ["--backend", str(crashed.backend), "--transport", "software", "--source",
                          f"127.0.0.1:{crashed.port}", "-o", crashed.opts(["port=0"]), "--load", "eager",
                          "--no-liveness-check", "--json", str(report), str(crashed.mountpoint)])
    assert json.loads(report.read_text())["load"] == "eager"
    assert crashed.stats()["load"] is None
    assert digest_tree(crashed.mountpoint)
    check_model(crashed)


@pytest.mark.allow_log
@pytest.mark.parametrize("source_reachable", [True, False])
def test_a_corrupt_baseline_segment_during_the_load(crashed: Rig, source_reachable: bool) -> None:
    """Pages the store cannot deliver come from the (fenced) source while it is reachable; otherwise
    only the request that needs them gets EIO, the rest of the filesystem serves."""
    recover_lazy(crashed, "--no-liveness-check")
    info = max(crashed.manifest().segments, key=lambda s: s.data_pages)     # the baseline's big segment
    seg = crashed.backend / "segments" / info.name
    bad_page = info.data_pages - 10              # near the end: still missing at this point
    with open(seg, "r+b") as f:
        f.seek(PAGE_SIZE * (1 + bad_page) + 99)
        f.write(b"\xde\xad\xbe\xef")
    if not source_reachable:
        exporter = json.loads((crashed.regiondir / "exporter.json").read_text())["pid"]
        os.kill(exporter, 9)
    assert load_stats(crashed)["missing_pages"] > 0
    big: bytearray = crashed.model["big"]  # type: ignore[attr-defined]
    path = crashed.mountpoint / "big"
    # The file offset of the damaged page: big is random, so its first 99 bytes (before the damage) say.
    with open(seg, "rb") as f:
        f.seek(PAGE_SIZE * (1 + bad_page))
        damaged = f.read(PAGE_SIZE)
    offsets = [k for k in range(0, BIG, PAGE_SIZE) if big[k:k + 99] == damaged[:99]]
    assert offsets, "the damaged page is not one of big's"
    fd = os.open(path, os.O_RDONLY)
    try:
        if source_reachable:
            assert os.pread(fd, PAGE_SIZE, offsets[0]) == big[offsets[0]:offsets[0] + PAGE_SIZE]
        else:
            with pytest.raises(OSError) as e:
                os.pread(fd, PAGE_SIZE, offsets[0])
            assert e.value.errno == 5
            assert os.pread(fd, PAGE_SIZE, 0) == big[:PAGE_SIZE]          # everything else still serves
    finally:
        os.close(fd)
    assert (crashed.mountpoint / "late").read_bytes() == crashed.model["late"]  # type: ignore[attr-defined]
