"""Attacks and odd callers the jail must withstand (found in review)."""

import os
import signal
import subprocess
import time

from conftest import DRVS_RUN


def test_symlink_planted_in_data_cannot_redirect_a_bind(drvs, tmp_path):
    victim = tmp_path / "host-victim"
    victim.mkdir()
    src = tmp_path / "src"
    src.write_text("x")
    drvs.run("--", "ln", "-s", str(victim), "/data/lnk", check=True)
    p = drvs.run("-v", f"{src}:/data/lnk/f", "--", "true")
    assert (p.returncode, p.stderr) == (125, "drvs-run: bind target /data/lnk/f: a symbolic link is in the way "
                                             "(binds never follow links inside the jail)\n")
    assert list(victim.iterdir()) == []  # nothing was created on the host


def test_home_cannot_be_swapped_for_a_link_to_the_host(drvs):
    drvs.run("--", "sh", "-c", "rm -rf /root/* 2>/dev/null; ln -s / /data/root; ln -s / /root/escape", check=True)
    p = drvs.run("--", "sh", "-c", "ls -a /root; test -e /root/escape/usr/../etc/hostname && cat /root/escape/proc/1/comm")
    # /root is the VM's own home again; the planted link resolves inside the jail only.
    assert p.stdout.split("\n")[:3] == [".", "..", "escape"]
    assert "drvs-cell" in p.stdout  # the jail's pid 1, not the host's


def test_vm_data_is_out_of_host_users_reach(drvs):
    drvs.run("--", "true", check=True)
    assert os.stat(drvs.state).st_mode & 0o777 == 0o700


def test_cell_init_shows_no_host_root_even_to_ptrace(drvs, tmp_path):
    marker = tmp_path / "host-file"
    marker.write_text("host")
    p = drvs.run("--cap-add", "sys_ptrace", "--", "sh", "-c",
                 f"ls /proc/1/root/ 2>&1; cat /proc/1/root{marker} 2>&1; cat /proc/1/environ 2>&1 | head -c 50")
    assert "host" not in p.stdout.replace(str(marker), "")
    assert "Permission denied" in p.stdout or "No such file" in p.stdout


def test_kill_9_through_drvs_kill_ends_the_run_cleanly(drvs):
    run_id = drvs.run("-d", "--", "sleep", "300", check=True).stdout.strip()
    assert drvs.drvs("kill", "-s", "KILL", run_id).returncode == 0
    deadline = time.monotonic() + 10
    while drvs.drvs("vm", "show", "default", "--format", "json").stdout.count(run_id):
        assert time.monotonic() < deadline, "the run did not end"
        time.sleep(0.05)
    assert drvs.drvs("wait", run_id, check=True).stdout == "137\n"


def test_closed_stdio_holds_no_lock(drvs):
    slow = subprocess.Popen([DRVS_RUN, "--", "sleep", "3"], env=drvs.env, stdin=subprocess.DEVNULL,
                            preexec_fn=lambda: [os.close(fd) for fd in (0, 1, 2)])
    try:
        time.sleep(0.8)
        t0 = time.monotonic()
        assert drvs.run("--", "true").returncode == 0
        assert time.monotonic() - t0 < 2.0  # not waiting for the slow run's end
    finally:
        assert slow.wait(timeout=20) == 0


def test_sigchld_ignored_by_the_caller(drvs):
    p = subprocess.run([DRVS_RUN, "--", "sh", "-c", "sleep 0.1 & wait; exit 4"], env=drvs.env, timeout=20,
                       preexec_fn=lambda: signal.signal(signal.SIGCHLD, signal.SIG_IGN), capture_output=True)
    assert p.returncode == 4, p.stderr


def test_huge_or_odd_command_names(drvs):
    p = drvs.run("--", "x" * 5000)
    assert p.returncode == 127 and "command not found" in p.stderr
    p = drvs.run("--", "")
    assert p.returncode == 127
    p = drvs.run("--", "a\x1fb")
    assert p.returncode == 127 and "Traceback" not in p.stderr


def test_non_root_user_owns_its_terminal(drvs):
    import pexpect

    c = pexpect.spawn(DRVS_RUN, ["-it", "-u", "65534:65534", "--", "sh", "-c", "stat -c %u $(tty); echo ok > $(tty)"],
                      env=drvs.env, encoding="utf-8", timeout=20)
    out = c.read()
    c.close()
    assert "65534" in out and "ok" in out and c.exitstatus == 0
