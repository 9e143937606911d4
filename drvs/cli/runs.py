"""Runs, on this node or another of its cluster: `drvs runs` lists them,
`drvs logs [-f]`, `wait` and `kill` reach one by its id.  A run's files
are its node's (drvs/node/runs.py); another node's are asked of its drvmm
(DrvmmCall.runList, runLog, runSignal)."""

import errno
import os
import select
import sys
import time

from .. import config
from ..errors import DaemonAway, NotFound
from ..node import runs
from ..vm.model import check_name
from .common import add_format, age, emit, print_table
from .options import typed


def add_parsers(sub) -> None:
    p = sub.add_parser("runs", help="the runs of every node (of VM), running; -a: with the detached ones ended")
    p.add_argument("vm", nargs="?", type=typed(check_name), metavar="VM")
    p.add_argument("-a", "--all", action="store_true", help="also the detached runs that ended (logs kept)")
    add_format(p)
    p.set_defaults(func=list_runs)

    p = sub.add_parser("logs", help="output of a detached run")
    p.add_argument("run", metavar="RUN")
    p.add_argument("-f", "--follow", action="store_true", help="go on printing until the run ends")
    p.set_defaults(func=logs)

    p = sub.add_parser("wait", help="wait until a detached run ends; print its exit status")
    p.add_argument("run", metavar="RUN")
    p.set_defaults(func=wait)

    p = sub.add_parser("kill", help="send a signal to a run")
    p.add_argument("run", metavar="RUN")
    p.add_argument("-s", "--signal", default="TERM")
    p.set_defaults(func=kill)


def list_runs(args) -> int:
    from ..cluster.context import cluster_info

    cfg = config.load()
    if args.vm:  # (no such VM: said, as drvs ps says it, not an empty list)
        from ..store import open_store
        from ..vm.registry import VmRegistry

        VmRegistry(open_store()).entry(args.vm)
    info = cluster_info(cfg)
    here = info["node"] if info else "-"
    found = [{**r, "node": here} for r in runs.listing(cfg, args.vm, args.all)]
    silent = []
    if info:
        from ..ipc.client import daemon_answers, socket_path
        from ..ipc.message import IpcError
        from ..ipc.schema import drvmm

        if not daemon_answers(cfg.state_dir):  # (this node's silence, not the others')
            emit(_sorted(found), args.format, lambda: _table(found))
            print(f"drvs runs: drvmmd is not running on this node ({socket_path(cfg.state_dir)} refuses "
                  "connections): the other nodes' runs are unknown", file=sys.stderr)
            return DaemonAway.exit_code
        for node, ready in _other_nodes(info):
            if not ready:
                silent.append(f"{node} (NotReady)")
                continue
            try:
                payload = _ask(cfg, node, drvmm.DrvmmCall.runList, 10, struct=drvmm.RunFilter,
                               vm=args.vm or "", every=args.all)
            except IpcError:
                silent.append(node)
                continue
            found += [{**r.to_dict(), "node": node} for r in drvmm.RunList.from_bytes_packed(payload).runs]
    found = _sorted(found)
    emit(found, args.format, lambda: _table(found))
    for node in silent:
        print(f"drvs runs: node {node} did not answer (its runs are missing above)", file=sys.stderr)
    # (a Ready node's silence leaves the list incomplete for no known reason: not a whole answer)
    return DaemonAway.exit_code if any(not n.endswith("(NotReady)") for n in silent) else 0


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
    from ..ipc.client import daemon_answers, socket_path

    if not daemon_answers(cfg.state_dir):  # (not the nodes' silence: this one's)
        raise IpcError(f"no such run here, and drvmmd is not running on this node to ask the others "
                       f"({socket_path(cfg.state_dir)} refuses connections)", errno.ENOENT)
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


def _sorted(found: list[dict]) -> list[dict]:
    found.sort(key=lambda r: (r.get("started", 0.0), r["id"]))
    for r in found:  # (capnp's to_dict leaves out fields at their defaults)
        r.setdefault("code", 0)
        r.setdefault("note", "")
    return found


def _table(found: list[dict]) -> None:
    print_table(["RUN", "NODE", "VM", "COMMAND", "STATUS", "AGE"],
                [[r["id"], r["node"], r["vm"], " ".join(r.get("argv", [])),
                  ("running" if r.get("running") else f"exited ({r['code']})") +
                  ("" if r.get("detached") else ", attached"), age(r.get("started", 0.0))] for r in found])


def _other_nodes(info: dict) -> list[tuple[str, bool]]:
    """The cluster's other nodes, and whether each is Ready."""
    from .node import cluster_nodes

    return [(n["name"], n["status"] != "NotReady") for n in cluster_nodes() if n["name"] != info["node"]]


def _ask(cfg, node: str, call, timeout: float, struct=None, **query):
    """A run's message to node's drvmm (a RunQuery, or `struct`); the
    reply's payload."""
    from ..ipc import client
    from ..ipc.message import IpcError, Msg, check
    from ..ipc.schema import drvmm

    target = f"drvmm@{node}"
    payload = (struct or drvmm.RunQuery).new_message(**query).to_bytes_packed()
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
                if not os.path.exists(runs.log_path(cfg, args.run)):
                    raise runs.vanished(args.run)  # (as from another node)
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
