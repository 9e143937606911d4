"""The one table of DVOS system calls: for each call its server, how its
arguments decode, and how it is served.

    served    the filter sends it to the node's supervisor, which asks the
              named server (its argument 0 is a pid: calls on the node's own
              pids stay in the kernel, see ext/seccomp.c)
    kernel    the kernel's own call gives the VM's semantics already (the
              pid ranges make kernel pids VM-wide), or stays node-local
              as noted
    denied    refused inside jails

`drvs syscalls` prints it; the filter is built from it (NOTIFIED); the
supervisor dispatches on it (drvs/dvos/supervisor.py, HANDLERS)."""

from collections import namedtuple

from .. import _sys

SERVED, KERNEL, DENIED = "served", "kernel", "denied"


class Syscall(namedtuple("Syscall", "name server level args note")):
    """args: "name:kind ..." with kind pid/sig/int (signed 32-bit) or ptr."""

    __slots__ = ()

    @property
    def nr(self) -> int | None:
        return _sys.NR.get(self.name)

    def decode(self, raw) -> dict:
        out = {}
        for item, value in zip(self.args.split(), raw):
            name, _, kind = item.partition(":")
            if kind == "ptr":
                out[name] = value
            else:
                value &= 0xFFFFFFFF
                out[name] = value - (1 << 32) if value & 0x80000000 else value
        return out


TABLE = (
    Syscall("kill", "pm", SERVED, "pid:pid sig:sig",
            "another node's pid, a process group (spanning nodes), or -1: every process of the VM"),
    Syscall("tkill", "pm", SERVED, "tid:pid sig:sig", "a thread on another node"),
    Syscall("tgkill", "pm", SERVED, "tgid:pid tid:pid sig:sig", "a thread on another node"),
    Syscall("rt_sigqueueinfo", "pm", SERVED, "pid:pid sig:sig uinfo:ptr", "a queued signal to another node"),
    Syscall("rt_tgsigqueueinfo", "pm", SERVED, "tgid:pid tid:pid sig:sig uinfo:ptr",
            "a queued signal to a thread on another node"),
    Syscall("fcntl", "fs", SERVED, "fd:int cmd:int lock:ptr",
            "F_GETLK, F_SETLK, F_SETLKW on the VM's file system: the file server's lock table first "
            "(locks hold across nodes); other commands and files: the kernel's"),
    Syscall("flock", "fs", SERVED, "fd:int op:int", "on the VM's file system: across nodes, as fcntl"),
    Syscall("fallocate", "fs", SERVED, "fd:int mode:int offset:ptr len:ptr",
            "on the VM's file system: made by the file server (FUSE through pyfuse3 has none); "
            "other files: the kernel's"),
    Syscall("sync", "fs", SERVED, "",
            "the VM's file system: every change made so far on the disks of its server and replicas "
            "(FUSE has no sync of its own); then the kernel's, of the node's other file systems"),
    Syscall("syncfs", "fs", SERVED, "fd:int", "on the VM's file system: as sync; other files: the kernel's"),
    Syscall("getpid", "-", KERNEL, "", "VM-wide: each node's cell allocates from its own pid range"),
    Syscall("gettid", "-", KERNEL, "", "VM-wide (pid ranges)"),
    Syscall("getppid", "-", KERNEL, "", "VM-wide (pid ranges); a remote run's parent is its cell's init"),
    Syscall("clone", "-", KERNEL, "", "the child's pid is in the node's range"),
    Syscall("clone3", "-", KERNEL, "", "the child's pid is in the node's range"),
    Syscall("fork", "-", KERNEL, "", "the child's pid is in the node's range"),
    Syscall("vfork", "-", KERNEL, "", "the child's pid is in the node's range"),
    Syscall("wait4", "-", KERNEL, "", "children are always on the caller's node"),
    Syscall("waitid", "-", KERNEL, "", "children are always on the caller's node"),
    Syscall("getpgid", "-", KERNEL, "", "node-local: another node's pid gives ESRCH"),
    Syscall("getpgrp", "-", KERNEL, "", "VM-wide value"),
    Syscall("setpgid", "-", KERNEL, "", "groups are created on one node; kill(-pgid) reaches all nodes"),
    Syscall("getsid", "-", KERNEL, "", "node-local: another node's pid gives ESRCH"),
    Syscall("setsid", "-", KERNEL, "", "VM-wide value"),
    Syscall("pidfd_open", "-", KERNEL, "", "node-local: another node's pid gives ESRCH"),
    Syscall("pidfd_send_signal", "-", KERNEL, "", "pidfds are of local processes"),
    Syscall("execve", "-", KERNEL, "", ""),
    Syscall("exit_group", "-", KERNEL, "", ""),
    Syscall("sched_setaffinity", "-", KERNEL, "", "node-local: the cell's cpuset bounds it"),
    Syscall("getpriority", "-", KERNEL, "", "node-local"),
    Syscall("setpriority", "-", KERNEL, "", "node-local"),
    Syscall("prlimit64", "-", KERNEL, "", "node-local"),
    Syscall("ptrace", "-", KERNEL, "", "node-local; capabilities of the jail bound it"),
    Syscall("process_vm_readv", "-", KERNEL, "", "node-local"),
    Syscall("process_vm_writev", "-", KERNEL, "", "node-local"),
)

BY_NR = {s.nr: s for s in TABLE if s.nr is not None}
# What the filter sends to the supervisor: the pid calls (when argument 0 is
# another node's), fcntl's lock commands, flock, fallocate, sync, syncfs.
NOTIFIED = tuple(s.nr for s in TABLE if s.level == SERVED and s.nr is not None)
