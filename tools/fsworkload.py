#!/usr/bin/env python3
"""A seeded file workload for an rmemfs mount, and the check of a recovered copy against it.

    fsworkload.py run    ROOT --seed S --out STATE.json [--workers W] [--ops N] [--flushes F] [--contents DIR]
    fsworkload.py resume ROOT --contents DIR --state STATE.json --seed S --ops N --out STATE2.json
    fsworkload.py verify ROOT STATE.json [--exclude DIR]
    fsworkload.py pause  ROOT --seed S --out LOG.json --ready FILE --stop FILE [--workers W]
    fsworkload.py verify-pause ROOT LOG.json [--after-ns T]
    fsworkload.py ctl    ROOT {flush|stats}

``run`` drives W worker threads, each in its own directory (so each worker's
model of its files is exact without cross-thread ordering), through create,
write()+fsync, pwrite, append, truncate, mmap+msync, rename (to a new name and
over an existing file), mkdir and unlink, while the main thread asks the
filesystem for baselines (control socket ``flush``) so that some operations
overlap a flush. After the workers join it does a last burst of operations:
they land after the last baseline. The model is updated only after an
operation's syscalls returned (the acknowledgement); STATE.json holds every
file's XXH3 and size and every directory.

``--contents DIR`` also keeps every file's acknowledged bytes in DIR. ``resume`` goes on from there on
another mount of the same tree (a recovered one, while its baseline still loads): the workers adopt
their directories and files from DIR without reading the mount, so their partial writes, truncates and
mmap stores land on pages the mount may not have loaded yet, and STATE2.json is the state after them.

``verify`` walks ROOT (a recovered mount) and compares it with STATE.json byte
for byte via XXH3: missing, extra and different files and directories.
Exit 0 when identical, 1 otherwise (the differences are printed).

``pause`` is the writer side of a pause -> takeover -> resume trial: W threads
keep write()+fsync and mmap+msync calls in flight until the STOP file exists
(through a SIGSTOP of the filesystem process, a takeover elsewhere and the
resume), creating READY once its files exist. Every operation writes a fresh
slot (``SLOT`` bytes at its own offset, content regenerated from a per-op
seed), so each one's outcome is checkable on its own; LOG.json records each
operation's times (CLOCK_MONOTONIC, shared by every process on the machine) and
outcome: for a write, whether write() returned (that alone acknowledges it
without writeback_cache; with ``--writeback``, for a mount with it, only fsync's
return does) and the errno of write() or fsync; for an mmap store, msync's.
``verify-pause`` checks a takeover's copy against it: every
acknowledged slot holds exactly its bytes, every other byte of the files is
either zero or the byte a refused operation tried to write (a refused request
may have copied before it was refused), and with ``--after-ns T`` every
operation started after T (the resume) was refused.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import json
import mmap
import os
import random
import sys
import threading
import time
from pathlib import Path

import xxhash

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from rmemfs.control import find_control  # noqa: E402

PAGE = mmap.PAGESIZE


def _control_path(root: Path) -> str | None:
    try:
        return find_control(root)
    except OSError:
        return None


def request_flush(root: Path) -> int | None:
    """Ask the rmemfs serving ROOT for a baseline now; returns the generation (None if not rmemfs)."""
    from rmemfs import control
    path = _control_path(root)
    if path is None:
        return None
    reply = control.call(path, {"op": "flush"}, timeout=60)
    return reply.get("generation") if reply.get("ok") else None


class Worker:
    """One thread's files: the model maps a path relative to ROOT to its acknowledged content."""

    def __init__(self, root: Path, name: str, rng: random.Random, *, adopt: bool = False) -> None:
        self.root, self.rng = root, rng
        self.dir = name
        self.files: dict[str, bytearray] = {}
        self.dirs: set[str] = {name}
        self.ops: dict[str, int] = {}
        self.serial = 0
        if not adopt:
            os.mkdir(root / name)

    @classmethod
    def adopted(cls, root: Path, name: str, rng: random.Random, state: dict, contents: Path) -> Worker:
        """This worker's part of a saved tree (``--contents``), to go on from on another mount of it."""
        w = cls(root, name, rng, adopt=True)
        index = json.loads((contents / "index.json").read_text())
        w.files = {path: bytearray((contents / f"{n}.bin").read_bytes()) for path, n in index.items()
                   if path.split("/", 1)[0] == name}
        w.dirs = {d for d in state["dirs"] if d.split("/", 1)[0] == name}
        w.serial = 100_000                  # new names never collide with the first run's
        return w

    def data(self, n: int) -> bytes:
        # Mix random bytes with long zero runs: zero pages are a separate case in the baseline format.
        if self.rng.random() < 0.2:
            return bytes(n)
        return self.rng.randbytes(n)

    def size(self) -> int:
        return self.rng.choice([0, 1, 100, PAGE - 1, PAGE, PAGE + 1, 3 * PAGE, self.rng.randrange(1, 300_000)])

    def new_name(self) -> str:
        self.serial += 1
        d = self.rng.choice(sorted(self.dirs))
        return f"{d}/f{self.serial:04d}"

    def pick(self) -> str | None:
        return self.rng.choice(sorted(self.files)) if self.files else None

    def step(self) -> None:
        ops = ["create", "create", "pwrite", "pwrite", "append", "mmap", "mmap", "mmap", "truncate",
               "rename", "rename_over", "unlink", "mkdir"]
        op = self.rng.choice(ops)
        if op not in ("create", "mkdir") and not self.files:
            op = "create"
        getattr(self, "op_" + op)()
        self.ops[op] = self.ops.get(op, 0) + 1

    def _fsync(self, fd: int) -> None:
        if self.rng.random() < 0.7:   # without writeback_cache a returned write() is already acknowledged
            os.fsync(fd)

    def op_create(self) -> None:
        path, content = self.new_name(), self.data(self.size())
        fd = os.open(self.root / path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, content) if content else None
            self._fsync(fd)
        finally:
            os.close(fd)
        self.files[path] = bytearray(content)

    def op_pwrite(self) -> None:
        path = self.pick()
        assert path
        cur = self.files[path]
        off = self.rng.randrange(0, len(cur) + PAGE)
        content = self.data(self.rng.randrange(1, 3 * PAGE))
        fd = os.open(self.root / path, os.O_WRONLY)
        try:
            os.pwrite(fd, content, off)
            self._fsync(fd)
        finally:
            os.close(fd)
        if off > len(cur):
            cur.extend(bytes(off - len(cur)))
        cur[off:off + len(content)] = content

    def op_append(self) -> None:
        path = self.pick()
        assert path
        content = self.data(self.rng.randrange(1, 2 * PAGE))
        fd = os.open(self.root / path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, content)
            self._fsync(fd)
        finally:
            os.close(fd)
        self.files[path].extend(content)

    def op_mmap(self) -> None:
        """Store through a shared mapping, acknowledged by msync (maybe after growing the file)."""
        path = self.pick()
        assert path
        cur = self.files[path]
        size = len(cur)
        if size == 0 or self.rng.random() < 0.3:
            size = len(cur) + self.rng.randrange(1, 4 * PAGE)
        fd = os.open(self.root / path, os.O_RDWR)
        try:
            if size != len(cur):
                os.ftruncate(fd, size)
                cur.extend(bytes(size - len(cur)))
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        try:
            for _ in range(self.rng.randint(1, 4)):
                off = self.rng.randrange(size)
                content = self.data(min(size - off, self.rng.randrange(1, 2 * PAGE)))
                mm[off:off + len(content)] = content
                cur[off:off + len(content)] = content
            mm.flush()       # msync(MS_SYNC): only now are the stores acknowledged
        finally:
            mm.close()

    def op_truncate(self) -> None:
        path = self.pick()
        assert path
        cur = self.files[path]
        size = self.rng.choice([0, len(cur) // 2, len(cur) + self.rng.randrange(1, 2 * PAGE)])
        os.truncate(self.root / path, size)
        del cur[size:]
        cur.extend(bytes(size - len(cur)))

    def op_rename(self) -> None:
        src = self.pick()
        assert src
        dst = self.new_name()
        os.rename(self.root / src, self.root / dst)
        self.files[dst] = self.files.pop(src)

    def op_rename_over(self) -> None:
        if len(self.files) < 2:
            return self.op_rename()
        src, dst = self.rng.sample(sorted(self.files), 2)
        os.rename(self.root / src, self.root / dst)      # replaces dst atomically
        self.files[dst] = self.files.pop(src)

    def op_unlink(self) -> None:
        path = self.pick()
        assert path
        os.unlink(self.root / path)
        del self.files[path]

    def op_mkdir(self) -> None:
        self.serial += 1
        path = f"{self.rng.choice(sorted(self.dirs))}/d{self.serial:04d}"
        os.mkdir(self.root / path)
        self.dirs.add(path)


SLOT = 2 * PAGE          # one operation's bytes in the pause workload: up to two pages at a fresh offset
PAUSE_SLOTS = 2048       # slots per file and worker


def _slot_bytes(op_seed: int, n: int) -> bytes:
    return random.Random(op_seed).randbytes(n)


def pause_run(root: Path, seed: int, workers: int, ready: Path, stop: Path, max_seconds: float = 300,
              writeback: bool = False) -> dict:
    """Writers that keep calls in flight until ``stop`` exists; the per-operation log (see the docstring)."""
    rng = random.Random(seed)
    os.makedirs(root, exist_ok=True)
    setup: list[dict] = []
    for i in range(workers):
        for name, size in ((f"w{i}.dat", 0), (f"m{i}.dat", PAUSE_SLOTS * SLOT)):
            fd = os.open(root / name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.ftruncate(fd, size)
                os.fsync(fd)
            finally:
                os.close(fd)
            setup.append({"file": name, "size": size})
    logs: list[list[dict]] = [[] for _ in range(workers)]
    errors: list[BaseException] = []
    deadline = time.monotonic() + max_seconds

    def body(i: int, wrng: random.Random) -> None:
        wfd = os.open(root / f"w{i}.dat", os.O_WRONLY)
        mfd = os.open(root / f"m{i}.dat", os.O_RDWR)
        mm = mmap.mmap(mfd, PAUSE_SLOTS * SLOT, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        slots = {"write": 0, "mmap": 0}
        try:
            while not stop.exists() and time.monotonic() < deadline:
                kind = wrng.choice(("write", "mmap"))
                if slots[kind] >= PAUSE_SLOTS:
                    kind = "mmap" if kind == "write" else "write"
                    if slots[kind] >= PAUSE_SLOTS:
                        break
                off, n, op_seed = slots[kind] * SLOT, wrng.randint(1, SLOT), wrng.getrandbits(63)
                slots[kind] += 1
                content = _slot_bytes(op_seed, n)
                rec: dict = {"kind": kind, "file": f"{kind[0]}{i}.dat", "off": off, "len": n, "seed": op_seed,
                             "start_ns": time.monotonic_ns()}
                if kind == "write":
                    try:
                        os.pwrite(wfd, content, off)
                        rec["written"] = True          # without writeback_cache the reply came after the fence
                        #                                re-check: acknowledged; with it, fsync acknowledges
                        os.fsync(wfd)
                        rec["errno"] = 0
                    except OSError as e:
                        rec.setdefault("written", False)
                        rec["errno"] = e.errno
                else:
                    mm[off:off + n] = content
                    try:
                        mm.flush(off, SLOT)        # msync(MS_SYNC) of the slot: the acknowledgement
                        rec["errno"] = 0
                    except OSError as e:
                        rec["errno"] = e.errno
                rec["end_ns"] = time.monotonic_ns()
                logs[i].append(rec)
                if wrng.random() < 0.3:          # mostly back to back: calls are in flight when the pause lands
                    time.sleep(wrng.uniform(0, 0.002))
        except BaseException as e:      # reported by the main thread
            errors.append(e)
        finally:
            with contextlib.suppress(OSError):   # a fenced mount may refuse the write-back at close
                mm.close()
            for fd in (wfd, mfd):
                with contextlib.suppress(OSError):
                    os.close(fd)

    threads = [threading.Thread(target=body, args=(i, random.Random(rng.getrandbits(64)))) for i in range(workers)]
    for t in threads:
        t.start()
    ready.write_text("ready\n")
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return {"seed": seed, "writeback": writeback, "setup": setup, "ops": [r for log in logs for r in log]}


def acknowledged(rec: dict, writeback: bool) -> bool:
    """Whether the operation was acknowledged: msync's or fsync's return, or (without writeback_cache,
    where write() replies only once the bytes are in the filesystem's memory) write()'s."""
    return rec["errno"] == 0 or (not writeback and bool(rec.get("written")))


def verify_pause(root: Path, log: dict, after_ns: int | None = None) -> tuple[list[str], dict[str, int]]:
    """Differences between a takeover's copy at ROOT and what the pause log allows (see the docstring),
    and counts of the outcomes."""
    problems: list[str] = []
    counts: dict[str, int] = {"acknowledged": 0, "refused": 0}
    by_file: dict[str, list[dict]] = {s["file"]: [] for s in log["setup"]}
    writeback = bool(log.get("writeback"))
    for rec in log["ops"]:
        by_file[rec["file"]].append(rec)
        if acknowledged(rec, writeback):
            counts["acknowledged"] += 1
        else:
            counts["refused"] += 1
            counts[f"errno {errno.errorcode.get(rec['errno'], rec['errno'])}"] = \
                counts.get(f"errno {errno.errorcode.get(rec['errno'], rec['errno'])}", 0) + 1
        if after_ns is not None and rec["start_ns"] > after_ns and acknowledged(rec, writeback):
            problems.append(f"{rec['file']} slot at {rec['off']} ({rec['kind']}) started after the resume and "
                            f"was acknowledged")
    if after_ns is not None:
        counts["started after the resume"] = sum(r["start_ns"] > after_ns for r in log["ops"])
    for setup in log["setup"]:
        name = setup["file"]
        try:
            data = (root / name).read_bytes()
        except OSError as e:
            problems.append(f"missing file {name}: {e}")
            continue
        if name.startswith("m") and len(data) != setup["size"]:
            problems.append(f"{name} is {len(data)} bytes, set up as {setup['size']}")
        used: dict[int, int] = {}       # slot index -> bytes its operation wrote
        for rec in by_file[name]:
            off, n = rec["off"], rec["len"]
            used[off // SLOT] = n
            want = _slot_bytes(rec["seed"], n)
            got = data[off:off + n]
            if acknowledged(rec, writeback):
                if got != want:
                    problems.append(f"{name} slot at {off} ({rec['kind']}, {n} bytes, errno {rec['errno']}) was "
                                    f"acknowledged but differs ({len(got)} bytes there)")
            elif got != want and got.count(0) != len(got) and any(
                    g and g != w for g, w in zip(got, want, strict=False)):
                problems.append(f"{name} slot at {off} ({rec['kind']}) was refused and holds foreign bytes")
        stray = []
        for j in range(-(-len(data) // SLOT)):
            rest = data[j * SLOT + used.get(j, 0):(j + 1) * SLOT]
            if rest.count(0) != len(rest):
                stray.append(j * SLOT)
        if stray:
            problems.append(f"{name}: bytes no operation wrote, in slots at {stray[:5]}")
    return problems, counts


def start_crew(crew: list[Worker], ops: int) -> tuple[list[threading.Thread], list[BaseException]]:
    """One thread per worker, ``ops`` steps each; the list collects their exceptions for the main thread."""
    errors: list[BaseException] = []

    def body(w: Worker) -> None:
        try:
            for _ in range(ops):
                w.step()
        except BaseException as e:     # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=body, args=(w,)) for w in crew]
    for t in threads:
        t.start()
    return threads, errors


def run(root: Path, seed: int, workers: int, ops: int, flushes: int, tail_ops: int,
        self_check: bool = False, tail_big: int = 0, contents: Path | None = None) -> dict:
    rng = random.Random(seed)
    crew = [Worker(root, f"w{i}", random.Random(rng.getrandbits(64))) for i in range(workers)]
    t0 = time.monotonic()
    threads, errors = start_crew(crew, ops)
    generations = []
    for _ in range(flushes):           # baselines while the workers write
        time.sleep(rng.uniform(0.05, 0.3))
        if any(t.is_alive() for t in threads):
            generations.append(request_flush(root))
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    if self_check:
        problems = verify(root, _state(crew))
        if problems:
            raise SystemExit("self-check: the live mount differs from the model:\n" + "\n".join(problems[:20]))
    for _ in range(tail_ops):          # after the last baseline (unless the interval flusher hits)
        rng.choice(crew).step()
    if tail_big:                       # a big dirty set, so that the next flush takes a while
        w = rng.choice(crew)
        path, content = w.new_name(), w.rng.randbytes(tail_big << 20)
        fd = os.open(root / path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            for off in range(0, len(content), 1 << 20):
                os.write(fd, content[off:off + (1 << 20)])
        finally:
            os.close(fd)
        w.files[path] = bytearray(content)
    if contents is not None:
        save_contents(crew, contents)
    return {"seed": seed, **_state(crew), "flush_generations": generations, "seconds": time.monotonic() - t0,
            "done_ns": time.time_ns()}


def save_contents(crew: list[Worker], contents: Path) -> None:
    contents.mkdir(parents=True, exist_ok=True)
    index: dict[str, int] = {}
    for w in crew:
        for path, content in w.files.items():
            index[path] = len(index)
            (contents / f"{index[path]}.bin").write_bytes(content)
    (contents / "index.json").write_text(json.dumps(index))


def resume(root: Path, state: dict, contents: Path, seed: int, ops: int) -> dict:
    """Go on with the saved tree's workers on ``root``, concurrently, ``ops`` operations each."""
    rng = random.Random(seed)
    names = sorted({d.split("/", 1)[0] for d in state["dirs"]})
    crew = [Worker.adopted(root, name, random.Random(rng.getrandbits(64)), state, contents) for name in names]
    t0 = time.monotonic()
    threads, errors = start_crew(crew, ops)
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return {"seed": seed, **_state(crew), "seconds": time.monotonic() - t0}


def _state(crew: list[Worker]) -> dict:
    files: dict[str, dict] = {}
    dirs: list[str] = []
    ops_done: dict[str, int] = {}
    for w in crew:
        for path, content in w.files.items():
            files[path] = {"xxh3": xxhash.xxh3_64_hexdigest(bytes(content)), "size": len(content)}
        dirs += sorted(w.dirs)
        for k, v in w.ops.items():
            ops_done[k] = ops_done.get(k, 0) + v
    return {"files": files, "dirs": sorted(dirs), "ops": ops_done}


def scan(root: Path) -> tuple[dict[str, dict], list[str]]:
    files: dict[str, dict] = {}
    dirs: list[str] = []
    for dirpath, _dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        if rel != ".":
            dirs.append(rel)
        for name in filenames:
            h = xxhash.xxh3_64()
            size = 0
            with open(os.path.join(dirpath, name), "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
                    size += len(chunk)
            files[os.path.normpath(os.path.join(rel, name))] = {"xxh3": h.hexdigest(), "size": size}
    return files, sorted(dirs)


def verify(root: Path, state: dict, ignore: set[str] = frozenset(), exclude: str | None = None) -> list[str]:
    """Differences between ROOT and the expected state, one line each (empty: identical); ``exclude`` is
    a top-level directory left out (another workload's)."""
    files, dirs = scan(root)
    if exclude:
        files = {k: v for k, v in files.items() if k.split("/", 1)[0] != exclude}
        dirs = [d for d in dirs if d.split("/", 1)[0] != exclude]
    want = {k: v for k, v in state["files"].items() if k not in ignore}
    files = {k: v for k, v in files.items() if k not in ignore}
    problems = [f"missing file {p}" for p in sorted(set(want) - set(files))]
    problems += [f"extra file {p} ({files[p]['size']} bytes)" for p in sorted(set(files) - set(want))]
    problems += [f"file {p} differs: {files[p]} != expected {want[p]}"
                 for p in sorted(set(want) & set(files)) if files[p] != want[p]]
    problems += [f"missing directory {d}" for d in sorted(set(state["dirs"]) - set(dirs))]
    problems += [f"extra directory {d}" for d in sorted(set(dirs) - set(state["dirs"]))]
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("root", type=Path)
    r.add_argument("--seed", type=int, required=True)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--workers", type=int, default=3)
    r.add_argument("--ops", type=int, default=150, help="operations per worker")
    r.add_argument("--flushes", type=int, default=3, help="explicit baselines requested during the run")
    r.add_argument("--tail-ops", type=int, default=10, help="operations after the workers joined")
    r.add_argument("--tail-big", type=int, default=0, metavar="MIB",
                   help="end with a file of this many MiB (write() without fsync), to make the next flush long")
    r.add_argument("--self-check", action="store_true",
                   help="verify the mount against the model before the last burst (tells model bugs from "
                        "recovery bugs)")
    r.add_argument("--contents", type=Path, metavar="DIR", help="also save every file's acknowledged bytes here")
    rs = sub.add_parser("resume", help="go on with a saved tree's workers on another mount of it")
    rs.add_argument("root", type=Path)
    rs.add_argument("--contents", type=Path, required=True)
    rs.add_argument("--state", type=Path, required=True)
    rs.add_argument("--seed", type=int, required=True)
    rs.add_argument("--ops", type=int, default=50, help="operations per worker")
    rs.add_argument("--out", type=Path, required=True)
    v = sub.add_parser("verify")
    v.add_argument("root", type=Path)
    v.add_argument("state", type=Path)
    v.add_argument("--exclude", metavar="DIR", help="leave out this top-level directory (another workload's)")
    pr = sub.add_parser("pause", help="writers that keep calls in flight until --stop exists (see above)")
    pr.add_argument("root", type=Path)
    pr.add_argument("--seed", type=int, required=True)
    pr.add_argument("--out", type=Path, required=True)
    pr.add_argument("--workers", type=int, default=3)
    pr.add_argument("--ready", type=Path, required=True, help="created once the writers run")
    pr.add_argument("--stop", type=Path, required=True, help="the writers stop once this file exists")
    pr.add_argument("--writeback", action="store_true",
                    help="ROOT is on a mount with writeback_cache: a returned write() alone is not acknowledged")
    vp = sub.add_parser("verify-pause", help="check a takeover's copy against a pause log")
    vp.add_argument("root", type=Path)
    vp.add_argument("log", type=Path)
    vp.add_argument("--after-ns", type=int, help="every operation started after this CLOCK_MONOTONIC time "
                    "(the resume) must have been refused")
    c = sub.add_parser("ctl", help="send OP (flush, stats) to the rmemfs serving ROOT; print the JSON reply")
    c.add_argument("root", type=Path)
    c.add_argument("op")
    args = p.parse_args(argv)
    if args.cmd == "ctl":
        from rmemfs import control
        path = _control_path(args.root)
        if path is None:
            print(f"{args.root} is not an rmemfs mount", file=sys.stderr)
            return 1
        reply = control.call(path, {"op": args.op}, timeout=60)
        print(json.dumps(reply))
        return 0 if reply.get("ok") else 1
    if args.cmd == "run":
        state = run(args.root, args.seed, args.workers, args.ops, args.flushes, args.tail_ops, args.self_check,
                    args.tail_big, args.contents)
        args.out.write_text(json.dumps(state, indent=1) + "\n")
        print(f"workload seed {args.seed}: {len(state['files'])} files, {len(state['dirs'])} dirs, "
              f"ops {state['ops']}, flushes {state['flush_generations']}, {state['seconds']:.2f} s", flush=True)
        return 0
    if args.cmd == "resume":
        state = resume(args.root, json.loads(args.state.read_text()), args.contents, args.seed, args.ops)
        args.out.write_text(json.dumps(state, indent=1) + "\n")
        print(f"resumed workload seed {args.seed}: {len(state['files'])} files, ops {state['ops']}, "
              f"{state['seconds']:.2f} s", flush=True)
        return 0
    if args.cmd == "pause":
        log = pause_run(args.root, args.seed, args.workers, args.ready, args.stop, writeback=args.writeback)
        args.out.write_text(json.dumps(log) + "\n")
        acked = sum(acknowledged(rec, args.writeback) for rec in log["ops"])
        print(f"pause workload seed {args.seed}: {len(log['ops'])} operations, {acked} acknowledged", flush=True)
        return 0
    if args.cmd == "verify-pause":
        problems, counts = verify_pause(args.root, json.loads(args.log.read_text()), args.after_ns)
        for line in problems:
            print(line)
        print(json.dumps(counts))
        return 1 if problems else 0
    problems = verify(args.root, json.loads(args.state.read_text()), exclude=args.exclude)
    for line in problems:
        print(line)
    if not problems:
        print(f"verified: {args.root} matches {args.state} byte for byte (XXH3)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
