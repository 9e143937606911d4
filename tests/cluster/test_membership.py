"""Membership on a real cluster: Ready, NotReady after SIGKILL, rejoin, clashes."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from drvs.cluster.context import setns_net


def test_nodes_are_ready_with_their_resources(cluster_factory):
    c = cluster_factory(nodes=3)
    nodes = c.nodes()
    assert sorted(nodes) == ["n1", "n2", "n3"]
    for name, n in nodes.items():
        assert n["status"] == "Ready"
        assert n["address"] == c.node(name)["address"]
        assert n["cpus"] >= 1 and n["memory"] > 0
        assert 0 <= n["load"]["cpu_percent"] <= 100
    # Every node sees the same membership.
    assert {k: v["status"] for k, v in c.nodes(via="n3").items()} == {k: "Ready" for k in nodes}
    table = c.drvs("node", "ls", node="n2", check=True).stdout.splitlines()
    assert table[0].split()[:3] == ["NAME", "STATUS", "ADDRESS"]
    rows = {line.split()[0]: line.split() for line in table[1:]}
    assert rows["n3"][1:3] == ["Ready", c.node("n3")["address"]]  # whole, into a pipe (no "10.x.y.…")
    shown = dict(line.split(None, 1) for line in c.drvs("node", "show", "n3", node="n1", check=True).stdout.splitlines()[1:])
    assert shown["address"] == c.node("n3")["address"] and shown["status"] == "Ready"
    assert re.fullmatch(r"\d+(\.\d+)?[KMGT]", shown["memory"])  # for people: sizes and dates, not raw numbers
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \(", shown["joined"])


def test_killed_node_is_not_ready_within_5_seconds(cluster_factory):
    c = cluster_factory(nodes=2)
    os.kill(c.node("n2")["pid"], signal.SIGKILL)
    took = c.wait_status("n2", "NotReady", timeout=8)
    assert took < 5.0, took
    assert c.nodes()["n1"]["status"] == "Ready"


def test_stopped_node_leaves_at_once_and_a_restart_rejoins(cluster_factory):
    c = cluster_factory(nodes=2)
    n2 = c.node("n2")
    os.killpg(n2["pid"], signal.SIGTERM)
    assert c.wait_status("n2", "NotReady", timeout=3) < 2.0
    proc = _start_drvmmd(c, n2)
    try:
        c.wait_status("n2", "Ready", timeout=10)
        assert len(c.nodes()) == 2
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_name_clash_is_refused(cluster_factory, tmp_path):
    c = cluster_factory(nodes=1)
    n1 = c.node("n1")
    other = tmp_path / "impostor"
    other.mkdir()
    (other / "cluster.json").write_text((open(f"{n1['state_dir']}/cluster.json").read()))
    proc = _start_drvmmd(c, {**n1, "state_dir": str(other)})
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 4
    assert "node name 'n1' is in use by a live node at " + n1["address"] in out


def test_cpus_per_node_pins_each_node(cluster_factory):
    c = cluster_factory(nodes=2, cpus_per_node=1)
    nodes = c.nodes()
    assert nodes["n1"]["cpus"] == nodes["n2"]["cpus"] == 1
    assert c.node("n1")["cpuset"] != c.node("n2")["cpuset"]
    # each node's LOAD is of its own CPUs: n1's busy, n2's not (the machine's would be the same for both)
    busy = subprocess.Popen(["taskset", "-c", c.node("n1")["cpuset"], sys.executable, "-c", "while True: pass"])
    try:
        deadline, seen = time.monotonic() + 15, []
        while time.monotonic() < deadline:
            load = {name: n["load"]["cpu_percent"] for name, n in c.nodes().items()}
            seen.append(load)
            if load["n1"] >= 70 and load["n2"] <= load["n1"] - 30:
                break
            time.sleep(0.5)
        else:
            raise AssertionError(seen)
    finally:
        busy.kill()
        busy.wait()


def _start_drvmmd(c, node: dict) -> subprocess.Popen:
    from tests.cluster.conftest import BIN

    return subprocess.Popen([str(BIN / "drvmmd")], env={**c.env, "DRVS_STATE_DIR": node["state_dir"]},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: setns_net(f"/run/netns/{node['netns']}"))


def test_cordon_and_uncordon(cluster_factory):
    c = cluster_factory(nodes=2)
    assert c.drvs("node", "cordon", "n2", node="n1", check=True).stdout == "node/n2 cordoned\n"
    assert c.nodes()["n2"]["status"] == "SchedulingDisabled"
    made = c.drvs("vm", "create", "named", "--node", "n2", node="n1", check=True)  # (explicit: said, not refused)
    assert "warning: node n2 is cordoned (SchedulingDisabled)" in made.stderr, made.stderr
    c.drvs("node", "uncordon", "n2", node="n1", check=True)
    assert c.nodes()["n2"]["status"] == "Ready"
    missing = c.drvs("node", "cordon", "n9", node="n1")
    assert (missing.returncode, missing.stderr) == (3, "drvs: no such node: 'n9'\n")


def test_node_commands_outside_a_cluster_are_clear_errors(cluster_factory, tmp_path):
    c = cluster_factory(nodes=1)
    p = c.drvs("node", "ls")  # the host itself is no node of the dev cluster: it says how to act as one
    assert p.returncode == 3 and "in no cluster" in p.stderr
    assert "a dev cluster is up here: act as one of its nodes with `drvs --node n1` or DRVS_NODE=n1" in p.stderr
    for args in (("df",), ("mount", "web", str(tmp_path)), ("lock", "acquire", "k")):
        p = c.drvs(*args)
        assert p.returncode == 3 and "DRVS_NODE=n1" in p.stderr and p.stderr.count("\n") == 1, (args, p.stderr)
    p = c.drvs("node", "ls", node="n7")
    assert p.returncode == 3 and "no node 'n7'" in p.stderr


def test_etcd_outage_is_reported_and_ridden_out(cluster_factory):
    from tests.cluster.conftest import BIN

    c = cluster_factory(nodes=2)
    c.drvs("vm", "create", "web", "--node", "n1", node="n1", check=True)
    run = [str(BIN / "drvs-run"), "--vm", "web", "--", "cat", "/etc/hostname"]
    assert subprocess.run(run, env={**c.env, "DRVS_NODE": "n1"}, capture_output=True, text=True,
                          timeout=60).stdout == "web\n"
    etcd = c.info["etcd"]
    os.killpg(etcd["pid"], signal.SIGKILL)
    t0 = time.monotonic()
    p = c.drvs("node", "ls", node="n1")
    assert p.returncode == 6 and "etcd unreachable" in p.stderr and "Traceback" not in p.stderr
    assert time.monotonic() - t0 < 15
    # every command says so in one line, with exit 6, whether it asks etcd
    # itself or through its node's drvmmd
    for args in (("vm", "ls"), ("lock", "acquire", "x", "--timeout", "1"), ("election", "leader", "e"),
                 ("ipc", "ping", "drvmm@n2"), ("group", "broadcast", "g"), ("group", "members", "g")):
        p = c.drvs(*args, node="n1")
        assert (p.returncode, p.stderr.count("\n")) == (6, 1) and "etcd unreachable" in p.stderr, (args, p.stderr)
    p = subprocess.run([str(BIN / "drvs-run"), "--node", "n2", "--", "true"], env={**c.env, "DRVS_NODE": "n1"},
                       capture_output=True, text=True, timeout=60)
    assert p.returncode in (0, 6) and "Traceback" not in p.stderr and p.stderr.count("\n") <= 1, p.stderr
    # a VM with a share of this node still runs programs here, as the node last read it; not elsewhere
    p = subprocess.run(run, env={**c.env, "DRVS_NODE": "n1"}, capture_output=True, text=True, timeout=60)
    assert (p.returncode, p.stdout) == (0, "web\n"), p.stderr
    assert "etcd unreachable" in p.stderr and "VM 'web' runs here as this node last read it" in p.stderr, p.stderr
    p = subprocess.run(run, env={**c.env, "DRVS_NODE": "n2"}, capture_output=True, text=True, timeout=60)
    assert p.returncode == 6 and p.stderr.count("\n") == 1 and "etcd unreachable" in p.stderr, p.stderr
    time.sleep(2)
    for n in ("n1", "n2"):  # the daemons wait it out, they do not die
        alive = subprocess.run(["kill", "-0", str(c.node(n)["pid"])]).returncode == 0
        assert alive, (Path(c.node(n)["state_dir"]) / "drvmmd.log").read_text()[-3000:]
    stalled = c.drvs("dev", "cluster", "restart", "n2")  # (it would wait for etcd, saying nothing)
    assert stalled.returncode == 6, stalled.stderr
    assert stalled.stderr == ("drvs: the dev cluster's etcd is not running: `drvs dev cluster restart etcd` "
                              "starts it again\n"), stalled.stderr
    r = c.drvs("dev", "cluster", "restart", "etcd", check=True)
    assert r.stdout.startswith("etcd: running again (pid ")  # (the one killed is not said as stopped)
    import json as _json

    c.info = _json.loads((c.state / "dev-cluster.json").read_text())  # (its new pid, for the teardown)
    c.wait_status("n1", "Ready", timeout=20)
    c.wait_status("n2", "Ready", timeout=20)
