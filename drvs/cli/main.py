"""drvs: manage DRVS on this node: VMs, programs in them, shells.

    drvs vm create|ls|show|rm ...
    drvs exec [OPTIONS] VM -- CMD [ARGS...]
    drvs login VM [--node NODE]
    drvs logs [-f] RUN / drvs wait RUN / drvs kill RUN
"""

import argparse
import errno
import os
import select
import sys
import time

from .. import __version__, config
from ..errors import NotFound, UsageError
from ..node import runs
from ..vm.model import check_name
from . import fs as fs_cli
from . import ipc as ipc_cli
from . import node as node_cli
from . import proc as proc_cli
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

    lo = sub.add_parser("logs", help="output of a detached run")
    lo.add_argument("run", metavar="RUN")
    lo.add_argument("-f", "--follow", action="store_true", help="go on printing until the run ends")
    lo.set_defaults(func=logs)

    w = sub.add_parser("wait", help="wait until a detached run ends; print its exit status")
    w.add_argument("run", metavar="RUN")
    w.set_defaults(func=wait)

    k = sub.add_parser("kill", help="send a signal to a run")
    k.add_argument("run", metavar="RUN")
    k.add_argument("-s", "--signal", default="TERM")
    k.set_defaults(func=kill)
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


def _where(cfg, run_id: str) -> str | None:
    """The node that has the run: None for this one; else the first other
    Ready node of the cluster that says it has it (runs are kept on the
    node they ran on: drvs-run -d there, or from another node)."""
    runs.check_id(run_id)
    if runs.known(cfg, run_id):
        return None
    from ..cluster.context import cluster_info
    from ..ipc.message import IpcError

    info = cluster_info(cfg)
    if info is None:
        raise NotFound(f"no such run: {run_id!r}")
    from ..ipc.client import socket_path

    if not os.path.exists(socket_path(cfg.state_dir)):  # (not the nodes' silence: this one's)
        raise IpcError(f"no such run here, and drvmmd is not running on this node to ask the others "
                       f"(no {socket_path(cfg.state_dir)})", errno.ENOENT)
    silent = []
    for node, ready in _other_nodes(info):
        if not ready:
            silent.append(f"{node} (NotReady)")
            continue
        try:
            _ask_log(cfg, node, run_id, 0, 0, 0)
            return node
        except NotFound:
            continue
        except IpcError:
            silent.append(node)
    if silent:  # (a run lives on while its node's drvmmd is away: not "no such run")
        raise IpcError(f"run {run_id!r} is on none of the nodes that answered; {', '.join(silent)} did not, "
                       "and it may be there", errno.EHOSTUNREACH)
    raise NotFound(f"no such run: {run_id!r} on any node")


def _other_nodes(info: dict) -> list[tuple[str, bool]]:
    """The cluster's other nodes, and whether each is Ready."""
    from .node import cluster_nodes

    return [(n["name"], n["status"] != "NotReady") for n in cluster_nodes() if n["name"] != info["node"]]


def _ask(cfg, node: str, call, timeout: float, **query):
    """A run's message to node's drvmm; the reply's payload."""
    from ..ipc import client
    from ..ipc.message import IpcError, Msg, check
    from ..ipc.schema import drvmm

    target = f"drvmm@{node}"
    payload = drvmm.RunQuery.new_message(**query).to_bytes_packed()
    try:
        return check(client.sendrec(cfg.state_dir, target, Msg(call, payload), timeout=timeout), target).payload
    except IpcError as e:
        if e.errno == errno.ESRCH:  # (the node's answer: no such run there)
            raise NotFound(str(e).removeprefix(f"{target}: ") + f" (on node {node})") from None
        raise


def _ask_log(cfg, node: str, run_id: str, offset: int, size: int, wait: float):
    from ..ipc.schema import drvmm

    payload = _ask(cfg, node, drvmm.DrvmmCall.runLog, wait + 10, run=run_id, offset=offset, maxBytes=size,
                   waitMs=int(wait * 1000))
    return drvmm.RunLog.from_bytes_packed(payload)


