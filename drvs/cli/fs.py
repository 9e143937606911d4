"""`drvs mount`, `drvs umount` and `drvs df`: a VM's file system on the host,
for an administrator, and where its bytes are."""

import ctypes
import errno
import os
import stat
import sys
import time

from .. import config
from ..cluster.context import cluster_info, no_cluster
from ..errors import Conflict, DrvsError, NotFound, SetupError, UsageError
from ..ns import mounts
from ..store import open_store
from ..units import format_size
from ..vm.model import check_name
from ..vm.registry import VmRegistry
from .common import add_format, emit, print_table
from .options import node_name, typed

MS_BIND = 4096
FSTYPE = mounts.DRVS_FSTYPE
STARTING_WAIT = 10.0  # seconds df waits for a VM's file server that is starting (one of its nodes is up)


def add_parsers(sub) -> None:
    p = sub.add_parser("mount", help="mount a VM's file system on this node (a cluster VM's)")
    p.add_argument("vm", type=typed(check_name), metavar="VM")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--node", dest="on_node", default=None, metavar="NODE", type=typed(node_name),
                   help="the node whose view serves it (as drvs --node)")
    p.set_defaults(func=mount)
    p = sub.add_parser("umount", help="unmount what drvs mount mounted")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.set_defaults(func=umount)
    p = sub.add_parser("df", help="size, use and replicas of VM file systems")
    p.add_argument("vm", nargs="?", type=typed(check_name), metavar="VM")
    add_format(p)
    p.set_defaults(func=df)


def _view(cfg, vm: str) -> str:
    """This node's view of vm's file system, checked."""
    from ..dvos import handover
    from ..ns.jail import vm_file_system

    if not cluster_info(cfg):
        raise no_cluster(cfg, "its VMs keep their data in STATE/vms/VM/data")
    spec = VmRegistry(open_store()).get(vm)
    if not spec.fs_nodes:
        raise UsageError(f"VM {vm!r} has no cluster file system (it was made without --node shares)")
    handover.check(cfg, "it serves the VMs' file systems")  # (a dead one's view says ENOTCONN; exit 7)
    return vm_file_system(cfg, spec)


def _mount_point(arg: str) -> str:
    """The mount point as the mount table names it: absolute, its symbolic
    links followed, as mount(8) and umount(8) do; an empty argument is
    refused (it would be the current directory)."""
    if not arg.strip():
        raise UsageError("empty mount point")
    return os.path.realpath(arg)  # (not strict: a dead mount's ENOTCONN leaves its path as it is)


