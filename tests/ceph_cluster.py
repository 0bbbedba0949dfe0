"""The session's Ceph cluster (tools/cephcluster.py): started once, on a bridge the netns hosts can join.

Tests that need it take the ``ceph_cluster`` fixture (registered in conftest.py) and carry the ``ceph``
marker. Missing packages FAIL the test with "run tools/setup": a skip would hide a missing install step.
"""
from __future__ import annotations

import os
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable, Iterator

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
import cephcluster  # noqa: E402


@dataclass
class CephCluster:
    dir: Path
    conf: Path
    pool: str
    admin_id: str              # rados_id for rados.Rados(...) (without "client.")
    admin_keyring: Path
    user_id: str               # client.rmemfs: rw on the pool only
    user_keyring: Path
    restricted_id: str         # client.restricted: no capability on the pool
    restricted_keyring: Path
    addr: str                  # mon address (on the bridge)
    osd_stop: Callable[..., None]
    osd_start: Callable[..., None]
    command: Callable[..., str]     # a ceph command as client.admin: command("osd", "set-full-ratio", "0.95")


def start_session_cluster() -> Iterator[CephCluster]:
    missing = cephcluster.missing_packages()
    if missing:
        pytest.fail(f"ceph is not installed ({', '.join(missing)} missing): run tools/setup", pytrace=False)
    cephcluster.cleanup_stale()          # clusters and bridges of killed runs
    d = Path(tempfile.mkdtemp(prefix=f"rmemfs-ceph-{os.getpid()}-", dir=tempfile.gettempdir()))
    try:
        c = cephcluster.start(d, net=True, owner=os.getpid())
    except cephcluster.ClusterError as e:
        cephcluster.stop(d, remove=True)
        pytest.fail(f"could not start the test cluster: {e}", pytrace=False)
    try:
        yield CephCluster(
            dir=d, conf=c.conf, pool=c.pool, addr=c.addr,
            admin_id="admin", admin_keyring=Path(c.users["client.admin"]),
            user_id="rmemfs", user_keyring=Path(c.users["client.rmemfs"]),
            restricted_id="restricted", restricted_keyring=Path(c.users["client.restricted"]),
            osd_stop=lambda sig=signal.SIGKILL: cephcluster.osd_stop(d, sig),
            osd_start=lambda wait=True: cephcluster.osd_start(d, wait),
            command=lambda *args: cephcluster.command(d, *args))
    finally:
        cephcluster.stop(d, remove=True)
