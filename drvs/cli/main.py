"""drvs: manage DRVS on this node: VMs, programs in them, shells.

    drvs vm create|ls|show|rm ...
    drvs exec [OPTIONS] VM -- CMD [ARGS...]
    drvs login VM [--node NODE]
    drvs runs / logs [-f] RUN / wait RUN / kill RUN (drvs/cli/runs.py)
"""

import argparse
import os
import sys

from .. import __version__
from ..errors import UsageError
from ..vm.model import check_name
from . import fs as fs_cli
from . import ipc as ipc_cli
from . import node as node_cli
from . import proc as proc_cli
from . import runs as runs_cli
from . import vm as vm_cli
from .common import Parser, guarded, require_root
from .options import add_run_options, node_name, run_options, typed
from .run import execute

def parser() -> argparse.ArgumentParser:
    p = Parser(prog="drvs", description="Distributed Resources Virtualization System.",
               epilog="Exit status: 0 done, 2 bad usage, 3 no such VM, node, run or mount, 4 conflict (exists, busy, "
                      "does not fit), 5 store unreadable, 6 etcd unreachable, 7 node (or this node's drvmmd) "
                      "unreachable, 8 join refused, 74 output failed, 77 not root, 125 setup failed; drvs exec "
                      "and login: as drvs-run.")
    p.add_argument("--version", action="version", version=f"drvs {__version__}")
    p.add_argument("--node", default=os.environ.get("DRVS_NODE") or None, metavar="NAME", type=typed(node_name),
                   help="act as node NAME of the local dev cluster (or $DRVS_NODE)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    vm_cli.add_parser(sub)
    node_cli.add_parsers(sub)
    ipc_cli.add_parsers(sub)
    proc_cli.add_parsers(sub)
    fs_cli.add_parsers(sub)

    e = sub.add_parser("exec", help="run a command in a VM (non-login)",
                       usage="%(prog)s [OPTIONS] VM [--] CMD [ARGS...]",
                       description="Run CMD in VM, as drvs-run --vm VM does (the same options).")
    e.add_argument("vm", type=typed(check_name), metavar="VM")
    add_run_options(e, with_vm=False)
    e.set_defaults(func=exec_)

    lg = sub.add_parser("login", help="an interactive login shell in a VM")
    lg.add_argument("vm", type=typed(check_name), metavar="VM")
    lg.add_argument("--shell", default=None, help="shell to start (default: bash, else sh)")
    lg.add_argument("-u", "--user", default=None, metavar="USER[:GROUP]")
    lg.add_argument("--node", dest="run_node", default=None, metavar="NAME", type=typed(node_name),
                    help="log in on node NAME of this node's cluster (as drvs-run --node)")
    lg.set_defaults(func=login)

    runs_cli.add_parsers(sub)
    return p


def exec_(args) -> int:
    usage = "drvs exec [OPTIONS] VM [--] CMD [ARGS...]"
    if args.command and args.command[0].startswith("-") and args.command[0] != "--":
        raise UsageError(f"{args.command[0]} after the VM: options go before it ({usage})")
    if args.command in ([], ["--"]):
        raise UsageError(f"no command given ({usage})")
    return execute(args.vm, run_options(args), "drvs exec", node=args.run_node)


def login(args) -> int:
    if not os.isatty(0):
        raise UsageError("drvs login needs a terminal on stdin; for scripts use: drvs exec VM -- CMD")
    shell = args.shell or ("/bin/bash" if os.path.exists("/bin/bash") else "/bin/sh")
    ns = argparse.Namespace(command=["--", shell, "-l"], user=args.user, env=[], workdir=None, volume=[],
                            tty=True, interactive=True, cpus=None, cpuset_cpus=None, memory=None,
                            pids_limit=None, net="none", cap_add=[], cap_drop=[], detach=False,
                            run_node=args.run_node)
    return execute(args.vm, run_options(ns, login=True), "drvs login", node=args.run_node)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def body():
        require_root("drvs")
        if args.node and args.command != "dev":
            from ..cluster.context import enter_node

            enter_node(args.node)
        return args.func(args)

    return guarded("drvs", body)


if __name__ == "__main__":
    sys.exit(main())

