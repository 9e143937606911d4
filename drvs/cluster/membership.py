"""Node membership in etcd: who is in the cluster, who is alive, their load.

    /drvs/nodes/NAME/spec    what the node is (address, CPUs, memory, version,
                             when it joined, whether it is cordoned); stays
    /drvs/nodes/NAME/status  alive and how loaded; attached to the node's
                             lease, so it vanishes within the TTL of a death

A node is Ready while its status key exists, NotReady when it has gone, and
SchedulingDisabled when cordoned.
"""

import json
import logging
import os
import time

import psutil
import trio

from .. import __version__
from ..errors import Conflict
from ..store import CompareFailed
from .etcd import Etcd, EtcdError, EtcdUnavailable

log = logging.getLogger("drvmmd")

ROOT = "/drvs/nodes/"
PID_RANGES = "/drvs/pidranges/"  # INDEX -> node name: who owns which VM pid range
LEASE_TTL = 3          # seconds: a dead node is NotReady within this (plus a beat)
STATUS_EVERY = 1.0     # seconds between status refreshes (and keep-alives)
# A daemon waiting for etcd asks again at most this often: one request each
# time, and the node is back (Ready, its new pid in its status) within this
# of etcd's return -- until then the node's old status may still show Ready,
# as etcd gives every lease its whole TTL again when it starts.
JOIN_BACKOFF_MAX = 2.0


def spec_key(name: str) -> str:
    return f"{ROOT}{name}/spec"


def status_key(name: str) -> str:
    return f"{ROOT}{name}/status"


def node_resources() -> tuple[int, int]:
    """CPUs this node may use (its affinity) and its memory in bytes."""
    return len(os.sched_getaffinity(0)), psutil.virtual_memory().total


def sample_load(proc_cpus: int) -> dict:
    return {"cpu_percent": _cpu_percent(),
            "memory_percent": psutil.virtual_memory().percent,
            "load1": os.getloadavg()[0] / max(proc_cpus, 1)}


def _cpu_percent() -> float:
    """How busy this node's CPUs are (those it may use: a node pinned to
    some of the machine's, as a dev cluster's with --cpus-per-node, is not
    the whole machine), since the last sample."""
    per_cpu = dict(zip(_online_cpus(), psutil.cpu_percent(interval=None, percpu=True)))  # (online ones, in order)
    mine = [per_cpu[cpu] for cpu in os.sched_getaffinity(0) if cpu in per_cpu]
    return round(sum(mine) / len(mine), 1) if mine else psutil.cpu_percent(interval=None)


def _online_cpus() -> list[int]:
    """The numbers of the CPUs online ("0-3,6"), which psutil's per-CPU
    figures follow in order (an offline CPU has none)."""
    try:
        with open("/sys/devices/system/cpu/online") as f:
            text = f.read().strip()
    except OSError:
        return list(range(os.cpu_count() or 1))
    cpus = []
    for part in filter(None, text.split(",")):
        first, _, last = part.partition("-")
        cpus.extend(range(int(first), int(last or first) + 1))
    return cpus


async def claim_pid_range(etcd: Etcd, name: str) -> int:
    """This node's pid range index: the one it holds, or the lowest free one,
    claimed by compare-and-swap (two nodes joining at once never share)."""
    from ..dvos.pidrange import MAX_INDEX

    while True:
        held = {int(e.key[len(PID_RANGES):]): e.value for e in await etcd.range(PID_RANGES)}
        for index, owner in held.items():
            if owner == name:
                return index
        free = next((i for i in range(1, MAX_INDEX + 1) if i not in held), None)
        if free is None:
            raise Conflict(f"no free pid range for node {name!r}: the cluster has {MAX_INDEX} nodes")
        try:
            await etcd.put(f"{PID_RANGES}{free}", name, expect_revision=0)
            return free
        except CompareFailed:
            continue  # another node took it first: look again


