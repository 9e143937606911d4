"""`drvs dev cluster up|down`: N real nodes on this machine.

Each node is a network namespace on a bridge with its own address, its own
state directory, its own cgroup (optionally pinned to its own CPUs, so that
N nodes have N times the compute) and its own drvmmd; etcd runs in a
namespace of its own on the same bridge.  `down` removes all of it, also
after a partial `up`."""

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

from ..config import Config
from ..errors import Conflict, DaemonAway, EtcdUnavailable, NotFound, SetupError, UsageError
from ..ns.cgroup import Cgroup
from ..cluster.context import dev_cluster_file, dev_node, read_json, setns_net
from ..cluster import etcd_process, pki
from . import netns



def _bin(name: str) -> str:
    return os.path.join(os.path.dirname(sys.executable), name)


def up(state_dir: str, nodes: int, cpus_per_node: int | None = None, name: str = "dev",
       timeout: float = 30.0) -> dict:
    path = dev_cluster_file(state_dir)
    if os.path.exists(path):
        raise Conflict(f"a dev cluster is up already ({path}); `drvs dev cluster down` first")
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,15}", name):
        # (it names network namespaces, files under /run/netns and cgroups)
        raise UsageError(f"invalid cluster name {name!r}: 1 to 16 lowercase letters, digits or '-', "
                         "not starting with '-'")
    if not 1 <= nodes <= 64:
        raise UsageError(f"--nodes {nodes}: a dev cluster has 1 to 64 nodes")
    cpus = sorted(os.sched_getaffinity(0))
    if cpus_per_node is not None and cpus_per_node < 1:
        raise UsageError(f"--cpus-per-node {cpus_per_node}: at least 1")
    if cpus_per_node and cpus_per_node * nodes > len(cpus):
        raise UsageError(f"{nodes} nodes x {cpus_per_node} CPUs need {nodes * cpus_per_node} CPUs; "
                         f"this machine has {len(cpus)}")
    taken = [n for n in netns.existing(name)]
    if taken:
        raise Conflict(f"network namespaces of a cluster named {name!r} exist already ({', '.join(taken)}): "
                       "pick another --name, or take that cluster down")
    net = netns.subnet_for(name)
    root = f"{state_dir}/dev/{name}"
    info = {"name": name, "subnet": f"{net}.0/24", "root": root,
            "etcd": {"netns": netns.ns_name(name, "etcd"), "url": etcd_process.url(f"{net}.2"), "pid": 0},
            "nodes": []}
    os.makedirs(root, exist_ok=True)
    _write(path, info)  # first, so that `down` finds whatever gets made
    try:
        info["ca"], info["ca_key"] = pki.make_ca(f"{root}/ca", name)
        netns.create_switch(name)
        netns.add_host(name, "etcd", f"{net}.2")
        info["etcd"]["pid"] = _start_etcd(info, root, f"{net}.2")
        _write(path, info)
        for i in range(nodes):
            node = f"n{i + 1}"
            pinned = ",".join(map(str, cpus[i * cpus_per_node:(i + 1) * cpus_per_node])) if cpus_per_node else None
            info["nodes"].append(_start_node(info, node, f"{net}.{11 + i}", pinned))
            _write(path, info)
        _wait_ready(info, timeout)
    except BaseException:
        try:
            down(state_dir)
        except Exception as e:  # noqa: BLE001 - the failure to report is the one that stopped up()
            print(f"drvs: dev cluster {name}: taking down what was made: {e}", file=sys.stderr)
        raise
    return info


