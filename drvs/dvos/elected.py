"""DVOS servers that run on one node of their VM at a time: pm@VM, fs@VM.

Every node that may serve SERVICE@VM campaigns in an etcd election held by
its lease; the leader makes the server and registers the endpoint.  When
its node dies the lease goes, another candidate is elected within the
lease's TTL and registers the endpoint again; callers re-resolve."""

import logging

import trio

from ..cluster.etcd import EtcdUnavailable
from ..errors import DrvsError, user_error
from ..vm.registry import VMS

log = logging.getLogger("drvmmd")
ELECTIONS = "/drvs/elections/"
RESYNC = 1.0  # seconds between looks at the VM list (a new VM is served within this)


async def run(etcd, fabric, member, service: str, candidate, make, gone=None) -> None:
    """Campaign for service@VM for every VM whose spec candidate(spec)
    accepts, as VMs come and go.  make(vm) (a coroutine function) -> a
    server with handle(msg), and optionally fast(msg), run() (what it does
    while it serves) and close(); make may raise DrvsError (logged; the
    node then stands down and tries again later).  gone(vm, made): called once a
    VM this node campaigned for is no longer defined (made: the removed
    definition's create revision)."""
    from ..vm.model import VmSpec

    # name -> (the VM definition's create revision, the campaign's scope,
    # set when it has ended): a VM removed and made again under its name
    # within RESYNC is another VM, served afresh (after gone() of the old)
    campaigns: dict[str, tuple[int, trio.CancelScope, trio.Event]] = {}
    said = ""
    async with trio.open_nursery() as nursery:
        while True:
            try:
                entries = await etcd.range(VMS)
                vms = {e.create_revision: VmSpec.from_json(e.value) for e in entries}
                said = ""
            except (EtcdUnavailable, DrvsError) as e:
                if str(e) != said:  # once while it lasts (this looks every RESYNC)
                    log.warning("%s servers: %s", service, e)
                    said = str(e)
                vms = None
            if vms is not None:
                wanted = {vm.name: made for made, vm in vms.items() if candidate(vm)}
                defined = {vm.name: made for made, vm in vms.items()}
                for name in list(campaigns):
                    made, scope, ended = campaigns[name]
                    if wanted.get(name) == made:
                        continue
                    del campaigns[name]
                    scope.cancel()
                    await ended.wait()  # (its server closed before another of the name, or its removal)
                    if gone is not None and defined.get(name) != made:
                        await gone(name, made)
                for name in wanted.keys() - campaigns.keys():
                    ended = trio.Event()
                    scope = await nursery.start(_serve, service, name, etcd, fabric, member, make, ended)
                    campaigns[name] = (wanted[name], scope, ended)
            await trio.sleep(RESYNC)


async def _serve(service, vm, etcd, fabric, member, make, ended: trio.Event,
                 task_status=trio.TASK_STATUS_IGNORED) -> None:
    try:
        await _campaign(service, vm, etcd, fabric, member, make, task_status)
    finally:
        ended.set()


async def _campaign(service, vm, etcd, fabric, member, make, task_status) -> None:
    scope = trio.CancelScope()
    task_status.started(scope)
    state = {"refusal": ""}
    with scope:
        while True:
            # A leadership is the node lease's: when that lease is lost (this
            # node stalled, or etcd was away, past its TTL) etcd has dropped
            # the leader key and another node may serve; this one stops,
            # then campaigns again under its new lease.
            held = trio.CancelScope()
            member.lease_lost.add(held.cancel)
            try:
                with held:
                    await _lead(service, vm, etcd, fabric, member, make, state)
            finally:
                member.lease_lost.discard(held.cancel)
            if held.cancelled_caught:
                log.warning("%s@%s: this node's lease was lost; stood down, campaigning again", service, vm)


async def _lead(service, vm, etcd, fabric, member, make, state) -> None:
    """One campaign, and serving while elected."""
    endpoint = f"{service}@{vm}"
    try:
        leadership = await etcd.campaign(f"{ELECTIONS}{service}/{vm}", member.name, member.lease)
    except (EtcdUnavailable, DrvsError) as e:
        log.warning("%s: campaign: %s", endpoint, e)
        await trio.sleep(1)
        return
    server = None
    try:
        try:
            server = await make(vm)
            await fabric.register(endpoint, server.handle, getattr(server, "fast", None), elected=True)
        except (EtcdUnavailable, DrvsError) as e:
            if str(e) != state["refusal"]:
                log.warning("%s: cannot serve (%s); standing down", endpoint, e)
                state["refusal"] = str(e)
            await trio.sleep(RESYNC)
            return  # (finally resigns)
        state["refusal"] = ""
        log.info("serving %s", endpoint)
        try:
            await (server.run() if hasattr(server, "run") else trio.sleep_forever())
        except (DrvsError, BaseExceptionGroup) as exc:  # the server found it must stop (a newer term)
            if isinstance(exc, BaseExceptionGroup) and exc.split(DrvsError)[1] is not None:
                raise  # (something else failed too: not a stand-down)
            log.warning("%s: %s", endpoint, user_error(exc))
            await trio.sleep(RESYNC)
    finally:
        with trio.move_on_after(2, shield=True):
            try:
                await fabric.unregister(endpoint)  # (only while the registry still names this node)
                await etcd.resign(leadership)
            except (EtcdUnavailable, DrvsError):
                pass
        if server is not None and hasattr(server, "close"):
            server.close()
