"""Shared fixtures: the command-line flags and helpers every test level uses, and the log check.

The log check (after s3ql's pytest_checklogs): a test fails if anything in the test process logs a
warning or an error it did not declare with ``@pytest.mark.allow_log(regex, ...)``. A warning nobody
expected is a defect or a missing assertion; the daemons' own logs are checked by the tests that read them.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Generator

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--trials", type=int, default=None,
                     help="randomized two-host recovery trials to run (default: a handful)")
    parser.addoption("--seed", type=int, default=None, help="first seed of the randomized trials")
    parser.addoption("--standby", action="store_true",
                     help="two-host trials: rmemfs-standby takes over by itself instead of rmemfs-recover")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "allow_log(*patterns): warnings/errors matching a pattern may be logged")


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    allowed = [re.compile(p) for m in item.iter_markers("allow_log") for p in m.args]
    handler = _Collect()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        result = yield
    finally:
        root.removeHandler(handler)
    unexpected = [f"{r.levelname} {r.name}: {r.getMessage()}" for r in handler.records
                  if not any(p.search(r.getMessage()) for p in allowed)]
    if unexpected:
        raise AssertionError("unexpected log records (declare them with @pytest.mark.allow_log):\n  "
                             + "\n  ".join(unexpected))
    return result


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
