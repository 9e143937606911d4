"""Real clusters on this machine: network namespaces, etcd, a drvmmd per node.
Every cluster is taken down at the end of its test, also when it fails."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


class Cluster:
    def __init__(self, state: Path, info: dict):
        self.state, self.info = state, info
        self.env = {**os.environ, "DRVS_STATE_DIR": str(state)}
        self.env.pop("DRVS_NODE", None)

    def drvs(self, *args, node: str | None = None, timeout=60, check=False, input=None):
        argv = [str(BIN / "drvs")] + (["--node", node] if node else []) + list(args)
        p = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=timeout, input=input)
        if check and p.returncode != 0:
            raise AssertionError(f"{argv}: exit {p.returncode}: {p.stderr}")
        return p

    def nodes(self, via: str = "n1") -> dict[str, dict]:
        out = self.drvs("node", "ls", "--format", "json", node=via, check=True).stdout
        return {n["name"]: n for n in json.loads(out)}

    def node(self, name: str) -> dict:
        return next(n for n in self.info["nodes"] if n["name"] == name)

    def wait_status(self, name: str, status: str, timeout: float = 10, via: str = "n1") -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.nodes(via)[name]["status"] == status:
                return time.monotonic() - t0
            time.sleep(0.1)
        raise AssertionError(f"{name} not {status} after {timeout} s: {self.nodes(via)[name]}")


@pytest.fixture
def cluster_factory(tmp_path):
    from drvs.dev import cluster as dev

    from drvs.dev import netns

    made, homes = [], []  # (each node's cgroup and state dir: their cells' cgroups are checked gone)

    def make(nodes=2, cpus_per_node=None):
        state = tmp_path / f"state{len(made)}"
        state.mkdir()
        name = dev.new_name()
        made.append((state, name))
        info = dev.up(str(state), nodes, cpus_per_node, name)
        homes.extend((f"drvs-dev-{name}-{n['name']}", n["state_dir"]) for n in info["nodes"])
        return Cluster(state, info)

    yield make
    for state, _ in made:
        if (state / "dev-cluster.json").exists():
            dev.down(str(state))
    # Only our own clusters' namespaces: another test run may share the machine.
    leftover = [ns for _, name in made for ns in netns.existing(name)]
    assert not leftover, leftover
    from drvs.config import Config
    from drvs.ns.cgroup import Cgroup

    # the nodes' cgroups, and cells a drvmmd started by hand made under ours
    groups = [Cgroup.under_caller(g) for node_cg, home in homes for g in (node_cg, Config(home).cgroup_root)]
    cgroups = [d for cg in groups for d in cg.dirs if os.path.isdir(d)]
    assert not cgroups, cgroups
    with open("/proc/self/mounts") as f:
        mounts = [line.split()[1] for line in f if any(line.split()[1].startswith(f"{state}/") for state, _ in made)]
    assert not mounts, mounts
