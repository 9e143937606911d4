"""Shared fixtures: a private DRVS state directory per test, helpers to run
the real commands, and a check that nothing (processes, cgroups, mounts)
outlives a test, with cleanup even when the test failed."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import prctl
import pytest

VENV_BIN = Path(sys.executable).parent
DRVS = str(VENV_BIN / "drvs")
DRVS_RUN = str(VENV_BIN / "drvs-run")
DRVMMD = str(VENV_BIN / "drvmmd")

# Cell inits are double-forked orphans; as a subreaper this process becomes
# their parent, so they are reaped here rather than left as zombies.
prctl.set_child_subreaper(True)


def pytest_collection_modifyitems(config, items):
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="DRVS tests build real jails and need root")
        for item in items:
            item.add_marker(skip)


class Drvs:
    """Runs the installed commands against one state directory."""

    def __init__(self, state: Path):
        self.state = state
        # A quick idle check, so that the init of a cell whose runs were
        # killed leaves within the test rather than after 5 s.
        config = state.parent / "drvs.toml"
        config.write_text("idle_check_ms = 200\n")
        self.env = {**os.environ, "DRVS_STATE_DIR": str(state), "DRVS_CONFIG": str(config)}
        self.env.pop("DRVS_VM", None)

    def run(self, *args, input=None, timeout=60, check=False, **kw) -> subprocess.CompletedProcess:
        """drvs-run ARGS..., text output captured."""
        return self._call([DRVS_RUN, *args], input, timeout, check, **kw)

    def drvs(self, *args, input=None, timeout=60, check=False, **kw) -> subprocess.CompletedProcess:
        return self._call([DRVS, *args], input, timeout, check, **kw)

    def _call(self, argv, input, timeout, check, **kw):
        p = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout,
                           env=self.env, **kw)
        if check and p.returncode != 0:
            raise AssertionError(f"{argv} exited {p.returncode}: {p.stderr}")
        return p

    def popen(self, *args, **kw) -> subprocess.Popen:
        return subprocess.Popen([DRVS_RUN, *args], env=self.env, text=True, **kw)


def _cgroup_root(state: Path) -> str:
    from drvs.config import Config

    return Config(str(state)).cgroup_root


def cell_inits(state: Path) -> list[int]:
    """Live (not zombie) cell inits of this state directory's cells."""
    root = f"/{_cgroup_root(state)}/"
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if not (d / "cmdline").read_bytes().startswith(b"drvs-cell "):
                continue
            if (d / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            if root not in (d / "cgroup").read_text():
                continue
        except OSError:
            continue
        out.append(int(d.name))
    return out


def drvs_cgroups(state: Path) -> list[Path]:
    from drvs.ns.cgroup import hierarchies

    name = _cgroup_root(state)
    return [Path(h.caller, name) for h in hierarchies() if Path(h.caller, name).exists()]


def drvs_mounts(state: Path) -> list[str]:
    return [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if line.split()[4].startswith(str(state))]


def _reap_children() -> None:
    from drvs.ns.jail import reap_orphans

    reap_orphans()


def force_cleanup(state: Path) -> None:
    """What a failed test may have left: end cell inits, remove cgroups."""
    for pid in cell_inits(state):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 5
    for root in drvs_cgroups(state):
        for d in sorted(root.rglob("*"), key=lambda p: -len(p.parts)) + [root]:
            if not d.is_dir():
                continue
            while True:
                try:
                    for pid in (d / "cgroup.procs").read_text().split():
                        os.kill(int(pid), signal.SIGKILL)
                    d.rmdir()
                    break
                except (OSError, ValueError):
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.01)


@pytest.fixture
def drvs(tmp_path):
    """A DRVS with its own state; asserts afterwards that nothing was left."""
    state = tmp_path / "state"
    d = Drvs(state)
    yield d
    time.sleep(0)  # let nothing be pending in this process
    _reap_children()
    left = {"cell inits": cell_inits(state), "cgroups": drvs_cgroups(state), "mounts": drvs_mounts(state)}
    force_cleanup(state)
    _reap_children()
    assert not any(left.values()), f"left behind after the test: {left}"
