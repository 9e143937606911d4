"""`drvs node ls|show` and `drvs dev cluster up|down|status`."""

import os
import sys

from .. import config
from ..cluster.context import cluster_info, dev_cluster_file, no_cluster, read_json
from ..errors import NotFound, SetupError, UsageError
from ..units import format_size
from .common import add_format, age, emit, print_table


def add_parsers(sub) -> None:
    node = sub.add_parser("node", help="the cluster's nodes")
    verbs = node.add_subparsers(dest="verb", required=True, metavar="VERB")
    p = verbs.add_parser("ls", help="list nodes")
    add_format(p)
    p.set_defaults(func=ls)
    for verb, text in (("cordon", "mark a node unschedulable: new programs are placed there no more (one "
                                  "run with --node NODE still goes there, as a pod given its node does)"),
                       ("uncordon", "mark a node schedulable again")):
        p = verbs.add_parser(verb, help=text)
        p.add_argument("name", metavar="NODE")
        p.set_defaults(func=cordon, cordoned=verb == "cordon")
    p = verbs.add_parser("rm", help="forget a node that is gone for good (NotReady, no VM shares on it) "
                                    "and revoke its certificate")
    p.add_argument("name", metavar="NODE")
    p.set_defaults(func=rm)
    p = verbs.add_parser("reset", help="undo cluster init or node join on this machine (drvmmd stopped): "
                                       "its cells and programs, its VMs' files, its credentials; it may join again")
    p.add_argument("-f", "--force", action="store_true", help="do not ask first")
    p.set_defaults(func=reset)
    p = verbs.add_parser("join", help="join this node to the cluster whose first node is at ADDRESS")
    p.add_argument("server", metavar="ADDRESS", help="the first node's address")
    p.add_argument("--token", required=True, help="as printed by `drvs cluster init`")
    p.add_argument("--address", required=True, help="this node's address, as the others reach it")
    p.add_argument("--node-name", default=None, help="this node's name (default: the host name)")
    p.add_argument("--port", type=int, default=7700, help="the cluster's fabric port")
    p.set_defaults(func=join)
    p = verbs.add_parser("show", help="one node")
    p.add_argument("name", metavar="NODE")
    add_format(p)
    p.set_defaults(func=show)

    cl = sub.add_parser("cluster", help="make a cluster")
    cverbs = cl.add_subparsers(dest="cluster_verb", required=True, metavar="VERB")
    p = cverbs.add_parser("init", help="make this node the first of a new cluster")
    p.add_argument("--address", required=True, help="this node's address, as the others reach it")
    p.add_argument("--name", default="drvs", help="the cluster's name")
    p.add_argument("--node-name", default=None, help="this node's name (default: the host name)")
    p.add_argument("--etcd", action="append", default=[], metavar="URL",
                   help="use this etcd (default: start one here, data in the state directory)")
    p.set_defaults(func=cluster_init)

    dev = sub.add_parser("dev", help="developer tools")
    dverbs = dev.add_subparsers(dest="dev_verb", required=True, metavar="VERB")
    cl = dverbs.add_parser("cluster", help="a cluster of real nodes on this machine")
    cverbs = cl.add_subparsers(dest="cluster_verb", required=True, metavar="VERB")
    p = cverbs.add_parser("up", help="start N nodes (network namespaces), etcd and a drvmmd per node")
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--cpus-per-node", type=int, default=None, metavar="K", help="pin each node to its own K CPUs")
    p.add_argument("--name", default="dev", help="cluster name (namespaces are drvs-NAME-*)")
    p.set_defaults(func=dev_up)
    p = cverbs.add_parser("down", help="stop and remove the dev cluster")
    p.set_defaults(func=dev_down)
    p = cverbs.add_parser("restart", help="start a node's drvmmd, or the cluster's etcd, again (stopping it "
                                           "first if it runs)")
    p.add_argument("node", metavar="NODE|etcd")
    p.set_defaults(func=dev_restart)
    p = cverbs.add_parser("status", help="the dev cluster's nodes and processes")
    add_format(p)
    p.set_defaults(func=dev_status)


