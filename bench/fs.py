"""Benchmark: the DRVM file system beside tmpfs and a minimal in-memory
pyfuse3 file system, all measured in one run.

    .venv/bin/python bench/fs.py [--size-mib 64] [--files 1000]

Brings up a 2-node dev cluster and measures, from the host, through each
node's DVOS view:
  (a)  fs@VM served on the same node as the client (one replica)
  (a2) the same with two replicas (every change also streamed to n2)
  (b)  fs@VM served on the other node
  (c)  tmpfs
  (d)  bench/progs/memfs.py: FUSE and Python alone
  (e)  the stores' own disk, used directly (what the server's system calls cost)
The cluster's state, and so the stores and (e), is on a fresh ext4 file
system (a loop device), see fresh_disk().
Each case runs --runs times, the cases taking turns (the median is shown).  Figures: sequential write and read (1 MiB records; the read after the
file's pages were dropped), the cached re-read (the median of three passes), random 4 KiB reads (pages
dropped; then again once the kernel also forgot the file, whose pages a
DRVS node keeps on its disk, drvs/fs/cache.py; last, first reads of a file
just rewritten, which no cache of the client's node holds), small files created+written+closed, stat'ed (cached) and
unlinked per second, and `tar x` of this repository's sources.  Ratios:
(a)/(d), (b)/(d), and for the cached figures (a)/tmpfs.  Last, files made
per second on n1 in a directory n2 listed once, beside one n2 never
looked into (the best of two of each); `rm -rf` of --files files made on
one node and removed through the same or the other (the median of three,
beside memfs); and four `tar x` at once on the
2-replica VM, two through each node, beside four at once on memfs (the
machine busy: the median of five rounds)."""

import argparse
import io
import json
import os
import random
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BIN = Path(sys.executable).parent


