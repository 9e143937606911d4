"""drvmmd: the node daemon (DRVMM).

On a single node nothing needs it: drvs-run creates cells on demand and the
last run tears them down, as podman works without a daemon.  What drvmmd
adds there is housekeeping: it reconciles the node's cells with what is
really running, so cells, cgroups and records left by runs that were killed
(SIGKILL, a crash) are removed.  The fabric (Cap'n Proto RPC between nodes,
membership, placement) grows here.
"""

import argparse
import glob
import json
import logging
import os
import sys

import trio

from .. import config
from ..errors import DrvsError
from ..ns import cell as cells

log = logging.getLogger("drvmmd")


def tidy_once(cfg: config.Config) -> dict:
    """One reconciliation pass; returns what it removed."""
    removed = {"cells": [], "runs": []}
    for vm in cells.cells(cfg):
        with cells.locked(cfg, vm) as lock:
            if cells.release(lock):
                removed["cells"].append(vm)
    for path in sorted(glob.glob(f"{cfg.runs_dir}/*.json")):
        try:
            with open(path) as f:
                os.kill(json.load(f)["monitor"], 0)
        except (OSError, ValueError, KeyError):
            cells._unlink(path)
            removed["runs"].append(os.path.basename(path)[:-5])
    return removed


async def serve(cfg: config.Config, interval: float) -> None:
    with trio.open_signal_receiver(2, 15) as signals:  # SIGINT, SIGTERM
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_tidy_loop, cfg, interval)
            async for _ in signals:
                log.info("stopping")
                nursery.cancel_scope.cancel()
                break


async def _tidy_loop(cfg: config.Config, interval: float) -> None:
    while True:
        removed = await trio.to_thread.run_sync(tidy_once, cfg)
        if removed["cells"] or removed["runs"]:
            log.info("removed %s", removed)
        await trio.sleep(interval)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="drvmmd", description="DRVS node daemon.")
    p.add_argument("--once", action="store_true", help="one housekeeping pass, then exit")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between passes")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="drvmmd: %(message)s")
    if os.geteuid() != 0:
        print("drvmmd: needs root (cells are cgroups and namespaces)", file=sys.stderr)
        return 77
    cfg = config.load()
    try:
        if args.once:
            print(json.dumps(tidy_once(cfg)))
            return 0
        trio.run(serve, cfg, args.interval)
    except DrvsError as e:
        print(f"drvmmd: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
