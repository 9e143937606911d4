"""drvs-run: run an unmodified program in a DRVM's jail on this node.

Exit status: the program's own (128+N when killed by signal N); 2 bad usage,
3 unknown VM, 77 not root, 125 the jail could not be set up, 126 the command
is not executable, 127 the command was not found; 137 with an "out of memory"
line when the cell's memory limit killed it.
"""

import argparse
import json
import os
import signal
import sys
import time
from typing import NoReturn

from .. import config
from ..cluster.context import cluster_info, dev_cluster_here, no_cluster
from ..errors import DrvsError, EtcdUnavailable, NotFound, UsageError
from ..node.runs import exit_path
from ..ns import jail
from ..store import open_store
from ..vm.model import VmSpec
from ..vm.registry import VMS, VmRegistry
from .common import Parser, age, guarded, require_root
from .options import add_run_options, check_here, run_options


def parser(prog: str = "drvs-run") -> argparse.ArgumentParser:
    p = Parser(
        prog=prog, description="Run a program in a DRVM jail on this node.",
        epilog="Exit status: the program's (128+N: killed by signal N; 137 with \"out of memory\": "
               "its memory limit), or 2 bad usage, 3 no such VM or node, 5 store unreadable, "
               "6 etcd unreachable, 7 node (or this node's drvmmd) unreachable, 77 not root, 125 the jail could not be set up, "
               "126 not executable, 127 not found.")
    add_run_options(p)
    return p


def execute(vm_name: str, opts: jail.RunOptions, prog: str, node: str | None = None) -> int:
    cfg = config.load()
    single = cluster_info(cfg) is None
    if node and single:
        raise no_cluster(cfg, f"--node {node} names a node of one")
    store = open_store()
    try:
        vm = VmRegistry(store).get(vm_name)
    except NotFound as e:
        if single and dev_cluster_here(cfg):  # (a cluster VM, asked of the host the dev cluster runs on)
            raise NotFound(f"{e}; {no_cluster(cfg)}") from None
        raise
    except EtcdUnavailable as e:
        vm = _as_last_read(cfg, vm_name, node, e)
        store = None
    if node and store is not None:  # (etcd away: only this node's own share, as last read, runs)
        _known_node(node)
        if vm.shares and node not in vm.shares:  # (the VM's programs run on its nodes only)
            raise NotFound(f"VM {vm_name!r} has no share of node {node!r} (its nodes: "
                           f"{', '.join(sorted(vm.shares))}; see `drvs vm show {vm_name}`)")
        return _remote(cfg, node, vm_name, opts, prog)
    elif vm.shares and store is not None:
        from ..cluster.context import local_node
        from ..vm.placement import choose_node

        there = choose_node(store, vm, local_node(cfg))
        if there is not None:
            return _remote(cfg, there, vm_name, opts, prog)
    check_here(opts.limits)  # (the run is this node's: its limits must fit this machine)
    current = None if store is None else lambda: VmRegistry(store).get(vm.name)  # (read again under the cell lock)
    if opts.detached:
        return detach(cfg, vm, opts, current)
    result = jail.run(cfg, vm, opts, current)
    note = jail.explain(result) or (store is not None and _removed_meanwhile(store, vm.name, result.exit_code))
    if note:
        print(f"{prog}: {note}", file=sys.stderr)
    return result.exit_code


def _as_last_read(cfg, vm_name: str, node: str | None, away: EtcdUnavailable) -> VmSpec:
    """While etcd is away, a VM with a share of this node is run here as
    this node's reconciler last read it (said on stderr); anything else
    needs etcd (away, exit 6)."""
    from ..cluster.context import local_node
    from ..node.reconcile import last_read_path

    here = local_node(cfg)
    try:
        with open(last_read_path(cfg)) as f:
            last = json.load(f)
        vm, read_at = VmSpec.from_json(last["vms"][vm_name]), float(last["at"])
    except (OSError, ValueError, KeyError, TypeError):  # (none written, or not as written: etcd's word it is)
        raise away from None
    if here is None or here not in vm.shares or (node and node != here):
        raise away
    print(f"drvs-run: {away}; VM {vm_name!r} runs here as this node last read it, {age(read_at)} ago",
          file=sys.stderr)
    return vm


def _removed_meanwhile(store, vm_name: str, code: int) -> str | None:
    """Why a program was killed that the user did not kill: its VM was
    removed (drvs vm rm --force) while it ran."""
    try:
        if code != 128 + signal.SIGKILL or store.get(VMS + vm_name) is not None:
            return None
    except DrvsError:
        return None  # (the store away: nothing to add, the program's own status stands)
    return f"VM {vm_name!r} was removed while this ran (drvs vm rm --force): its programs were ended"


def _known_node(node: str) -> None:
    """A node the user named is one of the cluster's (NotFound, 3, as for
    any name that names nothing; one that is NotReady is the fabric's 7)."""
    from ..cluster.membership import spec_key

    if open_store().get(spec_key(node)) is None:
        raise NotFound(f"no such node: {node!r} (see `drvs node ls`)")


