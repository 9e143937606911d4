"""`drvs vm ...`: create, list, show and remove DRVMs."""

import glob
import json
import os
import shutil
import sys
import time

from .. import config
from ..cluster.context import cluster_info
from ..errors import Conflict, DrvsError, NotFound, UsageError
from ..ns import cell as cells
from ..ns import jail
from ..store import open_store
from ..units import format_duration, format_size, parse_duration
from ..vm import admission
from ..vm.model import FS_REPLACE_AFTER, VmSpec, changed_share, check_name, parse_share, parse_share_change
from ..vm.registry import VMS, VmRegistry
from .common import add_format, age, emit, print_table
from .options import add_limit_options, check_here, limits_from, node_name, typed
from ..node.runs import forget_runs


APPLY_WAIT = 10.0  # seconds vm update waits for the nodes to say their cells took a changed share
ADMIT_TRIES = 5  # snapshots of the VMs a create checks its shares against, if others are made meanwhile


def add_parser(sub) -> None:
    vm = sub.add_parser("vm", help="manage DRVMs")
    verbs = vm.add_subparsers(dest="verb", required=True, metavar="VERB")
    p = verbs.add_parser("create", help="define a VM")
    _vm_and_shares(p, "give the VM a share of NODE (repeatable)")
    p.add_argument("--fs-replicas", type=int, default=None, metavar="N",
                   help="keep the VM's file system on N of its nodes, the first --node ones "
                        "(default: 2 with two nodes or more)")
    p.add_argument("--fs-sync", action="store_true",
                   help="a close returns once every replica has what was written (default: only fsync waits)")
    _replace_after(p)
    p.set_defaults(func=create)
    p = verbs.add_parser("update", help="change a VM's limits or its shares of nodes, live")
    _vm_and_shares(p, "give the VM a share of NODE, or change its share there: the fields given change, "
                      "the others stay; KEY=none takes a limit away (repeatable)", parse_share_change)
    p.add_argument("--rm-node", dest="drop", action="append", default=[], type=typed(node_name),
                   metavar="NODE", help="take the VM's share of NODE away (repeatable); refused while programs "
                                        "of the VM run there, unless --force, which ends them")
    p.add_argument("--force", action="store_true", help="with --rm-node: end the VM's programs on that node")
    p.add_argument("--fs-replicas", type=int, default=None, metavar="N",
                   help="keep the VM's file system on N of its nodes (a new replica is copied to live)")
    _replace_after(p)
    p.set_defaults(func=update)
    p = verbs.add_parser("ls", help="list VMs")
    add_format(p)
    p.set_defaults(func=ls)
    p = verbs.add_parser("show", help="a VM's definition, cell and runs")
    p.add_argument("name", type=typed(check_name), metavar="VM")
    add_format(p)
    p.set_defaults(func=show)
    p = verbs.add_parser("rm", help="remove a VM and its data (its files, on every node)")
    p.add_argument("name", type=typed(check_name), metavar="VM")
    p.add_argument("-f", "--force", action="store_true",
                   help="also when in use: end its running programs (on every node) and detach its "
                        "drvs mounts first")
    p.set_defaults(func=rm)


def _vm_and_shares(p, share_help: str, parse=parse_share) -> None:
    """What create and update take: the VM, its limits, its shares."""
    p.add_argument("name", type=typed(check_name), metavar="VM")
    add_limit_options(p)
    p.add_argument("--node", dest="shares", action="append", default=[], type=typed(parse),
                   metavar="NODE[:cpus=N,cpuset=LIST,memory=SIZE,pids=N]", help=share_help)
    p.add_argument("--overcommit", action="store_true",
                   help="let the shares go past what their nodes have left beside other VMs' shares")


def _replace_after(p) -> None:
    p.add_argument("--fs-replace-after", type=typed(parse_duration), default=None, metavar="DURATION",
                   help="a replica whose node stays NotReady this long (90s, 5m) is replaced by a copy on another "
                        f"node of the VM (default {format_duration(FS_REPLACE_AFTER)}; 0: never)")


