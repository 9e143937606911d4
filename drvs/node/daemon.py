"""drvmmd: the node daemon (DRVMM).

On a single node nothing needs it: drvs-run creates cells on demand and the
last run tears them down, as podman works without a daemon.  What drvmmd
adds there is housekeeping: it reconciles the node's cells with what is
really running, so cells, cgroups and records left by runs that were killed
(SIGKILL, a crash) are removed.  The fabric (Cap'n Proto RPC between nodes,
membership, placement) grows here.
"""

import functools
import glob
import json
import logging
import os
import signal
import sys

import trio

from .. import config
from ..cli.common import Parser
from ..cluster.context import cluster_info, etcd_client
from ..cluster.etcd import EtcdUnavailable
from ..cluster.membership import Member
from ..errors import Conflict, DrvsError, SetupError, UsageError, user_error
from ..ns import cell as cells
from . import malloc

log = logging.getLogger("drvmmd")


def tidy_once(cfg: config.Config) -> dict:
    """One reconciliation pass; returns what it removed."""
    removed = {"cells": [], "runs": []}
    for vm in cells.cells(cfg):
        with cells.locked(cfg, vm) as lock:
            if cells.release(lock):
                removed["cells"].append(vm)
    for path in sorted(glob.glob(f"{cfg.runs_dir}/*.json")):
        try:
            with open(path) as f:
                os.kill(json.load(f)["monitor"], 0)
        except (OSError, ValueError, KeyError):
            cells._unlink(path)
            removed["runs"].append(os.path.basename(path)[:-5])
    return removed


async def serve(cfg: config.Config, interval: float) -> None:
    """Single node: housekeeping only."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_tidy_loop, cfg, interval)
        await _until_signalled()
        nursery.cancel_scope.cancel()


async def serve_node(cfg: config.Config, info: dict, interval: float) -> None:
    """A cluster node: membership in etcd, the fabric, DRVMM services,
    housekeeping.  Runs as trio guest on capnp's asyncio loop."""
    from ..ipc import client
    from ..ipc.fabric import FABRIC_PORT, Fabric, Tls
    from ..cluster import bootstrap, revocation
    from ..ipc.services import DrvmmService
    from . import reconcile
    from .spawner import Spawner

    if not info.get("tls"):
        raise SetupError(f"{cfg.state_dir}/cluster.json: no TLS credentials for the fabric (join this node again)")
    try:  # (before joining: a copied state directory on another machine must not take this node's place)
        bootstrap.check_local(info["address"])
    except UsageError as e:
        raise SetupError(f"{cfg.state_dir}/cluster.json: {e}") from None
    tls = Tls(**info["tls"])
    async with etcd_client(info) as etcd:
        member = Member(etcd, info["node"], info["address"], node_uid(cfg), _serial(info["tls"]["cert"]))
        fabric = Fabric(etcd, member, info.get("port", FABRIC_PORT), tls)
        fabric.spawner = Spawner()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_stop_on_signal, nursery.cancel_scope)
                fabric.nursery = nursery
                # (joining first: a name another live node holds is refused
                # before anything is bound; a second drvmmd of this node
                # never gets here, see _only_daemon)
                await member.join_with_backoff()
                # (the certificates of removed nodes known before the first connection is served)
                keeping = revocation.crl_keeping(cfg.state_dir, info)
                write_crl = revocation.crl_writer(*keeping) if keeping else None

                async def revoked(serials) -> bool:
                    fabric.cut_revoked()
                    return await write_crl(serials) if write_crl else True

                await nursery.start(fabric.revoked.follow, etcd, revoked)
                await fabric.listen(info["address"], client.socket_path(cfg.state_dir))
                if bootstrap.serving_ca(cfg.state_dir):
                    from ..ipc.bridge import current_guest

                    join_service = bootstrap.server_class()(cfg.state_dir, info, etcd, current_guest())
                    await fabric.listen_bootstrap(info["address"], join_service)
                service = f"drvmm@{info['node']}"
                drvmm_service = DrvmmService(etcd, member, fabric, cfg)
                # Others see this node Ready from the join on: the rest of the
                # start rides out an etcd outage rather than end the daemon.
                await fabric.register_steadily(service, drvmm_service.handle, drvmm_service.fast)
                pid_range = await _start_dvos(cfg, info, etcd, fabric, member, nursery)
                member.servers = lambda: sorted(fabric.handlers)
                try:
                    await member.publish()
                except EtcdUnavailable as e:
                    log.warning("membership: %s; member.run publishes when etcd is back", e)
                member.on_new_lease = fabric.reregister
                log.info("node %s joined cluster %s at %s", info["node"], info["cluster"], info["address"])
                nursery.start_soon(member.run)
                nursery.start_soon(_tidy_loop, cfg, interval)
                nursery.start_soon(reconcile.run, cfg, etcd, info["node"], pid_range, fabric.spawner,
                                   functools.partial(_vms_now, fabric))
        finally:
            fabric.close()
            fabric.spawner.close()
            # Leave at once (NotReady now, not after the lease's TTL).
            with trio.move_on_after(2, shield=True):
                await member.leave()


def _serial(cert: str) -> str:
    from ..cluster import pki

    try:
        with open(cert, "rb") as f:
            return pki.serial_of(f.read())
    except (OSError, ValueError) as e:
        raise SetupError(f"{cert}: this node's certificate cannot be read ({e}); join this node again") from None