def _with_etcd(fn):
    """Run `await fn(etcd)` against this node's cluster store."""
    import trio

    from ..cluster.context import etcd_client

    info = cluster_info(config.load())
    if info is None:
        raise no_cluster(config.load())

    async def go():
        async with etcd_client(info, timeout=3) as etcd:
            return await fn(etcd)

    return trio.run(go)


def cluster_nodes() -> list[dict]:
    from ..cluster.membership import list_nodes

    return _with_etcd(list_nodes)


def cordon(args) -> int:
    from ..cluster.membership import set_cordoned

    if not _with_etcd(lambda etcd: set_cordoned(etcd, args.name, args.cordoned)):
        raise NotFound(f"no such node: {args.name!r}")
    print(f"node/{args.name} {'cordoned' if args.cordoned else 'uncordoned'}")
    return 0


def _shares(node: str) -> dict:
    """The VMs with a share of node, and the CPUs and memory they reserve
    (what `drvs vm create` leaves to new shares, drvs/vm/admission.py)."""
    from ..store import open_store
    from ..vm.admission import given
    from ..vm.registry import VmRegistry

    vms = VmRegistry(open_store()).list()
    return {"vms": sorted(vm.name for vm in vms if node in vm.shares),
            "cpus": given(vms, node, "cpus")[0], "memory": int(given(vms, node, "memory")[0])}


def rm(args) -> int:
    from ..cluster.membership import remove_node

    if _with_etcd(lambda etcd: remove_node(etcd, args.name)):
        print(f"node/{args.name} removed (its name and pid range are free; its certificate is revoked)")
    else:
        print(f"node/{args.name} removed (its name and pid range are free)")
        print(f"drvs: note: node {args.name!r} never ran this version's drvmmd, which records its certificate: "
              "that certificate could not be revoked", file=sys.stderr)
    return 0


def reset(args) -> int:
    from ..cluster.reset import reset as reset_node

    cfg = config.load()
    info = cluster_info(cfg)
    if info is None:
        raise NotFound(f"this node is in no cluster (no {cfg.state_dir}/cluster.json)")
    if not args.force:
        what = (f"node {info['node']} of cluster {info['cluster']}: its programs end, and its cluster data and "
                "credentials are removed")
        if not os.isatty(0):
            raise UsageError(f"resetting {what}; add --force to go on")
        if input(f"Reset {what}. Go on? [y/N] ").strip().lower() not in ("y", "yes"):
            print("drvs: node reset: not done", file=sys.stderr)
            return 1
    for line in reset_node(cfg, info):
        print(f"removed {line}")
    print(f"node {info['node']} reset: it is a single node now (`drvs node join` or `drvs cluster init` again)")
    return 0


def _load(n: dict) -> str:
    load = n.get("load")
    return f"{load['cpu_percent']:.0f}% cpu, {load['memory_percent']:.0f}% mem" if load else "-"


def ls(args) -> int:
    nodes = cluster_nodes()

    def table():
        print_table(["NAME", "STATUS", "ADDRESS", "CPUS", "MEMORY", "LOAD", "SERVERS", "AGE", "VERSION"],
                    [[n["name"], n["status"], n["address"], n["cpus"], format_size(n["memory"]), _load(n),
                      ",".join((n.get("load") or {}).get("servers") or []) or "-", age(n["joined"]), n["version"]]
                     for n in nodes])

    emit(nodes, args.format, table)
    return 0