def create(args) -> int:
    store = open_store()
    shares = dict(args.shares)
    if len(shares) != len(args.shares):
        twice = next(n for n, _ in args.shares if [m for m, _ in args.shares].count(n) > 1)
        raise UsageError(f"node {twice!r} is given twice in --node")
    specs = node_specs(store, shares) if shares else {}
    for node, share in shares.items():
        admission.check_share(node, specs[node], share)
    if args.overcommit and not shares:
        raise UsageError("--overcommit needs --node shares")
    if shares and any(v is not None for v in limits_from(args)):
        # (they would apply nowhere: a VM with shares runs on its shares only)
        raise UsageError("--cpus, --cpuset-cpus, --memory and --pids-limit do not go with --node shares: give "
                         "them per node (--node NODE:cpus=N,memory=SIZE,...)")
    fs_nodes = fs_replica_nodes([n for n, _ in args.shares], args.fs_replicas)
    if args.fs_sync and not fs_nodes:
        raise UsageError("--fs-sync needs --node shares (a VM file system of the cluster)")
    if args.fs_replace_after is not None and not fs_nodes:
        raise UsageError("--fs-replace-after needs --node shares (a VM file system of the cluster)")
    limits = limits_from(args) if shares else check_here(limits_from(args))  # (no shares: a VM of this node)
    spec = VmSpec(args.name, limits, shares=shares, fs_nodes=fs_nodes, fs_sync=args.fs_sync,
                  fs_replicas=args.fs_replicas, fs_replace_after=args.fs_replace_after)
    _warn_not_ready(store, spec)
    registry = VmRegistry(store)
    for _ in range(ADMIT_TRIES):
        others, revision = registry.snapshot()
        if not args.overcommit:
            for node, share in shares.items():
                admission.check_fits(node, specs[node], share, [vm for vm in others if vm.name != args.name])
        if registry.create(spec, unchanged_since=None if args.overcommit or not shares else revision):
            print(spec.name)
            return 0
    raise Conflict(f"VM {args.name!r}: VMs kept being made while its shares were checked; try again")


