"""VMs with shares of several nodes: each node's drvmmd reconciles its cells."""

import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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


def test_vm_update_grows_and_shrinks_shares_live(cluster_factory):
    """drvs vm update: a share resized in place on its node, one given to a
    new node, one taken away; what cannot be is refused, nothing changed."""
    c = cluster_factory(nodes=3)
    c.drvs("vm", "create", "web", "--node", "n1:memory=128M", "--node", "n2:memory=256M", "--fs-replicas", "1",
           node="n1", check=True)
    assert wait_for(lambda: memory_limit(c, "n2", "web") == 256 << 20)
    listed = [line.split() for line in c.drvs("vm", "ls", node="n1", check=True).stdout.splitlines()]
    assert next(row for row in listed if row[0] == "web")[1:6] == ["-", "-", "384M", "-", "n1,n2"]  # (shares' sums)
    init = cell_inits(c, "n2", "web")
    c.drvs("vm", "update", "web", "--node", "n2:memory=192M", "--node", "n3:memory=64M", node="n3", check=True)
    assert wait_for(lambda: memory_limit(c, "n2", "web") == 192 << 20 and memory_limit(c, "n3", "web") == 64 << 20)
    assert cell_inits(c, "n2", "web") == init  # (the same cell, resized: its programs go on)
    # the fields given change, the others stay; KEY=none takes a limit away
    c.drvs("vm", "update", "web", "--node", "n2:pids=500", node="n1", check=True)
    assert json.loads(c.drvs("vm", "show", "web", "--format", "json", node="n1", check=True).stdout)["shares"]["n2"] \
        == {"cpus": None, "cpuset": None, "memory": 192 << 20, "pids": 500}
    assert memory_limit(c, "n2", "web") == 192 << 20
    c.drvs("vm", "update", "web", "--node", "n2:memory=none", node="n1", check=True)
    assert wait_for(lambda: memory_limit(c, "n2", "web") > 1 << 40)
    both = c.drvs("vm", "update", "web", "--node", "n2:memory=none,memory=1G", node="n1")
    assert both.returncode == 2 and "memory given twice" in both.stderr, both.stderr
    c.drvs("vm", "update", "web", "--node", "n2:memory=192M", node="n1", check=True)
    assert wait_for(lambda: memory_limit(c, "n2", "web") == 192 << 20)
    sleeper = subprocess.Popen([str(BIN / "drvs-run"), "--vm", "web", "--node", "n2", "--", "sh", "-c",
                                "echo up; exec sleep 60"], env={**c.env, "DRVS_NODE": "n1"},
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert sleeper.stdout.readline() == "up\n"
        busy = c.drvs("vm", "update", "web", "--rm-node", "n2", node="n1")  # (as vm rm: its programs end)
        assert busy.returncode == 4 and "running process(es) on n2" in busy.stderr, busy.stderr
        assert cell_inits(c, "n2", "web") and sleeper.poll() is None
        c.drvs("vm", "update", "web", "--rm-node", "n2", "--force", node="n1", check=True)
        assert sleeper.wait(timeout=30) != 0
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()
    assert wait_for(lambda: not cell_inits(c, "n2", "web"))
    shown = json.loads(c.drvs("vm", "show", "web", "--format", "json", node="n2", check=True).stdout)
    assert sorted(shown["shares"]) == ["n1", "n3"] and shown["shares"]["n3"]["memory"] == 64 << 20
    keeper = c.drvs("vm", "update", "web", "--rm-node", "n1", node="n1")  # (its file system's only replica)
    assert keeper.returncode == 4 and "in sync only on n1" in keeper.stderr, keeper.stderr
    huge = c.drvs("vm", "update", "web", "--node", "n3:cpus=999", node="n1")
    assert huge.returncode in (2, 4) and "n3" in huge.stderr, huge.stderr
    own = c.drvs("vm", "update", "web", "--memory", "1G", node="n1")  # (a VM of shares: its shares say)
    assert own.returncode == 2 and "change them with --node" in own.stderr, own.stderr
    c.drvs("vm", "create", "anywhere", node="n1", check=True)
    shareless = c.drvs("vm", "update", "anywhere", "--node", "n2", node="n1")
    assert shareless.returncode == 2 and "made without node shares" in shareless.stderr, shareless.stderr
    after = json.loads(c.drvs("vm", "show", "web", "--format", "json", node="n1", check=True).stdout)
    assert after["shares"] == shown["shares"]
    # A VM without shares: its cells, wherever they run, take its new limits.
    env = {**c.env, "DRVS_NODE": "n1"}
    sleeper = subprocess.Popen([str(BIN / "drvs-run"), "--vm", "anywhere", "--node", "n2", "--", "sleep", "60"],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: cell_inits(c, "n2", "anywhere"))
        c.drvs("vm", "update", "anywhere", "--memory", "80M", node="n1", check=True)
        assert wait_for(lambda: memory_limit(c, "n2", "anywhere") == 80 << 20)
    finally:
        sleeper.terminate()
        sleeper.wait(timeout=20)


def test_a_share_its_cells_programs_do_not_fit_in_is_refused_and_nothing_changes(cluster_factory):
    """vm update shrinking n2's share below what the programs there hold
    (beyond what the kernel can reclaim): n2's cell cannot take it, says
    so, and vm update exits 4 with n2's reason; the definition and the
    cell's limit stay as they were.  A share that fits is taken."""
    c = cluster_factory(nodes=2)
    c.drvs("vm", "create", "web", "--node", "n1:memory=256M", "--node", "n2:memory=512M", "--fs-replicas", "1",
           node="n1", check=True)
    assert wait_for(lambda: memory_limit(c, "n2", "web") == 512 << 20)
    hog = subprocess.Popen([str(BIN / "drvs-run"), "--vm", "web", "--node", "n2", "--", "python3", "-c",
                            "b = bytearray(100 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1\n"
                            "print('ready', flush=True)\nimport time; time.sleep(60)"],
                           env={**c.env, "DRVS_NODE": "n1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert hog.stdout.readline() == "ready\n"
        small = c.drvs("vm", "update", "web", "--node", "n2:memory=48M", node="n1")
        assert small.returncode == 4 and small.stderr.startswith("drvs: node n2: ") and "unchanged" in small.stderr, \
            small.stderr
        shown = json.loads(c.drvs("vm", "show", "web", "--format", "json", node="n1", check=True).stdout)
        assert shown["shares"]["n2"]["memory"] == 512 << 20
        assert memory_limit(c, "n2", "web") == 512 << 20
        assert c.drvs("vm", "update", "web", "--node", "n2:memory=384M", node="n1").returncode == 0
        assert memory_limit(c, "n2", "web") == 384 << 20  # (taken before vm update returned)
        assert hog.poll() is None
    finally:
        hog.terminate()
        hog.wait(timeout=20)


def test_removed_vm_loses_its_cells(cluster_factory):
    c = cluster_factory(nodes=2)
    c.drvs("vm", "create", "tmp", "--node", "n2", node="n1", check=True)
    assert wait_for(lambda: cell_inits(c, "n2", "tmp"))
    p = subprocess.run([str(BIN / "drvs-run"), "--vm", "tmp", "--", "sh", "-c", "echo secret > /root/note"],
                       env={**c.env, "DRVS_NODE": "n2"}, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    home = f"{c.node('n2')['state_dir']}/vms/tmp/home"
    assert os.path.exists(f"{home}/note")
    c.drvs("vm", "rm", "tmp", node="n1", check=True)
    # The init goes first, then its cgroups; root's home goes with the VM (on the node that
    # did not remove it too), so a VM made again under the name does not find it.
    assert wait_for(lambda: not cell_inits(c, "n2", "tmp")
                    and not glob.glob(f"/sys/fs/cgroup/pids/drvs-dev-{c.info['name']}-n2/drvs*/tmp"))
    assert wait_for(lambda: not os.path.exists(home), timeout=20)


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
    # A node the VM has no share of is not one to run it on, even when named.
    p = subprocess.run([str(BIN / "drvs-run"), "--vm", "app", "--node", "n1", "--", "true"],
                       env={**c.env, "DRVS_NODE": "n1"}, capture_output=True, text=True, timeout=60)
    assert (p.returncode, p.stderr) == (3, "drvs-run: VM 'app' has no share of node 'n1' (its nodes: n2; "
                                           "see `drvs vm show app`)\n")
    assert cell_inits(c, "n1", "app") == []


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
        # a VM made meanwhile gets its cell where this daemon runs: outside
        # the node's cgroup (the cluster's teardown must find it there too)
        from drvs.config import Config
        from drvs.ns.cgroup import Cgroup

        c.drvs("vm", "create", "extra", "--node", "n2", node="n1", check=True)
        outside = Cgroup.under_caller(Config(n2["state_dir"]).cgroup_root, "extra")
        assert wait_for(outside.exists)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)


def test_dev_cluster_restart_brings_a_killed_node_back(cluster_factory):
    """drvs dev cluster restart NODE: a node whose drvmmd was killed (its
    FUSE view left mounted) runs again, Ready, with its cells and runs."""
    c = cluster_factory(nodes=2)
    c.drvs("vm", "create", "back", "--node", "n2", node="n1", check=True)
    assert wait_for(lambda: cell_inits(c, "n2", "back"))
    before = cell_inits(c, "n2", "back")
    run = [str(BIN / "drvs-run"), "--vm", "back", "--node", "n2", "--", "cat", "/etc/hostname"]
    p = subprocess.run(run, env={**c.env, "DRVS_NODE": "n1"}, capture_output=True, text=True, timeout=60)
    assert (p.returncode, p.stdout) == (0, "back\n"), p.stderr  # (n1 now has a connection to n2's drvmmd)
    os.kill(c.node("n2")["pid"], signal.SIGKILL)
    c.wait_status("n2", "NotReady", timeout=15)
    assert "dead" in c.drvs("dev", "cluster", "status", check=True).stdout
    later = c.drvs("vm", "create", "later", "--node", "n2", node="n1")  # said, not refused
    assert later.returncode == 0 and "node n2 is NotReady" in later.stderr and "file system" in later.stderr
    r = c.drvs("dev", "cluster", "restart", "n2", check=True)
    assert r.stdout.startswith("n2: drvmmd running again")
    c.info = json.loads((c.state / "dev-cluster.json").read_text())  # (its new pid, for the teardown)
    c.wait_status("n2", "Ready", timeout=15)
    assert "dead" not in c.drvs("dev", "cluster", "status", check=True).stdout
    assert cell_inits(c, "n2", "back") == before
    assert wait_for(lambda: cell_inits(c, "n2", "later"))  # made now that n2 is back
    p = subprocess.run(run, env={**c.env, "DRVS_NODE": "n1"}, capture_output=True, text=True, timeout=60)
    assert (p.returncode, p.stdout) == (0, "back\n"), p.stderr  # the first run after: not on the dead connection
    bad = c.drvs("dev", "cluster", "restart", "n9")
    assert bad.returncode == 3 and "no node 'n9'" in bad.stderr
    running = c.node("n2")["pid"]  # a restart of a running node says it stopped it
    again = c.drvs("dev", "cluster", "restart", "n2", check=True)
    c.info = json.loads((c.state / "dev-cluster.json").read_text())
    assert again.stdout == f"n2: drvmmd stopped (pid {running}) and running again (pid {c.node('n2')['pid']})\n"


def test_share_errors(cluster_factory):
    c = cluster_factory(nodes=1)
    p = c.drvs("vm", "create", "big", "--node", "n1:cpus=999", node="n1")
    assert p.returncode == 2 and "share of n1 asks for 999 CPUs; n1 has" in p.stderr
    p = c.drvs("vm", "create", "far", "--node", "n8", node="n1")
    assert (p.returncode, p.stderr) == (3, "drvs: no such node: 'n8' (see `drvs node ls`)\n")
    p = c.drvs("vm", "create", "odd", "--node", "n1:color=red", node="n1")
    assert p.returncode == 2 and "invalid share" in p.stderr
    for share, words in (("n1:cpus=1,cpus=2", "cpus given twice"), (":cpus=1", "no node name before ':'"),
                         ("N1:cpus=1", "invalid node name 'N1'")):
        p = c.drvs("vm", "create", "odd", "--node", share, node="n1")
        assert p.returncode == 2 and words in p.stderr, (share, p.stderr)
    p = c.drvs("vm", "create", "wide", "--node", "n1:cpuset=0-999", node="n1")
    assert p.returncode == 2 and "share of n1 asks for CPUs 0-999; n1 has" in p.stderr
    for limit in (("--memory", "50M"), ("--cpus", "0.5"), ("--pids-limit", "9")):  # (they would apply nowhere)
        p = c.drvs("vm", "create", "both", "--node", "n1", *limit, node="n1")
        assert p.returncode == 2 and "do not go with --node shares: give them per node" in p.stderr, p.stderr
    assert "both" not in c.drvs("vm", "ls", node="n1", check=True).stdout



def test_shares_do_not_overcommit_a_node_unless_asked(cluster_factory):
    """The shares of all VMs on a node add up to no more than it has: one
    past what is left is a conflict (4), naming who holds the rest, and
    nothing is made; --overcommit makes it; removing a VM frees its part."""
    c = cluster_factory(nodes=1)
    n1, = json.loads(c.drvs("node", "ls", "--format", "json", node="n1", check=True).stdout)
    cpus, memory = n1["cpus"], n1["memory"]
    c.drvs("vm", "create", "a", "--node", f"n1:cpus={cpus - 0.5:g}", node="n1", check=True)
    p = c.drvs("vm", "create", "b", "--node", "n1:cpus=1", node="n1")
    assert p.returncode == 4, p.stderr
    assert p.stderr == (f"drvs: share of n1 asks for 1 CPUs; n1 has {cpus}, and a holds {cpus - 0.5:g} of them "
                        "(--overcommit allows it)\n")
    assert "b" not in c.drvs("vm", "ls", node="n1", check=True).stdout.split()
    c.drvs("vm", "create", "b", "--node", "n1:cpus=1", "--overcommit", node="n1", check=True)
    c.drvs("vm", "create", "m", "--node", f"n1:cpus=0.5,memory={memory}", "--overcommit", node="n1", check=True)
    p = c.drvs("vm", "create", "tiny", "--node", "n1:memory=8M", node="n1")
    assert p.returncode == 4 and "and m holds" in p.stderr, p.stderr
    c.drvs("vm", "create", "free", "--node", "n1", node="n1", check=True)  # a share of no amount reserves none
    c.drvs("vm", "rm", "m", node="n1", check=True)
    c.drvs("vm", "create", "tiny", "--node", "n1:memory=8M", node="n1", check=True)
    shares = json.loads(c.drvs("node", "show", "n1", "--format", "json", node="n1", check=True).stdout)["shares"]
    assert shares == {"vms": ["a", "b", "free", "tiny"], "cpus": cpus + 0.5, "memory": 8 << 20}
    shown = c.drvs("node", "show", "n1", node="n1", check=True).stdout
    assert f"a, b, free, tiny: {cpus + 0.5:g} of {cpus} CPUs, 8M of " in shown
    p = c.drvs("vm", "create", "lone", "--overcommit", node="n1")
    assert p.returncode == 2 and "--overcommit needs --node shares" in p.stderr


FORGE = """
import sys
from drvs.cluster.context import enter_node
enter_node("n1")
from drvs.store import open_store
from drvs.vm.model import Limits
from drvs.vm.registry import VMS, VmRegistry
store = open_store()
spec = VmRegistry(store).get("bad")
spec.shares["n1"] = Limits(cpuset="0-999")
store.put(VMS + "bad", spec.to_json())
"""


def test_a_share_that_cannot_be_applied_holds_up_no_other_vm(cluster_factory):
    """A VM whose share its node cannot apply (a definition written before
    its checks, or by hand) is reported, and the node's other VMs still get
    and lose their cells."""
    c = cluster_factory(nodes=1)
    c.drvs("vm", "create", "bad", "--node", "n1", node="n1", check=True)
    c.drvs("vm", "create", "gone", "--node", "n1", node="n1", check=True)
    assert wait_for(lambda: cell_inits(c, "n1", "gone"))
    subprocess.run([sys.executable, "-c", FORGE], env=c.env, check=True)
    c.drvs("vm", "rm", "gone", node="n1", check=True)
    c.drvs("vm", "create", "later", "--node", "n1", node="n1", check=True)
    ok = wait_for(lambda: cell_inits(c, "n1", "later") and not cell_inits(c, "n1", "gone"))
    log = (Path(c.node("n1")["state_dir"]) / "drvmmd.log").read_text()
    assert ok, log[-3000:]
    assert log.count("reconcile: VM bad: ") == 1, log[-3000:]


def test_a_vm_in_use_on_another_node_is_busy(cluster_factory):
    """vm rm without --force refuses a VM whose programs run on any node
    (exit 4); --force ends them there."""
    c = cluster_factory(nodes=2)
    c.drvs("vm", "create", "busy", "--node", "n2", node="n1", check=True)
    assert wait_for(lambda: cell_inits(c, "n2", "busy"))
    prog = subprocess.Popen([str(BIN / "drvs-run"), "--vm", "busy", "--", "sleep", "3232"],
                            env={**c.env, "DRVS_NODE": "n1"})
    try:
        assert wait_for(lambda: "sleep 3232" in c.drvs("ps", "busy", node="n1").stdout)
        p = c.drvs("vm", "rm", "busy", node="n1")
        assert p.returncode == 4 and "running process(es) on n2" in p.stderr, p.stderr
        assert "busy" in c.drvs("vm", "ls", node="n1", check=True).stdout
        c.drvs("vm", "rm", "busy", "--force", node="n1", check=True)
        assert prog.wait(timeout=30) != 0
    finally:
        prog.kill()
        prog.wait()
    # a VM whose only share node is dead: whether programs run cannot be told
    c.drvs("vm", "create", "far", "--node", "n2", node="n1", check=True)
    assert wait_for(lambda: cell_inits(c, "n2", "far"))
    os.kill(c.node("n2")["pid"], signal.SIGKILL)
    c.wait_status("n2", "NotReady", timeout=15)
    p = c.drvs("vm", "rm", "far", node="n1")
    assert p.returncode == 4 and "cannot tell" in p.stderr and "--force" in p.stderr, p.stderr
    c.drvs("vm", "rm", "far", "--force", node="n1", check=True)


def _zombie_cell_inits(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                name, _, rest = f.read().partition(" (")[2].rpartition(") ")
        except OSError:
            continue
        state, ppid = rest.split()[:2]
        if state == "Z" and int(ppid) == pid and name == "drvs-cell":
            found.append(int(entry))
    return found


def test_a_cell_that_vm_rm_ended_leaves_no_zombie_in_the_daemon(cluster_factory):
    """drvs vm rm on n1 ends n1's cell of the VM itself; its init was n1's
    drvmmd's child (which made the cell), so the daemon collects it."""
    c = cluster_factory(nodes=2)
    for round_ in range(2):
        c.drvs("vm", "create", f"gone{round_}", "--node", "n1", "--node", "n2", node="n1", check=True)
        assert wait_for(lambda: cell_inits(c, "n1", f"gone{round_}"))
        c.drvs("vm", "rm", f"gone{round_}", node="n1", check=True)
    daemon = c.node("n1")["pid"]
    assert wait_for(lambda: not _zombie_cell_inits(daemon), timeout=15), _zombie_cell_inits(daemon)

