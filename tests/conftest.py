"""Shared fixtures: the command-line flags and helpers every test level uses."""
from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--trials", type=int, default=None,
                     help="randomized two-host recovery trials to run (default: a handful)")
    parser.addoption("--seed", type=int, default=None, help="first seed of the randomized trials")


@pytest.fixture
def rig(tmp_path):  # type: ignore[no-untyped-def]
    """A backend, mountpoint, region directory and port for one real-mount test; torn down after."""
    from harness import Rig
    r = Rig(tmp_path)
    try:
        yield r
    finally:
        r.cleanup()


@pytest.fixture(scope="session")
def ceph_cluster():  # type: ignore[no-untyped-def]
    """One single-node Ceph cluster for the session (tests/ceph_cluster.py); fails if ceph is not installed."""
    from ceph_cluster import start_session_cluster
    yield from start_session_cluster()