def update(args) -> int:
    """Change a VM's definition: each node's reconciler resizes its cell in
    place (cgroup limits, live), makes a new share's and ends a removed
    one's; a single node's cell is resized here."""
    given = dict(args.shares)
    if len(given) != len(args.shares):
        twice = next(n for n, _ in args.shares if [m for m, _ in args.shares].count(n) > 1)
        raise UsageError(f"node {twice!r} is given twice in --node")
    if set(given) & set(args.drop):
        raise UsageError(f"node {sorted(set(given) & set(args.drop))[0]!r} is given to --node and --rm-node")
    new_limits = {k: v for k, v in limits_from(args)._asdict().items() if v is not None}
    if not (given or args.drop or new_limits or args.fs_replicas is not None or args.fs_replace_after is not None):
        raise UsageError("nothing to change: give --cpus, --cpuset-cpus, --memory, --pids-limit, --node, --rm-node, "
                         "--fs-replicas or --fs-replace-after")
    store = open_store()
    registry = VmRegistry(store)
    if args.drop and not args.force:
        _no_programs_on(config.load(), args.name, args.drop, "take the share away anyway",
                        scope=f" on {', '.join(args.drop)}", ends=", or use --force (taking the share away ends them)")
    specs = node_specs(store, given) if given else {}
    for _ in range(ADMIT_TRIES):
        entry = registry.entry(args.name)
        old = VmSpec.from_json(entry.value)
        shares = {node: changed_share(old.shares.get(node), *change) for node, change in given.items()}
        for node, share in shares.items():
            admission.check_share(node, specs[node], share)
        spec = _changed(old, shares, args.drop, new_limits, args.fs_replicas, args.fs_replace_after)
        in_sync = _kept_in_sync(store, old, spec)
        others, revision = registry.snapshot()
        if not args.overcommit:
            for node, share in shares.items():
                admission.check_fits(node, specs[node], share, [vm for vm in others if vm.name != args.name])
        checked = given and not args.overcommit
        stored = registry.update(spec, entry.mod_revision, unchanged_since=revision if checked else None,
                                 same=in_sync)
        if stored is not None:
            break
    else:
        raise Conflict(f"VM {args.name!r} (or its file system's replicas in sync) kept changing while it was "
                       "being updated; try again")
    if not spec.shares:
        try:
            _resize_here(spec, old)
        except DrvsError as e:  # (a memory limit below what the cell holds, say: the definition goes back)
            if registry.update(old, stored) is None:
                raise Conflict(f"{e}; and VM {args.name!r} changed meanwhile: see `drvs vm show {args.name}`") from None
            raise
    if given:
        _warn_not_ready(store, VmSpec(spec.name, shares=shares), "update")
        refused = _applied(store, spec.name, sorted(given), stored)
        if refused:  # (a node's cell could not take its new share: all of it goes back)
            node, why = next(iter(refused.items()))
            if registry.update(old, stored) is None:
                raise Conflict(f"node {node}: {why}; and VM {args.name!r} changed meanwhile: "
                               f"see `drvs vm show {args.name}`")
            raise Conflict(f"node {node}: {why}; VM {args.name!r} is unchanged")
    if len(spec.fs_nodes) < len(old.fs_nodes) and args.fs_replicas is None:
        print(f"drvs vm update: warning: VM {spec.name!r}'s file system is now kept on {len(spec.fs_nodes)} "
              f"node{'s' if len(spec.fs_nodes) > 1 else ''} ({', '.join(spec.fs_nodes)}), not "
              f"{len(old.fs_nodes)}: another replica is made when the VM has another node", file=sys.stderr)
    print(spec.name)
    return 0


def _changed(spec: VmSpec, given: dict, drop: list[str], new_limits: dict, replicas: int | None = None,
             replace_after: float | None = None) -> VmSpec:
    """spec with the shares, limits and replicas asked for; why not, if
    they cannot be.  A replica on a node taken away moves to another node
    of the VM (copied to live by the VM's file server)."""
    if (given or replicas is not None) and not spec.shares:
        raise UsageError(f"VM {spec.name!r} was made without node shares (its files are each node's own): "
                         "shares are given at `drvs vm create --node`")
    shares = dict(spec.shares)
    for node in drop:
        if node not in shares:
            raise NotFound(f"VM {spec.name!r} has no share of node {node!r} (its nodes: "
                           f"{', '.join(sorted(shares)) or 'none'})")
        del shares[node]
    shares.update(given)
    fs_nodes = [n for n in spec.fs_nodes if n in shares]
    if replicas is not None and not 1 <= replicas <= len(shares):
        raise UsageError(f"--fs-replicas {replicas}: must be from 1 to {len(shares)}, the VM's number of nodes")
    asked = spec.fs_replicas if replicas is None else replicas
    want = VmSpec(spec.name, shares=shares, fs_replicas=asked).replicas_wanted() if spec.fs_nodes else 0
    fs_nodes = (fs_nodes + [n for n in shares if n not in fs_nodes])[:want]
    if spec.fs_nodes and not fs_nodes:
        raise Conflict(f"VM {spec.name!r}: its file system would be left on no node; its share of "
                       f"{', '.join(drop)} stays")
    limits = spec.limits._replace(**new_limits)
    if not shares:
        check_here(limits)  # (a VM of no node in particular: its limits must fit this one)
    elif new_limits:
        raise UsageError(f"VM {spec.name!r} has node shares: change them with --node NODE:cpus=N,... "
                         "(its own limits apply only where it has no share)")
    if replace_after is not None and not spec.fs_nodes:
        raise UsageError(f"--fs-replace-after: VM {spec.name!r} has no cluster file system")
    return VmSpec(spec.name, limits, spec.created, shares, fs_nodes, spec.fs_sync, asked,
                  spec.fs_replace_after if replace_after is None else replace_after)


