"""Network namespaces joined by veth links to a bridge, with pyroute2.

The layout of a dev cluster NAME on one machine:

    netns drvs-NAME-sw      bridge br0
    netns drvs-NAME-etcd    eth0 10.X.Y.2/24   (veth to br0)
    netns drvs-NAME-n1      eth0 10.X.Y.11/24  (veth to br0)
    ...

Addresses exist only inside these namespaces; nothing is routed out."""

import hashlib
import os

from pyroute2 import NetNS, netns

from ..errors import SetupError


def subnet_for(name: str) -> str:
    """A /24 inside 10.0.0.0/8 chosen from the cluster's name ("10.X.Y")."""
    h = hashlib.sha256(name.encode()).digest()
    return f"10.{200 + h[0] % 50}.{h[1]}"


def ns_name(cluster: str, host: str) -> str:
    return f"drvs-{cluster}-{host}"


def exists(name: str) -> bool:
    return os.path.exists(f"/run/netns/{name}")


def create_switch(cluster: str) -> str:
    name = ns_name(cluster, "sw")
    _create(name)
    with NetNS(name) as sw:
        _up(sw, "lo")
        sw.link("add", ifname="br0", kind="bridge")
        _up(sw, "br0")
    return name


def add_host(cluster: str, host: str, address: str) -> str:
    """A namespace for host with eth0 = address/24, linked to the switch."""
    name = ns_name(cluster, host)
    _create(name)
    port = f"{host[:10]}-p"
    try:
        with NetNS(ns_name(cluster, "sw")) as sw:
            sw.link("add", ifname=port, kind="veth", peer={"ifname": "eth0", "net_ns_fd": name})
            br = sw.link_lookup(ifname="br0")[0]
            sw.link("set", index=sw.link_lookup(ifname=port)[0], master=br, state="up")
        with NetNS(name) as ns:
            _up(ns, "lo")
            eth0 = ns.link_lookup(ifname="eth0")[0]
            ns.addr("add", index=eth0, address=address, prefixlen=24)
            ns.link("set", index=eth0, state="up")
    except Exception as e:
        raise SetupError(f"netns {name}: cannot link it to the switch: {e}") from None
    return name


def set_link(cluster: str, host: str, up: bool) -> None:
    """Cut or restore a host's cable (its switch port)."""
    with NetNS(ns_name(cluster, "sw")) as sw:
        idx = sw.link_lookup(ifname=f"{host[:10]}-p")
        if idx:
            sw.link("set", index=idx[0], state="up" if up else "down")


def existing(cluster: str) -> list[str]:
    prefix = f"drvs-{cluster}-"
    return sorted(n for n in netns.listnetns() if n.startswith(prefix) and "-" not in n[len(prefix):])


def remove_all(cluster: str) -> list[str]:
    """Delete every namespace of the cluster (their veths go with them)."""
    gone = []
    for name in existing(cluster):
        try:
            netns.remove(name)
            gone.append(name)
        except OSError:
            pass
    return gone


def _create(name: str) -> None:
    if exists(name):
        raise SetupError(f"network namespace {name} exists already (is the cluster up? `drvs dev cluster down`)")
    try:
        netns.create(name)
    except OSError as e:
        raise SetupError(f"create network namespace {name}: {e.strerror}") from None


def _up(ns, ifname: str) -> None:
    ns.link("set", index=ns.link_lookup(ifname=ifname)[0], state="up")
