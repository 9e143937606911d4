"""`drvs node reset`: undo on this machine what `drvs cluster init` or
`drvs node join` made, as `kubeadm reset` does, so that it can join a
cluster again (after `drvs node rm`, say) or go on as a single node.

Each step is a function of its own, and says what it removed.  The node's
drvmmd must be stopped; its lock is held throughout, so none starts
meanwhile.  What was this machine's before it joined stays: the embedded
store (store.json) and the directories of the VMs it names."""

import os
import select
import shutil
import signal

from ..errors import Conflict, SetupError, os_error


def reset(cfg, info: dict) -> list[str]:
    """What was removed, one line each (info: this node's cluster.json)."""
    if info.get("dev"):
        raise Conflict(f"node {info['node']} is a dev cluster's: `drvs dev cluster down` removes the whole cluster")
    done: list[str] = []
    lock = _hold_daemon_lock(cfg)
    try:
        done += _end_cells(cfg)
        done += _unmount_view(cfg)
        done += _stop_etcd(cfg.state_dir)
        done += _remove_cluster_vms(cfg)
        done += _remove_identity(cfg.state_dir)
    finally:
        os.close(lock)
    return done


def _hold_daemon_lock(cfg) -> int:
    """The lock a running drvmmd holds: taken, or Conflict naming it."""
    from ..node import lockfile

    fd, holder = lockfile.take(cfg)
    if holder is not None:
        raise Conflict(f"drvmmd runs for this node (pid {holder}): stop it first")
    return fd


def _end_cells(cfg) -> list[str]:
    """Every cell of this node, with its programs (all VMs are the cluster's)."""
    from ..ns import cell as cells

    ended = []
    for vm in cells.cells(cfg):
        with cells.locked(cfg, vm) as lock:
            if cells.find(lock) is not None:
                cells.release(lock, force=True)
                ended.append(vm)
            lock.drop_record()
            lock.drop_file()
    return [f"cells of VMs {', '.join(ended)} (their programs ended)"] if ended else []


def _unmount_view(cfg) -> list[str]:
    """The DVOS view a drvmmd killed outright leaves mounted."""
    from ..dvos import view
    from ..ns import mounts

    point = view.mountpoint(cfg)
    if not any(p == point for _, p, _ in mounts.mount_table()):
        return []
    mounts.abort_fuse(point)
    mounts.detach(point)
    return [f"the DVOS view mounted at {point}"]


def _stop_etcd(state_dir: str) -> list[str]:
    """The cluster's etcd, if this node runs it (the first node): stopped,
    its data removed."""
    from .etcd_process import running

    data = f"{state_dir}/etcd"
    if not os.path.isdir(data):
        return []
    pid = running(data)
    if pid is not None:
        _end_process_group(pid, "etcd")
    shutil.rmtree(data)
    return [f"the cluster's etcd{f' (pid {pid}, stopped)' if pid else ''} and its data, {data}"]


def _end_process_group(pid: int, what: str, grace: float = 10.0) -> None:
    """SIGTERM, then after grace SIGKILL, until it has exited (its pidfd
    reads then, also while it waits, a zombie, for a parent to reap it)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                return
            except PermissionError as e:
                raise SetupError(os_error(f"stop {what} (pid {pid})", e)) from None
            if select.select([pidfd], [], [], wait)[0]:
                return
        raise SetupError(f"{what} (pid {pid}) does not exit, even killed")
    finally:
        os.close(pidfd)


def _remove_cluster_vms(cfg) -> list[str]:
    """The cluster's VMs' directories (their file system stores and
    replicas), the node's cache of their files, and their runs' logs."""
    from ..node.runs import forget_runs
    from ..store.embedded import EmbeddedStore
    from ..vm.registry import VMS

    local = {e.key[len(VMS):] for e in EmbeddedStore(cfg.store_path).range(VMS)} \
        if os.path.exists(cfg.store_path) else set()
    try:
        names = sorted(n for n in os.listdir(cfg.vms_dir) if n not in local)
    except FileNotFoundError:
        names = []
    for name in names:
        shutil.rmtree(f"{cfg.vms_dir}/{name}")
    forget_runs(cfg, lambda vm: vm not in local)
    done = [f"the files of VMs {', '.join(names)} ({cfg.vms_dir})"] if names else []
    if os.path.isdir(cfg.cache_dir):
        shutil.rmtree(cfg.cache_dir)
        done.append(f"the node's cache of VM files ({cfg.cache_dir})")
    return done


def _remove_identity(state_dir: str) -> list[str]:
    """Which cluster this node is of, and its credentials (the cluster CA
    too, on the first node)."""
    from .bootstrap import ca_dir

    gone = []
    for path in (f"{state_dir}/cluster.json", f"{state_dir}/node-uid",
                 f"{state_dir}/vms-last-read.json"):  # (the cluster's VMs as last read: drvs/node/reconcile.py)
        if os.path.exists(path):
            os.unlink(path)
            gone.append(path)
    for path in (f"{state_dir}/tls", ca_dir(state_dir)):
        if os.path.isdir(path):
            shutil.rmtree(path)
            gone.append(path + "/")
    return [f"this node's cluster identity and credentials ({', '.join(gone)})"]