def _kept_in_sync(store, old: VmSpec, new: VmSpec) -> "dict | None":
    """Conflict unless a replica in sync now stays one: replicas taken
    away must leave one that has every change (the new ones are copied from
    it).  What the change must be stored with: the file server's in-sync
    list as read ({key: revision}), so that a replica dropping out of sync
    meanwhile makes the caller look again, not a file system left unserved."""
    from ..fs.replica import STATE

    if not set(old.fs_nodes) - set(new.fs_nodes):
        return None
    entry = store.get(STATE + old.name)
    in_sync = json.loads(entry.value)["in_sync"] if entry is not None else list(old.fs_nodes)
    if not set(in_sync) & set(new.fs_nodes):
        raise Conflict(f"VM {old.name!r}: its file system is in sync only on {', '.join(in_sync) or 'no node'}, "
                       f"which would no longer keep it; wait until another replica is in sync "
                       f"(drvs df {old.name}), or add one (--fs-replicas)")
    return {STATE + old.name: entry.mod_revision if entry is not None else 0}


def _resize_here(spec: VmSpec, old: VmSpec) -> None:
    """This node's live cell of a VM without shares takes its new limits
    (on a cluster, every node's does at its reconciler's next pass); if it
    cannot, it keeps its old ones, all of them."""
    with cells.locked(config.load(), spec.name) as lock:
        try:
            cells.resize(lock, spec.limits)
        except DrvsError:
            try:
                cells.resize(lock, old.limits)
            except DrvsError:
                pass  # (what failed is the one to say)
            raise


def _applied(store, vm: str, nodes: list[str], revision: int, wait: float = APPLY_WAIT) -> dict:
    """Wait until each Ready node of nodes has resized its live cell of vm
    to the definition stored at revision (its reconciler says so in etcd,
    drvs/node/reconcile.py); {node: why} for those that could not.  A node
    that says nothing within wait is left to its reconciler (a warning)."""
    from ..cluster.membership import status_key
    from ..node.reconcile import applied_key

    left = [n for n in nodes if store.get(status_key(n)) is not None]
    refused, deadline = {}, time.monotonic() + wait
    while left and time.monotonic() < deadline:
        for node in list(left):
            entry = store.get(applied_key(node, vm))
            said = json.loads(entry.value) if entry is not None else {}
            if said.get("revision", 0) >= revision:
                left.remove(node)
                if said.get("error"):
                    refused[node] = said["error"]
        if left:
            time.sleep(0.1)
    for node in left:
        print(f"drvs vm update: warning: node {node} has not said yet whether its cell took the new share "
              f"(see `drvs vm show {vm}` later)", file=sys.stderr)
    return refused


def _warn_not_ready(store, spec: VmSpec, verb: str = "create") -> None:
    """Shares of nodes that are NotReady are made when they are back: said,
    not refused (a node being restarted is a normal state)."""
    from ..cluster.membership import spec_key, status_key

    for node in spec.shares:
        if store.get(status_key(node)) is None:
            first = spec.fs_nodes[:1] == [node]
            print(f"drvs vm {verb}: warning: node {node} is NotReady; its share is made when it is back"
                  + (", and the VM's file system (first kept there) starts only then" if first else ""),
                  file=sys.stderr)
        else:
            entry = store.get(spec_key(node))
            if entry is not None and json.loads(entry.value).get("cordoned"):
                print(f"drvs vm {verb}: warning: node {node} is cordoned (SchedulingDisabled): programs of the "
                      f"VM go there only when asked by name (drvs-run --node {node})", file=sys.stderr)