class Member:
    """This node's presence in the cluster, kept alive by a lease."""

    def __init__(self, etcd: Etcd, name: str, address: str, uid: str, serial: str = ""):
        self.etcd, self.name, self.address, self.uid = etcd, name, address, uid
        self.serial = serial  # of this node's certificate: what `drvs node rm` revokes
        # The servers this node hosts, as each status says them: asked anew
        # every time (a VM's file server comes and goes with elections).
        self.servers = lambda: []
        self.lease = 0
        self.on_new_lease = None  # async callback: re-attach what the old lease held
        # Called (plain functions) when the lease is lost: what it held in
        # etcd -- leaderships above all -- is gone, and who acted on them
        # must stop (see drvs/dvos/elected.py); a set per lease, emptied then.
        self.lease_lost: set = set()
        self.cpus, self.memory = node_resources()
        self.pid_index = 0
        self.answered = 0.0  # (time.monotonic) when etcd last answered the status refresh

    async def join(self) -> None:
        """Register, refusing a name held by another live node."""
        status = await self.etcd.get(status_key(self.name))
        if status is not None:
            held = json.loads(status.value)
            if held.get("uid") != self.uid:
                raise Conflict(f"node name {self.name!r} is in use by a live node at {held.get('address')}")
            if held.get("address") != self.address:  # (this node's identity, copied to another machine)
                raise Conflict(f"node {self.name!r} is live at {held.get('address')}, with this node's identity "
                               "(a copied state directory?)")
        spec = await self.etcd.get(spec_key(self.name))
        joined = json.loads(spec.value)["joined"] if spec else time.time()
        cordoned = json.loads(spec.value).get("cordoned", False) if spec else False
        self.pid_index = await claim_pid_range(self.etcd, self.name)
        await self.etcd.put(spec_key(self.name), json.dumps({
            "name": self.name, "address": self.address, "uid": self.uid, "cpus": self.cpus,
            "memory": self.memory, "cpu_list": sorted(os.sched_getaffinity(0)),
            "version": __version__, "joined": joined, "cordoned": cordoned,
            "pid_index": self.pid_index, "serial": self.serial}))
        self.lease = await self.etcd.grant(LEASE_TTL)
        await self.publish()

    async def publish(self) -> None:
        await self.etcd.put(status_key(self.name), json.dumps({
            "uid": self.uid, "address": self.address, "pid": os.getpid(), "updated": time.time(),
            "servers": self.servers(), **sample_load(self.cpus)}), lease=self.lease)

    async def run(self) -> None:
        """Keep the lease and the status fresh; re-join if the lease was lost
        (etcd was away longer than the TTL); ride out etcd outages."""
        backoff = STATUS_EVERY
        reattach = False
        while True:
            await trio.sleep(backoff)
            try:
                if await self.etcd.keepalive_once(self.lease) <= 0:
                    old, self.lease = self.lease, await self.etcd.grant(LEASE_TTL)
                    self._lost(old)  # (after the grant: who stood down campaigns under the new lease)
                    reattach = True
                if reattach and self.on_new_lease is not None:
                    await self.on_new_lease()
                reattach = False
                await self.publish()
                self.answered = time.monotonic()
                backoff = STATUS_EVERY
            except (EtcdUnavailable, EtcdError, ValueError, KeyError) as e:
                log.warning("membership: %s; retrying", e)
                # Retry well within the lease's TTL, or the node drops out.
                backoff = min(backoff * 2, LEASE_TTL / 3)

    def _lost(self, lease: int) -> None:
        log.warning("membership: lease %x expired (etcd was away, or this node stalled); "
                    "what it held is given up", lease)
        callbacks, self.lease_lost = self.lease_lost, set()
        for callback in callbacks:
            callback()

    async def join_with_backoff(self) -> None:
        """join(), waiting out an unreachable etcd (a name clash is final)."""
        backoff = 0.25
        while True:
            try:
                return await self.join()
            except EtcdUnavailable as e:
                log.warning("%s; retrying in %.1f s", e, backoff)
                await trio.sleep(backoff)
                backoff = min(backoff * 2, JOIN_BACKOFF_MAX)

    async def leave(self) -> None:
        if self.lease:
            await self.etcd.revoke(self.lease)


async def remove_node(etcd: Etcd, name: str) -> bool:
    """Forget a node that is gone for good (drvs node rm): its spec and pid
    range, so that its name and range may be had again, and its certificate,
    which no node nor etcd accepts from then on (False: its certificate is
    not known, as for a node that joined before certificates were recorded).  Refused while it
    is Ready (its drvmmd would be a member without a record) or while VMs
    have shares of it (they would name a node that is not there)."""
    from ..errors import Conflict, NotFound
    from ..vm.model import VmSpec
    from .revocation import revoked_key
    from ..node.reconcile import APPLIED
    from ..vm.registry import VMS

    spec = await etcd.get(spec_key(name))
    if spec is None:
        raise NotFound(f"no such node: {name!r}")
    if await etcd.get(status_key(name)) is not None:
        raise Conflict(f"node {name!r} is Ready: stop its drvmmd first (then it is NotReady within seconds)")
    holders = sorted(vm.name for vm in (VmSpec.from_json(e.value) for e in await etcd.range(VMS))
                     if name in vm.shares)
    if holders:
        raise Conflict(f"node {name!r} has shares of VMs {', '.join(holders)}: remove those VMs first")
    # Its certificate is taken back with the name (drvs/cluster/revocation.py).
    serial = json.loads(spec.value).get("serial")
    try:
        await etcd.delete_and_put(spec_key(name), spec.mod_revision, {revoked_key(serial): name} if serial else {})
        for entry in await etcd.range(PID_RANGES):
            if entry.value == name:
                await etcd.delete(entry.key, expect_revision=entry.mod_revision)
        await etcd.delete_prefix(f"{APPLIED}{name}/")  # (what its cells took: drvs/node/reconcile.py)
    except CompareFailed:
        raise Conflict(f"node {name!r} changed while it was being removed (joining again?); look and retry") from None
    return bool(serial)


async def set_cordoned(etcd: Etcd, name: str, cordoned: bool) -> bool:
    """Mark a node (un)schedulable; compare-and-swap so that a concurrent
    re-registration is not overwritten.  False if there is no such node."""
    while True:
        entry = await etcd.get(spec_key(name))
        if entry is None:
            return False
        spec = json.loads(entry.value)
        spec["cordoned"] = cordoned
        try:
            await etcd.put(spec_key(name), json.dumps(spec), expect_revision=entry.mod_revision)
            return True
        except CompareFailed:
            continue


async def list_nodes(etcd: Etcd) -> list[dict]:
    """Every node with its STATUS worked out from spec and status keys."""
    entries = await etcd.range(ROOT)
    specs, statuses = {}, {}
    for e in entries:
        name, _, kind = e.key[len(ROOT):].partition("/")
        (specs if kind == "spec" else statuses)[name] = json.loads(e.value)
    nodes = []
    for name, spec in sorted(specs.items()):
        status = statuses.get(name)
        state = "NotReady" if status is None else "SchedulingDisabled" if spec.get("cordoned") else "Ready"
        nodes.append({**spec, "status": state, "load": status})
    return nodes