def seq_write(d: Path, size_mib: int) -> float:
    block = os.urandom(1 << 20)
    t = time.perf_counter()
    fd = os.open(d / "seq", os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    for _ in range(size_mib):
        os.write(fd, block)
    os.close(fd)
    return size_mib / (time.perf_counter() - t)


def _drop(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)


def seq_read(d: Path, size_mib: int, cold: bool) -> float:
    if cold:
        _drop(d / "seq")
    t = time.perf_counter()
    fd = os.open(d / "seq", os.O_RDONLY)
    n = 0
    while chunk := os.read(fd, 1 << 20):
        n += len(chunk)
    os.close(fd)
    assert n == size_mib << 20
    return size_mib / (time.perf_counter() - t)


def _forget() -> None:
    """Make the kernel forget unused inodes: a FUSE file system hears of it
    (FORGET); a DRVS node keeps what its own disk cache holds of them, for
    an open of the same data version."""
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2")
    time.sleep(0.5)  # (the kernel's FORGETs reach the daemons)


def rand_read(d: Path, size_mib: int, n: int = 2000, forget: bool = False) -> float:
    _drop(d / "seq")
    if forget:
        _forget()
    else:
        time.sleep(0.5)  # as _forget() does: right after a busy pass, memfs measured 3x slower
    rng = random.Random(1)
    fd = os.open(d / "seq", os.O_RDONLY)
    offsets = [rng.randrange(0, (size_mib << 20) // 4096) * 4096 for _ in range(n)]
    t = time.perf_counter()
    for off in offsets:
        os.pread(fd, 4096, off)
    os.close(fd)
    return n / (time.perf_counter() - t)


def small_files(d: Path, n: int) -> dict:
    """By name in the directory (dir_fd), as the cases' mounts lie at
    different depths: a path from / would add their walk to each figure (a
    cached stat is ~3 µs; the dev cluster's view is 6 components deeper
    than tmpfs)."""
    sub = d / "small"
    sub.mkdir()
    dfd = os.open(sub, os.O_RDONLY | os.O_DIRECTORY)
    names = [f"f{i}" for i in range(n)]
    data = b"x" * 4096
    try:
        t = time.perf_counter()
        for name in names:
            fd = os.open(name, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644, dir_fd=dfd)
            os.write(fd, data)
            os.close(fd)
        create = n / (time.perf_counter() - t)
        for name in names:
            os.stat(name, dir_fd=dfd)  # the kernel now caches each (attributes were dropped by the write)
        t = time.perf_counter()
        for _ in range(5):
            for name in names:
                os.stat(name, dir_fd=dfd)
        stat = 5 * n / (time.perf_counter() - t)
        t = time.perf_counter()
        for name in names:
            os.unlink(name, dir_fd=dfd)
        unlink = n / (time.perf_counter() - t)
    finally:
        os.close(dfd)
    return {"create": create, "stat": stat, "unlink": unlink}


def source_tar() -> tuple[bytes, int]:
    buf = io.BytesIO()
    count = 0
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for top in ("drvs", "ext", "tests", "bench"):
            for path in sorted((REPO / top).rglob("*")):
                if "__pycache__" in path.parts or path.suffix in (".so", ".pyc"):
                    continue
                tar.add(path, arcname=str(path.relative_to(REPO)), recursive=False)
                count += 1
    return buf.getvalue(), count


def shared_creates(here: Path, there: Path, n: int) -> dict:
    """Files made (create+close) per second on one node, in a directory
    another node listed once before, beside one it never looked into: the
    server tells that node of the first name made there, not of every one."""
    out = {}
    for case, looked in (("never looked", False), ("listed once", True), ("never looked", False),
                         ("listed once", True)):
        name = f"shared-{case.replace(' ', '-')}-{len(out)}-{time.monotonic_ns()}"
        (here / name).mkdir()
        if looked:
            os.listdir(there / name)
        dfd = os.open(here / name, os.O_RDONLY | os.O_DIRECTORY)
        try:
            t = time.perf_counter()
            for i in range(n):
                os.close(os.open(f"f{i}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644, dir_fd=dfd))
            out.setdefault(case, []).append(n / (time.perf_counter() - t))
        finally:
            os.close(dfd)
    return {case: max(rates) for case, rates in out.items()}


def rm_rf(made: Path, removed: Path, n: int) -> float:
    """Seconds `rm -rf` takes, through the view `removed`, of a directory of
    n files made through the view `made` (the same node's, or another's:
    then every unlink is also told to the node that made, and caches, them)."""
    name = f"rmrf-{time.monotonic_ns()}"
    (made / name).mkdir()
    dfd = os.open(made / name, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(n):
            os.close(os.open(f"f{i}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644, dir_fd=dfd))
    finally:
        os.close(dfd)
    t = time.perf_counter()
    subprocess.run(["rm", "-rf", str(removed / name)], check=True)
    return time.perf_counter() - t


def concurrent_tars(bases: list, tarball: Path, rounds: int = 5) -> float:
    """Median wall time of len(bases) `tar x` run at once, one into each
    base (views of one VM through different nodes, or memfs): how the file
    system shares a busy machine, which one client at a time does not show."""
    times = []
    for r in range(rounds):
        procs, t = [], time.perf_counter()
        for i, base in enumerate(bases):
            target = base / f"conc-{r}-{i}-{time.monotonic_ns()}"
            target.mkdir()
            procs.append(subprocess.Popen(["tar", "-C", str(target), "-xf", str(tarball)]))
        if any(p.wait() for p in procs):
            raise SystemExit("bench: a concurrent tar x failed")
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def tar_x(d: Path, tarball: Path) -> float:
    target = d / "tree"
    target.mkdir()
    t = time.perf_counter()
    subprocess.run(["tar", "-C", str(target), "-xf", str(tarball)], check=True)
    return time.perf_counter() - t


def measure(d: Path, size_mib: int, files: int, tarball: Path) -> dict:
    r = {"write MB/s": seq_write(d, size_mib)}
    r["read MB/s"] = seq_read(d, size_mib, cold=True)
    # The median of three: the first re-read after the cold read is also the kernel moving each
    # page to its active list (its second touch: 6.5-7.8 GB/s through a FUSE mount here, later
    # passes 9.3-12.5 GB/s), which tmpfs, whose pages the cold read did not drop, pays elsewhere.
    r["re-read MB/s (cached)"] = statistics.median(seq_read(d, size_mib, cold=False) for _ in range(3))
    r["random 4K reads/s"] = rand_read(d, size_mib)
    r["random 4K, forgot/s"] = rand_read(d, size_mib, forget=True)
    small = small_files(d, files)
    r["create+write+close/s"] = small["create"]
    r["stat/s (cached)"] = small["stat"]
    r["unlink/s"] = small["unlink"]
    r["tar x s"] = tar_x(d, tarball)
    seq_write(d, size_mib)  # (a write on a node drops what it cached of the file)
    r["random 4K, uncached/s"] = rand_read(d, size_mib)
    os.unlink(d / "seq")
    return r


def fresh_disk(work: Path, state: Path) -> bool:
    """Put the cluster's state (the nodes' stores, and case (e)) on a fresh
    ext4 file system with a journal, as a server's disk would be.  This
    machine's root is ext4 without a journal, where the kernel skips the
    inodes deleted in the last 1-6 minutes when it allocates one
    (recently_deleted(), ext4/ialloc.c): after a few thousand files made and
    removed, every create scanned them, 5 -> 200+ us, and the figures of
    each case depended on what the cases before it had deleted."""
    image = work / "disk.img"
    try:
        subprocess.run(["truncate", "-s", "6G", str(image)], check=True)
        subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
        subprocess.run(["mount", "-o", "loop", str(image), str(state)], check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        print(f"bench: no fresh ext4 for the stores ({e}); using {state} as it is", file=sys.stderr)
        image.unlink(missing_ok=True)
        return False
    return True


def _wait_dir(path: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.is_dir():
        if time.monotonic() > deadline:
            raise SystemExit(f"{path}: not served")
        time.sleep(0.1)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--size-mib", type=int, default=64)
    p.add_argument("--files", type=int, default=1000)
    p.add_argument("--runs", type=int, default=3, help="runs per case; the median is shown")
    args = p.parse_args()
    sys.path.insert(0, str(REPO))
    from drvs.dev import cluster as dev

    work = Path(tempfile.mkdtemp(prefix="drvs-bench-fs-"))
    tar_bytes, tar_files = source_tar()
    tarball = work / "src.tar"
    tarball.write_bytes(tar_bytes)
    state = work / "state"
    state.mkdir()
    mounted = fresh_disk(work, state)
    env = {**os.environ, "DRVS_STATE_DIR": str(state), "DRVS_NODE": "n1"}
    memfs = tmpfs = None
    try:
        info = dev.up(str(state), 2, None, dev.new_name())
        for vm, replicas in (("one", "1"), ("two", "2")):
            subprocess.run([str(BIN / "drvs"), "vm", "create", vm, "--node", "n1", "--node", "n2",
                            "--fs-replicas", replicas], env=env, check=True, capture_output=True)
        views = {n["name"]: Path(n["state_dir"]) / "dvos" / "fs" for n in info["nodes"]}
        for path in (views["n1"] / "one", views["n2"] / "one", views["n1"] / "two"):
            _wait_dir(path)
        time.sleep(2)  # the second replica copied to
        tmpfs = work / "tmpfs"
        tmpfs.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "drvs-bench", str(tmpfs)], check=True)
        mem = work / "memfs"
        mem.mkdir()
        memfs = subprocess.Popen([sys.executable, str(HERE / "progs" / "memfs.py"), str(mem)])
        deadline = time.monotonic() + 10
        while not os.path.ismount(mem):
            assert time.monotonic() < deadline and memfs.poll() is None, "memfs did not mount"
            time.sleep(0.05)
        disk = state / "disk"
        disk.mkdir()
        cases = {"(a) same node": views["n1"] / "one", "(a2) 2 replicas": views["n1"] / "two",
                 "(b) other node": views["n2"] / "one", "(c) tmpfs": tmpfs, "(d) memfs": mem, "(e) disk": disk}
        runs = {label: [] for label in cases}
        for i in range(args.runs):  # the cases take turns: this machine's speed drifts within minutes
            for label, base in cases.items():
                d = base / f"run-{label[1:3].strip(')')}-{i}"
                d.mkdir()
                runs[label].append(measure(d, args.size_mib, args.files, tarball))
        results = {label: {f: statistics.median(r[f] for r in rs) for f in rs[0]} for label, rs in runs.items()}
        shared = shared_creates(views["n1"] / "one", views["n2"] / "one", args.files // 2)
        one = {n: views[n] / "one" for n in ("n1", "n2")}  # (served on n1)
        rmrf = {case: statistics.median(rm_rf(a, b, args.files) for _ in range(3))
                for case, (a, b) in {"memfs": (mem, mem), "made on n1, removed on n1": (one["n1"], one["n1"]),
                                     "made on n1, removed on n2": (one["n1"], one["n2"]),
                                     "made on n2, removed on n1": (one["n2"], one["n1"])}.items()}
        conc = {"drvs": concurrent_tars([views["n1"] / "two", views["n2"] / "two"] * 2, tarball),
                "memfs": concurrent_tars([mem] * 4, tarball)}
    finally:
        if memfs is not None:
            memfs.terminate()
            memfs.wait(timeout=10)
        if tmpfs is not None and os.path.ismount(tmpfs):
            subprocess.run(["umount", str(tmpfs)])
        try:
            if os.path.exists(state / "dev-cluster.json"):
                dev.down(str(state))
        finally:
            if mounted:
                subprocess.run(["umount", str(state)])
            subprocess.run(["rm", "-rf", str(work)])
    report(results, args, tar_files)
    print(f"creates/s on n1 (its server there), in a directory n2 listed once: {shared['listed once']:.0f}; "
          f"where n2 never looked: {shared['never looked']:.0f}; "
          f"ratio {shared['listed once'] / shared['never looked']:.2f}")
    print(f"rm -rf of {args.files} files (server on n1), s: " + ", ".join(f"{case} {t:.3f}" for case, t in rmrf.items())
          + "; ratios to memfs: " + ", ".join(f"{rmrf['memfs'] / t:.2f}" for case, t in rmrf.items() if case != "memfs"))
    print(f"4 x tar x at once, on the 2-replica VM through n1 and n2 (two each): {conc['drvs']:.3f} s; "
          f"on memfs: {conc['memfs']:.3f} s; ratio {conc['memfs'] / conc['drvs']:.2f}")
    return 0


def report(results: dict, args, tar_files: int) -> None:
    import platform

    labels = list(results)
    figures = list(results[labels[0]])
    print(f"# bench/fs.py  {time.strftime('%Y-%m-%d')}  {platform.node()}  {os.cpu_count()} CPUs  "
          f"kernel {platform.release()}  {args.size_mib} MiB file, {args.files} small files, "
          f"tar of {tar_files} entries")
    head = f"{'figure':24}" + "".join(f"{l:>16}" for l in labels) + f"{'a/d':>7}{'b/d':>7}{'a/tmpfs':>8}{'a/e':>7}"
    print(head)
    a, b, c, dd, e = (results[l] for l in ("(a) same node", "(b) other node", "(c) tmpfs", "(d) memfs", "(e) disk"))
    for f in figures:
        lower_better = f.endswith(" s")
        ratio = (lambda x, y: y / x) if lower_better else (lambda x, y: x / y)
        row = f"{f:24}" + "".join(f"{results[l][f]:16.{3 if lower_better else 1}f}" for l in labels)
        row += f"{ratio(a[f], dd[f]):7.2f}{ratio(b[f], dd[f]):7.2f}{ratio(a[f], c[f]):8.2f}{ratio(a[f], e[f]):7.2f}"
        print(row)
    print("(ratios: as fast as the baseline = 1.00; higher is better)")
    print(json.dumps(results))


if __name__ == "__main__":
    sys.exit(main())
