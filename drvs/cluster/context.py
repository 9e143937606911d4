"""Which cluster and node a command acts for.

A node's state directory holds `cluster.json` (the cluster's name, its etcd
endpoints, this node's name and address); without it the node is a single
node on the embedded store.  `drvs --node NAME` (or $DRVS_NODE) acts as node
NAME of the local dev cluster: it enters that node's network namespace and
uses its state directory, as if run on that node."""

import json
import os

from .. import config
from ..errors import NotFound, SetupError

CLONE_NEWNET = 0x40000000


def read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise SetupError(f"{path}: unreadable ({e})") from None


def cluster_info(cfg: config.Config) -> dict | None:
    """This node's cluster.json, or None on a single node."""
    return read_json(f"{cfg.state_dir}/cluster.json")


def dev_cluster_here(cfg: config.Config) -> bool:
    """Whether a dev cluster was brought up from this state directory."""
    return bool((read_json(dev_cluster_file(cfg.state_dir)) or {}).get("nodes"))


def no_cluster(cfg: config.Config, why: str = ""):
    """The error for a command that needs a cluster node, on a single node:
    where a dev cluster is up from this state directory, how to act as one
    of its nodes."""
    from ..errors import NotFound

    dev = read_json(dev_cluster_file(cfg.state_dir))
    names = [n["name"] for n in (dev or {}).get("nodes", [])]
    hint = (f"a dev cluster is up here: act as one of its nodes with `drvs --node {names[0]}` or "
            f"DRVS_NODE={names[0]} (nodes: {', '.join(names)})" if names else
            "see `drvs cluster init` or `drvs dev cluster up`")
    return NotFound(f"this node is in no cluster (single node){'; ' + why if why else ''}; {hint}")


def etcd_client(info: dict, timeout: float = 5.0):
    """The async etcd client for this node's cluster (TLS with its certificate)."""
    from .etcd import Etcd

    tls = info.get("tls")
    if tls:
        from .etcd_process import client_context

        return Etcd(info["etcd"], timeout=timeout, verify=client_context(tls))
    return Etcd(info["etcd"], timeout=timeout)


def local_node(cfg: config.Config) -> str | None:
    """This node's name in its cluster, or None on a single node."""
    info = cluster_info(cfg) if os.path.exists(f"{cfg.state_dir}/cluster.json") else None
    return info["node"] if info else None


def dev_cluster_file(state_dir: str) -> str:
    return f"{state_dir}/dev-cluster.json"


_entered: dict | None = None  # the dev cluster a node was entered of (a node's own state holds no dev-cluster.json)


def dev_node(dev: dict, name: str) -> dict:
    """The node `name` of a dev cluster's record, or NotFound naming those there are."""
    node = next((n for n in dev["nodes"] if n["name"] == name), None)
    if node is None:
        raise NotFound(f"no node {name!r} in dev cluster {dev['name']!r} "
                       f"(nodes: {', '.join(n['name'] for n in dev['nodes'])})")
    return node


def state_dirs_here(cfg: config.Config) -> list[str]:
    """The state directories of this cluster's nodes on this machine: this
    node's, or on a dev cluster entered, each of its nodes'."""
    if _entered is not None:
        return [n["state_dir"] for n in _entered["nodes"]]
    return [cfg.state_dir]


def enter_node(name: str) -> None:
    """Become node `name` of the local dev cluster (network and state);
    again from one of its nodes (`drvs --node n1 mount VM DIR --node n2`)."""
    global _entered
    cfg = config.load()
    dev = _entered or read_json(dev_cluster_file(cfg.state_dir))
    if dev is None:
        raise NotFound(f"no dev cluster here ({dev_cluster_file(cfg.state_dir)}); `drvs dev cluster up` makes one")
    node = dev_node(dev, name)
    setns_net(f"/run/netns/{node['netns']}")
    os.environ["DRVS_STATE_DIR"] = node["state_dir"]
    config.load.cache_clear()
    _entered = dev


def setns_net(path: str) -> None:
    import ctypes

    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise SetupError(f"setns {path}: {os.strerror(err)}")
    finally:
        os.close(fd)
