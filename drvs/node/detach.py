"""`python -m drvs.node.detach`: drvs-run -d on this node for another node's
caller (drvmm's DrvmmCall.detach runs it: a fresh process, as the run's
monitor is forked from it and the daemon's threads must not be).  The
request, a RunRequest as runner.request_dict gives it, comes as JSON on
stdin; the run's id goes to stdout, or drvs-run's one line to stderr with
its exit status."""

import json
import signal
import sys


def main() -> int:
    from ..cli.common import guarded
    from ..cli.options import check_here
    from ..cli.run import detach
    from .. import config
    from ..store import open_store
    from ..vm.registry import VmRegistry
    from .runner import run_options

    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # (as drvs-run: an inherited "ignore" would reap the keeper)

    def body():
        req = json.load(sys.stdin)
        cfg = config.load()
        vm = VmRegistry(open_store()).get(req["vm"] or "default")
        opts = run_options(req, detached=True)
        check_here(opts.limits)
        return detach(cfg, vm, opts)

    return guarded("drvs-run", body)


if __name__ == "__main__":
    sys.exit(main())
