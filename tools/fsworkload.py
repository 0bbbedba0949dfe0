#!/usr/bin/env python3
"""A seeded file workload for an rmemfs mount, and the check of a recovered copy against it.

    fsworkload.py run    ROOT --seed S --out STATE.json [--workers W] [--ops N] [--flushes F]
    fsworkload.py verify ROOT STATE.json
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

``verify`` walks ROOT (a recovered mount) and compares it with STATE.json byte
for byte via XXH3: missing, extra and different files and directories.
Exit 0 when identical, 1 otherwise (the differences are printed).
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import sys
import threading
import time
from pathlib import Path

import xxhash

PAGE = mmap.PAGESIZE


def _control_path(root: Path) -> str | None:
    try:
        return os.getxattr(root, "user.rmemfs.control").decode()
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

    def __init__(self, root: Path, name: str, rng: random.Random) -> None:
        self.root, self.rng = root, rng
        self.dir = name
        self.files: dict[str, bytearray] = {}
        self.dirs: set[str] = {name}
        self.ops: dict[str, int] = {}
        self.serial = 0
        os.mkdir(root / name)

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


def run(root: Path, seed: int, workers: int, ops: int, flushes: int, tail_ops: int,
        self_check: bool = False, tail_big: int = 0) -> dict:
    rng = random.Random(seed)
    crew = [Worker(root, f"w{i}", random.Random(rng.getrandbits(64))) for i in range(workers)]
    errors: list[BaseException] = []

    def body(w: Worker) -> None:
        try:
            for _ in range(ops):
                w.step()
        except BaseException as e:     # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=body, args=(w,)) for w in crew]
    t0 = time.monotonic()
    for t in threads:
        t.start()
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
    return {"seed": seed, **_state(crew), "flush_generations": generations, "seconds": time.monotonic() - t0,
            "done_ns": time.time_ns()}


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


def verify(root: Path, state: dict, ignore: set[str] = frozenset()) -> list[str]:
    """Differences between ROOT and the expected state, one line each (empty: identical)."""
    files, dirs = scan(root)
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
    v = sub.add_parser("verify")
    v.add_argument("root", type=Path)
    v.add_argument("state", type=Path)
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
                    args.tail_big)
        args.out.write_text(json.dumps(state, indent=1) + "\n")
        print(f"workload seed {args.seed}: {len(state['files'])} files, {len(state['dirs'])} dirs, "
              f"ops {state['ops']}, flushes {state['flush_generations']}, {state['seconds']:.2f} s", flush=True)
        return 0
    problems = verify(args.root, json.loads(args.state.read_text()))
    for line in problems:
        print(line)
    if not problems:
        print(f"verified: {args.root} matches {args.state} byte for byte (XXH3)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
