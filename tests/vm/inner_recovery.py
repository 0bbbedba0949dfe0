"""A whole recovery over verbs, run inside the VM by tests/test_vm_verbs.py: mount rmemfs, write through
write() and mmap, flush, write more, SIGKILL the filesystem, rmemfs-recover --transport verbs, verify."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))

from harness import Rig  # noqa: E402
from test_mount_lifecycle import digest_tree, populate  # noqa: E402

from rmemfs.transport import verbs  # noqa: E402

pytestmark = pytest.mark.skipif(verbs.available() is not None, reason=f"no RDMA: {verbs.available()}")


@pytest.fixture
def rig(tmp_path: Path):  # type: ignore[no-untyped-def]
    r = Rig(tmp_path)
    try:
        yield r
    finally:
        r.cleanup()


@pytest.mark.parametrize("transport", ["verbs", "auto"])
def test_recover_over_verbs(rig: Rig, tmp_path: Path, transport: str) -> None:
    # Small regions: registering for verbs pins (and so backs) whole regions, and the VM's /dev/shm is small.
    rig.options = ["region_size=32M", "meta_size=32M", "dirty_capacity=65536"]
    rig.mount(["flush_interval=3600"])
    populate(rig.mountpoint)
    (rig.mountpoint / "big").write_bytes(os.urandom(8 << 20))
    rig.flush()
    with open(rig.mountpoint / "big", "r+b") as f:       # scattered pages after the baseline
        for off in range(0, 8 << 20, 97 * 4096):
            f.seek(off)
            f.write(b"dirty after the baseline")
    (rig.mountpoint / "late").write_bytes(os.urandom(300_000))
    want = digest_tree(rig.mountpoint)
    rig.kill()
    report = tmp_path / "report.json"
    proc = rig.recover("--no-liveness-check", "--verify", "--json", str(report), extra=["port=0"],
                       transport=transport)
    doc = json.loads(report.read_text())
    assert doc["transport"] == "verbs", proc.stderr
    assert doc["dirty_pages_fetched"] > 20 and doc["verified_pages"] > 0
    assert digest_tree(rig.mountpoint) == want