def logs(args) -> int:
    cfg = config.load()
    node = _where(cfg, args.run)
    if node is not None:
        return _remote_logs(cfg, node, args.run, args.follow)
    try:
        f = open(runs.log_path(cfg, args.run), "rb")
    except FileNotFoundError:
        raise NotFound(f"no log of run {args.run!r} (detached runs have one)") from None
    with f:
        while True:
            while chunk := f.read(65536):
                sys.stdout.buffer.write(chunk)
            if not args.follow:
                return 0
            ended = runs.ended(cfg, args.run) is not None or not runs.running(cfg, args.run)
            if ended:  # (what the program wrote before it ended is all in the file by now)
                while chunk := f.read(65536):
                    sys.stdout.buffer.write(chunk)
                return 0
            sys.stdout.flush()
            time.sleep(runs.FOLLOW_POLL)


def _ask_again(cfg, node: str, run_id: str, offset: int, size: int, wait: float):
    """_ask_log for a detached run found there before: one whose files went
    meanwhile went with its VM."""
    try:
        r = _ask_log(cfg, node, run_id, offset, size, wait)
    except NotFound:
        raise runs.vanished(run_id) from None
    if not r.detached:
        raise runs.vanished(run_id)
    return r


def _remote_logs(cfg, node: str, run_id: str, follow: bool) -> int:
    offset, gone_since = 0, None
    r = _ask_log(cfg, node, run_id, 0, 0, 0)
    if not r.detached:
        raise NotFound(f"run {run_id!r} of node {node} has no log (detached runs have one)")
    while True:
        r = _ask_again(cfg, node, run_id, offset, runs.LOG_CHUNK, 2.0 if follow else 0)
        data = bytes(r.data)
        sys.stdout.buffer.write(data)
        offset += len(data)
        if data:
            sys.stdout.flush()
            continue
        if not follow or r.ended:
            return 0
        gone_since = _still_watched(run_id, r.gone, gone_since)


def _still_watched(run_id: str, gone: bool, since: float | None) -> float | None:
    """Since when a run of another node has had nothing watching it; its
    monitor was killed once that lasts EXIT_GRACE."""
    if not gone:
        return None
    since = since or time.monotonic()
    if time.monotonic() - since > runs.EXIT_GRACE:
        raise runs.lost(run_id)
    return since


def wait(args) -> int:
    cfg = config.load()
    node = _where(cfg, args.run)
    if node is not None:
        if not _ask_log(cfg, node, args.run, 0, 0, 0).detached:
            raise NotFound(f"run {args.run!r} of node {node} was not detached: only detached runs can be waited for")
        gone_since = None
        while not (r := _ask_again(cfg, node, args.run, 0, 0, 5.0)).ended:
            gone_since = _still_watched(args.run, r.gone, gone_since)
        return _print_end(args.run, r.exitCode, r.note)
    log = runs.log_path(cfg, args.run)
    monitor, since = None, time.monotonic()
    try:
        while True:
            end = runs.ended(cfg, args.run)
            if end is not None:
                return _print_end(args.run, end["code"], end.get("note"))
            if monitor is None:
                monitor = runs.monitor(cfg, args.run)
            if monitor is not None:
                if select.select([monitor], [], [], runs.FOLLOW_POLL)[0] and runs.ended(cfg, args.run) is None:
                    raise runs.vanished(args.run) if not os.path.exists(log) else runs.lost(args.run)
                continue
            if not os.path.exists(log):
                raise NotFound(f"run {args.run!r} was not detached: only detached runs can be waited for")
            if time.monotonic() - since > runs.EXIT_GRACE:  # (no monitor named, none writing: it is gone)
                raise runs.lost(args.run)
            time.sleep(runs.FOLLOW_POLL)
    finally:
        if monitor is not None:
            os.close(monitor)


def _print_end(run_id: str, code: int, note: str | None) -> int:
    print(code)
    if note:
        print(f"drvs: run {run_id}: {note}", file=sys.stderr)
    return 0


def kill(args) -> int:
    signum = runs.parse_signal(args.signal)
    cfg = config.load()
    node = _where(cfg, args.run)
    if node is None:
        runs.send_signal(cfg, args.run, signum)
    else:
        from ..ipc.schema import drvmm

        _ask(cfg, node, drvmm.DrvmmCall.runSignal, 10, run=args.run, signal=signum)
    return 0


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

