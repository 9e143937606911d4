"""Nothing outlives a run unless asked: processes, cgroups, mounts, cells."""

import json
import os
import signal
import subprocess
import time

from conftest import DRVMMD, cell_inits, drvs_cgroups, drvs_mounts


def nothing_left(drvs) -> dict:
    return {"cell inits": cell_inits(drvs.state), "cgroups": drvs_cgroups(drvs.state), "mounts": drvs_mounts(drvs.state)}


def wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_nothing_left_after_a_run(drvs):
    assert drvs.run("--", "sh", "-c", "sleep 0.1 & echo started").returncode == 0
    assert not any(nothing_left(drvs).values())
    assert not list((drvs.state / "runs").glob("*.json"))


def test_background_children_end_with_the_program(drvs):
    """A daemon the program leaves behind is ended with it."""
    p = drvs.run("--", "sh", "-c", "setsid sleep 300 & echo $!")
    assert p.returncode == 0
    assert not any(nothing_left(drvs).values())
    assert "sleep 300" not in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout


def test_nothing_left_after_failed_setup(drvs):
    for args in (["-w", "/no/such/dir", "--", "true"], ["--", "no-such-cmd"], ["--", "/etc/passwd"],
                 ["--cpuset-cpus", "4000", "--", "true"]):
        p = drvs.run(*args)
        assert p.returncode in (2, 125, 126, 127)
        assert not any(nothing_left(drvs).values()), args


def test_killed_caller_takes_its_program_along(drvs):
    proc = drvs.popen("--", "sh", "-c", "echo ready; exec sleep 300", stdout=subprocess.PIPE)
    assert proc.stdout.readline() == "ready\n"
    proc.kill()
    proc.wait()
    # The keeper learns of its parent's death and ends the program at once;
    # the idle cell's init leaves within its check interval.
    assert wait_until(lambda: "sleep 300" not in subprocess.run(
        ["ps", "-eo", "args"], capture_output=True, text=True).stdout)
    assert wait_until(lambda: not cell_inits(drvs.state))
    # What only a live drvs-run removes (the cell's cgroups) is tidied by drvmmd.
    out = subprocess.run([DRVMMD, "--once"], env=drvs.env, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["cells"] == ["default"]
    assert not any(nothing_left(drvs).values())


def test_concurrent_runs_share_then_release_the_cell(drvs):
    procs = [drvs.popen("--", "sh", "-c", f"sleep 0.{i}; echo run{i}", stdout=subprocess.PIPE)
             for i in range(1, 6)]
    outs = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert outs == [f"run{i}" for i in range(1, 6)]
    assert all(p.returncode == 0 for p in procs)
    assert not any(nothing_left(drvs).values())


def test_sigterm_to_caller_ends_run_and_cleans_up(drvs):
    proc = drvs.popen("--", "sleep", "300", stdout=subprocess.PIPE)
    assert wait_until(lambda: cell_inits(drvs.state))
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 128 + signal.SIGTERM
    assert not any(nothing_left(drvs).values())


def test_host_mount_table_is_untouched(drvs):
    before = open("/proc/self/mountinfo").read().count("\n")
    drvs.run("-v", f"{os.getcwd()}:/src:ro", "--", "ls", "/src", check=True)
    assert open("/proc/self/mountinfo").read().count("\n") == before


def test_the_cell_keeps_none_of_its_creators_pipes(drvs):
    """The run that created the cell ends, another keeps the cell alive: the
    creator's caller still sees EOF on its pipes at once."""
    creator = drvs.popen("--", "sh", "-c", "echo made; sleep 0.5", stdout=subprocess.PIPE)
    assert creator.stdout.readline() == "made\n"
    keeper = drvs.popen("--", "sleep", "30", stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        out, _ = creator.communicate(timeout=10)  # EOF although the cell (and its init) live on
        assert creator.returncode == 0
        assert cell_inits(drvs.state)
    finally:
        keeper.terminate()
        keeper.wait(timeout=20)