def _no_programs_on(cfg, vm: str, nodes: list[str], anyway: str, scope: str = "", ends: str = "") -> None:
    """Conflict if programs of vm run on nodes, or a node cannot say (as
    the commands that would end them refuse without --force).  The
    messages: anyway, what --force does; scope, where the question was;
    ends, after "end them"."""
    from .proc import cluster_processes

    try:
        procs, silent = cluster_processes(cfg, vm, nodes)
    except DrvsError as e:
        raise Conflict(f"VM {vm!r}: cannot tell whether programs of it run{scope} ({e}); "
                       f"use --force to {anyway}") from None
    # (only the nodes asked about: the PM may still count one whose share went moments ago)
    unknown = sorted({s.partition(":")[0] for s in silent} & set(nodes))
    if unknown:
        raise Conflict(f"VM {vm!r}: cannot tell whether programs of it run on {', '.join(unknown)} "
                       f"(no answer); use --force to {anyway}")
    procs = [p for p in procs if p.get("node") in nodes]
    if procs:
        where = sorted({p["node"] for p in procs})
        raise Conflict(f"VM {vm!r} has {len(procs)} running process(es) on {', '.join(where)}: end them{ends}")


def _not_in_use_elsewhere(cfg, spec: VmSpec, force: bool) -> None:
    """A cluster VM is busy while programs of it run on any node, or its
    file system is mounted on this host (drvs mount): Conflict, unless
    forced (then those mounts are detached; the nodes end the programs,
    drvs/node/reconcile.py)."""
    from .fs import vm_mounts

    mounts = vm_mounts(spec.name)
    if force:
        for m in mounts:
            _detach(m)
        return
    if mounts:
        raise Conflict(f"VM {spec.name!r}: its file system is mounted on {', '.join(mounts)} "
                       "(drvs umount it, or use --force)")
    from .node import cluster_nodes

    try:
        # (a VM without shares runs wherever it is started: on any Ready node)
        nodes = sorted(spec.shares) or [n["name"] for n in cluster_nodes() if n["status"] != "NotReady"]
    except DrvsError as e:
        raise Conflict(f"VM {spec.name!r}: cannot tell whether programs of it run ({e}); "
                       "use --force to remove it anyway") from None
    _no_programs_on(cfg, spec.name, nodes, "remove it anyway", ends=" or use --force")


def _wait_unserved(store, vm: str, bound: float = 10.0) -> None:
    """Return once the removed VM's servers (pm@VM, fs@VM) have stopped, as
    their nodes see it gone (within a second or two), so that a VM made
    again under the name never meets them; said, not failed, past bound."""
    import time

    from ..ipc.fabric import REGISTRY

    deadline = time.monotonic() + bound
    while any(store.get(f"{REGISTRY}{service}@{vm}") is not None for service in ("pm", "fs")):
        if time.monotonic() > deadline:
            print(f"drvs vm rm: {vm}: its servers still run after {bound:g} s (a node is slow or away)",
                  file=sys.stderr)
            return
        time.sleep(0.1)


def _detach(mountpoint: str) -> None:
    from ..ns import mounts

    problem = mounts.detach(mountpoint)
    if problem:
        print(f"drvs vm rm: {problem}", file=sys.stderr)


def fs_replica_nodes(nodes: list[str], replicas: int | None) -> list[str]:
    """The nodes that keep the VM's file system: the first `replicas` of
    its shares, in the order given (the first serves it)."""
    if replicas is None:
        return nodes[:2]
    if not nodes:
        raise UsageError("--fs-replicas needs --node shares (a single node keeps its files in its data directory)")
    if not 1 <= replicas <= len(nodes):
        raise UsageError(f"--fs-replicas {replicas}: must be from 1 to {len(nodes)}, the VM's number of nodes")
    return nodes[:replicas]