def _check_directory(given: str, target: str) -> None:
    """target is a directory to mount on: else which problem it has."""
    try:
        st = os.stat(target)
    except FileNotFoundError:
        raise NotFound(f"mount point {given}: no such directory") from None
    except NotADirectoryError:
        raise UsageError(f"mount point {given}: not a directory") from None
    except OSError as e:
        raise SetupError(f"mount point {given}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"mount point {given}: not a directory")


def _disconnected(target: str) -> bool:
    try:
        os.stat(target)
    except OSError as e:
        return e.errno == errno.ENOTCONN
    return False


def mount(args) -> int:
    if args.on_node:
        from ..cluster.context import enter_node

        enter_node(args.on_node)
    cfg = config.load()
    target = _mount_point(args.mountpoint)
    source = _view(cfg, args.vm)  # (an unknown VM is the first thing to say)
    if _drvs_mount_at(target) is not None:
        dead = " (disconnected: its drvmmd was stopped; `drvs umount` it first)" if _disconnected(target) else ""
        raise Conflict(f"{target}: a drvs file system is already mounted here{dead}")
    _check_directory(args.mountpoint, target)
    hidden = _not_empty(target)
    _bind(source, target)
    print(f"{args.vm} mounted on {target}")
    if hidden:
        print(f"drvs mount: note: {target} was not empty: what it holds is hidden until the VM is unmounted",
              file=sys.stderr)
    # (its locks are the node's kernel's: pyfuse3 serves no lock calls, and only
    # jails' lock calls reach the VM's lock table, through their seccomp filter)
    print(f"drvs mount: note: fcntl and flock locks taken through {target} hold on this node only: programs "
          "that share files with other nodes by locking them (SQLite...) belong in the VM (drvs-run, drvs login)",
          file=sys.stderr)
    return 0


def _not_empty(target: str) -> bool:
    try:
        with os.scandir(target) as entries:
            return any(True for _ in entries)
    except OSError:
        return False


def _bind(source: str, target: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(source.encode(), target.encode(), None, MS_BIND, None) != 0:
        err = ctypes.get_errno()
        raise SetupError(f"mount {target}: bind of {source} failed: {os.strerror(err)}")


def umount(args) -> int:
    target = _mount_point(args.mountpoint)
    root = _drvs_mount_at(target)
    if root is None:
        if not os.path.lexists(target):
            raise NotFound(f"{args.mountpoint}: no such file or directory")
        raise NotFound(f"{target}: no drvs file system is mounted here")
    if not root.startswith("/fs/"):
        raise UsageError(f"{target}: a node's own view of its VMs' files, not one drvs mount made "
                         "(its drvmmd unmounts it)")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(target.encode(), 0) != 0:
        err = ctypes.get_errno()
        if err == errno.EBUSY:
            below = [point for _, point, _ in mounts.mount_table() if point.startswith(target.rstrip("/") + "/")]
            why = (f"{', '.join(below)} is mounted below it" if below
                   else "files are open there; close them, or use umount -l")
            raise Conflict(f"umount {target}: {os.strerror(err)} ({why})")
        raise SetupError(f"umount {target}: {os.strerror(err)}")
    return 0


def _drvs_mount_at(target: str) -> "str | None":
    """The root within the drvs file system mounted at target (/fs/VM for
    what drvs mount bound, / for a node's own view), or None."""
    return next((root for root, point, kind in mounts.mount_table() if point == target and kind == FSTYPE), None)


def vm_mounts(vm: str) -> list[str]:
    """Where drvs mount bound vm's file system on this host: not from the
    live view of a node of another cluster (another dev cluster's VM of the
    name, told by the view's device); binds of a view no longer served (its
    drvmmd stopped) count, as they may be this VM's."""
    from ..cluster.context import state_dirs_here

    table = mounts.mount_entries()
    ours = {os.path.realpath(f"{d}/dvos") for d in state_dirs_here(config.load())}
    theirs = {dev for dev, root, point, kind in table if kind == FSTYPE and root == "/" and point not in ours}
    return [point for dev, root, point, kind in table if kind == FSTYPE and root == f"/fs/{vm}" and dev not in theirs]


def df(args) -> int:
    cfg = config.load()
    if not cluster_info(cfg):
        raise no_cluster(cfg, "its VMs keep their data in STATE/vms/VM/data")
    store = open_store()
    registry = VmRegistry(store)
    specs = [registry.get(args.vm)] if args.vm else [s for s in registry.list() if s.fs_nodes]
    if args.vm and not specs[0].fs_nodes:
        raise UsageError(f"VM {args.vm!r} has no cluster file system (it was made without --node shares)")
    deadline = time.monotonic() + STARTING_WAIT  # (one wait for all: not one for each VM)
    rows = [_usage(cfg, store, s, deadline) for s in specs]

    def table():
        print_table(["VM", "USED", "DISK", "AVAIL", "REPLICAS", "SERVER", "IN SYNC", "NODES"],
                    [[r["vm"], *_sizes(r), r["replicas"], r["server"] or "-",
                      ",".join(r["in_sync"]) or "-", ",".join(r["nodes"])] for r in rows])

    emit(rows, args.format, table)
    for r in rows:  # (why a replica is not in sync: a full disk there, a copy under way...)
        for node, why in r["not_in_sync"].items():
            print(f"drvs df: {r['vm']}: the replica on {node} is not in sync: {why}", file=sys.stderr)
    failed = [r for r in rows if r["error"]]
    for r in failed:
        print(f"drvs df: {r['vm']}: {r['error']}", file=sys.stderr)
    return 7 if failed else 0  # (as IpcError: a file server could not be asked)


def _sizes(r: dict) -> list[str]:
    """USED (the VM's files), DISK and AVAIL (the serving node's disk, which
    other VMs may share: no USE% of one against the other); dashes where
    its server could not be asked (not zeros, which would read as an empty
    file system)."""
    if r["error"]:
        return ["-"] * 3
    return [format_size(r["used"]), format_size(r["size"]), format_size(r["avail"])]


def _usage(cfg, store, spec, deadline: float) -> dict:
    from ..ipc import client
    from ..ipc.message import IpcError, Msg, check
    from ..ipc.schema import from_flat, fs, to_flat

    row = {"vm": spec.name, "size": 0, "used": 0, "avail": 0, "replicas": len(spec.fs_nodes),
           "nodes": spec.fs_nodes, "server": None, "in_sync": _in_sync(store, spec.name), "error": None,
           "not_in_sync": {}}
    target = f"fs@{spec.name}"
    while True:
        try:
            reply = check(client.sendrec(cfg.state_dir, target,
                                         Msg(fs.FsCall.usage, to_flat(fs.FsRequest.new_message(vm=spec.name)))),
                          target)
            break
        except IpcError as e:
            # No server yet, while a node that may serve it is up: one is
            # starting (a VM just made, a fail-over under way).
            could = row["in_sync"] or spec.fs_nodes[:1]  # (none in sync yet: a new one starts on its first)
            starting = (e.errno == errno.ENOENT and client.daemon_answers(cfg.state_dir)
                        and _any_ready(store, could))
            if starting and time.monotonic() < deadline:
                time.sleep(0.2)
                continue
            row["error"] = (f"{target}: not served yet (its file system starts on {', '.join(could)})"
                            if starting else str(e))
            return row
        except DrvsError as e:
            row["error"] = str(e)
            return row
    r = from_flat(fs.FsReply, reply.payload)
    row.update(size=r.statfs.blocks * r.statfs.bsize, avail=r.statfs.bavail * r.statfs.bsize, used=int(r.data))
    row["server"] = _server_of(store, target)
    row["not_in_sync"] = dict(state.partition(": ")[::2] for state in r.replicaStates)
    return row


def _any_ready(store, nodes: list[str]) -> bool:
    from ..cluster.membership import status_key

    return any(store.get(status_key(node)) is not None for node in nodes)


def _in_sync(store, vm: str) -> list[str]:
    """The replicas that hold every change (drvs/fs/replica.py keeps this)."""
    import json

    from ..fs.replica import STATE

    entry = store.get(STATE + vm)
    return json.loads(entry.value)["in_sync"] if entry is not None else []


def _server_of(store, endpoint: str) -> str | None:
    import json

    from ..ipc.fabric import REGISTRY

    entry = store.get(REGISTRY + endpoint)
    return json.loads(entry.value)["node"] if entry is not None else None
