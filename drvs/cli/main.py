"""drvs: manage DRVS on this node: VMs, programs in them, shells.

    drvs vm create|ls|show|rm ...
    drvs exec [OPTIONS] VM -- CMD [ARGS...]
    drvs login VM [--node NODE]
    drvs logs [-f] RUN / drvs wait RUN / drvs kill RUN
"""

import argparse
import json
import os
import re
import select
import signal
import sys
import time

from .. import __version__, config
from ..errors import DrvsError, NotFound, UsageError
from ..ns import jail
from ..vm.model import check_name
from . import fs as fs_cli
from . import ipc as ipc_cli
from . import node as node_cli
from . import proc as proc_cli
from . import vm as vm_cli
from .common import Parser, guarded, require_root
from .options import add_run_options, run_options, typed
from .run import execute, exit_path

FOLLOW_POLL = 0.1  # seconds between looks at a followed log or awaited run
EXIT_GRACE = 15.0  # a run's record gone, its monitor writes how it ended within this (its cell's end may take 5 s)


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="drvs", description="Distributed Resources Virtualization System.")
    p.add_argument("--version", action="version", version=f"drvs {__version__}")
    p.add_argument("--node", default=os.environ.get("DRVS_NODE"), metavar="NAME",
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
    lg.add_argument("--node", dest="run_node", default=None, metavar="NAME",
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


def _run_record(run_id: str) -> dict:
    path = f"{config.load().runs_dir}/{run_id}.json"
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        raise NotFound(f"no such run: {run_id!r}") from None


def _ended(run_id: str) -> dict | None:
    """How a detached run ended ({"code", "note"}), or None while it runs."""
    try:
        with open(exit_path(config.load(), run_id)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _running(run_id: str) -> bool:
    try:
        pidfd = jail.open_run_keeper(_run_record(run_id))
    except NotFound:
        return False
    if pidfd is not None:
        os.close(pidfd)
    return pidfd is not None


def _check_run(run_id: str) -> None:
    if not re.fullmatch(r"[0-9a-f]{12}", run_id):
        raise UsageError(f"invalid run id {run_id!r}: expected the 12 hex digits drvs-run -d printed")


def logs(args) -> int:
    _check_run(args.run)
    path = f"{config.load().runs_dir}/{args.run}.log"
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise NotFound(f"no log of run {args.run!r} on this node (detached runs made here have one)") from None
    with f:
        while True:
            while chunk := f.read(65536):
                sys.stdout.buffer.write(chunk)
            if not args.follow:
                return 0
            ended = _ended(args.run) is not None or not _running(args.run)
            if ended:  # (what the program wrote before it ended is all in the file by now)
                while chunk := f.read(65536):
                    sys.stdout.buffer.write(chunk)
                return 0
            sys.stdout.flush()
            time.sleep(FOLLOW_POLL)


def _monitor(run_id: str) -> int | None:
    """A pidfd on the process that watches a detached run and records its
    end (its record names it while the run lasts), or None."""
    try:
        return os.pidfd_open(_run_record(run_id)["monitor"])
    except (NotFound, KeyError, ProcessLookupError):
        return None


def wait(args) -> int:
    _check_run(args.run)
    log = f"{config.load().runs_dir}/{args.run}.log"
    monitor, since = None, time.monotonic()
    try:
        while True:
            end = _ended(args.run)
            if end is not None:
                print(end["code"])
                if end.get("note"):
                    print(f"drvs: run {args.run}: {end['note']}", file=sys.stderr)
                return 0
            if monitor is None:
                monitor = _monitor(args.run)
            if monitor is not None:
                if select.select([monitor], [], [], FOLLOW_POLL)[0] and _ended(args.run) is None:
                    raise DrvsError(f"run {args.run!r} ended and left no exit status (its monitor was killed)")
                continue
            if not os.path.exists(log):
                raise NotFound(f"no such run: {args.run!r} on this node (detached runs made here)")
            if time.monotonic() - since > EXIT_GRACE:  # (no monitor named, none writing: it is gone)
                raise DrvsError(f"run {args.run!r} ended and left no exit status (its monitor was killed)")
            time.sleep(FOLLOW_POLL)
    finally:
        if monitor is not None:
            os.close(monitor)


def kill(args) -> int:
    name = args.signal.upper().removeprefix("SIG")
    try:
        signum = int(name) if name.isdigit() else signal.Signals["SIG" + name].value
    except KeyError:
        raise UsageError(f"unknown signal {args.signal!r}") from None
    if not 0 <= signum <= signal.SIGRTMAX:
        raise UsageError(f"unknown signal {args.signal!r} (signals are 0 to {int(signal.SIGRTMAX)})")
    _check_run(args.run)
    try:
        rec = _run_record(args.run)
    except NotFound:
        end = _ended(args.run)
        if end is None:
            raise
        raise NotFound(f"run {args.run!r} has ended (exit status {end['code']})") from None
    if signum == signal.SIGKILL:
        # The keeper cannot pass SIGKILL on; its own "end the run" signal
        # kills the program and whatever it left.
        signum = jail.END_RUN_SIGNAL
    pidfd = jail.open_run_keeper(rec)
    if pidfd is None:
        end = _ended(args.run)
        raise NotFound(f"run {args.run!r} has ended" + (f" (exit status {end['code']})" if end else ""))
    try:
        signal.pidfd_send_signal(pidfd, signum)
    except ProcessLookupError:
        raise NotFound(f"run {args.run!r} has ended") from None
    finally:
        os.close(pidfd)
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