def _write(path: str, info: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(info, f, indent=1)
    os.rename(tmp, path)


def _in_netns(ns: str):
    return lambda: setns_net(f"/run/netns/{ns}")


def _start_etcd(info: dict, root: str, address: str) -> int:
    return etcd_process.start(f"{root}/etcd", address, info["ca"], info["ca_key"],
                              preexec=_in_netns(info["etcd"]["netns"]))


def _start_node(info: dict, node: str, address: str, pinned: str | None) -> dict:
    netns.add_host(info["name"], node, address)
    state = f"{info['root']}/{node}"
    os.makedirs(state, exist_ok=True)
    tls = pki.issue(info["ca"], info["ca_key"], node, address, f"{state}/tls")
    cluster = {"cluster": info["name"], "etcd": [info["etcd"]["url"]], "node": node, "address": address, "tls": tls,
               "dev": True}  # (the harness's: drvs node reset refuses it)
    if not info["nodes"]:  # n1 keeps etcd's revocation list, as the first node of a real cluster does
        cluster["crl"] = {"ca": info["ca"], "ca_key": info["ca_key"],
                          "path": etcd_process.crl_path(f"{info['root']}/etcd")}
    _write(f"{state}/cluster.json", cluster)
    cg = Cgroup.under_caller(f"drvs-dev-{info['name']}-{node}")
    cg.create()
    if pinned:
        from ..vm.model import Limits

        cg.set_limits(Limits(cpuset=pinned), fresh=True)
    ns = netns.ns_name(info["name"], node)
    return {"name": node, "netns": ns, "address": address, "state_dir": state, "pid": _spawn(cg, ns, state),
            "cpuset": pinned, "cgroup": cg.record()}


def _spawn(cg: Cgroup, ns: str, state: str) -> int:
    """A node's drvmmd, in the node's cgroup and network namespace."""
    procs = cg.open_procs()

    def enter():
        for fd in procs:
            os.write(fd, b"0")
        setns_net(f"/run/netns/{ns}")

    log = open(f"{state}/drvmmd.log", "ab")
    try:
        proc = subprocess.Popen([_bin("drvmmd")], env={**os.environ, "DRVS_STATE_DIR": state, "DRVS_CONFIG": "/dev/null"},
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=enter, start_new_session=True)
    finally:
        log.close()
        for fd in procs:
            os.close(fd)
    return proc.pid


def restart(state_dir: str, name: str, timeout: float = 30.0) -> dict:
    """Start a node's drvmmd again (stopping it first if it runs): a node
    killed to try a fail-over comes back, rejoins and adopts its cells; one
    removed (drvs node rm) joins anew."""
    from ..ns import mounts

    path = dev_cluster_file(state_dir)
    info = read_json(path)
    if info is None:
        raise NotFound(f"no dev cluster here ({path})")
    if name == "etcd":
        return _restart_etcd(path, info)
    node = dev_node(info, name)
    _check_etcd(info)  # (the node would wait for it, saying nothing)
    was = node["pid"] if _alive(node["pid"]) else 0
    _stop(node["pid"])
    view = f"{node['state_dir']}/dvos"
    mounts.abort_fuse(view)  # (left mounted by a daemon killed with SIGKILL)
    mounts.detach(view)
    # A new certificate each time, as a node joining again would get: one
    # `drvs node rm` revoked would keep it out of the cluster for good.
    pki.issue(info["ca"], info["ca_key"], name, node["address"], f"{node['state_dir']}/tls")
    cg = Cgroup.under_caller(f"drvs-dev-{info['name']}-{name}")
    cg.create()
    node["pid"] = _spawn(cg, node["netns"], node["state_dir"])
    _write(path, info)
    from ..dvos import handover

    node_cfg = Config(node["state_dir"])  # (its supervisor answers once the node has joined: runs can start)
    deadline = time.monotonic() + timeout
    while not _answers(handover, node_cfg):
        if not _alive(node["pid"]):
            log = open(f"{node['state_dir']}/drvmmd.log").read()[-1500:]
            raise SetupError(f"drvmmd of {name} exited:\n{log}")
        _check_etcd(info, f" (drvmmd of {name} runs, pid {node['pid']}, and joins once it is back)")
        if time.monotonic() > deadline:
            raise SetupError(f"drvmmd of {name} not answering after {timeout:.0f} s")
        time.sleep(0.1)
    return {**node, "was": was}


def _check_etcd(info: dict, then: str = "") -> None:
    if not _alive(info["etcd"]["pid"]):
        raise EtcdUnavailable(f"the dev cluster's etcd is not running{then}: "
                              "`drvs dev cluster restart etcd` starts it again")


def _restart_etcd(path: str, info: dict) -> dict:
    """The dev cluster's etcd started again on its data (stopped first if
    it runs): the nodes ride out its absence and carry on once it is back."""
    was = info["etcd"]["pid"] if _alive(info["etcd"]["pid"]) else 0
    _stop(info["etcd"]["pid"])
    address = info["etcd"]["url"].split("//", 1)[1].rsplit(":", 1)[0]
    info["etcd"]["pid"] = _start_etcd(info, info["root"], address)
    _write(path, info)
    # Back once the nodes running are Ready again (they answer etcd through it).
    _wait_ready({**info, "nodes": [n for n in info["nodes"] if _alive(n["pid"])]}, 20.0)
    return {"name": "etcd", "pid": info["etcd"]["pid"], "was": was}


def _answers(handover, cfg: Config) -> bool:
    try:
        handover.check(cfg)
        return True
    except DaemonAway:
        return False


def _wait_ready(info: dict, timeout: float) -> None:
    """Until etcd lists every node as alive (asked from inside the etcd namespace)."""
    want = {n["name"] for n in info["nodes"]}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for n in info["nodes"]:
            if not _alive(n["pid"]):
                log = open(f"{n['state_dir']}/drvmmd.log").read()[-1500:]
                raise SetupError(f"drvmmd of {n['name']} exited:\n{log}")
        if _query_alive(info) >= want:
            return
        time.sleep(0.1)
    raise SetupError(f"dev cluster: nodes not Ready after {timeout:.0f} s")


def _query_alive(info: dict) -> set[str]:
    """Node names with a status key, read by a child inside the etcd netns."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            setns_net(f"/run/netns/{info['etcd']['netns']}")
            import base64

            key = base64.b64encode(b"/drvs/nodes/").decode()
            end = base64.b64encode(b"/drvs/nodes0").decode()
            req = urllib.request.Request(info["etcd"]["url"] + "/v3/kv/range", method="POST",
                                         data=json.dumps({"key": key, "range_end": end, "keys_only": True}).encode())
            tls = read_json(f"{info['nodes'][0]['state_dir']}/cluster.json")["tls"]
            with urllib.request.urlopen(req, timeout=1, context=etcd_process.client_context(tls)) as resp:
                kvs = json.load(resp).get("kvs") or []
            names = [base64.b64decode(kv["key"]).decode().split("/")[3] for kv in kvs
                     if base64.b64decode(kv["key"]).decode().endswith("/status")]
            os.write(w, json.dumps(names).encode())
        except BaseException:
            pass
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        out = f.read()
    os.waitpid(pid, 0)
    return set(json.loads(out)) if out else set()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:  # not ours: dead but not yet reaped by its parent (or init) is dead
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
        except (OSError, IndexError):
            return False


def _stop(pid: int, grace: float = 20.0) -> None:
    """SIGTERM the process group, SIGKILL what is left after the grace (a
    file server's hand-over to its replicas may take ~15 s at worst)."""
    if not pid:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.02)
        if not _alive(pid):
            break
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def down(state_dir: str) -> dict:
    """Stop and remove everything of the dev cluster; safe to repeat."""
    path = dev_cluster_file(state_dir)
    info = read_json(path)
    if info is None:
        raise NotFound(f"no dev cluster here ({path})")
    from ..ns import mounts

    for n in info["nodes"]:
        _stop(n["pid"])
        view = f"{n['state_dir']}/dvos"
        mounts.abort_fuse(view)  # a daemon stuck in its own mount ends; its waiting callers get an error
        mounts.detach(view)      # left mounted by a node killed with SIGKILL
        _remove_tree(Cgroup.under_caller(f"drvs-dev-{info['name']}-{n['name']}"))
        # (cells of a drvmmd started by hand, outside the node's cgroup: under
        # the caller's own, as every DRVS install's, by the node's state dir)
        _remove_tree(Cgroup.under_caller(Config(n["state_dir"]).cgroup_root))
    _stop(info["etcd"]["pid"])
    gone = netns.remove_all(info["name"])
    shutil.rmtree(info["root"], ignore_errors=True)
    os.unlink(path)
    return {"name": info["name"], "namespaces": gone}


def _remove_tree(cg: Cgroup) -> None:
    """A node's cgroup with every cell in it, deepest first."""
    for child in cg.children():
        _remove_tree(cg.child(child))
    cg.kill_all()
    cg.remove()


def new_name() -> str:
    return "t" + secrets.token_hex(3)