def show(args) -> int:
    node = next((n for n in cluster_nodes() if n["name"] == args.name), None)
    if node is None:
        raise NotFound(f"no such node: {args.name!r}")
    node["shares"] = _shares(args.name)

    def table():
        import time

        shares = node["shares"]
        shown = {"memory": format_size(node["memory"]),
                 "joined": f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(node['joined']))} "
                           f"({age(node['joined'])} ago)",
                 "load": _load(node),
                 "servers": ",".join((node.get("load") or {}).get("servers") or []) or "-",
                 "shares": f"{', '.join(shares['vms']) or '-'}: {shares['cpus']:g} of {node['cpus']} CPUs, "
                           f"{format_size(shares['memory'])} of {format_size(node['memory'])} reserved"}
        print_table(["FIELD", "VALUE"], [[k, shown.get(k, v)] for k, v in node.items() if k not in ("load", "shares")] +
                    [[k, shown[k]] for k in ("load", "servers", "shares")])

    emit(node, args.format, table)
    return 0


def _node_name(given: str | None) -> str:
    import socket

    return given or socket.gethostname().split(".")[0].lower()


def cluster_init(args) -> int:
    from ..cluster import bootstrap

    if os.geteuid() != 0:
        raise SetupError("drvs cluster init needs root")
    node = _node_name(args.node_name)
    token = bootstrap.init(config.load().state_dir, args.address, args.name, node, args.etcd or None)
    print(f"cluster {args.name} made; this node is {node} at {args.address}.")
    print("Start drvmmd on this node, then on each other node run:")
    print(f"  drvs node join {args.address} --token {token} --address THAT_NODE_ADDRESS")
    import ipaddress

    if ipaddress.ip_address(args.address).is_loopback:
        print(f"drvs: note: {args.address} is a loopback address: only nodes on this machine can reach it",
              file=sys.stderr)
    return 0


def join(args) -> int:
    from ..cluster import bootstrap

    if os.geteuid() != 0:
        raise SetupError("drvs node join needs root")
    node = _node_name(args.node_name)
    info = bootstrap.join(config.load().state_dir, args.server, args.token, args.address, node, args.port)
    print(f"node {node} joined cluster {info['cluster']}; start drvmmd on it")
    return 0


def dev_up(args) -> int:
    from ..dev import cluster

    if os.geteuid() != 0:
        raise SetupError("drvs dev cluster needs root (network namespaces, cgroups)")
    info = cluster.up(config.load().state_dir, args.nodes, args.cpus_per_node, args.name)
    print(f"dev cluster {info['name']}: {len(info['nodes'])} nodes on {info['subnet']}, etcd {info['etcd']['url']}")
    for n in info["nodes"]:
        pin = f", CPUs {n['cpuset']}" if n["cpuset"] else ""
        print(f"  {n['name']}  {n['address']}{pin}   drvs --node {n['name']} ...   (or DRVS_NODE={n['name']})")
    return 0


def dev_down(args) -> int:
    from ..dev import cluster

    gone = cluster.down(config.load().state_dir)
    print(f"dev cluster {gone['name']} removed ({len(gone['namespaces'])} network namespaces)")
    return 0


def dev_restart(args) -> int:
    from ..dev import cluster

    node = cluster.restart(config.load().state_dir, args.node)
    what = "" if node["name"] == "etcd" else " drvmmd"
    was = f"stopped (pid {node['was']}) and " if node.get("was") else ""
    print(f"{node['name']}:{what} {was}running again (pid {node['pid']})")
    return 0


def dev_status(args) -> int:
    info = read_json(dev_cluster_file(config.load().state_dir))
    if info is None:
        raise NotFound("no dev cluster is up")

    def alive(pid):
        try:
            os.kill(pid, 0)
            return "running"
        except ProcessLookupError:
            return "dead"

    def table():
        print_table(["HOST", "ADDRESS", "NETNS", "PID", "STATE"],
                    [["etcd", info["etcd"]["url"], info["etcd"]["netns"], info["etcd"]["pid"], alive(info["etcd"]["pid"])]] +
                    [[n["name"], n["address"], n["netns"], n["pid"], alive(n["pid"])] for n in info["nodes"]])

    emit(info, args.format, table)
    return 0