def node_specs(store, nodes) -> dict[str, dict]:
    """What each node is (`drvs node show`), for the nodes of shares."""
    from ..cluster.membership import spec_key

    if not cluster_info(config.load()):
        raise UsageError("--node shares need a cluster (this node is a single node)")
    specs = {}
    for node in nodes:
        entry = store.get(spec_key(node))
        if entry is None:
            raise NotFound(f"no such node: {node!r} (see `drvs node ls`)")
        specs[node] = json.loads(entry.value)
    return specs


def _limits_text(spec: VmSpec) -> dict[str, str]:
    """The VM's limits; for a VM of shares, what its shares add up to
    ("-", no limit, if one share has none; CPU sets are per node)."""
    l = spec.limits
    if spec.shares:
        def total(field):
            values = [getattr(share, field) for share in spec.shares.values()]
            return None if None in values else sum(values)
        l = l._replace(cpus=total("cpus"), cpuset=None, memory=total("memory"), pids=total("pids"))
    return {"CPUS": f"{l.cpus:g}" if l.cpus else "-", "CPUSET": l.cpuset or "-",
            "MEMORY": format_size(l.memory), "PIDS": str(l.pids or "-")}


def runs_of(cfg, vm: str) -> list[dict]:
    """Live run records of a VM on this node (stale ones are dropped)."""
    out = []
    for path in sorted(glob.glob(f"{cfg.runs_dir}/*.json")):
        try:
            with open(path) as f:
                rec = json.load(f)
        except (OSError, ValueError):
            continue
        if rec.get("vm") != vm:
            continue
        pidfd = jail.open_run_keeper(rec)
        if pidfd is None:
            cells._unlink(path)
            continue
        os.close(pidfd)
        out.append(rec)
    return out


def _state(cfg, name: str) -> dict:
    with cells.locked(cfg, name) as lock:
        cell = cells.find(lock)
        if cell is None:
            return {"active": False}
        try:
            cg = cell.cgroup
            return {"active": True, "init_pid": cell.init_pid, "cpu_seconds": (cg.cpu_usage_ns() or 0) / 1e9,
                    "memory_bytes": cg.memory_current()}
        finally:
            cell.close()


def _processes_by_node(cfg, spec: VmSpec) -> dict:
    """A cluster VM's processes counted per node, VM-wide (the runs listed
    are this node's own records), and the nodes that did not answer."""
    from .proc import cluster_processes

    try:
        procs, silent = cluster_processes(cfg, spec.name, sorted(spec.shares))
    except DrvsError as e:
        return {"by_node": {}, "silent": sorted(spec.shares), "error": str(e)}
    unknown = {s.partition(":")[0] for s in silent}  # ("node: why", or the node alone)
    by_node = {node: 0 for node in sorted(spec.shares) if node not in unknown}  # (a silent one's: not 0)
    for p in procs:
        by_node[p.get("node", "?")] = by_node.get(p.get("node", "?"), 0) + 1
    return {"by_node": by_node, "silent": silent}


def _processes_text(counted: dict) -> str:
    text = ", ".join(f"{node}: {n}" for node, n in counted["by_node"].items()) or "-"
    if counted["silent"]:
        text += f" ({', '.join(sorted({n.partition(':')[0] for n in counted['silent']}))}: no answer)"
    return text


def ls(args) -> int:
    cfg = config.load()
    specs = VmRegistry(open_store()).list()
    data = [{"name": s.name, "limits": s.limits._asdict(), "created": s.created,
             "shares": {n: l._asdict() for n, l in s.shares.items()},
             "active": os.path.exists(f"{cfg.cells_dir}/{s.name}.json"),
             "runs": len(runs_of(cfg, s.name))} for s in specs]

    def table():
        print_table(["NAME", "CPUS", "CPUSET", "MEMORY", "PIDS", "NODES", "RUNS HERE", "AGE"],
                    [[s.name, *_limits_text(s).values(), ",".join(sorted(s.shares)) or "any", d["runs"],
                      age(s.created)] for s, d in zip(specs, data)])

    emit(data, args.format, table)
    return 0


