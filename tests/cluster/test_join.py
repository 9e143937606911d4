"""`drvs cluster init` on one machine and `drvs node join` on another, as an
administrator would do it (each node a network namespace of its own)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from drvs.cluster.context import setns_net
from drvs.dev import cluster as dev
from drvs.dev import netns
from tests.cluster.conftest import BIN


class Machines:
    def __init__(self, tmp_path, count):
        self.name = dev.new_name()
        self.net = netns.subnet_for(self.name)
        netns.create_switch(self.name)
        self.hosts = {}
        for i in range(1, count + 1):
            host = f"m{i}"
            netns.add_host(self.name, host, f"{self.net}.{10 + i}")
            self.hosts[host] = {"ns": netns.ns_name(self.name, host), "address": f"{self.net}.{10 + i}",
                                "state": str(tmp_path / host)}
        self.daemons = []

    def drvs(self, host, *args):
        h = self.hosts[host]
        return subprocess.run([str(BIN / "drvs"), *args], env={**os.environ, "DRVS_STATE_DIR": h["state"]},
                              capture_output=True, text=True, timeout=60,
                              preexec_fn=lambda: setns_net(f"/run/netns/{h['ns']}"))

    def start_drvmmd(self, host):
        h = self.hosts[host]
        proc = subprocess.Popen([str(BIN / "drvmmd")], env={**os.environ, "DRVS_STATE_DIR": h["state"]},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=lambda: setns_net(f"/run/netns/{h['ns']}"))
        self.daemons.append(proc)
        return proc

    def run_drvmmd(self, host, timeout=30):
        """A drvmmd expected to refuse to start: its exit status and output."""
        h = self.hosts[host]
        return subprocess.run([str(BIN / "drvmmd")], env={**os.environ, "DRVS_STATE_DIR": h["state"]},
                              capture_output=True, text=True, timeout=timeout,
                              preexec_fn=lambda: setns_net(f"/run/netns/{h['ns']}"))

    def close(self):
        for proc in self.daemons:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        for h in self.hosts.values():
            pidfile = f"{h['state']}/etcd/etcd.pid"
            if os.path.exists(pidfile):
                pid = int(open(pidfile).read())
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        netns.remove_all(self.name)
        from drvs.ns import mounts

        for h in self.hosts.values():  # (a daemon killed outright leaves its view mounted)
            for point in sorted((p for _, p, _ in mounts.mount_table() if p.startswith(h["state"] + "/")),
                                reverse=True):
                mounts.detach(point)


@pytest.fixture
def machines(tmp_path):
    made = []

    def make(count=2):
        m = Machines(tmp_path, count)
        made.append(m)
        return m

    yield make
    for m in made:
        m.close()


def _ended(pid: int) -> bool:
    """Exited: gone, or a zombie (reaped here if this test's process is its
    parent, a subreaper once a jail ran in it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                return False
    except FileNotFoundError:
        return True
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    return True


def wait_ready(m, host, names, timeout=15):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        p = m.drvs(host, "node", "ls", "--format", "json")
        if p.returncode == 0 and {n["name"]: n["status"] for n in json.loads(p.stdout)} == {n: "Ready" for n in names}:
            return
        time.sleep(0.2)
    raise AssertionError(f"not all Ready: {m.drvs(host, 'node', 'ls').stdout}")


def test_init_then_join(machines):
    m = machines(3)
    m1, m2 = m.hosts["m1"], m.hosts["m2"]
    init = m.drvs("m1", "cluster", "init", "--address", m1["address"], "--name", "lab", "--node-name", "n1")
    assert init.returncode == 0, init.stderr
    token = re.search(r"--token (\S+)", init.stdout).group(1)
    m.start_drvmmd("m1")
    wait_ready(m, "m1", {"n1"})

    # A wrong secret, a token pinning another CA, a host that is not there.
    secret, fp = token.split(".")
    bad = m.drvs("m2", "node", "join", m1["address"], "--token", f"{'0' * len(secret)}.{fp}",
                 "--address", m2["address"], "--node-name", "n2")
    assert (bad.returncode, bad.stderr) == (8, "drvs: join refused: wrong token\n")
    other = m.drvs("m2", "node", "join", m1["address"], "--token", f"{secret}.{'ab' * 32}",
                   "--address", m2["address"], "--node-name", "n2")
    assert other.returncode == 8 and "another CA than the token names" in other.stderr
    nowhere = m.drvs("m2", "node", "join", f"{m.net}.99", "--token", token, "--address", m2["address"],
                     "--node-name", "n2")
    assert nowhere.returncode == 7 and "unreachable" in nowhere.stderr
    assert not os.path.exists(f"{m2['state']}/cluster.json")

    ok = m.drvs("m2", "node", "join", m1["address"], "--token", token, "--address", m2["address"], "--node-name", "n2")
    assert ok.returncode == 0, ok.stderr
    m.start_drvmmd("m2")
    wait_ready(m, "m2", {"n1", "n2"})
    ping = m.drvs("m1", "ipc", "ping", "drvmm@n2")
    assert ping.returncode == 0 and "reply from drvmm@n2" in ping.stdout

    # A second drvmmd for a node, and a node's identity copied to another
    # machine, are refused in one line, and the node goes on as it was.
    second = m.run_drvmmd("m2")
    assert second.returncode == 4 and second.stderr.startswith("drvmmd: another drvmmd runs for this node")
    m3 = m.hosts["m3"]
    os.makedirs(m3["state"])
    shutil.copytree(f"{m2['state']}/tls", f"{m3['state']}/tls")
    shutil.copy(f"{m2['state']}/node-uid", f"{m3['state']}/node-uid")
    clone = json.loads(open(f"{m2['state']}/cluster.json").read())
    clone["tls"] = {k: v.replace(m2["state"], m3["state"]) for k, v in clone["tls"].items()}
    open(f"{m3['state']}/cluster.json", "w").write(json.dumps({**clone, "address": m3["address"]}))
    copy = m.run_drvmmd("m3")
    assert copy.returncode == 4 and "with this node's identity" in copy.stderr, copy.stderr
    assert copy.stderr.count("\n") == 1
    shutil.rmtree(m3["state"])
    wait_ready(m, "m2", {"n1", "n2"})
    ping = m.drvs("m1", "ipc", "ping", "drvmm@n2")
    assert ping.returncode == 0 and "reply from drvmm@n2" in ping.stdout

    clash = m.drvs("m3", "node", "join", m1["address"], "--token", token, "--address", m.hosts["m3"]["address"],
                   "--node-name", "n2")
    assert clash.returncode == 4 and "node name 'n2' is in use" in clash.stderr
    elsewhere = m.drvs("m3", "node", "join", m1["address"], "--token", token, "--address", m1["address"],
                       "--node-name", "n3")  # (m1's address, not m3's)
    assert elsewhere.returncode == 2 and "not an address of this machine" in elsewhere.stderr
    busy = m.drvs("m1", "node", "rm", "n2")
    assert busy.returncode == 4 and "is Ready" in busy.stderr
    bad_etcd = m.drvs("m3", "cluster", "init", "--address", m.hosts["m3"]["address"], "--etcd", "notaurl")
    assert bad_etcd.returncode == 2 and "expected an etcd client URL" in bad_etcd.stderr
    no_etcd = m.drvs("m3", "cluster", "init", "--address", m.hosts["m3"]["address"], "--etcd", "http://127.0.0.1:9")
    assert no_etcd.returncode == 6 and "etcd unreachable (http://127.0.0.1:9: " in no_etcd.stderr, no_etcd.stderr
    assert not os.path.exists(os.path.join(m.hosts["m3"]["state"], "cluster.json"))
    # Also while n2 is down: the name stays n2's.
    os.killpg(m.daemons[-1].pid, signal.SIGTERM)
    m.daemons[-1].wait(timeout=10)
    clash = m.drvs("m3", "node", "join", m1["address"], "--token", token, "--address", m.hosts["m3"]["address"],
                   "--node-name", "n2")
    assert clash.returncode == 4
    # ... until it is removed for good: then the name may be had again
    gone = m.drvs("m1", "node", "rm", "n2")
    assert gone.returncode == 0, gone.stderr
    assert "n2" not in m.drvs("m1", "node", "ls").stdout
    # ... and its certificate taken back: m2's etcd client is refused (the
    # first node, which holds the CA, keeps etcd's revocation list)
    deadline = time.monotonic() + 10
    while (old := m.drvs("m2", "node", "ls")).returncode == 0:
        assert time.monotonic() < deadline, old.stdout
        time.sleep(0.2)
    assert old.returncode == 6 and "removed with `drvs node rm`, etcd refuses its certificate: `drvs node reset`" in old.stderr, old.stderr
    # m2 undoes its join (asked first), and may join again, by another name
    unasked = m.drvs("m2", "node", "reset")
    assert unasked.returncode == 2 and "add --force to go on" in unasked.stderr, unasked.stderr
    assert os.path.exists(f"{m2['state']}/cluster.json")
    reset = m.drvs("m2", "node", "reset", "--force")
    assert reset.returncode == 0, reset.stderr
    assert reset.stdout.endswith("node n2 reset: it is a single node now (`drvs node join` or `drvs cluster init` "
                                 "again)\n"), reset.stdout
    assert not {"cluster.json", "tls", "node-uid", "vms", "cache", "vms-last-read.json"} & set(os.listdir(m2["state"])), \
        os.listdir(m2["state"])
    assert m.drvs("m2", "node", "reset", "--force").returncode == 3  # (in no cluster now)
    rejoin = m.drvs("m2", "node", "join", m1["address"], "--token", token, "--address", m2["address"],
                    "--node-name", "n4")
    assert rejoin.returncode == 0, rejoin.stderr
    m.start_drvmmd("m2")
    deadline = time.monotonic() + 20
    while "n4    Ready" not in (ls := m.drvs("m1", "node", "ls")).stdout:
        assert time.monotonic() < deadline, ls.stdout
        time.sleep(0.2)
    os.killpg(m.daemons[-1].pid, signal.SIGTERM)
    m.daemons[-1].wait(timeout=10)
    busy = m.drvs("m1", "node", "reset", "--force")  # (its drvmmd runs)
    assert busy.returncode == 4 and "drvmmd runs for this node" in busy.stderr, busy.stderr
    again = m.drvs("m3", "node", "join", m1["address"], "--token", token, "--address", m.hosts["m3"]["address"],
                   "--node-name", "n2")
    assert again.returncode == 0, again.stderr
    again = m.drvs("m1", "cluster", "init", "--address", m1["address"])
    assert again.returncode == 4 and "in a cluster already" in again.stderr

    # The first node rebooted, as it were: etcd and drvmmd gone; its drvmmd,
    # started again, starts the cluster's etcd again.
    etcd_pid = int(open(f"{m1['state']}/etcd/etcd.pid").read())
    os.killpg(etcd_pid, signal.SIGKILL)
    os.killpg(m.daemons[0].pid, signal.SIGKILL)
    m.daemons[0].wait(timeout=10)
    assert m.drvs("m1", "node", "ls").returncode == 6  # (no store now)
    first = m.start_drvmmd("m1")
    deadline = time.monotonic() + 40
    while "n1    Ready" not in m.drvs("m1", "node", "ls").stdout:  # (n2 stays down)
        assert time.monotonic() < deadline, m.drvs("m1", "node", "ls")
        time.sleep(0.2)
    assert int(open(f"{m1['state']}/etcd/etcd.pid").read()) != etcd_pid

    # An init whose etcd cannot start (its port taken) says why, at once;
    # one with an address that is not this machine's does not start it.
    m3 = m.hosts["m3"]
    nowhere = m.drvs("m3", "cluster", "init", "--address", f"{m.net}.77", "--node-name", "x")
    assert nowhere.returncode == 2 and "not an address of this machine" in nowhere.stderr
    taker = subprocess.Popen([sys.executable, "-c", "import socket, sys, time; s = socket.socket(); "
                              f"s.bind(('{m3['address']}', 2379)); s.listen(); print('ok', flush=True); time.sleep(60)"],
                             stdout=subprocess.PIPE, text=True, preexec_fn=lambda: setns_net(f"/run/netns/{m3['ns']}"))
    try:
        assert taker.stdout.readline() == "ok\n"
        t0 = time.monotonic()
        bad = subprocess.run([str(BIN / "drvs"), "cluster", "init", "--address", m3["address"], "--node-name", "x"],
                             env={**os.environ, "DRVS_STATE_DIR": f"{m3['state']}-init"}, capture_output=True,
                             text=True, timeout=60, preexec_fn=lambda: setns_net(f"/run/netns/{m3['ns']}"))
        assert bad.returncode == 125 and bad.stderr.startswith("drvs: etcd exited: "), bad.stderr
        assert bad.stderr.count("\n") == 1 and "address already in use" in bad.stderr, bad.stderr
        assert time.monotonic() - t0 < 15
    finally:
        taker.kill()
        taker.wait()

    # The first node too, once its drvmmd is stopped: its etcd stops and goes
    # with the CA; it may make a new cluster.
    os.killpg(first.pid, signal.SIGTERM)
    first.wait(timeout=10)
    etcd_pid = int(open(f"{m1['state']}/etcd/etcd.pid").read())
    reset = m.drvs("m1", "node", "reset", "--force")
    assert reset.returncode == 0, reset.stderr
    assert f"the cluster's etcd (pid {etcd_pid}, stopped)" in reset.stdout, reset.stdout
    assert _ended(etcd_pid) and not os.path.exists(f"{m1['state']}/ca")
    again = m.drvs("m1", "cluster", "init", "--address", m1["address"], "--node-name", "n1")
    assert again.returncode == 0, again.stderr
