"""What every two-host test module shares: the check that this machine can make netns hosts, and the seeded
trial parametrisation (``--trials``, ``--seed``; a printed seed replays one trial exactly)."""
from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from hosts import cleanup_stale  # noqa: E402


def why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, FUSE)"
    for tool in ("ip", "nsenter", "unshare", "fusermount3"):
        if shutil.which(tool) is None:
            return f"{tool} is missing (run tools/setup)"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    probe = subprocess.run(["ip", "netns", "add", f"rmhprobe{os.getpid()}"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot create network namespaces: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", f"rmhprobe{os.getpid()}"], capture_output=True)
    return None


@pytest.fixture(scope="module", autouse=True)
def hosts_available() -> None:
    """Import into a test module to skip it, with the reason, where netns hosts cannot be made."""
    reason = why_not()
    if reason:
        pytest.skip(reason)
    cleanup_stale()


def parametrize_seeds(metafunc: pytest.Metafunc, default_trials: int) -> None:
    if "seed" in metafunc.fixturenames:
        trials = metafunc.config.getoption("--trials") or default_trials
        first = metafunc.config.getoption("--seed")
        if first is None:
            first = random.SystemRandom().randrange(1, 1 << 31)
        metafunc.parametrize("seed", [first + i for i in range(trials)], ids=lambda s: f"seed={s}")
