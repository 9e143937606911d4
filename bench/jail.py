"""Benchmark: starting a program in a DRVS jail, beside its baselines.

    .venv/bin/python bench/jail.py [-n RUNS]

Every figure is measured in the same run as its baselines: bubblewrap
(`bwrap --unshare-all --ro-bind / / /bin/true`), util-linux `unshare` with the
same namespaces, and a plain fork+exec of /bin/true.  Ratios are to bwrap.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def timed(fn, n: int) -> list[float]:
    fn()  # warm caches (page cache, pyc, dentries)
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def command(argv, env=None):
    return lambda: subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL)


def launcher_runs(state: Path, warm: bool):
    """drvs.ns.jail.Run in this process: no interpreter or CLI start-up."""
    os.environ["DRVS_STATE_DIR"] = str(state)
    from drvs import config
    from drvs.ns import jail
    from drvs.store import open_store
    from drvs.vm.registry import VmRegistry

    cfg = config.load()
    vm = VmRegistry(open_store()).get("default")
    keep = None
    if warm:  # a long run keeps the cell, so each measured run only joins it
        keep = jail.Run(cfg, vm, jail.RunOptions(argv=["sleep", "3600"]))
        keep.start()

    def once():
        r = jail.Run(cfg, vm, jail.RunOptions(argv=["/bin/true"]))
        r.start()
        code = r.wait().exit_code
        assert code == 0, code

    def close():
        if keep is not None:
            os.kill(keep.proc.pid, 15)
            keep.wait()

    return once, close


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", "--runs", type=int, default=50)
    args = p.parse_args()
    if os.geteuid() != 0:
        print("bench: needs root", file=sys.stderr)
        return 77
    state = Path(tempfile.mkdtemp(prefix="drvs-bench-"))
    env = {**os.environ, "DRVS_STATE_DIR": str(state)}
    results: dict[str, list[float]] = {}
    try:
        results["fork+exec /bin/true"] = timed(command(["/bin/true"]), args.runs)
        if shutil.which("bwrap"):
            results["bwrap --unshare-all"] = timed(
                command(["bwrap", "--unshare-all", "--ro-bind", "/", "/", "/bin/true"]), args.runs)
        results["unshare (pid,mnt,uts,ipc,net)"] = timed(command(
            ["unshare", "--fork", "--pid", "--mount-proc", "--mount", "--uts", "--ipc", "--net", "/bin/true"]), args.runs)
        results["drvs-run -- /bin/true"] = timed(command([str(BIN / "drvs-run"), "--", "/bin/true"], env), args.runs)
        for warm, name in ((False, "launcher, new cell each run"), (True, "launcher, joining a live cell")):
            once, close = launcher_runs(state, warm)
            try:
                results[name] = timed(once, args.runs)
            finally:
                close()
    finally:
        shutil.rmtree(state, ignore_errors=True)
    base = statistics.median(results.get("bwrap --unshare-all", [float("nan")]))
    print(f"{'case':34} {'median ms':>10} {'p90 ms':>8} {'x bwrap':>8}")
    for name, xs in results.items():
        xs = sorted(xs)
        med = statistics.median(xs)
        print(f"{name:34} {med * 1e3:10.2f} {xs[int(len(xs) * 0.9)] * 1e3:8.2f} {med / base:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
