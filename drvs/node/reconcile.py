"""The kubelet of a node: make this node's cells what the VM definitions say.

For every VM with a share of this node: a pinned cell with the share's
limits (created, or resized in place).  For every pinned cell whose VM is
gone or has no share here any more, and every cell of a VM removed (one
without shares runs wherever it is started): its programs are ended and
the cell removed.  Runs on start (a restarted daemon adopts the cells it finds, it
does not duplicate them), on every change under /drvs/vms/, and every few
seconds as a safety net."""

import json
import logging
import os
import time

import trio

from ..cluster.etcd import Changes, EtcdUnavailable
from ..errors import DrvsError
from ..ns import cell as cells
from ..ns import jail
from . import runs
from ..vm.model import VmSpec
from ..vm.registry import VMS

log = logging.getLogger("drvmmd")
RESYNC = 5.0


def reconcile_once(cfg, node: str, vms: list[VmSpec], pid_range=(0, 0), when: float | None = None,
                   forget: bool = False) -> dict:
    """One pass over vms, all the VMs there were at `when` (time.time());
    returns what changed, and what failed (per VM: one VM's share that
    cannot be applied does not hold up the others').  forget: also the
    ended runs and empty directories of VMs not among them."""
    changed = {"created_or_resized": [], "removed": [], "failed": {}}
    desired = {vm.name: vm for vm in vms if node in vm.shares}
    for name, vm in desired.items():
        try:
            with cells.locked(cfg, name) as lock:
                had = cells.find(lock)
                if had is not None:
                    had.close()
                cell = cells.ensure(lock, vm, vm.shares[node], pin=True, pid_range=pid_range)  # (strict: said)
                cell.close()
                if had is None:
                    changed["created_or_resized"].append(name)
        except DrvsError as e:
            changed["failed"][name] = str(e)
    defined = {vm.name: vm for vm in vms}
    names = set(defined)
    for name in cells.cells(cfg):
        if name in desired:
            continue
        try:
            with cells.locked(cfg, name) as lock:
                record = lock.read_record() or {}
                # A pinned cell whose share went; or a cluster cell of a VM removed:
                # one made or used by a run before `when` had its VM defined then,
                # so in vms unless removed since.
                last = max(record.get("created", when or 0), record.get("used", 0))
                if record.get("pinned") or (name not in names and record.get("cluster") and when is not None
                                            and last < when):
                    cells.release(lock, force=True)
                    changed["removed"].append(name)
                elif name in defined and not defined[name].shares and record.get("cluster"):
                    cells.resize(lock, defined[name].limits)  # (drvs vm update of a VM without shares: live)
        except DrvsError as e:
            changed["failed"][name] = str(e)
    if forget and when is not None:  # (as `drvs vm rm` does on its own node; after their cells went)
        runs.forget_runs(cfg, lambda vm: vm not in names, before=when)
        for vm in _vm_dirs(cfg) - names:
            jail.drop_data_dirs(cfg, vm)
    cells.reap_ended_inits()  # (of cells that `drvs vm rm` here ended: their inits are this daemon's children)
    return changed


def _vm_dirs(cfg) -> set[str]:
    try:
        return set(os.listdir(cfg.vms_dir))
    except FileNotFoundError:
        return set()


APPLIED = "/drvs/applied/"  # NODE/VM -> {"revision", "error"}: the VM's definition this node's cell took, or why not


def applied_key(node: str, vm: str) -> str:
    return f"{APPLIED}{node}/{vm}"


async def _tell_applied(etcd, node: str, told: dict, now: dict) -> None:
    """Say, for the VMs with a share here, which revision of their
    definition the cell took or why it could not (drvs vm update waits for
    it); only what changed since last said.  now: VM -> (revision, error)."""
    for vm, state in now.items():
        if told.get(vm) != state:
            revision, error = state
            await etcd.put(applied_key(node, vm), json.dumps({"revision": revision, "error": error}))
            told[vm] = state
    for vm in [vm for vm in told if vm not in now]:
        await etcd.delete(applied_key(node, vm))
        del told[vm]


def last_read_path(cfg) -> str:
    return f"{cfg.state_dir}/vms-last-read.json"


def _keep_last_read(cfg, entries, kept: "str | None") -> "str | None":
    """The VM definitions as this pass read them, written down when they
    changed: while etcd is away, drvs-run still starts programs in the cells
    of this node's shares (drvs/cli/run.py), as they were last defined."""
    text = json.dumps({e.key[len(VMS):]: e.value for e in entries}, sort_keys=True)
    if text == kept:
        return kept
    path = last_read_path(cfg)
    try:
        with open(f"{path}.tmp", "w") as f:
            f.write(json.dumps({"at": time.time(), "vms": json.loads(text)}))
        os.rename(f"{path}.tmp", path)
    except OSError as e:
        log.warning("reconcile: %s: %s", path, e.strerror)
        return kept
    return text


async def run(cfg, etcd, node: str, pid_range=(0, 0), spawner=None, on_vms=None) -> None:
    """spawner: the daemon's kernel-work thread (cells are made there, off
    the loop, which may be needed meanwhile by a jail's FUSE mounts).
    on_vms: told the VMs there are (name -> create revision) at each pass,
    and the trio time before it asked (the view forgets the file systems of
    VMs removed)."""
    changes = Changes(etcd, VMS, "reconcile")
    failed: dict = {}
    told: dict = {}  # what _tell_applied said
    seen = None  # the VMs of the last pass: runs are forgotten only when some went
    kept = None  # the definitions last written down (see _keep_last_read)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(changes.watch)
        while True:
            try:
                when, wall = trio.current_time(), time.time()
                entries = await etcd.range(VMS)
                vms = [VmSpec.from_json(e.value) for e in entries]
                kept = _keep_last_read(cfg, entries, kept)
                if on_vms is not None:
                    on_vms({vm.name: e.create_revision for vm, e in zip(vms, entries)}, when)
                names = {vm.name for vm in vms}
                forget = seen is None or bool(seen - names)
                if spawner is not None:
                    changed = await spawner.call(reconcile_once, cfg, node, vms, pid_range, wall, forget)
                else:
                    changed = reconcile_once(cfg, node, vms, pid_range, wall, forget)
                seen = names
                if changed["created_or_resized"] or changed["removed"]:
                    log.info("cells: created or resized %s, removed %s", changed["created_or_resized"],
                             changed["removed"])
                for name, why in changed["failed"].items():
                    if failed.get(name) != why:  # (said once, not every pass)
                        log.warning("reconcile: VM %s: %s", name, why)
                failed = changed["failed"]
                await _tell_applied(etcd, node, told, {
                    vm.name: (e.mod_revision, changed["failed"].get(vm.name))
                    for vm, e in zip(vms, entries) if node in vm.shares})
            except (DrvsError, EtcdUnavailable) as e:
                log.warning("reconcile: %s", e)
            await changes.wait(RESYNC)
