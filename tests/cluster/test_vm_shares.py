"""VMs with shares of several nodes: each node's drvmmd reconciles its cells."""

import glob
import json
import os
import signal
import subprocess
import time

from drvs.cluster.context import setns_net
from tests.cluster.conftest import BIN


def cell_inits(c, node: str, vm: str) -> list[int]:
    """Pids of VM's cell init on node (found by the node's cgroup)."""
    paths = glob.glob(f"/sys/fs/cgroup/pids/drvs-dev-{c.info['name']}-{node}/drvs*/{vm}/init/cgroup.procs")
    return [int(p) for path in paths for p in open(path).read().split()]


def memory_limit(c, node: str, vm: str) -> int | None:
    paths = glob.glob(f"/sys/fs/cgroup/memory/**/drvs-dev-{c.info['name']}-{node}/drvs*/{vm}/memory.limit_in_bytes",
                      recursive=True)
    return int(open(paths[0]).read()) if paths else None


def wait_for(predicate, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_shares_become_cells_on_their_nodes_only(cluster_factory):
    c = cluster_factory(nodes=3)
    c.drvs("vm", "create", "web", "--node", "n2:cpus=1,memory=256M", "--node", "n3:memory=128M",
           node="n1", check=True)
    assert wait_for(lambda: cell_inits(c, "n2", "web") and cell_inits(c, "n3", "web"))
    assert cell_inits(c, "n1", "web") == []
    assert memory_limit(c, "n2", "web") == 256 << 20
    assert memory_limit(c, "n3", "web") == 128 << 20
    shown = json.loads(c.drvs("vm", "show", "web", "--format", "json", node="n3", check=True).stdout)
    assert shown["shares"]["n2"]["memory"] == 256 << 20 and shown["shares"]["n2"]["cpus"] == 1


def test_removed_vm_loses_its_cells(cluster_factory):
    c = cluster_factory(nodes=2)
    c.drvs("vm", "create", "tmp", "--node", "n2", node="n1", check=True)
    assert wait_for(lambda: cell_inits(c, "n2", "tmp"))
    c.drvs("vm", "rm", "tmp", node="n1", check=True)
    # The init goes first, then its cgroups.
    assert wait_for(lambda: not cell_inits(c, "n2", "tmp")
                    and not glob.glob(f"/sys/fs/cgroup/pids/drvs-dev-{c.info['name']}-n2/drvs*/tmp"))


def test_run_goes_to_a_node_with_a_share(cluster_factory):
    c = cluster_factory(nodes=2)
    c.drvs("vm", "create", "app", "--node", "n2", node="n1", check=True)
    assert wait_for(lambda: cell_inits(c, "n2", "app"))
    p = subprocess.run([str(BIN / "drvs-run"), "--vm", "app", "--", "sh", "-c", "cat /proc/1/cmdline; echo; hostname"],
                       env={**c.env, "DRVS_NODE": "n1"}, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    # pid 1 of the program's cell is n2's pinned init for app.
    cmdline, hostname = p.stdout.split("\n")[:2]
    assert (cmdline.rstrip("\x00"), hostname) == ("drvs-cell app", "app")


def test_restarted_daemon_adopts_its_cells(cluster_factory):
    c = cluster_factory(nodes=2)
    c.drvs("vm", "create", "keep", "--node", "n2", node="n1", check=True)
    assert wait_for(lambda: cell_inits(c, "n2", "keep"))
    before = cell_inits(c, "n2", "keep")
    n2 = c.node("n2")
    os.killpg(n2["pid"], signal.SIGTERM)
    c.wait_status("n2", "NotReady", timeout=5)
    proc = subprocess.Popen([str(BIN / "drvmmd")], env={**c.env, "DRVS_STATE_DIR": n2["state_dir"]},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            preexec_fn=lambda: setns_net(f"/run/netns/{n2['netns']}"))
    try:
        c.wait_status("n2", "Ready", timeout=10)
        time.sleep(1.5)  # a reconcile pass has run
        assert cell_inits(c, "n2", "keep") == before
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)


def test_share_errors(cluster_factory):
    c = cluster_factory(nodes=1)
    p = c.drvs("vm", "create", "big", "--node", "n1:cpus=999", node="n1")
    assert p.returncode == 2 and "share of n1 asks for 999 CPUs; n1 has" in p.stderr
    p = c.drvs("vm", "create", "far", "--node", "n8", node="n1")
    assert (p.returncode, p.stderr) == (3, "drvs: no such node: 'n8' (see `drvs node ls`)\n")
    p = c.drvs("vm", "create", "odd", "--node", "n1:color=red", node="n1")
    assert p.returncode == 2 and "invalid share" in p.stderr