def _remote(cfg, node: str, vm_name: str, opts: jail.RunOptions, prog: str) -> int:
    from ..ipc import remote

    if opts.binds:
        raise UsageError(f"-v binds a path of this host; the program runs on node {node} "
                         "(run drvs-run -v on that node)")
    if opts.detached:  # (its log and monitor are that node's; drvs logs, wait and kill find it there)
        print(remote.detach(cfg.state_dir, node, vm_name, opts))
        return 0
    code, message = remote.run(cfg.state_dir, node, vm_name, opts)
    message = message or _removed_meanwhile(open_store(), vm_name, code)
    if message:
        print(f"{prog}: {message}", file=sys.stderr)
    return code


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def detach(cfg, vm, opts: jail.RunOptions, current=None) -> int:
    """Start the run in a background monitor; print its id once it has started.

    The monitor (a forked copy of this process in its own session) keeps the
    run's cleanup duties; the program's output goes to the run's log.
    current: as jail.Run's."""
    r = jail.Run(cfg, vm, opts, current=current)
    rd, wr = os.pipe()
    if os.fork() != 0:
        os.close(wr)
        reply = os.read(rd, 4096)
        os.close(rd)
        print(started_id(reply, r.id))
        return 0
    os.close(rd)
    os.setsid()
    if os.fork() != 0:
        os._exit(0)  # the monitor is reparented and outlives nobody's terminal
    monitor(cfg, vm, r, wr)


def started_id(reply: bytes, run_id: str) -> str:
    """The run's id, from what its monitor said about its start (DrvsError:
    why it did not start)."""
    status, _, rest = reply.decode(errors="replace").partition(" ")
    if status == "ok":
        return run_id
    code, _, message = rest.partition(" ")
    if not code.isdigit():
        raise DrvsError("the background monitor died before the run started")
    err = DrvsError(message)
    err.exit_code = int(code)
    raise err


def monitor(cfg, vm, r: jail.Run, report: int) -> NoReturn:
    """Be the run's monitor: start it with its output to its log, say "ok"
    or "err CODE WHY" on the fd `report` (then closed), wait for its end,
    record that, and exit with its status."""
    os.chdir("/")
    os.makedirs(cfg.runs_dir, exist_ok=True)
    log = f"{cfg.runs_dir}/{r.id}.log"
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    try:
        r.start()
    except BaseException as e:  # noqa: BLE001 - the starter must hear of it
        code, said = (e.exit_code, str(e)) if isinstance(e, DrvsError) else (70, f"internal error: {e}")
        _unlink_quietly(log)  # (a run that never started has no log: its id was never given)
        os.write(report, f"err {code} {said}".encode())
        os._exit(code)
    os.write(report, b"ok")
    os.close(report)
    code, note = 70, "the run's monitor failed"
    try:
        result = r.wait()
        code, note = result.exit_code, jail.explain(result) or ""
    finally:
        try:
            gone = _removed_meanwhile(open_store(), vm.name, code) is not None
        except DrvsError:
            gone = False
        if gone:  # (drvs vm rm took the VM's runs' logs; this one ended after it looked)
            _unlink_quietly(log)
        else:
            _write_exit(cfg, r, vm.name, code, note)  # (drvs wait and logs -f learn the end from it)
        os._exit(code)


def _write_exit(cfg, run: jail.Run, vm_name: str, code: int, note: str) -> None:
    """The end of a detached run, beside its log (not in it: the log is the
    program's output alone), with what drvs runs -a lists of it."""
    path = exit_path(cfg, run.id)
    try:
        with open(path + ".tmp", "w") as f:
            json.dump({"vm": vm_name, "code": code, "note": note, "argv": list(run.opts.argv),
                       "started": run.started, "ended": time.time()}, f)
        os.rename(path + ".tmp", path)
    except OSError:
        pass  # (nothing to tell it to: drvs wait then finds the run neither running nor ended)


def _stdio_present() -> None:
    """Give closed fds 0-2 /dev/null, so that nothing else (a lock, a pipe)
    lands on them and is handed to the program as its stdio."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    if sys.stdout is None:
        sys.stdout = open(1, "w", closefd=False)
    if sys.stderr is None:
        sys.stderr = open(2, "w", closefd=False)


def main(argv: list[str] | None = None) -> int:
    _stdio_present()
    # An inherited "ignore SIGCHLD" would reap the keeper before we can.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    p = parser()
    args = p.parse_args(argv)

    def body():
        require_root("drvs-run")
        if os.environ.get("DRVS_NODE"):  # act as that node of the local dev cluster
            from ..cluster.context import enter_node

            enter_node(os.environ["DRVS_NODE"])
        return execute(args.vm, run_options(args), "drvs-run", node=args.run_node)

    code = guarded("drvs-run", body)
    # Everything is released by now (the run cleaned up in `finally`); skip
    # the interpreter's teardown, a few ms of every drvs-run.
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:
        pass
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
