"""Terminals: drvs login and -t, driven through a real pty (pexpect)."""

import signal
import time

import pexpect
import pytest

from conftest import DRVS, DRVS_RUN



def ready(c) -> None:
    """Wait for the shell, then give it a prompt that typed input cannot fake."""
    c.expect(r"[#$] ")
    c.sendline("PS1='P''> '")
    c.expect_exact("P> ")


def spawn(drvs, argv, rows=30, cols=100):
    return pexpect.spawn(argv[0], argv[1:], env=drvs.env, encoding="utf-8", timeout=20,
                         dimensions=(rows, cols))


def shutdown(child) -> None:
    """End a session as a closed terminal would (SIGHUP), so drvs cleans up."""
    if child.isalive():
        child.kill(signal.SIGHUP)
        try:
            child.expect(pexpect.EOF, timeout=10)
        except pexpect.TIMEOUT:
            pass
    child.close(force=True)


def finish(child) -> int:
    child.expect(pexpect.EOF)
    child.close()
    return child.exitstatus


def test_login_shell_runs_commands_and_exits_with_its_status(drvs):
    drvs.drvs("vm", "create", "web", check=True)
    c = spawn(drvs, [DRVS, "login", "web"], rows=33, cols=101)
    try:
        ready(c)
        c.sendline("echo host=$(hostname) home=$HOME pwd=$(pwd) tty=$(tty) size=$(stty size) "
                   "login=$(shopt -q login_shell && echo yes)")
        c.expect(r"host=(\S+) home=(\S+) pwd=(\S+) tty=(\S+) size=(\d+ \d+) login=(\S+)")
        assert c.match.groups() == ("web", "/root", "/root", "/dev/pts/0", "33 101", "yes")
        c.sendline("exit 5")
        assert finish(c) == 5
    finally:
        shutdown(c)


def test_ctrl_c_interrupts_the_foreground_job_not_the_shell(drvs):
    c = spawn(drvs, [DRVS, "login", "default"])
    try:
        ready(c)
        c.sendline("sleep 60")
        time.sleep(0.5)
        c.sendintr()
        c.expect_exact("P> ")
        c.sendline("echo status-$?")
        c.expect(r"status-(\d+)")
        assert c.match.group(1) == "130"
        c.sendline("echo still-here")
        c.expect("still-here")
        c.sendline("exit")
        assert finish(c) == 0
    finally:
        shutdown(c)


def test_job_control(drvs):
    c = spawn(drvs, [DRVS, "login", "default"])
    try:
        ready(c)
        c.sendline("sleep 60")
        time.sleep(0.5)
        c.sendcontrol("z")
        c.expect("Stopped")
        # `wait` skips a job bash still counts as stopped (its end after the
        # SIGCONT that `kill` adds may not be noticed yet): ask until it is gone.
        c.sendline("echo jobs=$(jobs | grep -c sleep); kill %1; "
                   "while jobs %1 >/dev/null 2>&1; do sleep 0.1; done; echo done")
        c.expect(r"jobs=(\d+)")
        assert c.match.group(1) == "1"
        c.expect("done")
        c.sendline("exit 0")
        assert finish(c) == 0
    finally:
        shutdown(c)


def test_window_size_follows_the_callers_terminal(drvs):
    c = spawn(drvs, [DRVS_RUN, "-it", "--", "bash", "--norc", "-i"], rows=24, cols=80)
    try:
        ready(c)
        c.setwinsize(40, 132)
        time.sleep(0.3)
        c.sendline("stty size")
        c.expect(r"(\d+) (\d+)\r\n")
        assert c.match.groups() == ("40", "132")
        c.sendline("exit 3")
        assert finish(c) == 3
    finally:
        shutdown(c)


def test_tty_without_interactive_input(drvs):
    c = spawn(drvs, [DRVS_RUN, "-t", "--", "sh", "-c", "tty; test -t 0 && echo stdin-is-tty"])
    out = c.read()
    c.close()
    assert "/dev/pts/0" in out and "stdin-is-tty" in out
    assert c.exitstatus == 0


def test_login_needs_a_terminal(drvs):
    p = drvs.drvs("login", "default", input="")
    assert p.returncode == 2
    assert p.stderr.startswith("drvs: drvs login needs a terminal")


@pytest.mark.parametrize("opt", ["-t", "-it"])
def test_pipes_still_work_with_tty_flags_over_pexpect(drvs, opt):
    c = spawn(drvs, [DRVS_RUN, opt, "--", "sh", "-c", "seq 3 | paste -sd+ | bc 2>/dev/null || echo 6"])
    out = c.read()
    c.close()
    assert "6" in out
