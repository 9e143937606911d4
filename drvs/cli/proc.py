"""`drvs ps` (every process of a VM, on all its nodes) and `drvs syscalls`
(the DVOS system-call table)."""

import sys
import time

from .. import config
from ..cluster.context import cluster_info
from ..errors import DaemonAway, DrvsError
from ..store import open_store
from ..vm.model import check_name
from ..vm.registry import VmRegistry
from .common import add_format, emit, print_table
from .options import typed

COLUMNS = ["PID", "NODE", "PPID", "USER", "STATE", "%CPU", "RSS", "START", "COMMAND"]


def add_parsers(sub) -> None:
    p = sub.add_parser("ps", help="the processes of a VM (default: of every VM), on all its nodes")
    p.add_argument("vm", nargs="?", type=typed(check_name), metavar="VM")
    add_format(p)
    p.set_defaults(func=ps)
    p = sub.add_parser("syscalls", help="which system calls DVOS serves, and how")
    add_format(p)
    p.set_defaults(func=syscalls)


def ps(args) -> int:
    cfg = config.load()
    registry = VmRegistry(open_store())
    specs = [registry.get(args.vm)] if args.vm else registry.list()
    info = cluster_info(cfg)
    rows, failed = [], []
    for spec in specs:
        # (a cluster VM without shares runs on the node that started it: this one's are here)
        got, bad = (cluster_processes(cfg, spec.name, sorted(spec.shares) or [info["node"]]) if info
                    else (_local_ps(cfg, spec.name), []))
        rows += [{**r, "vm": spec.name} for r in got]
        failed += bad

    def table():
        cols = COLUMNS if args.vm else ["VM"] + COLUMNS
        print_table(cols, [([] if args.vm else [r["vm"]]) + _row(r) for r in rows])

    emit(rows, args.format, table)
    return _say_missing(failed)


def _say_missing(failed: list[str]) -> int:
    """Name the nodes ("node: why") whose processes are missing from what
    was shown; 7 if one of them is Ready (the list is incomplete for no
    known reason: a script must not take it as whole), else 0 (a NotReady
    node's processes are unknown, as kubectl shows them)."""
    if not failed:
        return 0
    failed = list({f.partition(":")[0]: f for f in reversed(failed)}.values())[::-1]  # (once a node)
    from .node import cluster_nodes

    try:
        down = {n["name"] for n in cluster_nodes() if n["status"] == "NotReady"}
    except DrvsError:
        down = set()
    code = 0
    for f in failed:
        node = f.partition(":")[0]
        print(f"drvs ps: node {f}{' (NotReady)' if node in down else ''} (its processes are missing above)",
              file=sys.stderr)
        if node not in down:
            code = DaemonAway.exit_code
    return code


def _local_ps(cfg, vm: str) -> list[dict]:
    from ..dvos.pm.procs import NodeProcs

    procs = NodeProcs(cfg, "-")
    try:
        return procs.processes(vm)
    finally:
        procs.close()


def cluster_processes(cfg, vm: str, nodes) -> tuple[list[dict], list[str]]:
    """The processes of a cluster VM on all its nodes, and the nodes that
    did not say ("node: why"): its PM's list; or, when the PM does not
    answer (being elected, its node gone or silent), each node's own
    (procs@NODE), so that one node's silence hides only its processes."""
    from ..ipc.client import daemon_answers
    from ..ipc.message import IpcError

    try:
        return _list(cfg, f"pm@{vm}", vm)
    except IpcError:
        if not daemon_answers(cfg.state_dir):
            raise  # (this node's own drvmmd: no node can be asked)
    found, silent = [], []
    for node in nodes:
        try:
            found += _list(cfg, f"procs@{node}", vm)[0]
        except IpcError as e:
            silent.append(f"{node}: {str(e).removeprefix(f'procs@{node}: ')}")
    return found, silent


def _list(cfg, target: str, vm: str) -> tuple[list[dict], list[str]]:
    from ..ipc import client
    from ..ipc.message import Msg, check
    from ..ipc.schema import pm

    payload = pm.ListRequest.new_message(vm=vm).to_bytes_packed()
    reply = check(client.sendrec(cfg.state_dir, target, Msg(pm.PmCall.list, payload)), target)
    table = pm.ProcessTable.from_bytes_packed(reply.payload)
    return [p.to_dict() for p in table.processes], list(table.failed)


def _row(r: dict) -> list:
    elapsed = max(time.time() - r.get("started", 0), 1e-3)
    return [r["pid"], r.get("node", "-"), r.get("ppid", 0), _user(r.get("uid", 0)), r.get("state", "?"),
            f"{100 * r.get('cpuSeconds', 0) / elapsed:.1f}", _size(r.get("rss", 0)),
            time.strftime("%H:%M:%S", time.localtime(r.get("started", 0))), r.get("command", "")]


def _user(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _size(n: int) -> str:
    for unit in ("", "K", "M", "G"):
        if n < 1024:
            return f"{n}{unit}"
        n //= 1024
    return f"{n}T"


def syscalls(args) -> int:
    from ..dvos.syscalls import TABLE

    data = [{"name": s.name, "nr": s.nr, "level": s.level, "server": s.server, "args": s.args, "note": s.note}
            for s in TABLE]

    def table():
        print_table(["SYSCALL", "NR", "HOW", "SERVER", "NOTE"],
                    [[d["name"], d["nr"] if d["nr"] is not None else "-", d["level"], d["server"], d["note"]]
                     for d in data])

    emit(data, args.format, table)
    return 0