async def _start_dvos(cfg, info, etcd, fabric, member, nursery) -> tuple[int, int]:
    """The node's part of each DVOS: its pid range, the system-call
    supervisor, the process manager's per-node half, the VMs' PMs and file
    servers, and the view (/proc and file systems) its jails bind."""
    from .. import _sys
    from ..cluster.bootstrap import _write_json
    from ..dvos import pidrange, view
    from ..fs import service as fs_service
    from ..dvos.pm import server as pm_server
    from ..dvos.pm.procs import NodeProcs
    from ..dvos.supervisor import Supervisor

    try:
        _sys.probe()
    except OSError as e:
        raise SetupError(f"this kernel cannot serve DVOS system calls ({e.filename}: {e.strerror}): "
                         "seccomp user notification is needed (Linux 5.0 or later)") from None
    if not pidrange.kernel_has_pid_max_per_namespace():
        # Before 6.14 pid_max is one host-wide value, often too small for
        # the ranges (since 6.14 a new pid namespace may use every pid).
        raise SetupError(f"VM-wide pids need Linux 6.14 or later (pid_max per pid namespace); "
                         f"this is {os.uname().release}")
    if info.get("pid_index") != member.pid_index:
        # drvs-run reads it from here when it creates a cell itself.
        info["pid_index"] = member.pid_index
        _write_json(f"{cfg.state_dir}/cluster.json", info)
    procs = NodeProcs(cfg, info["node"], member.pid_index)
    await fabric.register_steadily(f"procs@{info['node']}", procs.handle, procs.fast)
    supervisor = Supervisor(cfg, info["node"], fabric, etcd, procs, member.pid_index)
    await nursery.start(supervisor.serve)
    # Called in the spawner thread: hand the listener over to the loop.
    token = trio.lowlevel.current_trio_token()
    fabric.supervise = lambda _cfg, vm, fd: token.run_sync_soon(supervisor.adopt, vm, fd)
    nursery.start_soon(pm_server.run, etcd, fabric, member, procs)
    await nursery.start(fs_service.run, cfg, etcd, fabric, member)
    await nursery.start(view.serve, cfg, fabric, procs, etcd)
    from ..ns import mounts

    supervisor.locks.view = fabric.view
    supervisor.locks.device = mounts.fuse_device(view.mountpoint(cfg))
    nursery.start_soon(supervisor.locks.run)
    return pidrange.bounds(member.pid_index)


async def _until_signalled() -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("stopping on signal %d", signum)
            return


async def _stop_on_signal(scope: trio.CancelScope) -> None:
    await _until_signalled()
    scope.cancel()


def node_uid(cfg: config.Config) -> str:
    """This node's identity across restarts (a random id kept in its state)."""
    path = f"{cfg.state_dir}/node-uid"
    try:
        with open(path) as f:
            return f.read().strip()
    except FileNotFoundError:
        os.makedirs(cfg.state_dir, exist_ok=True)
        uid = os.urandom(8).hex()
        with open(path, "w") as f:
            f.write(uid)
        return uid


async def _tidy_loop(cfg: config.Config, interval: float) -> None:
    while True:
        try:
            removed = await trio.to_thread.run_sync(tidy_once, cfg)
            if removed["cells"] or removed["runs"]:
                log.info("removed %s", removed)
        except Exception:  # noqa: BLE001 - housekeeping must not take the node down
            log.exception("housekeeping failed; trying again in %.0f s", interval)
        await trio.sleep(interval)



def _vms_now(fabric, made: dict, when: float) -> None:
    """The reconciler's news of which VMs there are, for the view (once it serves)."""
    view = getattr(fabric, "view", None)
    if view is not None:
        view.vms_now(made, when)

def _only_daemon(cfg) -> int:
    """The node's one drvmmd (drvs/node/lockfile.py): the lock, or Conflict."""
    from . import lockfile

    fd, holder = lockfile.take(cfg)
    if holder is not None:
        raise Conflict(f"another drvmmd runs for this node ({cfg.state_dir}, pid {holder})")
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="drvmmd", description="DRVS node daemon.")
    p.add_argument("--once", action="store_true", help="one housekeeping pass, then exit")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between passes")
    args = p.parse_args(argv)
    # (when: a log read beside a fault -- a node killed, a fail-over -- must be lined up with it)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s.%(msecs)03d drvmmd: %(message)s",
                        datefmt="%Y-%m-%dT%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if os.geteuid() != 0:
        print("drvmmd: needs root (cells are cgroups and namespaces)", file=sys.stderr)
        return 77
    malloc.keep_large_buffers()
    try:
        cfg = config.load()
        if args.once:
            print(json.dumps(tidy_once(cfg)))
            return 0
        info = cluster_info(cfg)
        if info:
            from ..cluster import etcd_process
            from ..ipc import bridge

            _only_daemon(cfg)  # (its descriptor stays open, the lock held, until this process ends)

            try:
                if etcd_process.ensure_local(cfg.state_dir, info) is not None:
                    log.info("the cluster's etcd was not running on this node: started it again")
            except SetupError as e:  # (slow to answer, say: joining waits for it as for any etcd)
                log.warning("the cluster's etcd on this node: %s", e)

            # The cells this daemon makes double-fork their inits: as a
            # subreaper it is their parent, whichever process ends them
            # (its reconciler collects those that ended: cells.reap_ended_inits).
            import prctl

            prctl.set_child_subreaper(True)
            profile = os.environ.get("DRVS_PROFILE")  # a file for cProfile's figures (benchmarks)
            if profile:
                import cProfile

                prof = cProfile.Profile()
                try:
                    prof.runcall(bridge.run, serve_node, cfg, info, args.interval)
                finally:
                    prof.dump_stats(f"{profile}.{info['node']}")
            else:
                bridge.run(serve_node, cfg, info, args.interval)
        else:
            trio.run(serve, cfg, args.interval)
    except (DrvsError, BaseExceptionGroup) as exc:
        e = user_error(exc)
        if e is None:
            raise
        print(f"drvmmd: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
