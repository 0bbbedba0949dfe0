"""Real-mount level: databases on rmemfs survive a SIGKILL of the filesystem and a recovery (issue 14).

A writer process commits small transactions and reports each one on stdout only once the database has
acknowledged it (SQLite's COMMIT with synchronous=FULL, which fsyncs; LMDB's commit with writemap + sync,
which msyncs). The filesystem process is SIGKILLed while the writer is busy, the filesystem is recovered
from its exporter on the same host, and then: the database opens, passes its own integrity check, and
holds every acknowledged transaction (and possibly the one in flight). Both cache modes: with
``writeback_cache`` a bare write() is not durable, but fsync and msync are, and that is all a database
relies on.
"""
from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import threading

import pytest

from harness import Rig

pytestmark = pytest.mark.mount

ROW = 100

SQLITE_WRITER = r"""
import sqlite3, sys
db, mode = sys.argv[1:3]
con = sqlite3.connect(db, isolation_level=None)
con.execute(f"PRAGMA journal_mode={mode}")
con.execute("PRAGMA synchronous=FULL")
con.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, payload BLOB)")
print("ready", flush=True)
i = 0
while True:
    i += 1
    con.execute("BEGIN")
    con.execute("INSERT INTO t VALUES (?, ?)", (i, bytes([i % 251]) * %(row)d))
    con.execute("COMMIT")
    print(i, flush=True)
""".replace("%(row)d", str(ROW))

LMDB_WRITER = r"""
import lmdb, sys
env = lmdb.open(sys.argv[1], map_size=64 << 20, writemap=True, sync=True, metasync=True, lock=True)
print("ready", flush=True)
i = 0
while True:
    i += 1
    with env.begin(write=True) as txn:
        txn.put(b"%08d" % i, bytes([i % 251]) * %(row)d)
    print(i, flush=True)
""".replace("%(row)d", str(ROW))


def _crash_while_committing(rig: Rig, script: str, args: list[str], commits: int) -> int:
    """Run the writer until it has acknowledged ``commits`` transactions, SIGKILL the filesystem while it goes
    on, and return the last acknowledged transaction."""
    writer = subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    assert writer.stdout is not None
    acked = 0
    try:
        assert writer.stdout.readline().strip() == "ready", writer.stderr.read() if writer.stderr else ""
        while acked < commits:
            line = writer.stdout.readline()
            assert line, f"writer ended early: {writer.stderr.read() if writer.stderr else ''}"
            acked = int(line)
        rig.kill()                         # in the middle of the writer's next commits
        # What it acknowledged before its requests started failing. Read through the same buffered
        # stream as above: lines it already holds are acknowledgements too (communicate() reads the
        # pipe itself and would miss them: 300 counted, 323 found, once in CI).
        stop = threading.Timer(10, writer.kill)
        stop.start()
        try:
            rest = writer.stdout.read()
        finally:
            stop.cancel()
        acked = max([acked, *(int(line) for line in rest.split() if line.isdigit())])
    finally:
        if writer.poll() is None:
            writer.send_signal(signal.SIGKILL)
            writer.wait()
    return acked


@pytest.mark.parametrize("cache", ["default", "writeback_cache"])
@pytest.mark.parametrize("journal_mode", ["WAL", "DELETE"])
def test_sqlite_keeps_every_acknowledged_commit(rig: Rig, journal_mode: str, cache: str) -> None:
    extra = ["flush_interval=0.5"] + (["writeback_cache"] if cache == "writeback_cache" else [])
    rig.mount(extra)
    acked = _crash_while_committing(rig, SQLITE_WRITER, [str(rig.mountpoint / "app.db"), journal_mode], 300)
    rig.recover("--no-liveness-check", extra=["port=0"])
    con = sqlite3.connect(rig.mountpoint / "app.db")
    try:
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        ids = [row[0] for row in con.execute("SELECT id FROM t ORDER BY id")]
        assert ids[:acked] == list(range(1, acked + 1)), f"acknowledged up to {acked}, found {len(ids)} rows"
        assert len(ids) <= acked + 1       # at most the commit in flight beyond what was acknowledged
        for (i, payload) in con.execute("SELECT id, payload FROM t"):
            assert payload == bytes([i % 251]) * ROW
    finally:
        con.close()
    rig.unmount()


@pytest.mark.parametrize("cache", ["default", "writeback_cache"])
def test_lmdb_keeps_every_acknowledged_commit(rig: Rig, cache: str) -> None:
    lmdb = pytest.importorskip("lmdb", reason="python lmdb is a bench extra; tools/setup installs it")
    extra = ["flush_interval=0.5"] + (["writeback_cache"] if cache == "writeback_cache" else [])
    rig.mount(extra)
    path = rig.mountpoint / "env"
    path.mkdir()
    acked = _crash_while_committing(rig, LMDB_WRITER, [str(path)], 300)
    rig.recover("--no-liveness-check", extra=["port=0"])
    env = lmdb.open(str(path), map_size=64 << 20, readonly=True, lock=False)
    try:
        with env.begin() as txn:
            keys = [int(k) for k, _ in txn.cursor()]
            assert keys[:acked] == list(range(1, acked + 1)), f"acknowledged up to {acked}, found {len(keys)}"
            assert len(keys) <= acked + 1
            for k in keys:
                assert txn.get(b"%08d" % k) == bytes([k % 251]) * ROW
    finally:
        env.close()
    rig.unmount()
