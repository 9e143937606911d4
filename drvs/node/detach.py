"""`python -m drvs.node.detach`: drvs-run -d on this node for another node's
caller (drvmm's DrvmmCall.detach starts it, in a session of its own).  A
fresh process, as the daemon's threads forbid forking the monitor from it;
and the run's monitor itself, not a fork of it: the daemon is a child
subreaper (drvs/ns/jail.py), so a forked monitor would be its orphan to
reap, where this one is its child, awaited.

The request, a RunRequest as runner.request_dict gives it, comes as JSON on
stdin.  What became of it goes to stdout, then closed: "RUNID ok" once the
program started, "RUNID err CODE WHY" or "err CODE WHY" if it did not."""

import json
import os
import signal
import sys


def main() -> int:
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # (as drvs-run: an inherited "ignore" would reap the keeper)
    report = os.dup(1)  # (fd 1 becomes the run's log)
    try:
        cfg, vm, run = _prepare(json.load(sys.stdin))
    except Exception as e:  # noqa: BLE001 - the daemon must hear of it, in one line
        from ..errors import DrvsError

        code, said = (e.exit_code, str(e)) if isinstance(e, DrvsError) else (70, f"internal error: {e}")
        os.write(report, f"err {code} {said}".encode())
        return code
    from ..cli.run import monitor

    os.write(report, f"{run.id} ".encode())
    monitor(cfg, vm, run, report)


def _prepare(req: dict):
    from .. import config
    from ..cli.options import check_here
    from ..ns import jail
    from ..store import open_store
    from ..vm.registry import VmRegistry
    from .runner import run_options

    cfg = config.load()
    vm = VmRegistry(open_store()).get(req["vm"] or "default")
    opts = run_options(req, detached=True)
    check_here(opts.limits)
    return cfg, vm, jail.Run(cfg, vm, opts)


if __name__ == "__main__":
    sys.exit(main())