def show(args) -> int:
    cfg = config.load()
    spec = VmRegistry(open_store()).get(args.name)
    state = _state(cfg, spec.name)
    runs = runs_of(cfg, spec.name)
    data = {"name": spec.name, "limits": spec.limits._asdict(), "created": spec.created,
            "shares": {n: l._asdict() for n, l in spec.shares.items()}, "fs_nodes": spec.fs_nodes,
            "fs_replicas": spec.fs_replicas, "fs_sync": spec.fs_sync,
            "fs_replace_after": spec.replace_after() if spec.fs_nodes else None,
            "data_dir": f"{cfg.vms_dir}/{spec.name}/data" if not spec.fs_nodes else f"fs@{spec.name}",
            "cell": state, "runs": runs}
    if spec.shares:
        data["processes"] = _processes_by_node(cfg, spec)

    def table():
        print_table(["FIELD", "VALUE"], [
            ["name", spec.name], *[[k.lower(), v] for k, v in _limits_text(spec).items()],
            ["age", age(spec.created)], ["data", data["data_dir"]],
            *([["fs replicas", f"{', '.join(spec.fs_nodes)} (a node NotReady for "
                               f"{format_duration(spec.replace_after())} is replaced)" if spec.replace_after()
                else f"{', '.join(spec.fs_nodes)} (never replaced)"]] if spec.fs_nodes else []),
            *[[f"share {n}", ", ".join(f"{k}={format_size(v) if k == 'memory' else v}"
                                       for k, v in l._asdict().items() if v) or "whole node"]
              for n, l in sorted(spec.shares.items())],
            ["cell", f"active (init {state['init_pid']}, cpu {state['cpu_seconds']:.2f}s, "
                     f"memory {format_size(state['memory_bytes'])})" if state["active"] else "inactive"],
            *([["processes", _processes_text(data["processes"])]] if "processes" in data else []),
        ])
        if runs:
            print()
            print_table(["RUN", "COMMAND", "AGE", "DETACHED"],
                        [[r["id"], " ".join(r["argv"]), age(r["started"]), "yes" if r["detached"] else "no"]
                         for r in runs])

    emit(data, args.format, table)
    return 0


def rm(args) -> int:
    cfg = config.load()
    reg = VmRegistry(open_store())
    if args.name != "default":
        spec = reg.get(args.name)  # NotFound for an unknown VM
    else:  # (not made by looking, as get() would: it is there if used)
        entry = reg.store.get(VMS + args.name)
        spec = VmSpec.from_json(entry.value) if entry is not None else None
    if spec is not None and cluster_info(cfg):
        _not_in_use_elsewhere(cfg, spec, args.force)
    with cells.locked(cfg, args.name) as lock:
        cell = cells.find(lock)
        if cell is not None:
            try:
                busy = [r for r in cells.runs(cell.cgroup) if cell.cgroup.child(r).pids()]
                if busy and not args.force:
                    raise Conflict(f"VM {args.name!r} has {len(busy)} running program(s): "
                                   "end them or use --force")
                for r in busy:
                    cell.cgroup.child(r).kill_all()
            finally:
                cell.close()
            # forced: a cell drvmmd pinned for the VM's share goes too (its
            # record is dropped below, and the reconciler could no more find it)
            cells.release(lock, force=True)
        try:
            reg.remove(args.name)
        except Exception:
            if args.name != "default":
                raise
        if cluster_info(cfg):
            from ..fs.replica import STATE

            reg.store.delete(STATE + args.name)  # its file system's term; the nodes remove their replicas
        shutil.rmtree(f"{cfg.vms_dir}/{args.name}", ignore_errors=True)
        lock.drop_record()
        lock.drop_file()
        forget_runs(cfg, lambda vm: vm == args.name)
    if cluster_info(cfg):
        _wait_unserved(reg.store, args.name)  # (outside the cell's lock: the node's spawner may need it)
    print(args.name)
    return 0
